"""The base-model training code runs, resumes, and lowers its loss (tiny config)."""

import json

import pytest
import torch

from conceptlab.shapes.train import TrainConfig, train_model

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def test_tiny_training_loss_falls_and_resumes(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "run"), model="tiny", n_images=64, vae_steps=30,
                      vae_batch=8, unet_steps=40, batch=8, lr=2e-3, checkpoint_every=20,
                      log_every=1)
    path = train_model(cfg, progress=False)
    log = [json.loads(line) for line in open(tmp_path / "run" / "train_log.jsonl")]
    vae = [r["loss"] for r in log if r.get("stage") == "vae"]
    unet = [r["loss"] for r in log if r.get("stage") == "unet"]
    assert sum(vae[-5:]) / 5 < sum(vae[:5]) / 5
    assert sum(unet[-10:]) / 10 < sum(unet[:10]) / 10
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(path)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    from pathlib import Path

    from safetensors import safe_open
    with safe_open(str(next(Path(path, "unet").glob("*.safetensors"))), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16  # stored as fp16
    # resuming a finished run trains nothing more and saves the same model
    again = train_model(cfg, progress=False)
    assert again == path
