"""Learned concepts in the field's own file formats, which stock diffusers loads.

A concepts folder (:func:`save_concepts`)::

    my_concepts/
      concepts.json                      the sidecar: base model, tokens, init words, files
      v1.safetensors  v2.safetensors     one diffusers textual-inversion file per concept:
                                         a single key, the token ("[v1]"), a (1, D) tensor
      pytorch_lora_weights.safetensors   phase 2 as LoRA (diffusers' LoRA file), or
      unet/                              phase 2 as a full fine-tune (a diffusers U-Net folder)

Stock diffusers, with no conceptlab installed::

    pipe = StableDiffusionPipeline.from_pretrained(base)
    pipe.load_textual_inversion("my_concepts/v1.safetensors")      # the token "[v1]"
    pipe.load_lora_weights("my_concepts", weight_name="pytorch_lora_weights.safetensors")  # LoRA
    # full fine-tune: from_pretrained(base, unet=UNet2DConditionModel.from_pretrained(
    #                 "my_concepts", subfolder="unet"))

:func:`load_concepts` reads such a folder, a single diffusers textual-inversion file, or an
A1111 embedding saved as safetensors. Nothing is ever unpickled, and no code runs from a
folder. The sidecar's ``files`` lists every file with its sha256, written last: a folder
whose files do not belong together is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import torch

from ._version import __version__
from .fileio import atomic_save, atomic_write_json, check_regular_file, replace_folder
from .tokens import ConceptTokens
from .unet_delta import UNetChange

SIDECAR = "concepts.json"
FORMAT = "conceptlab-concepts-2"
LORA_FILE = "pytorch_lora_weights.safetensors"
UNET_FOLDER = "unet"
LEGACY_FILE = "concepts.safetensors"  # the single-file format of conceptlab 0.1
MAX_VALUE = 1e4          # no embedding row or weight of a working model comes near it
MAX_SIDECAR_BYTES = 16 << 20


class ConceptsFileError(ValueError):
    """A concepts folder or file that is missing pieces, truncated, or not concepts."""


def token_file_name(name: str) -> str:
    """The file of a token: ``[v1]`` -> ``v1.safetensors`` (brackets and other characters
    that shells or file systems treat specially are dropped)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "", name).strip(".") or "concept"
    return f"{stem}.safetensors"


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _save_tensors(tensors: dict, path, metadata=None):
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_save(lambda tmp: save_file(tensors, tmp, metadata=metadata), path)


def _save_unet(change: UNetChange, folder: str) -> list[str]:
    if change.mode == "lora":
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft import LoraConfig

        tmp = os.path.join(folder, f".{LORA_FILE}.tmp")
        os.makedirs(tmp, exist_ok=True)
        # the metadata is peft's whole config, as diffusers' training scripts write it
        # (older diffusers need every field of it, rank_pattern included)
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=convert_state_dict_to_diffusers(change.weights),
            unet_lora_adapter_metadata=LoraConfig(**change.lora_config).to_dict())
        os.replace(os.path.join(tmp, LORA_FILE), os.path.join(folder, LORA_FILE))
        os.rmdir(tmp)
        return [LORA_FILE]
    from diffusers import UNet2DConditionModel

    cfg = {k: v for k, v in (change.unet_config or {}).items() if not k.startswith("_")}
    unet = UNet2DConditionModel.from_config(cfg)
    unet.load_state_dict(change.weights, strict=True)
    unet.save_pretrained(os.path.join(folder, UNET_FOLDER))
    return [f"{UNET_FOLDER}/{f}" for f in sorted(os.listdir(os.path.join(folder, UNET_FOLDER)))]


#: the keys of diffusers' SDXL textual-inversion files, one per text encoder
SDXL_KEYS = ("clip_l", "clip_g")


def _token_file_tensors(concepts: ConceptTokens, k: int) -> dict:
    """The tensors of concept k's file: ``{token: (1, D)}`` (diffusers' textual-inversion
    file), or for SDXL ``{"clip_l": (1, 768), "clip_g": (1, 1280)}``, which stock diffusers
    loads with one ``load_textual_inversion`` call per text encoder."""
    row = concepts.embeddings[k:k + 1].float()
    if not concepts.widths:
        return {concepts.names[k]: row}
    if len(concepts.widths) != len(SDXL_KEYS):
        raise ValueError(f"rows for {len(concepts.widths)} text encoders: conceptlab writes "
                         "files for one (SD 1.x / 2.x) or two (SDXL)")
    return dict(zip(SDXL_KEYS, torch.split(row, list(concepts.widths), dim=1)))


def write_concepts(concepts: ConceptTokens, folder, extra: dict | None = None,
                   extra_files=()) -> str:
    """Write the files of ``concepts`` into a new, empty ``folder`` (no checks; see
    :func:`save_concepts`); ``extra_files`` already written there join the manifest."""
    folder = str(folder)
    tokens, files = [], []
    for k, name in enumerate(concepts.names):
        fname = token_file_name(name)
        if fname in files:
            fname = f"concept{k + 1}_{fname}"
        _save_tensors(_token_file_tensors(concepts, k), os.path.join(folder, fname))
        files.append(fname)
        tokens.append({"token": name, "file": fname, "init_word": concepts.init_words[k]})
    phase2 = None
    if concepts.unet is not None:
        files += _save_unet(concepts.unet, folder)
        phase2 = {"mode": concepts.unet.mode,
                  "path": LORA_FILE if concepts.unet.mode == "lora" else UNET_FOLDER,
                  "lora_config": concepts.unet.lora_config}
    files += list(extra_files)
    side = {"format": FORMAT, "conceptlab_version": __version__,
            "base_model": concepts.base_model, "base_model_fingerprint": concepts.base_fingerprint,
            "hidden_size": concepts.hidden_size, "encoder_widths": concepts.widths,
            "tokens": tokens, "phase2": phase2, **(extra or {}),
            "files": {f: _sha256(os.path.join(folder, f)) for f in files}}
    atomic_write_json(os.path.join(folder, SIDECAR), side, indent=1)  # last: the manifest
    return folder


def refuse_bundled_data(path, what: str = "the output") -> str:
    """ValueError when ``path`` is inside conceptlab's bundled data (writing there would
    replace the model's or the examples' files); the absolute path otherwise."""
    from .models import data_dir

    p = os.path.abspath(os.fspath(path))
    try:
        data = os.path.abspath(data_dir())
    except FileNotFoundError:
        return p
    if p == data or p.startswith(data + os.sep):
        raise ValueError(f"{what} {path} is inside conceptlab's bundled data: write elsewhere "
                         "(e.g. outputs/)")
    return p


def check_output_folder(folder) -> str:
    """A folder a result may be written to: new, empty, or a concepts folder (replaced).
    Never a model folder, the bundled data, or a folder of other files."""
    folder = refuse_bundled_data(folder, "the folder")
    if os.path.isfile(folder):
        raise NotADirectoryError(f"{folder} is a file, not a folder: choose a folder")
    if os.path.isdir(folder):
        names = set(os.listdir(folder)) - {"checkpoint"}
        if "model_index.json" in names:
            raise ValueError(f"{folder} is a model folder: write the concepts elsewhere")
        if names and SIDECAR not in names and LEGACY_FILE not in names:
            raise ValueError(f"{folder} holds other files and no learned concepts: choose a "
                             "new or empty folder")
    return folder


def _old_result_names(folder: str) -> set:
    """Top-level names of the result now in ``folder`` (its manifest and sidecar)."""
    try:
        with open(os.path.join(folder, SIDECAR)) as f:
            files = json.load(f).get("files", {})
    except (OSError, ValueError, AttributeError):
        files = {}
    return {SIDECAR} | {str(name).split("/")[0] for name in files}


def save_concepts(concepts: ConceptTokens, folder, extra: dict | None = None,
                  write_more=None) -> str:
    """Write ``concepts`` into ``folder`` in the standard formats (see the module doc).

    The new folder is written whole beside the old one and then switched in
    (:func:`conceptlab.fileio.replace_folder`): a reader finds the old result or the new
    one, never a mix. Other entries of an old result folder (a ``checkpoint/``, notes)
    are kept.

    Args:
        concepts: the concepts.
        folder: the output folder: new, empty, or holding earlier concepts (replaced).
        extra: more JSON for the sidecar (what ``LearnedConcepts`` records).
        write_more: ``write_more(tmp) -> [file names]`` writes more files of the result
            into the new folder, for the manifest.

    Returns:
        The folder.

    Raises:
        ValueError: ``folder`` is a model folder, inside the bundled data, or holds
            other files.
    """
    folder = check_output_folder(folder)
    old = _old_result_names(folder)

    def write(tmp):
        more = write_more(tmp) if write_more is not None else []
        write_concepts(concepts, tmp, extra, more)

    replace_folder(folder, write, carry=lambda name: name not in old)
    return folder


# ----------------------------------------------------------------------------- reading
def read_sidecar(folder) -> dict:
    """The checked ``concepts.json`` of a folder whose files all match its manifest."""
    folder = str(folder)
    path = os.path.join(folder, SIDECAR)
    if os.path.lexists(path):
        check_regular_file(path, max_bytes=MAX_SIDECAR_BYTES, what="concepts sidecar")
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(folder, LEGACY_FILE)):
            raise ConceptsFileError(
                f"{folder} was written by conceptlab 0.1 (one {LEGACY_FILE}): convert it with "
                f"`conceptlab upgrade {folder}`")
        raise FileNotFoundError(f"{folder} holds no learned concepts (no {SIDECAR}): write "
                                "them with `conceptlab learn --out FOLDER` or save_concepts()")
    try:
        with open(path) as f:
            side = json.load(f)
        tokens, files = side["tokens"], side["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConceptsFileError(f"{path} is truncated or corrupt ({e}): learn the concepts "
                                "again") from None
    if side.get("format") != FORMAT:
        raise ConceptsFileError(f"{path} is not a conceptlab concepts sidecar (format "
                                f"{side.get('format')!r}, expected {FORMAT!r})")
    if not isinstance(tokens, list) or not tokens or not isinstance(files, dict):
        raise ConceptsFileError(f"{path}: 'tokens' must be a non-empty list")
    for name, digest in files.items():
        p = os.path.join(folder, name)
        if os.path.isabs(name) or ".." in name.split("/") or not os.path.isfile(p):
            raise ConceptsFileError(f"{folder} is incomplete: {name} is missing (a save was "
                                    "interrupted, or a file was deleted): learn again")
        if _sha256(p) != digest:
            raise ConceptsFileError(f"{folder}: {name} does not belong with this folder's "
                                    f"{SIDECAR} (its contents changed): learn again")
    return side


def _read_tensors(path) -> tuple[dict, dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as e:
        raise ConceptsFileError(f"{path} is truncated or corrupt ({e})") from None
    return tensors, meta


def read_embedding_file(path, token: str | None = None) -> tuple[str, torch.Tensor]:
    """(token, (D,) row) of a diffusers textual-inversion file (one key: the token), an
    A1111 embedding in safetensors (key ``emb_params``), or an SDXL embedding (keys
    ``clip_l`` and ``clip_g``: the row is the two joined, :func:`read_embedding_widths`
    gives the split); the token of the last two from ``token`` or the file name. Only
    one-vector embeddings: a concept is one token here."""
    name, parts = read_embedding_parts(path, token)
    return name, torch.cat(parts)


def read_embedding_widths(path) -> list[int] | None:
    """The per-text-encoder widths of an embedding file: [768, 1280] for SDXL, else None."""
    _, parts = read_embedding_parts(path)
    return [int(p.shape[0]) for p in parts] if len(parts) > 1 else None


def read_embedding_parts(path, token: str | None = None) -> tuple[str, list[torch.Tensor]]:
    """(token, [(D_j,) row per text encoder]) of an embedding file (see
    :func:`read_embedding_file`); each part checked."""
    tensors, _ = _read_tensors(path)
    stem = f"<{os.path.splitext(os.path.basename(str(path)))[0]}>"
    if set(SDXL_KEYS) == set(tensors):
        return token or stem, [_checked_row(path, tensors[k]) for k in SDXL_KEYS]
    if "emb_params" in tensors:
        name, vec = token or stem, tensors["emb_params"]
    elif len(tensors) == 1:
        name, vec = next(iter(tensors.items()))
        name = token or name
    else:
        raise ConceptsFileError(f"{path} holds {len(tensors)} tensors {sorted(tensors)[:4]}: a "
                                "textual-inversion file holds one, keyed by its token (or "
                                "clip_l and clip_g for SDXL)")
    return name, [_checked_row(path, vec)]


def _widths(parts) -> list[int] | None:
    return [int(p.shape[0]) for p in parts] if len(parts) > 1 else None


def _checked_row(path, vec: torch.Tensor) -> torch.Tensor:
    """A (D,) float row from a (D,) or (1, D) tensor: finite, of sane size, one vector."""
    vec = vec.float()
    if vec.numel() and float(vec.abs().max()) > MAX_VALUE:
        raise ConceptsFileError(f"{path}: values up to {float(vec.abs().max()):.3g}, far beyond "
                                f"any embedding row (|x| <= {MAX_VALUE:g}): not a concept")
    if vec.ndim == 2 and vec.shape[0] == 1:
        vec = vec[0]
    if vec.ndim != 1:
        raise ConceptsFileError(f"{path}: an embedding of shape {tuple(vec.shape)}; conceptlab "
                                "concepts are one vector each (multi-vector embeddings are not "
                                "supported)")
    if not torch.isfinite(vec).all():
        raise ConceptsFileError(f"{path}: the embedding contains NaN or infinite values")
    return vec


def _read_unet(folder, phase2) -> UNetChange | None:
    if not phase2:
        return None
    if phase2.get("mode") == "lora":
        from diffusers.utils import convert_unet_state_dict_to_peft

        tensors, _ = _read_tensors(os.path.join(folder, LORA_FILE))
        sd = {k.removeprefix("unet."): v for k, v in tensors.items()}
        return UNetChange("lora", convert_unet_state_dict_to_peft(sd), phase2.get("lora_config"))
    if phase2.get("mode") == "full":
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, UNET_FOLDER))
        return UNetChange("full", {k: v.detach().float() for k, v in unet.named_parameters()},
                          unet_config=dict(unet.config))
    raise ConceptsFileError(f"{folder}: unknown phase-2 mode {phase2.get('mode')!r}")


def load_concepts(path, *, prefix: str | None = None,
                  allow_other_model: bool = False) -> ConceptTokens:
    """Concepts from a conceptlab folder, a diffusers textual-inversion file or an A1111
    safetensors embedding. No pipeline is touched: use them with ``generate`` or
    ``concepts.applied(pipe)``.

    Args:
        path: a folder written by :func:`save_concepts`, or a ``.safetensors`` file.
        prefix: rename the tokens ``[{prefix}1]``, ``[{prefix}2]``, ... (to use two sets
            whose tokens share names together).
        allow_other_model: use the concepts with any model of the same text hidden size
            (with a warning), e.g. the same weights saved again in another precision. By
            default a conceptlab folder is used only with the model whose weights it was
            learned on.

    Raises:
        FileNotFoundError: nothing is there.
        ConceptsFileError: the folder or file is incomplete, corrupt or not concepts.
    """
    path = str(path)
    if os.path.isfile(path):
        name, parts = read_embedding_parts(path)
        c = ConceptTokens([name], [None], torch.cat(parts)[None], widths=_widths(parts))
    elif os.path.isdir(path):
        side = read_sidecar(path)
        rows, names, widths = [], [], set()
        for t in side["tokens"]:
            name, parts = read_embedding_parts(os.path.join(path, t["file"]), t.get("token"))
            names.append(name)
            rows.append(torch.cat(parts))
            widths.add(tuple(_widths(parts) or ()))
        if len({r.shape[0] for r in rows}) != 1 or len(widths) != 1:
            raise ConceptsFileError(f"{path}: its embeddings have different sizes")
        c = ConceptTokens(names, [t.get("init_word") for t in side["tokens"]], torch.stack(rows),
                          base_model=str(side.get("base_model", "")),
                          unet=_read_unet(path, side.get("phase2")),
                          base_fingerprint=str(side.get("base_model_fingerprint") or ""),
                          widths=list(widths.pop()) or None)
        if not c.base_fingerprint and not allow_other_model:
            raise ConceptsFileError(f"{path}/{SIDECAR} names no base model: pass "
                                    "allow_other_model=True (CLI: --allow-other-model) to use "
                                    "these concepts with a model of your choice")
    else:
        raise FileNotFoundError(f"no concepts at {path}: pass a folder written by "
                                "`conceptlab learn --out FOLDER` or a .safetensors embedding")
    if prefix:
        c.names = [f"[{prefix}{k + 1}]" for k in range(len(c))]
    if allow_other_model and (c.base_fingerprint or c.base_model):
        import warnings

        warnings.warn(f"{path}: the model check is off (allow_other_model=True): these "
                      f"concepts were learned on {c.base_model or 'an unnamed model'!r}",
                      stacklevel=2)
        c.base_fingerprint, c.base_model = "", ""
    return c


__all__ = [
    "FORMAT",
    "LORA_FILE",
    "SIDECAR",
    "UNET_FOLDER",
    "ConceptsFileError",
    "check_output_folder",
    "load_concepts",
    "read_embedding_file",
    "read_embedding_parts",
    "read_embedding_widths",
    "read_sidecar",
    "refuse_bundled_data",
    "save_concepts",
    "token_file_name",
    "write_concepts",
]
