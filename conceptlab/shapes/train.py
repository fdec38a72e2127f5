"""Train the bundled miniature text-to-image model from scratch (CPU or CUDA).

Two stages, both resumable from checkpoints in ``out``:

1. the VAE (``AutoencoderKL``): MSE + 0.5 L1 + L1 on image gradients + a tiny KL term;
2. the U-Net and the text encoder jointly, on VAE latents of the shapes world, with the
   epsilon-prediction diffusion loss (min-SNR-gamma weighted), 10% empty captions (for
   classifier-free guidance), EMA weights, and optionally an *attention-grounding* loss.

The attention-grounding loss (after TokenCompose, Wang et al. 2024) uses the renderer's
exact masks during BASE-MODEL training only: for each colour, shape and background word,
``(1 - attention mass inside its region)^2``, plus a per-pixel BCE between each shape
word's attention and its object's mask. It emulates what Stable Diffusion learns from
web-scale data and a CPU-sized model does not learn in an hour. The concept-learning
method taught in the course never sees ground-truth masks. ``grounding_weight=0`` trains
the control model without it.

The training machinery is the dependencies' own: diffusers' ``EMAModel`` (EMA weights),
``compute_snr`` (min-SNR weights) and ``get_scheduler("cosine")`` (the VAE's and the
decoder's learning rates); the U-Net's schedule (a warm-up times a cosine over all steps)
has no diffusers equivalent and is a ``torch.optim.lr_scheduler.LambdaLR``. Every setting
is checked when a :class:`ModelTrainConfig` is made, and a model with NaN or infinite
weights is never saved.

Usage: ``conceptlab train-model --out runs/bundled`` (see ``conceptlab train-model -h``).

Several processes (``accelerate launch --multi_gpu --num_processes N -m conceptlab
train-model ...``; on a machine without CUDA they are CPU processes joined by gloo) train
the VAE and the U-Net stages data-parallel through ``accelerate``: every process draws the
same global batch of ``batch`` (``vae_batch``) rows from the same generator and keeps its
``batch / N`` of them, and DDP averages the gradients, so N processes compute what one
process computes with the same batch, up to the order of floating-point sums: the same
logged losses, and models whose outputs agree to ~1e-5 (a weight whose gradient is ~0, a
bias just before a GroupNorm, may differ by a few learning rates: Adam scales its float
noise up to full steps). The main process alone renders the data, encodes the latents,
writes logs, checkpoints and the pipeline, and trains the optional decoder stage; the
others read what it wrote. With CUDA each process trains on its GPU.

Why one module of about 1000 lines: it is the bundled model's whole recipe (settings and
their checks, data, VAE, U-Net with EMA and the grounding loss, exact resume, several
processes), kept in one file so that it reads top to bottom like the model card's recipe;
a third of it is docstrings.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from ..attention import record_attention
from ..fileio import (
    atomic_write_json,
    check_number,
    check_regular_file,
    fingerprint,
    load_tensors,
    torch_save,
)
from ..models import check_seed
from . import world
from .model import BUNDLED, BUNDLED_V1, TINY, build_components, make_pipeline

#: the model sizes ``ModelTrainConfig.model`` names
MODEL_SIZES = {"bundled": BUNDLED, "bundled-v1": BUNDLED_V1, "tiny": TINY}
#: the noise schedule's length (``build_components``' DDIMScheduler)
NUM_TRAIN_TIMESTEPS = 1000
#: linear learning-rate warm-up of the U-Net stage, in steps
UNET_WARMUP = 100

_INT = {"integer": True}
_POSITIVE = {"lo": 0, "lo_open": True}
_FRACTION = {"lo": 0, "hi": 1}
#: the range of every number of ModelTrainConfig (but the seed: models.check_seed)
_LIMITS = {
    "n_images": {"lo": 1, **_INT}, "pattern_p": _FRACTION,
    "vae_steps": {"lo": 1, **_INT}, "vae_batch": {"lo": 1, **_INT},
    "vae_crop": {"lo": 1, **_INT}, "vae_lr": _POSITIVE,
    "decoder_steps": {"lo": 0, **_INT}, "decoder_batch": {"lo": 1, **_INT},
    "unet_steps": {"lo": 1, **_INT}, "batch": {"lo": 1, **_INT}, "lr": _POSITIVE,
    "grounding_weight": {"lo": 0}, "grounding_tmax": {"lo": 0, "hi": NUM_TRAIN_TIMESTEPS, **_INT},
    "grounding_every": {"lo": 1, **_INT}, "min_snr_gamma": _POSITIVE, "p_uncond": _FRACTION,
    "ema_decay": {"lo": 0, "hi": 1, "hi_open": True},
    "checkpoint_every": {"lo": 1, **_INT}, "snapshot_every": {"lo": 0, **_INT},
    "log_every": {"lo": 1, **_INT}, "threads": {"lo": 0, **_INT},
}


@dataclass
class ModelTrainConfig:
    """The settings of one run of ``conceptlab train-model``, checked when it is made.

    Every number must be finite and in its range (``_LIMITS``: e.g. ``p_uncond`` and
    ``pattern_p`` in [0, 1], ``ema_decay`` in [0, 1), learning rates > 0, step counts and
    batch sizes integers >= 1); the seed an integer in [0, 2**32 - 1]. A bad value raises
    ValueError naming the field, its value and the range. Float fields are stored as
    floats (``lr=1`` becomes 1.0), so equal settings give one fingerprint.
    """

    out: str = "runs/bundled"
    model: str = "bundled"  # "bundled" (v2), "bundled-v1" or "tiny" (tests)
    n_images: int = 20000
    seed: int = 0
    pattern_p: float = 0.25  # fraction of training objects that are striped/two-tone/dotted
    vae_steps: int = 1000
    vae_batch: int = 16
    vae_crop: int = 32  # the VAE is fully convolutional: train on random crops (4x cheaper)
    vae_lr: float = 1e-3
    decoder_steps: int = 0  # optionally then the decoder alone, on full images (the encoder, hence
    decoder_batch: int = 16    # the latents the U-Net learns, is frozen)
    unet_steps: int = 1600
    batch: int = 32
    lr: float = 8e-4
    grounding_weight: float = 0.1
    grounding_tmax: int = 750
    grounding_every: int = 1  # the grounding loss on every N-th step only (it costs ~30%)
    min_snr_gamma: float = 5.0
    p_uncond: float = 0.1
    ema_decay: float = 0.999
    checkpoint_every: int = 100
    snapshot_every: int = 0  # also save an EMA pipeline every N U-Net steps (0: never)
    log_every: int = 25
    threads: int = 0  # 0: leave torch's default

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check every setting (called on creation and by ``dataclasses.replace``).

        Raises:
            ValueError: a setting out of its range, not finite, or of the wrong type; the
                message names it, its value and the allowed range.
        """
        if not isinstance(self.out, (str, os.PathLike)) or not os.fspath(self.out):
            raise ValueError(f"out must be a folder path, got {self.out!r}")
        self.out = os.fspath(self.out)
        if self.model not in MODEL_SIZES:
            raise ValueError(f"unknown model size {self.model!r}: choose one of "
                             f"{sorted(MODEL_SIZES)}")
        self.seed = check_seed(self.seed)
        for name, limits in _LIMITS.items():
            setattr(self, name, check_number(name, getattr(self, name), **limits))
        factor = 2 ** (len(self.model_config.vae_channels) - 1)
        if self.vae_crop % factor:
            raise ValueError(f"vae_crop must be a multiple of {factor} (the VAE's downsampling "
                             f"factor), got {self.vae_crop}")

    @property
    def model_config(self):
        """The :class:`~conceptlab.shapes.model.ModelConfig` of ``model``."""
        return MODEL_SIZES[self.model]


def _log(path, **rec):
    if path is None:  # not the main process: it logs nothing
        return
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _atomic_save(obj, path):
    torch_save(obj, path)


# ----------------------------------------------------------------------------- processes
def new_accelerator():
    """The ``accelerate.Accelerator`` that :func:`train_model` trains with.

    Under ``accelerate launch`` it joins the launched processes (GPUs with NCCL, or CPU
    processes with gloo where there is no CUDA); a plain ``python`` process gets a single
    process on the GPU, or on the CPU without CUDA. Mixed precision stays off: the recipe
    is float32, and a resume must continue it exactly.

    Returns:
        An ``accelerate.Accelerator``.
    """
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")


class _Processes:
    """This process's place among the training processes: one process without an
    accelerator, else the accelerator's (one, or those of ``accelerate launch``)."""

    def __init__(self, accelerator=None):
        self.acc = accelerator
        self.n = accelerator.num_processes if accelerator else 1
        self.index = accelerator.process_index if accelerator else 0
        self.main = accelerator.is_main_process if accelerator else True
        self.device = accelerator.device if accelerator else torch.device("cpu")

    def rows(self, batch: int) -> slice:
        """This process's rows of a global batch (all of them for one process)."""
        if self.n == 1:
            return slice(None)
        share = batch // self.n
        return slice(self.index * share, (self.index + 1) * share)

    def wrap(self, *modules):
        """The modules as the processes train them (DDP for several, moved to the device)."""
        if self.acc is None:
            return modules if len(modules) > 1 else modules[0]
        return self.acc.prepare(*modules)

    def backward(self, loss):
        if self.acc is None:
            loss.backward()
        else:
            self.acc.backward(loss)

    def reduce(self, t, how: str = "mean"):
        """The detached ``t`` reduced over the processes (itself for one process)."""
        t = t.detach()
        return self.acc.reduce(t, how) if self.n > 1 else t

    def barrier(self):
        if self.n > 1:
            self.acc.wait_for_everyone()

    def release(self):
        """Drop the accelerator's references to the models it wrapped (a stage's DDP)."""
        if self.acc is not None:
            self.acc.free_memory()


def check_batches(cfg: ModelTrainConfig, num_processes: int) -> None:
    """Check that the global batches split evenly between ``num_processes`` processes.

    Args:
        cfg: the run's settings (``batch``, ``vae_batch``).
        num_processes: the number of training processes.

    Raises:
        ValueError: ``batch`` or ``vae_batch`` is not a multiple of ``num_processes``.
    """
    for name in ("vae_batch", "batch"):
        if getattr(cfg, name) % num_processes:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(cfg, name)} does not split "
                             f"between {num_processes} processes: give a multiple of "
                             f"{num_processes} (it is the global batch, summed over processes)")


# ----------------------------------------------------------------------------- data
def build_dataset(cfg: ModelTrainConfig, tokenizer, size: int) -> dict:
    """Render the training scenes; masks are kept at the latent and half-latent sizes.

    Args:
        cfg: the run's settings (``n_images``, ``seed``, ``pattern_p``).
        tokenizer: the model's tokenizer (captions -> padded ids).
        size: the image side in pixels.

    Returns:
        dict of ``images`` (n, size, size, 3) uint8, ``soft`` {res: (n, 4, res, res)}
            region masks, ``ids`` (n, T), ``region`` (n, T) (-1 none, 0 background, i
            object i), ``is_shape`` (n, T) and ``captions``.
    """
    kw = {} if not cfg.pattern_p else dict(patterns=world.PATTERNS, pattern_p=cfg.pattern_p,
                                           with_pattern=True)
    data = world.make_dataset(cfg.n_images, seed=cfg.seed, size=size, **kw)
    lat = size // 4
    soft = {res: _soft_masks(data["masks"], res) for res in (lat, lat // 2)}
    ids = tokenizer(data["captions"], padding="max_length", truncation=True,
                    max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    region, is_shape = _token_regions(data["specs"], ids, tokenizer)
    return {"images": torch.from_numpy(data["images"]), "soft": soft, "ids": ids, "region": region,
            "is_shape": is_shape, "captions": data["captions"]}


def _soft_masks(masks, res: int) -> torch.Tensor:
    """(n, 4, res, res) fp16 area-averaged object masks (up to 4 objects a scene)."""
    m = np.zeros((len(masks), 4, res, res), np.float16)
    for i, mk in enumerate(masks):
        t = torch.from_numpy(mk.astype(np.float32))[None]
        m[i, :mk.shape[0]] = F.adaptive_avg_pool2d(t, res)[0].numpy()
    return torch.from_numpy(m)


def _token_regions(specs, ids, tokenizer):
    """Which region each caption token is grounded in (-1 none, 0 background, i object i),
    and whether it is a shape word."""
    region = torch.full(ids.shape, -1, dtype=torch.long)
    is_shape = torch.zeros(ids.shape, dtype=torch.bool)
    vocab = tokenizer.get_vocab()
    tid = {w: vocab[w + "</w>"] for w in world.vocabulary() if w + "</w>" in vocab}
    for i, spec in enumerate(specs):
        row = ids[i].tolist()
        for j, o in enumerate(spec.objects, start=1):
            words = [(o.colour, False), (o.shape, True)]
            if o.pattern in tid and sum(x.pattern == o.pattern for x in spec.objects) == 1:
                words.append((o.pattern, False))  # 'striped' names this object only
            for w, shape_word in words:
                if tid[w] in row:
                    p = row.index(tid[w])
                    region[i, p] = j
                    is_shape[i, p] = shape_word
        for w in (spec.background, "background"):
            if tid[w] in row:
                region[i, row.index(tid[w])] = 0
    return region, is_shape


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(n, H, W, 3) uint8 -> (n, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


# ----------------------------------------------------------------------------- VAE
def _recon_loss(rec, x):
    """MSE + 0.5 L1 + L1 on the image gradients of a reconstruction."""
    d = rec - x
    gy, gx = rec[..., 1:, :] - rec[..., :-1, :], rec[..., :, 1:] - rec[..., :, :-1]
    ty, tx = x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]
    return (d.pow(2).mean() + 0.5 * d.abs().mean() + (gy - ty).abs().mean()
            + (gx - tx).abs().mean())


def vae_loss(vae, x, kl_weight=1e-6, rows=None, batch=None):
    """The VAE stage's loss.

    Args:
        vae: the ``AutoencoderKL``.
        x: (B, 3, H, W) images in [-1, 1].
        kl_weight: weight of the KL term.
        rows: for one of several processes, its rows of the global batch: the posterior
            noise is then drawn for the whole global batch (``batch`` rows, from torch's
            global generator, as one process draws it) and these rows are kept. None: the
            posterior's own sample.
        batch: the global batch size (with ``rows``).

    Returns:
        (loss, reconstruction).
    """
    post = vae.encode(x).latent_dist
    if rows is None:
        z = post.sample()
    else:
        eps = torch.randn((batch, *post.mean.shape[1:]), dtype=post.mean.dtype)[rows]
        z = post.mean + post.std * eps.to(post.mean.device)
    rec = vae.decode(z).sample
    return _recon_loss(rec, x) + kl_weight * post.kl().mean(), rec


class _VAEObjective(torch.nn.Module):
    """:func:`vae_loss` as a module's ``forward``: DDP synchronises the gradients of what
    runs inside the forward of the module it wraps (not of ``vae.encode`` called beside)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x, rows=None, batch=None):
        return vae_loss(self.vae, x, rows=rows, batch=batch)


def _cosine_schedule(opt, base_lr: float, total: int, start: int = 0):
    """diffusers' cosine schedule without warm-up, at step ``start``:
    lr = base_lr * 0.5 * (1 + cos(pi * step / total))."""
    from diffusers.optimization import get_scheduler

    for pg in opt.param_groups:
        pg["initial_lr"] = base_lr  # the schedule's base (a resumed optimiser holds the last lr)
    return get_scheduler("cosine", opt, num_warmup_steps=0, num_training_steps=total,
                         last_epoch=start - 1)


def _optimise(opt, loss, params, max_norm: float = 1.0, procs=None):
    opt.zero_grad(set_to_none=True)
    if procs is None:
        loss.backward()
    else:
        procs.backward(loss)  # several processes: DDP averages the gradients here
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()


def _random_flip(x, g):
    return x.flip(-1) if torch.rand((), generator=g) < 0.5 else x


def _check_loss(loss: float, stage: str, step: int, fix: str):
    if not math.isfinite(loss):
        raise RuntimeError(f"the {stage} loss is {loss} at step {step}: training diverged; "
                           f"{fix}, and train into a new --out folder")


def train_vae(vae, images, cfg: ModelTrainConfig, log_path, start_step=0, opt_state=None,
              ckpt_path=None, accelerator=None):
    """Stage 1: train the VAE on random crops, from ``start_step`` on.

    Args:
        vae: the ``AutoencoderKL`` (trained in place).
        images: (n, H, W, 3) uint8 training images.
        cfg: the run's settings (``vae_*``, ``seed``, ``log_every``, ``checkpoint_every``).
        log_path: the JSON-lines log (None: none).
        start_step: the step to resume from.
        opt_state: the optimiser state to resume (None: a fresh AdamW).
        ckpt_path: where to write checkpoints (None: none).
        accelerator: an ``accelerate.Accelerator`` (:func:`new_accelerator`): its device,
            and with several processes each trains on its rows of every ``vae_batch``
            (data-parallel) and only the main one logs and checkpoints. None: this process
            alone, on the CPU.

    Returns:
        ``vae``, in eval mode.

    Raises:
        RuntimeError: the loss became NaN or infinite.
    """
    procs = _Processes(accelerator)
    g = torch.Generator().manual_seed(cfg.seed + 1 + start_step)
    vae.train().to(memory_format=torch.channels_last)
    objective = procs.wrap(_VAEObjective(vae))
    params = list(vae.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.vae_lr, weight_decay=0.0)
    if opt_state:
        opt.load_state_dict(opt_state)
    sched = _cosine_schedule(opt, cfg.vae_lr, cfg.vae_steps, start_step)
    rows = procs.rows(cfg.vae_batch)
    noise = {} if procs.n == 1 else {"rows": rows, "batch": cfg.vae_batch}
    t0 = time.time()
    for step in range(start_step, cfg.vae_steps):
        idx = torch.randint(len(images), (cfg.vae_batch,), generator=g)
        x = _random_flip(images_to_tensor(images[idx.numpy()]), g)
        c = min(cfg.vae_crop, x.shape[-1])
        oy, ox = (int(v) for v in torch.randint(0, x.shape[-1] - c + 1, (2,), generator=g))
        x = x[rows, :, oy:oy + c, ox:ox + c].contiguous(memory_format=torch.channels_last)
        loss, _ = objective(x.to(procs.device), **noise)
        _optimise(opt, loss, params, procs=procs)
        sched.step()
        if step % cfg.log_every == 0 or step == cfg.vae_steps - 1:
            mean = procs.reduce(loss).item()
            _check_loss(mean, "VAE", step, f"lower --vae-lr (now {cfg.vae_lr:g})")
            _log(log_path, stage="vae", step=step, loss=round(mean, 5),
                 time=round(time.time() - t0, 1))
        if ckpt_path and procs.main and (step + 1) % cfg.checkpoint_every == 0:
            _atomic_save({"stage": "vae", "step": step + 1, "vae": vae.state_dict(),
                          "opt": opt.state_dict(), "run": run_fingerprint(cfg, "vae"),
                          "settings": run_settings(cfg, "vae")}, ckpt_path)
    del objective
    procs.release()
    vae.eval().to(memory_format=torch.contiguous_format)
    return vae


def finetune_decoder(vae, images, cfg: ModelTrainConfig, log_path=None, steps=None, lr=5e-4):
    """Train the VAE decoder alone on full-size images with the encoder frozen.

    The latents (what the U-Net learns) do not change, so this can run before, during or
    after U-Net training with the same result: only reconstructions get sharper.

    Args:
        vae: the ``AutoencoderKL`` (its decoder is trained in place).
        images: (n, H, W, 3) uint8 training images.
        cfg: the run's settings (``decoder_steps``, ``decoder_batch``, ``seed``).
        log_path: the JSON-lines log (None: no log).
        steps: the number of steps (default ``cfg.decoder_steps``).
        lr: the peak learning rate of the cosine schedule.

    Returns:
        ``vae``, in eval mode, frozen.
    """
    steps = cfg.decoder_steps if steps is None else steps
    g = torch.Generator().manual_seed(cfg.seed + 3)
    vae.requires_grad_(False)
    dec = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in dec:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(dec, lr=lr, weight_decay=0.0)
    sched = _cosine_schedule(opt, lr, steps)
    vae.train()
    device = dec[0].device
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(len(images), (cfg.decoder_batch,), generator=g)
        x = _random_flip(images_to_tensor(images[idx.numpy()]), g).to(device)
        with torch.no_grad():
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(device)
        loss = _recon_loss(vae.decode(z).sample, x)
        _optimise(opt, loss, dec)
        sched.step()
        if log_path and (step % cfg.log_every == 0 or step == steps - 1):
            _log(log_path, stage="decoder", step=step, loss=round(loss.item(), 5),
                 time=round(time.time() - t0, 1))
    vae.eval().requires_grad_(False)
    return vae


@torch.no_grad()
def encode_latents(vae, images, batch=256):
    """(n, 2C, h, w) VAE posterior means of the images (channels :C) and of their mirror
    images (channels C:)."""
    out = []
    device = next(vae.parameters()).device
    for i in range(0, len(images), batch):
        x = images_to_tensor(images[i:i + batch]).to(device)
        out.append(torch.cat([vae.encode(x).latent_dist.mean,
                              vae.encode(x.flip(-1)).latent_dist.mean], 1).cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------- U-Net
def grounding_loss(store, soft, region, is_shape, weight_rows, n_tokens=None, n_shapes=None):
    """Attention-grounding loss on recorded maps (see module docstring).

    Args:
        store: the ``AttentionStore`` of one forward pass (kept graph).
        soft: {res: (B, 4, res, res)} region masks.
        region: (B, T) the region of each token (-1 none, 0 background, i object i).
        is_shape: (B, T) whether each token is a shape word.
        weight_rows: (B,) bool, which samples get the loss (t < tmax and a non-empty caption).
        n_tokens: the number of grounded tokens the token term is averaged over (default:
            those of this batch). One of several processes passes the count of the global
            batch, so that the processes' losses add up to the global batch's.
        n_shapes: the same for the shape words' pixel term.

    Returns:
        The loss averaged over the recorded layers (a 0-dim tensor).
    """
    total, n_layers = 0.0, 0
    sel = (region >= 0) & weight_rows[:, None]
    if sel.sum() == 0:
        return torch.zeros((), device=region.device)
    shp = sel & is_shape
    n_tokens = sel.sum() if n_tokens is None else n_tokens
    n_shapes = shp.sum() if n_shapes is None else n_shapes
    for calls in store.maps.values():
        a = calls[-1].mean(1)  # (B, h, w, T)
        B, h, w, T = a.shape
        a = a.reshape(B, h * w, T).transpose(1, 2)  # (B, T, N)
        m = soft[h].reshape(B, 4, h * w).float()
        tgt = torch.gather(m, 1, region.clamp(min=0)[..., None].expand(B, T, h * w))
        mass = (a * tgt).sum(-1) / (a.sum(-1) + 1e-6)
        l_tok = ((1 - mass).pow(2) * sel).sum() / n_tokens
        bce = F.binary_cross_entropy(a.clamp(1e-5, 1 - 1e-5), tgt, reduction="none").mean(-1)
        l_pix = (bce * shp).sum() / n_shapes.clamp(min=1)
        total = total + l_tok + l_pix
        n_layers += 1
    return total / n_layers


def new_ema(modules, decay: float):
    """EMA weights of the modules' parameters: diffusers' ``EMAModel``.

    With ``use_ema_warmup=False`` its decay at update k is ``min(decay, k / (9 + k))``, the
    recipe's ``min(decay, (1 + step) / (10 + step))`` at 0-based step k - 1, except the first
    update, which copies the weights (decay 0, where the recipe used 0.1: a difference that
    has shrunk below 1e-12 of the weights after 100 steps).

    Args:
        modules: the modules whose parameters are averaged (U-Net, text encoder), in order.
        decay: the largest decay.

    Returns:
        A ``diffusers.training_utils.EMAModel``.
    """
    from diffusers.training_utils import EMAModel

    return EMAModel([p for m in modules for p in m.parameters()], decay=decay,
                    use_ema_warmup=False, foreach=True)


def _load_ema(ema, saved: dict, modules, step: int):
    """Restore EMA weights from a checkpoint: ``EMAModel.state_dict()``, or the earlier
    format (a dict of named tensors, the update count being the step)."""
    if "shadow_params" not in saved:
        names = [f"{i}.{k}" for i, m in enumerate(modules) for k, _ in m.named_parameters()]
        saved = {"shadow_params": [saved[n] for n in names], "optimization_step": int(step)}
    ema.load_state_dict(saved)


def _warmup_cosine_schedule(opt, base_lr: float, total: int, start: int = 0):
    """The U-Net's schedule at step ``start``: lr = base_lr * min(1, (step + 1) / 100) *
    0.5 * (1 + cos(pi * step / total)), a warm-up times a cosine over ALL steps. diffusers'
    "cosine" with warm-up is piecewise (0 -> lr over the warm-up, then a cosine over the
    remaining steps), another schedule, so torch's LambdaLR takes the recipe's formula."""
    from torch.optim.lr_scheduler import LambdaLR

    def factor(step):
        return min(1.0, (step + 1) / UNET_WARMUP) * 0.5 * (1 + math.cos(math.pi * step / total))

    for pg in opt.param_groups:
        pg["initial_lr"] = base_lr
    return LambdaLR(opt, factor, last_epoch=start - 1)


class _UNetStage:
    """Stage 2: the U-Net and the text encoder, with EMA weights; resumable. With several
    processes each trains on its rows of every batch (DDP) and the main one writes."""

    def __init__(self, cfg: ModelTrainConfig, comps: dict, data: dict, z, ckpt, procs=None):
        self.cfg, self.comps, self.data, self.z = cfg, comps, data, z
        self.procs = procs or _Processes()
        self.C = z.shape[1] // 2  # z holds the latents and those of the mirror images
        self.unet, self.te = comps["unet"], comps["text_encoder"]
        # the wrapped models run the forward passes; the models themselves (same parameters)
        # are what the optimiser, the EMA, checkpoints and the pipeline read
        self.unet_fwd, self.te_fwd = self.procs.wrap(self.unet, self.te)
        self.params = list(self.unet.parameters()) + list(self.te.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=0.01)
        self.ema = new_ema([self.unet, self.te], cfg.ema_decay)
        self.start = 0
        if ckpt is not None and ckpt["stage"] == "unet":
            self.unet.load_state_dict(ckpt["unet"])
            self.te.load_state_dict(ckpt["text_encoder"])
            self.opt.load_state_dict(ckpt["opt"])
            _load_ema(self.ema, ckpt["ema"], [self.unet, self.te], ckpt["step"])
            self.ema.to(self.procs.device)
            self.start = ckpt["step"]
        self.lr_sched = _warmup_cosine_schedule(self.opt, cfg.lr, cfg.unet_steps, self.start)
        tok = comps["tokenizer"]
        self.uncond = tok("", padding="max_length", max_length=tok.model_max_length,
                          return_tensors="pt").input_ids[0]
        self.g = torch.Generator().manual_seed(cfg.seed + 2 + self.start)

    def batch(self) -> SimpleNamespace:
        """A random batch: latents (randomly mirrored), captions (some dropped), t, noise.

        Every process draws the whole global batch from the same generator and keeps its
        rows; the grounding loss's token counts are those of the global batch."""
        cfg, g, C, z, data = self.cfg, self.g, self.C, self.z, self.data
        idx = torch.randint(len(z), (cfg.batch,), generator=g)
        flip = torch.rand(cfg.batch, generator=g)[:, None, None, None] < 0.5
        drop = torch.rand(cfg.batch, generator=g) < cfg.p_uncond
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (cfg.batch,), generator=g)
        noise = torch.randn((cfg.batch, C, *z.shape[2:]), generator=g)
        sel = (data["region"][idx] >= 0) & ((t < cfg.grounding_tmax) & ~drop)[:, None]
        n_tokens, n_shapes = sel.sum(), (sel & data["is_shape"][idx]).sum()
        r = self.procs.rows(cfg.batch)
        idx, flip, drop, t, noise = idx[r], flip[r], drop[r], t[r], noise[r]
        z0 = torch.where(flip, z[idx, C:], z[idx, :C])
        soft = {res: torch.where(flip, m[idx].flip(-1), m[idx]) for res, m in data["soft"].items()}
        ids = data["ids"][idx].clone()
        ids[drop] = self.uncond
        dev = self.procs.device
        return SimpleNamespace(idx=idx, z0=z0.to(dev), soft={k: v.to(dev) for k, v in soft.items()},
                               ids=ids.to(dev), drop=drop.to(dev), t=t.to(dev),
                               noise=noise.to(dev), n_tokens=n_tokens.to(dev),
                               n_shapes=n_shapes.to(dev))

    def losses(self, step: int, b: SimpleNamespace):
        """(min-SNR-weighted diffusion loss, grounding loss, total loss) of this process's
        rows of a batch. The processes' diffusion losses average, and their grounding losses
        add up, to the global batch's; the total is scaled so that DDP's average of the
        gradients is the global batch's gradient."""
        from diffusers.training_utils import compute_snr

        cfg, sched = self.cfg, self.comps["scheduler"]
        zt = sched.add_noise(b.z0, b.noise, b.t)
        ground = cfg.grounding_weight > 0 and step % cfg.grounding_every == 0
        with record_attention(self.unet, keep_graph=True) if ground else \
                contextlib.nullcontext() as store:
            pred = self.unet_fwd(zt, b.t, self.te_fwd(b.ids)[0]).sample
        snr = compute_snr(sched, b.t)
        w = torch.clamp(snr, max=cfg.min_snr_gamma) / snr
        l_diff = ((pred - b.noise).pow(2).mean((1, 2, 3)) * w).mean()
        if not ground:
            return l_diff, torch.zeros((), device=l_diff.device), l_diff
        rows = (b.t < cfg.grounding_tmax) & ~b.drop
        dev = self.procs.device
        l_g = grounding_loss(store, b.soft, self.data["region"][b.idx].to(dev),
                             self.data["is_shape"][b.idx].to(dev), rows, b.n_tokens, b.n_shapes)
        return l_diff, l_g, l_diff + cfg.grounding_weight * self.procs.n * l_g

    def run(self, progress: bool, log_path: str, ckpt_path: str):
        """Train from ``start`` to ``unet_steps``, logging, checkpointing and snapshotting
        (the main process writes)."""
        from tqdm.auto import tqdm

        cfg, procs = self.cfg, self.procs
        self.unet.train()
        self.te.train()
        bar = tqdm(range(self.start, cfg.unet_steps), initial=self.start, total=cfg.unet_steps,
                   disable=not (progress and procs.main), desc="unet")
        t0 = time.time()
        for step in bar:
            lr = self.opt.param_groups[0]["lr"]
            l_diff, l_g, loss = self.losses(step, self.batch())
            _optimise(self.opt, loss, self.params, procs=procs)
            self.ema.step(self.params)
            self.lr_sched.step()
            if step % cfg.log_every == 0 or step == cfg.unet_steps - 1:
                l_diff, l_g = procs.reduce(l_diff).item(), procs.reduce(l_g, "sum").item()
                _check_loss(l_diff, "U-Net", step, f"lower --lr (now {cfg.lr:g})")
                _adjust_threads(cfg.out)
                _log(log_path, stage="unet", step=step, loss=round(l_diff, 5),
                     grounding=round(l_g, 5), lr=lr, time=round(time.time() - t0, 1))
                bar.set_postfix(loss=f"{l_diff:.4f}", ground=f"{l_g:.3f}")
            if not procs.main:
                continue
            if (step + 1) % cfg.checkpoint_every == 0 or step == cfg.unet_steps - 1:
                self.save_checkpoint(step + 1, ckpt_path)
            if cfg.snapshot_every and (step + 1) % cfg.snapshot_every == 0:
                save_pipeline(self.comps, self.ema,
                              os.path.join(cfg.out, f"snapshot-{step + 1:05d}"))
        self.unet.eval()
        self.te.eval()
        self.unet_fwd = self.te_fwd = None
        procs.release()

    def save_checkpoint(self, step: int, path: str):
        _atomic_save({"stage": "unet", "step": step, "vae": self.comps["vae"].state_dict(),
                      "unet": self.unet.state_dict(), "text_encoder": self.te.state_dict(),
                      "opt": self.opt.state_dict(), "ema": self.ema.state_dict(),
                      "run": run_fingerprint(self.cfg), "settings": run_settings(self.cfg)},
                     path)


def _check_finite(comps: dict, out_dir):
    """RuntimeError when a weight (or the VAE's scaling factor) is NaN or infinite."""
    for part in ("unet", "text_encoder", "vae"):
        for name, t in comps[part].state_dict().items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise RuntimeError(
                    f"the trained {part} has NaN or infinite weights ({name}): training "
                    f"diverged, so nothing is saved to {out_dir}; train again into a new --out "
                    "folder with a lower --lr / --vae-lr")
    if not math.isfinite(comps["vae"].config.scaling_factor):
        raise RuntimeError(f"the VAE's scaling factor is {comps['vae'].config.scaling_factor}: "
                           f"nothing is saved to {out_dir}; the VAE stage diverged")


def save_pipeline(components, ema, out_dir, fp16=True):
    """Save the EMA weights as a StableDiffusionPipeline folder (fp16 safetensors).

    Args:
        components: the pipeline's components (the U-Net and text encoder are copied, the
            copies get the EMA weights).
        ema: the ``EMAModel`` of the U-Net's and the text encoder's parameters, in order.
        out_dir: the folder to write.
        fp16: store the weights in float16.

    Returns:
        ``out_dir``.

    Raises:
        RuntimeError: a weight is NaN or infinite (nothing is written).
    """
    comps = dict(components)
    unet = copy.deepcopy(components["unet"])
    te = copy.deepcopy(components["text_encoder"])
    ema.copy_to(list(unet.parameters()) + list(te.parameters()))
    comps["unet"], comps["text_encoder"] = unet, te
    comps["vae"] = copy.deepcopy(components["vae"])
    _check_finite(comps, out_dir)
    pipe = make_pipeline(comps)
    if fp16:
        pipe.to(torch.float16)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


# ----------------------------------------------------------------------------- the run
def train_model(cfg: ModelTrainConfig, progress: bool = True, accelerator=None) -> str:
    """Train (or resume) the model.

    A checkpoint in ``cfg.out`` is checked against ``cfg`` before anything is written, so
    a refused resume leaves the folder as it was. Under ``accelerate launch`` every
    process calls this; they train data-parallel (module doc) and the main process writes
    every file.

    Args:
        cfg: the run's settings (checked when it was made).
        progress: show a progress bar for the U-Net stage (on the main process).
        accelerator: the ``accelerate.Accelerator`` to train with (default:
            :func:`new_accelerator`); after each stage it drops its references to what it
            prepared (``free_memory``).

    Returns:
        The folder of the saved pipeline (``cfg.out/model``; the main process writes it,
            the others return its name when their share of the training is done).

    Raises:
        RuntimeError: the checkpoint in ``cfg.out`` belongs to another run, or training
            diverged (NaN or infinite loss or weights: nothing is saved).
        ValueError: a file in ``cfg.out`` is corrupt, planted or not a regular file, or a
            batch does not split between the processes.
    """
    procs = _Processes(accelerator if accelerator is not None else new_accelerator())
    check_batches(cfg, procs.n)
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    ckpt = _resume_checkpoint(cfg, ckpt_path)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    log_path = None
    if procs.main:
        os.makedirs(cfg.out, exist_ok=True)
        atomic_write_json(os.path.join(cfg.out, "train_config.json"), asdict(cfg), indent=1)
        log_path = os.path.join(cfg.out, "train_log.jsonl")
    comps = build_components(cfg.model_config, seed=cfg.seed)
    data = _dataset(cfg, comps["tokenizer"], log_path, procs)
    if procs.n > 1:  # the VAE's posterior noise: one stream, drawn alike by every process
        from accelerate.utils import synchronize_rng_states

        synchronize_rng_states(["torch"])
    vae = _vae_stage(cfg, comps["vae"], data["images"], ckpt, log_path, ckpt_path, procs)
    z = _latents(cfg, vae, data["images"], ckpt, log_path, procs)
    stage = _UNetStage(cfg, comps, data, z, ckpt, procs)
    stage.run(progress, log_path, ckpt_path)
    out_dir = os.path.join(cfg.out, "model")
    if not procs.main:
        return out_dir
    # stage 3: the decoder alone (encoder frozen: the U-Net's latents are unchanged)
    dec_path = os.path.join(cfg.out, "decoder.pt")
    if os.path.exists(dec_path):
        vae.load_state_dict(load_tensors(dec_path))
    elif cfg.decoder_steps:
        finetune_decoder(vae, data["images"], cfg, log_path)
        _atomic_save(vae.state_dict(), dec_path)
    return save_pipeline(comps, stage.ema, out_dir)


def _resume_checkpoint(cfg: ModelTrainConfig, path: str):
    """The checkpoint at ``path`` checked to be this run's, or None when there is none."""
    if not os.path.lexists(path):
        return None
    ckpt = load_tensors(path)
    if not isinstance(ckpt, dict) or "stage" not in ckpt or "step" not in ckpt:
        raise ValueError(f"{path} is not a train-model checkpoint: delete it or train into a "
                         "new --out folder")
    _check_same_run(ckpt, cfg, path)
    return ckpt


def _dataset(cfg: ModelTrainConfig, tokenizer, log_path, procs=None) -> dict:
    """The rendered training data, from ``cfg.out/dataset.pt`` when it is there (the main
    process renders and writes it; the others read it)."""
    procs = procs or _Processes()
    t0 = time.time()
    cache = os.path.join(cfg.out, "dataset.pt")
    data = None
    if procs.main and not os.path.exists(cache):
        data = build_dataset(cfg, tokenizer, cfg.model_config.image_size)
        _atomic_save(data, cache)
    procs.barrier()
    if data is None:
        data = load_tensors(cache)  # tensors, lists and str only: no pickle
    data["images"] = np.asarray(data["images"])
    _log(log_path, stage="data", n=cfg.n_images, time=round(time.time() - t0, 1))
    return data


def _vae_stage(cfg: ModelTrainConfig, vae, images, ckpt, log_path, ckpt_path, procs=None):
    """Stage 1, resumed from ``ckpt`` (whose VAE weights are loaded in any stage)."""
    procs = procs or _Processes()
    vae_start, vae_opt = 0, None
    if ckpt is not None:
        vae.load_state_dict(ckpt["vae"])
        if ckpt["stage"] == "vae":
            vae_start, vae_opt = ckpt["step"], ckpt["opt"]
        else:
            vae_start = cfg.vae_steps
    vae.to(procs.device)
    if vae_start < cfg.vae_steps:
        train_vae(vae, images, cfg, log_path, vae_start, vae_opt, ckpt_path, procs.acc)
    return vae.eval().requires_grad_(False)


def _latents(cfg: ModelTrainConfig, vae, images, ckpt, log_path, procs=None):
    """The scaled latents of the training images (cached once the VAE stage is done); sets
    the VAE's ``scaling_factor`` to 1 / their std. The main process encodes them, the
    others read its cache."""
    procs = procs or _Processes()
    lat_cache = os.path.join(cfg.out, "latents.pt")
    vae_done = ckpt is not None and (ckpt["stage"] == "unet" or ckpt["step"] >= cfg.vae_steps)
    if procs.main:
        if os.path.exists(lat_cache) and vae_done:  # written once the VAE stage had finished
            z = load_tensors(lat_cache)
        else:
            z = encode_latents(vae, images)
            _atomic_save(z, lat_cache)
    procs.barrier()
    if not procs.main:
        z = load_tensors(lat_cache)
    scale = float(1.0 / z[:, :cfg.model_config.latent_channels].std())
    if not math.isfinite(scale):
        raise RuntimeError(f"the VAE's latents have a std of {1 / scale}: the VAE stage "
                           "diverged; train again into a new --out folder with a lower --vae-lr")
    vae.register_to_config(scaling_factor=scale)
    _log(log_path, stage="latents", scaling_factor=round(scale, 5))
    return z * scale


# fields that do not change what a run computes (so a resume may change them)
_RESUMABLE = ("out", "unet_steps", "checkpoint_every", "snapshot_every", "log_every", "threads")


# what the data and the VAE stage depend on (a VAE-stage checkpoint is checked on these only,
# so the U-Net's settings may still be chosen after the VAE has trained)
_VAE_FIELDS = ("model", "n_images", "seed", "pattern_p", "vae_steps", "vae_batch", "vae_crop",
               "vae_lr")


def run_settings(cfg: ModelTrainConfig, stage: str = "unet") -> dict:
    """The settings that define a run (a checkpoint resumes only the same run).

    ``unet_steps`` may grow on resume (the cosine schedule then stretches from there on);
    everything else must match (for a checkpoint of the VAE stage: the data and VAE
    settings).

    Args:
        cfg: the run's settings.
        stage: "unet" (all settings but ``_RESUMABLE``) or "vae" (``_VAE_FIELDS``).

    Returns:
        dict of setting -> value.
    """
    d = {k: v for k, v in asdict(cfg).items() if k not in _RESUMABLE}
    if stage == "vae":
        d = {k: v for k, v in d.items() if k in _VAE_FIELDS}
    return d


def run_fingerprint(cfg: ModelTrainConfig, stage: str = "unet") -> str:
    """The run's fingerprint: ``conceptlab.fileio.fingerprint`` of :func:`run_settings`.

    Args:
        cfg: the run's settings.
        stage: "unet" or "vae" (see :func:`run_settings`).

    Returns:
        sha256 hex digest.
    """
    return fingerprint(run_settings(cfg, stage))


def _saved_settings(ckpt: dict) -> dict | None:
    """The settings a checkpoint was written with (an earlier format stored them as JSON in
    ``run``), or None when it has none."""
    if isinstance(ckpt.get("settings"), dict):
        return ckpt["settings"]
    run = ckpt.get("run")
    if isinstance(run, str) and run.startswith("{"):
        return json.loads(run)
    return None


def start_from_vae(cfg: ModelTrainConfig, source: str) -> None:
    """Seed ``cfg.out`` with the data, the finished VAE and its latents of another run.

    This run then trains only its U-Net stage (a control or a recipe variant of the U-Net,
    on exactly the same VAE).

    Args:
        cfg: this run's settings; its data / VAE settings must equal the source's.
        source: a ``train-model`` run folder whose VAE stage is finished.

    Raises:
        FileNotFoundError: ``source`` holds no checkpoint.
        RuntimeError: the source's VAE is unfinished or has other settings, or ``cfg.out``
            already holds a checkpoint.
    """
    src_ckpt = os.path.join(source, "checkpoint.pt")
    if not os.path.exists(src_ckpt):
        raise FileNotFoundError(f"{source} holds no checkpoint.pt: pass a train-model run folder")
    ckpt = load_tensors(src_ckpt)
    if ckpt.get("stage") == "vae" and ckpt["step"] < cfg.vae_steps:
        raise RuntimeError(f"the VAE of {source} is not trained to {cfg.vae_steps} steps yet")
    old = _saved_settings(ckpt) or {}
    mine = run_settings(cfg, "vae")
    diff = {k: (old.get(k), v) for k, v in mine.items() if old.get(k) != v}
    if diff:
        raise RuntimeError(f"{source} has other data / VAE settings: {diff}")
    dst_ckpt = os.path.join(cfg.out, "checkpoint.pt")
    if os.path.exists(dst_ckpt):
        raise RuntimeError(f"{cfg.out} already holds a checkpoint: resume it without "
                           "--from-vae, or choose a new --out")
    os.makedirs(cfg.out, exist_ok=True)
    for name in ("dataset.pt", "latents.pt"):
        shutil.copy(check_regular_file(os.path.join(source, name), what="run file"),
                    os.path.join(cfg.out, name))
    _atomic_save({"stage": "vae", "step": cfg.vae_steps, "vae": ckpt["vae"], "opt": {},
                  "run": run_fingerprint(cfg, "vae"), "settings": mine}, dst_ckpt)


def _check_same_run(ckpt, cfg, path):
    stage = ckpt.get("stage", "unet")
    old, new = _saved_settings(ckpt), run_settings(cfg, stage)
    if old is None:
        raise RuntimeError(f"{path} has no run fingerprint (an older format): delete it or "
                           "train into a new --out folder")
    if ckpt.get("run") == run_fingerprint(cfg, stage) or ("settings" not in ckpt and old == new):
        return  # the same run (the second case: a checkpoint of the earlier format)
    diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)}
    raise RuntimeError(f"{path} belongs to a different run (settings differ: {diff}); "
                       "train into a new --out folder or delete the old checkpoint")


def _adjust_threads(out):
    """A file ``out/threads`` holding an integer changes the torch thread count of a running
    job (on a shared CPU, 1 thread can be much faster than 2 under contention)."""
    path = os.path.join(out, "threads")
    try:
        check_regular_file(path, max_bytes=64)  # absent, a FIFO, huge: ignored
        with open(path) as f:
            n = int(f.read().strip())
    except (OSError, ValueError):
        return
    if n > 0 and n != torch.get_num_threads():
        torch.set_num_threads(n)
