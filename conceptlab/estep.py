"""The E-step: masks of the concepts in an image, from their tokens' cross-attention.

    est = estimate_masks(pipe, image, ["[v1]", "[v2]", "[v3]"], background=2)
    est.masks          # (K, H, W) bool, disjoint
    est.maps           # (K, h, w) the timestep-averaged attention they came from

Steps (``docs/cheatsheet.md``): attention maps of the prompt "a photo of [v1] and [v2] ..."
averaged over ``n_timesteps`` noised copies (:func:`conceptlab.maps.attention_maps`);
upsampled to the image; each pixel assigned to the concept with the largest normalised
map, or to the constant background channel (``background_threshold``); refined by a
DenseCRF on the image's colours (:mod:`conceptlab.crf`). :func:`check_masks` is the guard
EM applies to every new mask (an empty or full mask keeps the previous one).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from . import crf as _crf
from . import masks as _masks
from .maps import attention_maps
from .models import native_size, to_uint8


@dataclass(frozen=True)
class MaskConfig:
    """How the E-step turns attention into masks."""

    n_timesteps: int = 50
    t_range: tuple | None = None  # None: the model's default (conceptlab.maps)
    layers: list | None = None  # None: the model's default
    background_threshold: float = 0.3
    crf: bool = True
    temperature: float = 0.1  # of the CRF unaries (conceptlab.masks.unary_from_maps)
    crf_params: dict = field(default_factory=dict)  # conceptlab.crf.DEFAULT_CRF_PARAMS keys
    min_fraction: float = 0.005  # a mask smaller than this fraction of the image is "empty"
    max_fraction: float = 0.95  # larger than this is "full"
    # a concept whose init word is this one is the BACKGROUND: its mask is every pixel that
    # no other concept claims (the assignment's background channel), not its own attention
    # argmax. A word like "background" is rarely attended to where the background is (in
    # the bundled model and in SD alike), so its own map would lose most pixels to the
    # "nothing" channel. None: every concept competes with its own map.
    background_word: str | None = "background"

    def __post_init__(self):
        if not isinstance(self.n_timesteps, int) or self.n_timesteps < 1:
            raise ValueError(f"n_timesteps must be an integer >= 1, got {self.n_timesteps!r}")
        if not 0 <= self.background_threshold <= 1:
            raise ValueError(f"background_threshold must lie in [0, 1], got "
                             f"{self.background_threshold!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0 <= self.min_fraction < self.max_fraction <= 1:
            raise ValueError(f"need 0 <= min_fraction < max_fraction <= 1, got "
                             f"{self.min_fraction!r}, {self.max_fraction!r}")
        unknown = sorted(set(self.crf_params) - set(_crf.DEFAULT_CRF_PARAMS))
        if unknown:
            raise ValueError(f"unknown crf_params {unknown}; the keys are "
                             f"{sorted(_crf.DEFAULT_CRF_PARAMS)}")

    def replace(self, **changes) -> MaskConfig:
        """A copy with ``changes`` (an unknown field is a TypeError)."""
        import dataclasses

        return dataclasses.replace(self, **changes)


@dataclass
class MaskEstimate:
    masks: np.ndarray  # (K, H, W) bool, disjoint
    maps: np.ndarray  # (K, h, w) raw timestep-averaged attention of each concept token
    masks_no_crf: np.ndarray  # (K, H, W) bool, argmax with background, before the CRF
    prompt: str
    crf_backend: str | None = None


def estimate_masks(pipe, image, tokens: list[str], *, prompt: str | None = None,
                   config: MaskConfig | None = None, seed: int = 0,
                   background: int | None = None, resize: bool = False) -> MaskEstimate:
    """E-step for one image: masks of the concepts whose tokens are ``tokens``.

    image       a path, PIL image, (H, W, 3) array or tensor at the pipeline's native size
                (another size: an error, or resized with a warning if ``resize=True``)
    tokens      the concept tokens present in the image, e.g. ["[v1]", "[v2]"]
    prompt      default: "a photo of [v1] and [v2]"
    background  index (into ``tokens``) of the concept that is the image's background: the
                other concepts are assigned (and CRF-refined) against the background
                channel, and this concept gets what that channel keeps. None: every
                concept is assigned from its own map, unclaimed pixels belong to no one.
    """
    cfg = config or MaskConfig()
    if isinstance(tokens, str) or not tokens:
        raise ValueError(f"tokens must be a non-empty list of concept tokens, got {tokens!r}")
    img = to_uint8(image, native_size(pipe), resize)
    prompt = prompt or "a photo of " + " and ".join(tokens)
    kw = {}
    if cfg.layers is not None:
        kw["layers"] = cfg.layers
    if cfg.t_range is not None:
        kw["t_range"] = cfg.t_range
    am = attention_maps(pipe, img, prompt, n_timesteps=cfg.n_timesteps, seed=seed, **kw)
    maps = am.concept_maps(tokens)  # (K, h, w) raw
    H, W = img.shape[:2]
    up = _masks.resize_map(maps, (H, W)).clamp_min(0)
    K = len(tokens)
    if background is not None and not 0 <= background < K:
        raise ValueError(f"background must index one of the {K} tokens, got {background}")
    objs = [k for k in range(K) if k != background]
    backend = None
    hard = np.zeros((K, H, W), bool)
    refined = np.zeros((K, H, W), bool)
    if objs:
        hard[objs] = np.asarray(_masks.assign_masks(up[objs], cfg.background_threshold), bool)
        if cfg.crf:
            backend = _crf.crf_backend()
            refined[objs] = np.asarray(_crf.refine_masks(
                img, up[objs], background_threshold=cfg.background_threshold,
                temperature=cfg.temperature, **cfg.crf_params), bool)
        else:
            refined[objs] = hard[objs]
    if background is not None:
        hard[background] = ~hard[objs].any(0)
        refined[background] = ~refined[objs].any(0)
    return MaskEstimate(refined, maps.numpy(), hard, prompt, backend)


def check_masks(new, old, names, step, warn_list, cfg: MaskConfig):
    """Keep the previous mask of a concept whose new mask is empty or covers everything."""
    out = new.copy()
    area = new.reshape(len(new), -1).mean(1)
    for k, a in enumerate(area):
        if a < cfg.min_fraction or a > cfg.max_fraction:
            kind = "empty" if a < cfg.min_fraction else "full"
            msg = (f"step {step}: the mask of {names[k]} is {kind} ({a:.1%} of the image); "
                   + ("keeping the previous mask" if old is not None else
                      "using the attention map above its mean instead"))
            warn_list.append(msg)
            warnings.warn(msg, stacklevel=3)
            if old is not None:
                out[k] = old[k]
    return out


def fallback_masks(est: MaskEstimate, H, W):
    """Disjoint masks from each map above its own mean (used when the E-step is empty)."""
    up = _masks.resize_map(torch.from_numpy(est.maps), (H, W))
    m = (up > up.mean((1, 2), keepdim=True)).numpy()
    owner = up.argmax(0).numpy()
    return np.stack([m[k] & (owner == k) for k in range(len(m))])


def background_index(words, background_word: str | None = "background") -> int | None:
    """Position of the one concept whose init word is ``background_word`` (case-insensitive);
    None when there is none, more than one, or ``background_word`` is None."""
    if not background_word:
        return None
    hits = [j for j, w in enumerate(words)
            if w is not None and str(w).lower() == background_word.lower()]
    return hits[0] if len(hits) == 1 else None


def evaluate_masks(pipe, concepts, gt_masks, *, mask_config: MaskConfig | None = None,
                   seed: int = 0) -> list[float]:
    """IoU per concept of masks re-estimated from the CURRENT tokens' attention (whatever
    masks were used for training): how well the learned tokens localise their concepts."""
    gt = gt_masks if isinstance(gt_masks, (list, tuple)) else [gt_masks]
    K = len(concepts.names)
    ious, count = np.zeros(K), np.zeros(K)
    for i, img in enumerate(concepts.images):
        cs = concepts.concept_ids[i]
        bg = background_index([concepts.tokens.init_words[c] for c in cs],
                              (mask_config or MaskConfig()).background_word)
        est = estimate_masks(pipe, img, [concepts.names[c] for c in cs],
                             config=mask_config, seed=seed + i, background=bg)
        for j, c in enumerate(concepts.concept_ids[i]):
            ious[c] += float(_masks.iou(est.masks[j], np.asarray(gt[i][j], bool)))
            count[c] += 1
    return (ious / np.maximum(count, 1)).tolist()


__all__ = [
    "MaskConfig",
    "MaskEstimate",
    "background_index",
    "check_masks",
    "estimate_masks",
    "evaluate_masks",
    "fallback_masks",
]
