"""Execute every notebook, time it, and put the measured runtimes where the course states them.

    python -m benchmarks notebook_runtimes             # execute in place, time, update
    python -m benchmarks notebook_runtimes --dry-run   # execute copies, print the table only

Each notebook runs top to bottom in a fresh kernel (nbclient), with the environment the
tests use (offline, quiet, 2 torch threads). Run it on an IDLE machine: two heavy jobs on
2 cores halve each other. It writes ``benchmarks/results/notebook_runtimes/runtimes.json``
(a partial run keeps the other notebooks' times) and, unless ``--dry-run``:

- saves each executed notebook in place (its outputs are the ones nbval then checks);
- rewrites the "**Runtime**: about ..." of each notebook's header (the jupytext ``.py``
  source, then ``jupytext --sync`` so the ``.ipynb`` agrees);
- rewrites the last column of the README's course table and of notebook 00's.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
RESULT_NAME = "runtimes"
QUICK = {"dry_run": True, "notebooks": ["00_the_shapes_world"]}
ITEM_OPTIONS = ("notebooks", "dry_run")   # a partial run keeps the others' times
ENV = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error", "TQDM_DISABLE": "1",
       "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
       "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
_SP = r"(?:[ ]|\n#[ ])+"          # a space, or a line break inside a markdown comment block
RUNTIME_RE = re.compile(rf"\*\*Runtime\*\*:{_SP}about{_SP}(?:[^*\n]|\n#)+?{_SP}on{_SP}a{_SP}"
                        rf"2-core{_SP}CPU(?:{_SP}\(measured,{_SP}idle\))?")


def spoken(seconds: float) -> str:
    """40 -> 'about 40 s', 150 -> 'about 2.5 minutes' (to the nearest half minute)."""
    if seconds < 90:
        return f"{int(round(seconds / 5.0) * 5)} s"
    m = round(seconds / 30.0) / 2
    return f"{m:g} minutes"


def execute(path: Path, inplace: bool, timeout: int = 1200) -> float:
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    t0 = time.time()
    client.execute()
    seconds = time.time() - t0
    if inplace:
        nbformat.write(nb, path)
    return seconds


def update_header(py: Path, seconds: float) -> bool:
    text = py.read_text()
    new, n = RUNTIME_RE.subn(f"**Runtime**: about {spoken(seconds)} on a 2-core CPU "
                             "(measured, idle)", text, count=1)
    if n:
        py.write_text(new)
    return bool(n)


def update_readme(times: dict) -> None:
    readme = ROOT / "README.md"
    lines = readme.read_text().splitlines(keepends=True)
    for i, line in enumerate(lines):
        for stem, seconds in times.items():
            if f"(notebooks/{stem}.ipynb)" in line and line.startswith("|"):
                cells = line.rstrip("\n").split("|")
                cells[-2] = f" {seconds:.0f} s "
                lines[i] = "|".join(cells) + "\n"
    readme.write_text("".join(lines))


def update_course_table(py: Path, times: dict) -> None:
    """Notebook 00's own course table: rows '# | NN name | idea | 36 s |'."""
    lines = py.read_text().splitlines(keepends=True)
    for i, line in enumerate(lines):
        m = re.match(r"# \| (\d\d) ", line)
        stem = next((k for k in times if m and k.startswith(m.group(1) + "_")), None)
        if stem:
            cells = line.rstrip("\n").split("|")
            cells[-2] = f" {times[stem]:.0f} s "
            lines[i] = "|".join(cells) + "\n"
    py.write_text("".join(lines))


def add_arguments(ap):
    ap.add_argument("--dry-run", action="store_true",
                    help="execute copies; change nothing but the results file")
    ap.add_argument("notebooks", nargs="*", help="stems (default: every notebooks/NN_*.ipynb)")


def run(args, ctx):
    os.environ.update(ENV)
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if args.notebooks:
        paths = [p for p in paths if p.stem in args.notebooks or p.name in args.notebooks]
    ctx.set_model(name="shapes-ldm (the notebooks' model)")
    times = {}
    for p in paths:
        if not args.dry_run:   # the paired source wins if it is newer (jupytext --sync)
            subprocess.run([sys.executable, "-m", "jupytext", "--sync", str(p)], check=True,
                           capture_output=True)
        seconds = execute(p, inplace=not args.dry_run)
        times[p.stem] = round(seconds, 1)
        print(f"{p.stem:<36} {seconds:6.0f} s", flush=True)
        if not args.dry_run:
            subprocess.run([sys.executable, "-m", "jupytext", "--sync", str(p)], check=True,
                           capture_output=True)
            if update_header(p.with_suffix(".py"), seconds):
                subprocess.run([sys.executable, "-m", "jupytext", "--sync", str(p)],
                               check=True, capture_output=True)
    old = {k: v for k, v in (ctx.previous() or {}).items() if k != "provenance"}
    old.update({"seconds": {**old.get("seconds", {}), **times},
                "machine": f"{platform.processor() or platform.machine()}, "
                           f"{os.cpu_count()} CPUs, torch threads {ENV['OMP_NUM_THREADS']}"})
    if not args.dry_run:
        update_readme(times)
        first = NOTEBOOKS / "00_the_shapes_world.py"
        if first.exists():
            update_course_table(first, times)
            subprocess.run([sys.executable, "-m", "jupytext", "--sync",
                            str(first.with_suffix(".ipynb"))], check=True, capture_output=True)
    print(f"total {sum(times.values()):.0f} s")
    return old
