"""Concept tokens (add, train only their rows, save, load) and generation with them."""

import numpy as np
import pytest
import torch

from conceptlab.generation import generate
from conceptlab.shapes.model import tiny_pipeline
from conceptlab.tokens import (
    ConceptTokens,
    add_concept_tokens,
    embedding_weight,
    load_concepts,
    read_concepts_file,
    save_concepts,
)
from conceptlab.train.embedding import trainable_embedding
from conceptlab.unet_delta import apply_unet_delta, full_unet_delta, unet_state
from conceptlab.viz.figures import image_grid

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture
def pipe():
    return tiny_pipeline(0)


def ids(pipe, text):
    return pipe.tokenizer(text, add_special_tokens=False).input_ids


# ----------------------------------------------------------------------------- adding tokens
def test_add_default_names_single_tokens_and_init(pipe):
    old = embedding_weight(pipe).detach().clone()
    mean_norm = float(old.norm(dim=1).mean())
    c = add_concept_tokens(pipe, 3, ["circle", "person", None])
    assert c.names == ["[v1]", "[v2]", "[v3]"]
    assert len(c) == 3 and c.hidden_size == 32
    assert c.token_ids == list(range(old.shape[0], old.shape[0] + 3))
    for name, i in zip(c.names, c.token_ids):
        assert ids(pipe, name) == [i]
    assert ids(pipe, "a photo of [v2] and [v1]")[-3:] == [c.token_ids[1], ids(pipe, "and")[0],
                                                        c.token_ids[0]]
    w = embedding_weight(pipe).detach()
    assert w.shape == (old.shape[0] + 3, 32)
    assert torch.equal(w[c.token_ids[0]], old[ids(pipe, "circle")[0]])       # one token
    person = ids(pipe, "person")
    assert len(person) > 1                                                  # sub-tokens
    assert torch.allclose(w[c.token_ids[1]], old[person].mean(0))           # init="mean"
    assert w[c.token_ids[2]].norm().item() == pytest.approx(mean_norm, rel=1e-5)  # random
    assert torch.allclose(c.embeddings, w[c.token_ids])
    assert torch.equal(w[: old.shape[0]], old)                               # rest untouched


def test_add_first_init_prefix_and_names(pipe):
    old = embedding_weight(pipe).detach().clone()
    c = add_concept_tokens(pipe, 1, "person", init="first", prefix="w")
    assert c.names == ["[w1]"]
    assert torch.equal(c.embeddings[0], old[ids(pipe, "person")[0]])
    c2 = add_concept_tokens(pipe, ["[dog]", "[cat]"], seed=3)
    assert c2.init_words == [None, None] and c2.prompt() == "a photo of [dog] and [cat]"
    assert c2.prompt([1], template="{} on a beach") == "[cat] on a beach"
    # random rows: seeded directions (seed + k), scaled to the vocabulary's mean norm
    c3 = add_concept_tokens(pipe, ["[a1]", "[a2]"], seed=4)
    assert torch.allclose(c2.embeddings[1] / c2.embeddings[1].norm(),
                          c3.embeddings[0] / c3.embeddings[0].norm())


def test_add_refuses_bad_names_and_init_words(pipe):
    add_concept_tokens(pipe, 1)
    with pytest.raises(ValueError, match=r"'\[v1\]' is already"):
        add_concept_tokens(pipe, 1)
    with pytest.raises(ValueError, match="already"):
        add_concept_tokens(pipe, ["circle"])                 # an ordinary word-token
    with pytest.raises(ValueError, match="tokenises to nothing"):
        add_concept_tokens(pipe, ["[x1]"], ["  "])
    with pytest.raises(ValueError, match="2 init words for 1"):
        add_concept_tokens(pipe, ["[x1]"], ["circle", "star"])
    with pytest.raises(ValueError, match="distinct"):
        add_concept_tokens(pipe, ["[x1]", "[x1]"])
    with pytest.raises(ValueError, match="without spaces"):
        add_concept_tokens(pipe, ["[x 1]"])
    with pytest.raises(ValueError, match="init must be"):
        add_concept_tokens(pipe, ["[x1]"], "circle", init="median")


# ----------------------------------------------------------------------------- training rows only
def test_trainable_embedding_changes_only_concept_rows(pipe):
    c = add_concept_tokens(pipe, 2, ["circle", "square"])
    before = embedding_weight(pipe).detach().clone()
    te = trainable_embedding(pipe, c)
    opt = torch.optim.AdamW([te.parameter], lr=1e-2, weight_decay=0.5)
    text = pipe.tokenizer(["a photo of [v1] and a red circle [v2]"], return_tensors="pt")
    for _ in range(3):
        out = pipe.text_encoder(text.input_ids)[0]
        loss = out.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        grad = te.parameter.grad
        assert grad[c.token_ids].abs().sum() > 0
        others = torch.ones(grad.shape[0], dtype=torch.bool)
        others[c.token_ids] = False
        assert torch.count_nonzero(grad[others]) == 0           # the hook zeroes them
        opt.step()
        te.restore_frozen_rows()
    after = embedding_weight(pipe).detach()
    assert torch.equal(after[others], before[others])          # bit-identical
    assert not torch.equal(after[c.token_ids], before[c.token_ids])
    assert all(not p.requires_grad for n, p in pipe.text_encoder.named_parameters()
               if "token_embedding" not in n)
    te.remove()
    assert not te.parameter.requires_grad


# ----------------------------------------------------------------------------- save / load
def test_save_load_roundtrip_fresh_and_present(pipe, tmp_path):
    c = add_concept_tokens(pipe, 2, ["circle", None])
    with torch.no_grad():
        embedding_weight(pipe)[c.token_ids] += 1.0              # "trained" rows
    save_concepts(c, tmp_path, pipe=pipe)                      # refreshes the snapshot
    emb, meta = read_concepts_file(tmp_path)
    assert meta["names"] == ["[v1]", "[v2]"] and meta["init_words"] == ["circle", None]
    assert meta["hidden_size"] == 32 and meta["conceptlab_version"]
    assert torch.equal(emb, embedding_weight(pipe).detach()[c.token_ids])

    fresh = tiny_pipeline(0)                                   # tokens missing: added
    c2 = load_concepts(fresh, tmp_path)
    assert ids(fresh, "[v2]") == [c2.token_ids[1]]
    assert torch.equal(embedding_weight(fresh).detach()[c2.token_ids], emb)
    # tokens present: their rows are overwritten, nothing is added
    with torch.no_grad():
        embedding_weight(fresh)[c2.token_ids] = 0
    n = len(fresh.tokenizer)
    load_concepts(fresh, tmp_path)
    assert len(fresh.tokenizer) == n
    assert torch.equal(embedding_weight(fresh).detach()[c2.token_ids], emb)


def test_load_refuses_other_hidden_size(pipe, tmp_path):
    other = ConceptTokens(["[v1]"], [None], [0], torch.zeros(1, 16), "some-big-model", 16)
    save_concepts(other, tmp_path)
    with pytest.raises(ValueError, match="trained on 'some-big-model'.*16.*32"):
        load_concepts(pipe, tmp_path)
    with pytest.raises(FileNotFoundError, match="no saved concepts"):
        load_concepts(pipe, tmp_path / "nothing")


def test_unet_delta_saved_and_loaded(pipe, tmp_path):
    c = add_concept_tokens(pipe, 1)
    base = unet_state(pipe.unet)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(0.01)
    c.unet_delta, c.unet_mode = full_unet_delta(pipe.unet, base), "full"
    save_concepts(c, tmp_path, pipe=pipe)
    assert (tmp_path / "unet_delta.safetensors").exists()
    fresh = tiny_pipeline(0)
    load_concepts(fresh, tmp_path)                              # tokens only
    assert torch.equal(dict(fresh.unet.named_parameters())["conv_in.weight"],
                       base["conv_in.weight"])
    fresh2 = tiny_pipeline(0)
    c2 = load_concepts(fresh2, tmp_path, load_unet=True)
    assert c2.unet_mode == "full"
    for k, v in fresh2.unet.named_parameters():
        assert torch.allclose(v, dict(pipe.unet.named_parameters())[k], atol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        apply_unet_delta(fresh2.unet, {"conv_in.weight": torch.zeros(1)})
    c.unet_delta = None
    save_concepts(c, tmp_path)                                  # a stale delta is removed
    assert not (tmp_path / "unet_delta.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="phase 2"):
        load_concepts(tiny_pipeline(0), tmp_path, load_unet=True)


# ----------------------------------------------------------------------------- generation
def test_generate_deterministic_loads_and_checks_tokens(pipe, tmp_path):
    c = add_concept_tokens(pipe, 2, ["circle", "star"])
    a = generate(pipe, c, "a photo of [v1] and [v2]", n=2, seed=5, num_inference_steps=2,
                 output_type="np")
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.uint8
    b = generate(pipe, c, "a photo of [v1] and [v2]", n=1, seed=5, num_inference_steps=2,
                 output_type="np")
    assert np.abs(a[0].astype(int) - b[0].astype(int)).max() <= 1   # image i: seed + i
    assert not np.array_equal(a[0], a[1])
    with pytest.raises(ValueError, match=r"\[v9\].*known concept tokens: \['\[v1\]', '\[v2\]'\]"):
        generate(pipe, c, "a photo of [v9]", n=1, num_inference_steps=1)

    save_concepts(c, tmp_path, pipe=pipe)
    fresh = tiny_pipeline(0)                                    # from a saved folder
    d = generate(fresh, str(tmp_path), "a photo of [v1] and [v2]", n=1, seed=5,
                 num_inference_steps=2, output_type="np")
    assert np.abs(d[0].astype(int) - b[0].astype(int)).max() <= 1
    fresh2 = tiny_pipeline(0)                                   # from ConceptTokens
    ims = generate(fresh2, c, "[v2] on a gray background", n=2, num_inference_steps=1)
    assert len(ims) == 2 and ims[0].size == (32, 32)
    assert c.token_ids == [242, 243]                            # the caller's object untouched
    grid = image_grid(ims + [a[0]], rows=1, captions=["x", "y", "z"], scale=2)
    assert grid.size == (3 * (64 + 2) + 2, 64 + 12 + 2 + 2)
    with pytest.raises(ValueError, match="cannot hold"):
        image_grid(ims, rows=1, cols=1)


def test_vocabulary_mean_norm_ignores_every_added_token():
    from conceptlab.shapes.model import tiny_pipeline
    from conceptlab.tokens import added_token_ids, vocabulary_mean_norm

    pipe = tiny_pipeline()
    base = vocabulary_mean_norm(pipe)
    c = add_concept_tokens(pipe, ["[p1]", "[p2]"], ["star", "circle"])
    assert added_token_ids(pipe.tokenizer) == sorted(c.token_ids)
    w = pipe.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        w[c.token_ids] *= 50          # learned rows of an earlier run, grown large
    assert vocabulary_mean_norm(pipe) == pytest.approx(base)
    assert vocabulary_mean_norm(pipe, c.token_ids) == pytest.approx(base)
