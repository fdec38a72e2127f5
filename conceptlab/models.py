"""Models: loading a pipeline, what kind of model it is, and its inputs in one convention.

    pipe = load_pipeline()                       # the bundled shapes-world model
    pipe = load_pipeline("path/to/sd15")         # a local diffusers folder  # not run here
    pipe = load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")  # hub  # not run here

Everything else in conceptlab asks this module, and only this module, about the model:

- :func:`model_kind` ("bundled" or "stable-diffusion"), :func:`native_size` (64 or 512),
  :func:`latent_size`, :func:`num_train_timesteps`, :func:`model_folder_config` (the
  pipeline folder's ``conceptlab.json`` defaults);
- :func:`to_uint8` turns any supported image (path, PIL, array, tensor) into one
  (H, W, 3) uint8 array, or says what is wrong;
- :func:`encode_image`: ``z0 = (VAE.encode(x).mean - shift_factor) * scaling_factor``
  (diffusers' convention; ``shift_factor`` is absent, i.e. 0, for SD 1.x/2.x);
- :func:`prompt_ids` (padded tokenisation, the only place it is done) and
  :func:`encode_prompt`;
- the checks: :func:`check_prompt` (concept tokens, characters the tokenizer cannot
  represent, length), :func:`check_seed` (integers in [0, 2**32 - 1]), and
  :func:`resolve_model` (bundled name, folder or hub id; a mistyped path is never sent to
  the hub). Files are opened only after ``fileio.check_regular_file`` (no folder, FIFO or
  device); ``fileio.check_number`` checks any numeric setting.

Why one module of about 600 lines: it is the only place that asks the model anything (kind,
sizes, folder defaults, the image, prompt and seed conventions); split, each question would
need the others' checks. A third of it is docstrings and error messages.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .fileio import check_number, check_regular_file

BUNDLED_MODEL = "shapes-ldm"
CONFIG_FILE = "conceptlab.json"  # per-model defaults in a pipeline folder
REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DATA = Path(__file__).resolve().parent / "_data"  # where `pip install .` puts data/


def data_dir() -> Path:
    """The bundled data folder: ``CONCEPTLAB_DATA`` if set, else the repository's ``data/``
    (a clone or an editable install), else the copy installed with the package
    (``conceptlab/_data``, written by ``pip install .``)."""
    env = os.environ.get("CONCEPTLAB_DATA")
    candidates = [Path(env)] if env else [REPO_ROOT / "data", PACKAGE_DATA]
    for d in candidates:
        if (d / "models").is_dir():
            return d
    raise FileNotFoundError(
        f"conceptlab's data folder is missing (looked in {', '.join(map(str, candidates))}). "
        "Install conceptlab from a clone of the repository (`pip install .` or `-e .`), or "
        "set CONCEPTLAB_DATA to the repository's data/ folder.")


def bundled_models() -> list[str]:
    root = data_dir() / "models"
    return sorted(p.name for p in root.iterdir() if (p / "model_index.json").exists()) \
        if root.is_dir() else []


#: a Hugging Face hub id: "owner/name" (letters, digits, '-', '_', '.')
HUB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def _looks_like_path(name: str) -> bool:
    """True for a string that can only be meant as a local path, never a hub id: it starts
    with ./ ../ / or ~, holds a backslash (Windows) or more than one '/', ends in a
    separator, is "." or "..", or has a '/' but characters no hub id has (a space)."""
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return (name.startswith(("./", "../", "/", "~")) or name in (".", "..")
            or any(sep in name for sep in seps - {"/"}) or name.count("/") > 1
            or name.endswith(tuple(seps)) or ("/" in name and not HUB_ID_RE.fullmatch(name)))


def resolve_model(name_or_path: str) -> str:
    """Where to load a model from: a bundled name, a local folder or a hub id.

    Args:
        name_or_path: a bundled model's name (``"shapes-ldm"``), a local diffusers pipeline
            folder, or a Hugging Face hub id ``"owner/name"``.

    Returns:
        The bundled model's folder, the checked local folder, or the hub id unchanged.

    Raises:
        FileNotFoundError: ``name_or_path`` looks like a local path (starts with ./ ../ / ~,
            holds more than one '/', ends in '/') and nothing is there; it is never sent to
            the hub.
        ValueError: the folder is not a complete pipeline folder, or the name is neither a
            bundled model, a folder nor a hub id.
    """
    name = os.fspath(name_or_path)
    if not name.strip():
        raise ValueError(f"the model name is empty: pass {BUNDLED_MODEL!r} (the bundled "
                         "model), a diffusers pipeline folder or a hub id 'owner/name'")
    if name in bundled_models():
        return str(data_dir() / "models" / name)
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "model_index.json").exists():
            raise ValueError(
                f"{p} is not a diffusers pipeline folder (no model_index.json). Pass "
                f"{BUNDLED_MODEL!r} for the bundled model, or a folder saved with "
                "`pipe.save_pretrained(...)` such as a Stable Diffusion 1.5 / 2.1 download.")
        _check_component_folders(p)
        return str(p)
    if _looks_like_path(name):
        raise FileNotFoundError(
            f"no model folder at {p.absolute()}: check the path (a hub id is 'owner/name'; "
            f"bundled models: {bundled_models()})")
    if HUB_ID_RE.fullmatch(name):
        return name  # a hub id
    raise ValueError(
        f"unknown model {name!r}: pass one of the bundled models "
        f"{bundled_models()}, a local diffusers folder, or a Hugging Face hub id "
        "such as 'stable-diffusion-v1-5/stable-diffusion-v1-5'.")


#: the pipelines conceptlab runs, and the components each must have
PIPELINES = {
    "StableDiffusionPipeline": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "StableDiffusionXLPipeline": ("unet", "vae", "text_encoder", "tokenizer", "scheduler",
                                  "text_encoder_2", "tokenizer_2"),
}
REQUIRED_COMPONENTS = PIPELINES["StableDiffusionPipeline"]
#: the components whose weights are loaded one by one, with the loaders' loading info
WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


#: the largest JSON config read whole (model_index.json, conceptlab.json are < 1 KiB)
MAX_CONFIG_BYTES = 1 << 20


def _json_object(path, fix: str) -> dict:
    """The JSON object in ``path``, or a ValueError saying what is wrong and ``fix``."""
    check_regular_file(path, max_bytes=MAX_CONFIG_BYTES, what="JSON config")
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): {fix}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(obj).__name__}: "  # noqa: TRY004 (a bad file, not a bad argument)
                         f"{fix}")
    return obj


def _pipeline_class_name(index: dict, source) -> str:
    """The pipeline class model_index.json names, if conceptlab runs it (ValueError if not)."""
    name = index.get("_class_name")
    if name not in PIPELINES:
        raise ValueError(
            f"{source} holds a {name!r}; conceptlab runs {' and '.join(PIPELINES)} folders "
            "(Stable Diffusion 1.x / 2.x and SDXL, and the bundled model). Pass the base "
            "text-to-image model's folder or hub id.")
    return name


def _check_component_folders(folder: Path):
    """ValueError when a component that model_index.json names has no folder: diffusers and
    transformers would load some of them silently empty (a tokenizer of 2 tokens)."""
    index = _json_object(folder / "model_index.json",
                         "the model folder is incomplete or corrupt; copy it again")
    required = PIPELINES[_pipeline_class_name(index, folder)]
    named = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)
             and len(v) == 2 and v[0] is not None]
    missing = [k for k in required if k not in named or not (folder / k).is_dir()]
    missing += [k for k in named if k not in missing and not (folder / k).is_dir()]
    if missing:
        raise ValueError(f"the model folder {folder} is incomplete: no {', '.join(missing)} "
                         "folder. Copy the whole folder written by "
                         "`pipe.save_pretrained(folder)`.")
    for k in named:  # diffusers / transformers open these: a FIFO among them would hang
        with os.scandir(folder / k) as entries:
            for e in entries:
                if not e.is_dir():
                    check_regular_file(e.path, what="model file")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def quiet() -> bool:
    """True under CI / when TQDM_DISABLE is set: progress bars stay silent."""
    return bool(os.environ.get("CI") or os.environ.get("TQDM_DISABLE"))


def load_pipeline(name_or_path: str = BUNDLED_MODEL, device: str | None = None,
                  dtype: torch.dtype | None = None, progress: bool | None = None):
    """Load a Stable Diffusion (1.x / 2.x) or SDXL pipeline, with no safety checker.

    The pipeline class is the one ``model_index.json`` names (``StableDiffusionPipeline``
    or ``StableDiffusionXLPipeline``; any other is refused, and no code from the folder
    runs). The U-Net, VAE and text encoder(s) are loaded one by one with their loaders'
    loading info, and a model any of whose weights is missing from its files is refused:
    diffusers and transformers would initialise those weights at random with only a warning.

    ``device`` defaults to CUDA when present; ``dtype`` to float16 on CUDA and float32 on
    the CPU (the bundled weights are stored in fp16 and upcast). Hub ids work where the
    machine has network or a local Hugging Face cache (``HF_HUB_OFFLINE=1`` is honoured).
    """
    device = device or default_device()
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    source = resolve_model(name_or_path)
    show = (not quiet()) if progress is None else progress
    _progress_bars(show)
    try:
        pipe = _load_checked(source)
    except Exception as e:
        if os.path.isdir(source) and not isinstance(e, MissingWeightsError):
            raise ValueError(
                f"the model folder {source} is incomplete or corrupt ({type(e).__name__}: "
                f"{e}). It needs model_index.json and the subfolders unet/, vae/, "
                "text_encoder/, tokenizer/ and scheduler/ as written by "
                "`pipe.save_pretrained(folder)`; copy it again or pass another model.") from None
        if not isinstance(e, OSError):
            raise
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise RuntimeError(
            f"could not load {source!r} from the Hugging Face hub"
            f"{' (HF_HUB_OFFLINE=1 is set)' if offline else ''} and it is not in the local "
            "cache. On a machine with network run `hf download "
            f"{source} --local-dir SOME/FOLDER` and pass that folder, or use the bundled "
            f"model {BUNDLED_MODEL!r}.\n(original error: {e})") from None
    missing = [n for n in PIPELINES[type(pipe).__name__] if getattr(pipe, n, None) is None]
    if missing:  # diffusers loads a folder without a component as None, silently
        raise ValueError(f"the model folder {source} is incomplete: no {', '.join(missing)}. "
                         "Copy the whole folder written by `pipe.save_pretrained(folder)`.")
    pipe = pipe.to(device)
    if any(m.dtype != dtype for m in model_parts(pipe).values()):
        pipe = pipe.to(dtype=dtype)  # fp16 files, or a loader that ignored the dtype
    pipe.set_progress_bar_config(disable=not show)
    return pipe


class MissingWeightsError(ValueError):
    """A model whose files lack some of its weights (the loaders would make them up)."""


def model_parts(pipe) -> dict:
    """The pipeline's weighted modules by name: unet, vae, text_encoder(s)."""
    return {n: m for n in WEIGHTED_COMPONENTS if (m := getattr(pipe, n, None)) is not None}


def _load_checked(source: str):
    """The pipeline in ``source``, its weighted parts loaded with their loading info."""
    import diffusers
    import transformers

    if os.path.isdir(source):
        index = _json_object(Path(source) / "model_index.json", "copy the model folder again")
    else:
        index = diffusers.DiffusionPipeline.load_config(source)
    cls = getattr(diffusers, _pipeline_class_name(index, source))
    libraries = {"diffusers": diffusers, "transformers": transformers}
    parts, problems = {}, []
    for name in WEIGHTED_COMPONENTS:
        library, class_name = (index.get(name) or [None, None])[:2]
        if library is None:
            continue
        part_cls = getattr(libraries.get(library), str(class_name), None)
        if part_cls is None or not hasattr(part_cls, "from_pretrained"):
            raise ValueError(f"{source}: model_index.json names {library}.{class_name} for "
                             f"{name}; conceptlab loads diffusers' and transformers' own "
                             "classes only")
        kw = {"low_cpu_mem_usage": False} if library == "diffusers" else {}
        parts[name], info = part_cls.from_pretrained(source, subfolder=name,
                                                     output_loading_info=True, **kw)
        lost = list(info.get("missing_keys") or []) + list(info.get("mismatched_keys") or [])
        if lost:
            problems.append(f"{name}: {len(lost)} weights not in its files (for example "
                            f"{', '.join(map(str, lost[:3]))})")
    if problems:
        raise MissingWeightsError(
            f"the model in {source} is missing weights, which the loaders would initialise at "
            f"random: {'; '.join(problems)}. The files were written for other library "
            f"versions or are incomplete (here: diffusers {diffusers.__version__}, "
            f"transformers {transformers.__version__}). Install the versions the model was "
            "saved with, or copy the model folder again.")
    extra = {"requires_safety_checker": False} if "safety_checker" in index else {}
    extra |= {k: None for k in ("safety_checker", "feature_extractor") if k in index}
    return cls.from_pretrained(source, **parts, **extra)


def weights_fingerprint(pipe) -> str:
    """A short hash of the U-Net, text encoder and VAE weights (rounded to fp16 first, so a
    pipeline loaded in fp32 or fp16 gives the same value): which model a saved benchmark
    result was measured on."""
    import hashlib

    h = hashlib.sha256()
    for part in ("unet", "text_encoder", "vae", "text_encoder_2"):
        if getattr(pipe, part, None) is None:
            continue  # SD 1.x / 2.x have no second text encoder
        for name, t in sorted(getattr(pipe, part).state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _progress_bars(show: bool):
    """Loading bars of diffusers / transformers follow ``show`` (quiet under CI)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    for mod in (dlog, tlog):
        (mod.enable_progress_bar if show else mod.disable_progress_bar)()


def pipeline_folder(pipe) -> str | None:
    """The local folder the pipeline was loaded from, or None (hub id, built in code)."""
    for path in (getattr(pipe, "name_or_path", None),
                 pipe.config.get("_name_or_path") if hasattr(pipe, "config") else None):
        if path and os.path.isdir(str(path)):
            return str(path)
    return None


def model_folder_config(pipe) -> dict:
    """The pipeline folder's ``conceptlab.json`` (attention defaults), or {}."""
    folder = pipeline_folder(pipe)
    if folder is None or not os.path.lexists(os.path.join(folder, CONFIG_FILE)):
        return {}
    return _json_object(os.path.join(folder, CONFIG_FILE), "fix or delete it")


# ----------------------------------------------------------------------------- model kind
def latent_size(pipe) -> tuple[int, int]:
    """(h, w) of the U-Net's latent (16x16 bundled, 64x64 SD 1.5 at 512 px)."""
    s = pipe.unet.config.sample_size
    if isinstance(s, (list, tuple)):
        return int(s[0]), int(s[1])
    return int(s), int(s)


def native_size(pipe) -> int:
    """Image side length the pipeline's U-Net was trained at (64 bundled, 512 SD 1.5)."""
    return max(latent_size(pipe)) * pipe.vae_scale_factor


def model_kind(pipe) -> str:
    """'bundled' for the small conceptlab models (latent side <= 32), else 'stable-diffusion'.
    Presets (training, sampling) are chosen by this."""
    return "bundled" if max(latent_size(pipe)) <= 32 else "stable-diffusion"


def num_train_timesteps(pipe) -> int:
    return int(pipe.scheduler.config.get("num_train_timesteps", 1000))



# ----------------------------------------------------------------------------- images
MIN_IMAGE_SIDE = 8


def _single_frame(img, name: str):
    """ValueError for an animated GIF / multi-page TIFF (which frame is meant is not
    guessed). An MPO (a camera JPEG with extra pictures) is its primary picture, frame 0."""
    n = getattr(img, "n_frames", 1)
    if n > 1 and img.format != "MPO":
        raise ValueError(
            f"{name} has {n} frames (an animated or multi-page image): pick one frame k in "
            f"0..{n - 1} with im = Image.open(path); im.seek(k); and pass im.copy()")


def _pil_to_array(img) -> np.ndarray:
    """Any PIL mode -> (H, W, 3) uint8, warning where information is dropped."""
    if img.mode.startswith("I;16"):  # I;16, I;16B, I;16L (unsigned), I;16S (signed)
        a = np.asarray(img)
        return _gray(_array_to_uint8(a.astype(a.dtype.newbyteorder("=")),
                                     f"a 16-bit image (PIL mode {img.mode})"))
    if img.mode in ("I", "F"):
        bits = "32-bit integer" if img.mode == "I" else "32-bit float"
        return _gray(_array_to_uint8(np.asarray(img), f"a {bits} image (PIL mode {img.mode})"))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"))
        if (rgba[..., 3] < 255).any():
            warnings.warn("the image has transparent pixels: its alpha channel is dropped "
                          "(the colour under it is kept); composite it onto a background "
                          "first if that is not what you want", stacklevel=4)
        return np.ascontiguousarray(rgba[..., :3])
    return np.asarray(img.convert("RGB"))


def _gray(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[..., None], 3, -1)


def _array_to_uint8(arr: np.ndarray, what: str | None = None) -> np.ndarray:
    """The documented conversions of :func:`to_uint8` (``what`` names the image in errors)."""
    what = what or f"a {arr.dtype} image"
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        raise ValueError("a boolean array is a mask, not an image: pass the image as uint8 "
                         "(0-255) or float in [0, 1]")
    if arr.size == 0:
        raise ValueError(f"the image is empty (shape {arr.shape})")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ValueError("the image contains NaN or infinite values")
        if arr.min() < 0 or arr.max() > 1:
            raise ValueError(
                f"{what} must lie in [0, 1] (got values in [{arr.min():.3g}, "
                f"{arr.max():.3g}]): convert it with (img * 255).round().astype(np.uint8) if "
                "it is 0-255, (img + 1) / 2 if it is in [-1, 1], or img / img.max()")
        return (arr * 255).round().astype(np.uint8)  # documented: [0, 1] -> 0-255
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"unsupported image dtype {arr.dtype}: pass uint8 (0-255) or float "
                         "in [0, 1]")
    lo, hi = int(arr.min()), int(arr.max())
    if arr.dtype == np.uint16:  # 16-bit: 0-65535 by convention, whatever the values
        low = (" (all its values are <= 255: if they are 8-bit values, convert it to uint8 "
               "first)") if hi <= 255 else ""
        warnings.warn(f"{what} is read as 16-bit (0-65535; its values span {lo}-{hi}) and "
                      f"scaled to 8 bits (x / 257){low}", stacklevel=4)
        return np.round(arr / 257.0).astype(np.uint8)
    if lo >= 0 and hi <= 255:
        return arr.astype(np.uint8)  # 8-bit values in a wider integer type
    fix = f"a / {hi}" if lo == 0 else f"(a - {lo}) / {hi - lo}"
    raise ValueError(
        f"{what} has values in [{lo}, {hi}]: only 8-bit (0-255) and 16-bit (uint16, 0-65535) "
        "integer images have a known white level, so this one is not guessed; scale it to "
        f"uint8 yourself, e.g. np.round({fix} * 255).astype(np.uint8)")


def _read_image_file(path: str) -> np.ndarray:
    check_regular_file(path, what="image")  # a folder, a FIFO, a device: refused at once
    try:
        with Image.open(path) as im:
            _single_frame(im, "the file")
            im.load()
            return _pil_to_array(ImageOps.exif_transpose(im))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read the image {path}: {e}") from None


def _tensor_or_array(image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3) and t.shape[-1] not in (1, 3):
            t = t.permute(1, 2, 0)  # (3, H, W) -> (H, W, 3)
        arr = t.numpy()
    else:
        arr = image
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        hint = (" It looks channel-first: use image.transpose(1, 2, 0)."
                if arr.ndim == 3 and arr.shape[0] in (1, 3) else "")
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got shape "
                         f"{tuple(arr.shape)}.{hint}")
    if arr.shape[-1] == 4:
        warnings.warn("the array has 4 channels: the 4th (alpha) is dropped", stacklevel=3)
        arr = arr[..., :3]
    arr = _array_to_uint8(np.asarray(arr))
    return np.repeat(arr, 3, -1) if arr.shape[-1] == 1 else arr


def _fit(arr: np.ndarray, size, resize: bool) -> np.ndarray:
    h, w = arr.shape[:2]
    H, W = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if (h, w) == (H, W):
        return arr
    if not resize:
        raise ValueError(
            f"image is {w}x{h} but the model works at {W}x{H}: resize it first "
            f"(PIL: img.resize(({W}, {H}))) or pass resize=True")
    note = "" if abs(w / h - W / H) < 0.01 else \
        f" (the aspect ratio changes from {w / h:.2f} to {W / H:.2f}: crop first to avoid distortion)"
    warnings.warn(f"resizing the image from {w}x{h} to {W}x{H}{note}", stacklevel=3)
    return np.asarray(Image.fromarray(np.ascontiguousarray(arr)).resize((W, H), Image.BICUBIC))


def to_uint8(image, size: int | tuple | None = None, resize: bool = False, *,
             min_side: int = MIN_IMAGE_SIDE) -> np.ndarray:
    """Any supported image -> (H, W, 3) uint8 numpy array (C-contiguous, writeable).

    Images are read as a viewer shows them: the EXIF orientation of a file or PIL image is
    applied. Conversions, each documented and (where something is lost) warned:

    - grayscale -> RGB; alpha channels dropped (warned when some pixel is transparent);
    - float (arrays, PIL mode F): must lie in [0, 1], then x * 255;
    - 16-bit integers (uint16 arrays, PIL modes I;16*): the convention is that 65535 is
      white, so x / 257, always (warned, with the image's own range: a 16-bit image that
      holds 8-bit values comes out dark, and the warning says so);
    - other integer types (int32 arrays, 32-bit PIL mode I, int64, ...): values within 0-255
      are 8-bit values, kept; any other range (0-1000, 0-65535, negatives) has no known
      white level, so it is refused with its range named (scale it to uint8 yourself).

    Args:
        image: a path (any format PIL reads; not a folder, FIFO or device), a PIL image of
            any mode, an (H, W, 3), (H, W, 1) or (H, W) array or tensor, or a (3, H, W)
            tensor. One picture: an animated GIF or multi-page TIFF is refused (pick a frame
            with ``im.seek(k)`` and pass ``im.copy()``).
        size: an int or (H, W): the image must have that size.
        resize: resize (bicubic, warned, also when the aspect ratio changes) to ``size``
            instead of refusing another size.
        min_side: the smallest side accepted, in pixels.

    Returns:
        (H, W, 3) uint8 array.

    Raises:
        FileNotFoundError: no file at the path. IsADirectoryError: the path is a folder.
        ValueError: not a regular file, unreadable, several frames, boolean arrays (masks),
            other shapes, NaN, values out of the ranges above, images smaller than
            ``min_side``, another size without ``resize``.
        TypeError: not an image type.
    """
    if isinstance(image, (str, os.PathLike)):
        arr = _read_image_file(os.fspath(image))
    elif isinstance(image, Image.Image):
        _single_frame(image, "the PIL image")
        arr = _pil_to_array(ImageOps.exif_transpose(image))
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        arr = _tensor_or_array(image)
    else:
        raise TypeError(f"an image must be a path, a PIL image, a numpy array or a torch "
                        f"tensor, got {type(image).__name__}")
    h, w = arr.shape[:2]
    if min(h, w) < min_side:
        raise ValueError(f"the image is {w}x{h} pixels: at least {min_side} px a side")
    if size is not None:
        arr = _fit(arr, size, resize)
    return np.require(arr, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"])


def to_model_input(image, size, resize: bool = False) -> torch.Tensor:
    """(1, 3, H, W) float in [-1, 1] (the VAE's input range) of :func:`to_uint8`."""
    arr = to_uint8(image, size, resize)
    return torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 127.5 - 1.0


# ----------------------------------------------------------------------------- encoding
@torch.no_grad()
def encode_pixels(vae, x: torch.Tensor) -> torch.Tensor:
    """Latents of pixels x (B, 3, H, W) in [-1, 1]: ``(posterior mean - shift) * scale``."""
    z = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor


def encode_image(pipe, image, resize: bool = False) -> torch.Tensor:
    """VAE latent (1, C, h, w) of one image at the model's native size (see the module doc)."""
    return encode_pixels(pipe.vae, to_model_input(image, native_size(pipe), resize))


#: a concept-token-looking word of a prompt: ``[v1]``, ``[dog1]`` (brackets, no spaces)
CONCEPT_TOKEN_RE = re.compile(r"\[[^\[\]\s]+\]")
#: a bracketed group with whitespace inside (``[ v1 ]``): never a concept token
SPACED_BRACKETS_RE = re.compile(r"\[[^\[\]]*\s[^\[\]]*\]")


def _check_brackets(tok, prompt: str):
    spaced = SPACED_BRACKETS_RE.findall(prompt)
    if spaced:
        inner = "".join(spaced[0][1:-1].split())
        fix = f"write [{inner}]" if f"[{inner}]" in tok.get_added_vocab() else \
            "write concept tokens without spaces ([v1]), or drop the brackets"
        raise ValueError(f"{spaced[0]!r} in {prompt!r} has spaces inside its brackets, so it "
                         f"is not read as a concept token: {fix}")
    added = set(tok.get_added_vocab())
    unknown = [w for w in CONCEPT_TOKEN_RE.findall(prompt) if w not in added]
    if unknown:
        known = sorted(t for t in added if CONCEPT_TOKEN_RE.fullmatch(t))
        raise ValueError(f"unknown concept token(s) {unknown} in {prompt!r}; known concept "
                         f"tokens: {known or 'none'}. Learn them first, or load saved ones "
                         "(load_concepts, or pass the concepts to generate)")


def unrepresentable_characters(tokenizer, text: str) -> list[str]:
    """The characters of ``text`` that ``tokenizer`` turns into its unknown token (emoji,
    accents or symbols outside a small vocabulary such as the bundled model's), in order of
    first appearance; [] when every character is represented (always, for Stable
    Diffusion's byte-level CLIP tokenizer)."""
    unk = tokenizer.unk_token_id
    if unk is None or unk not in tokenizer(text, add_special_tokens=False).input_ids:
        return []
    return list(dict.fromkeys(
        c for c in text if not c.isspace()
        and unk in tokenizer(c, add_special_tokens=False).input_ids))


def check_prompt(pipe, prompt: str) -> str:
    """Check a prompt before it reaches the text encoder (every prompt in conceptlab does).

    - a ``[...]`` word (``[v1]``) must be a token added to this pipeline's tokenizer: the
      tokenizer would otherwise split an unlearned ``[v9]`` into '[', 'v', '9', ']' and the
      result would mean nothing; a bracketed group with spaces (``[ v1 ]``) is never one;
    - every character must be one the tokenizer represents: an emoji or accent outside
      the vocabulary would silently become the unknown (end-of-text) token;
    - a prompt longer than the tokenizer allows warns and says how much is cut.

    Args:
        pipe: the pipeline whose tokenizer reads the prompt.
        prompt: the prompt.

    Returns:
        ``prompt``, unchanged.

    Raises:
        TypeError: ``prompt`` is not a str.
        ValueError: an unknown or spaced concept token, or characters the tokenizer cannot
            represent (named).
    """
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt must be a string, got {type(prompt).__name__}")
    tok = pipe.tokenizer
    _check_brackets(tok, prompt)
    bad = unrepresentable_characters(tok, prompt)
    if bad:
        raise ValueError(f"the prompt {prompt!r} has characters this model's tokenizer cannot "
                         f"represent: {' '.join(bad)} ({', '.join(map(ascii, bad))}); they "
                         "would become its unknown token: remove or replace them")
    n = len(tok(prompt).input_ids)
    if n > tok.model_max_length:
        kept = tok.decode(tok(prompt, truncation=True, max_length=tok.model_max_length,
                              add_special_tokens=False).input_ids[: tok.model_max_length - 2])
        warnings.warn(f"prompt has {n} tokens but the text encoder takes "
                      f"{tok.model_max_length}: it is truncated to {kept!r}", stacklevel=2)
    return prompt


#: the seeds accepted: torch's CPU generator (mt19937) keeps only the low 32 bits of a seed
MAX_SEED = 2**32 - 1


def check_seed(seed) -> int:
    """A random seed, checked: an integer in [0, 2**32 - 1].

    Why this range: every sample in conceptlab draws its noise from
    ``torch.Generator("cpu").manual_seed(seed)``, whose Mersenne Twister keeps only the low
    32 bits of the seed, so seed 2**32 silently gives the pictures of seed 0 (and
    ``manual_seed`` itself accepts negative seeds as 2**64 + seed, and overflows at 2**64).
    numpy's ``RandomState`` takes the same range.

    Args:
        seed: a Python or numpy integer (not a bool or a float).

    Returns:
        ``seed`` as a Python int.

    Raises:
        ValueError: ``seed`` is not an integer in [0, 2**32 - 1] (the message gives the range).
    """
    try:
        return check_number("seed", seed, 0, MAX_SEED, integer=True)
    except ValueError as e:
        raise ValueError(f"{e} (2**32 - 1: torch's CPU generator keeps only 32 bits of a "
                         "seed, so a larger one would repeat a smaller one's pictures)") from None


def prompt_ids(tokenizer, prompts) -> torch.Tensor:
    """(B, T) input ids padded (and truncated) to ``tokenizer.model_max_length``."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def text_encoders(pipe) -> list[tuple]:
    """``[(tokenizer, text_encoder), ...]``: one pair for Stable Diffusion 1.x / 2.x and the
    bundled model, two for SDXL (CLIP ViT-L, then OpenCLIP ViT-bigG)."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def is_sdxl(pipe) -> bool:
    """True for an SDXL pipeline: two text encoders and a U-Net with ``text_time`` added
    conditions."""
    return getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"


@dataclass
class Conditioning:
    """What the U-Net is conditioned on: ``unet(z, t, **cond.unet_kwargs(b))``.

    Attributes:
        hidden: (B, T, D) text-encoder hidden states (SDXL: both encoders' penultimate
            layers, concatenated along D, as diffusers' SDXL pipeline does).
        added: SDXL's added conditions ``{"text_embeds": (B, D2), "time_ids": (B, 6)}``;
            None for Stable Diffusion 1.x / 2.x.
    """

    hidden: torch.Tensor
    added: dict | None = None

    def unet_kwargs(self, batch: int | None = None, dtype=None) -> dict:
        """Keyword arguments of the U-Net call, the batch repeated to ``batch`` rows
        (from one prompt) and cast to ``dtype``."""
        def fit(x):
            x = x if batch is None or x.shape[0] == batch else x.expand(batch, *x.shape[1:])
            return x if dtype is None else x.to(dtype)

        kw = {"encoder_hidden_states": fit(self.hidden)}
        if self.added is not None:
            kw["added_cond_kwargs"] = {k: fit(v) for k, v in self.added.items()}
        return kw


def conditioning(pipe, prompts, ids: torch.Tensor | None = None) -> Conditioning:
    """The U-Net's conditioning for prompts, in the graph (wrap in ``torch.no_grad()``
    when no gradient is wanted). ``ids`` are the first tokenizer's padded ids of the prompts
    when already known (:func:`prompt_ids`); the prompts must then be checked already.

    Stable Diffusion 1.x / 2.x (and the bundled model): the text encoder's last hidden state.
    SDXL: the penultimate hidden states of both encoders, concatenated, the second
    encoder's pooled projection as ``text_embeds``, and ``time_ids`` = (image size, crop
    (0, 0), image size) at the model's native size, as diffusers' SDXL pipeline makes them.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if ids is None:
        for p in prompts:
            check_prompt(pipe, p)
    pairs = text_encoders(pipe)
    if len(pairs) == 1:
        tok, te = pairs[0]
        ids = prompt_ids(tok, prompts) if ids is None else ids
        return Conditioning(te(ids.to(te.device))[0])
    hidden, pooled = [], None
    for j, (tok, te) in enumerate(pairs):
        ids_j = ids if (j == 0 and ids is not None) else prompt_ids(tok, prompts)
        out = te(ids_j.to(te.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder's pooled projection (CLIPTextModelWithProjection)
    side = native_size(pipe)
    time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=hidden[0].dtype,
                            device=hidden[0].device).expand(len(prompts), -1)
    return Conditioning(torch.cat(hidden, dim=-1),
                        {"text_embeds": pooled, "time_ids": time_ids})


@torch.no_grad()
def encode_prompt(pipe, prompts) -> torch.Tensor:
    """Text-encoder hidden states (B, T, D) for a prompt or a list of prompts (for SDXL, both
    encoders' concatenated; :func:`conditioning` gives the added conditions too)."""
    return conditioning(pipe, prompts).hidden