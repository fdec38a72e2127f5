"""What happened during concept learning: losses, embedding norms, attention snapshots.

`TrainingHistory` is plain data (lists of numbers, JSON round trip) with two figure
helpers. A resumed run continues the same history, so its steps never repeat.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from ..fileio import atomic_write_text


@dataclass
class TrainingHistory:
    """What happened during training.

    Scalars are recorded every ``history_every`` steps, averaged over those steps;
    attention snapshots every ``attention_every`` steps.

    Attributes:
        names: the concept tokens.
        steps: the step of each record.
        loss: per record, the total loss.
        diffusion: per record, the masked diffusion loss.
        attention: per record, the cross-attention loss (before its weight).
        norm_penalty: per record, the embedding norm penalty (before its weight).
        embedding_norms: per record: K norms.
        prompts: first prompt of each record.
        vocab_norm: the vocabulary's mean embedding norm.
        phase2_start: the step phase 2 started at (None: no phase 2 yet).
        attention_steps: the step of each attention snapshot.
        attention_maps: per snapshot: (K, h, w) array.
        interrupted: the last training call was stopped by Ctrl-C.
        config: the training config, as a dict.
    """

    names: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    diffusion: list = field(default_factory=list)
    attention: list = field(default_factory=list)
    norm_penalty: list = field(default_factory=list)
    embedding_norms: list = field(default_factory=list)   # per record: K norms
    prompts: list = field(default_factory=list)           # first prompt of each record
    vocab_norm: float = 0.0
    phase2_start: int | None = None
    attention_steps: list = field(default_factory=list)
    attention_maps: list = field(default_factory=list)    # per snapshot: (K, h, w) array
    interrupted: bool = False
    config: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.steps)

    def to_dict(self) -> dict:
        """The history as JSON-ready data (attention maps as nested lists, 5 decimals).

        Returns:
            ``{field: value}``.
        """
        d = asdict(self)
        d["attention_maps"] = [np.round(np.asarray(m, np.float32), 5).tolist()
                               for m in self.attention_maps]
        return d

    def to_json(self, path=None) -> str:
        """The history as JSON text, also written to ``path`` if given.

        Args:
            path: a file to write (atomically), or None.

        Returns:
            The JSON text.
        """
        text = json.dumps(self.to_dict())
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_dict(cls, d: dict) -> TrainingHistory:
        """The history of a `to_dict` output; unknown keys are ignored.

        Args:
            d: ``{field: value}``.

        Returns:
            The history, attention maps as float32 arrays.
        """
        names = {f.name for f in fields(cls)}
        h = cls(**{k: v for k, v in d.items() if k in names})
        h.attention_maps = [np.asarray(m, np.float32) for m in h.attention_maps]
        return h

    @classmethod
    def from_json(cls, text_or_path) -> TrainingHistory:
        """The history of a `to_json` output.

        Args:
            text_or_path: the JSON text, or the path of a file holding it.

        Returns:
            The history.
        """
        s = str(text_or_path)
        if not s.lstrip().startswith("{") and os.path.exists(s):
            with open(s) as f:
                s = f.read()
        return cls.from_dict(json.loads(s))

    def smoothed(self, key: str = "loss", window: int = 10) -> np.ndarray:
        """Running mean of a scalar series (window clipped at the start).

        Args:
            key: the series, e.g. "loss", "diffusion" or "attention".
            window: records per mean.

        Returns:
            The smoothed series, as long as the series.
        """
        x = np.asarray(getattr(self, key), np.float64)
        if len(x) == 0:
            return x
        c = np.cumsum(np.insert(x, 0, 0.0))
        i = np.arange(1, len(x) + 1)
        lo = np.maximum(0, i - window)
        return (c[i] - c[lo]) / (i - lo)

    def plot(self, window: int = 10):
        """Figure: losses (raw and smoothed) and embedding norms against the vocabulary's.

        Args:
            window: records per running mean of the smoothed curves.

        Returns:
            The matplotlib figure.
        """
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
        s = np.asarray(self.steps)
        for ax, key in zip(axes[:2], ("diffusion", "attention")):
            if len(s):
                ax.plot(s, getattr(self, key), alpha=0.3, color="C0")
                ax.plot(s, self.smoothed(key, window), color="C0")
            ax.set_title(f"{key} loss")
            ax.set_xlabel("step")
        ax = axes[2]
        norms = np.asarray(self.embedding_norms, np.float64)
        if len(s) and norms.size:
            for k in range(norms.shape[1]):
                ax.plot(s, norms[:, k], label=self.names[k] if k < len(self.names) else k)
        if self.vocab_norm:
            ax.axhline(self.vocab_norm, color="gray", ls="--", label="vocabulary mean")
        ax.set_title("embedding norm")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        if self.phase2_start is not None:
            for a in axes:
                a.axvline(self.phase2_start, color="k", lw=0.8, ls=":")
        fig.tight_layout()
        plt.close(fig)
        return fig

    def plot_attention(self, scale: float = 1.4):
        """Figure: each concept's attention map (rows) at each snapshot step (columns).

        Args:
            scale: inches per map.

        Returns:
            The matplotlib figure.

        Raises:
            ValueError: no attention snapshot was recorded.
        """
        import matplotlib.pyplot as plt

        n, K = len(self.attention_maps), len(self.names)
        if n == 0:
            raise ValueError("no attention snapshots were recorded (attention_every=0?)")
        fig, axes = plt.subplots(K, n, figsize=(scale * n, scale * K), squeeze=False)
        for j, (st, maps) in enumerate(zip(self.attention_steps, self.attention_maps)):
            for k in range(K):
                ax = axes[k, j]
                ax.imshow(np.asarray(maps[k]), cmap="viridis")
                ax.set_xticks([])
                ax.set_yticks([])
                if k == 0:
                    ax.set_title(f"step {st}", fontsize=8)
                if j == 0:
                    ax.set_ylabel(self.names[k], fontsize=8)
        fig.tight_layout()
        plt.close(fig)
        return fig


__all__ = ["TrainingHistory"]
