"""The course outside a clone: the install cell every notebook opens with, the MODEL switch,
and the static site (``make site``: mkdocs with docs/site/mkdocs.yml and docs/site/hooks.py).
"""

from __future__ import annotations

import ast
import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SITE_CONFIG = ROOT / "docs" / "site" / "mkdocs.yml"


def _install_cell(nb):
    cells = [c for c in nb.cells if c.cell_type == "code" and "COURSE = " in c.source]
    assert len(cells) == 1, "expected one install cell"
    return cells[0]


def _course_url() -> str:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["project"]["urls"]["Homepage"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_notebook_opens_with_a_skipped_install_cell_and_a_model_switch(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    cell = _install_cell(nb)
    assert cell is code[0], "the install cell must come before anything imports conceptlab"
    assert cell.source.startswith("# NBVAL_SKIP"), "nbval must not run pip"
    assert not cell.outputs, "the committed install cell must have no output"
    assert re.search(r'MODEL = os\.environ\.get\("CONCEPTLAB_MODEL", "shapes-ldm"\)',
                     "\n".join(c.source for c in code)), "MODEL must default to the bundled model"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_install_cell_does_nothing_here_and_installs_the_course_where_conceptlab_is_missing(
        path, monkeypatch, tmp_path):
    source = _install_cell(nbformat.read(path, as_version=4)).source
    calls = []
    monkeypatch.setattr(subprocess, "check_call", lambda cmd: calls.append(cmd))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os, "chdir", lambda d: calls.append(["chdir", d]))
    exec(compile(source, "install-cell", "exec"), {})  # noqa: S102 (the notebook's own cell)
    assert calls == []  # conceptlab is importable here

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "conceptlab" else real_find_spec(name, *a))
    exec(compile(source, "install-cell", "exec"), {})  # noqa: S102
    url = _course_url()  # the course's one URL: pyproject.toml's [project.urls]
    assert calls == [["git", "clone", "-q", "--depth", "1", url, "conceptlab-course"],
                     [sys.executable, "-m", "pip", "install", "-q", "./conceptlab-course"],
                     ["chdir", "conceptlab-course/notebooks"]]


# --- the static site --------------------------------------------------------------------------

def _hooks():
    pytest.importorskip("mkdocs")
    spec = importlib.util.spec_from_file_location("site_hooks", SITE_CONFIG.parent / "hooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _text(page: str) -> str:
    """A page's visible text, one space between words (a tag is no space: ``<code>x</code>,``)."""
    page = re.sub(r"<(script|style)\b.*?</\1>", " ", page, flags=re.DOTALL)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", page)).split())


def _without_solutions(page: str) -> str:
    return re.sub(r'<details class="solution">.*?</details>', "", page, flags=re.DOTALL)


def test_static_site_has_every_lesson_collapsed_solutions_and_the_api_reference(tmp_path):
    """One build (about 15 s of CPU), every check on it; one test so that xdist builds once."""
    pytest.importorskip("mkdocs_jupyter")
    pytest.importorskip("mkdocstrings_handlers.python")
    site = tmp_path / "site"
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "-q", "-f", str(SITE_CONFIG),
                          "-d", str(site)], check=False, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr

    assert f"\nrepo_url: {_course_url()}\n" in SITE_CONFIG.read_text(encoding="utf-8")
    index = (site / "index.html").read_text(encoding="utf-8")  # README.md
    rows = re.findall(r"<tr>.*?</tr>", index, flags=re.DOTALL)
    for path in NOTEBOOKS:
        # the README's course table: each lesson's page and its measured runtime
        row = [r for r in rows if f'href="notebooks/{path.stem}.html"' in r]
        assert row and re.search(r"<td>[^<]*\b\d+ s\b", row[0]), path.stem
        nb = nbformat.read(path, as_version=4)
        page = (site / "notebooks" / f"{path.stem}.html").read_text(encoding="utf-8")
        # the committed outputs, figures included (nothing is executed)
        n_figures = sum("image/png" in o.get("data", {}) for c in nb.cells
                        if c.cell_type == "code" for o in c.outputs)
        assert n_figures > 0 and page.count('src="data:image/png;base64,') >= n_figures, path.stem
        # every solution cell (code or Markdown) inside a closed <details> block
        n_solutions = sum("solution" in c.metadata.get("tags", []) for c in nb.cells)
        assert n_solutions > 0, path.stem
        assert page.count('<details class="solution">') == n_solutions, path.stem
        assert "celltag_solution" in page and "celltag_solution" not in _without_solutions(page)
        assert '<details class="solution" open' not in page
        if any("$" in c.source for c in nb.cells if c.cell_type == "markdown"):
            assert re.search(r'<script src="https://[^"]*/MathJax\.js', page), path.stem
        # links between lessons go to their pages
        assert not re.search(r'href="\d\d_\w+\.ipynb', page), path.stem

    for doc in (ROOT / "docs").glob("*.md"):
        assert (site / "docs" / f"{doc.stem}.html").is_file(), doc.name

    # the API reference, from the docstrings: one page per public module
    for module in _hooks().api_modules():
        assert (site / "api" / f"{module}.html").is_file(), module
    tree = ast.parse((ROOT / "conceptlab" / "em.py").read_text(encoding="utf-8"))
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "learn_concepts")
    summary = ast.get_docstring(fn).split("\n\n")[0].replace("`", "")
    api = _text((site / "api" / "conceptlab.em.html").read_text(encoding="utf-8"))
    assert " ".join(summary.split()) in api
    assert ":func:`" not in api and ":class:`" not in api  # Sphinx roles became links or code


def test_site_refuses_notebooks_without_outputs(tmp_path):
    hooks = _hooks()
    nb = nbformat.read(NOTEBOOKS[0], as_version=4)
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs = []
    (tmp_path / "nb").mkdir()
    nbformat.write(nb, tmp_path / "nb" / NOTEBOOKS[0].name)
    hooks.NOTEBOOKS = tmp_path / "nb"
    with pytest.raises(Exception, match="no outputs: execute it first"):
        hooks.on_files([], None)  # the build's first step: the error stops it


def test_solutions_collapse_whole_cells_with_nested_divs():
    hooks = _hooks()
    cell = ('<div class="jp-Cell jp-CodeCell celltag_solution"><div class="in"><pre><span></span>'
            '<span class="c1"># Solution 2: the answer</span></pre></div><div class="out">'
            '<img src="x.png"></div></div>')
    page = f'<div class="jp-Cell">before</div>{cell}<div>after</div>'
    out = hooks.collapse_solutions(page)
    assert out == ('<div class="jp-Cell">before</div><details class="solution"><summary>'
                   f"Solution 2 (click to show)</summary>\n{cell}\n</details><div>after</div>")
