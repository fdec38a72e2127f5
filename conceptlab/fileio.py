"""Safe files: atomic writes, and loads that never run code from a file.

Every file conceptlab writes goes to a temporary name in the same folder and is then
renamed over the target (``os.replace`` is atomic), so an interrupted save leaves the old
file or the new one, never half of one. Every ``torch.load`` goes through
:func:`load_tensors` (``weights_only=True``: tensors, numbers, strings, lists and dicts
only; a pickled object in a planted file raises instead of running).
"""

from __future__ import annotations

import json
import os
import secrets


def _tmp_path(path: str) -> str:
    """A new, empty temporary file beside ``path``, with the mode ``open()`` would give it
    (0666 & ~umask: the kernel applies the umask; mkstemp would make it owner-only)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    for _ in range(100):
        tmp = os.path.join(d, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def atomic_write_text(path, text: str) -> str:
    path = os.fspath(path)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_json(path, obj, **kw) -> str:
    return atomic_write_text(path, json.dumps(obj, **kw))


def atomic_save(save_fn, path) -> str:
    """``save_fn(tmp_path)`` writes the file; it is then renamed to ``path``."""
    path = os.fspath(path)
    tmp = _tmp_path(path)
    try:
        save_fn(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def torch_save(obj, path) -> str:
    import torch

    return atomic_save(lambda tmp: torch.save(obj, tmp), path)


def fingerprint(meta: dict, blobs=()) -> str:
    """sha256 hex digest of a JSON-able description and raw byte strings: the one way a run
    (learning, a training checkpoint, model training) records what it was started on.

    Args:
        meta: settings, names and ids; serialised with sorted keys, so order does not matter.
        blobs: byte strings (image pixels, packed masks) hashed after ``meta``, in order.
    """
    import hashlib

    h = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode())
    for b in blobs:
        h.update(b)
    return h.hexdigest()


def load_tensors(path, map_location="cpu"):
    """``torch.load(path, weights_only=True)`` with one clear error for a bad file."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} holds more than tensors and plain data, so it is not loaded "
                         f"(nothing in it was run): {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path} is truncated or corrupt ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}): delete it") from None


__all__ = ["atomic_save", "atomic_write_json", "atomic_write_text", "fingerprint",
           "load_tensors", "torch_save"]
