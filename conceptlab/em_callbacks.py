"""What :func:`conceptlab.em.learn_concepts` does besides the algorithm, as callbacks.

The loop calls each callback at four points (every method is optional)::

    before_fit(run)     the tokens are applied, no trainer yet (a resume restores masks here)
    before_train(run)   the trainer exists (a resume restores its state here)
    after_e_step(run)   at every stop of the loop, after any E-step due there
    after_fit(run)      at the end, finished or interrupted

``run`` is the :class:`~conceptlab.em.EMRun`: the inputs, the configs, the current masks,
the trainer and the :class:`~conceptlab.result.LearnedConcepts` being filled. A callback
may ask the loop to stop at more steps by adding them to ``run.stops``.

- :class:`Checkpoints`: resumable runs (``checkpoint_dir``); a folder holds one run.
- :class:`GroundTruthIoU`: evaluation only: the IoU of the masks against true masks.
"""

from __future__ import annotations

import itertools
import json
import os
import warnings

import numpy as np

from . import masks as _masks
from .estep import background_index, e_step_schedule, estimate_all_masks
from .fileio import atomic_save, atomic_write_json, fingerprint
from .parallel import barrier, is_main

RUN_FILE = "run.json"
STATE_FILE = "em_state.npz"
CHECKPOINT_FILE = "checkpoint.pt"


class Callback:
    """Base class: every hook does nothing."""

    def before_fit(self, run):
        pass

    def before_train(self, run):
        pass

    def after_e_step(self, run):
        pass

    def after_fit(self, run):
        pass

    def state(self) -> tuple[dict, dict]:
        """(JSON-able data, arrays) that a checkpoint keeps for this callback."""
        return {}, {}

    def load_state(self, meta: dict, arrays: dict):
        pass


class Callbacks(Callback):
    """Calls each hook of every callback, in order."""

    def __init__(self, callbacks):
        self.items = list(callbacks)

    def before_fit(self, run):
        for cb in self.items:
            cb.before_fit(run)

    def before_train(self, run):
        for cb in self.items:
            cb.before_train(run)

    def after_e_step(self, run):
        for cb in self.items:
            cb.after_e_step(run)

    def after_fit(self, run):
        for cb in self.items:
            cb.after_fit(run)


# ----------------------------------------------------------------------------- checkpoints
def run_fingerprint(run) -> str:
    """What defines a run: images, words, concept ids, method, configs, E-step schedule,
    given or discovered masks and the base model's weights (its fingerprint, not its folder's name)."""
    t = run.task
    meta = {"init_words": [None if w is None else str(w) for w in t.words],
            "concept_images": t.concept_ids, "method": run.method,
            "config": run.config.to_dict(), "mask_config": repr(run.mask_config),
            "schedule": run.schedule, "model": run.tokens.base_fingerprint}
    blobs = [im.tobytes() for im in t.images]
    blobs += [np.packbits(m).tobytes() for m in t.given_masks or []]
    blobs += [np.packbits(m).tobytes() for m in t.start_masks or []]
    return fingerprint(meta, blobs)


def _run_record(folder: str) -> dict:
    """The folder's ``run.json`` ({} when there is none)."""
    path = os.path.join(folder, RUN_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def claim_folder(folder: str, fp: str, overwrite: bool) -> bool:
    """Make ``folder`` this run's: True when it holds this run already (resume it; a
    finished run is rebuilt from its checkpoint without training)."""
    run_path = os.path.join(folder, RUN_FILE)
    ours = [f for f in (RUN_FILE, STATE_FILE, CHECKPOINT_FILE)
            if os.path.exists(os.path.join(folder, f))]
    if ours:
        if _run_record(folder).get("fingerprint") == fp:
            return True       # the same run: continuing it gives what a new start would
        if not overwrite:
            raise ValueError(
                f"{folder} holds the checkpoint of another run (other images, words, method "
                "or settings): pass overwrite=True (CLI: --overwrite) to replace it, or use "
                "another folder")
    for f in ours:  # only this module's files
        os.remove(os.path.join(folder, f))
    os.makedirs(folder, exist_ok=True)
    atomic_write_json(run_path, {"fingerprint": fp, "finished": False})
    return False


RESULT_FIELDS = ("e_steps", "iou_history", "warnings", "eval_steps", "eval_iou_history")


class Checkpoints(Callback):
    """Resumable runs: the masks, the result so far and the trainer's state are saved at
    every stop of the loop and on Ctrl-C; the same call continues where it stopped and
    gives the same result as an uninterrupted run. The same call after the run finished
    returns its result from the checkpoint, without training. Another run into the folder
    is refused (``overwrite=True`` replaces it)."""

    def __init__(self, folder, overwrite: bool = False):
        self.folder, self.overwrite = str(folder), overwrite
        self.resuming = False

    def _path(self, name):
        return os.path.join(self.folder, name)

    def before_fit(self, run):
        self.fp = run_fingerprint(run)
        if is_main():   # under several processes, the main one claims, then the others read
            claimed = claim_folder(self.folder, self.fp, self.overwrite)
            barrier()
        else:
            barrier()
            claimed = _run_record(self.folder).get("fingerprint") == self.fp
        self.resuming = claimed and os.path.exists(self._path(STATE_FILE))
        if self.resuming:
            self._load(run)
        every = run.config.checkpoint_every
        if every:
            run.stops |= set(range(every, run.config.total_steps, every))

    def before_train(self, run):
        if self.resuming and os.path.exists(self._path(CHECKPOINT_FILE)):
            run.trainer.load_checkpoint(self._path(CHECKPOINT_FILE))

    def after_e_step(self, run):
        self._save(run)

    def after_fit(self, run):
        self._save(run)
        if run.complete and is_main():
            atomic_write_json(self._path(RUN_FILE), {"fingerprint": self.fp, "finished": True})

    def _save(self, run):
        if not is_main():
            return
        r = run.result
        arrays = {f"current_{i}": m for i, m in enumerate(run.masks)}
        arrays.update({f"hist_{s}_{i}": m for s, per in enumerate(r.mask_history)
                       for i, m in enumerate(per)})
        meta = {k: getattr(r, k) for k in RESULT_FIELDS}
        meta["callbacks"] = []
        for j, cb in enumerate(run.callbacks.items):
            m, a = cb.state()
            meta["callbacks"].append(m)
            arrays.update({f"cb{j}_{k}": v for k, v in a.items()})

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, meta=json.dumps(meta), **arrays)
        atomic_save(write, self._path(STATE_FILE))
        run.trainer.save_checkpoint(self._path(CHECKPOINT_FILE))

    def _load(self, run):
        with np.load(self._path(STATE_FILE), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("meta")))
        n = len(run.task.images)
        run.masks = [arrays[f"current_{i}"] for i in range(n)]
        for k in RESULT_FIELDS:
            setattr(run.result, k, meta[k])
        run.result.mask_history = [[arrays[f"hist_{s}_{i}"] for i in range(n)]
                                   for s in range(len(meta["e_steps"]))]
        for j, (cb, m) in enumerate(zip(run.callbacks.items, meta["callbacks"])):
            cb.load_state(m, {k.split("_", 1)[1]: v for k, v in arrays.items()
                              if k.startswith(f"cb{j}_")})


# ----------------------------------------------------------------------------- evaluation
def best_order(masks, gt, words, background_word) -> list[int]:
    """order[j]: the ground-truth row that mask j is scored against: the permutation of the
    non-background rows with the largest summed IoU (the background keeps its row)."""
    bg = background_index(words, background_word)
    objs = [j for j in range(len(masks)) if j != bg]
    best, best_score = list(range(len(masks))), -1.0
    for perm in itertools.permutations(objs):
        score = sum(float(_masks.iou(masks[j], gt[p])) for j, p in zip(objs, perm))
        if score > best_score:
            best = list(range(len(masks)))
            for j, p in zip(objs, perm):
                best[j] = p
            best_score = score
    return best


def as_mask_list(masks, n_images, ids, H, W, what) -> list[np.ndarray]:
    """Per image (K_i, H, W) bool masks, checked against the concepts each image shows."""
    masks = list(masks) if isinstance(masks, (list, tuple)) else [masks]
    if len(masks) != n_images:
        raise ValueError(f"{what}: {len(masks)} mask arrays for {n_images} images")
    out = []
    for i, m in enumerate(masks):
        m = np.asarray(m)
        m = m[None] if m.ndim == 2 else m
        if m.shape[0] != len(ids[i]):
            raise ValueError(f"{what}: image {i} shows {len(ids[i])} concepts but has "
                             f"{m.shape[0]} masks")
        if m.shape[1:] != (H, W):
            m = np.asarray(_masks.resize_mask(m.astype(bool), (H, W)), bool)
        out.append(m.astype(bool))
    return out


class GroundTruthIoU(Callback):
    """Evaluation only (never used for training): the IoU of the masks against ``gt_masks``.

    Fills the result's ``iou_history`` (the masks of every E-step) and ``eval_steps`` /
    ``eval_iou_history`` (masks estimated from the current tokens at the E-step schedule,
    at the end of phase 1 and at the end, for every method; for "em" these are the masks
    it uses).

    Args:
        gt_masks: per image, the true (K_i, H, W) masks.
        match_order: score each image's object concepts against the true objects in the
            order that fits best (the background keeps its row): tokens that start from one
            shared word have no order of their own.
    """

    def __init__(self, gt_masks, match_order: bool = False):
        self.gt_masks, self.match_order = gt_masks, match_order
        self.last = None  # the latest re-estimated masks (methods other than "em")

    def before_fit(self, run):
        t = run.task
        H, W = t.images[0].shape[:2]
        self.gt = as_mask_list(self.gt_masks, len(t.images), t.concept_ids, H, W, "gt_masks")
        cfg = run.config
        phase1 = cfg.steps if cfg.phase2 != "none" else cfg.total_steps
        self.schedule = sorted(set(e_step_schedule(phase1, run.em_every, "em"))
                               | {phase1, cfg.total_steps})
        run.stops |= set(self.schedule)

    def ious(self, run, per_image) -> list[float]:
        t, bw = run.task, run.mask_config.background_word
        K = len(t.words)
        ious, count = np.zeros(K), np.zeros(K)
        for i, m in enumerate(per_image):
            order = (best_order(m, self.gt[i], t.words_of(i), bw) if self.match_order
                     else range(len(t.concept_ids[i])))
            for j, c in enumerate(t.concept_ids[i]):
                ious[c] += float(_masks.iou(m[j], self.gt[i][order[j]]))
                count[c] += 1
        return (ious / np.maximum(count, 1)).round(4).tolist()

    def after_e_step(self, run):
        r = run.result
        while len(r.iou_history) < len(r.mask_history):
            r.iou_history.append(self.ious(run, r.mask_history[len(r.iou_history)]))
        s = run.trainer.step_count
        if s not in self.schedule or s in r.eval_steps:
            return
        if run.method == "em":
            per_image = run.masks
        else:  # the same estimator as EM's E-step, its warnings kept apart
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                per_image = estimate_all_masks(run.pipe, run.task.images, run.tokens_per_image,
                                               run.task.words_per_image, run.mask_config,
                                               step=s, previous=self.last, seed=run.config.seed)
            self.last = per_image
        r.eval_steps.append(int(s))
        r.eval_iou_history.append(self.ious(run, per_image))

    def state(self):
        return ({"last": self.last is not None},
                {str(i): m for i, m in enumerate(self.last or [])})

    def load_state(self, meta, arrays):
        self.last = [arrays[str(i)] for i in range(len(arrays))] if meta.get("last") else None


__all__ = ["Callback", "Callbacks", "Checkpoints", "GroundTruthIoU", "best_order",
           "claim_folder", "run_fingerprint"]
