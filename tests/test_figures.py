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


def test_label_image_paints_flat_colours_over_a_dimmed_grey_image():
    import pytest

    from conceptlab.viz.figures import MASK_COLOURS, label_image

    img = np.zeros((4, 4, 3), np.uint8)
    img[..., 0] = 200                              # a red image: its grey is 200 / 3
    masks = np.zeros((2, 4, 4), bool)
    masks[0, 0, 0], masks[1, 3, 3] = True, True
    out = label_image(img, masks)
    assert out.dtype == np.uint8 and out.shape == (4, 4, 3)
    assert out[0, 0].tolist() == MASK_COLOURS[0].tolist()
    assert out[3, 3].tolist() == MASK_COLOURS[1].tolist()
    assert out[1, 1].tolist() == [int(200 / 3 * 0.4)] * 3      # unlabelled: dimmed grey
    with pytest.raises(ValueError, match=r"\(K, H, W\)"):
        label_image(img, masks[0])


def test_draw_masks_draws_outlines_and_a_legend():
    import matplotlib.pyplot as plt

    from conceptlab.viz.figures import draw_masks

    img = np.zeros((8, 8, 3), np.uint8)
    masks = np.zeros((2, 8, 8), bool)
    masks[0, :4], masks[1, 4:] = True, True
    fig, ax = plt.subplots()
    draw_masks(ax, img, masks, names=["star", "background"], outlines=masks[:1], title="t")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["star", "background"]
    assert ax.get_title() == "t" and len(ax.images) == 1
    assert len(ax.collections) >= 1                     # the outline's contour
    plt.close(fig)
