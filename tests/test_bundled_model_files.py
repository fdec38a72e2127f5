"""The bundled model's files, as other code reads them: the stock diffusers quick start and
every transformers version the project declares (>= 4.40, and 5).

The text encoder is written by ``tools/resave_text_encoder.py``; these tests say why.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conceptlab.models import BUNDLED_MODEL, resolve_model

pytestmark = pytest.mark.usefixtures("one_thread")

FOLDER = Path(resolve_model(BUNDLED_MODEL))
TE_WEIGHTS = FOLDER / "text_encoder" / "model.safetensors"
# transformers 4's CLIPTextModel keeps every weight in its ``text_model`` submodule
# (CLIPTextTransformer) and matches checkpoint keys by module path, so each key must read
# ``text_model.<module path>``; without the prefix it initialises all of them at random and
# only warns. transformers 5 (no such submodule) strips the prefix when it loads.
T4_PREFIX = "text_model."


def _file_tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)


def test_stock_from_pretrained_gives_one_dtype_and_runs():
    """What every diffusers tutorial writes: no dtype argument. A text encoder in another
    dtype than the U-Net fails on the CPU ("mat1 and mat2 must have the same dtype")."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(FOLDER))
    pipe.set_progress_bar_config(disable=True)
    dtypes = {n: getattr(pipe, n).dtype for n in ("unet", "vae", "text_encoder")}
    assert set(dtypes.values()) == {torch.float32}, dtypes
    out = pipe("a photo of a star", num_inference_steps=2,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_text_encoder_file_uses_transformers4_keys_and_float32():
    from transformers import CLIPTextConfig, CLIPTextModel

    tensors = _file_tensors(TE_WEIGHTS)
    config = CLIPTextConfig.from_pretrained(FOLDER / "text_encoder")
    # The module paths of the installed transformers, written the transformers-4 way.
    expected = {k if k.startswith(T4_PREFIX) else T4_PREFIX + k
                for k in CLIPTextModel(config).state_dict()}
    assert set(tensors) == expected, (
        f"keys without the {T4_PREFIX!r} prefix: "
        f"{sorted(k for k in tensors if not k.startswith(T4_PREFIX))[:3]}; "
        f"missing: {sorted(expected - set(tensors))[:3]}")
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    saved_config = json.loads((FOLDER / "text_encoder" / "config.json").read_text())
    assert saved_config.get("dtype", saved_config.get("torch_dtype")) == "float32"


def test_text_encoder_loads_every_weight_from_the_file():
    from transformers import CLIPTextModel

    model, info = CLIPTextModel.from_pretrained(FOLDER / "text_encoder",
                                                output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], {
        k: sorted(v)[:3] for k, v in info.items() if k in ("missing_keys", "unexpected_keys")}
    assert not info.get("mismatched_keys")
    assert model.dtype == torch.float32
    # Loaded, not freshly initialised: every weight equals the file's.
    file_tensors = {k.removeprefix(T4_PREFIX): t for k, t in _file_tensors(TE_WEIGHTS).items()}
    loaded = {k.removeprefix(T4_PREFIX): t for k, t in model.state_dict().items()}
    assert set(loaded) == set(file_tensors)
    for k, t in file_tensors.items():
        assert torch.equal(loaded[k], t), k


def test_slow_tokenizer_files_give_the_pipeline_tokenizer_ids(tmp_path):
    """transformers 4's slow ``CLIPTokenizer`` (what diffusers builds for ``CLIPTokenizer`` in
    model_index.json) reads only vocab.json and merges.txt; without them it fails (asking for
    protobuf). They are written from tokenizer.json's BPE model, and must stay equal to it."""
    import copy
    import shutil

    from transformers import CLIPTokenizer

    from conceptlab import load_pipeline
    from conceptlab.shapes.world import vocabulary

    tok_dir = FOLDER / "tokenizer"
    bpe = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    assert json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8")) == bpe["vocab"]
    lines = (tok_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    assert [tuple(m.split(" ")) for m in lines[1:]] == [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]

    # Only the slow files, so transformers 5 (no slow class) builds from them too rather
    # than reading tokenizer.json; transformers 4 reads just these either way.
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, tmp_path / name)
    slow = CLIPTokenizer.from_pretrained(tmp_path)
    pipe_tok = load_pipeline(BUNDLED_MODEL, device="cpu", progress=False).tokenizer
    prompts = vocabulary() + [
        "a photo of a red star and a blue striped circle on a grassy background",
        "an image of an orange two-tone heart next to a white dotted square",
        "A PHOTO  OF a\tStar!", "a star, a heart; a circle?! (the end).", "it's the star's",
        "a zebra xylophone, café 42", "",
        "the " * 40,  # longer than model_max_length: truncated
    ]
    for tok_a, tok_b in ((slow, pipe_tok), (copy.deepcopy(slow), copy.deepcopy(pipe_tok))):
        if tok_a is not slow:
            assert tok_a.add_tokens(["[v1]", "[v2]"]) == tok_b.add_tokens(["[v1]", "[v2]"]) == 2
            prompts = prompts + ["a photo of [v1] and [v2]", "[v1][v2] on a gray background"]
        for p in prompts:
            assert tok_a(p).input_ids == tok_b(p).input_ids, p
            kw = dict(padding="max_length", max_length=tok_b.model_max_length, truncation=True)
            assert tok_a(p, **kw).input_ids == tok_b(p, **kw).input_ids, p
