"""One code path from the bundled model to Stable Diffusion 1.5, 2.1 (768 px, v-prediction)
and SDXL (two text encoders, added conditions), on tiny random-weight pipelines built from
diffusers' and transformers' own classes (:mod:`conceptlab.families`).

On each family: the sizes and attention layers come from the configs, ``attention_maps``,
``estimate_masks``, ``learn_concepts`` (EM, phase 1 and a LoRA phase 2), ``generate``, the
standard files saved and read back (by conceptlab, and by stock diffusers in a subprocess
that never imports conceptlab), and the command line's ``learn`` and ``generate`` with
``--model FOLDER``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conceptlab import generate, learn_concepts
from conceptlab.attention import layer_resolutions
from conceptlab.cli import main
from conceptlab.estep import MaskConfig, estimate_masks
from conceptlab.families import random_pipeline
from conceptlab.maps import attention_maps, default_attention_config
from conceptlab.models import is_sdxl, latent_size, native_size, text_encoders
from conceptlab.result import LearnedConcepts
from conceptlab.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")
EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "data", "examples",
                       "striped-star-and-heart.png")
#: family -> (image side, latent side, prediction type, side of the attention maps used)
SHAPES = {"sd15": (512, 64, "epsilon", 16), "sd21": (768, 96, "v_prediction", 24),
          "sdxl": (1024, 128, "epsilon", 32)}


@pytest.fixture(scope="module", params=list(SHAPES))
def family(request, tmp_path_factory):
    """(name, pipeline, its saved folder, an example image at its size)."""
    name = request.param
    pipe = random_pipeline(name)
    folder = tmp_path_factory.mktemp(name) / "model"
    pipe.save_pretrained(str(folder))
    side = native_size(pipe)
    image = np.asarray(Image.open(EXAMPLE).convert("RGB").resize((side, side), Image.NEAREST))
    return name, pipe, str(folder), image


def state(pipe) -> dict:
    """Every weight of the pipeline, and its tokenizers' vocabularies."""
    out = {}
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        m = getattr(pipe, part, None)
        if m is not None:
            out |= {f"{part}.{k}": v.detach().clone() for k, v in m.state_dict().items()}
    out["vocab"] = [len(tok) for tok, _ in text_encoders(pipe)]
    return out


def test_sizes_and_attention_layers_come_from_the_configs(family):
    name, pipe, _, _ = family
    side, latent, prediction, maps_side = SHAPES[name]
    assert native_size(pipe) == side and latent_size(pipe) == (latent, latent)
    assert pipe.scheduler.config.prediction_type == prediction
    assert is_sdxl(pipe) == (name == "sdxl") and len(text_encoders(pipe)) == 1 + (name == "sdxl")
    res = layer_resolutions(pipe.unet)
    layers = default_attention_config(pipe)["layers"]
    assert layers and {res[n] for n in layers} == {maps_side}


def test_maps_masks_learning_generation_and_files(family, tmp_path):
    name, pipe, _, image = family
    side, _, _, maps_side = SHAPES[name]
    before = state(pipe)
    maps = attention_maps(pipe, image, "a photo of star and heart", n_timesteps=2)
    assert maps.resolution == maps_side and maps.for_word("star", size=64).shape == (64, 64)
    est = estimate_masks(pipe, image, ["star", "heart"], config=MaskConfig(n_timesteps=2))
    assert est.masks.shape == (2, side, side) and est.masks.dtype == bool

    config = TrainConfig.for_model(pipe).replace(
        steps=2, phase2="lora", phase2_steps=1, lora_rank=2, batch_size=1)
    result = learn_concepts(pipe, [image], ["star", "heart"], config=config, em_every=1,
                            mask_config=MaskConfig(n_timesteps=2), progress=False)
    assert result.complete and result.tokens.unet.mode == "lora"
    assert result.tokens.embeddings.shape == (2, sum(te.config.hidden_size
                                                     for _, te in text_encoders(pipe)))
    assert result.masks[0].shape == (2, side, side)
    images = generate(pipe, result, "a photo of [v1] and [v2]", n=1, num_inference_steps=2,
                      output_type="np")
    assert images.shape == (1, side, side, 3)

    result.save(tmp_path / "concepts")
    again = LearnedConcepts.load(tmp_path / "concepts")
    assert torch.equal(again.tokens.embeddings, result.tokens.embeddings)
    same = generate(pipe, again, "a photo of [v1] and [v2]", n=1, num_inference_steps=2,
                    output_type="np")
    assert np.abs(same.astype(int) - images.astype(int)).max() <= 1
    after = state(pipe)
    assert after["vocab"] == before["vocab"]
    assert all(torch.equal(after[k], v) for k, v in before.items() if k != "vocab")


STOCK = r"""
import json, os, sys
import numpy as np, torch
from safetensors.torch import load_file
torch.set_num_threads(1)
from diffusers import DiffusionPipeline
model, folder, out = sys.argv[1:4]
pipe = DiffusionPipeline.from_pretrained(model)
with open(os.path.join(folder, "concepts.json")) as f:
    side = json.load(f)
for t in side["tokens"]:
    path = os.path.join(folder, t["file"])
    if hasattr(pipe, "text_encoder_2"):      # SDXL: one call per text encoder
        sd = load_file(path)
        pipe.load_textual_inversion(sd["clip_l"], token=t["token"],
                                    text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(sd["clip_g"], token=t["token"],
                                    text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    else:
        pipe.load_textual_inversion(path)
pipe.load_lora_weights(folder, weight_name="pytorch_lora_weights.safetensors")
pipe.set_progress_bar_config(disable=True)
im = pipe("a photo of [v1] and [v2]", generator=torch.Generator("cpu").manual_seed(0),
          num_inference_steps=2, guidance_scale=5.0, output_type="np").images
np.save(out, (np.asarray(im) * 255).round().clip(0, 255).astype(np.uint8))
assert "conceptlab" not in sys.modules
"""


def test_stock_diffusers_reads_the_files_and_the_command_line_runs(family, tmp_path):
    """The CLI learns and generates with --model FOLDER; stock diffusers (SDXL: two
    load_textual_inversion calls, clip_l and clip_g) loads the result and draws what
    conceptlab draws."""
    name, pipe, folder, image = family
    Image.fromarray(image).save(tmp_path / "scene.png")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore",
           "DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_VERBOSITY": "error"}
    out = tmp_path / "concepts"
    assert main(["learn", str(tmp_path / "scene.png"), "--concepts", "star,heart", "--model",
                 folder, "--method", "none", "--steps", "2", "--out", str(out), "--quiet"]) == 0
    side = json.loads((out / "concepts.json").read_text())
    assert [t["token"] for t in side["tokens"]] == ["[v1]", "[v2]"]
    assert main(["generate", str(out), "a photo of [v1] and [v2]", "-n", "1",
                 "--inference-steps", "2", "--model", folder, "--out", str(tmp_path / "g")]) == 0
    assert (tmp_path / "g" / "generations.png").is_file()

    # a phase-2 LoRA result, read by stock diffusers
    config = TrainConfig.for_model(pipe).replace(
        steps=1, phase2="lora", phase2_steps=1, lora_rank=2, batch_size=1)
    result = learn_concepts(pipe, [image], ["star", "heart"], method="none", config=config,
                            progress=False)
    result.save(tmp_path / "lora")
    if name == "sdxl":
        from safetensors.torch import load_file

        tensors = load_file(tmp_path / "lora" / "v1.safetensors")
        assert sorted(tensors) == ["clip_g", "clip_l"]
        assert [v.shape[1] for v in (tensors["clip_l"], tensors["clip_g"])] == [32, 32]
    subprocess.run([sys.executable, "-c", STOCK, folder, str(tmp_path / "lora"),
                    str(tmp_path / "stock.npy")], check=True, env=env, cwd=tmp_path)
    ours = generate(pipe, result, "a photo of [v1] and [v2]", n=1, num_inference_steps=2,
                    guidance_scale=5.0, output_type="np")
    stock = np.load(tmp_path / "stock.npy")
    assert np.abs(stock.astype(int) - ours.astype(int)).max() <= 1
