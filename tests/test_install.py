"""`pip install .` (not only `-e .`) gives a working library: the bundled data ships inside
the wheel as ``conceptlab/_data`` and ``load_pipeline()`` finds it there."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("setuptools")


pytestmark = pytest.mark.slow  # builds a wheel and installs it into a fresh venv


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("conceptlab", "data"):
        shutil.copytree(ROOT / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(out)], check=True, cwd=src)
    (whl,) = out.glob("conceptlab-*.whl")
    return whl


def test_wheel_holds_the_bundled_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in Path(ROOT / "data").rglob("*"):
        if f.is_file():
            assert f"conceptlab/_data/{f.relative_to(ROOT / 'data').as_posix()}" in names, f
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_installed_package_loads_the_bundled_model(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True)
    code = (
        "import sys\n"
        f"sys.path = [{str(target)!r}] + [p for p in sys.path if p not in ('', {str(ROOT)!r})]\n"
        "import conceptlab, conceptlab.models as m\n"
        "print(conceptlab.__file__)\n"
        "print(m.data_dir())\n"
        "pipe = m.load_pipeline(device='cpu', progress=False)\n"
        "print(type(pipe).__name__, m.native_size(pipe))\n")
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("CONCEPTLAB_DATA", "PYTHONPATH")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True).stdout.splitlines()
    assert out[0].startswith(str(target)), out
    assert out[1] == str(target / "conceptlab" / "_data"), out
    assert out[2].startswith("StableDiffusionPipeline"), out
