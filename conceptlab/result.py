"""What :func:`conceptlab.em.learn_concepts` returns: tokens, masks, and how they got there.

:class:`LearnedConcepts` holds the learned :class:`~conceptlab.tokens.ConceptTokens`, the
images, the final masks, the masks at every E-step (and their IoU when a
:class:`~conceptlab.em_callbacks.GroundTruthIoU` callback measured them), the training
history and the warnings. :func:`conceptlab.generation.generate` accepts it directly.

:meth:`LearnedConcepts.save` writes the concepts' standard files
(:mod:`conceptlab.concept_files`) and, beside them, files any tool reads: the images and
the final masks as PNG (``images/image0.png``, ``masks/image0_v1.png``), the masks of every
E-step in ``mask_history.npz`` (numpy, no pickle) and the training history as JSON.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from . import masks as _masks
from .concept_files import load_concepts, read_sidecar, save_concepts, token_file_name
from .fileio import atomic_save
from .tokens import ConceptTokens
from .train.history import TrainingHistory

HISTORY_FILE = "history.json"
MASK_HISTORY_FILE = "mask_history.npz"


def _png_bytes(array) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _write_bytes(folder, name, data: bytes) -> str:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_save(write, os.path.join(folder, name))
    return name


def _check_npz(path, max_bytes: int = 256 << 20):
    """Refuse an .npz whose arrays would decompress to more than ``max_bytes`` in all."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            total = sum(info.file_size for info in z.infolist())
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is truncated or corrupt ({e})") from None
    if total > max_bytes:
        raise ValueError(f"{path} would decompress to {total / 1e6:.0f} MB (more than "
                         f"{max_bytes / 1e6:.0f} MB): not a masks file of this folder")


def _read_png(path, mode) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert(mode))


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
    iou_history: list = field(default_factory=list)  # per E-step: (K,) IoU (GroundTruthIoU)
    warnings: list = field(default_factory=list)
    # GroundTruthIoU only: IoU of masks re-estimated from the CURRENT tokens at the E-step
    # schedule, for every method (for "em" they are the masks used)
    eval_steps: list = field(default_factory=list)
    eval_iou_history: list = field(default_factory=list)
    complete: bool = True  # False: the run was interrupted (resume it with the same call)

    @property
    def names(self) -> list[str]:
        return list(self.tokens.names)

    @property
    def embeddings(self) -> torch.Tensor:
        return self.tokens.embeddings

    def applied(self, pipe):
        """``with learned.applied(pipe):`` the concepts in ``pipe`` for the block."""
        return self.tokens.applied(pipe)

    def latent_masks(self, pipe_or_factor=4) -> list:
        """Masks at latent resolution (nearest), per image: (K_i, H/f, W/f) bool."""
        f = pipe_or_factor if isinstance(pipe_or_factor, int) else pipe_or_factor.vae_scale_factor
        return [np.asarray(_masks.resize_mask(m, (m.shape[1] // f, m.shape[2] // f)), bool)
                for m in self.masks]

    # ------------------------------------------------------------------ persistence
    def _mask_name(self, i: int, j: int) -> str:
        name = self.names[self.concept_ids[i][j]]
        return f"masks/image{i}_{token_file_name(name).removesuffix('.safetensors')}.png"

    def save(self, folder) -> str:
        """Write the concepts' standard files, the images and masks as PNG, the E-step
        masks and the history (see the module doc). The folder is written whole and then
        switched in (:func:`conceptlab.concept_files.save_concepts`): it holds the old
        result or the new one, never a mix, and its manifest lists every file."""
        learned = {"method": self.method, "concept_ids": self.concept_ids,
                   "n_images": len(self.images), "e_steps": self.e_steps,
                   "iou_history": self.iou_history, "warnings": self.warnings,
                   "eval_steps": self.eval_steps, "eval_iou_history": self.eval_iou_history,
                   "complete": self.complete}
        cfg = self.history.config if self.history is not None else None
        return save_concepts(self.tokens, folder, extra={"learned": learned, "config": cfg},
                             write_more=self._write_files)

    def _write_files(self, folder) -> list[str]:
        files = []
        for i, im in enumerate(self.images):
            files.append(_write_bytes(folder, f"images/image{i}.png", _png_bytes(im)))
            for j in range(len(self.masks[i])):
                m = (np.asarray(self.masks[i][j], bool) * 255).astype(np.uint8)
                files.append(_write_bytes(folder, self._mask_name(i, j), _png_bytes(m)))
        buf = io.BytesIO()
        np.savez_compressed(buf, **{f"step{s}_image{i}": m for s, per in
                                    enumerate(self.mask_history) for i, m in enumerate(per)})
        files.append(_write_bytes(folder, MASK_HISTORY_FILE, buf.getvalue()))
        if self.history is not None:
            files.append(_write_bytes(folder, HISTORY_FILE, self.history.to_json().encode()))
        return files

    @classmethod
    def load(cls, folder, *, allow_other_model: bool = False) -> LearnedConcepts:
        """Read a folder written by :meth:`save` (no pipeline needed).

        ``allow_other_model``: see :func:`conceptlab.concept_files.load_concepts`.

        Raises:
            FileNotFoundError: no learned concepts there.
            ValueError: a file is missing, corrupt or from another result.
        """
        folder = str(folder)
        side = read_sidecar(folder)
        meta = side.get("learned")
        if "learned" not in side or not hasattr(meta, "get"):
            raise ValueError(f"{folder} holds concepts but no learning record: load them with "
                             "load_concepts instead")
        n = meta.get("n_images")
        pngs = [f for f in side["files"] if f.startswith("images/")]
        if not isinstance(n, int) or n != len(pngs) or n < 1:
            raise ValueError(f"{folder}: the record says {n!r} images but the folder holds "
                             f"{len(pngs)}: learn the concepts again")
        _check_npz(os.path.join(folder, MASK_HISTORY_FILE))
        tokens = load_concepts(folder, allow_other_model=allow_other_model)
        obj = cls(tokens, meta["method"], [], meta["concept_ids"], [], None, meta["e_steps"],
                  [], meta["iou_history"], meta["warnings"], meta.get("eval_steps", []),
                  meta.get("eval_iou_history", []), meta.get("complete", True))
        obj.images = [_read_png(os.path.join(folder, f"images/image{i}.png"), "RGB")
                      for i in range(n)]
        obj.masks = [np.stack([_read_png(os.path.join(folder, obj._mask_name(i, j)), "L") > 127
                               for j in range(len(obj.concept_ids[i]))]) for i in range(n)]
        with np.load(os.path.join(folder, MASK_HISTORY_FILE), allow_pickle=False) as z:
            obj.mask_history = [[z[f"step{s}_image{i}"] for i in range(n)]
                                for s in range(len(obj.e_steps)) if f"step{s}_image0" in z]
        h = os.path.join(folder, HISTORY_FILE)   # only this result's own (the manifest)
        obj.history = TrainingHistory.from_json(h) if HISTORY_FILE in side["files"] else None
        return obj

    # ------------------------------------------------------------------ figures
    def plot_mask_evolution(self, image: int = 0, scale: float = 1.3):
        """Rows: E-steps; columns: the image with each concept's mask."""
        import matplotlib.pyplot as plt

        from .viz.figures import label_image

        rows = self.mask_history or [self.masks]
        steps = self.e_steps or [0]
        K = rows[0][image].shape[0]
        fig, axes = plt.subplots(len(rows), K + 1, figsize=(scale * (K + 1), scale * len(rows)),
                                 squeeze=False)
        img = self.images[image]
        for r, per_image in enumerate(rows):
            m = per_image[image]
            axes[r][0].imshow(label_image(img, m))
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


__all__ = ["HISTORY_FILE", "MASK_HISTORY_FILE", "LearnedConcepts"]
