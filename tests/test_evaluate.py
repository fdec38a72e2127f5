"""conceptlab.evaluate: prompts, judges and tables, checked on rendered scenes whose
answers are known, on the tiny pipeline, and on a tiny random CLIP saved locally."""

import numpy as np
import pytest

from conceptlab import evaluate as E
from conceptlab.shapes import world
from conceptlab.shapes.model import tiny_pipeline
from conceptlab.tokens import new_concepts

pytestmark = pytest.mark.usefixtures("one_thread")

STAR = world.ShapeObject("star", "blue", 0.5, 0.3, 0.2, pattern="striped", colour2="yellow")
HEART = world.ShapeObject("heart", "red", 0.5, 0.75, 0.18)


def scene(*objects, background="gray"):
    grey = ((100, 100, 100), (160, 160, 160)) if background in world.TEXTURED_BACKGROUNDS else ()
    return world.render_scene(world.SceneSpec(list(objects), background, grey))


@pytest.fixture(scope="module")
def judge():
    return E.ShapesJudge()


@pytest.fixture(scope="module")
def specs():
    sc = scene(STAR, HEART)
    masks = np.concatenate([sc.masks[1:], sc.masks[:1]])
    return E.concept_specs(sc.image, masks, [STAR, HEART], "gray", ["[v1]", "[v2]", "[v3]"])


def test_words_and_prompts(specs):
    assert [s.words for s in specs] == ["a blue striped star", "a red heart", "a gray background"]
    assert specs[2].is_background and not specs[0].is_background
    assert E.class_prompt("a photo of [v2] above [v1] on [v3]", specs) == \
        "a photo of a red heart above a blue striped star on a gray background"
    with pytest.raises(ValueError, match=r"\[v9\]"):
        E.class_prompt("a photo of [v9]", specs)
    assert E.objects_named("a red star and a blue striped heart on a red background") == \
        [("red", "star"), ("blue", "heart")]
    assert E.attributes_of("a blue striped star") == {"colour": "blue", "shape": "star",
                                                      "pattern": "striped"}
    assert E.attributes_of("a dotted background") == {"background": "dotted"}
    assert E.attributes_of("a star") == {}
    p = E.default_prompts(specs)
    assert [x[0] for x in p["single"]] == ["a photo of [v1]", "a photo of [v2]"]
    assert [x[0] for x in p["pair"]] == ["a photo of [v1] and [v2]"]
    new = next(b for b in world.PLAIN_BACKGROUNDS if b != "gray")   # another plain one
    assert [x[0] for x in p["recombined"]] == [f"a photo of [v1] and [v2] on a {new} background",
                                               "a photo of [v1] and [v2] on [v3]"]
    assert p["interaction"][0][0] == "a photo of [v2] above [v1]"
    one = E.default_prompts([specs[0], specs[2]])
    assert not one["pair"] and [x[0] for x in one["recombined"]] == [
        f"a photo of [v1] on a {new} background", "a photo of [v1] on [v3]"]
    with pytest.raises(ValueError, match="names"):
        E.concept_specs(specs[0].image, np.zeros((3, 64, 64), bool), [STAR], "gray",
                        ["[v1]", "[v2]", "[v3]"])


def test_shapes_judge_on_renders(judge, specs):
    star_alone = scene(STAR).image[None]
    heart_alone = scene(world.ShapeObject("heart", "red", 0.5, 0.5, 0.25)).image[None]
    assert judge.concept_fidelity(specs[0], star_alone).tolist() == [True]
    assert judge.concept_fidelity(specs[0], heart_alone).tolist() == [False]
    solid = scene(world.ShapeObject("star", "blue", 0.5, 0.5, 0.25)).image[None]
    assert judge.concept_fidelity(specs[0], solid).tolist() == [False]   # pattern missing
    assert judge.present(specs[0], solid).tolist() == [True]              # colour + shape
    same, other = judge.identity(specs[0], star_alone)[0], judge.identity(specs[0], heart_alone)[0]
    assert same > 0.9 > other
    both = scene(STAR, HEART).image[None]
    assert judge.prompt_fidelity(both, "a blue striped star and a red heart on a gray "
                                       "background").tolist() == [1.0]
    assert judge.prompt_fidelity(both, "a green circle on a gray background").tolist() == [0.5]
    assert np.isnan(judge.prompt_fidelity(both, "a photo of a star")).all()
    assert judge.identity(specs[2], both).tolist() == [1.0]               # the background
    # the star (cy 0.3) is above the heart (cy 0.75)
    (ys, xs), (yh, xh) = judge.position(specs[0], both)[0], judge.position(specs[1], both)[0]
    assert abs(ys - 0.3) < 0.08 and abs(yh - 0.75) < 0.1 and abs(xs - 0.5) < 0.08
    assert E.relation_holds("above", (ys, xs), (yh, xh)) is True
    assert E.relation_holds("below", (ys, xs), (yh, xh)) is False
    assert E.relation_holds("next to", (ys, xs), (yh, xh)) is False
    assert E.relation_holds("above", None, (yh, xh)) is None
    assert judge.position(specs[1], star_alone) == [None]                 # no red pixels


def test_diversity(judge):
    a = scene(STAR).image
    b = scene(HEART, background="dotted").image
    assert judge.diversity(np.stack([a, a, a])) == pytest.approx(0.0, abs=1e-6)
    d1 = judge.diversity(np.stack([a, a, b]))
    d2 = judge.diversity(np.stack([a, b, scene(world.ShapeObject("circle", "green", 0.3, 0.3,
                                                                 0.15)).image]))
    assert 0 < d1 < d2
    with pytest.raises(ValueError, match="at least 2"):
        judge.diversity(a[None])


def test_interval95():
    s = E.interval95([1.0, 2.0, 3.0, None, float("nan")])
    assert s["n"] == 3 and s["mean"] == pytest.approx(2.0)
    assert s["ci95"] == pytest.approx(4.3027 / np.sqrt(3), rel=1e-3)
    assert E.interval95([0.5]) == {"mean": 0.5, "ci95": None, "n": 1}
    assert E.interval95([])["mean"] is None
    table = E.format_table({"em": {"identity": s}, "none": {}}, measures=("identity",))
    assert "2.000 +-2.48" in table and table.splitlines()[2].rstrip().endswith("-")


class CountingJudge:
    """Known answers, to check what evaluate averages."""
    name = "counting"

    def identity(self, spec, images):
        return np.full(len(images), 0.5 if spec.name == "[v1]" else 0.7)

    def prompt_fidelity(self, images, prompt):
        return np.full(len(images), 1.0 if "background" in prompt else 0.0)

    def diversity(self, images):
        return 0.25

    def concept_fidelity(self, spec, images):
        return np.array([True, False] * (len(images) // 2))

    def present(self, spec, images):
        return np.ones(len(images), bool)

    def position(self, spec, images):
        y = 0.2 if spec.name == "[v2]" else 0.8          # [v2] is always above [v1]
        return [(y, 0.5)] * len(images)


def test_evaluate_aggregates_on_the_tiny_pipeline(specs):
    pipe = tiny_pipeline(0)
    c = new_concepts(pipe, ["[v1]", "[v2]", "[v3]"], ["star", "heart", "background"])
    ev = E.evaluate(pipe, c, specs, judge=CountingJudge(), n=2, num_inference_steps=2,
                    return_images=True)
    s = ev["summary"]
    assert s["identity"] == pytest.approx(0.6) and s["diversity"] == 0.25
    assert s["concept_fidelity"] == pytest.approx(0.5)
    # pair (0.0) and two recombined prompts, both naming a background (1.0)
    assert s["prompt_fidelity"] == pytest.approx(2 / 3)
    assert s["both_present"] == 1.0 and s["relation"] == 1.0 and s["mask_iou"] is None
    assert [r["kind"] for r in ev["prompts"]] == ["single", "single", "pair", "recombined",
                                                  "recombined", "interaction"]
    assert all(im.shape == (2, 32, 32, 3) and im.dtype == np.uint8
               for im in ev["images"].values())
    again = E.evaluate(pipe, c, specs, judge=CountingJudge(), n=2, num_inference_steps=2,
                       return_images=True)
    assert all((again["images"][k] == v).all() for k, v in ev["images"].items())
    with pytest.raises(ValueError, match="n must be"):
        E.evaluate(pipe, c, specs, judge=CountingJudge(), n=1)
    with pytest.raises(ValueError, match="specs is empty"):
        E.evaluate(pipe, c, [], judge=CountingJudge())
    with pytest.raises(ValueError, match="no masks"):
        E.evaluate(pipe, c, specs, judge=CountingJudge(), n=2, num_inference_steps=2,
                   gt_masks=[np.zeros((3, 32, 32), bool)])


def test_clip_judge_from_a_local_folder(tmp_path, specs):
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizerFast,
    )

    from conceptlab.models import data_dir

    tok = CLIPTokenizerFast.from_pretrained(data_dir() / "models" / "shapes-ldm" / "tokenizer")
    cfg = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 2,
                     "max_position_embeddings": 32, "eos_token_id": tok.eos_token_id,
                     "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(tmp_path)
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32,
                                                                       "width": 32}),
                         tokenizer=tok)
    proc.save_pretrained(tmp_path)
    j = E.ClipJudge(tmp_path)
    src = (specs[0].image * specs[0].mask[..., None]).astype(np.uint8)
    other = scene(HEART, background="dotted").image
    ident = j.identity(specs[0], np.stack([src, other]))
    assert ident[0] == pytest.approx(1.0, abs=1e-5) and ident[1] < 1.0
    pf = j.prompt_fidelity(np.stack([src, other]), "a photo of a blue striped star")
    assert pf.shape == (2,) and np.all(np.abs(pf) <= 1.0 + 1e-6)
    assert j.diversity(np.stack([src, src])) == pytest.approx(0.0, abs=1e-5)
    assert j.diversity(np.stack([src, other])) > 0
    assert j.present(specs[0], src[None]) is None
    with pytest.raises(ValueError, match="not a CLIP folder"):
        E.ClipJudge(tmp_path / "nowhere")
