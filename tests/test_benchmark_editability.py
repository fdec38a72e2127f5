"""benchmarks/editability.py: its summary (fast) and its --quick run (slow: minutes of CPU)."""

import json

import pytest

from benchmarks import editability


def test_summarise_groups_by_steps_and_lambda():
    rows = [{"lambda_attn": lam, "phase2_steps": p2, **{m: v for m in editability.METRICS}}
            for lam, p2, v in ((0.0, 0, 0.2), (0.0, 0, 0.4), (0.1, 50, 0.6), (0.0, 50, 1.0))]
    s = editability.summarise(rows)
    assert [(e["lambda_attn"], e["phase2_steps"]) for e in s] == [(0.0, 0), (0.0, 50), (0.1, 50)]
    assert s[0]["identity"]["mean"] == pytest.approx(0.3) and s[0]["identity"]["n"] == 2
    assert s[1]["prompt_fidelity"]["sem"] == 0.0


@pytest.mark.slow
def test_quick_run_writes_a_result(tmp_path):
    from benchmarks.frame import main

    assert main(["editability", "--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "sweep.json").read_text())
    assert res["provenance"]["complete"] and res["phase2_steps"] == [0, 1]
    assert {(e["lambda_attn"], e["phase2_steps"]) for e in res["summary"]} == {(0.1, 0), (0.1, 1)}
