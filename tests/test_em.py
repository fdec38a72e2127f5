"""learn_concepts on the tiny random pipeline: shapes, schedules, baselines, resume."""

import numpy as np
import pytest
import torch

from conceptlab.em import learn_concepts
from conceptlab.em_callbacks import GroundTruthIoU, best_order
from conceptlab.estep import MaskConfig, background_index, estimate_masks
from conceptlab.result import LearnedConcepts
from conceptlab.shapes import world
from conceptlab.shapes.model import tiny_pipeline
from conceptlab.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def scene():
    return world.render_scene(world.sample_scene(seed=5, n_objects=2), size=32)


CFG = TrainConfig.for_bundled(steps=6, batch_size=2, phase2="none")
MCFG = MaskConfig(n_timesteps=4)


def test_estimate_masks_disjoint_and_sized():
    pipe = tiny_pipeline()
    sc = scene()
    est = estimate_masks(pipe, sc.image, ["red", "star"], prompt="a red star", config=MCFG)
    assert est.masks.shape == (2, 32, 32) and est.masks.dtype == bool
    assert not (est.masks[0] & est.masks[1]).any()
    assert est.maps.shape[0] == 2


def test_background_concept_takes_every_unclaimed_pixel():
    pipe = tiny_pipeline()
    sc = scene()
    words = ["red", "star", "background"]
    for crf in (False, True):
        cfg = MaskConfig(n_timesteps=4, crf=crf)
        est = estimate_masks(pipe, sc.image, words, prompt="a red star on a background",
                             config=cfg, background=2)
        # the three masks partition the image: objects disjoint, background = the rest
        assert (est.masks.sum(0) == 1).all()
        assert (est.masks_no_crf.sum(0) == 1).all()
        # the objects' masks are those of the assignment without the background's map
        alone = estimate_masks(pipe, sc.image, words[:2], prompt="a red star on a background",
                               config=cfg)
        assert (est.masks[:2] == alone.masks).all()
    with pytest.raises(ValueError, match="background must index"):
        estimate_masks(pipe, sc.image, words, config=MCFG, background=3)


def test_background_index():
    assert background_index(["star", "heart", "background"]) == 2
    assert background_index(["star", "Background"]) == 1
    assert background_index(["star", None]) is None
    assert background_index(["background", "background"]) is None   # ambiguous: none
    assert background_index(["star", "background"], None) is None


def test_em_schedule_history_and_iou():
    pipe = tiny_pipeline()
    sc = scene()
    gt = sc.masks[1:]
    c = learn_concepts(pipe, sc.image, ["shape", "shape"], method="em", config=CFG, em_every=3,
                       mask_config=MCFG, progress=False, callbacks=[GroundTruthIoU(gt)])
    assert c.e_steps == [0, 3, 6]
    assert len(c.iou_history) == 3 and len(c.iou_history[0]) == 2
    assert c.eval_steps == [0, 3, 6]
    assert all(0 <= v <= 1 for row in c.iou_history for v in row)
    assert c.masks[0].shape == (2, 32, 32)
    assert c.latent_masks(pipe)[0].shape == (2, 8, 8)
    assert c.names == ["[v1]", "[v2]"]
    assert len(c.history.steps) > 0


def test_em_alternates_over_phase1_then_phase2_on_the_final_masks():
    pipe = tiny_pipeline()
    sc = scene()
    cfg = CFG.replace(phase2="full", phase2_steps=2, phase2_lr=1e-4)
    c = learn_concepts(pipe, sc.image, ["shape", "shape"], method="em", config=cfg, em_every=3,
                       mask_config=MCFG, progress=False, callbacks=[GroundTruthIoU(sc.masks[1:])])
    assert c.e_steps == [0, 3, 6]                 # E-steps over the 6 token steps only
    assert c.eval_steps == [0, 3, 6, 8]
    assert c.history.steps[-1] == 8 and c.history.phase2_start == 6
    assert c.tokens.unet.mode == "full" and c.tokens.unet.weights


def test_fixed_given_none_baselines():
    sc = scene()
    gt = sc.masks[1:]
    for method in ("fixed", "given", "none"):
        pipe = tiny_pipeline()
        c = learn_concepts(pipe, sc.image, ["shape", None], method=method, config=CFG,
                           em_every=3, mask_config=MCFG, progress=False,
                           masks=[gt] if method == "given" else None)
        assert c.e_steps == [0]
        if method == "given":
            assert (c.masks[0] == gt).all()
        if method == "none":
            assert c.masks[0].all()
    with pytest.raises(ValueError, match="masks"):
        learn_concepts(tiny_pipeline(), sc.image, ["shape"], method="given", config=CFG)
    with pytest.raises(ValueError, match="method"):
        learn_concepts(tiny_pipeline(), sc.image, ["shape"], method="magic")


def _same(a, b):
    assert torch.allclose(a.embeddings, b.embeddings, atol=1e-6)
    assert a.e_steps == b.e_steps
    assert all((x == y).all() for x, y in zip(a.masks, b.masks))
    assert all((x == y).all() for pa, pb in zip(a.mask_history, b.mask_history)
               for x, y in zip(pa, pb))
    assert a.history.steps == b.history.steps


class Killed(Exception):
    """Stands for SIGKILL: nothing is saved on the way out."""


def _run(ck=None, **kw):
    return learn_concepts(tiny_pipeline(), scene().image, ["shape", "shape"],
                          config=CFG.replace(checkpoint_every=2), em_every=3, mask_config=MCFG,
                          progress=False, checkpoint_dir=ck, **kw)


@pytest.fixture(scope="module")
def full_run():
    return _run()


@pytest.mark.parametrize("where", ["e-step", "m-step"])
@pytest.mark.parametrize("how", [Killed, KeyboardInterrupt])
def test_resume_after_kill_or_ctrl_c_equals_uninterrupted(full_run, tmp_path, monkeypatch,
                                                          where, how):
    import conceptlab.estep as em_mod
    from conceptlab.train.trainer import ConceptTrainer

    calls = {"n": 0}
    if where == "e-step":  # the 2nd E-step (step 3) dies half-way
        real = em_mod.estimate_masks

        def dying(*a, **k):
            calls["n"] += 1
            if calls["n"] == 2:
                raise how()
            return real(*a, **k)
        monkeypatch.setattr(em_mod, "estimate_masks", dying)
    else:  # the M-step dies at step 5 (between checkpoints at 4 and 6)
        real_step = ConceptTrainer.step

        def dying_step(self, *a, **k):
            if self.step_count == 4:
                raise how()
            return real_step(self, *a, **k)
        monkeypatch.setattr(ConceptTrainer, "step", dying_step)
    ck = tmp_path / "ck"
    if how is Killed:
        with pytest.raises(Killed):
            _run(ck)
    else:
        with pytest.warns(UserWarning, match="INCOMPLETE"):
            part = _run(ck)
        assert not part.complete
    monkeypatch.undo()
    resumed = _run(ck)
    assert resumed.complete
    _same(resumed, full_run)
    # the same call on the finished folder gives the result again, without training ...
    def no_training(self, *a, **k):
        raise AssertionError("a finished run trained again")
    monkeypatch.setattr(ConceptTrainer, "step", no_training)
    _same(_run(ck), full_run)
    monkeypatch.undo()
    # ... and a different run into it is refused, unless overwrite=True
    with pytest.raises(ValueError, match="another run"):
        _run(ck, seed=1)
    _same(_run(ck, overwrite=True), full_run)


def test_save_load_roundtrip(tmp_path):
    pipe = tiny_pipeline()
    sc = scene()
    c = learn_concepts(pipe, sc.image, ["shape", "shape"], config=CFG, em_every=3,
                       mask_config=MCFG, progress=False)
    c.save(tmp_path / "c")
    d = LearnedConcepts.load(tmp_path / "c")
    assert d.names == c.names and d.e_steps == c.e_steps
    assert (d.masks[0] == c.masks[0]).all()
    assert torch.allclose(d.embeddings, c.embeddings)
    assert len(d.mask_history) == len(c.mask_history)


def test_baselines_track_attention_iou_for_evaluation():
    sc = scene()
    gt = sc.masks[1:]
    c = learn_concepts(tiny_pipeline(), sc.image, ["shape", "shape"], method="given",
                       masks=[gt], config=CFG, em_every=3, mask_config=MCFG, progress=False,
                       callbacks=[GroundTruthIoU([gt])])
    assert c.e_steps == [0] and c.iou_history == [[1.0, 1.0]]  # the given masks are exact
    assert c.eval_steps == [0, 3, 6] and len(c.eval_iou_history) == 3


def test_centered_competition_splits_equal_looking_maps():
    """Two maps that both peak on the right blob, one broader: under "max" the broad one
    wins both blobs (ties go to the first); "centered" gives each token the blob it attends
    to more than it does on average."""
    from conceptlab.estep import competition_scores

    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    left = torch.exp(-((xx - 4) ** 2 + (yy - 8) ** 2) / 8)
    right = torch.exp(-((xx - 12) ** 2 + (yy - 8) ** 2) / 8)
    broad = 0.9 * left + 1.0 * right + 0.3
    narrow = 0.6 * left + 1.0 * right
    maps = torch.stack([broad, narrow])
    s_max = competition_scores(maps, 0.3, "max")
    s_cen = competition_scores(maps, 0.3, "centered")
    assert s_max[:, 8, 4].argmax() == 0 and s_max[:, 8, 12].argmax() == 0
    assert s_cen[:, 8, 4].argmax() == 0 and s_cen[:, 8, 12].argmax() == 1
    assert float(s_cen.min()) >= 0 and float(s_cen.max()) <= 1
    assert torch.equal(competition_scores(maps[:1], 0.3, "centered"), s_max[:1])
    with pytest.raises(ValueError, match="competition"):
        MaskConfig(competition="softmax")


def test_match_gt_scores_tokens_in_their_best_order():
    a = torch.zeros(3, 8, 8, dtype=torch.bool)
    a[0, :4], a[1, 4:], a[2] = True, True, False
    gt = a[[1, 0, 2]]                             # the objects listed the other way round
    assert best_order(a.numpy(), gt.numpy(), ["shape", "shape", "background"],
                       "background") == [1, 0, 2]
    assert best_order(a.numpy(), a.numpy(), ["shape", "shape", "background"],
                       "background") == [0, 1, 2]


def test_fill_empty_concepts_moves_a_separate_region():
    from conceptlab.estep import fill_empty_concepts

    m = np.zeros((2, 12, 12), bool)
    m[0, 1:4, 1:4] = True          # concept 0 holds two separate squares ...
    m[0, 7:11, 7:11] = True
    scores = np.zeros((2, 12, 12), np.float32)
    scores[1, 1:4, 1:4] = 0.9      # ... and concept 1 (empty) attends to the small one more
    scores[1, 7:11, 7:11] = 0.2
    out = fill_empty_concepts(m, scores)
    assert out[1, 1:4, 1:4].all() and not out[1, 7:11, 7:11].any()
    assert out[0, 7:11, 7:11].all() and not out[0, 1:4, 1:4].any()
    assert (out.sum(0) == m.sum(0)).all()      # the same pixels, only the holder changed
    one = np.zeros((2, 12, 12), bool)
    one[0, 2:9, 2:9] = True        # a single region: nothing to give away
    assert (fill_empty_concepts(one, scores) == one).all()
    # a sliver of 6 pixels is not empty by the default count (4) but is by EM's guard
    # (estimate_masks passes empty_pixels = min_fraction of the image): then it takes a region
    sliver = m.copy()
    sliver[1, 5, 0:6] = True
    assert (fill_empty_concepts(sliver, scores) == sliver).all()
    filled = fill_empty_concepts(sliver, scores, empty_pixels=8)
    assert filled[1, 1:4, 1:4].all() and filled[1, 5, 0:6].all()


def test_assignment_error_is_deterministic_and_finite():
    from conceptlab.experimental import assignment_error

    pipe = tiny_pipeline()
    sc = scene()
    c = learn_concepts(pipe, sc.image, ["shape", "shape"], method="em", config=CFG, em_every=3,
                       mask_config=MCFG, progress=False)
    m = c.masks[0]
    with c.applied(pipe):
        e = assignment_error(pipe, sc.image, c.names, m)
        assert np.isfinite(e) and e >= 0
        assert assignment_error(pipe, sc.image, c.names, m) == e            # deterministic
        assert np.isfinite(assignment_error(pipe, sc.image, c.names, m[::-1].copy()))


def test_defaults_follow_how_the_tokens_start():
    """Class words: the paper's max-normalised loss and the "max" rule; one repeated word or
    random rows: the BCE loss and the "centered" rule (measured best in that setting)."""
    from conceptlab.em import choose_configs

    pipe = tiny_pipeline()
    cfg, mcfg = choose_configs(pipe, ["star", "heart", "background"], "em", None, None, None, 0)
    assert (cfg.attn_target, mcfg.competition, mcfg.temperature) == ("max", "max", 0.1)
    for words in (["shape", "shape", "background"], [None, None, "background"], ["star", None]):
        cfg, mcfg = choose_configs(pipe, words, "em", None, None, None, 0)
        assert (cfg.attn_target, mcfg.competition, mcfg.temperature) == ("bce", "centered", 0.3)
    mine = MaskConfig(competition="max")
    assert choose_configs(pipe, ["shape", "shape"], "em", None, mine, None, 0)[1] is mine
    cfg, _ = choose_configs(pipe, ["shape", "shape"], "em", None, None, 30, 0)
    assert (cfg.steps, cfg.phase2_steps) == (20, 10)   # steps: the whole run, split 2:1
