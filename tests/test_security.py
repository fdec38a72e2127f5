"""No file conceptlab reads can run code: planted pickles in every resume path are refused.

Each test writes a file whose unpickling would create a marker file (a harmless payload),
puts it where a resumed run looks, resumes, and asserts that the run refuses it with a
clear error AND that the marker was never created.
"""

import os
import pickle

import numpy as np
import pytest
import torch

from conceptlab.fileio import load_tensors

pytestmark = pytest.mark.usefixtures("one_thread")


class Payload:
    """Unpickling this runs ``open(marker, "w")``: the attack, made harmless."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path, marker):
    with open(path, "wb") as f:
        pickle.dump({"stage": "unet", "step": 1, "x": Payload(marker)}, f)


def plant_torch(path, marker):
    torch.save({"stage": "unet", "step": 1, "x": Payload(marker)}, path)


@pytest.mark.parametrize("writer", [plant, plant_torch])
def test_load_tensors_refuses_pickled_objects(tmp_path, writer):
    marker = tmp_path / "pwned"
    writer(tmp_path / "evil.pt", marker)
    with pytest.raises(ValueError, match="not loaded"):
        load_tensors(tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["checkpoint.pt", "dataset.pt", "latents.pt", "decoder.pt"])
def test_train_model_resume_refuses_planted_files(tmp_path, name):
    from conceptlab.shapes.train import ModelTrainConfig, train_model

    out = tmp_path / "run"
    cfg = ModelTrainConfig(out=str(out), model="tiny", n_images=16, vae_steps=2, vae_batch=4,
                      unet_steps=2, batch=4, checkpoint_every=1, log_every=1,
                      decoder_steps=1, decoder_batch=2)
    train_model(cfg, progress=False)  # a real finished run: every file is there
    assert (out / name).exists()
    marker = tmp_path / "pwned"
    plant_torch(out / name, marker)
    with pytest.raises((ValueError, RuntimeError)):
        train_model(cfg, progress=False)
    assert not marker.exists()


def test_concept_trainer_resume_refuses_a_planted_checkpoint(tmp_path):
    from conceptlab.shapes import world
    from conceptlab.shapes.model import tiny_pipeline
    from conceptlab.tokens import new_concepts
    from conceptlab.train import ConceptImage, TrainConfig, train_concepts

    sc = world.render_scene(world.sample_scene(seed=1, n_objects=1), size=32)
    pipe = tiny_pipeline()
    tok = new_concepts(pipe, 1, ["star"])
    marker = tmp_path / "pwned"
    plant_torch(tmp_path / "checkpoint.pt", marker)
    with pytest.raises(ValueError, match="not loaded"):
        train_concepts(pipe, ConceptImage.from_scene(sc), tok, TrainConfig(steps=1),
                       progress=False, checkpoint_dir=tmp_path)
    assert not marker.exists()


def test_em_state_refuses_object_arrays(tmp_path):
    """em_state.npz is read with allow_pickle=False: an object array is an error, not code."""
    from conceptlab.em_callbacks import STATE_FILE

    arr = np.array([Payload(tmp_path / "pwned")], dtype=object)
    np.savez(tmp_path / STATE_FILE, meta=arr)
    with pytest.raises(ValueError):
        np.load(tmp_path / STATE_FILE, allow_pickle=False)["meta"]
    assert not (tmp_path / "pwned").exists()


def test_no_pickle_loads_in_the_package():
    """Every torch.load goes through fileio.load_tensors (weights_only=True); every np.load
    says allow_pickle=False."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "conceptlab"
    bad = []
    for p in root.rglob("*.py"):
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                bad.append(f"{p.name}:{i}: {line.strip()}")
            if re.search(r"np\.load\(", line) and "allow_pickle=False" not in line:
                bad.append(f"{p.name}:{i}: {line.strip()}")
            if "pickle.load" in line:
                bad.append(f"{p.name}:{i}: {line.strip()}")
    assert not bad, bad
    assert os.path.exists(root / "fileio.py")
