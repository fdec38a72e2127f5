"""Lesson 04's explorer: a token's attention in runs with and without the attention loss."""

import numpy as np
import pytest

from conceptlab.viz import widgets


def _setup():
    masks = np.zeros((2, 4, 4), bool)
    masks[0, :2, :2] = True                   # concept 0: top-left block
    masks[1, 2:, 2:] = True                   # concept 1: bottom-right block
    swapped = masks[::-1].astype(float)       # token 0 looks at concept 1 and vice versa
    samples = np.stack([np.full((3, 4, 4, 3), k, np.uint8) for k in range(2)])
    runs = {0.0: {"maps": swapped, "samples": samples},
            1.0: {"maps": masks * 0.5 + 0.1, "samples": samples,
                  "scores": [{"colour": 1.0}, {"colour": 0.5}]}}
    return runs, masks


def test_token_attention_view_finds_a_swapped_token():
    runs, masks = _setup()
    v = widgets.token_attention_view(runs, 0.0, 0, masks)
    assert v["iou"].tolist() == [0.0, 1.0]
    assert v["looks_at"] == 1 and not v["own"] and v["scores"] is None
    v = widgets.token_attention_view(runs, 1.0, 1, masks)
    assert v["map"].max() == pytest.approx(1.0) and v["map"].min() == pytest.approx(0.0)
    assert v["looks_at"] == 1 and v["own"] and v["scores"] == {"colour": 0.5}
    assert (v["samples"] == 1).all() and v["samples"].shape == (3, 4, 4, 3)


def test_the_threshold_moves_the_mask():
    runs, masks = _setup()
    runs[1.0]["maps"] = np.array([masks[0] * 1.0 + np.eye(4) * 0.3, masks[1] * 1.0])
    lo = widgets.token_attention_view(runs, 1.0, 0, masks, threshold=0.2)
    hi = widgets.token_attention_view(runs, 1.0, 0, masks, threshold=0.5)
    assert lo["mask"].sum() == 6 and hi["mask"].sum() == 4   # the diagonal joins below 0.3
    assert lo["iou"][0] == pytest.approx(4 / 6) and hi["iou"][0] == pytest.approx(1.0)


def test_a_flat_map_looks_nowhere_and_errors_say_what_was_wrong():
    runs, masks = _setup()
    runs[0.0]["maps"] = np.ones((2, 4, 4))
    v = widgets.token_attention_view(runs, 0.0, 0, masks)
    assert not v["mask"].any() and v["looks_at"] is None and not v["own"]
    with pytest.raises(ValueError, match="the runs are"):
        widgets.token_attention_view(runs, 0.5, 0, masks)
    with pytest.raises(ValueError, match="token"):
        widgets.token_attention_view(runs, 1.0, 2, masks)
    with pytest.raises(ValueError, match="same shape"):
        widgets.token_attention_view(runs, 1.0, 0, masks[:, :2])


def test_token_attention_explorer_moves_from_code():
    pytest.importorskip("ipywidgets")
    import matplotlib
    matplotlib.use("Agg")
    runs, masks = _setup()
    image = np.zeros((4, 4, 3), np.uint8)
    w = widgets.token_attention_explorer(image, runs, masks, ["[v1]", "[v2]"])
    assert w.result["looks_at"] == 1
    w.children[0].value = 1.0
    assert w.result["own"]
