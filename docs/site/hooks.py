"""MkDocs hooks for the course site (docs/site/mkdocs.yml; ``make site``).

The site mirrors the repository: README.md becomes index.md, ``notebooks/NN_*.ipynb`` and
``docs/*.md`` keep their paths, and the images those pages show are copied at their paths
too, so every relative link the repository uses works on the site. These hooks

- add those files to the build (``on_files``) and refuse a lesson without outputs: the
  site shows the committed outputs and never executes a notebook;
- build the navigation (``on_config``): home, the lessons, every ``docs/*.md`` present at
  build time, and one API page per public module of ``conceptlab`` (generated: ``::: module``
  for mkdocstrings);
- point links to repository files that are not on the site (LICENSE, *.py, folders) at
  GitHub (``on_page_markdown`` for Markdown pages, ``on_page_content`` for notebooks);
- collapse solution cells (tag ``solution``, code or Markdown) into
  ``<details class="solution">`` blocks, closed until the reader clicks (``on_page_content``).
"""

from __future__ import annotations

import html
import json
import logging
import posixpath
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.conceptlab")

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
DOCS = ROOT / "docs"
PACKAGE = "conceptlab"
GITHUB = ""  # mkdocs.yml's repo_url (on_config): pyproject.toml's [project.urls] Homepage
# the reference pages first, in this order; any other docs/*.md follows, alphabetically
DOCS_FIRST = ["cheatsheet.md", "results.md", "gpu.md", "inputs-and-errors.md", "architecture.md"]
IMAGE = re.compile(r"\.(png|jpe?g|gif|svg|webp)$", re.IGNORECASE)
# a relative link target in Markdown ](target) or HTML src="target" / href="target"
MD_LINK = re.compile(r"(\]\()([^)\s]+)(\))")
HTML_LINK = re.compile(r"""((?:src|href)=["'])([^"']+)(["'])""")


def lessons() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def doc_pages() -> list[Path]:
    found = {p.name: p for p in DOCS.glob("*.md")}
    first = [found.pop(n) for n in DOCS_FIRST if n in found]
    return first + [found[n] for n in sorted(found)]


def api_modules() -> list[str]:
    """The public modules of the package (no ``_private`` part, no ``__main__``)."""
    names = []
    for f in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not any(p.startswith("_") for p in parts):
            names.append(".".join(parts))
    return names


def check_outputs(paths) -> None:
    """Refuse a notebook whose code cells have no outputs: the site never executes one."""
    for path in paths:
        nb = json.loads(Path(path).read_text(encoding="utf-8"))
        if not any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"):
            raise PluginError(f"{Path(path).name} has no outputs: execute it first "
                              "(python -m benchmarks notebook_runtimes), then build the site")


# --- the files and the navigation ------------------------------------------------------------

def _site_path(repo_path: str) -> str:
    """Where a repository file lives on the site (its own path; README.md is the home page)."""
    return "index.md" if repo_path == "README.md" else repo_path


def _repo_path(site_path: str) -> str:
    return "README.md" if site_path == "index.md" else site_path


def _sources() -> dict[str, Path]:
    """site path -> file, for every page the hooks add (not the generated API pages)."""
    out = {"index.md": ROOT / "README.md"}
    out.update({f"notebooks/{p.name}": p for p in lessons()})
    out.update({f"docs/{p.name}": p for p in doc_pages()})
    return out


def _resolve(base: str, target: str) -> str | None:
    """The repository path a relative link in ``base`` (a repository path) points to."""
    if re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", target, re.IGNORECASE):
        return None  # absolute URL, anchor, mailto:, data:
    path = target.split("#", 1)[0].split("?", 1)[0]
    if not path:
        return None
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(base), path))
    return None if joined.startswith("..") else joined


def _images(repo_path: str, text: str) -> set[str]:
    """The repository images a page shows (copied to the site at the same path)."""
    found = set()
    for rx in (MD_LINK, HTML_LINK):
        for m in rx.finditer(text):
            p = _resolve(repo_path, m.group(2))
            if p and IMAGE.search(p) and (ROOT / p).is_file():
                found.add(p)
    return found


def _nb_markdown(path: Path) -> str:
    nb = json.loads(path.read_text(encoding="utf-8"))
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")


def _api_nav() -> list:
    """The API pages: the package's modules, then one section per subpackage."""
    modules = api_modules()
    packages = sorted({m.rsplit(".", 1)[0] for m in modules if m.count(".") > 1})
    nav = [{"Overview": "api/index.md"}]
    nav += [{m: f"api/{m}.md"} for m in modules if m.count(".") < 1 or
            (m.count(".") == 1 and m not in packages)]
    for pkg in packages:
        nav.append({pkg: [{m: f"api/{m}.md"} for m in modules if m == pkg
                          or m.startswith(pkg + ".")]})
    return nav


def on_config(config):
    global GITHUB
    GITHUB = config.repo_url.rstrip("/")
    api = _api_nav()
    config["nav"] = [
        {"Home": "index.md"},
        {"Lessons": [f"notebooks/{p.name}" for p in lessons()]},
        {"Reference": [f"docs/{p.name}" for p in doc_pages()]},
        {"API reference": api},
    ]
    return config


@event_priority(50)  # before mkdocs-jupyter's on_files, which turns .ipynb files into pages
def on_files(files, config):
    if not lessons():
        raise PluginError(f"no notebooks found in {NOTEBOOKS}")
    check_outputs(lessons())
    images = set()
    for site_path, source in _sources().items():
        if site_path == _repo_path(site_path):  # a file at its own path: src_dir is the repo
            files.append(File(site_path, str(ROOT), config.site_dir, config.use_directory_urls))
        else:  # README.md as index.md
            files.append(File.generated(config, site_path, abs_src_path=str(source)))
        text = _nb_markdown(source) if source.suffix == ".ipynb" else source.read_text("utf-8")
        images |= _images(_repo_path(site_path), text)
    for p in sorted(images):
        files.append(File(p, str(ROOT), config.site_dir, config.use_directory_urls))
    for m in api_modules():
        # the package page shows its docstring only: its names are documented where defined
        opts = "\n    options:\n      members: false" if m == PACKAGE else ""
        files.append(File.generated(config, f"api/{m}.md", content=f"::: {m}{opts}\n"))
    return files


# --- links -----------------------------------------------------------------------------------

def _on_site(repo_path: str, files) -> bool:
    return files.get_file_from_path(_site_path(repo_path)) is not None


def _github(repo_path: str, target: str) -> str:
    anchor = "#" + target.split("#", 1)[1] if "#" in target else ""
    kind = "tree" if (ROOT / repo_path).is_dir() else "blob"
    return f"{GITHUB}/{kind}/main/{repo_path}{anchor}"


def _relink(page_repo_path: str, target: str, files, *, html_page: bool) -> str:
    """A link target as the site needs it (unchanged when it already works)."""
    p = _resolve(page_repo_path, target)
    if p is None:
        return target
    if _on_site(p, files):
        if not html_page:
            if p == "README.md":  # README.md is index.md on the site
                return target.replace("README.md", posixpath.relpath(
                    "index.md", posixpath.dirname(page_repo_path) or "."), 1)
            return target  # mkdocs turns .md/.ipynb links into .html itself
        # nbconvert's HTML: the link goes to the page (.ipynb/.md -> .html)
        rel = posixpath.relpath(_site_path(p), posixpath.dirname(page_repo_path) or ".")
        rel = re.sub(r"\.(ipynb|md)$", ".html", rel)
        return rel + ("#" + target.split("#", 1)[1] if "#" in target else "")
    if (ROOT / p).exists():
        return _github(p, target)
    return target  # a broken link: mkdocs reports it


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri == "api/index.md":
        items = "\n".join(f"- [`{m}`]({m}.md)" for m in api_modules())
        return markdown.rstrip() + "\n\n" + items + "\n"
    if page.file.src_uri.startswith("api/"):
        return markdown
    repo_path = _repo_path(page.file.src_uri)
    return MD_LINK.sub(lambda m: m.group(1) + _relink(repo_path, m.group(2), files,
                                                       html_page=False) + m.group(3), markdown)


# --- solutions -------------------------------------------------------------------------------

SOLUTION_DIV = re.compile(r"""<div\b[^>]*\bclass="[^"]*\bcelltag_solution\b[^"]*"[^>]*>""")
DIV_TAG = re.compile(r"<div\b|</div\s*>")


def _div_end(text: str, start: int) -> int:
    """The index just after the </div> that closes the <div> opening at ``start``."""
    depth = 0
    for m in DIV_TAG.finditer(text, start):
        depth += 1 if m.group(0).startswith("<div") else -1
        if depth == 0:
            return m.end()
    raise PluginError("unbalanced <div> in a notebook page: cannot collapse a solution")


def _label(block: str) -> str:
    """'Solution 2' when the cell's first words name its exercise, else 'Solution'.

    Only the number: a solution's first line often states its answer (``# Solution 2: ...``).
    """
    text = html.unescape(re.sub(r"<[^>]+>", "", block[:3000]))
    m = re.search(r"\bSolution\s+(\d+)", text)  # capital S: not the tag shown as "solution"
    return f"Solution {m.group(1)}" if m else "Solution"


def collapse_solutions(content: str) -> str:
    """Every element with the cell tag ``solution`` inside a closed <details> block.

    nbconvert writes a cell's tags as classes (``celltag_solution``): on the cell's <div>
    for a code cell (code and outputs), on the rendered Markdown's <div> for a Markdown cell.
    """
    out, pos = [], 0
    while (m := SOLUTION_DIV.search(content, pos)) is not None:
        end = _div_end(content, m.start())
        block = content[m.start():end]
        out.append(content[pos:m.start()])
        out.append(f'<details class="solution"><summary>{html.escape(_label(block))} '
                   f"(click to show)</summary>\n{block}\n</details>")
        pos = end
    out.append(content[pos:])
    return "".join(out)


def on_page_content(content, page, config, files):
    if not page.file.src_uri.endswith(".ipynb"):
        return content
    content = collapse_solutions(content)
    repo_path = _repo_path(page.file.src_uri)

    def relink(m: re.Match) -> str:
        target = html.unescape(m.group(2))
        new = _relink(repo_path, target, files, html_page=True)
        return m.group(0) if new == target else m.group(1) + html.escape(new) + m.group(3)

    return HTML_LINK.sub(relink, content)
