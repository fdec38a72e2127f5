"""Learning concept tokens AND their masks together, without user masks (the EM method).

    result = learn_concepts(pipe, image, ["star", "heart", "background"])
    result.masks[0]            # (K, H, W) bool, one mask per concept, found by the method
    generate(pipe, result, "a photo of [v1] and [v2]")

The alternation (``docs/cheatsheet.md``; notebook 05 writes it out by hand), a hard-EM /
coordinate ascent in which the masks are the latent variables:

- **E-step** (:func:`conceptlab.estep.estimate_masks`, model frozen): masks from each
  token's timestep-averaged cross-attention, assigned against a background channel and
  refined by a DenseCRF;
- **M-step** (:class:`conceptlab.train.ConceptTrainer`): train the tokens with the masked
  diffusion loss and the cross-attention loss on the current masks;
- repeat the E-step every ``em_every`` steps, and once more at the end of phase 1;
- with a phase 2 in the config (``TrainConfig.phase2``), the tokens and the U-Net are then
  trained together on those final masks (Break-a-Scene's second phase).

Nothing guarantees that an E-step improves a mask (the CRF and the threshold are not part
of the training objective), so every new mask goes through
:func:`conceptlab.estep.check_masks`: an empty or full mask keeps the previous one.

Baselines through the same call: ``method="fixed"`` (E-step once at step 0),
``method="given"`` (masks passed in: Break-a-Scene), ``method="none"`` (no masks: plain
textual inversion on the whole image, no attention loss). With ``gt_masks`` (evaluation
only, never used for training) the IoU of the masks at every E-step is recorded.

Runs with a ``checkpoint_dir`` resume exactly: an interrupted run (Ctrl-C, a kill, during
an M-step or an E-step) continued with the same call gives the same result as an
uninterrupted one. The folder records a fingerprint of the inputs; another run into it is
refused (``overwrite=True`` replaces it), and so is a finished one.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings

import numpy as np

from . import masks as _masks
from .estep import (
    MaskConfig,
    assignment_error,
    background_index,
    check_masks,
    concept_errors,
    estimate_masks,
    fallback_masks,
)
from .fileio import atomic_save, atomic_write_json
from .models import native_size, to_uint8
from .result import LearnedConcepts
from .tokens import CONCEPTS_FILE, UNET_DELTA_FILE, add_concept_tokens, load_concepts, model_name
from .train import ConceptImage, ConceptTrainer, TrainConfig

METHODS = ("em", "fixed", "given", "none")
RUN_FILE = "run.json"
STATE_FILE = "em_state.npz"


def _best_order(masks, gt, words, background_word) -> list[int]:
    """order[j]: the ground-truth row that mask j is scored against, the permutation of
    the non-background rows with the largest summed IoU (the background keeps its row)."""
    import itertools

    bg = background_index(words, background_word)
    objs = [j for j in range(len(masks)) if j != bg]
    best, best_score = list(range(len(masks))), -1.0
    for perm in itertools.permutations(objs):
        score = sum(float(_masks.iou(masks[j], gt[p])) for j, p in zip(objs, perm))
        if score > best_score:
            order = list(range(len(masks)))
            for j, p in zip(objs, perm):
                order[j] = p
            best, best_score = order, score
    return best


def e_step_schedule(total: int, em_every: int | None, method: str) -> list[int]:
    """Steps at which the masks are (re-)estimated (EM also does one at ``total``)."""
    if method != "em":
        return [0]
    every = em_every or max(1, total // 4)
    return list(range(0, total, every))


def _as_images(images, size, resize: bool = False) -> list[np.ndarray]:
    # a list or tuple is several images; anything else is one (to_uint8 says what is wrong)
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if not images:
        raise ValueError("no images given: pass one image or a list of them")
    return [to_uint8(im, size, resize=resize) for im in images]


def _as_mask_list(masks, n_images, ids, H, W, what):
    masks = list(masks) if isinstance(masks, (list, tuple)) else [masks]
    if len(masks) != n_images:
        raise ValueError(f"{what}: {len(masks)} mask arrays for {n_images} images")
    out = []
    for i, m in enumerate(masks):
        m = np.asarray(m)
        if m.ndim == 2:
            m = m[None]
        if m.shape[0] != len(ids[i]):
            raise ValueError(f"{what}: image {i} shows {len(ids[i])} concepts but has "
                             f"{m.shape[0]} masks")
        if m.shape[1:] != (H, W):
            m = np.asarray(_masks.resize_mask(m.astype(bool), (H, W)), bool)
        out.append(m.astype(bool))
    return out


def run_fingerprint(pipe, imgs, init_words, ids, method, cfg, mcfg, em_every, masks,
                    token_prefix) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"init_words": [None if w is None else str(w) for w in init_words],
                         "concept_images": ids, "method": method, "config": cfg.to_dict(),
                         "mask_config": repr(mcfg), "em_every": em_every,
                         "token_prefix": token_prefix,
                         "model": os.path.basename(model_name(pipe).rstrip("/"))},
                        sort_keys=True).encode())
    for im in imgs:
        h.update(im.tobytes())
    for m in masks or []:
        h.update(np.packbits(m).tobytes())
    return h.hexdigest()


def _claim_folder(checkpoint_dir, fingerprint, overwrite) -> bool:
    """Make ``checkpoint_dir`` this run's: True when it holds this run, unfinished (resume)."""
    run_path = os.path.join(checkpoint_dir, RUN_FILE)
    state = [f for f in (RUN_FILE, STATE_FILE, "checkpoint.pt")
             if os.path.exists(os.path.join(checkpoint_dir, f))]
    if state:
        run = {}
        if os.path.exists(run_path):
            with open(run_path) as f:
                run = json.load(f)
        same = run.get("fingerprint") == fingerprint
        if not overwrite:
            if not same:
                raise ValueError(
                    f"{checkpoint_dir} holds the checkpoint of another run (other images, "
                    "words, method or settings): pass overwrite=True (CLI: --overwrite) to "
                    "replace it, or use another folder")
            if run.get("finished"):
                raise ValueError(
                    f"{checkpoint_dir} holds this run, finished: load it with "
                    "LearnedConcepts.load (CLI: the --out folder), or pass overwrite=True "
                    "(CLI: --overwrite) to run it again")
            return True
        for f in (RUN_FILE, STATE_FILE, "checkpoint.pt", CONCEPTS_FILE, UNET_DELTA_FILE):
            if os.path.exists(os.path.join(checkpoint_dir, f)):  # only this module's files
                os.remove(os.path.join(checkpoint_dir, f))
    os.makedirs(checkpoint_dir, exist_ok=True)
    atomic_write_json(run_path, {"fingerprint": fingerprint, "finished": False})
    return False


def learn_concepts(pipe, images, init_words, *, method: str = "em", masks=None,
                   concept_images=None, steps: int | None = None, em_every: int | None = None,
                   config: TrainConfig | None = None, mask_config: MaskConfig | None = None,
                   seed: int = 0, progress: bool = True, checkpoint_dir=None,
                   overwrite: bool = False, gt_masks=None,
                   token_prefix: str = "v", resize: bool = False,
                   match_gt: bool = False) -> LearnedConcepts:
    """Learn one token per concept (and, with ``method="em"``, its mask) from images.

    images          one image or a list (path / PIL / (H, W, 3) array / tensor), at the
                    model's size; another size is an error unless ``resize=True`` (resized
                    with a warning), as in ``attention_maps`` and ``estimate_masks``
    init_words      one class word per concept (e.g. ["star", "heart", "background"]);
                    None entries start from a random embedding
    concept_images  per image, the concept indices it shows (default: every concept in
                    every image); concept k's mask row in image i is its position in that list
    masks           method="given": per image (K_i, H, W) bool masks (Break-a-Scene)
    steps, em_every training steps (default: the config's) and E-step period
                    (default: 4 E-steps per run, at 0, T/4, T/2, 3T/4, and one at T)
    gt_masks        per image (K_i, H, W) ground truth, for the IoU history ONLY
    match_gt        score each image's object concepts against the ground-truth objects
                    in the order that fits best (the background keeps its row): tokens
                    that start from one shared word have no order of their own
    checkpoint_dir  resumable (see the module doc); ``overwrite`` replaces what is there
    config          training settings; default ``TrainConfig.for_model(pipe, method)``
    Returns a :class:`~conceptlab.result.LearnedConcepts`; ``.complete`` is False when
    the run was interrupted (Ctrl-C): call again with the same arguments to resume.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(init_words, str) or not isinstance(init_words, (list, tuple)):
        raise TypeError(f"init_words must be a list of words (one per concept), got "
                        f"{init_words!r}: e.g. ['star', 'heart', 'background']")
    K = len(init_words)
    if K < 1:
        raise ValueError("init_words must name at least one concept, e.g. ['shape', 'background']")
    for w in init_words:
        if w is not None and (not isinstance(w, str) or not w.strip()):
            raise ValueError(f"each init word must be a non-empty string or None, got {w!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if em_every is not None and (isinstance(em_every, bool) or not isinstance(em_every, int)
                                 or em_every < 1):
        raise ValueError(f"em_every must be an integer >= 1, got {em_every!r}")
    size = native_size(pipe)
    imgs = _as_images(images, size, resize)
    H = W = size
    ids = concept_images or [list(range(K)) for _ in imgs]
    if len(ids) != len(imgs):
        raise ValueError(f"{len(imgs)} images but concept_images has {len(ids)} entries")
    ids = [list(range(K)) if c == "all" else [int(x) for x in c] for c in ids]
    for i, cs in enumerate(ids):
        if not cs or len(set(cs)) != len(cs) or not all(0 <= c < K for c in cs):
            raise ValueError(f"concept_images[{i}] = {cs}: a non-empty list of distinct "
                             f"concept indices in 0..{K - 1}")
    if sorted({c for cs in ids for c in cs}) != list(range(K)):
        raise ValueError(f"every concept 0..{K - 1} must appear in some image: {ids}")
    if method == "given":
        if masks is None:
            raise ValueError("method='given' needs masks=[(K_i, H, W) bool per image]")
        masks = _as_mask_list(masks, len(imgs), ids, H, W, "masks")
    elif masks is not None:
        raise ValueError(f"masks are only used by method='given' (got method={method!r})")
    if gt_masks is not None:
        gt_masks = _as_mask_list(gt_masks, len(imgs), ids, H, W, "gt_masks")
    cfg = (config or TrainConfig.for_model(pipe, method)).replace(seed=seed)
    if steps is not None:
        cfg = cfg.replace(steps=steps)
    if method == "none":
        cfg = cfg.replace(lambda_attn=0.0)
    mcfg = mask_config or MaskConfig()
    total = cfg.total_steps
    names = [f"[{token_prefix}{i + 1}]" for i in range(K)]
    # each concept token is ONE token once added: count it as a one-token word ("a")
    one = ["a"] * K
    longest = "a photo of " + " and ".join(one)
    n_tok = len(pipe.tokenizer(cfg.template.format(cfg.joiner.join(one))).input_ids)
    if n_tok > pipe.tokenizer.model_max_length or \
            len(pipe.tokenizer(longest).input_ids) > pipe.tokenizer.model_max_length:
        raise ValueError(f"{K} concepts make a prompt of {n_tok} tokens, more than the text "
                         f"encoder's {pipe.tokenizer.model_max_length}: learn fewer concepts "
                         "per image")

    resuming = False
    if checkpoint_dir:
        checkpoint_dir = str(checkpoint_dir)
        fp = run_fingerprint(pipe, imgs, init_words, ids, method, cfg, mcfg, em_every, masks,
                             token_prefix)
        resuming = _claim_folder(checkpoint_dir, fp, overwrite)
    state_path = os.path.join(checkpoint_dir, STATE_FILE) if checkpoint_dir else None
    resuming = resuming and os.path.exists(state_path)
    if resuming and all(pipe.tokenizer.convert_tokens_to_ids(n) != pipe.tokenizer.unk_token_id
                        for n in names):
        tokens = load_concepts(pipe, checkpoint_dir)
    else:
        tokens = add_concept_tokens(pipe, names, list(init_words), seed=seed)
    result = LearnedConcepts(tokens, method, imgs, ids, [])

    def e_step(step, previous, warn_list=None):
        warn_list = result.warnings if warn_list is None else warn_list
        per_image = []
        for i, img in enumerate(imgs):
            bg = background_index([init_words[c] for c in ids[i]], mcfg.background_word)
            est = estimate_masks(pipe, img, [names[c] for c in ids[i]], config=mcfg,
                                 seed=seed + 1000 * step + i, background=bg)
            m = check_masks(est.masks, None if previous is None else previous[i],
                            [names[c] for c in ids[i]], step, warn_list, mcfg)
            if mcfg.guard and previous is not None:
                toks = [names[c] for c in ids[i]]
                err = concept_errors(pipe, img, toks, seed=seed + i)   # once for both
                e_new = assignment_error(pipe, img, toks, m, errors=err)
                e_old = assignment_error(pipe, img, toks, previous[i], errors=err)
                if e_new > e_old:
                    warn_list.append(f"step {step}: image {i}: the new masks explain the "
                                     f"image worse ({e_new:.4f} > {e_old:.4f}); keeping the "
                                     "previous masks")
                    m = previous[i].copy()
            area = m.reshape(len(m), -1).mean(1)
            bad = (area < mcfg.min_fraction) | (area > mcfg.max_fraction)
            if previous is None and bad.any():  # nothing to keep: each map above its mean
                m = np.where(bad[:, None, None], fallback_masks(est, H, W), m)
            per_image.append(m)
        return per_image

    def ious_of(per_image):
        ious, count = np.zeros(K), np.zeros(K)
        for i, m in enumerate(per_image):
            order = (_best_order(m, gt_masks[i], [init_words[c] for c in ids[i]],
                                 mcfg.background_word) if match_gt else range(len(ids[i])))
            for j, c in enumerate(ids[i]):
                ious[c] += float(_masks.iou(m[j], gt_masks[i][order[j]]))
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

    def save_state():
        if not checkpoint_dir:
            return
        arrays = {f"current_{i}": m for i, m in enumerate(current)}
        for s, per in enumerate(result.mask_history):
            for i, m in enumerate(per):
                arrays[f"hist_{s}_{i}"] = m
        meta = {"e_steps": result.e_steps, "iou_history": result.iou_history,
                "warnings": result.warnings, "eval_steps": result.eval_steps,
                "eval_iou_history": result.eval_iou_history, "eval_last": last_eval[0] is not None}
        if last_eval[0] is not None:
            arrays.update({f"eval_{i}": m for i, m in enumerate(last_eval[0])})

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, meta=json.dumps(meta), **arrays)
        atomic_save(write, state_path)

    # the alternation runs over phase 1 (the tokens); a phase 2 (tokens + U-Net) follows
    # on the final masks, as Break-a-Scene's second phase follows its first
    phase1 = cfg.steps if cfg.phase2 != "none" else total
    schedule = e_step_schedule(phase1, em_every, method)
    if method == "em":
        schedule = schedule + [phase1]  # final masks: from the final tokens
    eval_schedule = sorted(set(e_step_schedule(phase1, em_every, "em")) | {phase1, total}) \
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
        if meta.get("eval_last"):
            last_eval[0] = [z[f"eval_{i}"] for i in range(len(imgs))]
    elif method == "given":
        current = masks
    elif method == "none":
        current = [np.ones((len(c), H, W), bool) for c in ids]
    else:
        current = e_step(0, None)
    if not resuming:
        record(0, current)

    trainer = ConceptTrainer(pipe, data_for(current), tokens, cfg, progress=progress,
                             checkpoint_dir=checkpoint_dir, resume=True)
    every = cfg.checkpoint_every or total
    interrupted = False
    try:
        while True:
            s = trainer.step_count
            # what is due at this step and not yet done (after a resume, too): the E-step,
            # then the evaluation; then the state is saved, so a kill repeats only what
            # was not saved
            if s in schedule and s not in result.e_steps:
                current = e_step(s, current)
                record(s, current)
                trainer.set_data(data_for(current))
            if s in eval_schedule or s == 0:
                evaluate(s, current)
            save_state()
            if checkpoint_dir:
                trainer.save_checkpoint()
            if s >= total:
                break
            nxt = min([t for t in schedule + eval_schedule if t > s] + [total])
            nxt = min(nxt, (s // every + 1) * every)
            trainer.train(nxt - s)
            if trainer.history.interrupted:
                interrupted = True
                break
    except KeyboardInterrupt:  # during an E-step: its step is redone on resume
        interrupted = True
    finally:
        trainer.close()
    result.masks = current
    result.history = trainer.history
    result.complete = not interrupted
    if interrupted:
        msg = (f"interrupted at step {trainer.step_count} of {total}: the result is "
               "INCOMPLETE" + (f"; call again with checkpoint_dir={checkpoint_dir!r} to resume"
                               if checkpoint_dir else ""))
        result.warnings.append(msg)
        warnings.warn(msg, stacklevel=2)
    elif checkpoint_dir:
        atomic_write_json(os.path.join(checkpoint_dir, RUN_FILE),
                          {"fingerprint": fp, "finished": True})
    return result


__all__ = ["METHODS", "MaskConfig", "e_step_schedule", "learn_concepts"]
