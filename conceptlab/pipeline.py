"""Loading text-to-image pipelines: the bundled model, a local folder, or a hub id.

    >>> pipe = load_pipeline()                       # the bundled shapes-world model
    >>> pipe = load_pipeline("path/to/sd15")         # a local diffusers folder
    >>> pipe = load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")  # hub / cache
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

BUNDLED_MODEL = "shapes-ldm"
REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The repository's ``data/`` folder (override with ``CONCEPTLAB_DATA``)."""
    d = Path(os.environ.get("CONCEPTLAB_DATA", REPO_ROOT / "data"))
    if not d.is_dir():
        raise FileNotFoundError(
            f"conceptlab's data folder is missing ({d}). Install conceptlab from a clone of "
            "the repository (`pip install -e .`), or set CONCEPTLAB_DATA to its data/ folder.")
    return d


def bundled_models() -> list[str]:
    root = data_dir() / "models"
    return sorted(p.name for p in root.iterdir() if (p / "model_index.json").exists()) \
        if root.is_dir() else []


def resolve_model(name_or_path: str) -> str:
    """Bundled name -> folder; folder -> checked folder; anything else returned unchanged."""
    if name_or_path in bundled_models():
        return str(data_dir() / "models" / name_or_path)
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "model_index.json").exists():
            raise ValueError(
                f"{p} is not a diffusers pipeline folder (no model_index.json). Pass "
                f"{BUNDLED_MODEL!r} for the bundled model, or a folder saved with "
                "`pipe.save_pretrained(...)` such as a Stable Diffusion 1.5 / 2.1 download.")
        return str(p)
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/")):
        return name_or_path  # a hub id
    raise ValueError(
        f"unknown model {name_or_path!r}: pass one of the bundled models "
        f"{bundled_models()}, a local diffusers folder, or a Hugging Face hub id "
        "such as 'stable-diffusion-v1-5/stable-diffusion-v1-5'.")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def quiet() -> bool:
    """True under CI / when TQDM_DISABLE is set: progress bars stay silent."""
    return bool(os.environ.get("CI") or os.environ.get("TQDM_DISABLE"))


def load_pipeline(name_or_path: str = BUNDLED_MODEL, device: str | None = None,
                  dtype: torch.dtype | None = None, progress: bool | None = None):
    """Load a ``StableDiffusionPipeline`` (no safety checker).

    ``device`` defaults to CUDA when present; ``dtype`` to float16 on CUDA and float32 on
    the CPU (the bundled weights are stored in fp16 and upcast). Hub ids work where the
    machine has network or a local Hugging Face cache (``HF_HUB_OFFLINE=1`` is honoured).
    """
    from diffusers import StableDiffusionPipeline

    device = device or default_device()
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    source = resolve_model(name_or_path)
    show = (not quiet()) if progress is None else progress
    _progress_bars(show)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, low_cpu_mem_usage=False)
    except OSError as e:
        if os.path.isdir(source):
            raise
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise RuntimeError(
            f"could not load {source!r} from the Hugging Face hub"
            f"{' (HF_HUB_OFFLINE=1 is set)' if offline else ''} and it is not in the local "
            "cache. On a machine with network run `huggingface-cli download "
            f"{source} --local-dir SOME/FOLDER` and pass that folder, or use the bundled "
            f"model {BUNDLED_MODEL!r}.\n(original error: {e})") from None
    pipe = pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=not show)
    return pipe


def _progress_bars(show: bool):
    """Loading bars of diffusers / transformers follow ``show`` (quiet under CI)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    for mod in (dlog, tlog):
        (mod.enable_progress_bar if show else mod.disable_progress_bar)()


def model_card_config(pipe) -> dict:
    """The ``conceptlab.json`` of a pipeline folder (attention defaults), or {}."""
    path = Path(getattr(pipe, "name_or_path", "") or "") / "conceptlab.json"
    if path.is_file():
        return json.loads(path.read_text())
    return {}


# ----------------------------------------------------------------------------- inputs
def native_size(pipe) -> int:
    """Image side length the pipeline's U-Net was trained at (64 bundled, 512 SD 1.5)."""
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def to_uint8_image(image, size: int | None = None, resize: bool = False) -> np.ndarray:
    """PIL image, path, HxWx3 uint8 array or tensor -> HxWx3 uint8 numpy array.

    With ``size`` the image must be ``size`` x ``size``; a different size is an error
    unless ``resize=True`` (then it is resized with a warning).
    """
    if isinstance(image, (str, os.PathLike)):
        try:
            image = Image.open(image).convert("RGB")
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read image {image}: {e}") from None
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"))
    elif isinstance(image, torch.Tensor):
        arr = image.detach().cpu().numpy()
    else:
        arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if arr.dtype.kind == "f" and arr.max() <= 1.0:
            raise ValueError("float images must be converted to uint8 (0-255) first: "
                             "(img * 255).round().astype(np.uint8)")
        arr = arr.clip(0, 255).astype(np.uint8)
    if size is not None and arr.shape[:2] != (size, size):
        if not resize:
            raise ValueError(
                f"image is {arr.shape[1]}x{arr.shape[0]} but the model works at {size}x{size}:"
                f" resize it first (PIL: img.resize(({size}, {size}))) or pass resize=True")
        warnings.warn(f"resizing image from {arr.shape[1]}x{arr.shape[0]} to {size}x{size}",
                      stacklevel=2)
        arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.BICUBIC))
    return np.require(arr, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"])


def check_prompt(pipe, prompt: str) -> str:
    """Warn (and say how much is cut) when a prompt is longer than the tokenizer allows."""
    tok = pipe.tokenizer
    n = len(tok(prompt).input_ids)
    if n > tok.model_max_length:
        kept = tok.decode(tok(prompt, truncation=True, max_length=tok.model_max_length,
                              add_special_tokens=False).input_ids[: tok.model_max_length - 2])
        warnings.warn(f"prompt has {n} tokens but the text encoder takes "
                      f"{tok.model_max_length}: it is truncated to {kept!r}", stacklevel=2)
    return prompt


@torch.no_grad()
def encode_image(pipe, image) -> torch.Tensor:
    """VAE latent (1, C, h, w) of an image (posterior mean, times the scaling factor)."""
    arr = to_uint8_image(image, native_size(pipe))
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 127.5 - 1
    x = x.to(pipe.device, pipe.vae.dtype)
    return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor


@torch.no_grad()
def encode_prompt(pipe, prompts) -> torch.Tensor:
    """Text-encoder hidden states (B, T, D) for a prompt or a list of prompts."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    for p in prompts:
        check_prompt(pipe, p)
    ids = pipe.tokenizer(prompts, padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids.to(pipe.device)
    return pipe.text_encoder(ids)[0]


def sample_grid(pipe, prompts, *, n_per_prompt: int = 4, seed: int = 0,
                guidance_scale: float = 4.0, num_inference_steps: int = 25):
    """Generate ``n_per_prompt`` images per prompt; returns (rows of uint8 arrays, prompts).

    Image j of a prompt uses ``torch.Generator().manual_seed(seed + j)``: deterministic
    and independent of how many images are requested.
    """
    rows = []
    for p in prompts:
        check_prompt(pipe, p)
        gens = [torch.Generator("cpu").manual_seed(seed + j) for j in range(n_per_prompt)]
        out = pipe([p] * n_per_prompt, generator=gens, guidance_scale=guidance_scale,
                   num_inference_steps=num_inference_steps, output_type="np")
        rows.append((out.images * 255).round().astype(np.uint8))
    return rows, list(prompts)
