"""The M-step: learn one token per concept from images and (fixed) masks.

Data: a list of :class:`ConceptImage`, one per user image::

    ConceptImage(image,            # (H, W, 3) uint8 array or PIL image
                 masks,            # (K_i, H, W) bool (or float in [0, 1]): one row per concept
                 concept_ids)      # K_i ints: which concept (index into ConceptTokens) each row is

so a concept may appear in one image or in several, and an image may hold any subset of the
concepts. All images must have the same size (they are batched).

One step (Break-a-Scene's recipe, METHOD.md step 2), for each of ``batch_size`` samples:

1. pick an image at random, then a random non-empty subset ``s`` of the concepts in it
   (size uniform in 1..K_i, then a uniform subset, in random order);
2. prompt ``template.format(joiner.join(tokens of s))``, e.g. "a photo of [v2] and [v1]";
3. flip image and masks horizontally with probability 1/2 (``flip=True``);
4. ``t ~ U{t_lo .. t_hi-1}``, ``eps ~ N(0, I)``, ``z_t = sqrt(a_t) z0 + sqrt(1-a_t) eps``
   (``z0``: VAE posterior mean times the scaling factor, precomputed for both flips);
5. U-Net forward under :func:`~conceptlab.attention.record_attention` (``keep_graph=True``);
6. ``loss = masked_diffusion_loss(pred, eps, M_s) + lambda_attn * cross_attention_loss(A, M)
   (+ norm_penalty * embedding_norm_penalty)``;
7. AdamW step on the concept rows of the embedding table only (phase 1), then
   :meth:`~conceptlab.concepts.TrainableEmbedding.restore_frozen_rows`.

An optional phase 2 (``phase2="full"`` or ``"lora"``) then trains the U-Net (all weights, or
LoRA adapters through ``peft``) together with the concept rows at ``phase2_lr``.

Every random draw comes from ONE ``torch.Generator`` seeded with ``config.seed``; the
models run in eval mode (no dropout). A checkpoint holds the concept rows, the optimizer
state, the step, the generator's state and the history (and, in phase 2, the U-Net delta),
so resuming from it continues exactly as an uninterrupted run would have.

For the EM loop use :class:`ConceptTrainer` directly: ``trainer.train(100)``, new masks with
``trainer.set_data(...)``, ``trainer.train(100)`` again (optimizer state and history carry on).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

from . import __version__
from .attention import layer_resolutions, record_attention
from .concepts import (
    ConceptTokens,
    embedding_weight,
    full_unet_delta,
    save_concepts,
    trainable_embedding,
    unet_state,
    vocabulary_mean_norm,
)
from .losses import (
    concept_attention_maps,
    cross_attention_loss,
    embedding_norm_penalty,
    masked_diffusion_loss,
)

CHECKPOINT_FILE = "checkpoint.pt"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


# ----------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """Hyper-parameters of concept learning. Presets: :meth:`for_bundled`,
    :meth:`for_stable_diffusion`; change any field with :meth:`replace`."""

    steps: int = 300                 # phase 1: concept rows only
    lr: float = 5e-3
    lambda_attn: float = 0.1         # weight of the cross-attention loss (0: not computed)
    batch_size: int = 4
    phase2: str = "none"             # "none" | "full" (all U-Net weights) | "lora" (needs peft)
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
    attn_layers: list | None = None  # None: default_attention_layers(pipe)
    attn_resolution: int | None = None  # common side of the maps (None: largest chosen layer)
    attn_reduction: str = "mean"     # cross_attention_loss reduction ("sum": Eq. 4 / BaS)
    loss_normalize: str = "all"      # masked_diffusion_loss normalize ("all": BaS, "mask")
    norm_penalty: float = 0.0        # weight of embedding_norm_penalty (0: off)

    @classmethod
    def for_bundled(cls, **changes) -> TrainConfig:
        """Preset for the bundled shapes model (64 px, CPU): 200 steps of batch 4 (about
        30-45 s on 2 idle cores), lr 5e-3, lambda_attn 1.0, norm_penalty 0.1, t in [0, 1000).

        Tuned on the bundled model with its example images (notebooks 03-04): with
        lambda_attn 0, two tokens trained on one image both looked at the same object
        (attention IoU with their own masks 0.29 / 0.00); 0.1 gave 0.40 / 0.76 and 1.0 gave
        0.55 / 0.81. Without a norm penalty the rows grew to 4-5x the vocabulary's mean norm
        and overrode ordinary words ("[v2] and a blue star": a star in 0.19 of samples);
        norm_penalty 0.1 keeps them near 1x (0.56). lr 1e-3 and 4e-4 learned less in 200
        steps. Pass ``field=value`` to change any of them."""
        base = {"steps": 200, "lr": 5e-3, "lambda_attn": 1.0, "batch_size": 4,
                "phase2": "none", "phase2_steps": 0, "norm_penalty": 0.1}
        base.update(changes)
        return cls(**base)

    @classmethod
    def for_model(cls, pipe, method: str = "given", **changes) -> TrainConfig:
        """The preset for ``pipe``: :meth:`for_stable_diffusion` for SD-sized models, else
        :meth:`for_bundled`. On the bundled model the methods that estimate their own masks
        (``"em"``, ``"fixed"``) use ``lambda_attn=0.1``: with 1.0 each token's attention
        becomes a copy of its mask and the E-step hands the same masks back (EM and fixed
        end identical on 13 of 20 suite scenes); final mask IoU on the 20-scene EM suite,
        EM / given masks: 0.509 / 0.673 at 0.1, 0.477 / 0.646 at 1.0; without the
        attention loss EM drifts (``benchmarks/results/em_*``)."""
        from .generation import model_kind

        if model_kind(pipe) != "bundled":
            return cls.for_stable_diffusion(**changes)
        if method in ("em", "fixed"):
            changes = {"lambda_attn": 0.1, **changes}
        return cls.for_bundled(**changes)

    @classmethod
    def for_stable_diffusion(cls, **changes) -> TrainConfig:
        """Break-a-Scene's published setting for Stable Diffusion (GPU): 400 steps of the
        tokens at 5e-4, then 400 steps of tokens + U-Net at 2e-6, lambda_attn 0.01."""
        base = {"steps": 400, "lr": 5e-4, "lambda_attn": 0.01, "batch_size": 4,
                "phase2": "full", "phase2_steps": 400, "phase2_lr": 2e-6,
                "attn_reduction": "sum"}
        base.update(changes)
        return cls(**base)

    def replace(self, **changes) -> TrainConfig:
        d = self.to_dict()
        d.update(changes)
        return TrainConfig.from_dict(d)

    @property
    def total_steps(self) -> int:
        return self.steps + (self.phase2_steps if self.phase2 != "none" else 0)

    def validate(self):
        if self.phase2 not in ("none", "full", "lora"):
            raise ValueError(f"phase2 must be 'none', 'full' or 'lora', got {self.phase2!r}")
        if self.steps < 0 or self.phase2_steps < 0 or self.batch_size < 1:
            raise ValueError("steps and phase2_steps must be >= 0 and batch_size >= 1")
        if "{}" not in self.template:
            raise ValueError(f"template must contain '{{}}' for the tokens, got {self.template!r}")
        lo, hi = self.t_range
        if not 0 <= lo < hi:
            raise ValueError(f"t_range must be (lo, hi) with 0 <= lo < hi, got {self.t_range}")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["t_range"] = list(self.t_range)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if "t_range" in d:
            d["t_range"] = tuple(d["t_range"])
        return cls(**d)


def default_attention_layers(pipe) -> list[str]:
    """Layers whose attention the loss uses: ``conceptlab.maps.default_attention_config``
    when available, else every cross-attention layer at resolution <= 16."""
    try:
        from .maps import default_attention_config
    except ImportError:
        default_attention_config = None
    if default_attention_config is not None:
        cfg = default_attention_config(pipe)
        layers = cfg.get("layers") if isinstance(cfg, dict) else getattr(cfg, "layers", cfg)
        if layers:
            return list(layers)
    res = layer_resolutions(pipe.unet)
    layers = [n for n, r in res.items() if r <= 16]
    return layers or [n for n, r in res.items() if r == min(res.values())]


# ----------------------------------------------------------------------------- data
def _to_uint8_rgb(image) -> np.ndarray:
    if hasattr(image, "convert"):  # PIL
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"an image must be (H, W, 3), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.max() <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    # writeable: arrays of PIL images are read-only, and torch.from_numpy warns on those
    return np.require(arr, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"])


@dataclass
class ConceptImage:
    """One training image, the masks of the concepts it shows, and which concepts they are.

    image        (H, W, 3) uint8 (or PIL, or float in [0, 1])
    masks        (K_i, H', W') bool or float in [0, 1] (any resolution; (H', W') is read
                 as one mask), row j = the mask of concept ``concept_ids[j]``
    concept_ids  K_i distinct concept indices (default ``0 .. K_i-1``)
    """

    image: np.ndarray
    masks: np.ndarray
    concept_ids: list = None

    def __post_init__(self):
        self.image = _to_uint8_rgb(self.image)
        m = self.masks
        m = m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m)
        if m.ndim == 2:
            m = m[None]
        if m.ndim != 3 or m.shape[0] < 1:
            raise ValueError(f"masks must be (K, H, W) with K >= 1, got shape {m.shape}")
        if m.dtype != bool:
            m = m.astype(np.float32)
            if m.min() < 0 or m.max() > 1:
                raise ValueError("float masks must lie in [0, 1]")
        self.masks = m
        if self.concept_ids is None:
            self.concept_ids = list(range(m.shape[0]))
        self.concept_ids = [int(c) for c in self.concept_ids]
        if len(self.concept_ids) != m.shape[0]:
            raise ValueError(f"{m.shape[0]} masks but {len(self.concept_ids)} concept ids "
                             f"{self.concept_ids}: give one id per mask row")
        if len(set(self.concept_ids)) != len(self.concept_ids):
            raise ValueError(f"concept ids must be distinct within an image: {self.concept_ids}")

    @classmethod
    def from_scene(cls, scene, concept_ids=None, background: bool = False) -> ConceptImage:
        """From a :class:`conceptlab.world.Scene`: its objects (in drawing order), plus the
        background as the last concept when ``background=True``."""
        masks = list(scene.object_masks) + ([scene.background_mask] if background else [])
        return cls(scene.image, np.stack(masks), concept_ids)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.shape[:2]


def make_concept_images(images, masks, concept_ids=None) -> list[ConceptImage]:
    """Zip images, per-image masks and per-image concept ids into :class:`ConceptImage` s.
    ``concept_ids=None``: image i's mask rows are concepts ``0 .. K_i-1``."""
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images, masks = [images], [masks]
    images, masks = list(images), list(masks)
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} images but {len(masks)} mask arrays")
    ids = [None] * len(images) if concept_ids is None else list(concept_ids)
    return [ConceptImage(im, m, c) for im, m, c in zip(images, masks, ids)]


def _as_data(data) -> list[ConceptImage]:
    if isinstance(data, ConceptImage):
        return [data]
    data = list(data)
    if not data or not all(isinstance(d, ConceptImage) for d in data):
        raise TypeError("data must be a ConceptImage or a non-empty list of them (see "
                        "make_concept_images(images, masks, concept_ids))")
    return data


# ----------------------------------------------------------------------------- history
@dataclass
class TrainingHistory:
    """What happened during training (scalars every ``history_every`` steps, averaged over
    those steps; attention snapshots every ``attention_every`` steps)."""

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
        d = asdict(self)
        d["attention_maps"] = [np.round(np.asarray(m, np.float32), 5).tolist()
                               for m in self.attention_maps]
        return d

    def to_json(self, path=None) -> str:
        text = json.dumps(self.to_dict())
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    @classmethod
    def from_dict(cls, d: dict) -> TrainingHistory:
        names = {f.name for f in fields(cls)}
        h = cls(**{k: v for k, v in d.items() if k in names})
        h.attention_maps = [np.asarray(m, np.float32) for m in h.attention_maps]
        return h

    @classmethod
    def from_json(cls, text_or_path) -> TrainingHistory:
        s = str(text_or_path)
        if not s.lstrip().startswith("{") and os.path.exists(s):
            with open(s) as f:
                s = f.read()
        return cls.from_dict(json.loads(s))

    def smoothed(self, key: str = "loss", window: int = 10) -> np.ndarray:
        """Running mean of a scalar series (window clipped at the start)."""
        x = np.asarray(getattr(self, key), np.float64)
        if len(x) == 0:
            return x
        c = np.cumsum(np.insert(x, 0, 0.0))
        i = np.arange(1, len(x) + 1)
        lo = np.maximum(0, i - window)
        return (c[i] - c[lo]) / (i - lo)

    def plot(self, window: int = 10):
        """Figure: losses (raw and smoothed) and embedding norms against the vocabulary's."""
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
        """Figure: each concept's attention map (rows) at each snapshot step (columns)."""
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


# ----------------------------------------------------------------------------- trainer
@dataclass
class _Sample:
    image: int
    subset: list  # concept indices, in prompt order
    flip: bool
    t: int


class ConceptTrainer:
    """Learns the rows of ``concepts`` in ``pipe`` from ``data`` (see the module doc).

    ``train(n)`` runs n more steps (default: to ``config.total_steps``) and returns the
    :class:`TrainingHistory`; ``step()`` runs one; ``set_data`` swaps in new masks (EM);
    ``evaluate`` gives the losses on a fixed set of (t, noise); ``close`` unhooks the
    pipeline. ``callback(trainer, logs)`` runs after every step; returning True stops.
    """

    def __init__(self, pipe, data, concepts: ConceptTokens, config: TrainConfig | None = None,
                 *, progress: bool = True, history_every: int = 1,
                 attention_every: int | None = None, checkpoint_dir=None, resume: bool = True,
                 callback=None):
        self.pipe = pipe
        self.concepts = concepts
        self.config = (config or TrainConfig.for_model(pipe)).validate()
        self.progress = progress
        self.history_every = max(1, int(history_every))
        total = self.config.total_steps
        self.attention_every = (max(1, total // 8) if attention_every is None
                                else int(attention_every))
        self.checkpoint_dir = None if checkpoint_dir is None else str(checkpoint_dir)
        self.callback = callback
        self.device = pipe.device
        if not concepts.present_in(pipe):
            raise ValueError(f"the tokens {concepts.names} are not in this pipeline: add them "
                             "with add_concept_tokens or load_concepts first")
        n_train = pipe.scheduler.config.num_train_timesteps
        if self.config.t_range[1] > n_train:
            raise ValueError(f"t_range {self.config.t_range} exceeds the scheduler's "
                             f"{n_train} training timesteps")
        self.layers = list(self.config.attn_layers or default_attention_layers(pipe))
        res = layer_resolutions(pipe.unet)
        unknown = [n for n in self.layers if n not in res]
        if unknown:
            raise ValueError(f"unknown attention layers {unknown}; this U-Net has {list(res)}")
        self.max_res = max(res[n] for n in self.layers)
        self.vocab_norm = vocabulary_mean_norm(pipe, concepts.token_ids)

        from diffusers import DDPMScheduler
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self._requires_grad = {m: {n: p.requires_grad for n, p in m.named_parameters()}
                               for m in (pipe.unet, pipe.text_encoder, pipe.vae)}
        pipe.unet.requires_grad_(False)
        pipe.vae.requires_grad_(False)
        pipe.unet.eval()
        pipe.text_encoder.eval()
        self.embedding = trainable_embedding(pipe, concepts)
        self._latent_cache: dict = {}
        self.set_data(data)

        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.step_count = 0
        self.phase = 1
        self.unet_base = None
        self.optimizer = self._make_optimizer()
        self.history = TrainingHistory(names=list(concepts.names), vocab_norm=self.vocab_norm,
                                       config=self.config.to_dict())
        self._acc: dict = {}
        self._closed = False
        if self.checkpoint_dir and resume and os.path.exists(self.checkpoint_path):
            self.load_checkpoint(self.checkpoint_path)

    # ------------------------------------------------------------------ data
    def set_data(self, data):
        """Use new images / masks (e.g. masks re-estimated by the E-step). Latents of images
        seen before are reused."""
        data = _as_data(data)
        K = len(self.concepts)
        sizes = {d.size for d in data}
        if len(sizes) != 1:
            raise ValueError(f"all images must have the same size, got {sorted(sizes)}")
        H, W = sizes.pop()
        f = getattr(self.pipe, "vae_scale_factor", 8)
        if H % f or W % f:
            raise ValueError(f"image size {H}x{W} must be a multiple of the VAE factor {f}")
        for i, d in enumerate(data):
            bad = [c for c in d.concept_ids if not 0 <= c < K]
            if bad:
                raise ValueError(f"image {i}: concept ids {bad} outside 0..{K - 1} "
                                 f"({K} concept tokens {self.concepts.names})")
        self.data = data
        self.image_size = (H, W)
        self.latents = [self._encode(d.image) for d in data]  # each (2, C, h, w)
        self.masks = []
        for d in data:
            m = torch.from_numpy(np.asarray(d.masks, np.float32))
            if tuple(m.shape[-2:]) != (H, W):
                m = torch.nn.functional.interpolate(m[None], size=(H, W),
                                                    mode="nearest-exact")[0]
            self.masks.append(m)
        self.row_of = [{c: j for j, c in enumerate(d.concept_ids)} for d in data]

    @torch.no_grad()
    def _encode(self, image: np.ndarray) -> torch.Tensor:
        key = (image.shape, hash(image.tobytes()))
        if key not in self._latent_cache:
            vae = self.pipe.vae
            x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
            x = torch.cat([x, x.flip(-1)]).to(self.device, vae.dtype)
            z = vae.encode(x).latent_dist.mean
            shift = getattr(vae.config, "shift_factor", None) or 0.0
            self._latent_cache[key] = ((z - shift) * vae.config.scaling_factor).float()
        return self._latent_cache[key]

    # ------------------------------------------------------------------ optimisation
    def _trainable(self) -> list:
        params = [self.embedding.parameter]
        if self.phase == 2:
            params += [p for p in self.pipe.unet.parameters() if p.requires_grad]
        return params

    def _make_optimizer(self):
        c = self.config
        if self.phase == 1:
            groups = [{"params": [self.embedding.parameter], "lr": c.lr}]
        else:
            groups = [{"params": [self.embedding.parameter], "lr": c.phase2_lr},
                      {"params": self._trainable()[1:], "lr": c.phase2_lr}]
        return torch.optim.AdamW(groups, weight_decay=c.weight_decay)

    def _start_phase2(self):
        c = self.config
        unet = self.pipe.unet
        if c.phase2 == "full":
            self.unet_base = unet_state(unet)
            unet.requires_grad_(True)
        else:
            with torch.random.fork_rng(devices=[]):  # LoRA init draws from the global RNG
                torch.manual_seed(c.seed)
                add_lora_adapter(unet, rank=c.lora_rank)
            for n, p in unet.named_parameters():
                p.requires_grad_("lora_" in n)
        self.phase = 2
        if self.history.phase2_start is None:
            self.history.phase2_start = self.step_count
        self.optimizer = self._make_optimizer()

    def _sample(self) -> tuple[list[_Sample], torch.Tensor]:
        g, c = self.generator, self.config
        lo, hi = c.t_range
        samples = []
        for _ in range(c.batch_size):
            i = int(torch.randint(len(self.data), (1,), generator=g))
            present = self.data[i].concept_ids
            n = int(torch.randint(1, len(present) + 1, (1,), generator=g))
            perm = torch.randperm(len(present), generator=g)[:n].tolist()
            flip = bool(torch.rand((), generator=g) < 0.5) and c.flip
            t = int(torch.randint(lo, hi, (1,), generator=g))
            samples.append(_Sample(i, [present[j] for j in perm], flip, t))
        noise = torch.randn((c.batch_size, *self.latents[0].shape[1:]), generator=g)
        return samples, noise

    def prompts(self, samples) -> list[str]:
        c = self.config
        return [self.concepts.prompt(s.subset, c.template, c.joiner) for s in samples]

    def _losses(self, samples, noise, *, with_graph: bool = True) -> dict:
        """Loss terms for a list of samples and their noise (B, C, h, w)."""
        pipe, c, K = self.pipe, self.config, len(self.concepts)
        B = len(samples)
        H, W = self.image_size
        z0 = torch.stack([self.latents[s.image][int(s.flip)] for s in samples])
        noise = noise.to(z0.device, z0.dtype)
        t = torch.tensor([s.t for s in samples], dtype=torch.long, device=z0.device)
        masks = torch.zeros(B, K, H, W)
        valid = torch.zeros(B, K, dtype=torch.bool)
        for b, s in enumerate(samples):
            for k in s.subset:
                m = self.masks[s.image][self.row_of[s.image][k]]
                masks[b, k] = m.flip(-1) if s.flip else m
                valid[b, k] = True
        prompts = self.prompts(samples)
        tok = pipe.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
        positions = torch.full((B, K), -1, dtype=torch.long)
        for b, s in enumerate(samples):
            for k in s.subset:
                where = (ids[b] == self.concepts.token_ids[k]).nonzero()
                if len(where) == 0:
                    raise ValueError(f"token {self.concepts.names[k]} was cut from the prompt "
                                     f"{prompts[b]!r} (too long for the text encoder)")
                positions[b, k] = int(where[0])
        zt = self.noise_scheduler.add_noise(z0, noise, t)
        pt = self.noise_scheduler.config.prediction_type
        if pt == "epsilon":
            target = noise
        elif pt == "v_prediction":
            target = self.noise_scheduler.get_velocity(z0, noise, t)
        else:
            target = z0
        unet = pipe.unet
        with torch.set_grad_enabled(with_graph):
            emb = pipe.text_encoder(ids.to(self.device))[0]
            use_attn = c.lambda_attn > 0
            if use_attn:
                with record_attention(unet, keep_graph=True, layers=self.layers,
                                      max_resolution=self.max_res) as store:
                    pred = unet(zt.to(unet.dtype), t, emb.to(unet.dtype)).sample
                maps = concept_attention_maps(store, positions, self.layers,
                                              resolution=c.attn_resolution)
                l_attn = cross_attention_loss(maps, masks, valid, reduction=c.attn_reduction)
            else:
                pred = unet(zt.to(unet.dtype), t, emb.to(unet.dtype)).sample
                l_attn = torch.zeros((), device=pred.device)
            l_mask = masked_diffusion_loss(pred, target, masks.to(pred.device),
                                           normalize=c.loss_normalize)
            if c.norm_penalty > 0:
                l_norm = embedding_norm_penalty(self.embedding.rows(), self.vocab_norm)
            else:
                l_norm = torch.zeros((), device=pred.device)
            total = l_mask + c.lambda_attn * l_attn + c.norm_penalty * l_norm
        return {"loss": total, "diffusion": l_mask, "attention": l_attn, "norm_penalty": l_norm,
                "prompts": prompts}

    def step(self, samples=None, noise=None) -> dict:
        """One optimisation step; returns its logs (floats). By default the batch is drawn
        from the training generator; pass ``samples, noise`` (e.g. from
        :meth:`evaluation_set`) to take a step on a fixed batch instead ("overfit one
        batch"; such steps do not draw from the generator)."""
        c = self.config
        if self.phase == 1 and c.phase2 != "none" and self.step_count >= c.steps:
            self._start_phase2()
        if samples is None:
            samples, noise = self._sample()
        elif noise is None:
            raise ValueError("pass noise together with samples")
        out = self._losses(samples, noise)
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        if c.grad_clip and c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self._trainable(), c.grad_clip)
        self.optimizer.step()
        self.embedding.restore_frozen_rows()
        self.step_count += 1
        logs = {k: float(out[k].detach()) for k in ("loss", "diffusion", "attention",
                                                     "norm_penalty")}
        logs.update(step=self.step_count, phase=self.phase, prompt=out["prompts"][0],
                    timesteps=[s.t for s in samples])
        return logs

    def _record(self, logs):
        acc = self._acc
        for k in ("loss", "diffusion", "attention", "norm_penalty"):
            acc[k] = acc.get(k, 0.0) + logs[k]
        acc["n"] = acc.get("n", 0) + 1
        acc.setdefault("prompt", logs["prompt"])
        if self.step_count % self.history_every == 0 or self.step_count == self.config.total_steps:
            h, n = self.history, acc["n"]
            h.steps.append(self.step_count)
            for k in ("loss", "diffusion", "attention", "norm_penalty"):
                getattr(h, k).append(acc[k] / n)
            norms = self.embedding.rows().detach().float().norm(dim=1)
            h.embedding_norms.append([round(float(v), 5) for v in norms])
            h.prompts.append(acc["prompt"])
            self._acc = {}

    @torch.no_grad()
    def attention_snapshot(self, t: int | None = None) -> np.ndarray:
        """(K, h, w) attention of each concept token, from the first image that shows it,
        prompted with all concepts of that image, at a fixed t (default 300, clipped to
        ``t_range``) and fixed noise. Does not touch the training generator."""
        c, K = self.config, len(self.concepts)
        lo, hi = c.t_range
        t = min(max(300 if t is None else t, lo), hi - 1)
        first = {}
        for i, d in enumerate(self.data):
            for k in d.concept_ids:
                first.setdefault(k, i)
        images = sorted(set(first.values()))
        samples = [_Sample(i, list(self.data[i].concept_ids), False, t) for i in images]
        g = torch.Generator().manual_seed(c.seed + 7919)
        noise = torch.randn((len(samples), *self.latents[0].shape[1:]), generator=g)
        z0 = torch.stack([self.latents[i][0] for i in images])
        tt = torch.full((len(samples),), t, dtype=torch.long, device=z0.device)
        zt = self.noise_scheduler.add_noise(z0, noise.to(z0), tt)
        tok = self.pipe.tokenizer
        ids = tok(self.prompts(samples), padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
        positions = torch.full((len(samples), K), -1, dtype=torch.long)
        for b, s in enumerate(samples):
            for k in s.subset:
                where = (ids[b] == self.concepts.token_ids[k]).nonzero()
                if len(where):
                    positions[b, k] = int(where[0])
        unet = self.pipe.unet
        emb = self.pipe.text_encoder(ids.to(self.device))[0]
        with record_attention(unet, layers=self.layers, max_resolution=self.max_res) as store:
            unet(zt.to(unet.dtype), tt, emb.to(unet.dtype))
        maps = concept_attention_maps(store, positions, self.layers,
                                      resolution=c.attn_resolution).float().cpu()
        out = torch.zeros(K, *maps.shape[-2:])
        for k, i in first.items():
            out[k] = maps[images.index(i), k]
        return out.numpy()

    def _snapshot(self):
        if self.attention_every > 0 and (not self.history.attention_steps
                                         or self.history.attention_steps[-1] != self.step_count):
            self.history.attention_steps.append(self.step_count)
            self.history.attention_maps.append(self.attention_snapshot())

    def evaluation_set(self, n: int = 8, seed: int = 1234, timesteps=None):
        """A FIXED batch ``(samples, noise)``: sample j uses image ``j % N`` with all its
        concepts, no flip, timestep ``timesteps[j]`` (default: n evenly spaced in t_range)
        and noise from ``torch.Generator().manual_seed(seed)``."""
        lo, hi = self.config.t_range
        if timesteps is None:
            timesteps = np.linspace(lo, hi - 1, n).round().astype(int).tolist()
        timesteps = [int(t) for t in timesteps]
        N = len(self.data)
        samples = [_Sample(j % N, list(self.data[j % N].concept_ids), False, timesteps[j])
                   for j in range(len(timesteps))]
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn((len(samples), *self.latents[0].shape[1:]), generator=g)
        return samples, noise

    @torch.no_grad()
    def evaluate(self, n: int = 8, seed: int = 1234, timesteps=None) -> dict:
        """Mean losses on :meth:`evaluation_set` (the same set before and after training,
        so the numbers are comparable)."""
        samples, noise = self.evaluation_set(n, seed, timesteps)
        out = self._losses(samples, noise, with_graph=False)
        return {k: float(out[k]) for k in ("loss", "diffusion", "attention", "norm_penalty")}

    def train(self, steps: int | None = None) -> TrainingHistory:
        """Run ``steps`` more steps (default: up to ``config.total_steps``). Ctrl-C stops
        cleanly: the state so far is kept (and checkpointed if a folder was given),
        ``history.interrupted`` is set, and the history is returned."""
        from tqdm.auto import tqdm

        if self._closed:
            raise RuntimeError("this trainer was closed; build a new one")
        total = self.config.total_steps
        end = total if steps is None else min(total, self.step_count + int(steps))
        every = self.config.checkpoint_every
        bar = tqdm(total=total, initial=self.step_count, disable=not self.progress,
                   desc="concepts")
        self.history.interrupted = False
        if self.step_count == 0:
            self._snapshot()
        g_state = self.generator.get_state()
        try:
            while self.step_count < end:
                g_state = self.generator.get_state()
                logs = self.step()
                g_state = self.generator.get_state()
                self._record(logs)
                if self.attention_every > 0 and (self.step_count % self.attention_every == 0
                                                 or self.step_count == total):
                    self._snapshot()
                bar.update(1)
                if self.step_count % 5 == 0 or self.step_count == end:
                    bar.set_postfix(loss=f"{logs['loss']:.4f}", attn=f"{logs['attention']:.3f}")
                if self.checkpoint_dir and every and self.step_count % every == 0:
                    self.save_checkpoint()
                if self.callback is not None and self.callback(self, logs):
                    break
        except KeyboardInterrupt:
            self.history.interrupted = True
            self.optimizer.zero_grad(set_to_none=True)
            self.embedding.restore_frozen_rows()
            self.generator.set_state(g_state)  # the draws of the unfinished step are undone
        finally:
            bar.close()
        self.concepts.update_from(self.pipe)
        self._export_unet()
        if self.checkpoint_dir:
            self.save_checkpoint()
        return self.history

    def _export_unet(self):
        c = self.concepts
        if self.phase == 2 and self.config.phase2 == "full":
            c.unet_delta, c.unet_mode = full_unet_delta(self.pipe.unet, self.unet_base), "full"
            c.lora_config = None
        elif self.phase == 2:
            c.unet_delta, c.unet_mode = lora_weights(self.pipe.unet), "lora"
            c.lora_config = {"rank": self.config.lora_rank}

    def close(self):
        """Remove the gradient hook and give every parameter its former requires_grad."""
        if self._closed:
            return
        self.embedding.restore_frozen_rows()
        self.embedding.remove()
        for m, flags in self._requires_grad.items():
            for n, p in m.named_parameters():
                p.requires_grad_(flags.get(n, False))
        self._closed = True

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.checkpoint_dir, CHECKPOINT_FILE)

    def _compact_optimizer_state(self) -> dict:
        """Optimizer state with the embedding table's moments cut to the concept rows (the
        other rows' moments are exactly zero: their gradient is always zeroed)."""
        sd = self.optimizer.state_dict()
        state = dict(sd["state"])
        ids = self.concepts.token_ids
        if 0 in state:  # parameter 0 is always the embedding table
            st = dict(state[0])
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    st[k] = st[k][ids].clone()
            st["compact_rows"] = torch.tensor(ids)
            state[0] = st
        return {"state": state, "param_groups": sd["param_groups"]}

    def _expand_optimizer_state(self, sd: dict) -> dict:
        state = dict(sd["state"])
        if 0 in state and "compact_rows" in state[0]:
            st = dict(state[0])
            rows = st.pop("compact_rows").tolist()
            w = self.embedding.parameter
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    full = torch.zeros_like(w, memory_format=torch.preserve_format)
                    full[rows] = st[k].to(full)
                    st[k] = full
            state[0] = st
        return {"state": state, "param_groups": sd["param_groups"]}

    def save_checkpoint(self, path: str | None = None) -> str:
        """Write the full training state (atomically) and the concepts beside it."""
        path = path or self.checkpoint_path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        unet_weights = None  # phase 2: the trained U-Net weights, exactly (not as a delta)
        if self.phase == 2:
            unet_weights = ({k: v.detach().cpu().clone()
                             for k, v in self.pipe.unet.named_parameters()}
                            if self.config.phase2 == "full" else lora_weights(self.pipe.unet))
        ckpt = {
            "format": "conceptlab-training-1",
            "conceptlab_version": __version__,
            "names": list(self.concepts.names),
            "step": self.step_count,
            "phase": self.phase,
            "rows": self.embedding.rows().detach().float().cpu().clone(),
            "optimizer": self._compact_optimizer_state(),
            "generator": self.generator.get_state(),
            "history": self.history.to_dict(),
            "config": self.config.to_dict(),
            "unet": unet_weights,
            "pending": dict(self._acc),  # scalars of steps not yet written to the history
        }
        tmp = path + ".tmp"
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
        self.concepts.update_from(self.pipe)
        self._export_unet()
        save_concepts(self.concepts, os.path.dirname(path) or ".")
        return path

    def load_checkpoint(self, path: str):
        """Restore a state written by :meth:`save_checkpoint` (same base model and tokens)."""
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt["names"] != list(self.concepts.names):
            raise ValueError(f"the checkpoint {path} is for the tokens {ckpt['names']}, not "
                             f"{self.concepts.names}: use another checkpoint_dir or resume=False")
        old = TrainConfig.from_dict(ckpt["config"])
        diff = [k for k in ("seed", "batch_size", "lr", "lambda_attn", "phase2", "template",
                            "joiner", "flip", "t_range", "phase2_lr", "norm_penalty")
                if getattr(old, k) != getattr(self.config, k)]
        if diff:
            warnings.warn(f"resuming from {path} with a different config ({', '.join(diff)}): "
                          "the result will not match an uninterrupted run", stacklevel=3)
        if ckpt["phase"] == 2 and self.phase == 1:
            self._start_phase2()
            weights = ckpt["unet"] or {}
            if self.config.phase2 == "full":
                params = dict(self.pipe.unet.named_parameters())
                with torch.no_grad():
                    for k, v in weights.items():
                        params[k].copy_(v)
            else:
                load_lora_weights(self.pipe.unet, weights)
        w = embedding_weight(self.pipe)
        with torch.no_grad():
            w[self.concepts.token_ids] = ckpt["rows"].to(w)
        self.optimizer.load_state_dict(self._expand_optimizer_state(ckpt["optimizer"]))
        self.generator.set_state(ckpt["generator"])
        self.step_count = int(ckpt["step"])
        self.history = TrainingHistory.from_dict(ckpt["history"])
        self.history.config = self.config.to_dict()
        self._acc = dict(ckpt.get("pending") or {})
        self.concepts.update_from(self.pipe)
        return self


def train_concepts(pipe, data, concepts: ConceptTokens, config: TrainConfig | None = None, *,
                   progress: bool = True, history_every: int = 1,
                   attention_every: int | None = None, checkpoint_dir=None, resume: bool = True,
                   callback=None) -> TrainingHistory:
    """Learn the concept tokens (see the module doc); returns the :class:`TrainingHistory`.

    data            a ConceptImage or a list of them (:func:`make_concept_images`)
    concepts        from :func:`~conceptlab.concepts.add_concept_tokens` on this ``pipe``;
                    its ``embeddings`` snapshot is refreshed at the end
    history_every   record scalars every N steps (averaged over them)
    attention_every attention snapshot every N steps (default total/8; 0: none)
    checkpoint_dir  folder for ``checkpoint.pt`` + the concepts (every
                    ``config.checkpoint_every`` steps, at the end and on Ctrl-C); with
                    ``resume=True`` an existing checkpoint there is continued
    callback        ``callback(trainer, logs)`` after each step; return True to stop
    The pipeline keeps the trained rows (and the U-Net changes of phase 2).
    """
    trainer = ConceptTrainer(pipe, data, concepts, config, progress=progress,
                             history_every=history_every, attention_every=attention_every,
                             checkpoint_dir=checkpoint_dir, resume=resume, callback=callback)
    try:
        return trainer.train()
    finally:
        trainer.close()


__all__ = [
    "ConceptImage",
    "ConceptTrainer",
    "TrainConfig",
    "TrainingHistory",
    "add_lora_adapter",
    "default_attention_layers",
    "load_lora_weights",
    "lora_weights",
    "make_concept_images",
    "train_concepts",
]
