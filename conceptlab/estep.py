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
    # EM's guard (``assignment_error``): new masks are kept only if the concepts' own
    # prompts explain the image's pixels under them no worse than under the previous masks
    guard: bool = False

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


@torch.no_grad()
def concept_errors(pipe, image, tokens: list[str], *, n_timesteps: int = 8,
                   seed: int = 0) -> torch.Tensor:
    """(K, h, w): for each token k, the squared error of "a photo of [vk]"'s prediction
    of the diffusion target of ``n_timesteps`` noised copies of the image (the same t and
    noise for every token), per latent pixel, averaged over channels and copies."""
    from diffusers import DDPMScheduler

    from .models import encode_image, encode_prompt
    from .train.trainer import diffusion_target

    z0 = encode_image(pipe, image).float()
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(seed)
    n_train = sched.config.num_train_timesteps
    t = torch.linspace(0, n_train - 1, n_timesteps + 2)[1:-1].round().long()
    noise = torch.randn((n_timesteps, *z0.shape[1:]), generator=g)
    z0n = z0.expand(n_timesteps, -1, -1, -1).to(noise)
    zt = sched.add_noise(z0n, noise, t)
    target = diffusion_target(sched, z0n, noise, t)
    unet = pipe.unet
    emb = encode_prompt(pipe, [f"a photo of {tok}" for tok in tokens])       # (K, T, D)
    errs = []
    for k in range(len(tokens)):
        e = emb[k:k + 1].expand(n_timesteps, -1, -1).to(unet.dtype)
        pred = unet(zt.to(unet.device, unet.dtype), t.to(unet.device), e).sample.float().cpu()
        errs.append(((pred - target) ** 2).mean((0, 1)))                   # (h, w)
    return torch.stack(errs)


def assignment_error(pipe, image, tokens: list[str], masks, *, n_timesteps: int = 8,
                     seed: int = 0, errors: torch.Tensor | None = None) -> float:
    """How well each concept's own prompt explains the pixels its mask gives it.

    With ``err_k(p)`` from :func:`concept_errors` (pass ``errors`` to score several mask
    sets of one image without recomputing them), returns
    ``sum_k sum_p M_k(p) err_k(p) / sum_p sum_k M_k(p)`` with the masks area-downsampled to
    the latent grid: the masked diffusion loss of the M-step, read as a function of the
    masks. Lower is better; EM's guard (``MaskConfig.guard``) keeps an E-step's masks only
    if this does not rise (hard EM: the M-step lowers it for fixed masks, so the loop is
    then monotone in it)."""
    err = errors if errors is not None else concept_errors(
        pipe, image, tokens, n_timesteps=n_timesteps, seed=seed)
    m = torch.as_tensor(np.asarray(masks, np.float32))[None]
    w = torch.nn.functional.adaptive_avg_pool2d(m, err.shape[-2:])[0]       # (K, h, w)
    return float((w * err).sum() / w.sum().clamp_min(1e-8))


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
