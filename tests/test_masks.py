"""Tests for conceptlab.masks on small hand-built arrays with known answers."""

import numpy as np
import pytest
import torch

from conceptlab import masks

# -----------------------------------------------------------------------------
# normalize


def test_normalize_max_and_minmax_by_hand():
    a = np.array([[0.0, 1.0], [2.0, 4.0]])
    np.testing.assert_allclose(masks.normalize(a), [[0, 0.25], [0.5, 1]])
    b = np.array([[1.0, 3.0], [5.0, 5.0]])
    np.testing.assert_allclose(masks.normalize(b, "minmax"), [[0, 0.5], [1, 1]])


def test_normalize_each_map_independently():
    maps = np.array([[[0.0, 2.0], [1.0, 2.0]],
                     [[0.0, 10.0], [5.0, 0.0]]])  # (2, 2, 2)
    out = masks.normalize(maps)
    np.testing.assert_allclose(out[0], [[0, 1], [0.5, 1]])
    np.testing.assert_allclose(out[1], [[0, 1], [0.5, 0]])


def test_normalize_degenerate_maps_give_zeros_not_nan():
    assert np.array_equal(masks.normalize(np.zeros((3, 3))), np.zeros((3, 3)))
    assert np.array_equal(masks.normalize(np.full((3, 3), 7.0), "minmax"), np.zeros((3, 3)))
    out = masks.normalize(torch.zeros(2, 4, 4))
    assert torch.equal(out, torch.zeros(2, 4, 4))


def test_normalize_keeps_kind_and_float_dtype():
    a = np.array([[1, 2], [3, 4]])  # int input -> float output
    out = masks.normalize(a)
    assert isinstance(out, np.ndarray) and np.issubdtype(out.dtype, np.floating)
    t = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    out = masks.normalize(t)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    assert torch.allclose(out, t / 4)


def test_normalize_bad_input():
    with pytest.raises(ValueError, match="minmax"):
        masks.normalize(np.array([[-1.0, 1.0], [0.0, 0.0]]))  # negative values need minmax
    with pytest.raises(ValueError, match="mode"):
        masks.normalize(np.ones((2, 2)), mode="softmax")
    with pytest.raises(ValueError, match=r"\(\.\.\., H, W\)"):
        masks.normalize(np.ones(4))
    with pytest.raises(TypeError, match="numpy"):
        masks.normalize([[0.0, 1.0]])


# -----------------------------------------------------------------------------
# binarize / Otsu


def test_binarize_threshold_and_mean():
    a = np.array([[0.0, 0.5], [0.6, 1.0]])
    # strictly greater: 0.5 itself is not set
    assert masks.binarize(a, threshold=0.5).tolist() == [[False, False], [True, True]]
    b = np.array([[0.0, 0.0], [1.0, 3.0]])  # mean = 1
    assert masks.binarize(b, "mean").tolist() == [[False, False], [False, True]]
    out = masks.binarize(torch.tensor(a), "threshold", 0.55)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bool
    assert out.tolist() == [[False, False], [True, True]]


def test_otsu_threshold_lies_between_the_two_modes():
    rng = np.random.default_rng(0)
    low = 0.2 + 0.03 * rng.standard_normal(300)
    high = 0.8 + 0.03 * rng.standard_normal(100)  # unbalanced classes on purpose
    a = rng.permutation(np.concatenate([low, high])).reshape(20, 20)
    t = masks.otsu_threshold(a)
    assert isinstance(t, float)
    assert low.max() < t < high.min()
    assert np.array_equal(masks.binarize(a, "otsu"), a > 0.5)
    # Otsu adapts to the scale of the map; a fixed 0.5 threshold would find (almost) nothing here
    assert masks.binarize(a * 0.6, "otsu").sum() == 100


def test_otsu_matches_brute_force_between_class_variance():
    # integer levels 0..7 fall in distinct histogram bins, so the histogram
    # Otsu must equal an exhaustive search over all splits of the data
    rng = np.random.default_rng(1)
    a = rng.choice(8, size=(12, 12), p=[0.2, 0.15, 0.1, 0.05, 0.05, 0.1, 0.15, 0.2]).astype(float)
    x = a.ravel()
    best, best_sb = None, -1
    for v in np.unique(x)[:-1]:
        c0, c1 = x[x <= v], x[x > v]
        w0, w1 = len(c0) / len(x), len(c1) / len(x)
        sb = w0 * w1 * (c0.mean() - c1.mean()) ** 2
        if sb > best_sb:
            best, best_sb = v, sb
    assert np.array_equal(masks.binarize(a, "otsu"), a > best)


def test_otsu_is_per_map_and_keeps_kind():
    a = np.zeros((2, 4, 4))
    a[0, :2] = 1.0          # map 0: two levels 0 / 1
    a[1] = 10.0
    a[1, 3, 3] = 30.0       # map 1: levels 10 / 30
    t = masks.otsu_threshold(torch.tensor(a))
    assert isinstance(t, torch.Tensor) and t.shape == (2,)
    assert 0 < t[0] < 1 and 10 < t[1] < 30
    out = masks.binarize(torch.tensor(a), "otsu")
    assert isinstance(out, torch.Tensor)
    assert out[0].sum() == 8 and out[1].sum() == 1 and out[1, 3, 3]


def test_otsu_constant_map_is_empty():
    assert not masks.binarize(np.full((5, 5), 0.3), "otsu").any()


def test_binarize_bad_method():
    with pytest.raises(ValueError, match="otsu"):
        masks.binarize(np.ones((2, 2)), method="kmeans")


# -----------------------------------------------------------------------------
# assign_labels / assign_masks

MAPS = np.array([
    [[1.0, 0.8, 0.0],
     [0.5, 0.2, 0.0],
     [0.0, 0.0, 0.0]],
    [[0.0, 0.4, 2.0],      # concept 1 has a larger raw scale: normalised to max 1 first
     [0.0, 0.2, 1.0],
     [0.0, 0.0, 0.4]],
])


def test_assign_labels_by_hand():
    # normalised: map0 unchanged, map1 = [[0, .2, 1], [0, .1, .5], [0, 0, .2]]
    labels = masks.assign_labels(MAPS, background_threshold=0.3)
    assert labels.dtype == np.int64
    assert labels.tolist() == [[1, 1, 2],
                               [1, 0, 2],
                               [0, 0, 0]]


def test_assign_labels_background_threshold():
    assert masks.assign_labels(MAPS, 0.6).tolist() == [[1, 1, 2],
                                                        [0, 0, 0],
                                                        [0, 0, 0]]
    # threshold 0: any attention wins; all-zero pixels tie with background -> background
    assert masks.assign_labels(MAPS, 0.0).tolist() == [[1, 1, 2],
                                                        [1, 1, 2],
                                                        [0, 0, 2]]
    # a pixel exactly at the threshold is background
    assert masks.assign_labels(MAPS, 0.5)[1, 0] == 0
    assert masks.assign_labels(MAPS, 1.0).tolist() == [[0] * 3] * 3


def test_assign_labels_torch_in_torch_out():
    labels = masks.assign_labels(torch.tensor(MAPS), 0.3)
    assert isinstance(labels, torch.Tensor) and labels.dtype == torch.int64
    assert labels.tolist() == masks.assign_labels(MAPS, 0.3).tolist()


def test_assign_masks_disjoint_and_consistent_with_labels():
    rng = np.random.default_rng(2)
    maps = rng.random((4, 16, 16))
    m = masks.assign_masks(maps, 0.3)
    assert m.shape == (4, 16, 16) and m.dtype == bool
    assert m.sum(0).max() <= 1  # disjoint
    labels = masks.assign_labels(maps, 0.3)
    assert np.array_equal(masks.masks_to_labels(m), labels)
    assert np.array_equal(masks.labels_to_masks(labels, 4), m)
    assert np.array_equal(m.any(0), labels > 0)


def test_labels_masks_errors():
    with pytest.raises(ValueError, match="overlap"):
        masks.masks_to_labels(np.ones((2, 3, 3), bool))
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        masks.labels_to_masks(np.array([[0, 3]]), 2)
    with pytest.raises(TypeError, match="integer"):
        masks.labels_to_masks(np.array([[0.0, 1.0]]), 2)
    with pytest.raises(ValueError, match=r"\(K, H, W\)"):
        masks.assign_labels(np.ones((3, 3)))
    with pytest.raises(ValueError, match="background_threshold"):
        masks.assign_labels(MAPS, 1.5)


def test_unary_from_maps_is_a_soft_assign_labels():
    probs = masks.unary_from_maps(MAPS, 0.3, temperature=0.1)
    assert probs.shape == (3, 3, 3)
    np.testing.assert_allclose(probs.sum(0), 1.0)
    assert np.array_equal(probs.argmax(0), masks.assign_labels(MAPS, 0.3))
    # pixel (0, 1): scores [bg .3, .8, .2] / 0.1 -> softmax
    e = np.exp(np.array([0.3, 0.8, 0.2]) / 0.1)
    np.testing.assert_allclose(probs[:, 0, 1], e / e.sum())
    t = masks.unary_from_maps(torch.tensor(MAPS), 0.3, temperature=1.0)
    assert isinstance(t, torch.Tensor) and t.shape == (3, 3, 3)
    with pytest.raises(ValueError, match="temperature"):
        masks.unary_from_maps(MAPS, temperature=0)


# -----------------------------------------------------------------------------
# iou


def test_iou_by_hand():
    pred = np.array([[1, 1, 0], [0, 0, 0]], bool)
    target = np.array([[1, 0, 0], [1, 0, 0]], bool)
    assert masks.iou(pred, target) == pytest.approx(1 / 3)   # 1 shared pixel, 3 in the union
    assert masks.iou(pred, pred) == 1.0
    assert masks.iou(pred, ~pred) == 0.0
    empty = np.zeros((2, 3), bool)
    assert masks.iou(empty, empty) == 1.0                     # defined: two empty masks agree
    assert masks.iou(empty, target) == 0.0


def test_iou_batched_keeps_kind():
    pred = np.array([[[1, 1], [0, 0]], [[0, 0], [0, 0]], [[1, 1], [1, 1]]], bool)
    target = np.array([[[1, 0], [0, 0]], [[0, 0], [0, 0]], [[0, 0], [0, 1]]], bool)
    out = masks.iou(pred, target)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, [0.5, 1.0, 0.25])
    out = masks.iou(torch.tensor(pred), torch.tensor(target))
    assert isinstance(out, torch.Tensor)
    assert torch.allclose(out, torch.tensor([0.5, 1.0, 0.25], dtype=torch.float64))


def test_iou_bad_input():
    with pytest.raises(TypeError, match="bool"):
        masks.iou(np.ones((2, 2)), np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="same shape"):
        masks.iou(np.ones((2, 2), bool), np.ones((2, 3), bool))


# -----------------------------------------------------------------------------
# resizing


def test_resize_mask_nearest_and_area():
    m = np.array([[1, 0], [0, 1]], bool)
    assert np.array_equal(masks.resize_mask(m, 4), np.kron(m, np.ones((2, 2), bool)))
    big = np.zeros((4, 4), bool)
    big[:2, :2] = True      # block fully set -> set
    big[2, 2] = True        # 1/4 of a block -> not set
    big[0, 2:] = True       # 2/4 of a block -> not set (needs more than half)
    big[2:, 0] = True
    big[3, 1] = True        # 3/4 of a block -> set
    assert masks.resize_mask(big, (2, 2), mode="area").tolist() == [[True, False], [True, False]]
    out = masks.resize_mask(torch.tensor(m), (3, 5))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bool and out.shape == (3, 5)


def test_resize_map_bilinear():
    a = np.array([[0.0, 1.0], [0.0, 1.0]])
    out = masks.resize_map(a, (2, 4))  # output centres at source x = -.25, .25, .75, 1.25
    np.testing.assert_allclose(out, [[0, 0.25, 0.75, 1]] * 2)
    c = torch.full((3, 8, 8), 0.7, dtype=torch.float64)
    out = masks.resize_map(c, 4)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 4, 4) and out.dtype == torch.float64
    assert torch.allclose(out, torch.full_like(out, 0.7))


def test_resize_bad_input():
    with pytest.raises(TypeError, match="bool"):
        masks.resize_mask(np.ones((2, 2)), 4)
    with pytest.raises(TypeError, match="resize_mask"):
        masks.resize_map(np.ones((2, 2), bool), 4)
    with pytest.raises(ValueError, match="size"):
        masks.resize_map(np.ones((2, 2)), (0, 3))
    with pytest.raises(ValueError, match="mode"):
        masks.resize_mask(np.ones((2, 2), bool), 4, mode="bicubic")
