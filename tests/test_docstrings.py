"""Every public docstring of ``conceptlab`` parses cleanly as a Google-style docstring.

The API reference of the course site is generated with mkdocstrings, which parses the
docstrings with griffe's Google parser. This test runs that parser (through griffe's static
analysis: nothing is imported) on the docstring of every public module, class, function,
method and attribute of the package and fails on what would render wrongly:

- a parser warning: a documented parameter that is not in the signature, an ``Args:`` or
  ``Raises:`` entry without ``name: description``, a continuation line with a confusing
  indentation, ...;
- a section title the parser skipped (``Args:`` with no blank line above it, or with a
  blank line below it);
- an ``Args:`` entry without a description;
- a ``Returns:``/``Yields:`` section that the parser split into several values of which
  some have no name: a wrapped description whose second line is not indented 4 more spaces
  than the first. Several returned values are written ``name: description``;
- a ``Returns:`` line read as a value named after its first word (``A :class:`X```).

Types come from the signatures, so a parameter without an annotation is not reported
(``warn_missing_types=False``: the mkdocstrings configuration needs the same option, as
about half of the parameters have no annotation).

One test per module: ``pytest tests/test_docstrings.py -k masks`` checks ``conceptlab.masks``.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path

import pytest

griffe = pytest.importorskip("griffe")

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "conceptlab"

# the options of griffe's Google parser for the API reference (its defaults, but no warning
# for a parameter whose type is neither annotated nor written in the docstring)
OPTIONS = {"warn_unknown_params": True, "warn_missing_types": False, "warnings": True}


def _module_names() -> list[str]:
    names = []
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(p.startswith("_") for p in parts):  # private modules, __main__
            continue
        names.append(".".join(parts))
    return names


@functools.lru_cache(maxsize=1)
def _package():
    return griffe.load("conceptlab", search_paths=[str(ROOT)], docstring_parser="google",
                       allow_inspection=False, resolve_aliases=False)


def _public(name: str) -> bool:
    return not name.startswith("_") or (name.startswith("__") and name.endswith("__"))


def _documented(obj):
    """``obj`` and its public members defined in the same module (not imported names)."""
    yield obj
    for name, member in obj.members.items():
        if member.is_alias or member.is_module or not _public(name):
            continue
        yield from _documented(member)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        # warnings, and the one debug message about docstrings: a section title skipped
        # (other debug messages are about loading, e.g. a base class outside the package)
        if record.levelno >= logging.WARNING or "Possible section skipped" in message:
            self.messages.append(message)


def _parse(docstring) -> tuple[list, list[str]]:
    """The sections of one docstring and the parser's messages about it."""
    log = logging.getLogger("griffe")
    handler, level = _Records(), log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        sections = docstring.parse("google", **OPTIONS)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    return sections, handler.messages


def docstring_problems(module_name: str) -> list[str]:
    """What griffe's Google parser reports on the public docstrings of one module."""
    package = _package()
    return problems_in(package[module_name.removeprefix("conceptlab.")]
                       if "." in module_name else package)


def problems_in(module) -> list[str]:
    """The problems of the public docstrings of a module loaded by griffe."""
    problems = []
    for obj in _documented(module):
        if obj.docstring is None:
            continue
        path = Path(obj.filepath)
        path = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        where = f"{path}:{obj.docstring.lineno} ({obj.path})"
        sections, messages = _parse(obj.docstring)
        problems += [f"{where}: {m.split(': ', 1)[-1]}" for m in messages]
        for section in sections:
            kind = section.kind
            if kind is griffe.DocstringSectionKind.parameters:
                problems += [f"{where}: Args entry '{p.name}' has no description"
                             for p in section.value if not p.description.strip()]
            if kind in (griffe.DocstringSectionKind.returns, griffe.DocstringSectionKind.yields):
                items = section.value
                problems += [
                    f"{where}: {kind.value} entry read as a value named '{item.name}' (a Sphinx "
                    f"role after its first word: write `Name` in backticks instead)"
                    for item in items if item.name and re.match(r"\w+:`", item.description)]
                if len(items) > 1 and not all(item.name for item in items):
                    problems.append(
                        f"{where}: {kind.value} section split into {len(items)} values, some "
                        f"unnamed: indent a wrapped line 4 more spaces, or name each value "
                        f"'name: description' (second value: {items[1].description[:40]!r})")
    return problems


@pytest.mark.parametrize("module_name", _module_names())
def test_docstrings_parse_as_google(module_name):
    problems = docstring_problems(module_name)
    assert not problems, "\n".join(problems)


def test_all_modules_found():
    names = _module_names()
    assert "conceptlab" in names and "conceptlab.masks" in names
    assert "conceptlab.shapes.world" in names and "conceptlab.train.config" in names


def test_checks_catch_malformed_docstrings(tmp_path):
    """The checks above flag each kind of mistake they claim to flag."""
    (tmp_path / "badpkg").mkdir()
    (tmp_path / "badpkg" / "__init__.py").write_text('''
def f(a, b):
    """Summary.

    Args:
        a: fine.
        c: not a parameter.
        b:

    Returns:
        A value that is described on a line
        that wraps without indentation.
    """


def h():
    """Summary.

    Returns:
        A :class:`Thing`.
    """


def g(a):
    """Summary.
    Args:
        a: no blank line above the section.
    """
''')
    pkg = griffe.load("badpkg", search_paths=[str(tmp_path)], allow_inspection=False)
    problems = "\n".join(problems_in(pkg))
    assert "Parameter 'c' does not appear in the function signature" in problems
    assert "Args entry 'b' has no description" in problems
    assert "returns section split into 2 values" in problems
    assert "Possible section skipped" in problems
    assert "returns entry read as a value named 'A'" in problems
    assert len(problems.splitlines()) == 5, problems
