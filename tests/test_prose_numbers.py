"""A lesson's prose quotes only numbers that a cell next to it prints.

Every decimal number (``0.62``, ``-1.5``) and percentage (``95%``) in a markdown cell of a
numbered notebook must appear in the text output or the code of a code cell within
``WINDOW`` cells of it, at the precision the prose gives (prose ``0.9`` is matched by a
printed ``0.90`` or ``0.904``; prose ``0.62`` is not matched by ``0.63``). Numbers inside
LaTeX (``$...$``) and inline code are left out: they are formulas and settings, not
measurements; so are arXiv numbers, model names ("Stable Diffusion 1.5, 2.1") and the
"**Runtime**" line, which
``python -m benchmarks notebook_runtimes`` writes from its own measurement. A number in a lesson that no nearby output prints fails the test with the
cell, the number and the sentence.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
WINDOW = 6          # cells on each side whose code and outputs count as "next to" the prose

NUMBER = re.compile(r"(?<![\w.\[])(-?\d+\.\d+|\d+(?:\.\d+)?%)(?![\w\]]|\.\d)")
HIDDEN = re.compile(r"\$\$.*?\$\$|\$[^$\n]+\$|`[^`\n]*`|```.*?```|<[^>\n]+>|\]\([^)\n]*\)"
                    r"|arXiv:\S+|\*\*Runtime\*\*[^\n]*"
                    r"|(?:Stable Diffusion|SD) \d\.\d(?:(?:,| and| or|/) ?\d\.\d)*", re.DOTALL)
ANY_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e-?\d+)?%?")


def prose_numbers(markdown: str) -> list[tuple[str, str]]:
    """(number, its sentence) for every decimal or percentage the prose states."""
    text = HIDDEN.sub(" ", markdown)
    out = []
    for m in NUMBER.finditer(text):
        start = max(text.rfind(".", 0, m.start() - 1), text.rfind("\n", 0, m.start()), 0)
        out.append((m.group(1), text[start:m.end() + 40].strip().replace("\n", " ")))
    return out


def value_and_decimals(number: str) -> tuple[float, int]:
    """The number as a fraction (95% -> 0.95) and how many decimals the prose gives."""
    pct = number.endswith("%")
    body = number.rstrip("%")
    decimals = len(body.split(".")[1]) if "." in body else 0
    return (float(body) / 100, decimals + 2) if pct else (float(body), decimals)


def printed_values(text: str) -> set[float]:
    """Every number in a cell's code or output (percentages also as fractions)."""
    vals = set()
    for tok in ANY_NUMBER.findall(text):
        try:
            v = float(tok.rstrip("%"))
        except ValueError:
            continue
        vals.add(v)
        if tok.endswith("%"):
            vals.add(v / 100)
    return vals


def is_printed(number: str, values: set[float]) -> bool:
    v, d = value_and_decimals(number)
    return any(round(x, d) == round(v, d) or abs(x - v) < 0.5 * 10 ** -d for x in values)


def cell_text(cell) -> str:
    if cell["cell_type"] != "code":
        return ""
    parts = ["".join(cell["source"])]
    for out in cell.get("outputs", []):
        if "text" in out:
            parts.append("".join(out["text"]))
        for key in ("text/plain", "text/markdown", "text/html"):
            if key in out.get("data", {}):
                parts.append("".join(out["data"][key]))
    return "\n".join(parts)


def unprinted(path: Path) -> list[str]:
    cells = json.loads(path.read_text())["cells"]
    texts = [cell_text(c) for c in cells]
    problems = []
    for i, cell in enumerate(cells):
        if cell["cell_type"] != "markdown":
            continue
        near = printed_values("\n".join(texts[max(0, i - WINDOW):i + WINDOW + 1]))
        for number, sentence in prose_numbers("".join(cell["source"])):
            if not is_printed(number, near):
                problems.append(f"cell {i}: {number!r} in \"...{sentence}...\"")
    return problems


def test_the_checker_finds_an_unprinted_number_and_accepts_a_printed_one():
    md = {"cell_type": "markdown", "source": ["The star's IoU rose to 0.62 ($p = 0.5$), 95% of it."]}
    printed = {"cell_type": "code", "source": ["print(iou)"],
               "outputs": [{"name": "stdout", "output_type": "stream", "text": ["0.6231 0.95\n"]}]}
    other = {"cell_type": "code", "source": ["print(iou)"],
             "outputs": [{"name": "stdout", "output_type": "stream", "text": ["0.63 0.95\n"]}]}
    assert [n for n, _ in prose_numbers(md["source"][0])] == ["0.62", "95%"]
    values = printed_values(cell_text(printed))
    assert is_printed("0.62", values) and is_printed("95%", values)
    assert not is_printed("0.62", printed_values(cell_text(other)))
    assert not is_printed("0.7", values)
    assert [n for n, _ in prose_numbers("Stable Diffusion 1.5, 2.1 and SD 1.5 run in 0.5 s.")] \
        == ["0.5"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_number_in_a_lesson_is_printed_next_to_it(path):
    problems = unprinted(path)
    assert not problems, (f"{path.name}: numbers in the prose that no code cell within "
                          f"{WINDOW} cells prints:\n  " + "\n  ".join(problems))
