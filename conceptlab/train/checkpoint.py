"""Checkpoints of a :class:`~conceptlab.train.trainer.ConceptTrainer`: resume exactly.

A checkpoint (``checkpoint.pt``, written atomically, read with ``weights_only=True``) holds
the concept rows, the optimizer state (the embedding table's moments cut to the concept
rows), the step and phase, the generator's state, the history, the config, a fingerprint of
the run's inputs, and in phase 2 the trained U-Net weights (or LoRA weights) exactly. A
trainer built on the same inputs continues from it as if never stopped; a trainer on other
inputs refuses it (say ``resume=False`` or use another folder).
"""

from __future__ import annotations

import hashlib
import json
import os

import torch

from .._version import __version__
from ..fileio import load_tensors, torch_save
from ..tokens import embedding_weight, model_name, save_concepts
from ..unet_delta import load_lora_weights, lora_weights
from .config import TrainConfig
from .history import TrainingHistory

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = "conceptlab-training-2"


def run_fingerprint(trainer) -> str:
    """sha256 of what defines a training run: the config (but how often it checkpoints and
    how many steps it runs),
    the token names and init words, the base model and every image's pixels and concept
    ids. Masks are left out: EM replaces them during the run."""
    cfg = trainer.config.to_dict()
    for k in ("checkpoint_every", "steps", "phase2_steps"):  # a run may be extended:
        cfg.pop(k, None)  # the learning rate is constant, so its first steps are the same
    h = hashlib.sha256()
    h.update(json.dumps({"config": cfg, "names": list(trainer.concepts.names),
                         "init_words": [str(w) for w in trainer.concepts.init_words],
                         "model": os.path.basename(model_name(trainer.pipe).rstrip("/")),
                         "concept_ids": [d.concept_ids for d in trainer.data]},
                        sort_keys=True).encode())
    for d in trainer.data:
        h.update(d.image.tobytes())
    return h.hexdigest()


def _compact_optimizer_state(trainer) -> dict:
    """Optimizer state with the embedding table's moments cut to the concept rows (the
    other rows' moments are exactly zero: their gradient is always zeroed)."""
    sd = trainer.optimizer.state_dict()
    state = dict(sd["state"])
    ids = trainer.concepts.token_ids
    if 0 in state:  # parameter 0 is always the embedding table
        st = dict(state[0])
        for k in ("exp_avg", "exp_avg_sq"):
            if k in st:
                st[k] = st[k][ids].clone()
        st["compact_rows"] = torch.tensor(ids)
        state[0] = st
    return {"state": state, "param_groups": sd["param_groups"]}


def _expand_optimizer_state(trainer, sd: dict) -> dict:
    state = dict(sd["state"])
    if 0 in state and "compact_rows" in state[0]:
        st = dict(state[0])
        rows = st.pop("compact_rows").tolist()
        w = trainer.embedding.parameter
        for k in ("exp_avg", "exp_avg_sq"):
            if k in st:
                full = torch.zeros_like(w, memory_format=torch.preserve_format)
                full[rows] = st[k].to(full)
                st[k] = full
        state[0] = st
    return {"state": state, "param_groups": sd["param_groups"]}


def save_checkpoint(trainer, path: str, *, finished: bool = False) -> str:
    """Write the full training state atomically, and the concepts beside it."""
    unet_weights = None  # phase 2: the trained U-Net weights, exactly (not as a delta)
    if trainer.phase == 2:
        unet = trainer.pipe.unet
        unet_weights = ({k: trainer.live(v).detach().cpu().clone()
                         for k, v in unet.named_parameters()}
                        if trainer.config.phase2 == "full" else
                        {**lora_weights(unet),
                         **{k: trainer.live(v).detach().cpu().clone()
                            for k, v in unet.named_parameters() if "lora_" in k}})
    ckpt = {
        "format": FORMAT,
        "conceptlab_version": __version__,
        "fingerprint": run_fingerprint(trainer),
        "finished": bool(finished),
        "names": list(trainer.concepts.names),
        "step": trainer.step_count,
        "phase": trainer.phase,
        "rows": trainer.live(trainer.embedding.parameter)[trainer.concepts.token_ids]
        .detach().float().cpu().clone(),
        "optimizer": _compact_optimizer_state(trainer),
        "generator": trainer.generator.get_state(),
        "history": json.dumps(trainer.history.to_dict()),
        "config": trainer.config.to_dict(),
        "unet": unet_weights,
        "pending": dict(trainer._acc),  # scalars of steps not yet written to the history
    }
    torch_save(ckpt, path)
    trainer.concepts.update_from(trainer.pipe)
    trainer.export_unet()
    save_concepts(trainer.concepts, os.path.dirname(path) or ".")
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
        old = TrainConfig.from_dict(ckpt["config"])
        diff = [k for k, v in old.to_dict().items()
                if k not in ("checkpoint_every", "steps", "phase2_steps")
                and v != trainer.config.to_dict()[k]]
        what = f"the settings {diff} differ" if diff else \
            "the images, tokens or base model differ"
        raise ValueError(f"the checkpoint {path} belongs to another run ({what}): use another "
                         "checkpoint folder, delete it, or pass resume=False")
    if ckpt["phase"] == 2 and trainer.phase == 1:
        trainer.start_phase2()
        weights = ckpt["unet"] or {}
        if trainer.config.phase2 == "full":
            params = dict(trainer.pipe.unet.named_parameters())
            for k, v in weights.items():
                trainer.remember_master(params[k], v)
        else:
            load_lora_weights(trainer.pipe.unet, weights)
            params = dict(trainer.pipe.unet.named_parameters())
            for k, v in weights.items():
                if k in params:
                    trainer.remember_master(params[k], v)
    w = embedding_weight(trainer.pipe)
    trainer.remember_master(w, ckpt["rows"], index=trainer.concepts.token_ids)
    trainer.optimizer.load_state_dict(_expand_optimizer_state(trainer, ckpt["optimizer"]))
    trainer.generator.set_state(ckpt["generator"])
    trainer.step_count = int(ckpt["step"])
    trainer.history = TrainingHistory.from_dict(json.loads(ckpt["history"]))
    trainer.history.config = trainer.config.to_dict()
    trainer._acc = dict(ckpt.get("pending") or {})
    trainer.concepts.update_from(trainer.pipe)
    return trainer


__all__ = ["CHECKPOINT_FILE", "load_checkpoint", "read_checkpoint", "run_fingerprint",
           "save_checkpoint"]
