"""Fully connected CRF (DenseCRF, Krähenbühl & Koltun, NeurIPS 2011).

It snaps attention-derived label probabilities onto the edges of the image.

Every pixel i gets a label x_i in {0 .. L-1} (here 0 = background, k+1 =
concept k, see `conceptlab.masks`). The energy is

    E(x) = sum_i psi_u(x_i) + sum_{i<j} mu(x_i, x_j) k(f_i, f_j)

    psi_u(x_i = l)  = -log P_i(l)                 unary, from attention maps
    mu(l, l')       = w [l != l']                  Potts compatibility
    k(f_i, f_j)     = w_g exp(-|p_i-p_j|^2 / 2 sxy_g^2)                        smoothness
                    + w_b exp(-|p_i-p_j|^2 / 2 sxy_b^2 - |I_i-I_j|^2 / 2 srgb^2) appearance

with p = pixel position and I = RGB colour. Mean-field inference keeps a
factorised Q_i(l) and repeats

    Q <- softmax_l( -U - sum_m mu_m (K_m Q) )

where K_m Q is "message passing": every pixel collects the label beliefs of
all other pixels, weighted by kernel m.

Conventions of pydensecrf (which this module mirrors exactly, apart from the
permutohedral-lattice approximation pydensecrf uses for K_m Q):

- compat = w (a number) is pydensecrf's PottsCompatibility, whose matrix is
  -w I: it *rewards* equal labels, pairwise(l) = -w (K Q)(l). Our
  w [l != l'] gives w (sum_l' (K Q)(l') - (K Q)(l)); the two differ by a
  per-pixel constant, which the softmax removes, so Q is identical.
- kernels are NORMALIZE_SYMMETRIC (pydensecrf's default): with D = diag(K 1),
  the kernel used is D^-1/2 K D^-1/2, so a message is roughly a weighted
  average of neighbouring beliefs and w is in nats.
- the self-connection is kept: K_ii = exp(0) = 1 (the lattice filter includes
  the pixel itself). The paper's sum over j != i would set K_ii = 0; with the
  normalisation above this only adds about w / D_ii to the current label.

Two backends:

- ``"torch"``: exact dense N x N kernels (N = H*W); readable, differentiable,
  runs on GPU; fine up to 128 x 128 pixels.
- ``"pydensecrf"``: the C++ original (pydensecrf2 package); approximate filtering
  in O(N); any image size.

They agree closely but not bit for bit: the lattice's Gaussian is ~8% wider
than exp(-d^2 / 2 s^2) and slightly anisotropic. On the 64 x 64 test scenes
the marginals differ by ~0.003 on average and the label maps by IoU >= 0.97.

Why one module of about 510 lines (almost half of it docstrings): the pure-torch mean field (written out to be read) and
the pydensecrf backend solve the same energy and are tested against each other.
"""

from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch

from . import masks as _masks
from .models import to_uint8

# Defaults for 64 x 64 images with objects of radius ~10 px.
#  - Gaussian (smoothness) kernel: sxy=3, compat=3, pydensecrf's usual values;
#    they remove isolated pixels and speckle and are resolution independent.
#  - Bilateral (appearance) kernel: pydensecrf's example uses sxy=80 on ~500 px
#    images (about 1/6 of the image); at 64 px we use sxy=15, about the size
#    of an object, so a pixel listens to its own object but not the far side
#    of the image. srgb=13 and compat=10 are the usual values: colours within
#    ~13 levels count as "the same surface", and appearance dominates
#    smoothness.
#  - 5 mean-field iterations (as in the paper; Q has converged by then).
DEFAULT_CRF_PARAMS = {
    "sxy_gaussian": 3.0,
    "compat_gaussian": 3.0,
    "sxy_bilateral": 15.0,
    "srgb": 13.0,
    "compat_bilateral": 10.0,
    "n_iters": 5,
}

MAX_TORCH_PIXELS = 128 * 128  # dense kernels: 2 x N^2 floats = 2 GiB at this size
UNARY_CLIP = 1e-5             # probabilities are clipped to this before -log (as pydensecrf.utils)

# -----------------------------------------------------------------------------
# input checking


def _image_uint8(image):
    """The image as (H, W, 3) uint8 (`conceptlab.models.to_uint8`, the one converter)."""
    return to_uint8(image, min_side=1)


def _check_probs(probs, image_hw):
    """probs (L, H, W) float summing to 1 over L -> (tensor, was_numpy)."""
    p, was_numpy = _masks._to_torch(probs, "probs")
    if p.ndim != 3:
        raise ValueError(f"probs must have shape (L, H, W), got {tuple(p.shape)}")
    if not p.is_floating_point():
        raise TypeError(f"probs must be float probabilities, got dtype {p.dtype}")
    if tuple(p.shape[1:]) != tuple(image_hw):
        raise ValueError(
            f"probs has spatial size {tuple(p.shape[1:])} but the image is {tuple(image_hw)}; "
            f"resize the probabilities (masks.resize_map) or the image so that they match"
        )
    if not torch.isfinite(p).all() or (p < 0).any():
        raise ValueError("probs must be finite and non-negative")
    if not torch.allclose(p.sum(0), torch.ones((), dtype=p.dtype, device=p.device), atol=1e-3):
        raise ValueError(
            "probs must sum to 1 over the label dim 0; build them with masks.unary_from_maps(...) "
            "or normalise with probs / probs.sum(0)"
        )
    return p, was_numpy


def _check_params(sxy_gaussian, compat_gaussian, sxy_bilateral, srgb, compat_bilateral, n_iters):
    widths = {"sxy_gaussian": sxy_gaussian, "sxy_bilateral": sxy_bilateral, "srgb": srgb}
    for name, v in widths.items():
        if not isinstance(v, Real) or not v > 0:
            raise ValueError(f"{name} is a kernel width and must be a number > 0, got {v!r}")
    for name, v in [("compat_gaussian", compat_gaussian), ("compat_bilateral", compat_bilateral)]:
        if not isinstance(v, Real) or isinstance(v, bool):
            raise TypeError(f"{name} must be a number (Potts weight), got {type(v).__name__}")
    if not isinstance(n_iters, Integral) or n_iters < 0:
        raise ValueError(f"n_iters must be an int >= 0, got {n_iters!r}")


def _check_torch_size(H, W):
    if H * W > MAX_TORCH_PIXELS:
        raise ValueError(
            f"the torch backend builds dense N x N kernels and N = H*W = {H}*{W} = {H * W} is "
            f"above {MAX_TORCH_PIXELS} (128 x 128); use backend='pydensecrf' or downsample the "
            f"image and probabilities (masks.resize_map) first"
        )


def unary_from_probs(probs, clip=UNARY_CLIP):
    """Unary energy U = -log P, with P clipped to [clip, 1] so that U is finite.

    Args:
        probs: (L, ...) float probabilities.
        clip: smallest probability kept before the log.

    Returns:
        U of the same shape and kind (numpy / torch).

    Raises:
        TypeError: ``probs`` is neither a numpy array nor a torch tensor.
    """
    p, was_numpy = _masks._to_torch(probs, "probs")
    return _masks._back(-torch.log(p.clamp(clip, 1.0)), was_numpy)


# -----------------------------------------------------------------------------
# the pieces of mean-field inference (exact, dense)


def _gaussian_kernel(features):
    """features (N, D) -> K (N, N) with K_ij = exp(-|f_i - f_j|^2 / 2)."""
    f = features - features.mean(0)  # centring keeps |f|^2 small, so float32 stays accurate
    half_sq = 0.5 * (f * f).sum(1)
    # -|f_i - f_j|^2 / 2 = f_i.f_j - |f_i|^2 / 2 - |f_j|^2 / 2, built in place in one N x N buffer
    log_K = torch.addmm(-half_sq[None, :], f, f.T).sub_(half_sq[:, None]).fill_diagonal_(0)
    return log_K.clamp_(max=0).exp_()


def symmetric_normalize(K):
    """Symmetric kernel normalisation (pydensecrf's NORMALIZE_SYMMETRIC).

    Args:
        K: (N, N) torch kernel matrix.

    Returns:
        D^-1/2 K D^-1/2 with D = diag(K 1), (N, N).
    """
    d = K.sum(1).rsqrt()
    return K * d[:, None] * d[None, :]


def pairwise_kernels(image, sxy_gaussian=DEFAULT_CRF_PARAMS["sxy_gaussian"],
                     sxy_bilateral=DEFAULT_CRF_PARAMS["sxy_bilateral"],
                     srgb=DEFAULT_CRF_PARAMS["srgb"], *, normalize=True,
                     dtype=torch.float32, device=None):
    """The two DenseCRF kernels as dense matrices over the N = H*W pixels.

    Pixel n is the row-major index y * W + x, as in probs.reshape(L, N).

        K_gauss[i, j] = exp(-|p_i - p_j|^2 / (2 sxy_gaussian^2))
        K_bilat[i, j] = exp(-|p_i - p_j|^2 / (2 sxy_bilateral^2) - |I_i - I_j|^2 / (2 srgb^2))

    Args:
        image: (H, W, 3) uint8 (numpy / torch / PIL.Image); H*W <= 128*128.
        sxy_gaussian: width in pixels of the smoothness kernel.
        sxy_bilateral: width in pixels of the appearance kernel.
        srgb: width in colour levels of the appearance kernel.
        normalize: apply `symmetric_normalize` (what mean-field uses, pydensecrf's
            default).
        dtype: torch dtype of the kernels.
        device: torch device of the kernels.

    Returns:
        (K_gauss, K_bilat), two (N, N) torch tensors (always torch).

    Raises:
        ValueError: the image has more than 128 x 128 pixels.
    """
    img = _image_uint8(image)
    H, W, _ = img.shape
    _check_torch_size(H, W)
    y = torch.arange(H, dtype=dtype, device=device)
    x = torch.arange(W, dtype=dtype, device=device)
    # Smoothness: exp(-(dx^2 + dy^2) / 2s^2) = exp(-dy^2 / 2s^2) exp(-dx^2 / 2s^2), so the
    # N x N kernel is the Kronecker product Ky (x) Kx of two 1-D kernels, and so is its
    # normalisation: (Ky (x) Kx) 1 = (Ky 1) (x) (Kx 1).
    Ky = _gaussian_kernel(y[:, None] / sxy_gaussian)                             # (H, H)
    Kx = _gaussian_kernel(x[:, None] / sxy_gaussian)                             # (W, W)
    if normalize:
        Ky, Kx = symmetric_normalize(Ky), symmetric_normalize(Kx)
    K_gauss = torch.kron(Ky, Kx)                                                 # (N, N)
    # Appearance: one 5-D Gaussian over (x, y, r, g, b), not separable.
    ys, xs = torch.meshgrid(y, x, indexing="ij")
    pos = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)                 # (N, 2)
    rgb = torch.tensor(img, dtype=dtype, device=device).reshape(-1, 3)          # (N, 3)
    K_bilat = _gaussian_kernel(torch.cat([pos / sxy_bilateral, rgb / srgb], dim=1))
    if normalize:  # symmetric_normalize, in place: this matrix is big
        d = K_bilat.sum(1).rsqrt()
        K_bilat.mul_(d[:, None]).mul_(d[None, :])
    return K_gauss, K_bilat


def potts(w, num_labels, dtype=torch.float32, device=None):
    """Potts compatibility mu(l, l') = w [l != l'] as an (L, L) torch matrix.

    Args:
        w: the Potts weight.
        num_labels: the number of labels L.
        dtype: torch dtype of the matrix.
        device: torch device of the matrix.

    Returns:
        The (L, L) matrix: ``w`` off the diagonal, 0 on it.
    """
    return w * (1 - torch.eye(num_labels, dtype=dtype, device=device))


def mean_field_step(unary, Q, kernels, compats):
    """One mean-field update  Q <- softmax_l( -U - sum_m mu_m (K_m Q) ).

    Args:
        unary: (L, N) energies U = -log P (or (L, H, W)).
        Q: (L, N) current marginals (same shape as unary).
        kernels: sequence of (N, N) symmetric kernels, normalised (`pairwise_kernels`).
        compats: one per kernel: a number w (Potts, mu = w [l != l']) or an (L, L)
            compatibility matrix mu.

    Returns:
        The new Q, same shape and kind (numpy / torch) as unary.

    Raises:
        ValueError: ``Q`` and ``unary`` have different shapes, or ``kernels`` and
            ``compats`` have different lengths.
    """
    U, was_numpy = _masks._to_torch(unary, "unary")
    shape = U.shape
    if tuple(Q.shape) != tuple(shape):
        raise ValueError(f"Q must have the shape of unary {tuple(shape)}, got {tuple(Q.shape)}")
    U, Q = U.reshape(shape[0], -1), torch.as_tensor(Q, dtype=U.dtype).reshape(shape[0], -1)
    pairwise = torch.zeros_like(U)
    for K, mu in zip(kernels, compats, strict=True):
        K = torch.as_tensor(K, dtype=U.dtype)
        mu = torch.as_tensor(mu, dtype=U.dtype)
        if mu.ndim == 0:
            mu = potts(mu, U.shape[0], U.dtype, U.device)
        message = Q @ K                    # (L, N): sum_j k(f_i, f_j) Q_j(l)   (K symmetric)
        pairwise += mu @ message           # (L, N): sum_l' mu(l, l') message(l')
    return _masks._back(torch.softmax(-U - pairwise, dim=0).reshape(shape), was_numpy)


# -----------------------------------------------------------------------------
# the two backends


def dense_crf_torch(image, probs, *, sxy_gaussian=DEFAULT_CRF_PARAMS["sxy_gaussian"],
                    compat_gaussian=DEFAULT_CRF_PARAMS["compat_gaussian"],
                    sxy_bilateral=DEFAULT_CRF_PARAMS["sxy_bilateral"],
                    srgb=DEFAULT_CRF_PARAMS["srgb"],
                    compat_bilateral=DEFAULT_CRF_PARAMS["compat_bilateral"],
                    n_iters=DEFAULT_CRF_PARAMS["n_iters"]):
    """DenseCRF mean-field inference with exact dense kernels, in torch.

    A compat of 0 switches that kernel off. n_iters=0 returns softmax(-U),
    i.e. probs (after clipping at 1e-5).

    Args:
        image: (H, W, 3) uint8 numpy / torch, or PIL.Image; H*W <= 128*128.
        probs: (L, H, W) float, sums to 1 over L (e.g. `masks.unary_from_maps`).
        sxy_gaussian: width in pixels of the smoothness kernel, > 0.
        compat_gaussian: Potts weight of the smoothness kernel.
        sxy_bilateral: width in pixels of the appearance kernel, > 0.
        srgb: width in colour levels of the appearance kernel, > 0.
        compat_bilateral: Potts weight of the appearance kernel.
        n_iters: number of mean-field iterations, >= 0.

    Returns:
        Q (L, H, W) torch float (always torch; float64 if probs is a float64 tensor,
            else float32), on probs' device.

    Raises:
        TypeError: ``probs`` is not float, or a compat is not a number.
        ValueError: the image has more than 128 x 128 pixels, ``probs`` is not (L, H, W)
            probabilities summing to 1 at the image's size, or a width or ``n_iters`` is
            out of range.
    """
    img = _image_uint8(image)
    _check_torch_size(*img.shape[:2])
    _check_params(sxy_gaussian, compat_gaussian, sxy_bilateral, srgb, compat_bilateral, n_iters)
    p, _ = _check_probs(probs, img.shape[:2])
    is_f64 = p.dtype == torch.float64 and isinstance(probs, torch.Tensor)
    dtype = torch.float64 if is_f64 else torch.float32
    p = p.to(dtype)
    L, H, W = p.shape
    unary = unary_from_probs(p).reshape(L, H * W)
    Q = torch.softmax(-unary, dim=0)
    if n_iters == 0 or compat_gaussian == compat_bilateral == 0:
        return Q.reshape(L, H, W)
    K_gauss, K_bilat = pairwise_kernels(img, sxy_gaussian, sxy_bilateral, srgb,
                                        dtype=dtype, device=p.device)
    # Both compatibilities are Potts, so sum_m w_m [l != l'] (K_m Q) equals
    # [l != l'] ((sum_m w_m K_m) Q): one combined kernel, weight 1, half the cost.
    K = K_bilat.mul_(compat_bilateral).add_(K_gauss, alpha=compat_gaussian)
    del K_gauss
    for _ in range(n_iters):
        Q = mean_field_step(unary, Q, [K], [1.0])
    return Q.reshape(L, H, W)


def dense_crf_pydensecrf(image, probs, *, sxy_gaussian=DEFAULT_CRF_PARAMS["sxy_gaussian"],
                         compat_gaussian=DEFAULT_CRF_PARAMS["compat_gaussian"],
                         sxy_bilateral=DEFAULT_CRF_PARAMS["sxy_bilateral"],
                         srgb=DEFAULT_CRF_PARAMS["srgb"],
                         compat_bilateral=DEFAULT_CRF_PARAMS["compat_bilateral"],
                         n_iters=DEFAULT_CRF_PARAMS["n_iters"]):
    """The same inference with pydensecrf's DenseCRF2D (C++, permutohedral lattice).

    Same arguments as `dense_crf_torch`, any image size.

    Args:
        image: (H, W, 3) uint8 numpy / torch, or PIL.Image.
        probs: (L, H, W) float, sums to 1 over L (e.g. `masks.unary_from_maps`).
        sxy_gaussian: width in pixels of the smoothness kernel, > 0.
        compat_gaussian: Potts weight of the smoothness kernel.
        sxy_bilateral: width in pixels of the appearance kernel, > 0.
        srgb: width in colour levels of the appearance kernel, > 0.
        compat_bilateral: Potts weight of the appearance kernel.
        n_iters: number of mean-field iterations, >= 0.

    Returns:
        Q (L, H, W) float32 numpy (always numpy).

    Raises:
        ImportError: pydensecrf (the pydensecrf2 package) is not installed.
        TypeError: ``probs`` is not float, or a compat is not a number.
        ValueError: ``probs`` is not (L, H, W) probabilities summing to 1 at the image's
            size, or a width or ``n_iters`` is out of range.
    """
    dcrf = _import_pydensecrf()
    img = _image_uint8(image)
    _check_params(sxy_gaussian, compat_gaussian, sxy_bilateral, srgb, compat_bilateral, n_iters)
    p, _ = _check_probs(probs, img.shape[:2])
    L, H, W = p.shape
    unary = unary_from_probs(p.detach().cpu().to(torch.float32)).reshape(L, H * W).numpy()
    crf = dcrf.DenseCRF2D(W, H, L)  # note: width first
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    if compat_gaussian != 0:
        crf.addPairwiseGaussian(sxy=float(sxy_gaussian), compat=float(compat_gaussian))
    if compat_bilateral != 0:
        crf.addPairwiseBilateral(sxy=float(sxy_bilateral), srgb=float(srgb), rgbim=img,
                                 compat=float(compat_bilateral))
    Q = np.asarray(crf.inference(n_iters), dtype=np.float32)
    return Q.reshape(L, H, W)


def _import_pydensecrf():
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as e:
        raise ImportError(
            "the pydensecrf backend needs the pydensecrf2 package (`pip install pydensecrf2`); "
            "or use backend='torch'"
        ) from e
    return dcrf


def crf_backend(backend="auto"):
    """Resolves a backend name.

    Args:
        backend: ``"auto"`` (``"pydensecrf"`` if it can be imported, else ``"torch"``),
            ``"torch"`` or ``"pydensecrf"``; the last two are checked and returned as is.

    Returns:
        ``"torch"`` or ``"pydensecrf"``.

    Raises:
        ImportError: ``backend="pydensecrf"`` and pydensecrf cannot be imported.
        ValueError: ``backend`` is not one of the three names.
    """
    if backend == "auto":
        try:
            _import_pydensecrf()
            return "pydensecrf"
        except ImportError:
            return "torch"
    if backend == "pydensecrf":
        _import_pydensecrf()
        return backend
    if backend == "torch":
        return backend
    raise ValueError(f"backend must be 'auto', 'torch' or 'pydensecrf', got {backend!r}")


# -----------------------------------------------------------------------------
# the convenient entry points


@dataclass
class CRFResult:
    """What `dense_crf` returns.

    Attributes:
        probs: (L, H, W) refined marginals Q, same kind (numpy / torch) and float dtype as
            the probs given to `dense_crf`.
        labels: (H, W) int64 argmax of probs, 0 = background, k+1 = concept k.
        backend: "torch" or "pydensecrf", the one that actually ran.
    """
    probs: Any
    labels: Any
    backend: str


def dense_crf(image, probs, *, backend="auto", **params):
    """Refines label probabilities with a DenseCRF.

    Args:
        image: (H, W, 3) uint8 numpy / torch, or PIL.Image.
        probs: (L, H, W) float, sums to 1 over L; channel 0 = background when built by
            `masks.unary_from_maps`.
        backend: "auto" (pydensecrf if installed, else torch), "torch", "pydensecrf".
        **params: sxy_gaussian, compat_gaussian, sxy_bilateral, srgb, compat_bilateral,
            n_iters (defaults: `DEFAULT_CRF_PARAMS`).

    Returns:
        `CRFResult` (probs, labels, backend).

    Raises:
        TypeError: an unknown CRF parameter, or as for `dense_crf_torch`.
        ImportError: ``backend="pydensecrf"`` and pydensecrf cannot be imported.
        ValueError: an unknown backend, or as for `dense_crf_torch` /
            `dense_crf_pydensecrf`.
    """
    unknown = set(params) - set(DEFAULT_CRF_PARAMS)
    if unknown:
        raise TypeError(f"unknown CRF parameter(s) {sorted(unknown)}; "
                        f"valid: {sorted(DEFAULT_CRF_PARAMS)}")
    name = crf_backend(backend)
    p, was_numpy = _masks._to_torch(probs, "probs")
    if name == "torch":
        Q = dense_crf_torch(image, probs, **params)
    else:
        Q = torch.from_numpy(dense_crf_pydensecrf(image, probs, **params))
    Q = Q.to(device=p.device, dtype=p.dtype if p.is_floating_point() else torch.float32)
    return CRFResult(_masks._back(Q, was_numpy), _masks._back(Q.argmax(0), was_numpy), name)


def refine_masks(image, maps, *, kind="maps", background_threshold=0.3, temperature=0.1,
                 backend="auto", **params):
    """Attention maps (or label probabilities) -> K disjoint, edge-aligned bool masks.

    Args:
        image: (H, W, 3) uint8 numpy / torch, or PIL.Image.
        maps: with ``kind="maps"``, (K, h, w) non-negative concept attention maps; they
            are upsampled bilinearly (`masks.resize_map`) to the image size if
            (h, w) != (H, W) and turned into probabilities with
            ``masks.unary_from_maps(maps, background_threshold, temperature)``. With
            ``kind="probs"``, (K+1, H, W) label probabilities, channel 0 = background.
        kind: ``"maps"`` or ``"probs"``, what ``maps`` holds.
        background_threshold: for ``kind="maps"``, as for `masks.unary_from_maps`.
        temperature: for ``kind="maps"``, as for `masks.unary_from_maps`.
        backend: as for `dense_crf`.
        **params: as for `dense_crf`.

    Returns:
        Masks (K, H, W) bool with masks[k] = (labels == k + 1), the same label convention
            as `masks.assign_labels`; same kind as `maps`.

    Raises:
        ValueError: ``kind`` is unknown, ``maps`` is not (K, h, w) for ``kind="maps"``,
            or as for `dense_crf`.
    """
    img = _image_uint8(image)
    m, was_numpy = _masks._to_torch(maps, "maps")
    if kind == "maps":
        if m.ndim != 3:
            raise ValueError(f"maps must have shape (K, h, w), got {tuple(m.shape)}")
        m = _masks._as_float(m)
        if tuple(m.shape[1:]) != img.shape[:2]:
            m = _masks.resize_map(m, img.shape[:2]).clamp_min(0)  # (rounding can undershoot 0)
        probs = _masks.unary_from_maps(m, background_threshold, temperature)
    elif kind == "probs":
        probs = m
    else:
        raise ValueError(f"kind must be 'maps' or 'probs', got {kind!r}")
    result = dense_crf(img, probs, backend=backend, **params)
    return _masks._back(_masks.labels_to_masks(result.labels, probs.shape[0] - 1), was_numpy)
