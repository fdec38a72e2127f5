"""Concept learning on the tiny random-weight pipeline: sampling, losses going down,
checkpoints that resume exactly, Ctrl-C, phase 2, history."""

import json

import numpy as np
import pytest
import torch

from conceptlab.concept_files import load_concepts, save_concepts
from conceptlab.shapes import world
from conceptlab.shapes.model import tiny_pipeline
from conceptlab.tokens import embedding_weight, new_concepts
from conceptlab.train import (
    ConceptImage,
    ConceptTrainer,
    TrainConfig,
    TrainingHistory,
    default_attention_layers,
    make_concept_images,
    train_concepts,
)
from conceptlab.unet_delta import unet_change_applied

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def scene():
    return world.render_scene(world.sample_scene(seed=3, n_objects=2), size=32)


def setup(scene, k=2):
    pipe = tiny_pipeline(0)
    concepts = new_concepts(pipe, k, ["circle", "square", None][:k])
    return pipe, concepts, [ConceptImage.from_scene(scene)]


SMALL = TrainConfig(steps=6, lr=5e-2, lambda_attn=0.1, batch_size=2, norm_penalty=0.1,
                    seed=1)


# ----------------------------------------------------------------------------- config and data
def test_config_presets_and_roundtrip():
    b, sd = TrainConfig.for_bundled(), TrainConfig.for_stable_diffusion()
    assert (b.steps, b.batch_size, b.phase2, b.phase2_steps) == (200, 4, "full", 100)
    assert b.total_steps == 300 and TrainConfig.for_bundled(phase2="none").total_steps == 200
    assert (sd.steps, sd.phase2, sd.lora_rank, sd.phase2_steps, sd.lr, sd.phase2_lr,
            sd.lambda_attn) == (400, "lora", 4, 400, 5e-4, 1e-4, 0.01)
    assert sd.total_steps == 800 and TrainConfig.for_bundled(steps=7).steps == 7
    assert TrainConfig.from_dict(json.loads(json.dumps(sd.to_dict()))) == sd
    for bad in ({"phase2": "half"}, {"template": "no slot"}, {"t_range": (5, 5)}):
        with pytest.raises(ValueError):
            TrainConfig(**bad).validate()


def test_concept_image_validation(scene):
    ci = ConceptImage.from_scene(scene, background=True)
    assert ci.masks.shape == (3, 32, 32) and ci.concept_ids == [0, 1, 2]
    with pytest.raises(ValueError, match="2 masks but 1 concept ids"):
        ConceptImage(scene.image, scene.object_masks, [0])
    with pytest.raises(ValueError, match="distinct"):
        ConceptImage(scene.image, scene.object_masks, [1, 1])
    data = make_concept_images([scene.image, scene.image], [scene.object_masks[:1],
                                                            scene.object_masks], [[2], [0, 1]])
    assert [d.concept_ids for d in data] == [[2], [0, 1]]


def test_sampling_spread_concepts_and_errors(scene):
    pipe, concepts, _ = setup(scene, 3)
    m = scene.object_masks
    data = [ConceptImage(scene.image, m, [0, 1]), ConceptImage(scene.image[:, ::-1], m[:1], [2])]
    tr = ConceptTrainer(pipe, data, concepts, SMALL.replace(batch_size=3), progress=False)
    seen = set()
    for _ in range(30):
        samples, noise = tr._sample()
        assert noise.shape == (3, 4, 8, 8)
        for s in samples:
            assert s.subset and set(s.subset) <= set(data[s.image].concept_ids)
            assert len(set(s.subset)) == len(s.subset)
            seen.add(tuple(s.subset))
    assert {(2,), (0,), (1,)} <= seen and ((0, 1) in seen or (1, 0) in seen)
    assert tr.prompts([samples[0]])[0].startswith("a photo of [v")
    assert default_attention_layers(pipe) == tr.layers
    with pytest.raises(ValueError, match=r"concept ids \[5\] outside 0..2"):
        tr.set_data([ConceptImage(scene.image, m[:1], [5])])
    with pytest.raises(ValueError, match="same size"):
        tr.set_data([data[0], ConceptImage(np.zeros((16, 16, 3), np.uint8), m[:1, :16, :16])])
    tr.close()
    assert "[v1]" not in pipe.tokenizer.get_vocab()      # close() took the tokens out again


# ----------------------------------------------------------------------------- learning
def test_losses_go_down_on_a_fixed_evaluation_set(scene):
    pipe, concepts, data = setup(scene)
    cfg = TrainConfig(steps=16, lr=5e-2, lambda_attn=0.1, batch_size=2, t_range=(200, 800),
                      seed=0)
    tr = ConceptTrainer(pipe, data, concepts, cfg, progress=False, attention_every=8)
    before = tr.evaluate(n=8)
    start = concepts.embeddings.clone()
    hist = tr.train()
    after = tr.evaluate(n=8)
    live = embedding_weight(pipe).detach()[tr.token_ids].clone()
    tr.close()
    assert after["loss"] < 0.95 * before["loss"]
    assert after["attention"] < 0.8 * before["attention"]
    assert len(hist) == 16 and hist.attention_steps == [0, 8, 16]
    assert hist.attention_maps[0].shape == (2, 8, 8)
    assert pipe.unet.conv_in.weight.requires_grad    # close() restored the former flags
    assert torch.equal(concepts.embeddings, live) and not torch.equal(live, start)


def test_bce_attention_target_raises_the_tokens_attention_share(scene):
    # attn_target="bce" trains the raw softmax shares towards the masks: inside its mask a
    # token's share must grow (the "max" target cannot see the share's scale at all)
    pipe, concepts, data = setup(scene)
    cfg = TrainConfig(steps=20, lr=0.2, lambda_attn=1.0, batch_size=2, t_range=(200, 800),
                      seed=0, attn_target="bce")
    tr = ConceptTrainer(pipe, data, concepts, cfg, progress=False, attention_every=0)
    samples, noise = tr.evaluation_set(4)
    before = tr.evaluate(4)["attention"]
    for _ in range(20):
        tr.step(samples, noise)
    after = tr.evaluate(4)["attention"]
    tr.close()
    assert after < 0.97 * before            # 0.243 -> 0.228 on this random-weight pipeline
    max_tr = ConceptTrainer(pipe, data, concepts, cfg.replace(attn_target="max"),
                            progress=False, attention_every=0)
    assert abs(max_tr.evaluate(4)["attention"] - after) > 1e-3   # the target reaches the loss
    max_tr.close()
    assert TrainConfig.from_dict(cfg.to_dict()).attn_target == "bce"


def test_masked_diffusion_loss_goes_down_on_a_fixed_batch(scene):
    # A random-weight U-Net barely listens to the text, so with random (t, noise) per step
    # the masked loss moves by less than its noise; on one fixed batch of (t, noise),
    # training the token rows must lower it (this checks loss, hook and optimizer together).
    pipe, concepts, data = setup(scene)
    cfg = TrainConfig(steps=10, lr=1e-2, lambda_attn=0.0, t_range=(200, 800))
    tr = ConceptTrainer(pipe, data, concepts, cfg, progress=False, attention_every=0)
    samples, noise = tr.evaluation_set(4)
    before = tr.evaluate(4)["diffusion"]
    for _ in range(10):
        tr.step(samples, noise)
    assert tr.evaluate(4)["diffusion"] < 0.99 * before
    tr.close()


# ----------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def uninterrupted(scene):
    pipe, concepts, data = setup(scene)
    hist = train_concepts(pipe, data, concepts, SMALL, progress=False, history_every=2,
                          attention_every=3)
    return concepts.embeddings.clone(), hist


def test_resume_from_checkpoint_matches_uninterrupted_run(scene, uninterrupted, tmp_path):
    ref, ref_hist = uninterrupted
    pipe, concepts, data = setup(scene)
    train_concepts(pipe, data, concepts, SMALL.replace(steps=3), progress=False,
                   history_every=2, attention_every=3, checkpoint_dir=tmp_path)
    assert (tmp_path / "checkpoint.pt").exists()
    # a new "process": fresh pipeline and tokens, the checkpoint carries everything else
    pipe2, concepts2, data2 = setup(scene)
    hist = train_concepts(pipe2, data2, concepts2, SMALL, progress=False, history_every=2,
                          attention_every=3, checkpoint_dir=tmp_path)
    assert torch.allclose(concepts2.embeddings, ref, atol=1e-6)
    # the 3-step run closed its history at step 3; the record at 6 covers steps 5-6 in both
    assert hist.steps == [2, 3, 4, 6]
    assert hist.loss[0] == ref_hist.loss[0] and abs(hist.loss[-1] - ref_hist.loss[-1]) < 1e-6
    assert np.allclose(hist.embedding_norms[-1], ref_hist.embedding_norms[-1], atol=1e-5)


def test_keyboard_interrupt_stops_cleanly_and_resumes(scene, uninterrupted, tmp_path):
    ref, _ = uninterrupted
    pipe, concepts, data = setup(scene)
    before = embedding_weight(pipe).detach().clone()

    def interrupt(trainer, logs):
        if trainer.step_count == 3:
            raise KeyboardInterrupt

    hist = train_concepts(pipe, data, concepts, SMALL, progress=False, history_every=2,
                          attention_every=3, checkpoint_dir=tmp_path, callback=interrupt)
    assert hist.interrupted and hist.steps[-1] == 2
    assert torch.equal(embedding_weight(pipe).detach(), before)   # the pipeline as it was
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3
    pipe2, concepts2, data2 = setup(scene)
    hist2 = train_concepts(pipe2, data2, concepts2, SMALL, progress=False, history_every=2,
                           attention_every=3, checkpoint_dir=tmp_path)
    assert not hist2.interrupted and hist2.steps == [2, 4, 6]
    assert torch.allclose(concepts2.embeddings, ref, atol=1e-6)


def test_callback_can_stop_and_trainer_continues(scene, uninterrupted):
    ref, _ = uninterrupted
    pipe, concepts, data = setup(scene)
    tr = ConceptTrainer(pipe, data, concepts, SMALL, progress=False, attention_every=0,
                        callback=lambda trainer, logs: logs["step"] == 2)
    tr.train()
    assert tr.step_count == 2
    tr.callback = None
    tr.train(1)
    tr.set_data(data)                      # e.g. new masks from the E-step (same here)
    tr.train()
    assert tr.step_count == 6
    assert torch.allclose(concepts.embeddings, ref, atol=1e-6)
    tr.close()


# ----------------------------------------------------------------------------- phase 2
def test_phase2_full_trains_unet_and_resumes(scene, tmp_path):
    cfg = SMALL.replace(steps=2, phase2="full", phase2_steps=2, phase2_lr=1e-3, batch_size=1)
    pipe, concepts, data = setup(scene)
    base = {k: v.detach().clone() for k, v in pipe.unet.named_parameters()}
    hist = train_concepts(pipe, data, concepts, cfg, progress=False, attention_every=0)
    assert hist.phase2_start == 2 and concepts.unet.mode == "full"
    w = concepts.unet.weights["conv_in.weight"]
    assert not torch.equal(w, base["conv_in.weight"])
    assert torch.equal(pipe.unet.conv_in.weight, base["conv_in.weight"])   # pipe as it was
    assert pipe.unet.conv_in.weight.requires_grad    # close() restored the former flags
    # interrupted in phase 2 (after step 3), resumed in a fresh pipeline: same result
    p2, c2, d2 = setup(scene)

    def stop(trainer, logs):
        return trainer.step_count == 3

    tr = ConceptTrainer(p2, d2, c2, cfg, progress=False, attention_every=0,
                        checkpoint_dir=tmp_path, callback=stop)
    tr.train()
    tr.close()
    p3, c3, d3 = setup(scene)
    train_concepts(p3, d3, c3, cfg, progress=False, attention_every=0, checkpoint_dir=tmp_path)
    assert torch.allclose(c3.embeddings, concepts.embeddings, atol=1e-6)
    assert torch.allclose(c3.unet.weights["conv_in.weight"], w, atol=1e-6)
    # saved as a diffusers U-Net folder, read back exactly
    save_concepts(c3, tmp_path / "saved")
    assert (tmp_path / "saved" / "unet" / "config.json").exists()
    c4 = load_concepts(tmp_path / "saved")
    assert all(torch.equal(c4.unet.weights[k], v) for k, v in c3.unet.weights.items())


def test_phase2_lora(scene, tmp_path):
    pytest.importorskip("peft")
    cfg = SMALL.replace(steps=1, phase2="lora", phase2_steps=2, phase2_lr=1e-2, batch_size=1)
    pipe, concepts, data = setup(scene)
    train_concepts(pipe, data, concepts, cfg, progress=False, attention_every=0,
                   checkpoint_dir=tmp_path)
    assert concepts.unet.mode == "lora" and concepts.unet.weights
    assert all("lora_" in k for k in concepts.unet.weights)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(1, 32, 32, generator=torch.Generator().manual_seed(1))
    save_concepts(concepts, tmp_path / "saved")
    assert (tmp_path / "saved" / "pytorch_lora_weights.safetensors").exists()
    with torch.no_grad():
        base = pipe.unet(x, 10, emb).sample
        with unet_change_applied(pipe.unet, concepts.unet):
            ref = pipe.unet(x, 10, emb).sample
        p2 = tiny_pipeline(0)
        with unet_change_applied(p2.unet, load_concepts(tmp_path / "saved").unet):
            assert torch.allclose(p2.unet(x, 10, emb).sample, ref, atol=1e-5)
    assert not torch.allclose(base, ref, atol=1e-5)


# ----------------------------------------------------------------------------- history
def test_history_json_and_plots(uninterrupted, tmp_path):
    _, hist = uninterrupted
    assert hist.steps == [2, 4, 6] and len(hist.embedding_norms[0]) == 2
    assert hist.attention_steps == [0, 3, 6] and hist.vocab_norm > 0
    assert all(p.startswith("a photo of ") for p in hist.prompts)
    back = TrainingHistory.from_json(hist.to_json(tmp_path / "h.json"))
    assert back.steps == hist.steps and back.names == ["[v1]", "[v2]"]
    np.testing.assert_allclose(back.attention_maps[1], hist.attention_maps[1], atol=1e-4)
    assert TrainingHistory.from_json(str(tmp_path / "h.json")).loss == back.loss
    import matplotlib.figure
    assert isinstance(hist.plot(), matplotlib.figure.Figure)
    assert isinstance(hist.plot_attention(), matplotlib.figure.Figure)
    assert hist.smoothed("loss", 2).shape == (3,)


def test_for_model_picks_the_preset_by_model_size():
    from conceptlab.shapes.model import tiny_pipeline

    pipe = tiny_pipeline()   # small latents: a "bundled"-kind model
    assert TrainConfig.for_model(pipe) == TrainConfig.for_bundled()
    assert TrainConfig.for_model(pipe, "em").lambda_attn == 0.1
    assert TrainConfig.for_model(pipe, "em", lambda_attn=0.5).lambda_attn == 0.5
    assert TrainConfig.for_model(pipe, "given").lambda_attn == TrainConfig.for_bundled().lambda_attn
    pipe.unet.register_to_config(sample_size=64)   # SD 1.5's latent size
    assert TrainConfig.for_model(pipe, "em") == TrainConfig.for_stable_diffusion()


# ----------------------------------------------------------------------------- half precision
def test_half_precision_pipeline_trains_fp32_masters(scene, tmp_path):
    """A pipeline in fp16 (as load_pipeline makes it on CUDA): phase 1 and phase 2 update
    float32 master copies under autocast, so updates below fp16's resolution accumulate;
    outside a step the pipeline stays fp16, and a checkpoint resumes exactly."""
    cfg = SMALL.replace(steps=2, phase2="full", phase2_steps=6, phase2_lr=2e-6, batch_size=1,
                        lambda_attn=0.1)
    pipe, concepts, data = setup(scene)
    pipe = pipe.to(dtype=torch.float16)
    base = {k: v.detach().clone() for k, v in pipe.unet.named_parameters()}
    seen = []

    def spy(trainer, logs):
        seen.append({p.dtype for p in trainer.pipe.unet.parameters()})
        masters = [trainer.live(p) for p in trainer._trainable()]
        seen[-1] |= {("master", m.dtype) for m in masters}

    tr = ConceptTrainer(pipe, data, concepts, cfg, progress=False, attention_every=0,
                        callback=spy, checkpoint_dir=tmp_path)
    tr.train()
    # between steps: the pipeline in fp16, the masters of what trains in float32
    assert all(torch.float16 in s and torch.float32 not in s for s in seen)
    assert ("master", torch.float32) in seen[-1]
    assert np.isfinite(tr.history.loss).all()
    masters = {k: tr.live(p) for k, p in pipe.unet.named_parameters()}
    moved = np.mean([float((masters[k] != base[k].float()).float().mean()) for k in base])
    rounded = np.mean([float((p != base[k]).float().mean())
                       for k, p in pipe.unet.named_parameters()])
    # 6 AdamW steps of lr 2e-6 move every float32 master, but few fp16 values change:
    # exactly the updates a plain fp16 step would lose
    assert moved > 0.9 and rounded < moved
    tr.close()
    delta = concepts.unet.weights["conv_in.weight"] - base["conv_in.weight"].float()
    assert delta.dtype == torch.float32 and delta.abs().max() < 1e-4 and delta.abs().max() > 0
    # the rows learned in phase 1 stayed float32 underneath; the table rounds them
    w = embedding_weight(pipe)
    assert w.dtype == torch.float16
    # resumed from the checkpoint in a fresh fp16 pipeline: the same masters
    p2, c2, d2 = setup(scene)
    p2 = p2.to(dtype=torch.float16)
    tr2 = ConceptTrainer(p2, d2, c2, cfg, progress=False, attention_every=0,
                         checkpoint_dir=tmp_path)
    assert tr2.step_count == cfg.total_steps
    m2 = {k: tr2.live(p) for k, p in p2.unet.named_parameters()}
    assert all(torch.equal(m2[k], masters[k]) for k in masters)
    tr2.close()


@pytest.mark.parametrize("phase2", ["none", "full"])
def test_gradient_checkpointing_gives_the_same_steps(scene, phase2):
    # the attention loss reads maps recorded inside checkpointed blocks: backward() runs
    # those blocks again, and must run them through the same recording processors
    def run(checkpointing):
        pipe, concepts, data = setup(scene)
        cfg = TrainConfig(steps=2, lr=5e-2, lambda_attn=0.1, batch_size=2, seed=1,
                          phase2=phase2, phase2_steps=2, gradient_checkpointing=checkpointing)
        with ConceptTrainer(pipe, data, concepts, cfg, progress=False,
                            attention_every=0) as tr:
            losses = [tr.step()["loss"] for _ in range(cfg.total_steps)]
            assert pipe.unet.is_gradient_checkpointing == checkpointing
            return losses, tr.embedding.rows().detach().clone()
    (l0, rows0), (l1, rows1) = run(False), run(True)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    torch.testing.assert_close(rows1, rows0, rtol=1e-5, atol=1e-6)
