"""The base-model training code runs, resumes, and lowers its loss (tiny config)."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conceptlab.shapes.train import ModelTrainConfig, train_model

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def test_tiny_training_loss_falls_and_resumes(tmp_path):
    cfg = ModelTrainConfig(out=str(tmp_path / "run"), model="tiny", n_images=64, vae_steps=30,
                      vae_batch=8, unet_steps=40, batch=8, lr=2e-3, checkpoint_every=20,
                      log_every=1)
    path = train_model(cfg, progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    vae = [r["loss"] for r in log if r.get("stage") == "vae"]
    unet = [r["loss"] for r in log if r.get("stage") == "unet"]
    assert sum(vae[-5:]) / 5 < sum(vae[:5]) / 5
    assert sum(unet[-10:]) / 10 < sum(unet[:10]) / 10
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(path)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    from safetensors import safe_open
    with safe_open(str(next(Path(path, "unet").glob("*.safetensors"))), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16  # stored as fp16
    # resuming a finished run trains nothing more and saves the same model
    again = train_model(cfg, progress=False)
    assert again == path


def test_a_control_run_reuses_the_vae_of_another_run(tmp_path):
    """`--from-vae RUN`: the control trains only its U-Net, on exactly the same VAE."""
    from safetensors.torch import load_file

    from conceptlab.shapes.train import start_from_vae

    base = ModelTrainConfig(out=str(tmp_path / "a"), model="tiny", n_images=32, vae_steps=6,
                       vae_batch=8, unet_steps=4, batch=4, checkpoint_every=2, log_every=1)
    a = train_model(base, progress=False)
    control = dataclasses.replace(base, out=str(tmp_path / "b"), grounding_weight=0.0)
    start_from_vae(control, base.out)
    b = train_model(control, progress=False)
    log = [json.loads(x) for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert not [r for r in log if r.get("stage") == "vae"]  # no VAE step trained again

    def vae_weights(folder):
        return load_file(next(iter(sorted(Path(folder, "vae").glob("*.safetensors")))))
    wa, wb = vae_weights(a), vae_weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(RuntimeError, match="already holds a checkpoint"):
        start_from_vae(control, base.out)
    with pytest.raises(RuntimeError, match="other data / VAE settings"):
        start_from_vae(dataclasses.replace(base, out=str(tmp_path / "c"), n_images=16), base.out)
