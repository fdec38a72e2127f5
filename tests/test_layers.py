"""The package's layering: every module imports only from the layers below it.

``LAYERS`` lists the modules lowest first; a module may import (at the top or inside a
function) only modules of an EARLIER entry. A new module must be placed here, so the
docs/architecture.md's module table and this list stay the design. An upward or circular import fails.
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "conceptlab"

LAYERS = [
    # foundations: no conceptlab imports
    ["_version", "fileio", "attention", "masks", "parallel", "shapes.world", "viz.figures"],
    ["models"],                                   # loading, model kind, images, prompts
    ["crf", "maps", "losses", "unet_delta"],
    ["discovery"],                                # concepts found in the model's attention
    ["tokens"],
    ["concept_files"],
    ["train.config", "train.history", "train.data", "train.embedding"],
    ["train.checkpoint", "train.precision"],
    ["train.trainer"],
    ["train"],
    ["estep", "result", "viz.widgets"],
    ["experimental", "em_callbacks"],
    ["em", "generation", "legacy"],
    ["many"],                                     # a folder of images, one learn run each
    ["viz"],
    ["shapes.model", "shapes.examples", "shapes.judge", "shapes.suites"],
    ["shapes.identity"],                          # reads the judge's shape probabilities
    ["families"],                                 # random-weight SD 1.5 / 2.1 / SDXL shapes
    ["shapes.train"],
    ["shapes"],
    ["evaluate"],                                 # the paper's measures: judges, prompts, tables
    ["cli"],
    ["__main__"],
    [""],                                         # conceptlab/__init__.py
]
LAYER_OF = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """conceptlab modules imported anywhere in the file, as names relative to the package."""
    tree = ast.parse(path.read_text())
    here = module_name(path).split(".") if module_name(path) else []
    is_pkg = path.name == "__init__.py"
    base = here if is_pkg else here[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "conceptlab" or a.name.startswith("conceptlab."):
                    out.add(a.name.removeprefix("conceptlab").lstrip("."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(anchor + ([node.module] if node.module else []))
            elif node.module and (node.module == "conceptlab"
                                  or node.module.startswith("conceptlab.")):
                mod = node.module.removeprefix("conceptlab").lstrip(".")
            else:
                continue
            for a in node.names:  # `from . import masks` imports the module masks
                sub = f"{mod}.{a.name}" if mod else a.name
                out.add(sub if sub in LAYER_OF else mod)
    return out


FILES = sorted(PKG.rglob("*.py"))


def test_every_module_has_a_layer():
    missing = [module_name(p) for p in FILES if module_name(p) not in LAYER_OF]
    assert not missing, f"add these modules to LAYERS in {__file__}: {missing}"


@pytest.mark.parametrize("path", FILES, ids=[module_name(p) or "conceptlab" for p in FILES])
def test_imports_go_down_only(path):
    me = module_name(path)
    bad = []
    for dep in sorted(imported_modules(path)):
        if dep == me or dep.startswith(me + ".") and me:  # a package importing its members
            continue
        if dep not in LAYER_OF:
            bad.append(f"{dep} (unknown module)")
        elif LAYER_OF[dep] >= LAYER_OF[me]:
            bad.append(f"{dep} (layer {LAYER_OF[dep]}, not below {me}'s {LAYER_OF[me]})")
    assert not bad, f"conceptlab.{me or '__init__'} imports upward or sideways: {bad}"


def test_the_check_catches_an_upward_import(tmp_path):
    root = tmp_path / "conceptlab"
    root.mkdir()
    bad = root / "masks.py"
    bad.write_text((PKG / "masks.py").read_text() + "\nfrom .em import learn_concepts\n")
    globals()["PKG"] = root
    try:
        deps = imported_modules(bad)
    finally:
        globals()["PKG"] = Path(__file__).resolve().parents[1] / "conceptlab"
    assert "em" in deps and LAYER_OF["em"] > LAYER_OF["masks"]


def test_long_modules_say_why():
    """A module over about 400 lines states in its docstring why it is one module."""
    silent = []
    for f in PKG.rglob("*.py"):
        text = f.read_text()
        if len(text.splitlines()) > 420:
            doc = ast.get_docstring(ast.parse(text)) or ""
            if "Why one module" not in doc:
                silent.append(f"{f.relative_to(PKG.parent)} ({len(text.splitlines())} lines)")
    assert not silent, f"long modules without a reason in their docstring: {silent}"


def test_no_function_is_over_60_lines():
    """Every function of the package reads in one screen: at most 60 lines of code (its
    docstring not counted). ruff's C901 (pyproject.toml) bounds the branches."""
    long = []
    for f in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = node.body[0]
                doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str)
                start = (node.body[1] if doc and len(node.body) > 1 else first).lineno
                if node.end_lineno - start + 1 > 60:
                    long.append(f"{f.relative_to(PKG.parent)}:{node.name}")
    assert not long, f"functions over 60 lines of code: {long}"
