"""The two losses of the M-step (the paper's Eq. 3 and Eq. 4).

Their scales: ``docs/cheatsheet.md``.

    masked_diffusion_loss   || M_s * (eps - eps_theta(z_t, t, prompt_s)) ||^2
    cross_attention_loss    sum_i || A_i / max(A_i) - M_i ||^2   (averaged, see below)
    concept_attention_maps  A_i of the concept tokens out of an AttentionStore, in the graph

Written as plain tensor code so a notebook can re-derive each one in three lines:

    m = mask.any(1, keepdim=True).float()                 # union of the concepts in s
    m = F.interpolate(m, size=pred.shape[-2:], mode="nearest-exact")
    loss = ((pred - target) * m).pow(2).mean()            # normalize="all"
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _as_float_mask(mask: torch.Tensor) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        mask = torch.as_tensor(mask)
    return mask.float() if mask.dtype == torch.bool or not mask.is_floating_point() else mask


def union_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pixel-wise max over the K concepts.

    Args:
        mask: (B, K, H, W) bool/float.

    Returns:
        (B, 1, H, W) float.
    """
    m = _as_float_mask(mask)
    return m.amax(1, keepdim=True)


def masked_diffusion_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                          normalize: str = "all") -> torch.Tensor:
    """Masked denoising loss ``|| M * (pred - target) ||^2`` (a scalar).

    A float mask enters squared (the mask multiplies the error before squaring, as in the
    formula and in Break-a-Scene's code); for a binary mask this makes no difference.

    Args:
        pred: (B, C, h, w) the U-Net's prediction.
        target: (B, C, h, w) its target (the noise for epsilon-prediction).
        mask: (B, 1 or K, H, W) bool or float, at any resolution (image or latent);
            (B, H, W) is read as (B, 1, H, W). The union (max) over the K rows is
            resized to (h, w) by nearest neighbour at pixel centres
            (``nearest-exact``: a latent pixel takes the mask value at its centre).
        normalize: ``"all"`` (Break-a-Scene): mean over all B*C*h*w elements, so a small
            mask gives a small loss; ``"mask"``: sum / (C * sum of the mask), the mean
            squared error inside the mask (0 when every mask is empty).

    Returns:
        The loss, a scalar tensor.

    Raises:
        ValueError: ``pred`` and ``target`` differ in shape or are not 4-D, ``mask`` is not
            (B, K, H, W) with the batch size of ``pred``, or ``normalize`` is unknown.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    if pred.ndim != 4:
        raise ValueError(f"pred must be (B, C, h, w), got shape {tuple(pred.shape)}")
    if not isinstance(mask, torch.Tensor):
        mask = torch.as_tensor(mask)
    if mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4 or mask.shape[0] != pred.shape[0]:
        raise ValueError(f"mask must be (B, K, H, W) with B={pred.shape[0]} like pred "
                         f"{tuple(pred.shape)}, got shape {tuple(mask.shape)}")
    if normalize not in ("all", "mask"):
        raise ValueError(f"normalize must be 'all' or 'mask', got {normalize!r}")
    m = union_mask(mask).to(pred.device)
    if m.shape[-2:] != pred.shape[-2:]:
        m = F.interpolate(m, size=tuple(pred.shape[-2:]), mode="nearest-exact")
    err = ((pred.float() - target.float()) * m).pow(2)
    if normalize == "all":
        return err.mean()
    area = m.sum() * pred.shape[1]
    return err.sum() / area.clamp_min(1e-8)


def resize_soft_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """Resizes masks by area averaging: the fraction of each output pixel that the mask covers.

    Upsampling falls back to nearest-exact.

    Args:
        mask: (..., H, W) bool/float.
        size: int or (h, w).

    Returns:
        (..., h, w) float.
    """
    m = _as_float_mask(mask)
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(m.shape[-2:]) == size:
        return m
    lead, (H, W) = m.shape[:-2], m.shape[-2:]
    flat = m.reshape(-1, 1, H, W)
    mode = "area" if size[0] <= H and size[1] <= W else "nearest-exact"
    return F.interpolate(flat, size=size, mode=mode).reshape(*lead, *size)


def cross_attention_loss(maps: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor = None,
                         reduction: str = "mean", eps: float = 1e-8,
                         target: str = "max") -> torch.Tensor:
    """Attention loss: MSE between each concept's max-normalised map and its mask.

    Per concept (target "max"): ``mean_pixels((A / max(A) - M)^2)``.

    Args:
        maps: (B, K, h, w) non-negative attention of the K concept tokens.
        masks: (B, K, H, W) bool or float masks of the same concepts, any resolution; each
            is resized to (h, w) by AREA averaging and kept as a soft float target (edge
            pixels get the covered fraction; no binarisation). Break-a-Scene's code
            resizes with nearest neighbour, i.e. a binary target.
        valid: optional (B, K) bool: which concepts are named in each sample's prompt;
            the others are left out.
        reduction: ``"mean"``: average of the per-concept MSEs over the valid (sample,
            concept) pairs; ``"sum"``: sum over concepts, mean over the batch (the paper's
            Eq. 4 and Break-a-Scene's code).
        eps: floor of a map's maximum before dividing by it (target "max").
        target: ``"max"``: the map divided by its maximum (the paper's Eq. 4). The loss is
            then blind to the map's scale: a token that receives almost none of a pixel's
            attention (softmax share ~0.001) but in the right shape pays nothing.
            ``"raw"``: the softmax shares themselves, ``mean_pixels((A - M)^2)``: inside
            its mask a token is pushed to take the attention from the other prompt tokens
            (for tokens that start from one shared word, where one of them takes most of
            the attention; ``benchmarks/results/PRESETS.md``). Its gradient vanishes
            where a share is already near 0 (softmax saturation).
            ``"bce"``: per-pixel binary cross-entropy of the shares against the mask,
            ``-mean_pixels(M log A + (1 - M) log(1 - A))``, whose gradient does not
            vanish for a token that has lost its attention (the grounding loss the
            bundled model was trained with uses the same term).

    Returns:
        A scalar (0 if nothing is valid), differentiable w.r.t. ``maps``.

    Raises:
        ValueError: ``maps``, ``masks`` or ``valid`` has the wrong shape, or
            ``reduction`` or ``target`` is unknown.
    """
    if maps.ndim != 4:
        raise ValueError(f"maps must be (B, K, h, w), got shape {tuple(maps.shape)}")
    if not isinstance(masks, torch.Tensor):
        masks = torch.as_tensor(masks)
    if masks.ndim != 4 or masks.shape[:2] != maps.shape[:2]:
        raise ValueError(f"masks must be (B, K, H, W) with (B, K) = {tuple(maps.shape[:2])} "
                         f"like maps {tuple(maps.shape)}, got shape {tuple(masks.shape)}")
    B, K = maps.shape[:2]
    if valid is None:
        valid = torch.ones(B, K, dtype=torch.bool, device=maps.device)
    else:
        valid = torch.as_tensor(valid, dtype=torch.bool, device=maps.device)
        if valid.shape != (B, K):
            raise ValueError(f"valid must be (B, K) = {(B, K)}, got shape {tuple(valid.shape)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if target not in ("max", "raw", "bce"):
        raise ValueError(f"target must be 'max', 'raw' or 'bce', got {target!r}")
    a = maps.float()
    if target == "max":
        a = a / a.amax(dim=(-2, -1), keepdim=True).clamp_min(eps)
    m = resize_soft_mask(masks, a.shape[-2:]).to(a.device)
    if target == "bce":
        a = a.clamp(1e-6, 1 - 1e-6)
        per = -(m * a.log() + (1 - m) * (1 - a).log()).mean(dim=(-2, -1))
    else:
        per = (a - m).pow(2).mean(dim=(-2, -1))  # (B, K)
    w = valid.float()
    if reduction == "mean":
        return (per * w).sum() / w.sum().clamp_min(1.0)
    return (per * w).sum() / B


def concept_attention_maps(store, token_indices, layers=None, resolution: int | None = None,
                           call: int = -1) -> torch.Tensor:
    """Attention maps of the concept tokens from an `conceptlab.attention.AttentionStore`.

    Args:
        store: recorded with ``keep_graph=True`` to train through the maps.
        token_indices: (B, K) ints: position of concept k's token in sample b's prompt, or
            -1 where concept k is not in that prompt (its map is all zeros).
        layers: layer names to average (default: every recorded layer).
        resolution: common side the layers are resized to (bilinear; default: the largest
            recorded among ``layers``).
        call: which U-Net call (default the last one; None averages all calls).

    Returns:
        (B, K, h, w): averaged over heads and layers, still in the autograd graph.

    Raises:
        ValueError: ``token_indices`` is not (B, K) with the store's batch size, or an
            index is outside the prompt length.
        KeyError: none of ``layers`` was recorded.
    """
    idx = torch.as_tensor(token_indices, dtype=torch.long)
    if idx.ndim != 2:
        raise ValueError(f"token_indices must be (B, K), got shape {tuple(idx.shape)}")
    a = store.stacked(layers, call=call, resolution=resolution)  # (B, h, w, T)
    if a.shape[0] != idx.shape[0]:
        raise ValueError(f"token_indices has {idx.shape[0]} rows but the store holds a batch "
                         f"of {a.shape[0]}")
    T = a.shape[-1]
    if int(idx.max()) >= T:
        raise ValueError(f"token index {int(idx.max())} outside the prompt length {T}")
    idx = idx.to(a.device)
    a = a.permute(0, 3, 1, 2)  # (B, T, h, w)
    g = torch.gather(a, 1, idx.clamp_min(0)[:, :, None, None].expand(-1, -1, *a.shape[-2:]))
    return g * (idx >= 0)[:, :, None, None].to(g.dtype)


def embedding_norm_penalty(rows: torch.Tensor, reference_norm: float) -> torch.Tensor:
    """``mean_k relu(|v_k| / ref - 1)^2``: penalises rows whose norm exceeds ``ref``.

    ``ref`` is the vocabulary's mean norm: learned tokens tend to grow to 2.5-4x it and then
    override the rest of the prompt. Scale-free, so one weight fits every model.

    Args:
        rows: (K, D) concept embeddings.
        reference_norm: ``ref``, the vocabulary's mean embedding norm.

    Returns:
        The penalty, a scalar tensor.
    """
    n = rows.float().norm(dim=-1) / max(float(reference_norm), 1e-8)
    return F.relu(n - 1).pow(2).mean()


__all__ = [
    "concept_attention_maps",
    "cross_attention_loss",
    "embedding_norm_penalty",
    "masked_diffusion_loss",
    "resize_soft_mask",
    "union_mask",
]
