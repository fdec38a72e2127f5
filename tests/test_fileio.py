"""conceptlab.fileio: atomic writes leave the old file or the new one, with ordinary modes."""

import json
import os
import stat

import pytest

from conceptlab.fileio import atomic_save, atomic_write_json


def test_atomic_write_json_round_trip_and_mode(tmp_path):
    path = tmp_path / "out.json"
    atomic_write_json(path, {"a": 1}, indent=1)
    assert json.loads(path.read_text()) == {"a": 1}
    umask = os.umask(0)
    os.umask(umask)
    # the mode open() would give, not mkstemp's owner-only 0600
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_failed_save_keeps_the_old_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"old")

    def half_write(tmp):
        with open(tmp, "wb") as f:
            f.write(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_save(half_write, path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"]   # no temporary left
