"""Phase-2 U-Net changes: full weight deltas and LoRA adapters (through ``peft``).

Break-a-Scene's second phase fine-tunes the U-Net with the concept tokens; what it changes
is stored apart from the base model, as

- a *full delta*: ``trained - base`` for every U-Net parameter (:func:`full_unet_delta`),
  added back by :func:`apply_unet_delta`; or
- *LoRA* adapter weights on the attention projections (:func:`add_lora_adapter`,
  :func:`lora_weights`, :func:`load_lora_weights`); needs the optional ``peft`` package.

Files: ``unet_delta.safetensors`` (see :mod:`conceptlab.tokens`), read by
:func:`read_unet_delta` (safetensors only: nothing is unpickled).
"""

from __future__ import annotations

import torch

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def read_unet_delta(path):
    """(tensors, metadata) of a saved ``unet_delta.safetensors``; ValueError if corrupt."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            delta = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is truncated or corrupt ({e}): save the concepts again") \
            from None
    bad = [k for k, v in delta.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path}: the U-Net delta {bad[0]!r} contains NaN or infinite values")
    return delta, meta


def unet_state(unet) -> dict:
    """A detached copy of the U-Net's parameters (the base for :func:`full_unet_delta`)."""
    return {k: v.detach().clone() for k, v in unet.named_parameters()}


def full_unet_delta(unet, base: dict) -> dict:
    """``trained - base`` for every parameter (float32). ``unet``: the U-Net, or a dict
    {name: trained tensor} (e.g. a trainer's float32 masters)."""
    items = unet.items() if isinstance(unet, dict) else unet.named_parameters()
    return {k: (v.detach().float() - base[k].float()).cpu() for k, v in items if k in base}


@torch.no_grad()
def apply_unet_delta(unet, delta: dict, mode: str = "full", lora_config: dict | None = None):
    """Add full deltas to ``unet``'s parameters, or install LoRA adapter weights."""
    if mode == "lora":
        add_lora_adapter(unet, **(lora_config or {}))
        load_lora_weights(unet, delta)
        return unet
    if mode != "full":
        raise ValueError(f"unknown U-Net delta mode {mode!r}: 'full' or 'lora'")
    params = dict(unet.named_parameters())
    bad = [k for k in delta if k not in params or params[k].shape != delta[k].shape]
    if bad:
        raise ValueError(f"the saved U-Net delta does not fit this U-Net ({len(bad)} of "
                         f"{len(delta)} tensors, e.g. {bad[0]!r}): load it into the base model "
                         "it was trained on")
    for k, d in delta.items():
        params[k].add_(d.to(params[k].dtype).to(params[k].device))
    return unet


# ----------------------------------------------------------------------------- LoRA (peft)
def _require_peft():
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ImportError("phase2='lora' needs the peft package: pip install peft "
                          "(or use phase2='full')") from None


def add_lora_adapter(unet, rank: int = 4, alpha: float | None = None,
                     target_modules=LORA_TARGETS, adapter_name: str = "conceptlab"):
    """Add LoRA adapters to the U-Net's attention projections (peft via diffusers)."""
    _require_peft()
    from peft import LoraConfig

    cfg = LoraConfig(r=int(rank), lora_alpha=float(alpha if alpha is not None else rank),
                     init_lora_weights="gaussian", target_modules=list(target_modules))
    unet.add_adapter(cfg, adapter_name=adapter_name)
    return unet


def lora_weights(unet) -> dict:
    """The LoRA tensors of the U-Net (state-dict keys containing 'lora_')."""
    return {k: v.detach().cpu().clone() for k, v in unet.state_dict().items() if "lora_" in k}


@torch.no_grad()
def load_lora_weights(unet, weights: dict):
    missing = [k for k in weights if k not in unet.state_dict()]
    if missing:
        raise ValueError(f"LoRA weights do not fit this U-Net, e.g. {missing[0]!r}")
    unet.load_state_dict(weights, strict=False)
    return unet



__all__ = [
    "LORA_TARGETS",
    "add_lora_adapter",
    "apply_unet_delta",
    "full_unet_delta",
    "load_lora_weights",
    "lora_weights",
    "read_unet_delta",
    "unet_state",
]
