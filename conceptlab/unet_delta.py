"""Phase-2 U-Net changes: LoRA adapters (through peft, as diffusers loads them) or full weights.

Break-a-Scene's second phase fine-tunes the U-Net with the concept tokens. What it changes
is kept apart from the base model as a :class:`UNetChange`:

- ``mode="lora"``: LoRA adapter weights on the attention projections, in peft's state-dict
  form (:func:`lora_state_dict`); saved as diffusers' ``pytorch_lora_weights.safetensors``,
  which ``pipe.load_lora_weights(folder)`` reads;
- ``mode="full"``: every trained U-Net parameter; saved as a diffusers ``unet/`` folder,
  which ``UNet2DConditionModel.from_pretrained(folder, subfolder="unet")`` reads.

:func:`unet_change_applied` applies a change for the length of a ``with`` block and then
restores the U-Net exactly (adapters removed, the original weight tensors put back).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
MAX_LORA_RANK = 1024
ADAPTER = "conceptlab"


@dataclass
class UNetChange:
    """What phase 2 changed in the U-Net.

    Attributes:
        mode: "lora" or "full".
        weights: lora: peft's adapter state dict; full: every parameter, trained (float32).
        lora_config: lora: the ``peft.LoraConfig`` fields (rank, alpha, targets).
        unet_config: full: the U-Net's config (to write a diffusers ``unet/`` folder).
    """

    mode: str
    weights: dict = field(repr=False)
    lora_config: dict | None = None
    unet_config: dict | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.mode not in ("lora", "full"):
            raise ValueError(f"unknown U-Net change mode {self.mode!r}: 'lora' or 'full'")
        bad = [k for k, v in self.weights.items()
               if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise ValueError(f"the U-Net weights {bad[0]!r} contain NaN or infinite values")
        huge = [k for k, v in self.weights.items()
                if v.is_floating_point() and v.numel() and float(v.abs().max()) > 1e4]
        if huge:
            raise ValueError(f"the U-Net weights {huge[0]!r} hold values beyond 1e4: not the "
                             "weights of a working model")
        rank = (self.lora_config or {}).get("r", 0)
        if self.mode == "lora" and not (isinstance(rank, int) and 1 <= rank <= MAX_LORA_RANK):
            raise ValueError(f"LoRA rank must be an integer in [1, {MAX_LORA_RANK}], got "
                             f"{rank!r}")


def _require_peft():
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ImportError("phase2='lora' needs the peft package: pip install peft "
                          "(or use phase2='full')") from None


def lora_config(rank: int = 4, alpha: float | None = None, targets=LORA_TARGETS) -> dict:
    """The ``peft.LoraConfig`` fields of conceptlab's adapters (alpha = rank: scale 1)."""
    return {"r": int(rank), "lora_alpha": float(alpha if alpha is not None else rank),
            "target_modules": list(targets), "init_lora_weights": "gaussian"}


def add_lora_adapter(unet, config: dict, adapter_name: str = ADAPTER):
    """Add LoRA adapters (``config`` from :func:`lora_config`) to the U-Net."""
    _require_peft()
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(**config), adapter_name=adapter_name)
    return unet


def lora_state_dict(unet, adapter_name: str = ADAPTER) -> dict:
    """peft's state dict of one adapter (``get_peft_model_state_dict``), detached on the CPU."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return {k: v.detach().float().cpu().clone() for k, v in sd.items()}


def remove_lora_adapter(unet, adapter_name: str = ADAPTER, had_adapters: bool = False):
    """Remove the adapter; with no other adapters, the peft layers too (exact restore)."""
    if had_adapters:
        unet.delete_adapters(adapter_name)
    else:
        unet.unload_lora()
        unet._hf_peft_config_loaded = None  # diffusers < 0.36 leave it set: a later
        # add_adapter would then look for the deleted peft_config


@contextlib.contextmanager
def requires_grad_kept(module):
    """Every parameter's ``requires_grad`` is put back on exit."""
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    try:
        yield
    finally:
        for n, p in module.named_parameters():
            if n in flags:
                p.requires_grad_(flags[n])


@contextlib.contextmanager
def weights_swapped(unet, weights: dict | None = None):
    """Each parameter's tensor swapped for ``weights[name]`` (default: a copy of itself, to
    train in place); the original tensors are put back on exit."""
    params = dict(unet.named_parameters())
    if weights is not None:
        bad = [k for k in weights if k not in params or params[k].shape != weights[k].shape]
        if bad:
            raise ValueError(f"the saved U-Net weights do not fit this U-Net ({len(bad)} of "
                             f"{len(weights)} tensors, e.g. {bad[0]!r}): use them with the "
                             "base model they were trained on")
    originals = {k: p.data for k, p in params.items()}
    with torch.no_grad():
        for k, p in params.items():
            new = weights.get(k) if weights is not None else None
            p.data = p.data.clone() if new is None else new.to(p.data)
    try:
        yield
    finally:
        for k, p in params.items():
            p.data = originals[k]


@contextlib.contextmanager
def lora_applied(unet, config: dict, weights: dict | None = None):
    """A LoRA adapter on the U-Net for the block (``weights``: peft state dict to load)."""
    _require_peft()
    had = bool(getattr(unet, "peft_config", None))
    if had and ADAPTER in unet.peft_config:
        raise ValueError(f"the U-Net already has an adapter named {ADAPTER!r}")
    with requires_grad_kept(unet):
        add_lora_adapter(unet, config)
        try:
            if weights is not None:
                from peft import set_peft_model_state_dict

                result = set_peft_model_state_dict(unet, weights, adapter_name=ADAPTER)
                if getattr(result, "unexpected_keys", None):
                    raise ValueError(f"LoRA weights do not fit this U-Net, e.g. "
                                     f"{result.unexpected_keys[0]!r}")
            if had:
                unet.set_adapters([*unet.active_adapters(), ADAPTER])
            yield unet
        finally:
            remove_lora_adapter(unet, ADAPTER, had_adapters=had)


def unet_change_applied(unet, change: UNetChange):
    """Context manager: ``change`` applied to ``unet`` for the block, then undone exactly."""
    if change.mode == "lora":
        return lora_applied(unet, change.lora_config or lora_config(), change.weights)
    return weights_swapped(unet, change.weights)


__all__ = [
    "ADAPTER",
    "LORA_TARGETS",
    "UNetChange",
    "add_lora_adapter",
    "lora_applied",
    "lora_config",
    "lora_state_dict",
    "requires_grad_kept",
    "unet_change_applied",
    "weights_swapped",
]
