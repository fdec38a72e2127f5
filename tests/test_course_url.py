"""The course's URL lives in one place (pyproject.toml's ``[project.urls] Homepage``); every
notebook's install cell and Colab badge, and the README's badges, use it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def course_url() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Homepage"]


def colab_prefix(url: str) -> str:
    owner_repo = re.fullmatch(r"https://github\.com/([^/]+/[^/]+?)(?:\.git)?/?", url)
    assert owner_repo, f"the course URL {url!r} is not a GitHub repository URL"
    return f"https://colab.research.google.com/github/{owner_repo.group(1)}/blob/main/notebooks/"


INSTALL_CELL = '''# NBVAL_SKIP
# On Colab, or a machine without the course: install it and move into its notebooks/ folder.
import importlib.util, os, subprocess, sys
COURSE = "{url}"  # the course's one URL: pyproject.toml
if importlib.util.find_spec("conceptlab") is None:
    subprocess.check_call(["git", "clone", "-q", "--depth", "1", COURSE, "conceptlab-course"])
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "./conceptlab-course"])
    os.chdir("conceptlab-course/notebooks")'''


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_each_lesson_installs_from_the_course_url_and_has_its_colab_badge(path):
    cells = json.loads(path.read_text())["cells"]
    code = ["".join(c["source"]).strip() for c in cells if c["cell_type"] == "code"]
    assert code[0] == INSTALL_CELL.format(url=course_url()), \
        f"{path.name}: the first code cell is not the course's install cell"
    title = "".join(cells[0]["source"])
    assert colab_prefix(course_url()) + path.name in title, \
        f"{path.name}: the first markdown cell has no Colab badge for this notebook"


def test_the_readme_links_the_lessons_on_colab():
    readme = (ROOT / "README.md").read_text()
    prefix = colab_prefix(course_url())
    for path in NOTEBOOKS:
        assert prefix + path.name in readme, f"README: no Colab link for {path.name}"
    assert "<the course" not in readme and 'COURSE = ""' not in readme
