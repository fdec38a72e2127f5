"""Checkpoints of a :class:`~conceptlab.train.trainer.ConceptTrainer`: resume exactly.

A checkpoint (``checkpoint.pt``, written atomically, read with ``weights_only=True``) holds
the trainer's :meth:`~conceptlab.train.trainer.ConceptTrainer.state_dict` (the concept rows,
the optimizer state cut to the concept rows, the step and phase, the generator's state, the
history, and in phase 2 the trained U-Net or LoRA weights) with the config and a
fingerprint of the run's inputs. A trainer built on the same inputs continues from it as if
never stopped; a trainer on other inputs refuses it.
"""

from __future__ import annotations

import torch

from .._version import __version__
from ..fileio import fingerprint, load_tensors, torch_save
from .config import TrainConfig

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = "conceptlab-training-3"
# a run may be extended: how long it runs and how often it saves do not define it
_NOT_IDENTITY = ("checkpoint_every", "steps", "phase2_steps", "gradient_checkpointing")


def run_fingerprint(trainer) -> str:
    """What defines a training run: the config (but its length and checkpoint period), the
    token names and init words, the base model's weights, every image's pixels and concept
    ids.
    Masks are left out: EM replaces them during the run."""
    cfg = {k: v for k, v in trainer.config.to_dict().items() if k not in _NOT_IDENTITY}
    meta = {"config": cfg, "names": list(trainer.concepts.names),
            "init_words": [str(w) for w in trainer.concepts.init_words],
            "model": trainer.model_id,
            "concept_ids": [d.concept_ids for d in trainer.data]}
    return fingerprint(meta, [d.image.tobytes() for d in trainer.data])


def compact_optimizer_state(sd: dict, rows) -> dict:
    """Optimizer state with the embedding tables' moments (parameters 0, 1, ...: one per
    text encoder) cut to their concept rows ``rows[j]`` (the other rows' moments are
    exactly zero: their gradient is always zeroed)."""
    state = dict(sd["state"])
    for j, rows_j in enumerate(rows):
        if j in state:
            st = dict(state[j])
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    st[k] = st[k][rows_j].clone()
            st["compact_rows"] = torch.tensor(rows_j)
            state[j] = st
    return {"state": state, "param_groups": sd["param_groups"]}


def expand_optimizer_state(sd: dict, tables) -> dict:
    """Undo :func:`compact_optimizer_state` for embedding tables like ``tables``."""
    state = dict(sd["state"])
    for j, table in enumerate(tables):
        if j in state and "compact_rows" in state[j]:
            st = dict(state[j])
            rows = st.pop("compact_rows").tolist()
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    full = torch.zeros_like(table, memory_format=torch.preserve_format)
                    full[rows] = st[k].to(full)
                    st[k] = full
            state[j] = st
    return {"state": state, "param_groups": sd["param_groups"]}


def save_checkpoint(trainer, path: str) -> str:
    """Write the trainer's whole state atomically."""
    torch_save({"format": FORMAT, "conceptlab_version": __version__,
                "fingerprint": run_fingerprint(trainer), "names": list(trainer.concepts.names),
                "config": trainer.config.to_dict(), **trainer.state_dict()}, path)
    return path


def read_checkpoint(path: str) -> dict:
    ckpt = load_tensors(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a conceptlab training checkpoint of this version "
                         f"(format {ckpt.get('format') if isinstance(ckpt, dict) else '?'!r}, "
                         f"expected {FORMAT!r}): delete it or use another checkpoint folder")
    return ckpt


def load_checkpoint(trainer, path: str):
    """Restore a state written by :func:`save_checkpoint` into ``trainer`` (which must be
    built on the same inputs: ValueError otherwise)."""
    ckpt = read_checkpoint(path)
    if ckpt["fingerprint"] != run_fingerprint(trainer):
        old = TrainConfig.from_dict(ckpt["config"]).to_dict()
        diff = [k for k, v in old.items()
                if k not in _NOT_IDENTITY and v != trainer.config.to_dict()[k]]
        what = f"the settings {diff} differ" if diff else \
            "the images, tokens or base model differ"
        raise ValueError(f"the checkpoint {path} belongs to another run ({what}): use another "
                         "checkpoint folder, delete it, or pass resume=False")
    return trainer.load_state_dict(ckpt)


__all__ = ["CHECKPOINT_FILE", "compact_optimizer_state", "expand_optimizer_state",
           "load_checkpoint", "read_checkpoint", "run_fingerprint", "save_checkpoint"]
