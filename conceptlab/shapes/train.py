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

Usage: ``conceptlab train-model --out runs/bundled`` (see ``conceptlab train-model -h``).

Why one module of about 510 lines: it is the bundled model's whole recipe (data, VAE,
U-Net with EMA and the grounding loss, exact resume), kept in one file so that it reads top
to bottom like the model card's recipe.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..attention import record_attention
from ..fileio import atomic_write_json, load_tensors, torch_save
from . import world
from .model import BUNDLED, BUNDLED_V1, TINY, build_components, make_pipeline


@dataclass
class TrainConfig:
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

    @property
    def model_config(self):
        models = {"bundled": BUNDLED, "bundled-v1": BUNDLED_V1, "tiny": TINY}
        if self.model not in models:
            raise ValueError(f"unknown model size {self.model!r}: choose one of {sorted(models)}")
        return models[self.model]


def _log(path, **rec):
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _atomic_save(obj, path):
    torch_save(obj, path)


# ----------------------------------------------------------------------------- data
def build_dataset(cfg: TrainConfig, tokenizer, size: int) -> dict:
    """Render the training scenes; masks are kept at the latent and half-latent sizes."""
    kw = {} if not cfg.pattern_p else dict(patterns=world.PATTERNS, pattern_p=cfg.pattern_p,
                                           with_pattern=True)
    data = world.make_dataset(cfg.n_images, seed=cfg.seed, size=size, **kw)
    n = cfg.n_images
    lat = size // 4
    soft = {}
    for res in (lat, lat // 2):
        m = np.zeros((n, 4, res, res), np.float16)
        for i, mk in enumerate(data["masks"]):
            k = mk.shape[0]
            t = torch.from_numpy(mk.astype(np.float32))[None]
            m[i, :k] = F.adaptive_avg_pool2d(t, res)[0].numpy()
        soft[res] = torch.from_numpy(m)
    ids = tokenizer(data["captions"], padding="max_length", truncation=True,
                    max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    # which region each token is grounded in: -1 none, 0 background, i object i
    region = torch.full(ids.shape, -1, dtype=torch.long)
    is_shape = torch.zeros(ids.shape, dtype=torch.bool)
    vocab = tokenizer.get_vocab()
    tid = {w: vocab[w + "</w>"] for w in world.vocabulary() if w + "</w>" in vocab}
    for i, spec in enumerate(data["specs"]):
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
    return {"images": torch.from_numpy(data["images"]), "soft": soft, "ids": ids, "region": region,
            "is_shape": is_shape, "captions": data["captions"]}


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


# ----------------------------------------------------------------------------- VAE
def vae_loss(vae, x, kl_weight=1e-6):
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.sample()).sample
    d = rec - x
    grad = lambda a: (a[..., 1:, :] - a[..., :-1, :], a[..., :, 1:] - a[..., :, :-1])
    gy, gx = grad(rec)
    ty, tx = grad(x)
    loss = (d.pow(2).mean() + 0.5 * d.abs().mean() + (gy - ty).abs().mean()
            + (gx - tx).abs().mean() + kl_weight * post.kl().mean())
    return loss, rec


def train_vae(vae, images, cfg: TrainConfig, log_path, start_step=0, opt_state=None,
              ckpt_path=None):
    g = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    if opt_state:
        opt.load_state_dict(opt_state)
    g.manual_seed(cfg.seed + 1 + start_step)
    vae.train().to(memory_format=torch.channels_last)
    t0 = time.time()
    for step in range(start_step, cfg.vae_steps):
        lr = cfg.vae_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps))
        for pg in opt.param_groups:
            pg["lr"] = lr
        idx = torch.randint(len(images), (cfg.vae_batch,), generator=g)
        x = images_to_tensor(images[idx.numpy()])
        if torch.rand((), generator=g) < 0.5:
            x = x.flip(-1)
        c = min(cfg.vae_crop, x.shape[-1])
        oy, ox = (int(v) for v in torch.randint(0, x.shape[-1] - c + 1, (2,), generator=g))
        x = x[..., oy:oy + c, ox:ox + c].contiguous(memory_format=torch.channels_last)
        loss, _ = vae_loss(vae, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.vae_steps - 1:
            _log(log_path, stage="vae", step=step, loss=round(loss.item(), 5),
                 time=round(time.time() - t0, 1))
        if ckpt_path and (step + 1) % cfg.checkpoint_every == 0:
            _atomic_save({"stage": "vae", "step": step + 1, "vae": vae.state_dict(),
                          "opt": opt.state_dict(), "run": run_fingerprint(cfg, "vae")}, ckpt_path)
    vae.eval().to(memory_format=torch.contiguous_format)
    return vae


def finetune_decoder(vae, images, cfg: TrainConfig, log_path=None, steps=None, lr=5e-4):
    """Train the VAE decoder alone on full-size images with the encoder frozen.

    The latents (what the U-Net learns) do not change, so this can run before, during or
    after U-Net training with the same result: only reconstructions get sharper.
    """
    steps = cfg.decoder_steps if steps is None else steps
    g = torch.Generator().manual_seed(cfg.seed + 3)
    vae.requires_grad_(False)
    dec = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in dec:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(dec, lr=lr, weight_decay=0.0)
    vae.train()
    t0 = time.time()
    for step in range(steps):
        for pg in opt.param_groups:
            pg["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(len(images), (cfg.decoder_batch,), generator=g)
        x = images_to_tensor(images[idx.numpy()])
        if torch.rand((), generator=g) < 0.5:
            x = x.flip(-1)
        with torch.no_grad():
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        d = rec - x
        gy, gx = rec[..., 1:, :] - rec[..., :-1, :], rec[..., :, 1:] - rec[..., :, :-1]
        ty, tx = x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]
        loss = (d.pow(2).mean() + 0.5 * d.abs().mean() + (gy - ty).abs().mean()
                + (gx - tx).abs().mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec, 1.0)
        opt.step()
        if log_path and (step % cfg.log_every == 0 or step == steps - 1):
            _log(log_path, stage="decoder", step=step, loss=round(loss.item(), 5),
                 time=round(time.time() - t0, 1))
    vae.eval().requires_grad_(False)
    return vae


@torch.no_grad()
def encode_latents(vae, images, batch=256):
    out = []
    for i in range(0, len(images), batch):
        x = images_to_tensor(images[i:i + batch])
        out.append(torch.cat([vae.encode(x).latent_dist.mean,
                              vae.encode(x.flip(-1)).latent_dist.mean], 1))
    z = torch.cat(out)  # (n, 2C, h, w): original and flipped
    return z


# ----------------------------------------------------------------------------- U-Net
def grounding_loss(store, soft, region, is_shape, weight_rows):
    """Attention-grounding loss on recorded maps (see module docstring).

    soft: {res: (B, 4, res, res)} region masks; region, is_shape: (B, T); weight_rows: (B,)
    bool, which samples get the loss (t < tmax and a non-empty caption).
    """
    total, n_layers = 0.0, 0
    sel = (region >= 0) & weight_rows[:, None]
    if sel.sum() == 0:
        return torch.zeros(())
    for calls in store.maps.values():
        a = calls[-1].mean(1)  # (B, h, w, T)
        B, h, w, T = a.shape
        a = a.reshape(B, h * w, T).transpose(1, 2)  # (B, T, N)
        m = soft[h].reshape(B, 4, h * w).float()
        tgt = torch.gather(m, 1, region.clamp(min=0)[..., None].expand(B, T, h * w))
        mass = (a * tgt).sum(-1) / (a.sum(-1) + 1e-6)
        l_tok = ((1 - mass).pow(2) * sel).sum() / sel.sum()
        shp = sel & is_shape
        bce = F.binary_cross_entropy(a.clamp(1e-5, 1 - 1e-5), tgt, reduction="none").mean(-1)
        l_pix = (bce * shp).sum() / shp.sum().clamp(min=1)
        total = total + l_tok + l_pix
        n_layers += 1
    return total / n_layers


class EMA:
    def __init__(self, modules, decay):
        self.decay = decay
        self.shadow = {f"{i}.{k}": v.detach().clone() for i, m in enumerate(modules)
                       for k, v in m.state_dict().items()}

    @torch.no_grad()
    def update(self, modules, step):
        d = min(self.decay, (1 + step) / (10 + step))
        for i, m in enumerate(modules):
            for k, v in m.state_dict().items():
                s = self.shadow[f"{i}.{k}"]
                if v.dtype.is_floating_point:
                    s.mul_(d).add_(v.detach(), alpha=1 - d)
                else:
                    s.copy_(v)

    def copy_to(self, modules):
        for i, m in enumerate(modules):
            m.load_state_dict({k: self.shadow[f"{i}.{k}"] for k in m.state_dict()})


def save_pipeline(components, ema, out_dir, fp16=True):
    """Save EMA weights as a StableDiffusionPipeline folder (fp16 safetensors)."""
    import copy
    comps = dict(components)
    unet = copy.deepcopy(components["unet"])
    te = copy.deepcopy(components["text_encoder"])
    ema.copy_to([unet, te])
    comps["unet"], comps["text_encoder"] = unet, te
    comps["vae"] = copy.deepcopy(components["vae"])
    pipe = make_pipeline(comps)
    if fp16:
        pipe.to(torch.float16)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def train_model(cfg: TrainConfig, progress: bool = True) -> str:
    """Train (or resume) the model; returns the folder of the saved pipeline."""
    from tqdm.auto import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    os.makedirs(cfg.out, exist_ok=True)
    atomic_write_json(os.path.join(cfg.out, "train_config.json"), asdict(cfg), indent=1)
    log_path = os.path.join(cfg.out, "train_log.jsonl")
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    mcfg = cfg.model_config
    comps = build_components(mcfg, seed=cfg.seed)
    vae, unet, te, tok, sched = (comps[k] for k in
                                 ("vae", "unet", "text_encoder", "tokenizer", "scheduler"))
    ckpt = load_tensors(ckpt_path) if os.path.exists(ckpt_path) else None
    if ckpt is not None:
        _check_same_run(ckpt, cfg, ckpt_path)

    t0 = time.time()
    cache = os.path.join(cfg.out, "dataset.pt")
    if os.path.exists(cache):
        data = load_tensors(cache)  # tensors, lists and str only: no pickle
    else:
        data = build_dataset(cfg, tok, mcfg.image_size)
        _atomic_save(data, cache)
    data["images"] = np.asarray(data["images"])
    _log(log_path, stage="data", n=cfg.n_images, time=round(time.time() - t0, 1))

    # ---- stage 1: VAE
    vae_start, vae_opt = 0, None
    if ckpt is not None:
        vae.load_state_dict(ckpt["vae"])
        if ckpt["stage"] == "vae":
            vae_start, vae_opt = ckpt["step"], ckpt["opt"]
        else:
            vae_start = cfg.vae_steps
    if vae_start < cfg.vae_steps:
        train_vae(vae, data["images"], cfg, log_path, vae_start, vae_opt, ckpt_path)
    vae.eval().requires_grad_(False)

    # ---- latents and their scale
    lat_cache = os.path.join(cfg.out, "latents.pt")
    vae_done = ckpt is not None and (ckpt["stage"] == "unet" or ckpt["step"] >= cfg.vae_steps)
    if os.path.exists(lat_cache) and vae_done:  # written once the VAE stage had finished
        z = load_tensors(lat_cache)
    else:
        z = encode_latents(vae, data["images"])
        _atomic_save(z, lat_cache)
    C = mcfg.latent_channels
    scale = float(1.0 / z[:, :C].std())
    vae.register_to_config(scaling_factor=scale)
    z = z * scale
    _log(log_path, stage="latents", scaling_factor=round(scale, 5))

    # ---- stage 2: U-Net + text encoder
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    ema = EMA([unet, te], cfg.ema_decay)
    start = 0
    if ckpt is not None and ckpt["stage"] == "unet":
        unet.load_state_dict(ckpt["unet"])
        te.load_state_dict(ckpt["text_encoder"])
        opt.load_state_dict(ckpt["opt"])
        ema.shadow = ckpt["ema"]
        start = ckpt["step"]
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    uncond = tok("", padding="max_length", max_length=tok.model_max_length,
                 return_tensors="pt").input_ids[0]
    g = torch.Generator().manual_seed(cfg.seed + 2 + start)
    unet.train()
    te.train()
    bar = tqdm(range(start, cfg.unet_steps), initial=start, total=cfg.unet_steps,
               disable=not progress, desc="unet")
    t0 = time.time()
    for step in bar:
        lr = cfg.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / cfg.unet_steps))
        for pg in opt.param_groups:
            pg["lr"] = lr
        idx = torch.randint(len(z), (cfg.batch,), generator=g)
        flip = torch.rand(cfg.batch, generator=g) < 0.5
        z0 = torch.where(flip[:, None, None, None], z[idx, C:], z[idx, :C])
        soft = {r: torch.where(flip[:, None, None, None], m[idx].flip(-1), m[idx])
                for r, m in data["soft"].items()}
        ids = data["ids"][idx].clone()
        drop = torch.rand(cfg.batch, generator=g) < cfg.p_uncond
        ids[drop] = uncond
        t = torch.randint(0, 1000, (cfg.batch,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        zt = sched.add_noise(z0, noise, t)
        use_ground = cfg.grounding_weight > 0 and step % cfg.grounding_every == 0
        with record_attention(unet, keep_graph=True) if use_ground else _null() as store:
            emb = te(ids)[0]
            pred = unet(zt, t, emb).sample
        w = torch.clamp(snr[t], max=cfg.min_snr_gamma) / snr[t]
        l_diff = ((pred - noise).pow(2).mean((1, 2, 3)) * w).mean()
        loss = l_diff
        l_g = torch.zeros(())
        if use_ground:
            rows = (t < cfg.grounding_tmax) & ~drop
            l_g = grounding_loss(store, soft, data["region"][idx], data["is_shape"][idx], rows)
            loss = loss + cfg.grounding_weight * l_g
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update([unet, te], step)
        if step % cfg.log_every == 0 or step == cfg.unet_steps - 1:
            _adjust_threads(cfg.out)
            _log(log_path, stage="unet", step=step, loss=round(l_diff.item(), 5),
                 grounding=round(float(l_g.detach()), 5), lr=lr, time=round(time.time() - t0, 1))
            bar.set_postfix(loss=f"{l_diff.item():.4f}", ground=f"{float(l_g.detach()):.3f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step == cfg.unet_steps - 1:
            _atomic_save({"stage": "unet", "step": step + 1, "vae": vae.state_dict(),
                          "unet": unet.state_dict(), "text_encoder": te.state_dict(),
                          "opt": opt.state_dict(), "ema": ema.shadow,
                          "run": run_fingerprint(cfg)}, ckpt_path)
        if cfg.snapshot_every and (step + 1) % cfg.snapshot_every == 0:
            save_pipeline(comps, ema, os.path.join(cfg.out, f"snapshot-{step + 1:05d}"))
    unet.eval()
    te.eval()
    # ---- stage 3: the decoder alone (encoder frozen: the U-Net's latents are unchanged)
    dec_path = os.path.join(cfg.out, "decoder.pt")
    if os.path.exists(dec_path):
        vae.load_state_dict(load_tensors(dec_path))
    elif cfg.decoder_steps:
        finetune_decoder(vae, data["images"], cfg, log_path)
        _atomic_save(vae.state_dict(), dec_path)
    return save_pipeline(comps, ema, os.path.join(cfg.out, "model"))


# fields that do not change what a run computes (so a resume may change them)
_RESUMABLE = ("out", "unet_steps", "checkpoint_every", "snapshot_every", "log_every", "threads")


# what the data and the VAE stage depend on (a VAE-stage checkpoint is checked on these only,
# so the U-Net's settings may still be chosen after the VAE has trained)
_VAE_FIELDS = ("model", "n_images", "seed", "pattern_p", "vae_steps", "vae_batch", "vae_crop",
               "vae_lr")


def run_fingerprint(cfg: TrainConfig, stage: str = "unet") -> str:
    """The settings that define a run, as JSON: a checkpoint resumes only the same run.

    ``unet_steps`` may grow on resume (the cosine schedule then stretches from there on);
    everything else must match (for a checkpoint of the VAE stage: the data and VAE
    settings).
    """
    d = {k: v for k, v in asdict(cfg).items() if k not in _RESUMABLE}
    if stage == "vae":
        d = {k: v for k, v in d.items() if k in _VAE_FIELDS}
    return json.dumps(d, sort_keys=True)


def start_from_vae(cfg: TrainConfig, source: str) -> None:
    """Seed ``cfg.out`` with the data, the finished VAE and its latents of the run in
    ``source``, so that this run trains only its U-Net stage (a control or a recipe variant
    of the U-Net, on exactly the same VAE). Refuses when the data / VAE settings differ or
    ``cfg.out`` already holds a checkpoint."""
    src_ckpt = os.path.join(source, "checkpoint.pt")
    if not os.path.exists(src_ckpt):
        raise FileNotFoundError(f"{source} holds no checkpoint.pt: pass a train-model run folder")
    ckpt = load_tensors(src_ckpt)
    if ckpt.get("stage") == "vae" and ckpt["step"] < cfg.vae_steps:
        raise RuntimeError(f"the VAE of {source} is not trained to {cfg.vae_steps} steps yet")
    old = json.loads(ckpt.get("run") or "{}")
    mine = json.loads(run_fingerprint(cfg, "vae"))
    diff = {k: (old.get(k), v) for k, v in mine.items() if old.get(k) != v}
    if diff:
        raise RuntimeError(f"{source} has other data / VAE settings: {diff}")
    os.makedirs(cfg.out, exist_ok=True)
    dst_ckpt = os.path.join(cfg.out, "checkpoint.pt")
    if os.path.exists(dst_ckpt):
        raise RuntimeError(f"{cfg.out} already holds a checkpoint: resume it without "
                           "--from-vae, or choose a new --out")
    for name in ("dataset.pt", "latents.pt"):
        shutil.copy(os.path.join(source, name), os.path.join(cfg.out, name))
    _atomic_save({"stage": "vae", "step": cfg.vae_steps, "vae": ckpt["vae"], "opt": {},
                  "run": run_fingerprint(cfg, "vae")}, dst_ckpt)


def _check_same_run(ckpt, cfg, path):
    old = ckpt.get("run")
    if old is None:
        raise RuntimeError(f"{path} has no run fingerprint (an older format): delete it or "
                           "train into a new --out folder")
    new = run_fingerprint(cfg, ckpt.get("stage", "unet"))
    if old != new:
        a, b = json.loads(old), json.loads(new)
        diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
        raise RuntimeError(f"{path} belongs to a different run (settings differ: {diff}); "
                           "train into a new --out folder or delete the old checkpoint")


def _adjust_threads(out):
    """A file ``out/threads`` holding an integer changes the torch thread count of a running
    job (on a shared CPU, 1 thread can be much faster than 2 under contention)."""
    path = os.path.join(out, "threads")
    if os.path.exists(path):
        try:
            with open(path) as f:
                n = int(f.read().strip())
        except ValueError:
            return
        if n > 0 and n != torch.get_num_threads():
            torch.set_num_threads(n)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False
