"""What :func:`conceptlab.em.learn_concepts` returns: tokens, masks, and how they got there.

:class:`LearnedConcepts` holds the learned :class:`~conceptlab.tokens.ConceptTokens`, the
images, the final masks, the masks at every E-step (and their IoU when ground truth was
given for evaluation), the training history and the warnings. It round-trips through a
folder (:meth:`LearnedConcepts.save` / :meth:`LearnedConcepts.load`; safetensors, npz
without pickle and JSON) and :func:`conceptlab.generation.generate` accepts it directly.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field

import numpy as np
import torch

from . import masks as _masks
from .fileio import atomic_save, atomic_write_json
from .tokens import CONCEPTS_FILE, UNET_DELTA_FILE, ConceptTokens, load_concepts, save_concepts
from .train.history import TrainingHistory


def _savez(path, arrays):
    with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a name
        np.savez_compressed(f, **arrays)


RESULT_FILES = ("em.json", "masks.npz", "history.json", CONCEPTS_FILE, UNET_DELTA_FILE)


@dataclass
class LearnedConcepts:
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
    complete: bool = True  # False: the run was interrupted (resume it with the same call)

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
        """Write the result into ``directory``: every file atomically, and the files of an
        earlier result that this one does not have (a history, a U-Net delta) removed, so
        the folder never pairs this result with pieces of another."""
        directory = str(directory)
        os.makedirs(directory, exist_ok=True)
        save_concepts(self.tokens, directory)  # removes a stale unet_delta itself
        arrays = {f"image_{i}": im for i, im in enumerate(self.images)}
        arrays.update({f"masks_{i}": m for i, m in enumerate(self.masks)})
        for s, per_image in enumerate(self.mask_history):
            for i, m in enumerate(per_image):
                arrays[f"history_{s}_{i}"] = m
        atomic_save(lambda tmp: _savez(tmp, arrays), os.path.join(directory, "masks.npz"))
        meta = {"method": self.method, "concept_ids": self.concept_ids, "e_steps": self.e_steps,
                "iou_history": self.iou_history, "warnings": self.warnings,
                "eval_steps": self.eval_steps, "eval_iou_history": self.eval_iou_history,
                "names": self.names, "n_images": len(self.images),
                "complete": self.complete}
        hist = os.path.join(directory, "history.json")
        if self.history is not None:
            self.history.to_json(hist)
        elif os.path.exists(hist):
            os.remove(hist)  # an earlier result's history would load paired with this one
        atomic_write_json(os.path.join(directory, "em.json"), meta, indent=1)
        return directory

    @classmethod
    def load(cls, directory, pipe) -> LearnedConcepts:
        """Load saved concepts and add their tokens to ``pipe`` (ready to generate).
        FileNotFoundError / ValueError with what is missing or broken in the folder."""
        directory = str(directory)
        path = os.path.join(directory, "em.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory} holds no learned concepts (no em.json): "
                                    "write one with `conceptlab learn --out FOLDER`")
        try:
            with open(path) as f:
                meta = json.load(f)
            n = int(meta["n_images"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is truncated or corrupt ({e}): learn the concepts "
                             "again") from None
        # read every array before touching ``pipe``: a broken folder adds no tokens
        try:
            with np.load(os.path.join(directory, "masks.npz"), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise ValueError(f"{directory}/masks.npz is missing, truncated or corrupt ({e}): "
                             "learn the concepts again") from None
        missing = [k for k in [f"image_{i}" for i in range(n)] + [f"masks_{i}" for i in
                                                                    range(n)] if k not in arrays]
        if missing:
            raise ValueError(f"{directory}/masks.npz is partial: {missing} missing")
        z = arrays
        hist = []
        for s in range(len(meta["e_steps"])):
            hist.append([z[f"history_{s}_{i}"] for i in range(n) if f"history_{s}_{i}" in z])
        tokens = load_concepts(pipe, directory, load_unet=os.path.exists(
            os.path.join(directory, UNET_DELTA_FILE)))
        h = os.path.join(directory, "history.json")
        return cls(tokens, meta["method"], [z[f"image_{i}"] for i in range(n)],
                   meta["concept_ids"], [z[f"masks_{i}"] for i in range(n)],
                   TrainingHistory.from_json(h) if os.path.exists(h) else None,
                   meta["e_steps"], hist, meta["iou_history"], meta["warnings"],
                   meta.get("eval_steps", []), meta.get("eval_iou_history", []),
                   meta.get("complete", True))

    # ------------------------------------------------------------------ figures
    def plot_mask_evolution(self, image: int = 0, scale: float = 1.3):
        """Rows: E-steps; columns: the image with each concept's mask."""
        import matplotlib.pyplot as plt

        from .viz.figures import overlay_masks

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


__all__ = ["RESULT_FILES", "LearnedConcepts"]
