"""Float32 master weights for a pipeline held in half precision (fp16 / bf16).

During one optimisation step, every trainable tensor that the pipeline holds in half
precision (``load_pipeline`` on CUDA) is swapped for its float32 master copy, and the
forward pass runs under ``torch.autocast`` in the half dtype; afterwards the pipeline gets
the rounded values back. AdamW thus accumulates updates far below fp16's resolution (at
phase 2's lr of 2e-6 a plain fp16 update leaves almost every weight unchanged), as
diffusers' training scripts do with fp32 trainable weights. Between steps (E-steps,
generation) the pipeline is in its own dtype, so nothing else needs autocast. On a float32
pipeline every method is a no-op.
"""

from __future__ import annotations

import contextlib

import torch

HALF = (torch.float16, torch.bfloat16)


class MasterWeights:
    """The float32 masters of the half-precision tensors a trainer trains.

    Args:
        text_encoder: the pipeline's text encoder, or a list of them (SDXL): their
            embedding outputs are cast back to the half dtype, so a float32 table does not
            make their activations float32.
        device_type: "cuda" or "cpu", for ``torch.autocast``.
    """

    def __init__(self, text_encoder, device_type: str):
        self.text_encoders = list(text_encoder) if isinstance(text_encoder, (list, tuple)) \
            else [text_encoder]
        self.device_type = device_type
        self.masters: dict = {}

    @contextlib.contextmanager
    def step(self, trainable):
        """One optimisation step over the tensors ``trainable`` (see the module doc)."""
        params = [p for p in trainable if p.dtype in HALF or p in self.masters]
        if not params:
            yield
            return
        half = params[0].dtype  # outside a step every such tensor is in half precision
        with torch.no_grad():
            for p in params:
                master = self.masters.get(p)
                p.data = p.detach().float() if master is None or master.shape != p.shape \
                    else master
        hooks = [te.get_input_embeddings().register_forward_hook(
            lambda mod, args, out: out.to(half)) for te in self.text_encoders]
        try:
            with torch.autocast(device_type=self.device_type, dtype=half):
                yield
        finally:
            for hook in hooks:
                hook.remove()
            with torch.no_grad():
                for p in params:
                    self.masters[p] = p.data
                    p.data = p.data.to(half)
                    p.grad = None  # a float32 gradient beside half data: dropped

    def live(self, p: torch.Tensor) -> torch.Tensor:
        """The value training works on: the float32 master of a half-precision trainable
        tensor, else the tensor itself."""
        return self.masters.get(p, p)

    @torch.no_grad()
    def set(self, p: torch.Tensor, value: torch.Tensor, index=None):
        """Set a trainable tensor (its rows ``index``) to ``value``, and its float32 master
        too when it is held in half precision (checkpoints resume exactly)."""
        targets = [p]
        if p.dtype in HALF:
            if p not in self.masters:
                self.masters[p] = p.detach().float()
            targets.append(self.masters[p])
        for t in targets:
            if index is None:
                t.copy_(value.to(t))
            else:
                t[index] = value.to(t)


__all__ = ["HALF", "MasterWeights"]
