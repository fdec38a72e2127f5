"""The pattern reader and the identity similarity (conceptlab.shapes.identity)."""

import dataclasses

import numpy as np
import pytest

from conceptlab.shapes import identity as I
from conceptlab.shapes import world


def scene(pattern="striped", colour2="white", **kw):
    o = world.ShapeObject("star", "blue", 0.45, 0.5, 0.24, 5.0, pattern,
                          None if pattern == "solid" else colour2)
    o = dataclasses.replace(o, **kw)
    return world.render_scene(world.SceneSpec([o], "gray"))


def test_object_mask_finds_the_object_and_crop_blacks_out_the_rest():
    sc = scene()
    m = I.object_mask(sc.image)
    truth = sc.masks[1]
    assert (m & truth).sum() / (m | truth).sum() > 0.9
    crop = I.object_crop(sc.image, truth)
    assert crop.shape == (I.CROP, I.CROP, 3)
    assert crop[0, 0].max() == 0                   # a corner outside the star: black
    plain = np.full((64, 64, 3), 128, np.uint8)
    assert not I.object_mask(plain).any()          # nothing stands out: empty
    assert I.object_crop(plain).shape == (I.CROP, I.CROP, 3)


def test_colour_histogram_counts_both_colours():
    sc = scene("two-tone", "yellow")
    h = I.colour_histogram(sc.image, sc.masks[1])
    names = list(world.COLOURS)
    assert abs(h.sum() - 1) < 1e-6
    assert h[names.index("blue")] > 0.3 and h[names.index("yellow")] > 0.3


def test_shipped_pattern_net_reads_renders_and_identity_ranks_instances():
    try:
        net = I.load_pattern_net()
    except FileNotFoundError:
        pytest.fail("data/classifier/pattern.safetensors is missing: "
                    "run python benchmarks/train_pattern.py")
    assert net.config["metrics"]["accuracy_clean"] >= 0.9
    imgs = [scene(p).image for p in I.PATTERNS]
    assert I.read_pattern(imgs, net) == list(I.PATTERNS)
    src = scene("striped", "white")
    same = scene("striped", "white", cx=0.55, cy=0.45, radius=0.2, angle=-10.0)
    other = scene("striped", "red", cx=0.55, cy=0.45, radius=0.2, angle=-10.0)
    shape = world.render_scene(world.SceneSpec(
        [world.ShapeObject("heart", "blue", 0.55, 0.45, 0.2, 0.0, "striped", "white")], "gray"))
    s = I.identity_similarity(src.image, src.masks[1], [same.image, other.image, shape.image],
                              net=net)
    assert s[0] > s[1] and s[0] > s[2] and s[0] > 0.9
