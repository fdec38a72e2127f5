"""Lesson 03's explorer: one of several precomputed training runs (pure logic)."""

import numpy as np
import pytest

from conceptlab.train.history import TrainingHistory
from conceptlab.viz import widgets


def _record(norms, losses, colour):
    h = TrainingHistory(names=["[v1]"], steps=list(range(1, len(losses) + 1)),
                        diffusion=list(losses), embedding_norms=[[x] for x in norms],
                        vocab_norm=0.5)
    samples = np.zeros((2, 3, 4, 4, 3), np.uint8)
    samples[1] = colour                       # prompt 1's samples are all `colour`
    return widgets.run_record(h, samples, {"square": [0.25, 0.75]})


def _runs():
    return {"no mask": _record([0.5, 1.0, 2.0], [4.0, 2.0, 0.0], 10),
            "mask": _record([0.5, 0.5, 0.6], [1.0, 1.0, 1.0], 20)}


def test_run_record_divides_the_norm_by_the_vocabulary_mean():
    r = _runs()["no mask"]
    assert r["norm_ratio"].tolist() == [1.0, 2.0, 4.0]
    assert r["samples"].shape == (2, 3, 4, 4, 3) and r["props"]["square"].tolist() == [0.25, 0.75]
    with pytest.raises(ValueError, match="P, n, H, W, 3"):
        widgets.run_record(TrainingHistory(vocab_norm=1.0), np.zeros((3, 4, 4, 3)))
    with pytest.raises(ValueError, match="vocab_norm"):
        widgets.run_record(TrainingHistory(), np.zeros((1, 3, 4, 4, 3)))


def test_token_run_view_selects_the_run_and_the_prompt():
    runs = _runs()
    v = widgets.token_run_view(runs, "no mask", prompt=1, window=2)
    assert v["run"] == "no mask" and (v["samples"] == 10).all() and v["samples"].shape == (3, 4, 4, 3)
    assert v["props"] == {"square": 0.75}
    assert v["final_norm_ratio"] == pytest.approx(4.0)
    assert v["loss_smooth"].tolist() == [4.0, 3.0, 1.0]      # running mean over 2 records
    v = widgets.token_run_view(runs, "mask", prompt=0, window=1)
    assert (v["samples"] == 0).all() and v["loss_smooth"].tolist() == v["loss"].tolist()
    assert v["final_norm_ratio"] == pytest.approx(1.2)


def test_token_run_view_says_what_was_wrong():
    with pytest.raises(ValueError, match="the runs are"):
        widgets.token_run_view(_runs(), "mask + norm penalty")
    with pytest.raises(ValueError, match="prompt"):
        widgets.token_run_view(_runs(), "mask", prompt=2)
    with pytest.raises(ValueError, match="window"):
        widgets.token_run_view(_runs(), "mask", window=0)


def test_token_run_explorer_moves_from_code():
    pytest.importorskip("ipywidgets")
    import matplotlib
    matplotlib.use("Agg")
    w = widgets.token_run_explorer(_runs(), ["p0", "p1"])
    assert w.result["run"] == "no mask"
    w.children[0].value = "mask"
    assert w.result["run"] == "mask"
