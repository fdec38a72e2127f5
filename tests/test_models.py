"""Loading: the bundled model (two ways), folders, hub ids, bad input."""

import os

import numpy as np
import pytest
import torch

from conceptlab.models import (
    BUNDLED_MODEL,
    check_prompt,
    load_pipeline,
    native_size,
    resolve_model,
    to_uint8,
)
from conceptlab.shapes.model import build_tokenizer


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(progress=False)


def test_bundled_model_loads_and_generates(pipe):
    assert native_size(pipe) == 64
    assert pipe.unet.dtype == torch.float32 and pipe.safety_checker is None
    out = pipe("a red star on a gray background", num_inference_steps=4,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 64, 64, 3)


def test_bundled_model_loads_with_plain_diffusers():
    from diffusers import StableDiffusionPipeline
    p = StableDiffusionPipeline.from_pretrained(resolve_model(BUNDLED_MODEL))
    assert type(p).__name__ == "StableDiffusionPipeline"


def test_bad_names_and_folders(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        resolve_model("no-such-model")
    with pytest.raises(ValueError, match="not a diffusers pipeline"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("part, file", [
    ("text_encoder", "model.safetensors"),
    ("unet", "diffusion_pytorch_model.safetensors"),
])
def test_a_model_with_weights_missing_from_its_files_is_refused(tmp_path, part, file):
    """The loaders would initialise the missing weights at random with only a warning (a
    text encoder saved by another transformers version reads no text at all)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from conceptlab.models import MissingWeightsError

    folder = tmp_path / "model"
    shutil.copytree(resolve_model(BUNDLED_MODEL), folder)
    tensors = load_file(folder / part / file)
    dropped = min(tensors)
    del tensors[dropped]
    save_file(tensors, folder / part / file, metadata={"format": "pt"})
    with pytest.raises(MissingWeightsError, match=rf"{part}: 1 weights not in its files.*"
                       r"diffusers \d.*transformers \d"):
        load_pipeline(str(folder), progress=False)
    tensors[dropped + "_misspelt"] = torch.zeros(1)  # present under another name
    save_file(tensors, folder / part / file, metadata={"format": "pt"})
    with pytest.raises(MissingWeightsError):
        load_pipeline(str(folder), progress=False)


def test_only_stable_diffusion_and_sdxl_pipelines_are_loaded(tmp_path):
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(resolve_model(BUNDLED_MODEL), folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "MyPipeline"}))
    with pytest.raises(ValueError, match="conceptlab runs StableDiffusionPipeline and "
                                         "StableDiffusionXLPipeline"):
        load_pipeline(str(folder), progress=False)
    index["unet"] = ["mypackage", "UNet2DConditionModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="diffusers' and transformers' own classes only"):
        load_pipeline(str(folder), progress=False)


def test_hub_id_offline_gives_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="hf download"):
        load_pipeline("someone/not-a-cached-model", progress=False)


def test_long_prompt_warns_and_is_truncated(pipe):
    with pytest.warns(UserWarning, match="truncated"):
        check_prompt(pipe, " ".join(["a red star and"] * 12))


def test_image_checks():
    img = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="resize"):
        to_uint8(img, 64)
    with pytest.warns(UserWarning, match="resizing"):
        assert to_uint8(img, 64, resize=True).shape == (64, 64, 3)
    # documented conversions: float in [0, 1] -> x 255, grayscale -> RGB
    f = np.full((8, 8, 3), 0.5, np.float32)
    assert (to_uint8(f) == 128).all()
    assert to_uint8(np.zeros((8, 8), np.uint8)).shape == (8, 8, 3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_uint8(np.full((8, 8, 3), 2.0, np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        to_uint8(np.zeros((8, 8, 5), np.uint8))


def test_tokenizer_one_token_per_world_word():
    from conceptlab.shapes import world
    tok = build_tokenizer()
    for w in world.vocabulary():
        if "-" not in w:
            assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    assert os.path.isdir(resolve_model(BUNDLED_MODEL))
