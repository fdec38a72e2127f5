"""conceptlab.maps: per-word cross-attention maps of a real image."""

import json
import typing
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conceptlab.attention import cross_attention_layers, layer_resolutions
from conceptlab.maps import (
    AttentionMaps,
    attention_maps,
    default_attention_config,
    resolve_layers,
    sequential_attention_maps,
    word_occurrences,
    word_token_indices,
)
from conceptlab.models import latent_size, native_size
from conceptlab.shapes import world
from conceptlab.shapes.model import tiny_pipeline

N_T = 6


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(0)


@pytest.fixture(scope="module")
def scene():
    return world.render_scene(world.sample_scene(seed=0, n_objects=2), size=32)


@pytest.fixture(scope="module")
def maps(pipe, scene):
    return attention_maps(pipe, scene.image, scene.caption, n_timesteps=N_T, seed=0)


def _swap_unet(pipe, unet):
    from diffusers import StableDiffusionPipeline

    comps = dict(pipe.components, unet=unet)
    p = StableDiffusionPipeline(**comps)
    p.set_progress_bar_config(disable=True)
    return p


# ----------------------------------------------------------------------------- basics
def test_native_size_and_defaults(pipe):
    assert native_size(pipe) == 32 and latent_size(pipe) == (8, 8)
    cfg = default_attention_config(pipe)
    assert set(cfg) == {"layers", "t_range"}
    res = layer_resolutions(pipe.unet)
    assert cfg["layers"] and all(res[n] == 8 for n in cfg["layers"])  # largest <= 16
    assert cfg["layers"] == [n for n in res if res[n] == 8]
    assert cfg["t_range"] == (0, 1000)


def test_for_word_shape_range(maps, scene):
    shape = scene.words[0][1]
    assert isinstance(maps, AttentionMaps)
    assert maps.resolution == 8 and maps.shape == (8, 8)
    m = maps.for_word(shape)
    assert m.shape == (8, 8) and m.dtype == torch.float32
    assert m.min() == 0 and m.max() == 1
    up = maps.for_word(shape, size=(32, 32))
    assert up.shape == (32, 32) and up.min() >= 0 and up.max() <= 1
    raw = maps.for_word(shape, normalize=False)
    assert raw.min() > 0 and raw.max() < 1 and not torch.allclose(raw, m)
    # the normalised map is the min-max scaled raw map
    assert torch.allclose(m, (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-6)


def test_tokens_words_shapes(maps, pipe, scene):
    T = pipe.tokenizer.model_max_length
    assert maps.tokens[0] == "<|startoftext|>" and len(maps.tokens) == T
    assert "<|endoftext|>" in maps.tokens
    assert not any(t.endswith("</w>") for t in maps.tokens)
    assert maps.words == scene.caption.split()
    assert maps.prompt == scene.caption
    assert maps.timesteps.shape == (N_T,) and torch.all(maps.timesteps[1:] >= maps.timesteps[:-1])
    L = len(maps.layers)
    assert maps.raw.shape == (N_T, L, 8, 8, T)
    s = maps.raw.sum(-1)
    assert torch.allclose(s, torch.ones_like(s), atol=1e-5)
    w = scene.words[0][1]
    assert maps.per_timestep(w).shape == (N_T, 8, 8)
    assert set(maps.per_layer(w)) == set(maps.layers)
    ck = maps.concept_maps([scene.words[0][1], scene.words[1][1], 1])
    assert ck.shape == (3, 8, 8)
    assert torch.allclose(ck[0], maps.for_word(scene.words[0][1], normalize=False))
    assert torch.allclose(ck[2], maps.for_token(1, normalize=False))
    # for_token of a word's position == raw tensor averaged by hand
    i = maps.word_indices(w)[0]
    assert torch.allclose(maps.for_token(i, normalize=False), maps.raw[..., i].mean((0, 1)),
                          atol=1e-6)


def test_absent_word(maps):
    with pytest.raises(ValueError, match="zebra") as e:
        maps.for_word("zebra")
    assert "background" in str(e.value)  # lists the prompt's words


def test_wrong_image_size(pipe, scene):
    big = world.render_scene(scene.spec, size=64).image
    with pytest.raises(ValueError, match="32x32"):
        attention_maps(pipe, big, scene.caption, n_timesteps=1)
    with pytest.warns(UserWarning, match="resiz"):
        m = attention_maps(pipe, big, scene.caption, n_timesteps=1, resize=True)
    assert m.for_word(scene.words[0][1]).shape == (8, 8)


def test_image_types_agree(pipe, scene, maps):
    a = attention_maps(pipe, Image.fromarray(scene.image), scene.caption, n_timesteps=N_T)
    b = attention_maps(pipe, torch.from_numpy(scene.image), scene.caption, n_timesteps=N_T)
    assert torch.equal(a.raw, maps.raw) and torch.equal(b.raw, maps.raw)


# ----------------------------------------------------------------------------- words
def test_multi_token_word(pipe, scene):
    tok = pipe.tokenizer
    prompt = "a zebra and a red star"
    assert len(tok("zebra", add_special_tokens=False).input_ids) > 1  # not a world word
    idx = word_token_indices(tok, prompt, "zebra")
    assert len(idx) > 1 and idx == list(range(idx[0], idx[0] + len(idx))) and idx[0] == 2
    # "a" must not match the last piece ("a</w>") of "zebra"
    assert word_token_indices(tok, prompt, "a") == [1, idx[-1] + 2]
    assert word_token_indices(tok, prompt, "red star") == [idx[-1] + 3, idx[-1] + 4]
    m = attention_maps(pipe, scene.image, prompt, n_timesteps=2)
    assert "zebra" in m.words
    avg = torch.stack([m.for_token(i, normalize=False) for i in idx]).mean(0)
    assert torch.allclose(m.for_word("zebra", normalize=False), avg, atol=1e-6)
    assert torch.allclose(m.for_token(idx, normalize=False), avg, atol=1e-6)


def test_repeated_word(pipe, scene):
    prompt = "a red star and a red circle"
    occ = word_occurrences(pipe.tokenizer, prompt, "red")
    assert occ == [[2], [6]]
    m = attention_maps(pipe, scene.image, prompt, n_timesteps=2)
    first = m.for_word("red", occurrence=0, normalize=False)
    second = m.for_word("red", occurrence=1, normalize=False)
    assert torch.allclose(first, m.for_token(2, normalize=False))
    assert torch.allclose(m.for_word("red", normalize=False), (first + second) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="occurrence"):
        m.for_word("red", occurrence=2)


def test_truncation_warns(pipe, scene):
    long = " ".join(["a red star"] * 15)
    with pytest.warns(UserWarning, match="truncated"):
        m = attention_maps(pipe, scene.image, long, n_timesteps=1)
    assert len(m.tokens) == pipe.tokenizer.model_max_length


# ----------------------------------------------------------------------------- computation
def test_determinism(pipe, scene, maps):
    again = attention_maps(pipe, scene.image, scene.caption, n_timesteps=N_T, seed=0)
    assert torch.equal(again.timesteps, maps.timesteps) and torch.equal(again.raw, maps.raw)
    other = attention_maps(pipe, scene.image, scene.caption, n_timesteps=N_T, seed=1)
    assert not torch.allclose(other.raw, maps.raw)
    g = torch.Generator().manual_seed(0)
    gen = attention_maps(pipe, scene.image, scene.caption, n_timesteps=N_T, generator=g)
    assert torch.equal(gen.raw, maps.raw)


def test_batched_equals_sequential(pipe, scene, maps):
    seq = sequential_attention_maps(pipe, scene.image, scene.caption, n_timesteps=N_T, seed=0)
    assert torch.equal(seq.timesteps, maps.timesteps)
    assert torch.allclose(seq.raw, maps.raw, atol=1e-5, rtol=0)
    chunked = attention_maps(pipe, scene.image, scene.caption, n_timesteps=N_T, seed=0,
                             batch_size=4)
    assert torch.allclose(chunked.raw, maps.raw, atol=1e-5, rtol=0)


def test_t_range_and_timestep_selection(pipe, scene):
    m = attention_maps(pipe, scene.image, scene.caption, n_timesteps=5, t_range=(100, 300))
    assert m.timesteps.min() >= 100 and m.timesteps.max() < 300
    w = scene.words[0][1]
    assert torch.allclose(m.for_word(w, timesteps=[0], normalize=False),
                          m.per_timestep(w)[0], atol=1e-6)
    with pytest.raises(ValueError, match="no timestep"):
        m.for_word(w, t_range=(900, 1000))
    with pytest.raises(ValueError, match="t_range"):
        attention_maps(pipe, scene.image, scene.caption, n_timesteps=1, t_range=(500, 500))


# ----------------------------------------------------------------------------- layers
def test_layer_selection(pipe, scene):
    unet = pipe.unet
    res = layer_resolutions(unet)
    names = cross_attention_layers(unet)
    assert resolve_layers(unet, "all") == names
    assert resolve_layers(unet, [4]) == [n for n in names if res[n] == 4]
    assert resolve_layers(unet, ["resolution:8"]) == [n for n in names if res[n] == 8]
    assert resolve_layers(unet, ["mid_block"]) == [n for n in names if n.startswith("mid_block")]
    assert resolve_layers(unet, [names[0].removesuffix(".processor")]) == [names[0]]
    with pytest.raises(ValueError, match="resolution 16"):
        resolve_layers(unet, [16])
    with pytest.raises(ValueError, match="nope"):
        resolve_layers(unet, ["nope"])
    m = attention_maps(pipe, scene.image, scene.caption, n_timesteps=2, layers="all")
    assert m.layers == names and m.resolution == 8
    assert {n: m.layer_resolution[n] for n in names} == res
    w = scene.words[0][1]
    per = m.per_layer(w)
    assert all(per[n].shape == (res[n], res[n]) for n in names)
    low = m.for_word(w, layers=[4], normalize=False)  # 4x4 layers upsampled to 8x8
    assert low.shape == (8, 8)
    m4 = attention_maps(pipe, scene.image, scene.caption, n_timesteps=2, layers=[4])
    assert m4.resolution == 4 and m4.for_word(w).shape == (4, 4)


def test_unet_with_blocks_without_cross_attention(pipe, scene):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    cfg = pipe.unet.config
    unet = UNet2DConditionModel(
        sample_size=cfg.sample_size, in_channels=4, out_channels=4, block_out_channels=(16, 32),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=2, norm_num_groups=16)
    p = _swap_unet(pipe, unet)
    names = cross_attention_layers(unet)
    res = layer_resolutions(unet)
    blocks = {".".join(n.split(".")[:2]) for n in names if not n.startswith("mid_block")}
    assert blocks == {"down_blocks.0", "up_blocks.1"}
    assert res == {n: (4 if n.startswith("mid_block") else 8) for n in names}
    cfg_default = default_attention_config(p)
    assert cfg_default["layers"] == [n for n in names if res[n] == 8]
    m = attention_maps(p, scene.image, scene.caption, n_timesteps=2, layers="all")
    assert m.layers == names
    # the recorded shapes confirm layer_resolutions
    assert all(m.layer_maps[n].shape[1:3] == (res[n], res[n]) for n in names)
    assert m.for_word(scene.words[1][1]).shape == (8, 8)


def test_sd_sized_default_is_16x16():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=64, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=8,
        attention_head_dim=2, norm_num_groups=4)

    class FakePipe:  # default_attention_config only reads the U-Net, scheduler and path
        name_or_path = None
        config: typing.ClassVar[dict] = {}
        scheduler = type("S", (), {"config": {"num_train_timesteps": 1000}})()

    FakePipe.unet = unet
    cfg = default_attention_config(FakePipe())
    res = layer_resolutions(unet)
    assert cfg["layers"] and all(res[n] == 16 for n in cfg["layers"])
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in cfg["layers"]} == \
        {"down_blocks.2", "up_blocks.1"}  # SD's 16x16 layers
    assert cfg["t_range"] == (0, 1000)


def test_config_file_in_pipeline_folder(pipe, scene, tmp_path):
    names = cross_attention_layers(pipe.unet)
    (tmp_path / "conceptlab.json").write_text(json.dumps(
        {"attention_layers": ["resolution:4", names[0]], "attention_t_range": [100, 600]}))
    p = _swap_unet(pipe, pipe.unet)
    p.register_to_config(_name_or_path=str(tmp_path))
    assert p.name_or_path == str(tmp_path)
    res = layer_resolutions(pipe.unet)
    cfg = default_attention_config(p)
    assert cfg["t_range"] == (100, 600)
    assert cfg["layers"] == [n for n in names if res[n] == 4 or n == names[0]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = attention_maps(p, np.asarray(scene.image), scene.caption, n_timesteps=3)
    assert m.layers == cfg["layers"]
    assert m.timesteps.min() >= 100 and m.timesteps.max() < 600
