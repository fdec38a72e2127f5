"""Folders written by conceptlab 0.1, converted to the standard files (``conceptlab upgrade``).

conceptlab 0.1 kept a result in its own files: ``concepts.safetensors`` (all rows in one
tensor, names in its metadata), ``unet_delta.safetensors`` (phase 2 as ``trained - base``
or as LoRA tensors), ``em.json`` and ``masks.npz``. :func:`upgrade_folder` reads them
(safetensors and numpy without pickle only) and writes the folder of
:meth:`conceptlab.result.LearnedConcepts.save` in their place.
"""

from __future__ import annotations

import json
import os

import numpy as np

from .concept_files import LEGACY_FILE, ConceptsFileError, _read_tensors
from .result import LearnedConcepts
from .tokens import ConceptTokens
from .train.history import TrainingHistory
from .unet_delta import UNetChange, lora_config

OLD_FILES = (LEGACY_FILE, "unet_delta.safetensors", "em.json", "masks.npz")


def _read_tokens(folder: str, unet=None) -> ConceptTokens:
    tensors, meta = _read_tensors(os.path.join(folder, LEGACY_FILE))
    if "embeddings" not in tensors:
        raise ConceptsFileError(f"{folder}/{LEGACY_FILE} has no 'embeddings' tensor")
    names, words = json.loads(meta.get("names", "[]")), json.loads(meta.get("init_words", "[]"))
    emb = tensors["embeddings"].float()
    if emb.ndim != 2 or len(names) != emb.shape[0] or len(words) != len(names):
        raise ConceptsFileError(f"{folder}/{LEGACY_FILE} is partial: {len(names)} names, rows "
                                f"{tuple(emb.shape)}")
    c = ConceptTokens(list(names), list(words), emb, base_model=meta.get("base_model", ""))
    delta_path = os.path.join(folder, "unet_delta.safetensors")
    if os.path.exists(delta_path):
        c.unet = _read_unet_delta(delta_path, unet)
    return c


def _read_unet_delta(path: str, unet) -> UNetChange:
    delta, meta = _read_tensors(path)
    if meta.get("mode") == "lora":
        rank = json.loads(meta.get("lora_config") or "{}").get("rank", 4)
        weights = {k.replace(".conceptlab.", "."): v.float() for k, v in delta.items()}
        return UNetChange("lora", weights, lora_config(rank))
    if unet is None:
        raise ValueError(f"{path} holds a full U-Net change as a difference from the base "
                         "model: pass the base model (`conceptlab upgrade FOLDER --model M`)")
    base = {k: v.detach().float().cpu() for k, v in unet.named_parameters()}
    missing = [k for k in delta if k not in base]
    if missing:
        raise ValueError(f"{path} does not fit this base model (e.g. {missing[0]!r})")
    weights = {k: base[k] + delta[k].float() if k in delta else base[k] for k in base}
    return UNetChange("full", weights, unet_config=dict(unet.config))


def upgrade_folder(folder, pipe=None) -> LearnedConcepts:
    """Convert a conceptlab 0.1 result folder in place; returns the result.

    Args:
        folder: the folder (``concepts.safetensors``, ``em.json``, ``masks.npz``).
        pipe: the base model's pipeline; needed only for a full phase-2 U-Net change.

    Raises:
        FileNotFoundError: the folder holds no conceptlab 0.1 result.
        ValueError: a file is partial or corrupt.
    """
    folder = str(folder)
    for f in (LEGACY_FILE, "em.json", "masks.npz"):
        if not os.path.isfile(os.path.join(folder, f)):
            raise FileNotFoundError(f"{folder} holds no conceptlab 0.1 result (no {f})")
    tokens = _read_tokens(folder, None if pipe is None else pipe.unet)
    if pipe is not None:   # 0.1 recorded a folder name; the model's identity is its weights
        from .tokens import model_fingerprint

        tokens.base_fingerprint = model_fingerprint(pipe)
    with open(os.path.join(folder, "em.json")) as f:
        meta = json.load(f)
    n = int(meta["n_images"])
    with np.load(os.path.join(folder, "masks.npz"), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    hist = [[arrays[f"history_{s}_{i}"] for i in range(n)] for s in range(len(meta["e_steps"]))
            if f"history_{s}_0" in arrays]
    h = os.path.join(folder, "history.json")
    result = LearnedConcepts(
        tokens, meta["method"], [arrays[f"image_{i}"] for i in range(n)], meta["concept_ids"],
        [arrays[f"masks_{i}"] for i in range(n)],
        TrainingHistory.from_json(h) if os.path.exists(h) else None, meta["e_steps"], hist,
        meta.get("iou_history", []), meta.get("warnings", []), meta.get("eval_steps", []),
        meta.get("eval_iou_history", []), meta.get("complete", True))
    result.save(folder)
    for f in OLD_FILES:
        if os.path.exists(os.path.join(folder, f)):
            os.remove(os.path.join(folder, f))
    return result


__all__ = ["upgrade_folder"]
