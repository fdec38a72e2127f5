"""The README is a short entry point; the pages a learner reads link only to files that
exist and tell no development history; the licence is there."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MODEL_CARD = ROOT / "data" / "models" / "shapes-ldm" / "README.md"
LINKED = [README, *sorted((ROOT / "docs").glob("*.md"))]
LEARNER_PAGES = [*LINKED, MODEL_CARD, ROOT / "CONTRIBUTING.md"]
# words of a diary, not of a course: what shipped is described in the present tense, and
# history goes to CHANGELOG.md
HISTORY = ("previous checkpoint", "previous bundled model", "earlier checkpoint", "model v1",
           "model v2", "judge v1", "judge v2", "work round", "session", "kept for the record",
           "beside another job", "5250-step checkpoint", "the issue's goal", "(#")

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def rel(p: Path) -> str:
    return p.relative_to(ROOT).as_posix()


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= 160, f"README.md has {n} lines; move detail to docs/"


def test_readme_has_the_entry_points():
    text = README.read_text()
    for needed in ("docs/figures/hero.png", "make demo", "make test", "docs/results.md",
                   "docs/inputs-and-errors.md", "docs/gpu.md", "docs/architecture.md",
                   "CONTRIBUTING.md", "LICENSE", "https://github.com/conceptlab/conceptlab",
                   "colab.research.google.com"):
        assert needed in text, needed
    for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        assert f"(notebooks/{nb.name})" in text, f"the course table lacks {nb.name}"


@pytest.mark.parametrize("page", LINKED, ids=rel)
def test_relative_links_point_at_files(page):
    missing = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue   # a URL or an anchor on the page
        path = target.split("#")[0]
        if path and not (page.parent / path).exists():
            missing.append(target)
    assert not missing, f"{rel(page)} links to missing files: {missing}"


@pytest.mark.parametrize("page", LEARNER_PAGES, ids=rel)
def test_no_development_history(page):
    text = page.read_text().lower()
    found = [w for w in HISTORY if w in text]
    assert not found, f"{rel(page)} tells history ({found}): describe what ships; CHANGELOG.md"


def test_licence():
    text = (ROOT / "LICENSE").read_text()
    assert "MIT License" in text and "the conceptlab authors" in text
    assert "MIT" in MODEL_CARD.read_text()


def test_hero_figure_is_small():
    hero = ROOT / "docs" / "figures" / "hero.png"
    assert hero.exists() and hero.stat().st_size < 200_000
