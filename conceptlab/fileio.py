"""Safe files and checked inputs: atomic writes, loads that never run code from a file,
and the checks every reader of a user's file or number calls first.

Every file conceptlab writes goes to a temporary name in the same folder and is then
renamed over the target (``os.replace`` is atomic), so an interrupted save leaves the old
file or the new one, never half of one. Every ``torch.load`` goes through
:func:`load_tensors` (``weights_only=True``: tensors, numbers, strings, lists and dicts
only; a pickled object in a planted file raises instead of running).

:func:`check_regular_file` refuses, before anything opens it, a path that is missing, a
folder, a FIFO, a device or a socket (opening a FIFO blocks until something writes to it),
or a file larger than a limit. :func:`check_number` refuses a setting that is not a finite
number in its range (NaN, inf, bools, strings), naming the setting and the range.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import secrets
import stat


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


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


_NOT_REGULAR = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_regular_file(path, *, max_bytes: int | None = None, what: str = "file") -> str:
    """Refuse, without opening it, anything at ``path`` that is not a regular file.

    Call it before opening a user's file: opening a FIFO blocks until something writes to
    it, and reading a device or an unbounded file never ends. Symbolic links are followed
    (a link to a regular file is fine).

    Args:
        path: the file (str or path-like).
        max_bytes: the largest size allowed (for files that are read whole, such as JSON
            configs); None for no limit.
        what: what the file should be, for the messages ("image", "model config").

    Returns:
        ``path`` as a str.

    Raises:
        FileNotFoundError: nothing is at ``path`` (or a link points nowhere).
        IsADirectoryError: ``path`` is a folder.
        ValueError: ``path`` is a FIFO, a device or a socket, or is larger than ``max_bytes``.
    """
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such {what}: {path}") from None
    except NotADirectoryError:
        raise FileNotFoundError(f"no such {what}: {path} (a part of the path is a file, "
                                "not a folder)") from None
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"{path} is a folder, not {_article(what)} {what}: pass the "
                                f"path of the {what} itself")
    if not stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in _NOT_REGULAR if test(st.st_mode)), "not a regular file")
        raise ValueError(f"{path} is {kind}, not {_article(what)} {what}: only regular files "
                         f"are read; pass the path of the {what} itself")
    if max_bytes is not None and st.st_size > max_bytes:
        raise ValueError(f"{path} is {st.st_size} bytes, more than the {max_bytes} allowed for "
                         f"{_article(what)} {what}: is it the right file?")
    return path


def _num(x) -> str:
    return str(x) if isinstance(x, numbers.Integral) else f"{x:g}"


def _interval(lo, hi, lo_open: bool, hi_open: bool) -> str:
    left = "(-inf" if lo is None else f"{'(' if lo_open else '['}{_num(lo)}"
    right = "inf)" if hi is None else f"{_num(hi)}{')' if hi_open else ']'}"
    return f"{left}, {right}"


def check_number(name: str, value, lo=None, hi=None, *, integer: bool = False,
                 lo_open: bool = False, hi_open: bool = False):
    """A setting that must be a finite number in a range, checked with one clear message.

    Args:
        name: the setting's name, as the user wrote it ("guidance_scale", "--lr").
        value: the value to check. Bools, strings, None, NaN and +-inf are refused; with
            ``integer=True`` only integers (Python or numpy) are accepted.
        lo: the lower bound (None: none); excluded when ``lo_open``.
        hi: the upper bound (None: none); excluded when ``hi_open``.
        integer: the value must be an integer.
        lo_open: ``lo`` itself is not allowed.
        hi_open: ``hi`` itself is not allowed.

    Returns:
        ``value`` as a Python int (``integer=True``) or float.

    Raises:
        ValueError: naming the setting, its value and the allowed range.
    """
    kind = "an integer" if integer else "a finite number"
    rng = _interval(lo, hi, lo_open, hi_open)
    ok_type = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, ok_type):
        raise ValueError(f"{name} must be {kind} in {rng}, got {value!r} "  # noqa: TRY004 (one error type for every bad setting)
                         f"({type(value).__name__})")
    try:
        value = int(value) if integer else float(value)
    except OverflowError:  # an int too large for a float
        value = math.inf
    bad = (not integer and not math.isfinite(value)) \
        or (lo is not None and (value <= lo if lo_open else value < lo)) \
        or (hi is not None and (value >= hi if hi_open else value > hi))
    if bad:
        raise ValueError(f"{name} must be {kind} in {rng}, got {value!r}")
    return value


# ----------------------------------------------------------------------------- folders
def _siblings(folder: str, tag: str) -> list[str]:
    parent, name = os.path.split(os.path.abspath(folder))
    prefix = f".{name}.{tag}-"
    return [os.path.join(parent, f) for f in sorted(os.listdir(parent)) if f.startswith(prefix)] \
        if os.path.isdir(parent) else []


def recover_folder(folder) -> None:
    """Finish a :func:`replace_folder` that a crash interrupted: the folder is put back from
    its backup if the switch did not happen, and entries left in a backup are moved in."""
    import shutil

    folder = os.path.abspath(os.fspath(folder))
    for old in _siblings(folder, "old"):
        if not os.path.exists(folder):
            os.rename(old, folder)
            continue
        for entry in os.listdir(old):
            if not os.path.lexists(os.path.join(folder, entry)):
                os.rename(os.path.join(old, entry), os.path.join(folder, entry))
        shutil.rmtree(old, ignore_errors=True)
    for new in _siblings(folder, "new"):
        shutil.rmtree(new, ignore_errors=True)   # never switched in: an unfinished write


def replace_folder(folder, write, carry=lambda name: False) -> str:
    """Write a folder whole, then put it in place of ``folder`` in one step.

    ``write(tmp)`` fills a new folder beside ``folder``; a rename then switches it in (a
    reader sees the old folder or the new one, never a mix), and the old folder's entries
    for which ``carry(name)`` is true (e.g. a ``checkpoint/`` beside a result) are moved
    into the new one. A crash at any point is finished by :func:`recover_folder`, which
    runs first.

    Args:
        folder: the folder to write.
        write: ``write(tmp_folder)`` writes every file of the new folder.
        carry: which top-level entries of the old folder the new one keeps.

    Returns:
        The folder.
    """
    import secrets
    import shutil

    folder = os.path.abspath(os.fspath(folder))
    parent, name = os.path.split(folder)
    os.makedirs(parent, exist_ok=True)
    recover_folder(folder)
    tmp = os.path.join(parent, f".{name}.new-{secrets.token_hex(4)}")
    os.mkdir(tmp)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not os.path.exists(folder):
        os.rename(tmp, folder)
        return folder
    old = os.path.join(parent, f".{name}.old-{secrets.token_hex(4)}")
    os.rename(folder, old)
    os.rename(tmp, folder)                       # the switch
    for entry in os.listdir(old):
        if carry(entry) and not os.path.lexists(os.path.join(folder, entry)):
            os.rename(os.path.join(old, entry), os.path.join(folder, entry))
    shutil.rmtree(old, ignore_errors=True)
    return folder


class FolderBusy(RuntimeError):
    """Another process holds the lock of a folder."""


class folder_lock:
    """An exclusive lock on ``folder`` for a ``with`` block: a second process asking for it
    is refused at once with the first one's process id. The lock is the operating system's
    (``fcntl.flock`` on ``.NAME.lock`` beside the folder), so it ends with its process: a
    lock left by a killed run is simply taken. Where ``fcntl`` is missing (Windows) it
    does nothing."""

    def __init__(self, folder):
        parent, name = os.path.split(os.path.abspath(os.fspath(folder)))
        self.path = os.path.join(parent, f".{name}.lock")
        self.fd = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(self.fd, 64).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            self.fd = None
            raise FolderBusy(f"{os.path.dirname(self.path)}: another run (process {holder}) "
                             f"is writing {os.path.basename(self.path)[1:-5]} now; wait for it "
                             "to finish or choose another folder") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, str(os.getpid()).encode())
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)   # closing releases the lock
            self.fd = None
        return False


def load_tensors(path, map_location="cpu"):
    """``torch.load(path, weights_only=True)`` with one clear error for a bad file.

    Raises:
        FileNotFoundError, IsADirectoryError: see :func:`check_regular_file`.
        ValueError: the file is not a regular file, holds pickled objects, or is truncated
            or corrupt.
    """
    import pickle

    import torch

    check_regular_file(path, what="tensor file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} holds more than tensors and plain data, so it is not loaded "
                         f"(nothing in it was run): {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path} is truncated or corrupt ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}): delete it") from None


__all__ = [
    "FolderBusy",
    "atomic_save",
    "atomic_write_json",
    "atomic_write_text",
    "check_number",
    "check_regular_file",
    "fingerprint",
    "folder_lock",
    "load_tensors",
    "recover_folder",
    "replace_folder",
    "torch_save",
]
