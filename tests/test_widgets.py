"""The pure functions behind the notebook sliders, and driving the widgets from code."""

import numpy as np
import pytest

from conceptlab.shapes import world
from conceptlab.viz import widgets


def _scene():
    return world.render_scene(world.sample_scene(seed=3, n_objects=2))


def test_threshold_view_hand_values():
    m = np.array([[0.0, 1.0], [2.0, 4.0]])  # min-max -> [[0, .25], [.5, 1]]
    gt = np.array([[False, False], [True, True]])
    v = widgets.threshold_view(m, 0.4, gt_mask=gt)
    assert v["mask"].tolist() == [[False, False], [True, True]]
    assert v["iou"] == pytest.approx(1.0)
    v = widgets.threshold_view(m, 0.2, gt_mask=gt)  # adds the 0.25 pixel: IoU 2/3
    assert v["iou"] == pytest.approx(2 / 3)
    v = widgets.threshold_view(m, method="mean")
    assert v["threshold"] == pytest.approx(0.4375)
    with pytest.raises(ValueError, match="method"):
        widgets.threshold_view(m, method="median")


def test_crf_view_improves_blurry_maps_and_reports_backend():
    sc = _scene()
    gt = sc.masks[1:]
    import torch
    # blurry low-resolution maps of the true objects, as attention would give
    maps = torch.nn.functional.avg_pool2d(torch.from_numpy(gt.astype(np.float32))[None], 8)[0]
    v = widgets.crf_view(sc.image, maps.numpy(), gt_masks=gt)
    assert v["before"].shape == gt.shape and v["after"].dtype == bool
    assert not (v["after"][0] & v["after"][1]).any()  # disjoint
    assert np.mean(v["iou_after"]) > np.mean(v["iou_before"])
    assert v["backend"] in ("torch", "pydensecrf")
    # zero iterations = no refinement
    v0 = widgets.crf_view(sc.image, maps.numpy(), n_iters=0, backend="torch")
    assert (v0["after"] == v0["before"]).all()


def test_threshold_explorer_is_driven_by_its_slider(monkeypatch):
    monkeypatch.setattr(widgets, "_show", lambda *a, **k: None)
    sc = _scene()
    m = np.random.default_rng(0).random((16, 16))
    w = widgets.threshold_explorer(sc.image, m, sc.masks[1])
    w.children[0].value = 0.9
    hi = w.result["mask"].sum()
    w.children[0].value = 0.1
    assert w.result["mask"].sum() > hi
    assert 0 <= w.result["iou"] <= 1


def test_explorers_open_on_a_content_word():
    f = widgets.first_content_word
    assert f(["a", "photo", "of", "a", "red", "star"]) == "red"
    assert f(["a", "photo", "of", "[v1]", "and", "[v2]"]) == "[v1]"
    assert f(["a", "of"]) == "a"          # nothing better: the first word
    with pytest.raises(ValueError, match="no words"):
        f([])
