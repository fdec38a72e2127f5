"""The shared figure helpers build figures of the right layout (no display needed)."""

import matplotlib

matplotlib.use("Agg")

import numpy as np

from conceptlab.viz.figures import image_row, sample_strips


def test_sample_strips_one_axis_per_row_with_titles():
    rows = [np.zeros((3, 8, 8, 3), np.uint8), np.full((3, 8, 8, 3), 255, np.uint8)]
    fig = sample_strips(rows, ["black", "white"])
    assert len(fig.axes) == 2
    assert [ax.get_title(loc="left") for ax in fig.axes] == ["black", "white"]
    shown = fig.axes[1].images[0].get_array()
    assert shown.shape == (8, 24, 3) and int(shown.min()) == 255   # 3 images side by side
    fig = image_row([np.zeros((4, 4, 3), np.uint8)] * 3, titles=["a", "b", "c"])
    assert [ax.get_title() for ax in fig.axes] == ["a", "b", "c"]
