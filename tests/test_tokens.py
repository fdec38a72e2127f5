"""Concept tokens: new rows, applied to a pipeline only while used, trained rows only, the
standard files, and generation with them."""

import numpy as np
import pytest
import torch

from conceptlab.concept_files import load_concepts, read_sidecar, save_concepts
from conceptlab.generation import generate
from conceptlab.shapes.model import tiny_pipeline
from conceptlab.tokens import ConceptTokens, embedding_weight, new_concepts
from conceptlab.train.embedding import trainable_embedding
from conceptlab.unet_delta import UNetChange, lora_config, unet_change_applied
from conceptlab.viz.figures import image_grid

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture
def pipe():
    return tiny_pipeline(0)


def ids(pipe, text):
    return pipe.tokenizer(text, add_special_tokens=False).input_ids


def state(pipe):
    return ({k: v.clone() for k, v in pipe.text_encoder.state_dict().items()},
            {k: v.clone() for k, v in pipe.unet.state_dict().items()},
            dict(pipe.tokenizer.get_vocab()))


def assert_same(pipe, before):
    te, unet, vocab = before
    now = state(pipe)
    assert now[2] == vocab
    for old, new in ((te, now[0]), (unet, now[1])):
        assert old.keys() == new.keys()
        assert all(torch.equal(old[k], new[k]) for k in old)


# ----------------------------------------------------------------------------- new concepts
def test_new_concepts_rows_from_words_and_the_pipeline_unchanged(pipe):
    before = state(pipe)
    old = embedding_weight(pipe).detach().clone()
    mean_norm = float(old.norm(dim=1).mean())
    c = new_concepts(pipe, 3, ["circle", "person", None])
    assert_same(pipe, before)
    assert c.names == ["[v1]", "[v2]", "[v3]"] and len(c) == 3 and c.hidden_size == 32
    assert torch.equal(c.embeddings[0], old[ids(pipe, "circle")[0]])          # one token
    person = ids(pipe, "person")
    assert len(person) > 1 and torch.allclose(c.embeddings[1], old[person].mean(0))
    assert c.embeddings[2].norm().item() == pytest.approx(mean_norm, rel=1e-5)   # random


def test_new_concepts_first_init_prefix_and_seeded_random_rows(pipe):
    old = embedding_weight(pipe).detach().clone()
    c = new_concepts(pipe, 1, "person", init="first", prefix="w")
    assert c.names == ["[w1]"] and torch.equal(c.embeddings[0], old[ids(pipe, "person")[0]])
    c2 = new_concepts(pipe, ["[dog]", "[cat]"], seed=3)
    assert c2.init_words == [None, None] and c2.prompt() == "a photo of [dog] and [cat]"
    assert c2.prompt([1], template="{} on a beach") == "[cat] on a beach"
    c3 = new_concepts(pipe, ["[a1]", "[a2]"], seed=4)   # seed + k: c2's row 1 is c3's row 0
    assert torch.allclose(c2.embeddings[1], c3.embeddings[0])


def test_new_concepts_refuses_bad_names_and_init_words(pipe):
    with pytest.raises(ValueError, match="bracket"):
        new_concepts(pipe, ["circle"])                 # an ordinary word-token
    with pytest.raises(ValueError, match="bracket"):
        new_concepts(pipe, ["stars"])                  # would match inside "superstars"
    with pytest.raises(ValueError, match="already a token"):
        new_concepts(pipe, ["<|endoftext|>"])          # a special token of the vocabulary
    with pytest.raises(ValueError, match="tokenises to nothing"):
        new_concepts(pipe, ["[x1]"], ["  "])
    with pytest.raises(ValueError, match="2 init words for 1"):
        new_concepts(pipe, ["[x1]"], ["circle", "star"])
    with pytest.raises(ValueError, match="distinct"):
        new_concepts(pipe, ["[x1]", "[x1]"])
    with pytest.raises(ValueError, match="without spaces"):
        new_concepts(pipe, ["[x 1]"])
    with pytest.raises(ValueError, match="init must be"):
        new_concepts(pipe, ["[x1]"], "circle", init="median")


# ----------------------------------------------------------------------------- applied
def test_applied_adds_single_tokens_and_rows_then_restores(pipe):
    before = state(pipe)
    table = embedding_weight(pipe).detach().clone()
    V = table.shape[0]
    c = new_concepts(pipe, 2, ["circle", "star"])
    with c.applied(pipe) as tid:
        assert tid == [V, V + 1]
        assert ids(pipe, "a photo of [v2] and [v1]")[-3:] == [tid[1], ids(pipe, "and")[0], tid[0]]
        w = embedding_weight(pipe).detach()
        assert torch.equal(w[tid], c.embeddings) and torch.equal(w[:V], table)
        with c.applied(pipe) as again:                 # nested: nothing more is added
            assert again == tid and embedding_weight(pipe).shape[0] == V + 2
        other = new_concepts(pipe, ["[o1]"])
        with other.applied(pipe) as o:                # another set beside it
            assert o == [V + 2]
        clash = ConceptTokens(["[v1]"], [None], torch.zeros(1, 32))
        with pytest.raises(ValueError, match="other concepts named"), clash.applied(pipe):
            pass
    assert_same(pipe, before)


def test_applied_refuses_another_hidden_size_and_model(pipe):
    big = ConceptTokens(["[v1]"], [None], torch.zeros(1, 16), "some-big-model")
    with pytest.raises(ValueError, match="'some-big-model'.*16.*32"), big.applied(pipe):
        pass
    other = ConceptTokens(["[v1]"], [None], torch.zeros(1, 32), "other/model")
    with pytest.raises(ValueError, match="learned on 'other/model'"), other.applied(pipe):
        pass


def test_trainable_embedding_changes_only_concept_rows(pipe):
    c = new_concepts(pipe, 2, ["circle", "square"])
    with c.applied(pipe) as tid:
        before = embedding_weight(pipe).detach().clone()
        te = trainable_embedding(pipe, tid)
        opt = torch.optim.AdamW([te.parameter], lr=1e-2, weight_decay=0.5)
        text = pipe.tokenizer(["a photo of [v1] and a red circle [v2]"], return_tensors="pt")
        others = torch.ones(before.shape[0], dtype=torch.bool)
        others[tid] = False
        for _ in range(3):
            loss = pipe.text_encoder(text.input_ids)[0].pow(2).mean()
            opt.zero_grad()
            loss.backward()
            assert te.parameter.grad[tid].abs().sum() > 0
            assert torch.count_nonzero(te.parameter.grad[others]) == 0   # the hook zeroes them
            opt.step()
            te.restore_frozen_rows()
        after = embedding_weight(pipe).detach()
        assert torch.equal(after[others], before[others])               # bit-identical
        assert not torch.equal(after[tid], before[tid])
        te.remove()
        assert not te.parameter.requires_grad


# ----------------------------------------------------------------------------- U-Net changes
def test_full_and_lora_changes_apply_and_undo_exactly(pipe):
    before = state(pipe)
    trained = {k: v.detach() + 0.01 for k, v in pipe.unet.named_parameters()}
    with unet_change_applied(pipe.unet, UNetChange("full", trained)):
        assert all(torch.equal(v, trained[k]) for k, v in pipe.unet.named_parameters())
    assert_same(pipe, before)
    misfit = UNetChange("full", {"conv_in.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="do not fit"), unet_change_applied(pipe.unet, misfit):
        pass
    from peft.utils import get_peft_model_state_dict

    from conceptlab.unet_delta import lora_applied

    with lora_applied(pipe.unet, lora_config(2)):
        lora = {k: v + 0.5 for k, v in get_peft_model_state_dict(
            pipe.unet, adapter_name="conceptlab").items()}
    assert_same(pipe, before)
    with unet_change_applied(pipe.unet, UNetChange("lora", lora, lora_config(2))):
        got = get_peft_model_state_dict(pipe.unet, adapter_name="conceptlab")
        assert all(torch.equal(got[k], lora[k]) for k in lora)
    assert_same(pipe, before)
    with pytest.raises(ValueError, match="NaN"):
        UNetChange("full", {"w": torch.tensor([float("nan")])})


# ----------------------------------------------------------------------------- files
def test_save_load_round_trip(pipe, tmp_path):
    c = new_concepts(pipe, 2, ["circle", None])
    c.embeddings = c.embeddings + 1.0                                    # "trained" rows
    save_concepts(c, tmp_path)
    side = read_sidecar(tmp_path)
    assert [t["token"] for t in side["tokens"]] == ["[v1]", "[v2]"]
    assert [t["init_word"] for t in side["tokens"]] == ["circle", None]
    assert side["hidden_size"] == 32 and side["conceptlab_version"]
    c2 = load_concepts(tmp_path)
    assert c2.names == c.names and torch.equal(c2.embeddings, c.embeddings)
    assert c2.base_model == c.base_model and c2.unet is None
    c3 = load_concepts(tmp_path, prefix="w")
    assert c3.names == ["[w1]", "[w2]"]
    with pytest.raises(FileNotFoundError, match="no concepts"):
        load_concepts(tmp_path / "nothing")


# ----------------------------------------------------------------------------- generation
def test_generate_deterministic_from_folder_and_checks_tokens(pipe, tmp_path):
    before = state(pipe)
    c = new_concepts(pipe, 2, ["circle", "star"])
    a = generate(pipe, c, "a photo of [v1] and [v2]", n=2, seed=5, num_inference_steps=2,
                 output_type="np")
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.uint8
    b = generate(pipe, c, "a photo of [v1] and [v2]", n=1, seed=5, num_inference_steps=2,
                 output_type="np")
    assert np.abs(a[0].astype(int) - b[0].astype(int)).max() <= 1   # image i: seed + i
    assert not np.array_equal(a[0], a[1])
    with pytest.raises(ValueError, match=r"\[v9\].*known concept tokens: \['\[v1\]', '\[v2\]'\]"):
        generate(pipe, c, "a photo of [v9]", n=1, num_inference_steps=1)
    save_concepts(c, tmp_path)
    d = generate(tiny_pipeline(0), str(tmp_path), "a photo of [v1] and [v2]", n=1, seed=5,
                 num_inference_steps=2, output_type="np")
    assert np.abs(d[0].astype(int) - b[0].astype(int)).max() <= 1
    ims = generate(pipe, c, "[v2] on a gray background", n=2, num_inference_steps=1)
    assert len(ims) == 2 and ims[0].size == (32, 32)
    assert_same(pipe, before)
    grid = image_grid(ims + [a[0]], rows=1, captions=["x", "y", "z"], scale=2)
    assert grid.size == (3 * (64 + 2) + 2, 64 + 12 + 2 + 2)
    with pytest.raises(ValueError, match="cannot hold"):
        image_grid(ims, rows=1, cols=1)


def test_vocabulary_mean_norm_ignores_every_added_token(pipe):
    from conceptlab.tokens import added_token_ids, vocabulary_mean_norm

    base = vocabulary_mean_norm(pipe)
    c = new_concepts(pipe, ["[p1]", "[p2]"], ["star", "circle"])
    c.embeddings = c.embeddings * 50          # learned rows, grown large
    with c.applied(pipe) as tid:
        assert added_token_ids(pipe.tokenizer) == sorted(tid)
        assert vocabulary_mean_norm(pipe) == pytest.approx(base)
        assert vocabulary_mean_norm(pipe, tid) == pytest.approx(base)


def test_generate_in_batches_and_refuses_runaway_guidance(pipe):
    """Large n goes through the model in batches (memory flat in n), with the same images;
    guidance inf or 1e30 is refused instead of drawing black images."""
    a = generate(pipe, None, "a red star", n=3, num_inference_steps=2, output_type="np")
    b = generate(pipe, None, "a red star", n=3, num_inference_steps=2, output_type="np",
                 batch_size=2)
    assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1
    for bad in (float("inf"), 1e30, float("nan"), -1.0):
        with pytest.raises(ValueError, match="guidance_scale"):
            generate(pipe, None, "a red star", n=1, guidance_scale=bad)
    with pytest.raises(ValueError, match="batch_size"):
        generate(pipe, None, "a red star", n=1, batch_size=0)
