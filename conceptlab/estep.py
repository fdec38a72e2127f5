"""The E-step: masks of the concepts in an image, from their tokens' cross-attention.

    est = estimate_masks(pipe, image, ["[v1]", "[v2]", "[v3]"], background=2, concepts=learned)
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

COMPETITIONS = ("max", "centered")


def competition_scores(maps, background_threshold: float, competition: str = "max"):
    """(K, H, W) non-negative maps -> (K, H, W) scores in [0, 1] that compete against the
    constant background channel (``MaskConfig.competition``)."""
    n = _masks.normalize(torch.as_tensor(maps, dtype=torch.float32), "max")
    if competition == "max" or len(n) < 2:
        return n
    fg = n.amax(0) > background_threshold
    if not fg.any():
        return n
    mu = n[:, fg].mean(1)                                   # (K,) mean over the foreground
    return (n - mu[:, None, None] + mu.mean()).clamp(0, 1)


def fill_empty_concepts(masks: np.ndarray, scores, min_pixels: int = 4,
                        empty_pixels: int | None = None) -> np.ndarray:
    """(K, H, W) disjoint object masks -> the same with every empty mask given a region.

    While some concept k has an empty mask (fewer than ``empty_pixels`` pixels, default
    ``min_pixels``) and another concept holds two or more separate regions (8-connected, of
    at least ``min_pixels``), the region (other than its holder's largest) in which k's
    score is highest moves to k. Pixels never change from object to
    background or back; only which object holds them."""
    from scipy import ndimage

    out = np.asarray(masks, bool).copy()
    sc = np.asarray(scores, np.float32)
    K = len(out)
    empty_pixels = min_pixels if empty_pixels is None else empty_pixels
    for _ in range(K):
        empty = [k for k in range(K) if out[k].sum() < empty_pixels]
        if not empty:
            break
        regions = []   # (holder, region mask) that could move
        for j in range(K):
            lab, n = ndimage.label(out[j], structure=np.ones((3, 3)))
            if n < 2:
                continue
            sizes = ndimage.sum(out[j], lab, range(1, n + 1))
            keep = int(np.argmax(sizes)) + 1
            regions += [(j, lab == r) for r in range(1, n + 1)
                        if r != keep and sizes[r - 1] >= min_pixels]
        if not regions:
            break
        k = empty[0]
        j, region = max(regions, key=lambda jr: float(sc[k][jr[1]].mean()))
        out[j] &= ~region
        out[k] |= region
    return out


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
    # how the object maps compete for a pixel. "max": each map divided by its max, the
    # largest wins. "centered": each max-normalised map also minus its mean over the
    # foreground (the pixels some map puts above the threshold), plus the mean of those
    # means: a token wins where it attends MORE THAN IT DOES ON AVERAGE. Tokens that start
    # from the same word have near-equal maps, and the broadest one wins every pixel under
    # "max"; "centered" splits the foreground between them (symmetry breaking, notebook 05).
    competition: str = "max"
    # an object concept whose mask came out empty takes a separate region from a concept
    # that holds two or more (the region where its own score is highest): no token is left
    # without a region while another holds two objects (``fill_empty_concepts``)
    fill_empty: bool = False

    def __post_init__(self):
        if not isinstance(self.n_timesteps, int) or self.n_timesteps < 1:
            raise ValueError(f"n_timesteps must be an integer >= 1, got {self.n_timesteps!r}")
        if not 0 <= self.background_threshold <= 1:
            raise ValueError(f"background_threshold must lie in [0, 1], got "
                             f"{self.background_threshold!r}")
        if self.competition not in COMPETITIONS:
            raise ValueError(f"competition must be one of {COMPETITIONS}, got "
                             f"{self.competition!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0 <= self.min_fraction < self.max_fraction <= 1:
            raise ValueError(f"need 0 <= min_fraction < max_fraction <= 1, got "
                             f"{self.min_fraction!r}, {self.max_fraction!r}")
        unknown = sorted(set(self.crf_params) - set(_crf.DEFAULT_CRF_PARAMS))
        if unknown:
            raise ValueError(f"unknown crf_params {unknown}; the keys are "
                             f"{sorted(_crf.DEFAULT_CRF_PARAMS)}")

    @classmethod
    def for_words(cls, init_words, **changes) -> MaskConfig:
        """The E-step's defaults for how the tokens start.

        When the object tokens start equal (one repeated word or random rows: the paper's
        setting; :func:`conceptlab.train.config.tokens_start_equal`) the maps compete by
        the "centered" rule, where "max" lets the broadest map take every pixel, and the
        CRF's unaries are softer (temperature 0.3): the setting measured best there
        (``docs/results.md``). Class words keep "max" and temperature 0.1.

        Args:
            init_words: one word (or None) per concept.
            **changes: fields to set explicitly; they win over the defaults.
        """
        from .train.config import tokens_start_equal

        if tokens_start_equal(init_words, changes.get("background_word") or "background"):
            changes = {"competition": "centered", "temperature": 0.3, **changes}
        return cls(**changes)

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
                   background: int | None = None, resize: bool = False,
                   concepts=None) -> MaskEstimate:
    """E-step for one image: masks of the concepts whose tokens are ``tokens``.

    Args:
        pipe: a Stable-Diffusion-style pipeline.
        image: a path, PIL image, (H, W, 3) array or tensor at the pipeline's native size
            (another size: an error, or resized with a warning if ``resize=True``).
        tokens: the concept tokens shown in the image, e.g. ``["[v1]", "[v2]"]``.
        prompt: default ``"a photo of [v1] and [v2]"``.
        config: the E-step's settings (default ``MaskConfig()``).
        seed: seeds the timesteps and noise of the attention maps.
        background: index (into ``tokens``) of the concept that is the image's background:
            the other concepts are assigned (and CRF-refined) against the background
            channel, and this one gets what that channel keeps. None: every concept is
            assigned from its own map, and unclaimed pixels belong to no one.
        resize: resize an image of another size instead of refusing it.
        concepts: learned concepts (ConceptTokens, LearnedConcepts) applied for this call
            only, so that ``tokens`` may name theirs.

    Returns:
        MaskEstimate: the masks, the maps they came from, the masks before the CRF.
    """
    if concepts is not None:
        with getattr(concepts, "tokens", concepts).applied(pipe):
            return estimate_masks(pipe, image, tokens, prompt=prompt, config=config, seed=seed,
                                  background=background, resize=resize)
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
        scores = competition_scores(up[objs], cfg.background_threshold, cfg.competition)
        # scores are already in [0, 1]: "max" re-normalising leaves "max" scores unchanged
        # and would undo the centring, so the label probabilities are built here
        hard[objs] = np.asarray(_masks.assign_masks(scores, cfg.background_threshold,
                                                    normalize_mode="none"), bool)
        if cfg.crf:
            backend = _crf.crf_backend()
            probs = _masks.unary_from_maps(scores, cfg.background_threshold, cfg.temperature,
                                           normalize_mode="none")
            refined[objs] = np.asarray(_crf.refine_masks(
                img, probs, kind="probs", **cfg.crf_params), bool)
        else:
            refined[objs] = hard[objs]
        if cfg.fill_empty:
            # "empty" as EM's guard counts it (check_masks: under min_fraction of the image),
            # so that a sliver of a few pixels also takes a region
            refined[objs] = fill_empty_concepts(
                refined[objs], scores.numpy(),
                empty_pixels=max(4, int(np.ceil(cfg.min_fraction * H * W))))
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


def estimate_all_masks(pipe, images, tokens, words, config: MaskConfig, *, step: int,
                       previous=None, seed: int = 0, warn_list=None) -> list[np.ndarray]:
    """EM's E-step over every image: masks from the current tokens' attention.

    Args:
        pipe: a pipeline with the concept tokens applied.
        images: (H, W, 3) uint8 arrays.
        tokens: per image, the concept tokens it shows.
        words: per image, their init words (the background concept is found by its word).
        config: the E-step's settings.
        step: the training step (it seeds the noise: ``seed + 1000 * step + i``).
        previous: the masks so far; an empty or full new mask keeps its previous one
            (:func:`check_masks`). At the first E-step (None) such a mask is the
            attention above its mean instead.
        seed: the run's seed.
        warn_list: a list that collects the warnings.

    Returns:
        Per image, (K_i, H, W) bool masks.
    """
    warn_list = [] if warn_list is None else warn_list
    out = []
    for i, img in enumerate(images):
        bg = background_index(words[i], config.background_word)
        est = estimate_masks(pipe, img, tokens[i], config=config, seed=seed + 1000 * step + i,
                             background=bg)
        m = check_masks(est.masks, None if previous is None else previous[i], tokens[i], step,
                        warn_list, config)
        area = m.reshape(len(m), -1).mean(1)
        bad = (area < config.min_fraction) | (area > config.max_fraction)
        if previous is None and bad.any():  # nothing to keep: each map above its mean
            m = np.where(bad[:, None, None], fallback_masks(est, *img.shape[:2]), m)
        out.append(m)
    return out


def e_step_schedule(total: int, em_every: int | None, method: str) -> list[int]:
    """Steps at which the masks are (re-)estimated: every ``em_every`` steps (default: a
    quarter of ``total``) for "em", and once at step 0 for "fixed". EM also does one at
    ``total``."""
    if method != "em":
        return [0]
    every = em_every or max(1, total // 4)
    return list(range(0, total, every))


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


__all__ = [
    "MaskConfig",
    "MaskEstimate",
    "background_index",
    "check_masks",
    "e_step_schedule",
    "estimate_all_masks",
    "estimate_masks",
    "fallback_masks",
]
