"""Re-save a pipeline folder's text encoder so that every transformers version reads it and
the stock diffusers quick start loads one dtype.

    python tools/resave_text_encoder.py                      # the bundled data/models/shapes-ldm
    python tools/resave_text_encoder.py path/to/pipeline     # another diffusers folder
    python tools/resave_text_encoder.py --check              # only say whether it is needed

What it writes in ``<folder>/text_encoder/``:

- ``model.safetensors`` with every key under ``text_model.`` (``text_model.embeddings.*``,
  ``text_model.encoder.layers.*``, ``text_model.final_layer_norm.*``). transformers 4's
  ``CLIPTextModel`` holds its weights in a ``text_model`` submodule and matches checkpoint
  keys by that name: without the prefix it initialises every weight at random and only
  warns. transformers 5 (which saves without the prefix) removes the prefix when it reads,
  so both read the same file.
- every tensor in float32. transformers 5 loads a model in the dtype it was saved in (its
  default is ``dtype="auto"``) while diffusers loads the U-Net and VAE in float32 when no
  dtype is given, so an fp16 text encoder makes ``StableDiffusionPipeline.from_pretrained
  (folder)`` a mixed-dtype pipeline whose first call fails on the CPU. fp16 -> fp32 is
  exact: the values, and so the model's outputs and ``weights_fingerprint``, do not change.
- ``config.json``'s ``dtype`` (and ``torch_dtype``, where present) set to ``"float32"``.

The U-Net and VAE stay as they are (fp16 on disk: diffusers upcasts them to float32 when no
dtype is given). The script is idempotent: a folder already in this form is left byte for
byte as it was. It reads and writes with ``safetensors`` alone, so the transformers version
installed does not change what it writes, and it checks the written file against the old
one (same tensors, exactly) before replacing it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

PREFIX = "text_model."
WEIGHTS = "model.safetensors"
TARGET_DTYPE = torch.float32
# Exact upcasts only: every value of these dtypes is a float32 value.
EXACT_TO_FP32 = (torch.float16, torch.bfloat16, torch.float32)


def bundled_folder() -> Path:
    return Path(__file__).resolve().parent.parent / "data" / "models" / "shapes-ldm"


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118


def converted(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with every key under ``text_model.`` and every tensor in float32."""
    out = {}
    for key, t in tensors.items():
        if t.is_floating_point() and t.dtype not in EXACT_TO_FP32:
            raise ValueError(f"{key}: {t.dtype} does not convert exactly to float32")
        new_key = key if key.startswith(PREFIX) else PREFIX + key
        if new_key in out:
            raise ValueError(f"{key}: two tensors would be saved as {new_key}")
        out[new_key] = t.to(TARGET_DTYPE) if t.is_floating_point() else t
    return out


def needs_resave(folder: Path) -> list[str]:
    """What is wrong with ``folder/text_encoder`` (empty when nothing)."""
    te = Path(folder) / "text_encoder"
    tensors, _ = _read(te / WEIGHTS)
    config = json.loads((te / "config.json").read_text())
    problems = []
    unprefixed = [k for k in tensors if not k.startswith(PREFIX)]
    if unprefixed:
        problems.append(f"{len(unprefixed)} of {len(tensors)} keys lack the {PREFIX!r} prefix")
    dtypes = sorted({str(t.dtype) for t in tensors.values() if t.is_floating_point()})
    if dtypes != [str(TARGET_DTYPE)]:
        problems.append(f"tensors stored as {', '.join(dtypes)}")
    for field in ("dtype", "torch_dtype"):
        if field in config and config[field] != "float32":
            problems.append(f"config.json {field} is {config[field]!r}")
    return problems


def resave_text_encoder(folder: str | os.PathLike) -> list[str]:
    """Rewrite ``folder/text_encoder`` in place (see the module docstring); returns what
    was fixed, empty when the folder was already right (then nothing is written)."""
    te = Path(folder) / "text_encoder"
    problems = needs_resave(Path(folder))
    if not problems:
        return []
    tensors, metadata = _read(te / WEIGHTS)
    new = converted(tensors)
    metadata.setdefault("format", "pt")
    tmp = te / (WEIGHTS + ".tmp")
    save_file(new, str(tmp), metadata=metadata)
    # Check before replacing: the same tensors, in the same values, under the new names.
    written, _ = _read(tmp)
    if set(written) != {k if k.startswith(PREFIX) else PREFIX + k for k in tensors}:
        tmp.unlink()
        raise RuntimeError("the written file does not hold the expected keys")
    for key, t in tensors.items():
        w = written[key if key.startswith(PREFIX) else PREFIX + key]
        if w.shape != t.shape or not torch.equal(w.to(torch.float64), t.to(torch.float64)):
            tmp.unlink()
            raise RuntimeError(f"{key}: values changed in the conversion")
    os.chmod(tmp, (te / WEIGHTS).stat().st_mode & 0o777)  # save_file may write it 0600
    os.replace(tmp, te / WEIGHTS)

    config_path = te / "config.json"
    config = json.loads(config_path.read_text())
    for field in ("dtype", "torch_dtype"):
        if field in config:
            config[field] = "float32"
    if "dtype" not in config and "torch_dtype" not in config:
        config["torch_dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", default=str(bundled_folder()),
                    help="a diffusers pipeline folder (default: the bundled shapes-ldm)")
    ap.add_argument("--check", action="store_true",
                    help="only report; exit 1 when the folder needs re-saving")
    args = ap.parse_args(argv)
    if args.check:
        problems = needs_resave(Path(args.folder))
        print("; ".join(problems) if problems else "text encoder already in the portable form")
        return 1 if problems else 0
    fixed = resave_text_encoder(args.folder)
    print(f"re-saved {Path(args.folder) / 'text_encoder'}: fixed {'; '.join(fixed)}" if fixed
          else "text encoder already in the portable form; nothing written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
