"""Every class of bad input gets a clear error (or a documented, warned conversion), and the
functions that take the same kind of input accept and refuse the same things.

The table of cases is docs/inputs-and-errors.md; each row names its test here.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conceptlab.em import learn_concepts
from conceptlab.estep import estimate_masks
from conceptlab.generation import generate, sample_grid
from conceptlab.maps import attention_maps
from conceptlab.models import encode_prompt, load_pipeline, native_size
from conceptlab.result import LearnedConcepts
from conceptlab.shapes.model import tiny_pipeline
from conceptlab.tokens import new_concepts
from conceptlab.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

ONE_STEP = TrainConfig(steps=1, batch_size=1)


@pytest.fixture(scope="module")
def size():
    return native_size(tiny_pipeline())


def image_as(kind, size, tmp_path):
    """The same picture as each accepted input type."""
    arr = (np.arange(size * size * 3) % 251).reshape(size, size, 3).astype(np.uint8)
    if kind == "path":
        Image.fromarray(arr).save(tmp_path / "x.png")
        return str(tmp_path / "x.png")
    return {"pil": lambda: Image.fromarray(arr), "uint8": lambda: arr,
            "float01": lambda: arr.astype(np.float32) / 255,
            "tensor": lambda: torch.from_numpy(arr).permute(2, 0, 1).float() / 255}[kind]()


# the three functions that take a user's image, called the same way
TAKES_AN_IMAGE = {
    "attention_maps": lambda pipe, im, **kw: attention_maps(pipe, im, "a red star",
                                                            n_timesteps=2, **kw),
    "estimate_masks": lambda pipe, im, **kw: estimate_masks(pipe, im, ["star"], **kw),
    "learn_concepts": lambda pipe, im, **kw: learn_concepts(pipe, im, ["star"],
                                                            method="fixed", config=ONE_STEP,
                                                            progress=False, **kw),
}


def _output(fn, result):
    """What each function computed, as arrays to compare."""
    if fn == "attention_maps":
        return [result.raw.numpy()]
    if fn == "estimate_masks":
        return [result.masks, result.maps]
    return [result.embeddings.numpy(), *result.masks]


@pytest.mark.parametrize("fn", list(TAKES_AN_IMAGE))
def test_the_same_image_types_are_accepted_everywhere(fn, size, tmp_path):
    """A path, a PIL image, a uint8 or [0, 1] float array and a (3, H, W) tensor of the same
    picture give the same result in every function that takes an image."""
    pipe = tiny_pipeline()
    ref = _output(fn, TAKES_AN_IMAGE[fn](pipe, image_as("uint8", size, tmp_path)))
    for kind in ("path", "pil", "float01", "tensor"):
        got = _output(fn, TAKES_AN_IMAGE[fn](pipe, image_as(kind, size, tmp_path)))
        assert all(np.array_equal(a, b) for a, b in zip(ref, got)), kind


@pytest.mark.parametrize("fn", list(TAKES_AN_IMAGE))
def test_the_same_images_are_refused_everywhere(fn, size):
    call = TAKES_AN_IMAGE[fn]
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="boolean array is a mask"):
        call(pipe, np.zeros((size, size, 3), bool))
    with pytest.raises(ValueError, match=r"shape \(H, W, 3\)"):
        call(pipe, np.zeros((size, size, 5), np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        call(pipe, np.full((size, size, 3), np.nan, np.float32))
    with pytest.raises(TypeError, match="image must be"):
        call(pipe, 3)
    # another size: an error that says how to fix it, the same in all three ...
    with pytest.raises(ValueError, match="resize=True"):
        call(pipe, np.zeros((2 * size, 2 * size, 3), np.uint8))
    # ... and with resize=True a warned conversion (extreme aspect ratios say so)
    with pytest.warns(UserWarning, match="aspect ratio"):
        call(tiny_pipeline(), np.zeros((size, 4 * size, 3), np.uint8), resize=True)


def test_alpha_and_16_bit_images_are_converted_with_a_warning(size):
    rgba = np.zeros((size, size, 4), np.uint8)
    with pytest.warns(UserWarning, match="alpha"):
        attention_maps(tiny_pipeline(), rgba, "a star", n_timesteps=2)
    deep = np.full((size, size, 3), 65535, np.uint16)
    with pytest.warns(UserWarning, match="16-bit"):
        est = estimate_masks(tiny_pipeline(), deep, ["star"])
    assert est.masks.shape[0] == 1


# ----------------------------------------------------------------------------- prompts
UNLEARNED = {
    "attention_maps": lambda p, im: attention_maps(p, im, "a photo of [v9]", n_timesteps=2),
    "estimate_masks": lambda p, im: estimate_masks(p, im, ["[v9]"]),
    "encode_prompt": lambda p, im: encode_prompt(p, "a photo of [v9]"),
    "generate": lambda p, im: generate(p, None, "a photo of [v9]", n=1, num_inference_steps=1),
    "sample_grid": lambda p, im: sample_grid(p, ["a photo of [v9]"], n_per_prompt=1,
                                             num_inference_steps=1),
    "negative prompt": lambda p, im: generate(p, None, "a star", negative_prompt="[v9]", n=1,
                                              num_inference_steps=1),
}


@pytest.mark.parametrize("fn", list(UNLEARNED))
def test_unlearned_concept_tokens_are_refused_in_every_prompt(fn, size):
    """'[v9]' that the pipeline never learned would split into '[', 'v', '9', ']' and give a
    meaningless result: every function that takes a prompt refuses it and names the known
    tokens."""
    pipe = tiny_pipeline()
    with new_concepts(pipe, 1).applied(pipe), \
            pytest.raises(ValueError, match=r"unknown concept token.*\[v9\].*\[v1\]"):
        UNLEARNED[fn](pipe, np.zeros((size, size, 3), np.uint8))


def test_a_learned_token_passes_the_prompt_check(size):
    pipe = tiny_pipeline()
    am = attention_maps(pipe, np.zeros((size, size, 3), np.uint8), "a photo of [v1]",
                        n_timesteps=2, concepts=new_concepts(pipe, 1))
    assert "[v1]" in am.words and np.isfinite(am.for_word("[v1]").numpy()).all()


# ----------------------------------------------------------------------------- concept lists
def test_concept_lists(size):
    img = np.zeros((size, size, 3), np.uint8)
    with pytest.raises(TypeError, match="list of words"):
        learn_concepts(tiny_pipeline(), img, "star", config=ONE_STEP)
    with pytest.raises(ValueError, match="at least one concept"):
        learn_concepts(tiny_pipeline(), img, [], config=ONE_STEP)
    with pytest.raises(ValueError, match="non-empty string or None"):
        learn_concepts(tiny_pipeline(), img, ["star", 3], config=ONE_STEP)
    with pytest.raises(ValueError, match="non-empty string or None"):
        learn_concepts(tiny_pipeline(), img, ["star", " "], config=ONE_STEP)
    with pytest.raises(ValueError, match="learn fewer concepts"):
        learn_concepts(tiny_pipeline(), img, ["star"] * 40, config=ONE_STEP)
    r = learn_concepts(tiny_pipeline(), img, ["star"] * 4, method="fixed", config=ONE_STEP,
                       progress=False)
    assert r.tokens.names[-1] == "[v4]"
    # the same init word twice is allowed (the paper's setting: both tokens from "person"),
    # and gives two distinct tokens
    r = learn_concepts(tiny_pipeline(), img, ["star", "star"], method="fixed", config=ONE_STEP,
                       progress=False)
    assert r.tokens.names == ["[v1]", "[v2]"]


def test_init_words_the_tokenizer_cannot_represent():
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="cannot represent"):
        new_concepts(pipe, ["[x1]"], ["中"])
    with pytest.warns(UserWarning, match="splits into"):
        new_concepts(pipe, ["[x2]"], ["zebra"])  # letters, not a word of this vocab


def test_init_word_of_the_bundled_vocabulary_is_one_token():
    import warnings

    pipe = load_pipeline(progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new_concepts(pipe, 3, ["star", "heart", "background"])


# ----------------------------------------------------------------------------- model folders
@pytest.fixture
def model_folder(tmp_path):
    folder = tmp_path / "model"
    tiny_pipeline().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("damage", ["no unet weights", "truncated vae", "bad model_index",
                                    "no tokenizer"])
def test_incomplete_or_corrupt_model_folders(model_folder, damage):
    if damage == "no unet weights":
        next((model_folder / "unet").glob("diffusion_pytorch_model*")).unlink()
    elif damage == "truncated vae":
        w = next((model_folder / "vae").glob("diffusion_pytorch_model*"))
        w.write_bytes(w.read_bytes()[:100])
    elif damage == "bad model_index":
        (model_folder / "model_index.json").write_text("{not json")
    else:
        shutil.rmtree(model_folder / "tokenizer")
    with pytest.raises(ValueError, match="incomplete|not valid JSON|not a diffusers"):
        load_pipeline(str(model_folder), progress=False)


# ----------------------------------------------------------------------------- concepts folders
@pytest.fixture(scope="module")
def saved_result(tmp_path_factory, size):
    folder = tmp_path_factory.mktemp("learned")
    r = learn_concepts(tiny_pipeline(), np.zeros((size, size, 3), np.uint8), ["star"],
                       method="fixed", config=ONE_STEP, progress=False)
    r.save(folder)
    return folder


@pytest.mark.parametrize("damage", ["no sidecar", "truncated sidecar", "no mask",
                                    "truncated mask", "no token file", "history of another"])
def test_truncated_corrupt_or_partial_concepts_folders(saved_result, tmp_path, damage):
    folder = tmp_path / "copy"
    shutil.copytree(saved_result, folder)
    side = folder / "concepts.json"
    if damage == "no sidecar":
        side.unlink()
    elif damage == "truncated sidecar":
        side.write_text(side.read_text()[:40])
    elif damage == "no mask":
        (folder / "masks" / "image0_v1.png").unlink()
    elif damage == "truncated mask":
        m = folder / "masks" / "image0_v1.png"
        m.write_bytes(m.read_bytes()[:20])
    elif damage == "no token file":
        (folder / "v1.safetensors").unlink()
    else:
        (folder / "history.json").write_text("{}")
    with pytest.raises((ValueError, FileNotFoundError),
                       match="no learned concepts|truncated or corrupt|incomplete|does not belong"):
        LearnedConcepts.load(folder)


def test_an_intact_concepts_folder_loads(saved_result):
    r = LearnedConcepts.load(saved_result)
    assert r.tokens.names == ["[v1]"] and json.loads((saved_result / "concepts.json").read_text())
