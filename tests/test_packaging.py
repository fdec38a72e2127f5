"""Packaging consistency: pyproject.toml <-> environment.yml, CI entry point, nbval config."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
ENV_YML = ROOT / "environment.yml"

# pip name -> conda-forge name, where they differ.
CONDA_NAME = {"torch": "pytorch"}
FORBIDDEN = {"torchvision"}


# ----------------------------------------------------------------- helpers
def normalize(name: str) -> str:
    """PEP 503 normalisation, so `Foo_Bar` and `foo-bar` compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


def req_name(requirement: str) -> str:
    """Bare project name of a PEP 508 / conda match spec ('torch>=2.1' -> 'torch')."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert m, f"cannot parse requirement {requirement!r}"
    return normalize(m.group(1))


def parse_environment_yml(text: str) -> dict:
    """Minimal parser for the fixed environment.yml layout used here.

    Supports top-level ``key: value`` and ``key:`` followed by ``- item`` lists,
    plus one nested list under ``- pip:``.  Returns
    ``{"name": str, "channels": [...], "dependencies": [...], "pip": [...]}``.
    Deliberately avoids PyYAML, which is not a dependency of the project.
    """
    out: dict = {"channels": [], "dependencies": [], "pip": []}
    section = None
    in_pip = False
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        stripped = line.strip()
        if indent == 0:
            key, _, value = stripped.partition(":")
            section, in_pip = key.strip(), False
            if value.strip():
                out[section] = value.strip()
            else:
                out.setdefault(section, [])
            continue
        assert stripped.startswith("- "), f"unexpected line in environment.yml: {raw!r}"
        item = stripped[2:].strip()
        if section == "dependencies" and item == "pip:":
            in_pip, pip_indent = True, indent
            continue
        if in_pip and indent > pip_indent:
            out["pip"].append(item)
        else:
            in_pip = False
            out[section].append(item)
    return out


def missing_from_env(requirements: list[str], env: dict) -> list[str]:
    """Requirements (pip names) not named anywhere in the parsed environment."""
    names = {req_name(d) for d in env["dependencies"]}
    names |= {req_name(p) for p in env["pip"] if not p.startswith("-")}
    return [r for r in requirements if CONDA_NAME.get(req_name(r), req_name(r)) not in names]


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def pyproject() -> dict:
    with PYPROJECT.open("rb") as f:
        return tomllib.load(f)


@pytest.fixture(scope="module")
def env_text() -> str:
    return ENV_YML.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def env(env_text) -> dict:
    return parse_environment_yml(env_text)


@pytest.fixture(scope="module")
def runtime_deps(pyproject) -> list[str]:
    return pyproject["project"]["dependencies"]


def expand_extras(requirements: list[str], extras: dict) -> list[str]:
    """The requirements with ``conceptlab[x]`` (an extra that installs another) expanded."""
    out = []
    for r in requirements:
        m = re.fullmatch(r"\s*conceptlab\[([^\]]+)\]\s*", r)
        if m:
            for name in m.group(1).split(","):
                out += expand_extras(extras[name.strip()], extras)
        else:
            out.append(r)
    return out


@pytest.fixture(scope="module")
def dev_deps(pyproject) -> list[str]:
    extras = pyproject["project"]["optional-dependencies"]
    return expand_extras(extras["dev"], extras)


# ------------------------------------------------------------------- tests
def test_pyproject_metadata(pyproject):
    project = pyproject["project"]
    assert project["name"] == "conceptlab"
    assert project["requires-python"] == ">=3.10"
    assert project["scripts"]["conceptlab"] == "conceptlab.cli:main"
    # every subpackage on disk is listed (a new one would be left out of the wheel), and
    # data/ installs as conceptlab._data (tests/test_install.py builds and checks the wheel)
    on_disk = {".".join(p.parent.relative_to(ROOT).parts)
               for p in (ROOT / "conceptlab").rglob("__init__.py")}
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    assert listed == on_disk | {"conceptlab._data"}
    assert pyproject["tool"]["setuptools"]["package-dir"] == {"conceptlab._data": "data"}
    assert pyproject["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]
    assert pyproject["tool"]["ruff"]["line-length"] == 100


def test_core_runtime_deps_declared(runtime_deps, dev_deps):
    names = {req_name(d) for d in runtime_deps}
    for needed in ("torch", "diffusers", "transformers", "safetensors", "numpy", "pydensecrf2"):
        assert needed in names, f"{needed} missing from [project].dependencies"
    assert {req_name(d) for d in dev_deps} >= {"pytest", "nbval", "jupyterlab", "ipykernel", "ruff"}


def test_site_tools_are_an_extra_that_dev_installs(pyproject, dev_deps):
    """`make site` needs only the `site` extra; CI (`.[dev]`) gets it through `dev`."""
    extras = pyproject["project"]["optional-dependencies"]
    assert "conceptlab[site]" in extras["dev"]
    site = {req_name(d) for d in extras["site"]}
    assert site >= {"mkdocs", "mkdocs-jupyter", "mkdocstrings-python"}
    assert site <= {req_name(d) for d in dev_deps}
    assert expand_extras(["conceptlab[lora,gpu]", "numpy"], extras) == \
        extras["lora"] + extras["gpu"] + ["numpy"]


def test_environment_yml_layout(env):
    assert env["name"] == "conceptlab"
    assert env["channels"] == ["conda-forge"], "learner env must use conda-forge only"
    assert any(req_name(d) == "python" for d in env["dependencies"])
    assert "pip" in {req_name(d) for d in env["dependencies"]}
    assert "-e ." in env["pip"], "environment.yml must pip-install the project (-e .)"


def test_environment_yml_parser_agrees_with_yaml(env_text, env):
    yaml = pytest.importorskip("yaml")  # optional cross-check; not a project dependency
    data = yaml.safe_load(env_text)
    pip = next(d for d in data["dependencies"] if isinstance(d, dict))["pip"]
    plain = [d for d in data["dependencies"] if not isinstance(d, dict)]
    assert data["name"] == env["name"]
    assert data["channels"] == env["channels"]
    assert plain == env["dependencies"]
    assert pip == env["pip"]


def test_every_pyproject_dependency_is_in_environment_yml(runtime_deps, dev_deps, env):
    missing = missing_from_env(runtime_deps + dev_deps, env)
    assert not missing, f"in pyproject.toml but not in environment.yml: {missing}"


def test_dependency_check_detects_a_removed_dependency(env_text):
    """The consistency check above must be able to fail."""
    for dep, conda in (
        ("diffusers>=0.30", "diffusers"),
        ("torch>=2.1", "pytorch"),
        ("pydensecrf2", "pydensecrf2"),
    ):
        pruned = "\n".join(
            line
            for line in env_text.splitlines()
            if not re.fullmatch(rf"\s*-\s*{re.escape(conda)}\b.*", line)
        )
        assert pruned != env_text
        assert missing_from_env([dep], parse_environment_yml(pruned)) == [dep]


@pytest.mark.parametrize("forbidden", sorted(FORBIDDEN))
def test_forbidden_dependency_absent(forbidden, pyproject, env):
    project = pyproject["project"]
    pip_reqs = project["dependencies"] + [
        d for extra in project.get("optional-dependencies", {}).values() for d in extra
    ]
    assert forbidden not in {req_name(d) for d in pip_reqs}
    env_names = {req_name(d) for d in env["dependencies"]}
    env_names |= {req_name(p) for p in env["pip"] if not p.startswith("-")}
    assert forbidden not in env_names


def test_ci_entry_point_runs_make_test():
    script = ROOT / ".ci" / "run"
    assert script.is_file() and os.access(script, os.X_OK), ".ci/run must be executable"
    text = script.read_text(encoding="utf-8")
    assert "set -euo pipefail" in text
    assert re.search(r"^make test$", text, flags=re.MULTILINE)


def floors(requirements) -> dict:
    """{name: lowest version} of the requirements that declare one (``name>=X``)."""
    from packaging.version import Version

    out = {}
    for r in requirements:
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*>=\s*([0-9][0-9A-Za-z.]*)", r)
        if m:
            out[normalize(m.group(1))] = Version(m.group(2))
    return out


def test_floors_file_pins_every_declared_floor_and_ci_tests_them(pyproject, env):
    from packaging.version import Version

    declared = floors(pyproject["project"]["dependencies"])
    for extra in pyproject["project"]["optional-dependencies"].values():
        declared |= floors(extra)
    pins = {}
    for line in (ROOT / "tests" / "floors.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[normalize(name)] = Version(version.strip())
    for name in ("torch", "diffusers", "transformers"):
        assert name in declared, f"{name} has no declared floor in pyproject.toml"
    assert pins == declared, "tests/floors.txt must pin exactly pyproject.toml's floors"
    conda = {CONDA_NAME.get(k, k): v for k, v in declared.items()}
    in_env = {k: v for k, v in floors(env["dependencies"]).items() if k != "python"}
    assert in_env == {k: v for k, v in conda.items() if k in in_env}, \
        "environment.yml's floors must equal pyproject.toml's"
    assert re.search(r"^make test-floors$", (ROOT / ".ci" / "run").read_text(), re.MULTILINE)
    assert floors(["torch>=2.13", "peft"]) == {"torch": Version("2.13.0")}


def test_makefile_targets():
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in ("venv", "demo", "test", "lab", "lint", "clean"):
        assert re.search(rf"^{target}:", text, flags=re.MULTILINE), f"Makefile lacks `{target}`"
    assert "--nbval-lax" in text and "nbval_sanitize.cfg" in text


def test_nbval_sanitize_patterns():
    plugin = pytest.importorskip("nbval.plugin")
    patterns = plugin.get_sanitize_patterns((ROOT / "nbval_sanitize.cfg").read_text())
    assert len(patterns) >= 4

    def sanitize(s: str) -> str:
        for regex, replace in patterns:
            s = re.sub(regex, replace, s)
        return s

    assert sanitize("<foo.Bar at 0x7f3a2b1c>") == sanitize("<foo.Bar at 0x1234>")
    assert sanitize("<a.B object at 0x7f3a>") == sanitize("<a.B object at 0xdeadbeef>")
    assert sanitize("took 12.3 s") == sanitize("took 4 s")
    assert sanitize("4.56it/s") == sanitize("12.1it/s")
    assert sanitize("saved /tmp/tmpab12cd/x.png") == sanitize("saved /tmp/tmpzz99/x.png")
    # ordinary text must survive
    assert sanitize("rank 4 LoRA, 3 concepts") == "rank 4 LoRA, 3 concepts"
