"""Hyper-parameters of concept learning: one frozen, validated dataclass with presets.

    cfg = TrainConfig.for_bundled()              # the bundled shapes model (CPU), phases 1 + 2
    cfg = TrainConfig.for_bundled(phase2="none") # phase 1 alone: the tokens only
    cfg = TrainConfig.for_stable_diffusion()     # Break-a-Scene's published setting
    cfg = TrainConfig.for_model(pipe, "em")      # the preset for this pipeline and method
    cfg = cfg.replace(steps=50)                  # a changed copy; unknown fields are errors

Where the preset values come from (the measurements, not just the numbers) is written in
``benchmarks/results/PRESETS.md``. The loss scales they multiply are in
``docs/cheatsheet.md``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, fields
from numbers import Integral, Real
from typing import Literal, get_args

Phase2 = Literal["none", "full", "lora"]
Reduction = Literal["mean", "sum"]
Normalize = Literal["all", "mask"]
AttnTarget = Literal["max", "raw", "bce"]


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of concept learning (see :mod:`conceptlab.train.trainer`)."""

    steps: int = 300                 # phase 1: concept rows only
    lr: float = 5e-3
    lambda_attn: float = 0.1         # weight of the cross-attention loss (0: not computed)
    batch_size: int = 4
    phase2: Phase2 = "none"          # "full" (all U-Net weights) | "lora" (needs peft)
    phase2_steps: int = 0
    phase2_lr: float = 2e-6
    lora_rank: int = 4
    template: str = "a photo of {}"
    joiner: str = " and "
    flip: bool = True
    t_range: tuple = (0, 1000)       # timesteps drawn from [lo, hi)
    grad_clip: float = 1.0           # max gradient norm (0: no clipping)
    weight_decay: float = 1e-2       # AdamW
    seed: int = 0
    checkpoint_every: int = 0        # steps between checkpoints (0: only at the end / on Ctrl-C)
    attn_layers: tuple | None = None  # None: the model's default attention layers
    attn_resolution: int | None = None  # common side of the maps (None: largest chosen layer)
    attn_reduction: Reduction = "mean"  # cross_attention_loss reduction ("sum": Eq. 4 / BaS)
    attn_target: AttnTarget = "max"  # cross_attention_loss: "max"-normalised maps (Eq. 4), "raw", "bce"
    loss_normalize: Normalize = "all"   # masked_diffusion_loss normalize ("all": BaS, "mask")
    norm_penalty: float = 0.0        # weight of embedding_norm_penalty (0: off)

    def __post_init__(self):
        # normalise containers (lists from JSON) so that configs compare and hash equal
        object.__setattr__(self, "t_range", tuple(int(v) for v in self.t_range))
        if self.attn_layers is not None:
            layers = (self.attn_layers,) if isinstance(self.attn_layers, str) else self.attn_layers
            object.__setattr__(self, "attn_layers", tuple(layers))
        self.validate()

    # ------------------------------------------------------------------ presets
    @classmethod
    def for_bundled(cls, **changes) -> TrainConfig:
        """The bundled shapes model (64 px, CPU): phase 1, 200 steps of batch 4, lr 5e-3,
        lambda_attn 1.0, norm_penalty 0.1; then phase 2, 100 steps of tokens + the whole
        U-Net at lr 1e-4 (``benchmarks/results/PRESETS.md``). ``phase2="none"``: phase 1 alone."""
        base = {"steps": 200, "lr": 5e-3, "lambda_attn": 1.0, "batch_size": 4,
                "phase2": "full", "phase2_steps": 100, "phase2_lr": 1e-4,
                "norm_penalty": 0.1}
        return cls(**{**base, **changes})

    @classmethod
    def for_stable_diffusion(cls, **changes) -> TrainConfig:
        """Break-a-Scene's published setting for Stable Diffusion (GPU): 400 steps of the
        tokens at 5e-4, then 400 steps of tokens + U-Net at 2e-6, lambda_attn 0.01."""
        base = {"steps": 400, "lr": 5e-4, "lambda_attn": 0.01, "batch_size": 4,
                "phase2": "full", "phase2_steps": 400, "phase2_lr": 2e-6,
                "attn_reduction": "sum"}
        return cls(**{**base, **changes})

    @classmethod
    def for_model(cls, pipe, method: str = "given", **changes) -> TrainConfig:
        """The preset for ``pipe`` (:func:`conceptlab.models.model_kind`) and ``method``:
        on the bundled model the methods that estimate their own masks ("em", "fixed")
        use lambda_attn 0.1 (``benchmarks/results/PRESETS.md``); ``learn_concepts`` runs
        a phase 2 after the alternation, on its final masks."""
        from ..models import model_kind

        if model_kind(pipe) != "bundled":
            return cls.for_stable_diffusion(**changes)
        if method in ("em", "fixed"):
            changes = {"lambda_attn": 0.1, **changes}
        return cls.for_bundled(**changes)

    # ------------------------------------------------------------------ changes, files
    def replace(self, **changes) -> TrainConfig:
        """A copy with ``changes``; an unknown field name is a TypeError (no silent typo)."""
        _check_names(changes)
        return dataclasses.replace(self, **changes)

    @property
    def total_steps(self) -> int:
        return self.steps + (self.phase2_steps if self.phase2 != "none" else 0)

    def validate(self) -> TrainConfig:
        """ValueError naming the field, its value and the allowed range."""
        for name, lo in (("steps", 0), ("phase2_steps", 0), ("batch_size", 1),
                         ("lora_rank", 1), ("checkpoint_every", 0), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, Integral) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        for name, strict in (("lr", True), ("phase2_lr", True), ("lambda_attn", False),
                             ("grad_clip", False), ("weight_decay", False),
                             ("norm_penalty", False)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, Real) or math.isnan(v) \
                    or (v <= 0 if strict else v < 0) or v == float("inf"):
                raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} 0, "
                                 f"got {v!r}")
        for name, kind in (("phase2", Phase2), ("attn_reduction", Reduction),
                           ("attn_target", AttnTarget), ("loss_normalize", Normalize)):
            if getattr(self, name) not in get_args(kind):
                raise ValueError(f"{name} must be one of {get_args(kind)}, got "
                                 f"{getattr(self, name)!r}")
        if not isinstance(self.template, str) or self.template.count("{}") != 1:
            raise ValueError(f"template must contain '{{}}' once, for the tokens, got "
                             f"{self.template!r}")
        if len(self.t_range) != 2 or not 0 <= self.t_range[0] < self.t_range[1]:
            raise ValueError(f"t_range must be (lo, hi) with 0 <= lo < hi, got {self.t_range}")
        if self.attn_resolution is not None and self.attn_resolution < 1:
            raise ValueError(f"attn_resolution must be >= 1 or None, got {self.attn_resolution}")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["t_range"] = list(self.t_range)
        if self.attn_layers is not None:
            d["attn_layers"] = list(self.attn_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """From :meth:`to_dict` output; an unknown key is a TypeError."""
        _check_names(d)
        return cls(**d)


def _check_names(d: dict):
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        import difflib

        hints = [f"{u!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(u, names, 1))
                 else repr(u) for u in unknown]
        raise TypeError(f"unknown TrainConfig field(s) {', '.join(hints)}; the fields are "
                        f"{sorted(names)}")


__all__ = ["TrainConfig"]
