"""The shapes world: determinism, exact masks, captions, held-out concepts."""

import numpy as np
import pytest

from conceptlab.shapes import world


def test_deterministic_from_seed():
    a = world.render_scene(world.sample_scene(seed=11))
    b = world.render_scene(world.sample_scene(seed=11))
    c = world.render_scene(world.sample_scene(seed=12))
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("seed", range(10))
def test_masks_partition_the_image_and_match_objects(seed):
    sc = world.render_scene(world.sample_scene(seed=seed))
    k = len(sc.spec.objects)
    assert sc.image.shape == (64, 64, 3) and sc.image.dtype == np.uint8
    assert sc.masks.shape == (k + 1, 64, 64) and sc.masks.dtype == bool
    assert (sc.masks.sum(0) == 1).all()
    for i, obj in enumerate(sc.spec.objects, start=1):
        assert sc.masks[i].sum() > 30  # every object is visible
        # the object's pixels have its colour (edges are anti-aliased, interiors exact)
        colour = np.array(world.COLOURS[obj.colour])
        exact = (np.abs(sc.image[sc.masks[i]].astype(int) - colour).max(1) <= 2).mean()
        assert exact > 0.3


def test_caption_names_every_object_and_the_background():
    spec = world.sample_scene(seed=4, n_objects=3)
    cap = world.describe(spec)
    for o in spec.objects:
        assert f"{o.colour} {o.shape}" in cap
    assert cap.endswith(f"{spec.background} background")
    assert world.describe(spec, with_colour=False, with_background=False).count(" and ") == 2


def test_any_size_and_occlusion_follows_drawing_order():
    O = world.ShapeObject
    spec = world.SceneSpec([O("square", "red", 0.5, 0.5, 0.3), O("circle", "blue", 0.5, 0.5, 0.15)],
                           "gray")
    sc = world.render_scene(spec, size=96)
    assert sc.image.shape == (96, 96, 3)
    assert sc.masks[2, 48, 48] and not sc.masks[1, 48, 48]  # the later circle hides the square


def test_held_out_patterns_never_in_training_distribution():
    specs = [world.sample_scene(seed=s) for s in range(300)]
    assert all(o.pattern == "solid" for s in specs for o in s.objects)
    patterned = [world.sample_scene(seed=s, patterns=world.PATTERNS) for s in range(60)]
    assert any(o.pattern != "solid" for s in patterned for o in s.objects)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="n_objects"):
        world.sample_scene(seed=0, n_objects=4)
    with pytest.raises(ValueError, match="unknown shape"):
        world.shape_polygon("hexagon", 0, 0, 1)
