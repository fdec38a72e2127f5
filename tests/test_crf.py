"""Tests for conceptlab.crf: the exact torch DenseCRF against pydensecrf on
synthetic scenes, plus hand-checkable pieces of mean-field inference."""

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter
from scipy.ndimage import shift as nd_shift

from conceptlab import crf, masks

HAS_PYDENSECRF = crf.crf_backend("auto") == "pydensecrf"
needs_pydensecrf = pytest.mark.skipif(not HAS_PYDENSECRF, reason="pydensecrf2 not installed")


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

# -----------------------------------------------------------------------------
# synthetic scenes: coloured shapes on a plain or striped background, 64 x 64

SCENES = {
    #  name: (background colour, stripe colour or None, [(shape, centre, colour)], image noise std)
    "plain": ((128, 128, 128), None,
              [("circle", (18, 20), (220, 40, 40)), ("square", (46, 22), (40, 60, 220)),
               ("triangle", (32, 46), (40, 200, 60))], 6),
    "striped": ((230, 230, 210), (90, 110, 160),
                [("circle", (20, 44), (250, 210, 30)), ("square", (44, 20), (150, 40, 150)),
                 ("triangle", (44, 46), (30, 200, 210))], 6),
    "touching": ((30, 30, 40), None,   # the square overlaps the circle: a shared boundary
                 [("circle", (24, 28), (200, 120, 60)), ("square", (42, 36), (90, 200, 120))], 8),
    "dark_stripes": ((20, 20, 20), (70, 70, 70),
                     [("triangle", (20, 22), (230, 230, 230)), ("circle", (44, 42), (200, 60, 120)),
                      ("square", (20, 48), (60, 160, 240))], 10),
    "low_contrast": ((120, 120, 120), (140, 130, 120),  # shapes only ~40 levels off, noisy
                     [("circle", (20, 22), (170, 140, 110)), ("square", (42, 40), (95, 110, 150))],
                     12),
}


def make_scene(name, size=64):
    """-> image (H, W, 3) uint8, ground-truth masks (K, H, W) bool (disjoint, later on top)."""
    bg, stripe, shapes, noise = SCENES[name]
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    if stripe is not None:
        for x0 in range(0, size, 8):
            draw.rectangle([x0, 0, x0 + 3, size - 1], fill=stripe)
    gts = []
    for shape, (cx, cy), colour in shapes:
        m = Image.new("L", (size, size), 0)
        for d, fill in [(draw, colour), (ImageDraw.Draw(m), 255)]:
            if shape == "circle":
                d.ellipse([cx - 10, cy - 10, cx + 10, cy + 10], fill=fill)
            elif shape == "square":
                d.rectangle([cx - 9, cy - 9, cx + 9, cy + 9], fill=fill)
            else:
                d.polygon([(cx, cy - 11), (cx - 12, cy + 9), (cx + 12, cy + 9)], fill=fill)
        gts.append(np.asarray(m) > 127)
    gts = np.array(gts)
    for k in range(len(gts)):          # a later shape hides what is under it
        gts[k] &= ~gts[k + 1:].any(0)
    rng = np.random.default_rng(len(name))
    image = np.asarray(img).astype(float) + noise * rng.standard_normal((size, size, 3))
    return np.clip(image, 0, 255).round().astype(np.uint8), gts


def fake_attention(gts, seed):
    """Attention-like maps from ground truth: shifted 2 px, blurred, noisy. (K, H, W)"""
    rng = np.random.default_rng(seed)
    maps = []
    for g in gts:
        a = nd_shift(g.astype(float), rng.choice([-2, 2], size=2), order=0)
        maps.append(gaussian_filter(a, 3.0) + 0.15 * rng.random(g.shape))
    return np.array(maps)


@pytest.fixture(scope="module")
def scene_results():
    """Run both backends once per scene (shared by the tests below)."""
    out = {}
    for i, name in enumerate(SCENES):
        image, gts = make_scene(name)
        maps = fake_attention(gts, seed=i)
        probs = masks.unary_from_maps(maps, background_threshold=0.3)
        out[name] = {
            "gts": gts,
            "before": masks.assign_labels(maps, background_threshold=0.3),
            "torch": crf.dense_crf(image, probs, backend="torch").labels,
            "pydensecrf": (crf.dense_crf(image, probs, backend="pydensecrf").labels
                           if HAS_PYDENSECRF else None),
        }
    return out


@needs_pydensecrf
def test_torch_and_pydensecrf_agree(scene_results):
    for name, r in scene_results.items():
        for k in range(len(r["gts"])):
            agreement = masks.iou(r["torch"] == k + 1, r["pydensecrf"] == k + 1)
            assert agreement >= 0.95, f"{name}, concept {k}: IoU(torch, pydensecrf) {agreement:.3f}"


@needs_pydensecrf
@pytest.mark.parametrize("name", list(SCENES))
def test_torch_matches_pydensecrf_marginals(name):
    # soft unaries and weak pairwise terms keep Q away from 0/1, so this compares
    # the numbers themselves (kernel widths, normalisation, Potts sign), not just labels
    image, gts = make_scene(name)
    image = np.ascontiguousarray(image[::2, ::2])                     # 32 x 32: fast
    probs = masks.unary_from_maps(fake_attention(gts, seed=0)[:, ::2, ::2], temperature=0.5)
    params = {"compat_gaussian": 1.0, "compat_bilateral": 2.0, "sxy_bilateral": 8.0}
    q_torch = crf.dense_crf_torch(image, probs, **params).numpy()
    q_ref = crf.dense_crf_pydensecrf(image, probs, **params)
    assert np.abs(q_ref - probs).mean() > 0.1                         # the CRF did move Q ...
    assert np.abs(q_torch - q_ref).mean() < 0.01                      # ... and both moved it alike
    assert np.abs(q_torch - q_ref).max() < 0.1                        # (lattice is approximate)


@pytest.mark.parametrize("backend", ["torch", "pydensecrf"])
def test_crf_improves_masks_over_attention_argmax(scene_results, backend):
    if backend == "pydensecrf" and not HAS_PYDENSECRF:
        pytest.skip("pydensecrf2 not installed")
    before, after = [], []
    for r in scene_results.values():
        for k, gt in enumerate(r["gts"]):
            before.append(masks.iou(r["before"] == k + 1, gt))
            after.append(masks.iou(r[backend] == k + 1, gt))
    # blurred, shifted maps give ~0.65 IoU; snapping to colour edges recovers most of the shapes
    assert np.mean(after) >= np.mean(before) + 0.15, (np.mean(before), np.mean(after))
    assert np.mean(after) >= 0.85
    assert np.mean(np.array(after) > np.array(before)) >= 0.8   # better on (nearly) every concept


# -----------------------------------------------------------------------------
# the pieces, by hand


def test_mean_field_step_by_hand():
    # 2 pixels that see only each other, 2 labels, Potts weight 2, zero unary
    K = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    Q = torch.tensor([[1.0, 0.5],    # label 0: pixel 0 certain, pixel 1 undecided
                      [0.0, 0.5]])   # label 1
    U = torch.zeros(2, 2)
    new = crf.mean_field_step(U, Q, [K], [2.0])
    # messages Q @ K = [[.5, 1], [.5, 0]]; pairwise(l) = 2 * message(other label) = [[1, 0], [1, 2]]
    expected = torch.tensor([[0.5, 1 / (1 + math.exp(-2))],
                             [0.5, math.exp(-2) / (1 + math.exp(-2))]])
    assert torch.allclose(new, expected, atol=1e-6)
    # pydensecrf's form softmax(-U + w K Q) (Potts matrix -w I) gives the same Q
    assert torch.allclose(new, torch.softmax(-U + 2.0 * (Q @ K), dim=0), atol=1e-6)
    # and an explicit (L, L) compatibility matrix equals the number
    assert torch.allclose(new, crf.mean_field_step(U, Q, [K], [crf.potts(2.0, 2)]))
    # numpy in -> numpy out; (L, H, W) shapes are flattened and restored
    new_np = crf.mean_field_step(U.numpy().reshape(2, 1, 2), Q.numpy().reshape(2, 1, 2), [K], [2.0])
    assert isinstance(new_np, np.ndarray) and new_np.shape == (2, 1, 2)
    np.testing.assert_allclose(new_np.reshape(2, 2), expected.numpy(), atol=1e-6)


def test_pairwise_kernels_by_hand():
    image = np.zeros((2, 3, 3), np.uint8)
    image[0, 1] = (13, 0, 0)             # pixel n=1 (y=0, x=1) differs by 13 in red
    Kg, Kb = crf.pairwise_kernels(image, sxy_gaussian=2.0, sxy_bilateral=4.0, srgb=13.0,
                                  normalize=False)
    assert Kg.shape == Kb.shape == (6, 6)
    # pixel 0 = (0, 0), pixel 5 = (y=1, x=2): squared distance 5
    assert Kg[0, 5].item() == pytest.approx(math.exp(-5 / (2 * 2.0 ** 2)), rel=1e-5)
    expected = math.exp(-1 / (2 * 4.0 ** 2) - 13 ** 2 / (2 * 13.0 ** 2))   # 1 px apart, 13 levels
    assert Kb[0, 1].item() == pytest.approx(expected, rel=1e-5)
    assert Kb[0, 3].item() == pytest.approx(math.exp(-1 / (2 * 4.0 ** 2)), rel=1e-5)
    assert torch.allclose(torch.diagonal(Kg), torch.ones(6))   # self-connection kept, as pydensecrf
    # symmetric normalisation D^-1/2 K D^-1/2
    Kgn, Kbn = crf.pairwise_kernels(image, 2.0, 4.0, 13.0)
    d = Kb.sum(1)
    assert torch.allclose(Kbn, Kb / torch.sqrt(d[:, None] * d[None, :]), atol=1e-6)
    assert torch.allclose(Kgn, Kgn.T, atol=1e-7)


def test_zero_iterations_return_the_input_probs():
    image, _ = small_problem()
    probs = masks.unary_from_maps(np.random.default_rng(0).random((2, 16, 16)), temperature=0.5)
    q = crf.dense_crf_torch(image, probs, n_iters=0)
    assert isinstance(q, torch.Tensor)
    assert torch.allclose(q, torch.from_numpy(probs).float(), atol=1e-6)   # softmax(-(-log P)) = P
    if HAS_PYDENSECRF:
        q = crf.dense_crf_pydensecrf(image, probs, n_iters=0)
        np.testing.assert_allclose(q, probs, atol=1e-6)


# -----------------------------------------------------------------------------
# dense_crf / refine_masks: backends, kinds, errors


def small_problem(size=16):
    image, gts = make_scene("plain", size=64)
    image = np.ascontiguousarray(image[::4, ::4])
    maps = masks.resize_map(fake_attention(gts, seed=0), size)
    return image, masks.unary_from_maps(maps)


def test_dense_crf_reports_backend_and_keeps_kind():
    image, probs = small_problem()
    auto = crf.dense_crf(image, probs)
    assert auto.backend == crf.crf_backend("auto") == ("pydensecrf" if HAS_PYDENSECRF else "torch")
    res = crf.dense_crf(image, probs, backend="torch", n_iters=3)
    assert res.backend == "torch"
    assert isinstance(res.probs, np.ndarray) and res.probs.shape == probs.shape
    np.testing.assert_allclose(res.probs.sum(0), 1.0, atol=1e-5)
    assert res.labels.dtype == np.int64 and np.array_equal(res.labels, res.probs.argmax(0))
    res = crf.dense_crf(Image.fromarray(image), torch.from_numpy(probs), backend="torch")
    assert isinstance(res.probs, torch.Tensor) and res.probs.dtype == torch.float64
    assert isinstance(res.labels, torch.Tensor)
    if HAS_PYDENSECRF:
        res = crf.dense_crf(torch.from_numpy(image), torch.from_numpy(probs).float(),
                            backend="pydensecrf")
        assert res.backend == "pydensecrf" and isinstance(res.probs, torch.Tensor)


def test_auto_falls_back_to_torch_without_pydensecrf(monkeypatch):
    def missing():
        raise ImportError("no pydensecrf")
    monkeypatch.setattr(crf, "_import_pydensecrf", missing)
    assert crf.crf_backend("auto") == "torch"
    image, probs = small_problem()
    assert crf.dense_crf(image, probs, n_iters=1).backend == "torch"
    with pytest.raises(ImportError):
        crf.dense_crf(image, probs, backend="pydensecrf")


def test_refine_masks_from_low_res_maps():
    image, gts = make_scene("striped")
    maps = masks.resize_map(fake_attention(gts, seed=1), 16)        # attention maps are low-res
    refined = crf.refine_masks(image, maps)                          # upsampled to 64 x 64 inside
    assert isinstance(refined, np.ndarray) and refined.dtype == bool and refined.shape == gts.shape
    assert refined.sum(0).max() <= 1                                 # disjoint
    assert np.mean(masks.iou(refined, gts)) >= 0.85


def test_refine_masks_maps_and_probs_agree():
    image, probs = small_problem()
    maps = probs[1:] * 3.0   # any (K, H, W) maps: their probs are unary_from_maps(maps)
    a = crf.refine_masks(image, torch.from_numpy(maps), backend="torch")
    b = crf.refine_masks(image, masks.unary_from_maps(maps), kind="probs", backend="torch")
    assert isinstance(a, torch.Tensor) and isinstance(b, np.ndarray)
    assert a.shape == (3, 16, 16) and np.array_equal(a.numpy(), b)
    labels = crf.dense_crf(image, masks.unary_from_maps(maps), backend="torch").labels
    assert np.array_equal(b, masks.labels_to_masks(labels, 3))     # masks[k] = labels == k + 1


def test_clear_errors():
    image, probs = small_problem()
    with pytest.raises(ValueError, match="spatial size"):
        crf.dense_crf(image, probs[:, :8, :8])
    with pytest.raises(ValueError, match="sum to 1"):
        crf.dense_crf(image, probs * 2)
    with pytest.raises(ValueError, match=r"\(L, H, W\)"):
        crf.dense_crf(image, probs[0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):   # floats must be in [0, 1] ...
        crf.dense_crf(image * 2.0, probs)
    np.testing.assert_array_equal(crf.dense_crf(image / 255.0, probs).labels,  # ... x 255
                                  crf.dense_crf(image, probs).labels)
    with pytest.raises(ValueError, match="channel-first"):
        crf.dense_crf(image.transpose(2, 0, 1), probs)
    with pytest.raises(ValueError, match="backend"):
        crf.dense_crf(image, probs, backend="cuda")
    with pytest.raises(TypeError, match="unknown CRF parameter"):
        crf.dense_crf(image, probs, sxy=3)
    with pytest.raises(ValueError, match="sxy_bilateral"):
        crf.dense_crf(image, probs, sxy_bilateral=0)
    with pytest.raises(ValueError, match="kind"):
        crf.refine_masks(image, probs, kind="logits")
    big = np.zeros((129, 129, 3), np.uint8)
    big_probs = np.full((2, 129, 129), 0.5)
    with pytest.raises(ValueError, match="pydensecrf"):
        crf.dense_crf(big, big_probs, backend="torch")


def test_read_only_image_is_accepted():
    """np.asarray(PIL image) is read-only; pydensecrf needs a writeable buffer."""
    from conceptlab import crf
    img = np.zeros((16, 16, 3), np.uint8)
    img[4:12, 4:12] = 200
    img.setflags(write=False)
    probs = np.full((2, 16, 16), 0.5, np.float32)
    res = crf.dense_crf(img, probs)
    assert res.labels.shape == (16, 16)
