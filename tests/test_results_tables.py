"""The benchmark tool: generated result tables are current, every result carries its
provenance, every benchmark is listed and imports without running. No model is loaded
(unless the bundled model's weight files changed since ``make results``)."""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import frame, tables

ROOT = Path(__file__).resolve().parents[1]
RESULT_FILES = sorted(p for p in (ROOT / "benchmarks" / "results").rglob("*.json")
                      if ".cache" not in p.parts)


def test_generated_tables_are_current(tmp_path):
    """Regenerating into a temporary folder gives the committed files byte for byte."""
    assert tables.main(["--out", str(tmp_path)]) == 0
    generated = sorted(p.relative_to(tmp_path).as_posix()
                       for p in tmp_path.rglob("*") if p.is_file())
    assert {tables.RESULTS_MD, tables.HEADLINE_MD, tables.SHIPPED_JSON} <= set(generated)
    stale = [f for f in generated
             if not (ROOT / f).exists() or (ROOT / f).read_bytes() != (tmp_path / f).read_bytes()]
    assert not stale, f"stale generated files (run `make results`): {stale}"


def test_headline_is_short_and_says_which_model():
    text = (ROOT / tables.HEADLINE_MD).read_text()
    items = [line for line in text.splitlines() if line.startswith("- ")]
    assert 1 <= len(items) <= 5
    shipped = tables.stored_shipped()["weights_fingerprint"]
    assert f"`{shipped}`" in (ROOT / tables.RESULTS_MD).read_text()


def test_readme_keeps_only_short_generated_blocks():
    """The README is an entry point: the headline and discovery blocks; the tables live in
    docs/results.md and docs/gpu.md."""
    keys = tables.BLOCK.findall((ROOT / "README.md").read_text())
    assert [k for _, k, _, _ in keys] == ["headline", "discovery"]
    for _, key, body, _ in keys:
        assert len(body.strip().splitlines()) <= 12, key
        assert "| " not in body, f"{key}: a table belongs in docs/results.md"


@pytest.mark.parametrize("path", RESULT_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_result_has_a_provenance_block(path):
    data = json.loads(path.read_text())
    assert isinstance(data, dict), "a result is a JSON object (a list goes under 'rows')"
    prov = data.get("provenance")
    assert isinstance(prov, dict), "no provenance block"
    missing = [k for k in frame.PROVENANCE_KEYS if k not in prov]
    assert not missing, f"provenance lacks {missing}"
    assert isinstance(prov["machine"], dict)
    assert {"cpu_cores", "torch_threads", "device", "torch", "diffusers",
            "transformers"} <= set(prov["machine"])
    assert prov["benchmark"] in frame.REGISTRY
    assert isinstance(prov["reconstructed"], bool)
    if prov["reconstructed"]:
        assert prov.get("recorded_in") or prov.get("command"), "nothing reconstructed"
    else:   # written by the tool: everything known
        for k in ("git_commit", "command", "conceptlab_version", "date", "wall_seconds"):
            assert prov[k] is not None, k
        assert prov["command"].startswith("python -m benchmarks ")


def test_results_are_named_by_benchmark():
    for path in RESULT_FILES:
        parts = path.relative_to(ROOT / "benchmarks" / "results").parts
        prov = json.loads(path.read_text())["provenance"]
        folder = parts[1] if parts[0] == "pilots" else parts[0]
        assert folder == prov["benchmark"], path


def test_help_lists_every_benchmark():
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=60).stdout
    for name in frame.REGISTRY:
        assert f"  {name} " in out, name
        assert frame.description(name) in out


@pytest.mark.parametrize("name", sorted(frame.REGISTRY))
def test_benchmark_imports_without_running(name, monkeypatch):
    """Importing builds nothing; its options (and --quick's) parse without running it."""
    import conceptlab.models

    def refuse(*a, **k):
        raise AssertionError(f"{name}: loads a model at import")

    monkeypatch.setattr(conceptlab.models, "load_pipeline", refuse)
    try:
        module = importlib.reload(importlib.import_module(frame.REGISTRY[name]))
    finally:   # the module must not keep the refusing stand-in for later tests
        monkeypatch.undo()
        if frame.REGISTRY[name] in sys.modules:
            importlib.reload(sys.modules[frame.REGISTRY[name]])
    assert callable(module.add_arguments) and callable(module.run)
    ap = argparse.ArgumentParser()
    module.add_arguments(ap)
    frame.add_shared_arguments(ap, name, module)
    args = ap.parse_args([])
    assert args.overwrite is False and ap.parse_args(["--overwrite"]).overwrite is True
    assert ap.parse_args(["--restart"]).overwrite is True   # em_suite's old spelling
    unknown = set(getattr(module, "QUICK", {})) - set(vars(args))
    assert not unknown, f"QUICK names options {name} does not have: {unknown}"
    ap.set_defaults(**getattr(module, "QUICK", {}))
    quick = ap.parse_args(["--quick"])
    path = frame.result_path(name, module, quick)
    assert frame.QUICK_RESULTS in path.parents   # a smoke run never touches a committed result
    assert frame.result_path(name, module, args).parent == frame.RESULTS / name


def test_context_caches_items_and_writes_provenance(tmp_path):
    args = argparse.Namespace(n=3, threads=1, out=str(tmp_path), name=None, json=None,
                              overwrite=False, quick=False)
    ctx = frame.Context("em_suite", args, ["--n", "3"], tmp_path / "r.json")
    ctx.set_model(name="m", fingerprint="0123456789abcdef")
    calls = []

    def item():
        calls.append(1)
        return {"x": 1.5, "a": np.arange(4, dtype=np.uint8), "t": (1, 2)}

    first = ctx.cached({"scene": 0}, item)
    again = frame.Context("em_suite", args, ["--n", "3"], tmp_path / "r.json")
    again.set_model(name="m", fingerprint="0123456789abcdef")
    second = again.cached({"scene": 0}, item)
    assert len(calls) == 1
    assert second["x"] == 1.5 and second["t"] == [1, 2]
    np.testing.assert_array_equal(second["a"], first["a"])
    other = frame.Context("em_suite", args, [], tmp_path / "r.json")
    other.set_model(name="m", fingerprint="fedcba9876543210")   # another model: recomputed
    other.cached({"scene": 0}, item)
    assert len(calls) == 2
    assert (tmp_path / ".cache" / ".gitignore").read_text() == "*\n"

    path = ctx.write({"rows": [1, 2]})
    data = json.loads(path.read_text())
    prov = data["provenance"]
    assert list(data) == ["provenance", "rows"]
    assert all(k in prov for k in frame.PROVENANCE_KEYS)
    assert prov["command"] == "python -m benchmarks em_suite --n 3"
    assert prov["model_fingerprint"] == "0123456789abcdef"
    assert prov["options"] == {"n": 3} and prov["reconstructed"] is False
