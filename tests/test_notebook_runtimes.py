"""benchmarks/notebook_runtimes.py: the header pattern finds every notebook's runtime line,
and the README's course table has one runtime cell per notebook to rewrite."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("notebook_runtimes",
                                              ROOT / "benchmarks" / "notebook_runtimes.py")
N = importlib.util.module_from_spec(spec)
spec.loader.exec_module(N)


def test_every_notebook_states_a_runtime_the_script_can_rewrite():
    for py in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py")):
        assert N.RUNTIME_RE.search(py.read_text()), f"{py.name}: no '**Runtime**: about ...'"


def test_spoken_runtimes():
    assert N.spoken(36) == "35 s" and N.spoken(88) == "90 s"
    assert N.spoken(91) == "1.5 minutes" and N.spoken(162) == "2.5 minutes"
    assert N.spoken(215) == "3.5 minutes"


def test_readme_rows_are_rewritten(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text("| nb | what | time |\n|---|---|---|\n"
                      "| [00](notebooks/00_x.ipynb) | the world | 36 s |\n"
                      "| [01](notebooks/01_y.ipynb) | attention | 37 s |\n")
    monkeypatch.setattr(N, "ROOT", tmp_path)
    N.update_readme({"00_x": 41.2})
    lines = readme.read_text().splitlines()
    assert lines[2] == "| [00](notebooks/00_x.ipynb) | the world | 41 s |"
    assert lines[3].endswith("| 37 s |")


def test_notebook_00s_course_table_is_rewritten(tmp_path):
    py = tmp_path / "00_the_shapes_world.py"
    py.write_text("# | notebook | idea | time |\n# | 00 the world | data | 36 s |\n"
                  "# | 06 generation | eval | 9 s |\nx = 1\n")
    N.update_course_table(py, {"00_the_shapes_world": 35.8, "06_multi": 111.9})
    assert py.read_text().splitlines() == [
        "# | notebook | idea | time |", "# | 00 the world | data | 36 s |",
        "# | 06 generation | eval | 112 s |", "x = 1"]
