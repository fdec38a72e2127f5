"""conceptlab.attention: recording cross-attention without changing the U-Net."""

import pytest
import torch

from conceptlab.attention import (
    AttentionStore,
    RecordingAttnProcessor,
    cross_attention_layers,
    layer_resolutions,
    record_attention,
)
from conceptlab.shapes.model import tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(0)


def _inputs(pipe, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = pipe.unet.config.sample_size
    z = torch.randn(batch, pipe.unet.config.in_channels, s, s, generator=g)
    t = torch.tensor([10, 500][:batch] + [900] * max(0, batch - 2))
    ids = pipe.tokenizer(["a red star on a gray background"] * batch, padding="max_length",
                         max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    return z, t, ids


def _attn2(pipe):
    return pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2


def test_outputs_unchanged_and_processors_restored(pipe):
    unet = pipe.unet
    z, t, ids = _inputs(pipe)
    before = dict(unet.attn_processors)
    with torch.no_grad():
        emb = pipe.text_encoder(ids)[0]
        ref = unet(z, t, emb).sample
        with record_attention(unet) as store:
            rec = unet(z, t, emb).sample
            inside = unet.attn_processors
        again = unet(z, t, emb).sample
    assert torch.allclose(rec, ref, atol=1e-5, rtol=0)
    assert torch.equal(again, ref)
    assert all(isinstance(inside[n], RecordingAttnProcessor) for n in cross_attention_layers(unet))
    after = unet.attn_processors
    assert after.keys() == before.keys()
    assert all(after[n] is before[n] for n in before)
    assert all(type(after[n]) is type(before[n]) for n in before)
    assert set(store.maps) == set(cross_attention_layers(unet))


def test_processors_restored_after_exception(pipe):
    unet = pipe.unet
    before = dict(unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"), record_attention(unet):
        raise RuntimeError("boom")
    after = unet.attn_processors
    assert all(after[n] is before[n] for n in before)


def test_max_resolution_filters_layers(pipe):
    unet = pipe.unet
    res = layer_resolutions(unet)
    assert sorted(set(res.values())) == [4, 8]  # tiny model: 8x8 and 4x4 cross-attention
    z, t, ids = _inputs(pipe, batch=1)
    with torch.no_grad():
        emb = pipe.text_encoder(ids)[0]
        with record_attention(unet, max_resolution=4) as small:
            unet(z, t, emb)
        with record_attention(unet) as full:
            unet(z, t, emb)
    assert set(small.maps) == {n for n, r in res.items() if r == 4}
    assert set(full.maps) == set(res)
    for name, calls in full.maps.items():
        assert len(calls) == 1
        b, heads, h, w, T = calls[0].shape
        assert (b, h, w, T) == (1, res[name], res[name], ids.shape[1])
        assert heads == unet.config.attention_head_dim  # diffusers: "head_dim" = n heads
    assert full.stacked().shape == (1, 8, 8, ids.shape[1])


def test_keep_graph_gradients_reach_token_embedding(pipe):
    unet, te = pipe.unet, pipe.text_encoder
    z, t, ids = _inputs(pipe, batch=1)
    emb_weight = te.get_input_embeddings().weight
    emb_weight.grad = None
    with record_attention(unet, keep_graph=True) as store:
        unet(z, t, te(ids)[0])
    maps = [c for calls in store.maps.values() for c in calls]
    assert all(m.grad_fn is not None for m in maps)
    loss = sum(m[..., 2].sum() for m in maps)  # attention on token 2 ("red")
    loss.backward()
    assert emb_weight.grad is not None and emb_weight.grad.abs().sum() > 0
    emb_weight.grad = None
    for p in unet.parameters():
        p.grad = None
    for p in te.parameters():
        p.grad = None
    with record_attention(unet, keep_graph=False) as store:
        unet(z, t, te(ids)[0])
    maps = [c for calls in store.maps.values() for c in calls]
    assert maps and not any(m.requires_grad for m in maps)


def test_processor_accepts_extra_arguments(pipe):
    from diffusers.models.attention_processor import AttnProcessor

    attn = _attn2(pipe)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 64, attn.to_q.in_features, generator=g)
    c = torch.randn(2, 7, attn.to_k.in_features, generator=g)
    store = AttentionStore()
    proc = RecordingAttnProcessor(store, "layer")
    with torch.no_grad():
        out = proc(attn, x, c, None, None, "extra-positional", scale=1.0, other=3)
        ref = AttnProcessor()(attn, x, c)
    assert torch.allclose(out, ref, atol=1e-6)
    assert store.maps["layer"][0].shape == (2, attn.heads, 8, 8, 7)
    # self-attention calls (no encoder_hidden_states) are computed but not recorded
    attn1 = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    with torch.no_grad():
        out1 = proc(attn1, x, scale=1.0)
        ref1 = AttnProcessor()(attn1, x)
    assert torch.allclose(out1, ref1, atol=1e-6)
    assert len(store.maps["layer"]) == 1


def test_probabilities_sum_to_one_and_are_not_modified(pipe):
    unet = pipe.unet
    attn = _attn2(pipe)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"
    seen = {}

    def grab(module, args, kwargs):
        seen["x"] = args[0].detach().clone()
        seen["c"] = kwargs["encoder_hidden_states"].detach().clone()

    z, t, ids = _inputs(pipe)
    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            emb = pipe.text_encoder(ids)[0]
            with record_attention(unet) as store:
                unet(z, t, emb)
    finally:
        handle.remove()
    for calls in store.maps.values():
        s = calls[0].sum(-1)
        assert torch.allclose(s, torch.ones_like(s), atol=1e-5)
        assert calls[0].min() >= 0
    stored = store.maps[name][0]  # (B, heads, h, w, T)
    with torch.no_grad():
        q = attn.head_to_batch_dim(attn.to_q(seen["x"]))
        k = attn.head_to_batch_dim(attn.to_k(seen["c"]))
        probs = torch.softmax(q @ k.transpose(1, 2) * attn.scale, -1)
    assert torch.allclose(stored, probs.reshape(stored.shape), atol=1e-6)


def test_layers_argument_and_non_square_latents(pipe):
    unet = pipe.unet
    name = cross_attention_layers(unet)[0]
    g = torch.Generator().manual_seed(2)
    z = torch.randn(1, 4, 8, 12, generator=g)
    ids = pipe.tokenizer("a star", padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        emb = pipe.text_encoder(ids)[0]
        with record_attention(unet, layers=[name], latent_shape=(8, 12)) as store:
            unet(z, torch.tensor([3]), emb)
    assert list(store.maps) == [name]
    assert store.maps[name][0].shape[2:4] == (8, 12)
