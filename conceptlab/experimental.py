"""Measures kept for study, not used by the method's defaults.

EM's *guard*: keep an E-step's new masks only if the concepts' own prompts explain the
image's pixels under them no worse than under the previous masks. Measured in the paper's
shared-word setting, it left EM's final mask IoU unchanged on average (some scenes won,
others lost: this loss does not track the masks' quality; ``benchmarks/results/PRESETS.md``),
so the method does not use it. The two functions below compute the quantity it compared.
"""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def concept_errors(pipe, image, tokens: list[str], *, n_timesteps: int = 8,
                   seed: int = 0) -> torch.Tensor:
    """(K, h, w): for each token k, the squared error of "a photo of [vk]"'s prediction
    of the diffusion target of ``n_timesteps`` noised copies of the image (the same t and
    noise for every token), per latent pixel, averaged over channels and copies."""
    from diffusers import DDPMScheduler

    from .models import encode_image, encode_prompt
    from .train.trainer import diffusion_target

    z0 = encode_image(pipe, image).float()
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(seed)
    n_train = sched.config.num_train_timesteps
    t = torch.linspace(0, n_train - 1, n_timesteps + 2)[1:-1].round().long()
    noise = torch.randn((n_timesteps, *z0.shape[1:]), generator=g)
    z0n = z0.expand(n_timesteps, -1, -1, -1).to(noise)
    zt = sched.add_noise(z0n, noise, t)
    target = diffusion_target(sched, z0n, noise, t)
    unet = pipe.unet
    emb = encode_prompt(pipe, [f"a photo of {tok}" for tok in tokens])       # (K, T, D)
    errs = []
    for k in range(len(tokens)):
        e = emb[k:k + 1].expand(n_timesteps, -1, -1).to(unet.dtype)
        pred = unet(zt.to(unet.device, unet.dtype), t.to(unet.device), e).sample.float().cpu()
        errs.append(((pred - target) ** 2).mean((0, 1)))                   # (h, w)
    return torch.stack(errs)


def assignment_error(pipe, image, tokens: list[str], masks, *, n_timesteps: int = 8,
                     seed: int = 0, errors: torch.Tensor | None = None) -> float:
    """How well each concept's own prompt explains the pixels its mask gives it.

    With ``err_k(p)`` from :func:`concept_errors` (pass ``errors`` to score several mask
    sets of one image without recomputing them), returns
    ``sum_k sum_p M_k(p) err_k(p) / sum_p sum_k M_k(p)`` with the masks area-downsampled to
    the latent grid: the masked diffusion loss of the M-step, read as a function of the
    masks. Lower is better; the guard (the module doc) keeps an E-step's masks only
    if this does not rise (hard EM: the M-step lowers it for fixed masks, so the loop is
    then monotone in it)."""
    err = errors if errors is not None else concept_errors(
        pipe, image, tokens, n_timesteps=n_timesteps, seed=seed)
    m = torch.as_tensor(np.asarray(masks, np.float32))[None]
    w = torch.nn.functional.adaptive_avg_pool2d(m, err.shape[-2:])[0]       # (K, h, w)
    return float((w * err).sum() / w.sum().clamp_min(1e-8))


__all__ = ["assignment_error", "concept_errors"]
