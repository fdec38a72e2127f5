"""The course outside a clone: the install cell every notebook opens with, the MODEL switch,
and the static site (``make site``, ``docs/build_site.py``)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _install_cell(nb):
    cells = [c for c in nb.cells if c.cell_type == "code" and "COURSE = " in c.source]
    assert len(cells) == 1, "expected one install cell"
    return cells[0]


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


def test_install_cell_does_nothing_here_and_explains_itself_where_conceptlab_is_missing(
        monkeypatch, tmp_path):
    import os

    source = _install_cell(nbformat.read(NOTEBOOKS[0], as_version=4)).source
    calls = []
    monkeypatch.setattr(subprocess, "check_call", lambda cmd: calls.append(cmd))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os, "chdir", lambda d: calls.append(["chdir", d]))
    exec(compile(source, "install-cell", "exec"), {})  # noqa: S102 (the notebook's own cell)
    assert calls == []  # conceptlab is importable here

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "conceptlab" else real_find_spec(name, *a))
    with pytest.raises(RuntimeError, match="set COURSE"):
        exec(compile(source, "install-cell", "exec"), {})  # noqa: S102
    url = "https://example.invalid/conceptlab.git"
    given = source.replace('COURSE = ""', f'COURSE = "{url}"')
    exec(compile(given, "install-cell", "exec"), {})  # noqa: S102
    assert calls == [["git", "clone", "--depth", "1", url, "conceptlab-course"],
                     [sys.executable, "-m", "pip", "install", "-q", "./conceptlab-course"],
                     ["chdir", os.path.join("conceptlab-course", "notebooks")]]


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_site", ROOT / "docs" / "build_site.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_static_site_has_every_lesson_with_figures_and_collapsed_solutions(tmp_path):
    pytest.importorskip("nbconvert")
    written = _load_builder().build(tmp_path / "site")
    names = {p.name for p in written}
    assert {p.stem + ".html" for p in NOTEBOOKS} | {"index.html"} <= names
    index = (tmp_path / "site" / "index.html").read_text()
    for path in NOTEBOOKS:
        assert f"href='{path.stem}.html'" in index
        nb = nbformat.read(path, as_version=4)
        page = (tmp_path / "site" / f"{path.stem}.html").read_text()
        n_solutions = sum("solution" in c.metadata.get("tags", []) for c in nb.cells)
        assert page.count("<details class='solution'>") == n_solutions, path.stem
        assert "CONCEPTLAB-SOLUTION" not in page
        n_figures = sum("image/png" in o.get("data", {}) for c in nb.cells
                        if c.cell_type == "code" for o in c.outputs)
        assert n_figures > 0 and page.count("data:image/png;base64,") >= n_figures, path.stem


def test_site_refuses_notebooks_without_outputs(tmp_path, monkeypatch):
    builder = _load_builder()
    nb = nbformat.read(NOTEBOOKS[0], as_version=4)
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs = []
    (tmp_path / "nb").mkdir()
    nbformat.write(nb, tmp_path / "nb" / NOTEBOOKS[0].name)
    monkeypatch.setattr(builder, "NOTEBOOKS", tmp_path / "nb")
    with pytest.raises(SystemExit, match="no outputs: execute it first"):
        builder.build(tmp_path / "site")
