"""Lesson 06's explorer: precomputed sample rows (guidance, phase 2) and their differences."""

import numpy as np
import pytest

from conceptlab.viz import widgets


def _grids():
    a = np.zeros((3, 4, 4, 3), np.uint8)
    b = a.copy()
    b[:, 0, 0] = 40                          # one pixel of 16 per sample differs by 40
    return {"w=1": a, "w=4": b, "odd": np.zeros((2, 4, 4, 3), np.uint8)}


def test_sample_grid_view_scores_and_difference():
    grids = _grids()
    v = widgets.sample_grid_view(grids, "w=4", {"w=4": {"identity": 0.7}}, reference="w=1")
    assert v["strip"].shape == (4, 12, 3) and v["scores"] == {"identity": 0.7}
    assert v["changed"] == pytest.approx(1 / 16) and v["diff"] == pytest.approx(40 / 16)
    v = widgets.sample_grid_view(grids, "w=1", reference="w=1")
    assert v["diff"] == 0 and v["changed"] == 0 and v["scores"] is None
    assert widgets.sample_grid_view(grids, "odd")["diff"] is None


def test_sample_grid_view_rejects_bad_keys():
    grids = _grids()
    with pytest.raises(ValueError, match="no samples"):
        widgets.sample_grid_view(grids, "w=9")
    with pytest.raises(ValueError, match="shape"):
        widgets.sample_grid_view(grids, "odd", reference="w=1")
