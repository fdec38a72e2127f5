"""Learning concept tokens AND their masks together, without user masks (the EM method).

    concepts = learn_concepts(pipe, image, ["star", "heart", "background"])
    concepts.masks[0]          # (K, H, W) bool, one mask per concept, found by the method
    generate(pipe, concepts, "a photo of [v1] and [v2]")

The alternation (see ``shared/METHOD.md`` in the course, and notebook 05):

- **E-step** (model frozen): run the U-Net on the noised image at many timesteps with a
  prompt naming every concept token, average each token's cross-attention map over
  timesteps, normalise, assign each pixel to a concept or to "nothing" (argmax against a
  constant background channel) and refine with a DenseCRF on the image colours.
- **M-step**: train the tokens with the masked diffusion loss and the cross-attention
  loss, with the current masks (``conceptlab.training.ConceptTrainer``).
- Repeat the E-step every ``em_every`` steps with the improved tokens.

Baselines through the same call: ``method="fixed"`` (E-step once at step 0),
``method="given"`` (masks passed in: Break-a-Scene), ``method="none"`` (no masks: plain
textual inversion on the whole image, no attention loss). With ``gt_masks`` (evaluation
only, never used for training) the IoU of the masks at every E-step is recorded.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from . import crf as _crf
from . import masks as _masks
from .concepts import ConceptTokens, add_concept_tokens, load_concepts, save_concepts
from .maps import attention_maps
from .pipeline import native_size, to_uint8_image
from .training import ConceptImage, ConceptTrainer, TrainConfig, TrainingHistory

METHODS = ("em", "fixed", "given", "none")


@dataclass
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


@dataclass
class MaskEstimate:
    masks: np.ndarray  # (K, H, W) bool, disjoint
    maps: np.ndarray  # (K, h, w) raw timestep-averaged attention of each concept token
    masks_no_crf: np.ndarray  # (K, H, W) bool, argmax with background, before the CRF
    prompt: str
    crf_backend: str | None = None


def estimate_masks(pipe, image, tokens: list[str], *, prompt: str | None = None,
                   config: MaskConfig | None = None, seed: int = 0,
                   background: int | None = None) -> MaskEstimate:
    """E-step for one image: masks of the concepts whose tokens are ``tokens``.

    image       (H, W, 3) uint8 / PIL at the pipeline's native size
    tokens      the concept tokens present in the image, e.g. ["[v1]", "[v2]"]
    prompt      default: "a photo of [v1] and [v2]"
    background  index (into ``tokens``) of the concept that is the image's background: the
                other concepts are assigned (and CRF-refined) against the background
                channel, and this concept gets what that channel keeps. None: every
                concept is assigned from its own map, unclaimed pixels belong to no one.
    """
    cfg = config or MaskConfig()
    img = to_uint8_image(image, native_size(pipe))
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


@dataclass
class Concepts:
    """What :func:`learn_concepts` returns (and :meth:`save` / :meth:`load` round-trip)."""

    tokens: ConceptTokens
    method: str
    images: list  # (H, W, 3) uint8 per image
    concept_ids: list  # per image: which concepts it shows (mask row j = concept ids[j])
    masks: list  # per image: (K_i, H, W) bool final masks
    history: TrainingHistory | None = None
    e_steps: list = field(default_factory=list)  # steps at which masks were (re)estimated
    mask_history: list = field(default_factory=list)  # per E-step: list per image of masks
    iou_history: list = field(default_factory=list)  # per E-step: (K,) IoU per concept
    warnings: list = field(default_factory=list)
    # evaluation only (gt_masks given): IoU of masks re-estimated from the CURRENT tokens'
    # attention at the E-step schedule, for every method (for "em" they are the masks used)
    eval_steps: list = field(default_factory=list)
    eval_iou_history: list = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return list(self.tokens.names)

    @property
    def embeddings(self) -> torch.Tensor:
        return self.tokens.embeddings

    def latent_masks(self, pipe_or_factor=4) -> list:
        """Masks at latent resolution (nearest), per image: (K_i, H/f, W/f) bool."""
        f = pipe_or_factor if isinstance(pipe_or_factor, int) else pipe_or_factor.vae_scale_factor
        return [np.asarray(_masks.resize_mask(m, (m.shape[1] // f, m.shape[2] // f)), bool)
                for m in self.masks]

    def mean_iou(self, step: int = -1) -> float:
        return float(np.mean(self.iou_history[step])) if self.iou_history else float("nan")

    # ------------------------------------------------------------------ persistence
    def save(self, directory) -> str:
        os.makedirs(directory, exist_ok=True)
        save_concepts(self.tokens, directory)
        arrays = {f"image_{i}": im for i, im in enumerate(self.images)}
        arrays.update({f"masks_{i}": m for i, m in enumerate(self.masks)})
        for s, per_image in enumerate(self.mask_history):
            for i, m in enumerate(per_image):
                arrays[f"history_{s}_{i}"] = m
        np.savez_compressed(os.path.join(directory, "masks.npz"), **arrays)
        meta = {"method": self.method, "concept_ids": self.concept_ids, "e_steps": self.e_steps,
                "iou_history": self.iou_history, "warnings": self.warnings,
                "eval_steps": self.eval_steps, "eval_iou_history": self.eval_iou_history,
                "names": self.names, "n_images": len(self.images)}
        with open(os.path.join(directory, "em.json"), "w") as f:
            json.dump(meta, f, indent=1)
        if self.history is not None:
            self.history.to_json(os.path.join(directory, "history.json"))
        return str(directory)

    @classmethod
    def load(cls, directory, pipe) -> Concepts:
        """Load saved concepts and add their tokens to ``pipe`` (ready to generate)."""
        meta = json.load(open(os.path.join(directory, "em.json")))
        tokens = load_concepts(pipe, directory)
        z = np.load(os.path.join(directory, "masks.npz"))
        n = meta["n_images"]
        hist = []
        for s in range(len(meta["e_steps"])):
            hist.append([z[f"history_{s}_{i}"] for i in range(n) if f"history_{s}_{i}" in z])
        h = os.path.join(directory, "history.json")
        return cls(tokens, meta["method"], [z[f"image_{i}"] for i in range(n)],
                   meta["concept_ids"], [z[f"masks_{i}"] for i in range(n)],
                   TrainingHistory.from_json(h) if os.path.exists(h) else None,
                   meta["e_steps"], hist, meta["iou_history"], meta["warnings"],
                   meta.get("eval_steps", []), meta.get("eval_iou_history", []))

    # ------------------------------------------------------------------ figures
    def plot_mask_evolution(self, image: int = 0, scale: float = 1.3):
        """Rows: E-steps; columns: the image with each concept's mask."""
        import matplotlib.pyplot as plt

        from .figures import overlay_masks

        rows = self.mask_history or [self.masks]
        steps = self.e_steps or [0]
        K = rows[0][image].shape[0]
        fig, axes = plt.subplots(len(rows), K + 1, figsize=(scale * (K + 1), scale * len(rows)),
                                 squeeze=False)
        img = self.images[image]
        for r, per_image in enumerate(rows):
            m = per_image[image]
            axes[r][0].imshow(overlay_masks(img, m))
            axes[r][0].set_ylabel(f"step {steps[r]}", fontsize=8)
            for k in range(K):
                axes[r][k + 1].imshow(m[k], cmap="gray", vmin=0, vmax=1)
                title = self.names[self.concept_ids[image][k]]
                if self.iou_history and image == 0:
                    title += f"\nIoU {self.iou_history[r][self.concept_ids[image][k]]:.2f}"
                if r == 0 or self.iou_history:
                    axes[r][k + 1].set_title(title, fontsize=7)
            for ax in axes[r]:
                ax.set_xticks([])
                ax.set_yticks([])
        fig.tight_layout()
        return fig


def _schedule(total: int, em_every: int | None, method: str) -> list[int]:
    if method != "em":
        return [0]
    every = em_every or max(1, total // 4)
    return list(range(0, total, every))  # plus a final E-step at the end (learn_concepts)


def _check_masks(new, old, names, step, warn_list, cfg: MaskConfig):
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


def _fallback_masks(est: MaskEstimate, H, W):
    """Disjoint masks from each map above its own mean (used when the E-step is empty)."""
    up = _masks.resize_map(torch.from_numpy(est.maps), (H, W))
    m = (up > up.mean((1, 2), keepdim=True)).numpy()
    owner = up.argmax(0).numpy()
    return np.stack([m[k] & (owner == k) for k in range(len(m))])


def learn_concepts(pipe, images, init_words, *, method: str = "em", masks=None,
                   concept_images=None, steps: int | None = None, em_every: int | None = None,
                   config: TrainConfig | None = None, mask_config: MaskConfig | None = None,
                   seed: int = 0, progress: bool = True, checkpoint_dir=None,
                   gt_masks=None, token_prefix: str = "v") -> Concepts:
    """Learn one token per concept (and, with ``method="em"``, its mask) from images.

    images          one image or a list ((H, W, 3) uint8 / PIL / path) at the model's size
    init_words      one class word per concept (e.g. ["star", "heart", "background"]);
                    None entries start from a random embedding
    concept_images  per image, the concept indices it shows (default: every concept in
                    every image); concept k's mask row in image i is its position in that list
    masks           method="given": per image (K_i, H, W) bool masks (Break-a-Scene)
    steps, em_every training steps (default: the config's) and E-step period
                    (default: 4 E-steps per run, at 0, T/4, T/2, 3T/4)
    gt_masks        per image (K_i, H, W) ground truth, for the IoU history ONLY
    checkpoint_dir  resumable: an interrupted run continued from here gives the same
                    result as an uninterrupted one
    config          training settings; default ``TrainConfig.for_model(pipe, method)``
                    (the bundled or Stable Diffusion preset; lambda_attn 0.1 for EM on the
                    bundled model)
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(images, (np.ndarray, str, os.PathLike)) or hasattr(images, "convert"):
        images = [images]
    size = native_size(pipe)
    imgs = [to_uint8_image(im, size, resize=True) for im in images]
    K = len(init_words)
    if K < 1:
        raise ValueError("init_words must name at least one concept, e.g. ['shape', 'background']")
    ids = concept_images or [list(range(K)) for _ in imgs]
    if len(ids) != len(imgs):
        raise ValueError(f"{len(imgs)} images but concept_images has {len(ids)} entries")
    ids = [list(range(K)) if c == "all" else [int(x) for x in c] for c in ids]
    if sorted({c for cs in ids for c in cs}) != list(range(K)):
        raise ValueError(f"every concept 0..{K - 1} must appear in some image: {ids}")
    if method == "given":
        if masks is None:
            raise ValueError("method='given' needs masks=[(K_i, H, W) bool per image]")
        masks = [np.asarray(m, bool) for m in (masks if isinstance(masks, (list, tuple)) else [masks])]
    if gt_masks is not None:
        gt_masks = [np.asarray(m, bool) for m in (gt_masks if isinstance(gt_masks, (list, tuple)) else [gt_masks])]
    cfg = (config or TrainConfig.for_model(pipe, method)).replace(seed=seed)
    if steps is not None:
        cfg = cfg.replace(steps=steps)
    if method == "none":
        cfg = cfg.replace(lambda_attn=0.0)
    mcfg = mask_config or MaskConfig()
    total = cfg.total_steps

    # tokens (reuse those already in the pipeline when resuming)
    names = [f"[{token_prefix}{i + 1}]" for i in range(K)]
    state_path = os.path.join(checkpoint_dir, "em_state.npz") if checkpoint_dir else None
    resuming = bool(state_path and os.path.exists(state_path))
    if resuming and all(pipe.tokenizer.convert_tokens_to_ids(n) != pipe.tokenizer.unk_token_id
                        for n in names):
        tokens = load_concepts(pipe, checkpoint_dir)
    else:
        tokens = add_concept_tokens(pipe, names, list(init_words), seed=seed)
    H = W = size
    result = Concepts(tokens, method, imgs, ids, [])

    def background_of(cs):
        return background_index([init_words[c] for c in cs], mcfg.background_word)

    def e_step(step, previous, warn_list=None):
        warn_list = result.warnings if warn_list is None else warn_list
        per_image = []
        for i, img in enumerate(imgs):
            est = estimate_masks(pipe, img, [names[c] for c in ids[i]], config=mcfg,
                                 seed=seed + 1000 * step + i, background=background_of(ids[i]))
            m = _check_masks(est.masks, None if previous is None else previous[i],
                             [names[c] for c in ids[i]], step, warn_list, mcfg)
            area = m.reshape(len(m), -1).mean(1)
            bad = (area < mcfg.min_fraction) | (area > mcfg.max_fraction)
            if previous is None and bad.any():  # nothing to keep: each map above its mean
                m = np.where(bad[:, None, None], _fallback_masks(est, H, W), m)
            per_image.append(m)
        return per_image

    def ious_of(per_image):
        ious, count = np.zeros(K), np.zeros(K)
        for i, m in enumerate(per_image):
            for j, c in enumerate(ids[i]):
                ious[c] += float(_masks.iou(m[j], gt_masks[i][j]))
                count[c] += 1
        return (ious / np.maximum(count, 1)).round(4).tolist()

    def record(step, per_image):
        result.e_steps.append(int(step))
        result.mask_history.append([m.copy() for m in per_image])
        if gt_masks is not None:
            result.iou_history.append(ious_of(per_image))

    last_eval = [None]

    def evaluate(step, per_image_used):
        """Evaluation only: IoU of masks estimated from the current tokens."""
        if gt_masks is None or step in result.eval_steps:
            return
        if method == "em":
            per_image = per_image_used
        else:  # the same estimator as EM's E-step, its warnings kept apart
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                per_image = e_step(step, last_eval[0], warn_list=[])
            last_eval[0] = per_image
        result.eval_steps.append(int(step))
        result.eval_iou_history.append(ious_of(per_image))

    def data_for(per_image):
        return [ConceptImage(img, m, c) for img, m, c in zip(imgs, per_image, ids)]

    schedule = _schedule(total, em_every, method)
    eval_schedule = sorted(set(_schedule(total, em_every, "em")) | {total}) \
        if gt_masks is not None else []
    if resuming:
        z = np.load(state_path, allow_pickle=False)
        meta = json.loads(str(z["meta"]))
        current = [z[f"current_{i}"] for i in range(len(imgs))]
        result.e_steps, result.iou_history, result.warnings = (
            meta["e_steps"], meta["iou_history"], meta["warnings"])
        result.eval_steps, result.eval_iou_history = meta["eval_steps"], meta["eval_iou_history"]
        result.mask_history = [[z[f"hist_{s}_{i}"] for i in range(len(imgs))]
                               for s in range(len(meta["e_steps"]))]
    elif method == "given":
        current = masks
        record(0, current)
    elif method == "none":
        current = [np.ones((len(c), H, W), bool) for c in ids]
        record(0, current)
    else:
        current = e_step(0, None)
        record(0, current)

    def save_state():
        if not checkpoint_dir:
            return
        os.makedirs(checkpoint_dir, exist_ok=True)
        arrays = {f"current_{i}": m for i, m in enumerate(current)}
        for s, per in enumerate(result.mask_history):
            for i, m in enumerate(per):
                arrays[f"hist_{s}_{i}"] = m
        meta = {"e_steps": result.e_steps, "iou_history": result.iou_history,
                "warnings": result.warnings, "eval_steps": result.eval_steps,
                "eval_iou_history": result.eval_iou_history}
        np.savez(state_path + ".tmp.npz", meta=json.dumps(meta), **arrays)
        os.replace(state_path + ".tmp.npz", state_path)

    trainer = ConceptTrainer(pipe, data_for(current), tokens, cfg, progress=progress,
                             checkpoint_dir=checkpoint_dir, resume=True)
    try:
        if trainer.step_count == 0:
            evaluate(0, current)
        save_state()
        every = cfg.checkpoint_every or total
        while trainer.step_count < total:
            nxt = min([s for s in schedule + eval_schedule if s > trainer.step_count] + [total])
            nxt = min(nxt, (trainer.step_count // every + 1) * every)
            trainer.train(nxt - trainer.step_count)
            if trainer.history.interrupted:
                result.warnings.append(f"interrupted at step {trainer.step_count}")
                break
            if trainer.step_count in schedule and trainer.step_count not in result.e_steps:
                current = e_step(trainer.step_count, current)
                record(trainer.step_count, current)
                trainer.set_data(data_for(current))
            if method == "em" and trainer.step_count == total and total not in result.e_steps:
                current = e_step(total, current)  # final masks: from the final tokens
                record(total, current)
            if trainer.step_count in eval_schedule:
                evaluate(trainer.step_count, current)
            save_state()
            if checkpoint_dir:
                trainer.save_checkpoint()
    finally:
        trainer.close()
    result.masks = current
    result.history = trainer.history
    return result


def background_index(words, background_word: str | None = "background") -> int | None:
    """Position of the one concept whose init word is ``background_word`` (case-insensitive);
    None when there is none, more than one, or ``background_word`` is None."""
    if not background_word:
        return None
    hits = [j for j, w in enumerate(words)
            if w is not None and str(w).lower() == background_word.lower()]
    return hits[0] if len(hits) == 1 else None


def evaluate_masks(pipe, concepts: Concepts, gt_masks, *, mask_config: MaskConfig | None = None,
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
    "METHODS",
    "Concepts",
    "MaskConfig",
    "MaskEstimate",
    "background_index",
    "estimate_masks",
    "evaluate_masks",
    "learn_concepts",
]
