"""The library as a tool: the pipeline it is given is left as it was, and what it saves is
read by stock diffusers (textual inversion, LoRA, a diffusers U-Net folder)."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conceptlab import (
    LearnedConcepts,
    attention_maps,
    estimate_masks,
    generate,
    learn_concepts,
    load_concepts,
    load_pipeline,
)
from conceptlab.models import resolve_model
from conceptlab.shapes.examples import load_example
from conceptlab.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def pipeline_hash(pipe) -> str:
    """Every weight of the U-Net, text encoder and VAE, and the tokenizer's vocabulary."""
    h = hashlib.sha256()
    for part in ("unet", "text_encoder", "vae"):
        for k, v in sorted(getattr(pipe, part).state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().float().contiguous().numpy().tobytes())
        h.update(str([(n, p.requires_grad) for n, p in getattr(pipe, part).named_parameters()])
                 .encode())
    h.update(json.dumps(sorted(pipe.tokenizer.get_vocab().items())).encode())
    h.update(str(type(pipe.text_encoder.get_input_embeddings())).encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline()


@pytest.fixture(scope="module")
def example():
    return load_example("striped-star-and-heart")


@pytest.fixture(scope="module", params=["full", "lora"])
def learned(request, pipe, example, tmp_path_factory):
    """A short run with each kind of phase 2, and the pipeline's hash before it."""
    before = pipeline_hash(pipe)
    cfg = TrainConfig.for_model(pipe, "em").replace(phase2=request.param)
    result = learn_concepts(pipe, example.image, example.init_words, config=cfg, steps=4,
                            em_every=2, progress=False)
    folder = tmp_path_factory.mktemp(f"concepts_{request.param}")
    result.save(folder)
    return {"result": result, "folder": str(folder), "before": before, "mode": request.param}


def test_learn_concepts_leaves_the_pipeline_bit_for_bit(pipe, learned):
    assert learned["result"].tokens.unet.mode == learned["mode"]
    assert pipeline_hash(pipe) == learned["before"]
    assert "[v1]" not in pipe.tokenizer.get_vocab()


def test_running_it_twice_gives_the_same_result(pipe, example):
    """A notebook cell run twice: no token clash, and the same rows."""
    cfg = TrainConfig.for_model(pipe, "em").replace(phase2="none")
    a = learn_concepts(pipe, example.image, example.init_words, config=cfg, steps=2,
                       progress=False)
    b = learn_concepts(pipe, example.image, example.init_words, config=cfg, steps=2,
                       progress=False)
    assert a.names == b.names == ["[v1]", "[v2]", "[v3]"]
    assert torch.equal(a.embeddings, b.embeddings)


def test_using_concepts_leaves_the_pipeline_as_it_was(pipe, learned, example):
    before = pipeline_hash(pipe)
    r = learned["result"]
    generate(pipe, r, "a photo of [v1]", n=1, num_inference_steps=2, output_type="np")
    attention_maps(pipe, example.image, "a photo of [v1] and [v2]", n_timesteps=2,
                   concepts=r)
    estimate_masks(pipe, example.image, ["[v1]", "[v2]", "[v3]"], concepts=r,
                   config=r_mask_config(), background=2)
    with r.applied(pipe) as ids:
        assert ids == [pipe.tokenizer.convert_tokens_to_ids(n) for n in r.names]
        with r.applied(pipe):  # nested: free
            pass
    assert pipeline_hash(pipe) == before


def r_mask_config():
    from conceptlab import MaskConfig

    return MaskConfig(n_timesteps=2)


def test_saved_folder_holds_standard_files(learned):
    folder, mode = learned["folder"], learned["mode"]
    names = sorted(os.listdir(folder))
    assert {"concepts.json", "v1.safetensors", "v2.safetensors", "v3.safetensors",
            "images", "masks"} <= set(names)
    assert ("pytorch_lora_weights.safetensors" in names) == (mode == "lora")
    assert ("unet" in names) == (mode == "full")
    from safetensors.torch import load_file

    sd = load_file(os.path.join(folder, "v1.safetensors"))
    assert list(sd) == ["[v1]"] and sd["[v1]"].ndim == 2 and sd["[v1]"].shape[0] == 1
    with open(os.path.join(folder, "concepts.json")) as f:
        side = json.load(f)
    assert [t["init_word"] for t in side["tokens"]] == ["star", "heart", "background"]
    assert side["phase2"]["mode"] == mode
    assert sorted(os.listdir(os.path.join(folder, "masks"))) == [
        "image0_v1.png", "image0_v2.png", "image0_v3.png"]


def test_load_round_trip_equals_the_result(pipe, learned):
    r, r2 = learned["result"], LearnedConcepts.load(learned["folder"])
    assert r2.names == r.names and torch.equal(r2.embeddings, r.embeddings)
    assert all(np.array_equal(a, b) for a, b in zip(r.masks[0], r2.masks[0]))
    assert r2.e_steps == r.e_steps and len(r2.mask_history) == len(r.mask_history)
    a = generate(pipe, r, "a photo of [v1] and [v2]", n=2, num_inference_steps=5,
                 output_type="np")
    b = generate(pipe, r2, "a photo of [v1] and [v2]", n=2, num_inference_steps=5,
                 output_type="np")
    assert np.array_equal(a, b)


STOCK = textwrap.dedent("""
    import json, os, sys
    import numpy as np, torch
    torch.set_num_threads(1)
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    model, folder, out = sys.argv[1:4]
    pipe = StableDiffusionPipeline.from_pretrained(model)   # no dtype: the quick start
    with open(os.path.join(folder, "concepts.json")) as f:
        side = json.load(f)
    for t in side["tokens"]:
        pipe.load_textual_inversion(os.path.join(folder, t["file"]))
    if os.path.exists(os.path.join(folder, "pytorch_lora_weights.safetensors")):
        pipe.load_lora_weights(folder, weight_name="pytorch_lora_weights.safetensors")
    if os.path.isdir(os.path.join(folder, "unet")):
        pipe.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator("cpu").manual_seed(i) for i in range(2)]
    im = pipe(["a photo of [v1] and [v2]"] * 2, generator=gens, guidance_scale=4.0,
              num_inference_steps=5, output_type="np").images
    np.save(out, (np.asarray(im) * 255).round().clip(0, 255).astype(np.uint8))
    assert "conceptlab" not in sys.modules
""")


@pytest.mark.slow
def test_stock_diffusers_loads_the_files_and_draws_the_same_images(pipe, learned, tmp_path):
    out = str(tmp_path / "stock.npy")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": "", "DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_VERBOSITY": "error"}
    subprocess.run([sys.executable, "-c", STOCK, resolve_model("shapes-ldm"), learned["folder"],
                    out], check=True, env=env, cwd=str(tmp_path), timeout=300)
    stock = np.load(out)
    ours = generate(pipe, load_concepts(learned["folder"]), "a photo of [v1] and [v2]", n=2,
                    num_inference_steps=5, guidance_scale=4.0, output_type="np")
    assert np.abs(stock.astype(int) - ours.astype(int)).max() <= 1


def test_a_diffusers_textual_inversion_file_is_read(tmp_path, pipe, example):
    from safetensors.torch import save_file

    D = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    save_file({"<my-star>": torch.randn(1, D)}, str(tmp_path / "my_star.safetensors"))
    c = load_concepts(tmp_path / "my_star.safetensors")
    assert c.names == ["<my-star>"] and c.embeddings.shape == (1, D)
    am = attention_maps(pipe, example.image, "a photo of <my-star>", n_timesteps=2, concepts=c)
    assert am.for_word("<my-star>").shape[-1] > 0


def test_an_a1111_embedding_is_read(tmp_path, pipe):
    from safetensors.torch import save_file

    D = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    save_file({"emb_params": torch.randn(1, D)}, str(tmp_path / "shiny.safetensors"))
    c = load_concepts(tmp_path / "shiny.safetensors")
    assert c.names == ["<shiny>"]
    generate(pipe, c, "a photo of <shiny>", n=1, num_inference_steps=2)


def test_a_folder_of_the_older_format_says_how_to_convert(tmp_path):
    (tmp_path / "concepts.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="conceptlab upgrade"):
        load_concepts(tmp_path)


def test_a_changed_or_missing_file_is_refused(learned, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(learned["folder"], folder)
    (folder / "v2.safetensors").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        load_concepts(folder)
    shutil.copy(os.path.join(learned["folder"], "v1.safetensors"), folder / "v2.safetensors")
    with pytest.raises(ValueError, match="does not belong"):
        load_concepts(folder)


def test_steps_means_the_whole_run(pipe, example):
    r = learn_concepts(pipe, example.image, example.init_words, steps=3, progress=False)
    assert r.history.steps[-1] == 3
    assert r.history.phase2_start == 2  # the preset's 2:1 split of phases 1 and 2


def test_a_folder_of_the_older_format_is_upgraded(tmp_path, pipe):
    """conceptlab 0.1's files (all rows in concepts.safetensors, a U-Net delta, em.json,
    masks.npz) become the standard files, with the same rows, masks and U-Net."""
    from safetensors.torch import save_file

    from conceptlab.cli import main

    rows = torch.randn(2, pipe.text_encoder.get_input_embeddings().weight.shape[1])
    save_file({"embeddings": rows}, str(tmp_path / "concepts.safetensors"), metadata={
        "format": "conceptlab-concepts-1", "names": json.dumps(["[v1]", "[v2]"]),
        "init_words": json.dumps(["star", "background"]), "base_model": "shapes-ldm"})
    delta = {"conv_in.weight": torch.full_like(pipe.unet.conv_in.weight, 0.01)}
    save_file(delta, str(tmp_path / "unet_delta.safetensors"),
              metadata={"mode": "full", "format": "conceptlab-concepts-1"})
    masks = np.zeros((2, 64, 64), bool)
    masks[0, :32], masks[1, 32:] = True, True
    np.savez(tmp_path / "masks.npz", image_0=np.zeros((64, 64, 3), np.uint8), masks_0=masks,
             history_0_0=masks)
    (tmp_path / "em.json").write_text(json.dumps({
        "method": "em", "concept_ids": [[0, 1]], "e_steps": [0], "iou_history": [],
        "warnings": [], "n_images": 1, "complete": True}))
    with pytest.raises(ValueError, match="conceptlab upgrade"):
        load_concepts(tmp_path)
    assert main(["upgrade", str(tmp_path), "--model", "shapes-ldm"]) == 0
    r = LearnedConcepts.load(tmp_path)
    assert r.names == ["[v1]", "[v2]"] and torch.equal(r.embeddings, rows)
    assert np.array_equal(r.masks[0], masks) and r.tokens.unet.mode == "full"
    assert torch.allclose(r.tokens.unet.weights["conv_in.weight"],
                          pipe.unet.conv_in.weight.detach() + 0.01)
    assert not (tmp_path / "concepts.safetensors").exists()
    generate(pipe, r, "a photo of [v1]", n=1, num_inference_steps=1)   # the model's weights
