"""conceptlab.discovery: the number of concepts and their masks, with no words given.

The choice of K and the matching of similar concepts are checked on synthetic inputs
(pure numpy, where the right answer is known); the whole method on the bundled model with
easy generated scenes; shapes, determinism, errors and the untouched model on tiny models.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from conceptlab.discovery import (
    METHODS,
    ConceptMatch,
    Discovery,
    choose_k,
    cluster_cells,
    discover_concepts,
    merge_tree,
    probe_words,
    similar_concepts,
    symmetric_kl,
)
from conceptlab.shapes import world

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- synthetic
def regions(h=12, w=12):
    """(h, w) ground-truth labels: a background (0), a square (1) and a disc (2)."""
    lab = np.zeros((h, w), np.int64)
    lab[2:6, 2:6] = 1
    yy, xx = np.mgrid[0:h, 0:w]
    lab[(yy - 8) ** 2 + (xx - 8) ** 2 <= 5] = 2
    return lab


def synthetic_features(lab, d=10, noise=0.1, seed=0):
    """Distributions over d outcomes: each region peaks on its own outcomes, plus noise."""
    rng = np.random.default_rng(seed)
    protos = np.full((lab.max() + 1, d), 0.2)
    for k in range(lab.max() + 1):
        protos[k, 3 * k:3 * k + 3] = 5.0
    f = protos[lab.ravel()] * np.exp(noise * rng.standard_normal((lab.size, d)))
    return f / f.sum(1, keepdims=True)


def same_partition(a, b) -> bool:
    a, b = np.ravel(a), np.ravel(b)
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_symmetric_kl_is_a_symmetric_divergence():
    p = np.array([[0.5, 0.5], [0.9, 0.1], [0.5, 0.5]])
    d = symmetric_kl(p)
    assert d.shape == (3, 3)
    assert np.allclose(d, d.T) and np.allclose(np.diag(d), 0) and (d >= 0).all()
    assert d[0, 2] == pytest.approx(0, abs=1e-12)
    kl01 = float((p[0] * np.log(p[0] / p[1])).sum())
    kl10 = float((p[1] * np.log(p[1] / p[0])).sum())
    assert d[0, 1] == pytest.approx((kl01 + kl10) / 2, rel=1e-6)
    assert symmetric_kl([[2.0, 2.0]], [[1.0, 1.0]])[0, 0] == pytest.approx(0, abs=1e-12)


def test_symmetric_kl_refuses_bad_rows():
    with pytest.raises(ValueError, match="non-negative"):
        symmetric_kl([[0.5, -0.5]])
    with pytest.raises(ValueError, match="different lengths"):
        symmetric_kl([[1.0, 0.0]], [[1.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match=r"\(n, D\)"):
        symmetric_kl(np.ones(3))


def test_choose_k_cuts_before_the_first_large_merge():
    merges = np.array([[0, 1, 0.1], [2, 3, 0.1], [0, 2, 0.2], [4, 5, 0.9], [0, 4, 1.0]])
    assert choose_k(merges, 0.5) == 3          # 6 cells, three merges below 0.5
    assert choose_k(merges, 0.95) == 2
    assert choose_k(merges, 1.0) == 1
    assert choose_k(merges, 0.05) == 6


def test_merge_tree_merges_touching_clusters_only():
    lab = regions()
    tree = merge_tree(synthetic_features(lab), lab.shape)
    assert tree.shape == (lab.size - 1, 3)
    d = tree[:, 2]
    # the two last merges join the three regions, far above every merge inside a region
    assert d[-2:].min() > 5 * d[:-2].max()


@pytest.mark.parametrize("noise", [0.05, 0.3])
def test_agglomerative_finds_three_regions(noise):
    lab = regions()
    got, per_k, scores = cluster_cells(synthetic_features(lab, noise=noise), lab.shape)
    assert got.max() + 1 == 3
    assert same_partition(got, lab)
    assert set(per_k) == set(range(1, 9)) and same_partition(per_k[3], lab)
    assert scores.max() == pytest.approx(1.0) and len(scores) == lab.size - 1


def test_agglomerative_keeps_two_regions_with_the_same_look_apart():
    """Two separate squares with the same features are two concepts for the grid-connected
    tree only if they never touch: here they merge through nothing, so they stay apart
    until the background joins them."""
    lab = regions()
    twin = np.where(lab == 2, 1, lab)          # the disc looks like the square
    got, _, _ = cluster_cells(synthetic_features(twin), lab.shape, threshold=0.5)
    assert got.max() + 1 == 3 and same_partition(got, lab)


def test_spectral_eigengap_finds_three_well_separated_regions():
    lab = regions()
    got, _, scores = cluster_cells(synthetic_features(lab, noise=0.05), lab.shape,
                                   method="spectral")
    assert got.max() + 1 == 3 and same_partition(got, lab)
    assert scores[0] == pytest.approx(1.0) and np.all(np.diff(scores) <= 1e-9)


def test_every_method_returns_a_labelling_of_the_grid():
    lab = regions()
    for method in METHODS:
        got, per_k, _ = cluster_cells(synthetic_features(lab), lab.shape, method=method)
        assert got.shape == lab.shape and got.dtype == np.int64
        assert set(np.unique(got)) == set(range(got.max() + 1))
        assert all(v.shape == lab.shape for v in per_k.values())


def test_small_clusters_are_absorbed_and_k_is_capped():
    lab = regions()
    lab[11, 0] = 3                               # one odd cell in a corner
    f = synthetic_features(lab, d=12)
    assert cluster_cells(f, lab.shape, min_area=0)[0].max() + 1 == 4
    got = cluster_cells(f, lab.shape, min_area=2 / lab.size)[0]    # joins the closest
    rest = np.ones(lab.shape, bool)
    rest[11, 0] = False
    assert got.max() + 1 == 3 and same_partition(got[rest], regions()[rest])
    assert cluster_cells(f, lab.shape, min_area=0, max_concepts=2)[0].max() + 1 == 2


def test_cluster_cells_errors():
    with pytest.raises(ValueError, match="method must be one of"):
        cluster_cells(np.ones((4, 2)), (2, 2), method="kmeans")
    with pytest.raises(ValueError, match=r"\(h\*w, D\)"):
        cluster_cells(np.ones((5, 2)), (2, 2))


# ----------------------------------------------------------------------------- similarity
def test_similar_concepts_matches_the_shared_concept():
    a = np.array([[0.8, 0.1, 0.1, 0.0], [0.0, 0.1, 0.1, 0.8]])
    b = np.array([[0.1, 0.8, 0.1, 0.0], [0.0, 0.1, 0.1, 0.8], [0.7, 0.2, 0.1, 0.0]])
    got = similar_concepts([a, b], min_similarity=0.9)
    assert [(m.image_a, m.concept_a, m.image_b, m.concept_b) for m in got] == \
        [(0, 1, 1, 1), (0, 0, 1, 2)]
    assert got[0].similarity == pytest.approx(1.0)
    assert all(isinstance(m, ConceptMatch) and 0.9 <= m.similarity <= 1 for m in got)
    assert len(similar_concepts([a, b], min_similarity=0.0)) == 2   # one to one
    three = similar_concepts([a, b, a], min_similarity=0.99)
    assert {(m.image_a, m.image_b) for m in three} == {(0, 1), (0, 2), (1, 2)}


def test_similar_concepts_errors():
    a = np.array([[0.5, 0.5]])
    with pytest.raises(ValueError, match="at least two"):
        similar_concepts([a])
    with pytest.raises(ValueError, match="different lengths"):
        similar_concepts([a, np.array([[0.2, 0.3, 0.5]])])
    with pytest.raises(ValueError, match="min_similarity"):
        similar_concepts([a, a], min_similarity=1.5)
    with pytest.raises(ValueError, match="Discovery or a"):
        similar_concepts([a, np.ones(3)])


# ----------------------------------------------------------------------------- bundled model
@pytest.fixture(scope="module")
def pipe():
    from conceptlab.models import load_pipeline

    return load_pipeline(progress=False)


def easy_scene(n_objects, seed):
    return world.render_scene(world.sample_scene(
        seed=seed, n_objects=n_objects, backgrounds=("gray", "beige"), max_rotation=0.0))


@pytest.mark.parametrize("n_objects,seed", [(1, 7), (2, 11)])
def test_k_on_easy_scenes(pipe, n_objects, seed):
    sc = easy_scene(n_objects, seed)
    d = discover_concepts(pipe, sc.image)
    assert d.k == n_objects + 1
    # the concept called background is the true background, and masks fit the objects
    inter = (d.masks[:, None] & sc.masks[None]).sum((2, 3))
    union = (d.masks[:, None] | sc.masks[None]).sum((2, 3))
    iou = inter / union
    assert iou[d.background, 0] > 0.8
    assert iou.max(0).min() > 0.5


def test_result_shapes_types_and_evidence(pipe):
    sc = easy_scene(2, 11)
    d = discover_concepts(pipe, sc.image, n_timesteps=4)
    assert isinstance(d, Discovery)
    H, W = sc.image.shape[:2]
    assert d.masks.shape == (d.k, H, W) and d.masks.dtype == bool
    assert (d.masks.sum(0) == 1).all()                      # disjoint and covering
    assert d.masks.any((1, 2)).all()
    assert 0 <= d.background < d.k
    assert np.array_equal(d.masks, d.labels[None] == np.arange(d.k)[:, None, None])
    h, w = d.attention_shape
    assert (h, w) == (16, 16)                               # the model's 16x16 layers
    assert d.grid_labels.shape == (h, w) and d.grid_labels.max() + 1 == d.k
    assert d.features.shape[:2] == (h, w) and d.profiles.shape == (h, w, len(d.words))
    assert d.concept_profiles.shape == (d.k, len(d.words))
    assert np.allclose(d.features.sum(-1), 1, atol=1e-4)
    assert "star" in d.words and "background" in d.words
    assert d.distances().shape == (h * w, h * w)
    assert d.method == "agglomerative" and d.threshold == 0.4
    assert len(d.timesteps) == 4 and len(d.scores) == h * w - 1
    with pytest.raises(AttributeError):
        d.background = 1                                    # frozen


def test_background_is_the_border_majority(pipe):
    d = discover_concepts(pipe, easy_scene(1, 7).image, n_timesteps=4)
    border = np.concatenate([d.labels[0], d.labels[-1], d.labels[:, 0], d.labels[:, -1]])
    assert np.bincount(border, minlength=d.k).argmax() == d.background


def test_deterministic_with_a_seed(pipe):
    img = easy_scene(2, 11).image
    a = discover_concepts(pipe, img, n_timesteps=4, seed=3)
    b = discover_concepts(pipe, img, n_timesteps=4, seed=3)
    assert np.array_equal(a.masks, b.masks) and np.array_equal(a.features, b.features)
    assert np.array_equal(a.timesteps, b.timesteps)
    c = discover_concepts(pipe, img, n_timesteps=4, seed=4)
    assert not np.array_equal(a.timesteps, c.timesteps)


def test_every_method_and_feature_kind_runs(pipe):
    img = easy_scene(2, 11).image
    for method, feats in [("spectral", "cross-attention"), ("finch", "self-attention"),
                          ("agglomerative", "both")]:
        d = discover_concepts(pipe, img, n_timesteps=2, method=method, features=feats,
                              refine=False)
        assert (d.masks.sum(0) == 1).all() and d.feature_kind == feats
        n = 16 * 16
        width = {"cross-attention": len(d.words), "self-attention": n,
                 "both": len(d.words) + n}[feats]
        assert d.features.shape == (16, 16, width)
        assert (d.threshold is None) == (method != "agglomerative")


def test_the_model_is_left_unchanged(pipe):
    unet = pipe.unet
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, unet.config.in_channels, 16, 16, generator=g)
    emb = torch.randn(1, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim,
                      generator=g)
    with torch.no_grad():
        out0 = unet(z, 10, encoder_hidden_states=emb).sample
        discover_concepts(pipe, easy_scene(1, 7).image, n_timesteps=2, features="both")
        out1 = unet(z, 10, encoder_hidden_states=emb).sample
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before
    assert torch.equal(out0, out1)


def test_similar_concepts_on_discoveries(pipe):
    a = discover_concepts(pipe, easy_scene(2, 11).image, n_timesteps=4)
    got = similar_concepts([a, a], include_background=True, min_similarity=0.99)
    assert {(m.concept_a, m.concept_b) for m in got} == {(k, k) for k in range(a.k)}
    objects = similar_concepts([a, a], min_similarity=0.0)
    assert all(m.concept_a != a.background for m in objects) and len(objects) == a.k - 1


def test_input_errors(pipe):
    img = easy_scene(1, 7).image
    cases = [
        (dict(threshold=0), "threshold must be a finite number in \\(0, 1\\]"),
        (dict(threshold=1.5), "threshold"),
        (dict(min_area=0.5), "min_area"),
        (dict(max_concepts=1), "max_concepts must be an integer"),
        (dict(n_timesteps=0), "n_timesteps"),
        (dict(n_timesteps=2.5), "n_timesteps must be an integer"),
        (dict(temperature=0.0), "temperature"),
        (dict(seed=-1), "seed"),
        (dict(method="kmeans"), "method must be one of"),
        (dict(features="words"), "features must be one of"),
        (dict(t_range=(500, 100)), "t_range\\[1\\]"),
        (dict(t_range=5), "t_range must be a pair"),
        (dict(layers="nope"), "unknown cross-attention layer"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            discover_concepts(pipe, img, **kw)
    with pytest.raises(ValueError, match="resize"):
        discover_concepts(pipe, np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(TypeError, match="an image must be"):
        discover_concepts(pipe, {"not": "an image"})
    with pytest.raises(ValueError, match="boolean|bool"):
        discover_concepts(pipe, np.zeros((64, 64), bool))


def test_probe_words_are_whole_words(pipe):
    words = probe_words(pipe.tokenizer)
    names = [w for w, _ in words]
    assert "circle" in names and "red" in names and "a" not in names
    assert len(probe_words(pipe.tokenizer, max_words=5)) == 5
    assert all(pipe.tokenizer.convert_ids_to_tokens(i) == w + "</w>" for w, i in words)


# ----------------------------------------------------------------------------- other models
def test_sizes_come_from_the_model():
    """A 32-px model with an 8x8 latent: the grid and the masks follow its configs."""
    from conceptlab.shapes.model import tiny_pipeline

    pipe = tiny_pipeline(0)
    img = world.render_scene(world.sample_scene(seed=1, n_objects=2), size=32).image
    d = discover_concepts(pipe, img, n_timesteps=2, features="both")
    assert d.masks.shape[1:] == (32, 32) and (d.masks.sum(0) == 1).all()
    assert d.attention_shape == (8, 8)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sd21"])
def test_stable_diffusion_shaped_pipelines(family):
    """512 px (64x64 latent, 16x16 grid) and 768 px (96x96 latent) random-weight
    pipelines: masks at image resolution, computed at 128 px and upsampled."""
    from conceptlab.attention import layer_resolutions
    from conceptlab.families import random_pipeline
    from conceptlab.models import native_size

    pipe = random_pipeline(family)
    side = native_size(pipe)
    img = (np.random.default_rng(0).random((side, side, 3)) * 255).astype(np.uint8)
    for feats in ("cross-attention", "self-attention"):
        d = discover_concepts(pipe, img, n_timesteps=2, features=feats)
        assert d.masks.shape == (d.k, side, side) and (d.masks.sum(0) == 1).all()
        h, w = d.attention_shape
        assert h == w and h in set(layer_resolutions(pipe.unet).values())


# ----------------------------------------------------------------------------- learning
def test_learn_concepts_without_words_discovers_them(pipe):
    from conceptlab import learn_concepts

    sc = easy_scene(2, 11)
    d = discover_concepts(pipe, sc.image)
    before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    r = learn_concepts(pipe, sc.image, steps=4, em_every=2, progress=False)
    # objects first, the background last; each object token starts from its top word
    objects = [k for k in range(d.k) if k != d.background]
    top = d.top_words()
    assert r.tokens.init_words == [top[k] for k in objects] + ["background"]
    assert top[d.background] not in [top[k] for k in objects]
    assert r.concept_ids == [[0, 1, 2]] and r.masks[0].shape == (3, 64, 64)
    np.testing.assert_array_equal(r.mask_history[0][0], d.masks[objects + [d.background]])
    assert r.e_steps[0] == 0 and len(r.e_steps) > 1          # EM went on from there
    fixed = learn_concepts(pipe, sc.image, method="fixed", steps=2, progress=False)
    np.testing.assert_array_equal(fixed.masks[0], r.mask_history[0][0])
    assert all(torch.equal(v, before[k]) for k, v in pipe.text_encoder.state_dict().items())
    shared = learn_concepts(pipe, sc.image, steps=2, progress=False,
                            discovery={"object_words": "shared"})
    assert shared.tokens.init_words == ["shape", "shape", "background"]
    np.testing.assert_array_equal(shared.mask_history[0][0], r.mask_history[0][0])


def test_top_words_read_each_concepts_profile():
    """Each concept's word is its profile's largest entry; an object whose largest entry
    is the background's word gets its next one."""
    from conceptlab.discovery import Discovery

    prof = np.array([[0.6, 0.3, 0.1, 0.0],      # background: "sky"
                     [0.5, 0.1, 0.4, 0.0],      # "sky" too, then "star"
                     [0.1, 0.0, 0.2, 0.7]], np.float32)
    masks = np.zeros((3, 4, 4), bool)
    masks[0, :2], masks[1, 2], masks[2, 3] = True, True, True
    d = Discovery(masks=masks, background=0, labels=masks.argmax(0), grid_labels=None,
                  features=None, feature_kind="cross-attention",
                  words=("sky", "ball", "star", "heart"), profiles=None,
                  concept_profiles=prof, labels_per_k={}, scores=np.zeros(0),
                  threshold=0.4, method="agglomerative", timesteps=np.zeros(1), seed=0)
    assert d.top_words() == ["sky", "star", "heart"]


def test_learn_without_words_across_images_and_its_errors(pipe):
    from conceptlab import learn_concepts

    a, b = easy_scene(1, 7), easy_scene(2, 11)
    r = learn_concepts(pipe, [a.image, b.image], steps=2, progress=False)
    assert r.concept_ids == [[0, 1], [2, 3, 4]]
    starts = r.tokens.init_words            # each image: its objects, then its background
    assert [starts[1], starts[4]] == ["background"] * 2
    assert "background" not in [starts[0], starts[2], starts[3]]
    # the first image's object is one of the second's: the result says which look alike
    assert any("of image 0 and concept" in w and "look alike" in w for w in r.warnings)
    with pytest.raises(ValueError, match="needs init_words"):
        learn_concepts(pipe, a.image, method="none", steps=2, progress=False)
    with pytest.raises(ValueError, match="go with init_words"):
        learn_concepts(pipe, a.image, concept_images=[[0]], steps=2, progress=False)
    with pytest.raises(ValueError, match="only without init_words"):
        learn_concepts(pipe, a.image, ["shape", "background"], discovery={"threshold": 0.5})
    with pytest.raises(ValueError, match="object_words.*must be one of"):
        learn_concepts(pipe, a.image, discovery={"object_words": "random"})
    with pytest.raises(TypeError, match="dict of options"):
        learn_concepts(pipe, a.image, discovery="shared")
    with pytest.raises(ValueError, match="no concept stands out"):
        learn_concepts(pipe, np.full((64, 64, 3), 128, np.uint8), steps=2, progress=False)


def test_the_command_line_learns_without_concepts(tmp_path, capsys):
    from conceptlab.cli import main
    from conceptlab.result import LearnedConcepts

    path = tmp_path / "scene.png"
    Image.fromarray(easy_scene(2, 11).image).save(path)
    assert main(["learn", str(path), "--out", str(tmp_path / "out"), "--steps", "2",
                 "--quiet"]) in (0, None)
    out = capsys.readouterr().out
    starts = LearnedConcepts.load(str(tmp_path / "out")).tokens.init_words
    assert starts[-1] == "background" and "background" not in starts[:2]
    assert ("image 0: discovered 2 object(s) and the background: [v1] (from "
            f"{starts[0]}), [v2] (from {starts[1]}), [v3] (from background)") in out
    assert main(["learn", str(path), "--out", str(tmp_path / "shared"), "--steps", "2",
                 "--quiet", "--object-words", "shared"]) in (0, None)
    assert LearnedConcepts.load(str(tmp_path / "shared")).tokens.init_words == \
        ["shape", "shape", "background"]
    for bad in (["--concepts", "shape,background", "--object-words", "top"],
                ["--background-threshold", "0.5"]):
        assert main(["learn", str(path), "--out", str(tmp_path / "bad"), "--steps", "2",
                     "--quiet", *bad]) not in (0, None)
    err = capsys.readouterr().err
    assert "--object-words is for discovered concepts" in err
    assert "--background-threshold goes with --concepts" in err


def test_the_threshold_explorer_shows_k_changing(pipe, monkeypatch):
    import matplotlib.pyplot as plt

    from conceptlab.viz import widgets

    sc = easy_scene(2, 11)
    d = discover_concepts(pipe, sc.image)
    assert widgets.discovery_view(d, d.threshold)["k"] == d.k == 3
    ks = [widgets.discovery_view(d, t)["k"] for t in (0.05, 0.2, 0.4, 0.7, 1.0)]
    assert ks == sorted(ks, reverse=True) and ks[-1] == 1 and ks[0] > 3
    monkeypatch.setattr(plt, "show", lambda: plt.close("all"))
    w = widgets.discovery_explorer(sc.image, d)
    assert w.result["k"] == 3
    w.children[0].value = 1.0
    assert w.result["k"] == 1
    with pytest.raises(ValueError, match="agglomerative"):
        widgets.discovery_view(discover_concepts(pipe, sc.image, method="finch"), 0.4)
