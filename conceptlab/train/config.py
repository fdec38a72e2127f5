"""Hyper-parameters of concept learning: one frozen, validated dataclass with presets.

    cfg = TrainConfig.for_bundled()              # the bundled shapes model (CPU), phases 1 + 2
    cfg = TrainConfig.for_bundled(phase2="none") # phase 1 alone: the tokens only
    cfg = TrainConfig.for_stable_diffusion()     # Stable Diffusion: Break-a-Scene + LoRA
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
OptimizerName = Literal["adamw", "adamw8bit"]


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of concept learning (see `conceptlab.train.trainer`).

    Frozen: change a copy with `replace`. Every field is checked on creation (`validate`).

    Attributes:
        steps: phase 1 steps: concept rows only.
        lr: learning rate of phase 1.
        lambda_attn: weight of the cross-attention loss (0: not computed).
        batch_size: samples per step.
        phase2: ``"none"``, ``"full"`` (all U-Net weights) or ``"lora"`` (needs peft).
        phase2_steps: phase 2 steps: the tokens and the U-Net.
        phase2_lr: learning rate of phase 2 (tokens and U-Net).
        lora_rank: rank of the LoRA adapters (``phase2="lora"``).
        template: prompt template with one ``{}`` for the tokens.
        joiner: joins the tokens of a sample's concepts in the prompt.
        flip: flip image and masks horizontally with probability 1/2.
        t_range: timesteps drawn from [lo, hi).
        grad_clip: max gradient norm (0: no clipping).
        weight_decay: AdamW weight decay.
        seed: seeds the training draws.
        checkpoint_every: steps between checkpoints (0: only at the end / on Ctrl-C).
        attn_layers: attention layers of the loss (None: the model's default attention
            layers).
        attn_resolution: common side of the maps (None: largest chosen layer).
        attn_reduction: ``cross_attention_loss`` reduction (``"sum"``: Eq. 4 /
            Break-a-Scene).
        attn_target: ``cross_attention_loss`` target: ``"max"``-normalised maps (Eq. 4),
            ``"raw"`` or ``"bce"``.
        loss_normalize: ``masked_diffusion_loss`` normalize (``"all"``: Break-a-Scene, or
            ``"mask"``).
        norm_penalty: weight of ``embedding_norm_penalty`` (0: off).
        gradient_checkpointing: recompute the U-Net's activations in the backward pass
            instead of keeping them (less memory, about a third more time; the same result
            up to float rounding).
        optimizer: ``"adamw"`` (torch) or ``"adamw8bit"`` (bitsandbytes' 8-bit AdamW, a
            CUDA optimizer: ``pip install conceptlab[gpu]``; its moments take a quarter of
            the memory, which matters for a full phase 2 on Stable Diffusion).
    """

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
    gradient_checkpointing: bool = False  # recompute U-Net activations: memory for time
    optimizer: OptimizerName = "adamw"    # "adamw8bit": bitsandbytes (CUDA)

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
        """The preset of the bundled shapes model (64 px, CPU).

        Phase 1, 200 steps of batch 4, lr 5e-3, lambda_attn 1.0, norm_penalty 0.1; then
        phase 2, 100 steps of tokens + the whole U-Net at lr 1e-4
        (``benchmarks/results/PRESETS.md``).

        Args:
            **changes: fields to change, e.g. ``phase2="none"``: phase 1 alone.

        Returns:
            The config.

        Raises:
            ValueError: a changed field is out of range.
            TypeError: an unknown field.
        """
        base = {"steps": 200, "lr": 5e-3, "lambda_attn": 1.0, "batch_size": 4,
                "phase2": "full", "phase2_steps": 100, "phase2_lr": 1e-4,
                "norm_penalty": 0.1}
        return cls(**{**base, **changes})

    @classmethod
    def for_stable_diffusion(cls, **changes) -> TrainConfig:
        """Stable Diffusion (GPU): Break-a-Scene's published phase 1, and phase 2 as LoRA.

        400 steps of the tokens at 5e-4 (lambda_attn 0.01, the attention loss summed over
        concepts), then 400 steps of tokens + LoRA adapters of rank 4 at 1e-4 (diffusers'
        LoRA training default). Break-a-Scene fine-tunes the whole U-Net at 2e-6 instead
        (``phase2="full", phase2_lr=2e-6``); its saved folder holds the whole U-Net
        (gigabytes) where LoRA's holds megabytes (``docs/results.md``, phase 2 files).

        Args:
            **changes: fields to change.

        Returns:
            The config.

        Raises:
            ValueError: a changed field is out of range.
            TypeError: an unknown field.
        """
        base = {"steps": 400, "lr": 5e-4, "lambda_attn": 0.01, "batch_size": 4,
                "phase2": "lora", "lora_rank": 4, "phase2_steps": 400, "phase2_lr": 1e-4,
                "attn_reduction": "sum"}
        return cls(**{**base, **changes})

    @classmethod
    def for_model(cls, pipe, method: str = "given", init_words=None, **changes) -> TrainConfig:
        """The preset for ``pipe``, ``method`` and how the tokens start.

        On the bundled model the methods that estimate their own masks ("em", "fixed") use
        lambda_attn 0.1. When the object tokens start equal (`tokens_start_equal`:
        one repeated word, or random rows: the paper's setting) the attention loss is the
        BCE one (``attn_target="bce"``), measured best there; class words keep the
        max-normalised loss of the paper's Eq. 4 (``docs/results.md``).

        Args:
            pipe: the pipeline; its kind (`conceptlab.models.model_kind`) picks
                `for_bundled` or `for_stable_diffusion`.
            method: the learning method ("given", "em", "fixed", ...).
            init_words: the tokens' initial words (None entries: random rows), or None.
            **changes: fields to change; they win over the preset's choices.

        Returns:
            The config.

        Raises:
            ValueError: a changed field is out of range.
            TypeError: an unknown field.
        """
        from ..models import model_kind

        if init_words is not None and tokens_start_equal(init_words):
            changes = {"attn_target": "bce", **changes}
        if model_kind(pipe) != "bundled":
            return cls.for_stable_diffusion(**changes)
        if method in ("em", "fixed"):
            changes = {"lambda_attn": 0.1, **changes}
        return cls.for_bundled(**changes)

    def with_total_steps(self, n: int) -> TrainConfig:
        """A copy that trains ``n`` steps in all, split between the phases as this one.

        Args:
            n: total steps, >= 1; phase 1 keeps at least one step.

        Returns:
            The changed copy.

        Raises:
            ValueError: ``n`` is not an integer >= 1.
        """
        if isinstance(n, bool) or not isinstance(n, Integral) or n < 1:
            raise ValueError(f"steps must be an integer >= 1, got {n!r}")
        if self.phase2 == "none" or self.phase2_steps == 0:
            return self.replace(steps=int(n))
        p1 = max(1, min(int(n), round(n * self.steps / self.total_steps)))
        return self.replace(steps=p1, phase2_steps=int(n) - p1)

    # ------------------------------------------------------------------ changes, files
    def replace(self, **changes) -> TrainConfig:
        """A copy with ``changes``.

        Args:
            **changes: fields to change.

        Returns:
            The changed copy.

        Raises:
            TypeError: an unknown field name (no silent typo).
            ValueError: a changed field is out of range.
        """
        _check_names(changes)
        return dataclasses.replace(self, **changes)

    @property
    def total_steps(self) -> int:
        """Steps of both phases (phase 2 counts unless ``phase2="none"``)."""
        return self.steps + (self.phase2_steps if self.phase2 != "none" else 0)

    def validate(self) -> TrainConfig:
        """Checks every field.

        Returns:
            The config itself.

        Raises:
            ValueError: a field is out of range; the message names the field, its value
                and the allowed range.
        """
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
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"gradient_checkpointing must be True or False, got "  # noqa: TRY004 (one error type for every field)
                             f"{self.gradient_checkpointing!r}")
        for name, kind in (("phase2", Phase2), ("attn_reduction", Reduction),
                           ("optimizer", OptimizerName),
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
        """The fields as a JSON-ready dict (tuples as lists).

        Returns:
            ``{field: value}``.
        """
        d = asdict(self)
        d["t_range"] = list(self.t_range)
        if self.attn_layers is not None:
            d["attn_layers"] = list(self.attn_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The config of a `to_dict` output.

        Args:
            d: ``{field: value}``.

        Returns:
            The config.

        Raises:
            TypeError: an unknown key.
            ValueError: a field is out of range.
        """
        _check_names(d)
        return cls(**d)


def tokens_start_equal(init_words, background_word: str = "background") -> bool:
    """True when the object tokens start indistinguishable.

    That is an object word repeated, or a random row (None). The background's word does
    not count.

    Args:
        init_words: the tokens' initial words (None: a random row); None instead of a list:
            the words are not known (counted as equal, the cautious choice).
        background_word: the background's word (compared case-insensitively).

    Returns:
        Whether the object tokens start equal.
    """
    if init_words is None:
        return True
    objs = [w for w in init_words if w is None or str(w).lower() != background_word]
    words = [str(w).lower() for w in objs if w is not None]
    return any(w is None for w in objs) or len(set(words)) < len(words)


def _check_names(d: dict):
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        import difflib

        hints = [f"{u!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(u, names, 1))
                 else repr(u) for u in unknown]
        raise TypeError(f"unknown TrainConfig field(s) {', '.join(hints)}; the fields are "
                        f"{sorted(names)}")


__all__ = ["TrainConfig", "tokens_start_equal"]
