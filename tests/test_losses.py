"""Losses of the M-step, checked against numbers computed by hand."""

import math

import pytest
import torch

from conceptlab.attention import AttentionStore
from conceptlab.losses import (
    concept_attention_maps,
    cross_attention_loss,
    embedding_norm_penalty,
    masked_diffusion_loss,
    resize_soft_mask,
)
from conceptlab.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


PRED = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2)
ZERO = torch.zeros(1, 1, 2, 2)
DIAG = torch.tensor([[[[True, False], [False, True]]]])


# ----------------------------------------------------------------------------- diffusion loss
def test_masked_diffusion_loss_by_hand():
    # errors 1, 2, 3, 4; the mask keeps 1 and 4: squared 1 + 16 = 17
    assert masked_diffusion_loss(PRED, ZERO, DIAG).item() == pytest.approx(17 / 4)
    assert masked_diffusion_loss(PRED, ZERO, DIAG, normalize="mask").item() == pytest.approx(17 / 2)
    # float mask 0.5 everywhere: (0.5 * e)^2 = e^2 / 4 -> (1 + 4 + 9 + 16) / 4 / 4
    half = torch.full((1, 1, 2, 2), 0.5)
    assert masked_diffusion_loss(PRED, ZERO, half).item() == pytest.approx(30 / 16)


def test_masked_diffusion_loss_union_and_resize():
    # two concept rows whose union is the diagonal, given at 4x4 (nearest at pixel centres)
    m = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    m[0, 0, :2, :2] = True
    m[0, 1, 2:, 2:] = True
    assert masked_diffusion_loss(PRED, ZERO, m).item() == pytest.approx(17 / 4)
    # (B, H, W) is read as one mask per sample
    assert masked_diffusion_loss(PRED, ZERO, DIAG[:, 0]).item() == pytest.approx(17 / 4)


def test_masked_diffusion_loss_channels_and_batch():
    pred = torch.zeros(2, 2, 2, 2)
    pred[0] = 1.0            # sample 0: error 1 everywhere
    pred[1] = 2.0            # sample 1: error 2 everywhere
    mask = torch.zeros(2, 1, 2, 2)
    mask[0, 0, 0, 0] = 1     # one pixel of sample 0: 2 channels * 1
    mask[1, 0, 1] = 1        # two pixels of sample 1: 2 channels * 2 * 4
    target = torch.zeros_like(pred)
    assert masked_diffusion_loss(pred, target, mask).item() == pytest.approx(18 / 16)
    assert masked_diffusion_loss(pred, target, mask, "mask").item() == pytest.approx(18 / 6)


def test_masked_diffusion_loss_empty_mask_and_gradient():
    pred = PRED.clone().requires_grad_(True)
    loss = masked_diffusion_loss(pred, ZERO, torch.zeros(1, 1, 2, 2), normalize="mask")
    assert loss.item() == 0.0
    loss = masked_diffusion_loss(pred, ZERO, DIAG)
    loss.backward()
    # d/dp mean(m p^2) = 2 m p / 4
    assert torch.allclose(pred.grad, torch.tensor([[[[0.5, 0.0], [0.0, 2.0]]]]))


def test_masked_diffusion_loss_shape_errors():
    with pytest.raises(ValueError, match=r"\(1, 1, 2, 2\).*\(1, 1, 3, 3\)"):
        masked_diffusion_loss(PRED, torch.zeros(1, 1, 3, 3), DIAG)
    with pytest.raises(ValueError, match=r"B=1.*\(2, 1, 2, 2\)"):
        masked_diffusion_loss(PRED, ZERO, torch.ones(2, 1, 2, 2))
    with pytest.raises(ValueError, match="normalize"):
        masked_diffusion_loss(PRED, ZERO, DIAG, normalize="area")


# ----------------------------------------------------------------------------- attention loss
def test_cross_attention_loss_by_hand():
    maps = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]])       # / max -> [[0, .25], [.5, 1]]
    mask = torch.tensor([[[[False, False], [True, True]]]])
    # differences 0, .25, -.5, 0 -> (0 + .0625 + .25 + 0) / 4
    assert cross_attention_loss(maps, mask).item() == pytest.approx(0.078125)
    # the scale of the map does not matter (it is divided by its max)
    assert cross_attention_loss(maps * 7, mask).item() == pytest.approx(0.078125)


def test_cross_attention_loss_raw_target_sees_the_scale():
    shares = torch.tensor([[[[0.0, 0.1], [0.2, 0.4]]]])     # softmax shares, max 0.4
    mask = torch.tensor([[[[False, False], [True, True]]]])
    # differences 0, .1, -.8, -.6 -> (0 + .01 + .64 + .36) / 4
    assert cross_attention_loss(shares, mask, target="raw").item() == pytest.approx(0.2525)
    # the same shape at a tenth of the share costs more under "raw", the same under "max"
    assert cross_attention_loss(shares / 10, mask, target="raw").item() > 0.2525
    assert cross_attention_loss(shares / 10, mask).item() == pytest.approx(
        cross_attention_loss(shares, mask).item())
    # BCE: -(log(1 - 0) + log(1 - .1) + log .2 + log .4) / 4 (the 0 clamped to 1e-6)
    bce = -(math.log(1 - 1e-6) + math.log(0.9) + math.log(0.2) + math.log(0.4)) / 4
    assert cross_attention_loss(shares, mask, target="bce").item() == pytest.approx(bce, rel=1e-5)
    # a token that lost its attention inside its mask gets a strong pull back under "bce"
    # (d/dA = -1 / (4 A)); under "raw" the pull is at most 2 / 4
    lost = (shares / 1000).requires_grad_()
    cross_attention_loss(lost, mask, target="bce").backward()
    assert lost.grad[0, 0, 1].abs().min() > 100
    with pytest.raises(ValueError, match="target"):
        cross_attention_loss(shares, mask, target="sum")
    with pytest.raises(ValueError, match="attn_target"):
        TrainConfig(attn_target="mass")


def test_cross_attention_loss_area_resized_soft_target():
    maps = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]])
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[0, 0, 2:] = True           # bottom half
    mask[0, 0, 0, 3] = True         # 1 of the 4 pixels of the top-right block
    assert torch.allclose(resize_soft_mask(mask, 2), torch.tensor([[[[0, .25], [1, 1]]]]))
    # differences 0, 0, -.5, 0
    assert cross_attention_loss(maps, mask).item() == pytest.approx(0.0625)


def test_cross_attention_loss_valid_and_reduction():
    maps = torch.ones(1, 2, 2, 2)                            # normalised: all ones
    masks = torch.zeros(1, 2, 2, 2)
    masks[0, 0, 0] = 1                                       # concept 0: MSE 2/4
    masks[0, 1] = 1                                          # concept 1: MSE 0
    assert cross_attention_loss(maps, masks).item() == pytest.approx(0.25)
    assert cross_attention_loss(maps, masks, reduction="sum").item() == pytest.approx(0.5)
    only0 = torch.tensor([[True, False]])
    assert cross_attention_loss(maps, masks, only0).item() == pytest.approx(0.5)
    none = torch.tensor([[False, False]])
    assert cross_attention_loss(maps, masks, none).item() == 0.0


def test_cross_attention_loss_gradient_and_errors():
    maps = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], requires_grad=True)
    cross_attention_loss(maps, torch.ones(1, 1, 2, 2)).backward()
    assert maps.grad is not None and maps.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\(1, 1\).*\(1, 2, 2, 2\)"):
        cross_attention_loss(maps.detach(), torch.ones(1, 2, 2, 2))
    with pytest.raises(ValueError, match=r"maps must be \(B, K, h, w\)"):
        cross_attention_loss(torch.ones(2, 2), torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match="valid"):
        cross_attention_loss(maps.detach(), torch.ones(1, 1, 2, 2), torch.ones(2, 1).bool())


# ----------------------------------------------------------------------------- maps from a store
def _store():
    """A store with one layer: batch 1, 2 heads, 2x2 pixels, 3 tokens."""
    st = AttentionStore(keep_graph=True)
    probs = torch.zeros(2, 4, 3)              # (batch * heads, pixels, tokens)
    probs[0, :, 1] = torch.tensor([1.0, 0.0, 0.0, 0.0])   # head 0, token 1
    probs[1, :, 1] = torch.tensor([0.0, 1.0, 0.0, 0.0])   # head 1, token 1
    probs[:, :, 2] = 0.5                                   # token 2 everywhere, both heads
    probs.requires_grad_(True)
    st.add("layer", probs, batch=1, heads=2)
    return st, probs


def test_concept_attention_maps_gathers_tokens_and_averages_heads():
    st, probs = _store()
    maps = concept_attention_maps(st, [[1, -1, 2]])          # concept 1 not in the prompt
    assert maps.shape == (1, 3, 2, 2)
    assert torch.allclose(maps[0, 0], torch.tensor([[0.5, 0.5], [0.0, 0.0]]))
    assert torch.equal(maps[0, 1], torch.zeros(2, 2))
    assert torch.allclose(maps[0, 2], torch.full((2, 2), 0.5))
    maps.sum().backward()                                     # still in the graph
    assert probs.grad is not None
    with pytest.raises(ValueError, match="outside the prompt length 3"):
        concept_attention_maps(st, [[5]])
    with pytest.raises(ValueError, match="batch of 1"):
        concept_attention_maps(st, [[1], [1]])


def test_embedding_norm_penalty():
    rows = torch.tensor([[2.0, 0.0], [0.0, 0.5]])             # norms 2 and 0.5, reference 1
    assert embedding_norm_penalty(rows, 1.0).item() == pytest.approx(0.5)
