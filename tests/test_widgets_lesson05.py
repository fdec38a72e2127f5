"""Lesson 05's explorer: a slider through an EM run's snapshots and E-steps (selects only)."""

import numpy as np
import pytest

from conceptlab.viz import widgets


def _run():
    masks0 = np.zeros((2, 4, 4), bool)
    masks0[0, :2, :2] = True
    masks0[1, 2:, 2:] = True
    masks1 = masks0.copy()
    masks1[0, :2, :] = True                 # the E-step at 40 grows mask 0
    maps = [np.stack([m * (s + 1.0) + 0.5 for m in masks0]) for s in range(3)]
    return [0, 32, 64], maps, [0, 40], [masks0, masks1], masks1


def test_em_step_view_selects_snapshot_and_latest_e_step():
    a_steps, a_maps, e_steps, hist, gt = _run()
    v = widgets.em_step_view(a_steps, a_maps, e_steps, hist, 30, gt)
    assert v["snapshot_step"] == 32 and v["e_step"] == 0
    assert v["maps"].max() == pytest.approx(1.0) and v["maps"].min() == pytest.approx(0.0)
    assert (v["masks"] == hist[0]).all()
    assert v["iou"][0] == pytest.approx(0.5) and v["iou"][1] == pytest.approx(1.0)
    v = widgets.em_step_view(a_steps, a_maps, e_steps, hist, 64, gt)
    assert v["snapshot_step"] == 64 and v["e_step"] == 40 and v["iou"][0] == pytest.approx(1.0)
    assert widgets.em_step_view(a_steps, a_maps, e_steps, hist, 40)["iou"] is None


def test_em_step_view_rejects_bad_input():
    a_steps, a_maps, e_steps, hist, _ = _run()
    with pytest.raises(ValueError, match="before the first E-step"):
        widgets.em_step_view(a_steps, a_maps, [10, 40], hist, 5)
    with pytest.raises(ValueError, match="same length"):
        widgets.em_step_view(a_steps, a_maps[:2], e_steps, hist, 5)
    with pytest.raises(ValueError, match="no attention snapshots"):
        widgets.em_step_view([], [], e_steps, hist, 5)
