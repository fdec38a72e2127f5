"""Masks from cross-attention maps.

A text-to-image diffusion model gives, for every concept token k (e.g. "<cat>",
"<dog>"), a cross-attention map A_k of shape (H, W): how strongly each latent
pixel looks at that token. This module turns such soft maps into hard,
per-concept masks:

    normalize      A_k -> A_k / max A_k                     (..., H, W) float
    binarize       threshold / mean / Otsu, one map at a time  (..., H, W) bool
    assign_labels  argmax over [background, A_1 .. A_K]     (H, W) int64
    assign_masks   the same, as K disjoint masks            (K, H, W) bool
    unary_from_maps  soft version of assign_labels: label probabilities
                   (K+1, H, W) that a DenseCRF (conceptlab.crf) can refine
    iou            intersection over union of bool masks
    resize_mask / resize_map   nearest/area and bilinear resizing

Label convention (used here and in `conceptlab.crf`):

    label 0     = background
    label k + 1 = concept k   (k = 0 .. K-1, in the order of the maps)

Every function accepts a numpy array or a torch tensor and returns the same
kind (numpy in -> numpy out, torch in -> torch out) unless its docstring says
otherwise. Internally everything is computed with torch.

Why one module of about 450 lines (about half of it docstrings): every function shares the
label convention above and the numpy <-> torch plumbing.
"""

import numpy as np
import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# numpy <-> torch plumbing


def _to_torch(x, name="input"):
    """Returns (tensor, was_numpy). numpy arrays are wrapped without copying."""
    if isinstance(x, torch.Tensor):
        return x, False
    if isinstance(x, np.ndarray):
        x = np.ascontiguousarray(x)
        return torch.from_numpy(x if x.flags.writeable else x.copy()), True
    raise TypeError(
        f"{name} must be a numpy.ndarray or a torch.Tensor, got {type(x).__name__}; "
        f"wrap it with np.asarray(...) first"
    )


def _back(t, was_numpy):
    """Returns t as numpy if the caller gave numpy, else as the tensor itself."""
    return t.detach().cpu().numpy() if was_numpy else t


def _as_float(t):
    return t if t.is_floating_point() else t.to(torch.float32)


def _check_ndim(t, min_ndim, name, shape_doc):
    if t.ndim < min_ndim:
        raise ValueError(f"{name} must have shape {shape_doc}, got shape {tuple(t.shape)}")


def _check_bool(t, name):
    if t.dtype != torch.bool:
        raise TypeError(
            f"{name} must be a bool mask, got dtype {t.dtype}; "
            f"convert it with e.g. `{name} > 0.5` or masks.binarize(...)"
        )


def _size_2d(size):
    if isinstance(size, (int, np.integer)):
        size = (int(size), int(size))
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size)):
        raise ValueError(f"size must be a positive int or a pair (H, W) of positive ints, "
                         f"got {size!r}")
    return int(size[0]), int(size[1])


# -----------------------------------------------------------------------------
# normalising and binarising single maps


def normalize(attn, mode="max"):
    """Rescales every map to [0, 1], each one independently.

    Args:
        attn: (..., H, W) float; every (H, W) slice is one map.
        mode: ``"max"``: A / max(A) (needs A >= 0); ``"minmax"``:
            (A - min(A)) / (max(A) - min(A)); ``"none"``: A unchanged (maps already in
            [0, 1], e.g. E-step scores).

    Returns:
        (..., H, W) float. Degenerate maps (all zero for "max", constant for "minmax")
            come back as all zeros instead of nan.

    Raises:
        TypeError: ``attn`` is neither a numpy array nor a torch tensor.
        ValueError: ``attn`` has fewer than 2 dimensions, ``mode`` is unknown, or the
            maps break the mode's requirement (negative values for "max", values outside
            [0, 1] for "none").
    """
    a, was_numpy = _to_torch(attn, "attn")
    _check_ndim(a, 2, "attn", "(..., H, W)")
    a = _as_float(a)
    if mode == "none":
        if (a < 0).any() or (a > 1).any():
            raise ValueError("normalize(mode='none') needs maps already in [0, 1]")
        return _back(a, was_numpy)
    lo = a.amin(dim=(-2, -1), keepdim=True)
    hi = a.amax(dim=(-2, -1), keepdim=True)
    if mode == "max":
        if (lo < 0).any():
            raise ValueError("normalize(mode='max') needs non-negative maps; "
                             "use mode='minmax' for signed maps")
        out = torch.where(hi > 0, a / torch.where(hi > 0, hi, 1.0), 0.0)
    elif mode == "minmax":
        rng = hi - lo
        out = torch.where(rng > 0, (a - lo) / torch.where(rng > 0, rng, 1.0), 0.0)
    else:
        raise ValueError(f"mode must be 'max', 'minmax' or 'none', got {mode!r}")
    return _back(out, was_numpy)


def otsu_threshold(attn, bins=256):
    """Otsu's threshold (1979) of every (H, W) map, by hand.

    The values of one map are histogrammed into `bins` equal bins over
    [min, max]. Splitting after bin k gives two classes with weights w0, w1 and
    means m0, m1; Otsu picks the k that maximises the between-class variance

        sigma_b^2(k) = w0 w1 (m0 - m1)^2 = (m_T w0 - m(k))^2 / (w0 (1 - w0))

    (m(k) = cumulative first moment, m_T = overall mean); the threshold is the
    upper edge of bin k. Ties go to the smallest k (as in skimage).

    Args:
        attn: (..., H, W) float.
        bins: number of histogram bins.

    Returns:
        (...) float thresholds (a python float for a single (H, W) map). A constant map
            has no split; its threshold is its value (so `> t` is empty).

    Raises:
        TypeError: ``attn`` is neither a numpy array nor a torch tensor.
        ValueError: ``attn`` has fewer than 2 dimensions.
    """
    a, was_numpy = _to_torch(attn, "attn")
    _check_ndim(a, 2, "attn", "(..., H, W)")
    a = _as_float(a)
    lead = a.shape[:-2]
    x = a.reshape(-1, a.shape[-2] * a.shape[-1])                     # (B, N)
    lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    width = torch.where(hi > lo, hi - lo, 1.0) / bins               # (B, 1)
    idx = ((x - lo) / width).long().clamp(0, bins - 1)              # (B, N) bin of every pixel
    hist = torch.zeros(x.shape[0], bins, dtype=x.dtype, device=x.device)
    hist.scatter_add_(1, idx, torch.ones_like(x))                   # (B, bins) pixel counts
    p = hist / x.shape[1]                                           # (B, bins) probabilities
    centers = lo + width * (torch.arange(bins, dtype=x.dtype, device=x.device) + 0.5)  # (B, bins)
    w0 = p.cumsum(1)                                                # class-0 weight after bin k
    m = (p * centers).cumsum(1)                                     # cumulative first moment
    mT = m[:, -1:]
    sigma_b = (mT * w0 - m) ** 2 / (w0 * (1 - w0)).clamp_min(1e-12)
    k = sigma_b[:, :-1].argmax(dim=1, keepdim=True)                 # split after bin k (k < bins-1)
    t = lo + width * (k + 1)
    t = torch.where(hi > lo, t, hi).reshape(lead)                   # constant map: t = its value
    if t.ndim == 0:
        return float(t)
    return _back(t, was_numpy)


def binarize(attn, method="threshold", threshold=0.5):
    """Turns every (H, W) map into a bool mask, each map on its own.

    Args:
        attn: (..., H, W) float, usually normalised to [0, 1] first.
        method: ``"threshold"``: A > threshold; ``"mean"``: A > mean(A) (per map);
            ``"otsu"``: A > otsu_threshold(A) (per map, see `otsu_threshold`).
        threshold: only used by method="threshold".

    Returns:
        (..., H, W) bool.

    Raises:
        TypeError: ``attn`` is neither a numpy array nor a torch tensor.
        ValueError: ``attn`` has fewer than 2 dimensions or ``method`` is unknown.
    """
    a, was_numpy = _to_torch(attn, "attn")
    _check_ndim(a, 2, "attn", "(..., H, W)")
    a = _as_float(a)
    if method == "threshold":
        t = threshold
    elif method == "mean":
        t = a.mean(dim=(-2, -1), keepdim=True)
    elif method == "otsu":
        t = otsu_threshold(a)
        t = torch.as_tensor(t, dtype=a.dtype, device=a.device)[..., None, None]
    else:
        raise ValueError(f"method must be 'threshold', 'mean' or 'otsu', got {method!r}")
    return _back(a > t, was_numpy)


# -----------------------------------------------------------------------------
# K concept maps -> one label map


def _concept_scores(maps, background_threshold, normalize_mode):
    """(..., K, H, W) maps -> (..., K+1, H, W) scores, channel 0 = background."""
    m, _ = _to_torch(maps, "maps")
    _check_ndim(m, 3, "maps", "(K, H, W): one attention map per concept")
    if m.shape[-3] == 0:
        raise ValueError("maps has K = 0 concepts; pass at least one (H, W) map")
    if not 0.0 <= background_threshold <= 1.0:
        raise ValueError(f"background_threshold must be in [0, 1] (maps are normalised to "
                         f"[0, 1]), got {background_threshold}")
    m = torch.as_tensor(normalize(m, normalize_mode))
    bg = torch.full_like(m[..., :1, :, :], background_threshold)
    return torch.cat([bg, m], dim=-3)


def assign_labels(maps, background_threshold=0.3, normalize_mode="max"):
    """One label per pixel from K concept attention maps.

    Every map is normalised to [0, 1] (see `normalize`), a constant background
    channel of value `background_threshold` is put in front, and each pixel
    takes the argmax over these K+1 channels. So a pixel is background unless
    some concept's normalised attention beats the threshold; otherwise it
    belongs to the concept that attends to it most. Ties go to the lower label
    (a pixel exactly at the threshold is background).

    Args:
        maps: (K, H, W) non-negative (any leading dims (..., K, H, W) also work).
        background_threshold: score of the background channel, in [0, 1].
        normalize_mode: how each map is normalised (the ``mode`` of `normalize`).

    Returns:
        Labels (H, W) int64 in [0, K]: 0 = background, k+1 = concept k.

    Raises:
        TypeError: ``maps`` is neither a numpy array nor a torch tensor.
        ValueError: ``maps`` has fewer than 3 dimensions or K = 0 maps,
            ``background_threshold`` is outside [0, 1], or the maps do not suit
            ``normalize_mode``.
    """
    _, was_numpy = _to_torch(maps, "maps")
    scores = _concept_scores(maps, background_threshold, normalize_mode)
    return _back(scores.argmax(dim=-3), was_numpy)


def assign_masks(maps, background_threshold=0.3, normalize_mode="max"):
    """Same as `assign_labels`, returned as K disjoint bool masks.

    Args:
        maps: (K, H, W) non-negative.
        background_threshold: score of the background channel, in [0, 1].
        normalize_mode: how each map is normalised (the ``mode`` of `normalize`).

    Returns:
        (K, H, W) bool, masks[k] = (labels == k + 1); no pixel is in two masks.

    Raises:
        TypeError: ``maps`` is neither a numpy array nor a torch tensor.
        ValueError: as for `assign_labels`.
    """
    labels = assign_labels(maps, background_threshold, normalize_mode)
    return labels_to_masks(labels, maps.shape[-3])


def labels_to_masks(labels, num_concepts):
    """Label maps to one bool mask per concept.

    Args:
        labels: (..., H, W) int in [0, K] (0 = background).
        num_concepts: the number of concepts K.

    Returns:
        Masks (..., K, H, W) bool, masks[k] = (labels == k + 1).

    Raises:
        TypeError: ``labels`` is not an integer array or tensor.
        ValueError: ``labels`` has fewer than 2 dimensions or values outside [0, K].
    """
    l, was_numpy = _to_torch(labels, "labels")
    _check_ndim(l, 2, "labels", "(..., H, W)")
    if l.is_floating_point() or l.dtype == torch.bool:
        raise TypeError(f"labels must be an integer array, got dtype {l.dtype}; "
                        f"use labels.astype(np.int64)")
    if l.numel() and (l.min() < 0 or l.max() > num_concepts):
        raise ValueError(f"labels must lie in [0, {num_concepts}] (0 = background), "
                         f"got range [{int(l.min())}, {int(l.max())}]")
    k = torch.arange(1, num_concepts + 1, device=l.device).reshape(-1, 1, 1)
    return _back(l.unsqueeze(-3) == k, was_numpy)


def masks_to_labels(masks):
    """Disjoint bool masks to one label map.

    Args:
        masks: (..., K, H, W) bool, disjoint.

    Returns:
        Labels (..., H, W) int64: 0 where no mask is set, k+1 where masks[k] is set.

    Raises:
        TypeError: ``masks`` is not a bool array or tensor.
        ValueError: ``masks`` has fewer than 3 dimensions or the masks overlap.
    """
    m, was_numpy = _to_torch(masks, "masks")
    _check_ndim(m, 3, "masks", "(K, H, W)")
    _check_bool(m, "masks")
    if (m.sum(dim=-3) > 1).any():
        raise ValueError("masks overlap, so a pixel would get two labels; "
                         "make them disjoint first (e.g. masks.assign_masks)")
    k = torch.arange(1, m.shape[-3] + 1, device=m.device).reshape(-1, 1, 1)
    return _back((m.long() * k).sum(dim=-3), was_numpy)


def unary_from_maps(maps, background_threshold=0.3, temperature=0.1, normalize_mode="max"):
    """Soft version of `assign_labels`: label probabilities for a DenseCRF.

    With s_0 = background_threshold and s_{k+1} = normalize(A_k) in [0, 1]
    (the same K+1 scores that `assign_labels` takes the argmax of),

        P(label l at pixel i) = softmax_l( s_l(i) / temperature ).

    We use a softmax with a temperature (rather than clamping and dividing by
    the sum) because it keeps the argmax identical to `assign_labels`, is never
    exactly 0 (so -log P is finite), and `temperature` has a plain meaning: a
    score gap of `temperature` is one nat of unary energy. The CRF's unary
    energy is U = -log P (see `conceptlab.crf.unary_from_probs`).

    Args:
        maps: (K, H, W) non-negative concept attention maps.
        background_threshold: score s_0 of the background channel, in [0, 1].
        temperature: > 0; small = confident unaries, large = let the CRF decide.
        normalize_mode: how each map is normalised (the ``mode`` of `normalize`).

    Returns:
        Probs (K+1, H, W) float, summing to 1 over dim 0; channel 0 = background.

    Raises:
        TypeError: ``maps`` is neither a numpy array nor a torch tensor.
        ValueError: ``temperature`` is not > 0, or as for `assign_labels`.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _, was_numpy = _to_torch(maps, "maps")
    scores = _concept_scores(maps, background_threshold, normalize_mode)
    return _back(torch.softmax(scores / temperature, dim=-3), was_numpy)


# -----------------------------------------------------------------------------
# evaluation


def iou(pred, target):
    """Intersection over union |pred & target| / |pred | target| of bool masks.

    Args:
        pred: (..., H, W) bool.
        target: (..., H, W) bool, the same shape as ``pred``.

    Returns:
        A python float for a single (H, W) pair, else (...) float64 array or tensor, one
            IoU per leading index. Two empty masks agree perfectly, so their IoU is
            defined as 1.0.

    Raises:
        TypeError: ``pred`` or ``target`` is not a bool array or tensor.
        ValueError: ``pred`` has fewer than 2 dimensions or the shapes differ.
    """
    p, was_numpy = _to_torch(pred, "pred")
    t, _ = _to_torch(target, "target")
    _check_bool(p, "pred")
    _check_bool(t, "target")
    _check_ndim(p, 2, "pred", "(..., H, W)")
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same shape, "
                         f"got {tuple(p.shape)} and {tuple(t.shape)}")
    inter = (p & t).sum(dim=(-2, -1)).double()
    union = (p | t).sum(dim=(-2, -1)).double()
    out = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    if out.ndim == 0:
        return float(out)
    return _back(out, was_numpy)


# -----------------------------------------------------------------------------
# resizing (attention maps are usually 16x16 / 32x32 / 64x64, images larger)


def _interpolate(t, size, **kwargs):
    """(..., H, W) -> (..., h, w) through F.interpolate on a (B, 1, H, W) view."""
    lead, (H, W) = t.shape[:-2], t.shape[-2:]
    out = F.interpolate(t.reshape(-1, 1, H, W), size=size, **kwargs)
    return out.reshape(*lead, *size)


def resize_mask(mask, size, mode="nearest"):
    """Resizes bool masks.

    Args:
        mask: (..., H, W) bool.
        size: int or (h, w).
        mode: ``"nearest"``: pixel-centre nearest neighbour (torch 'nearest-exact', the
            same as PIL / skimage); ``"area"``: a pixel is set if more than half of the
            area it covers is set (meant for downsampling).

    Returns:
        (..., h, w) bool.

    Raises:
        TypeError: ``mask`` is not a bool array or tensor.
        ValueError: ``mask`` has fewer than 2 dimensions, ``size`` is not a positive int
            or pair of positive ints, or ``mode`` is unknown.
    """
    m, was_numpy = _to_torch(mask, "mask")
    _check_bool(m, "mask")
    _check_ndim(m, 2, "mask", "(..., H, W)")
    size = _size_2d(size)
    if mode == "nearest":
        out = _interpolate(m.float(), size, mode="nearest-exact") > 0.5
    elif mode == "area":
        out = _interpolate(m.float(), size, mode="area") > 0.5
    else:
        raise ValueError(f"mode must be 'nearest' or 'area', got {mode!r}")
    return _back(out, was_numpy)


def resize_map(attn, size):
    """Resizes float maps bilinearly (pixel centres aligned, antialiased when downsampling).

    Args:
        attn: (..., H, W) float.
        size: int or (h, w).

    Returns:
        (..., h, w) float, same dtype.

    Raises:
        TypeError: ``attn`` is a bool mask (use `resize_mask`) or neither a numpy array
            nor a torch tensor.
        ValueError: ``attn`` has fewer than 2 dimensions or ``size`` is not a positive
            int or pair of positive ints.
    """
    a, was_numpy = _to_torch(attn, "attn")
    _check_ndim(a, 2, "attn", "(..., H, W)")
    if a.dtype == torch.bool:
        raise TypeError("resize_map is for float maps; use resize_mask for bool masks")
    a = _as_float(a)
    size = _size_2d(size)
    out = _interpolate(a, size, mode="bilinear", align_corners=False, antialias=True)
    return _back(out, was_numpy)
