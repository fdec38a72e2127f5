"""Build the course as a static site, for reading without a kernel (``make site``).

    python docs/build_site.py [--out site]

Every numbered notebook becomes one HTML page WITH its committed outputs (figures included;
nothing is executed). Solution cells (tagged ``solution``, collapsed in JupyterLab) become
``<details>`` blocks: hidden until the reader clicks "Solution", code and output together.
``index.html`` lists the lessons with their measured runtimes; the cheat sheet is converted
too. Links between notebooks (``NN_name.ipynb``) point at the pages.
"""

from __future__ import annotations

import argparse
import base64
import copy
import html
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
RUNTIMES = ROOT / "benchmarks" / "results" / "notebook_runtimes.json"


def lessons() -> list[Path]:
    found = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if not found:
        raise SystemExit(f"no notebooks found in {NOTEBOOKS}")
    return found


def title_of(nb: dict) -> str:
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            for line in "".join(cell["source"]).splitlines():
                if line.startswith("# "):
                    return line[2:].strip().replace("*", "")
    return "untitled"


def _text(x) -> str:
    return "".join(x) if isinstance(x, list) else str(x)


def output_html(out: dict) -> str:
    """One output of a code cell as HTML (the kinds the course's notebooks produce)."""
    kind = out["output_type"]
    if kind == "stream":
        return f"<pre>{html.escape(_text(out['text']))}</pre>"
    if kind == "error":
        return f"<pre class='error'>{html.escape(out['ename'] + ': ' + out['evalue'])}</pre>"
    data = out.get("data", {})
    if "image/png" in data:
        png = _text(data["image/png"]).replace("\n", "")
        base64.b64decode(png, validate=True)  # a broken figure fails the build, not the page
        return f"<img src='data:image/png;base64,{png}'>"
    if "text/html" in data:
        return _text(data["text/html"])
    if "text/plain" in data:
        return f"<pre>{html.escape(_text(data['text/plain']))}</pre>"
    return ""


def solution_html(cell) -> str:
    """A solution code cell as <details>: hidden code and outputs, shown on a click."""
    source = _text(cell["source"])
    first = source.strip().splitlines()[0] if source.strip() else ""
    label = first.lstrip("# ").strip() if first.startswith("#") else "Solution"
    body = f"<pre><code>{html.escape(source)}</code></pre>"
    body += "".join(output_html(o) for o in cell.get("outputs", []))
    return (f"<details class='solution'><summary>{html.escape(label)} (click to show)</summary>"
            f"{body}</details>")


# nbconvert escapes <details> in raw and markdown cells, so a solution is a placeholder in
# the notebook and its HTML goes into the finished page.
PLACEHOLDER = "CONCEPTLAB-SOLUTION-{}"


def for_the_site(nb):
    """The notebook with solutions as placeholders, and their HTML (placeholder -> html)."""
    import nbformat

    nb = copy.deepcopy(nb)
    cells, solutions = [], {}
    for cell in nb["cells"]:
        tags = cell.get("metadata", {}).get("tags", [])
        if cell["cell_type"] == "code" and "solution" in tags:
            key = PLACEHOLDER.format(len(solutions))
            solutions[key] = solution_html(cell)
            cells.append(nbformat.v4.new_markdown_cell(key))
            continue
        if cell["cell_type"] == "markdown":
            src = _text(cell["source"])
            cell["source"] = re.sub(r"\b(\d\d_[A-Za-z0-9_]+)\.ipynb\b", r"\1.html", src)
        cells.append(cell)
    nb["cells"] = cells
    return nb, solutions


STYLE = """<style>
details.solution { border: 1px solid #c8c8c8; border-radius: 4px; padding: 0.4em 0.8em;
                   margin: 0.6em 0 0.6em 6em; background: #fafafa; }
details.solution summary { cursor: pointer; font-weight: 600; color: #1a5fb4; }
details.solution pre { background: #f0f0f0; padding: 0.5em; overflow-x: auto; }
</style>"""


def page(exporter, nb) -> str:
    site_nb, solutions = for_the_site(nb)
    body, _ = exporter.from_notebook_node(site_nb)
    if "</head>" not in body:
        raise RuntimeError("nbconvert's page has no </head>: cannot add the site's style")
    for key, block in solutions.items():
        # the markdown cell renders the key as <p>KEY</p>
        hit = re.search(rf"<p>\s*{key}\s*</p>", body)
        if hit is None:
            raise RuntimeError(f"solution placeholder {key} not found in nbconvert's page")
        body = body[:hit.start()] + block + body[hit.end():]
    return body.replace("</head>", STYLE + "\n</head>", 1)


def index_page(rows: list[tuple[str, str, str]], cheatsheet: bool) -> str:
    items = "\n".join(f"<tr><td><a href='{href}'>{html.escape(title)}</a></td><td>{rt}</td></tr>"
                      for href, title, rt in rows)
    extra = "<p><a href='cheatsheet.html'>Cheat sheet: the equations and hyper-parameters, " \
            "with their scales</a></p>" if cheatsheet else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>conceptlab: the course</title>
<style>body {{ font-family: sans-serif; max-width: 52em; margin: 2em auto; line-height: 1.5; }}
td {{ padding: 0.3em 1em 0.3em 0; }}</style></head>
<body><h1>conceptlab: multi-concept personalisation of text-to-image diffusion</h1>
<p>The course's notebooks as executed on the bundled model, for reading without a kernel.
Solutions are collapsed: click "Solution" under an exercise. To run the code, open the
notebooks in JupyterLab (README).</p>
<table><tr><th align="left">lesson</th><th align="left">runtime (2-core CPU, measured)</th></tr>
{items}
</table>
{extra}
</body></html>
"""


def build(out: Path) -> list[Path]:
    import nbformat
    from nbconvert import HTMLExporter
    from nbconvert.filters.markdown import markdown2html

    out.mkdir(parents=True, exist_ok=True)
    exporter = HTMLExporter(template_name="lab")
    runtimes = json.loads(RUNTIMES.read_text())["seconds"] if RUNTIMES.exists() else {}
    written, rows = [], []
    for path in lessons():
        nb = nbformat.reads(path.read_text(), as_version=4)
        if not any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"):
            raise SystemExit(f"{path.name} has no outputs: execute it first "
                             "(python benchmarks/notebook_runtimes.py)")
        target = out / (path.stem + ".html")
        target.write_text(page(exporter, nb))
        written.append(target)
        secs = runtimes.get(path.stem)
        rows.append((target.name, title_of(nb), f"about {secs:.0f} s" if secs else ""))
    cheat = ROOT / "docs" / "cheatsheet.md"
    if cheat.exists():
        (out / "cheatsheet.html").write_text(
            "<!doctype html><html><head><meta charset='utf-8'><title>cheat sheet</title></head>"
            f"<body style='font-family: sans-serif; max-width: 52em; margin: 2em auto'>"
            f"{markdown2html(cheat.read_text())}</body></html>")
        written.append(out / "cheatsheet.html")
    (out / "index.html").write_text(index_page(rows, cheat.exists()))
    written.append(out / "index.html")
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "site", help="output folder (default: site/)")
    args = ap.parse_args(argv)
    for p in build(args.out):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
