"""Lesson 00's scene composer: the pure function behind it, and the widget driven from code."""

import numpy as np
import pytest

from conceptlab.shapes import world
from conceptlab.viz import widgets


def test_scene_view_puts_the_chosen_object_first_and_its_masks_partition_the_image():
    v = widgets.scene_view(n_objects=3, shape="heart", colour="blue", pattern="striped",
                           background="dotted", seed=4)
    assert v["image"].shape == (64, 64, 3) and v["image"].dtype == np.uint8
    assert v["masks"].shape == (4, 64, 64) and v["masks"].dtype == bool
    assert (v["masks"].sum(0) == 1).all()                 # one region per pixel
    assert v["pixels"] == [int(m.sum()) for m in v["masks"]]
    assert v["names"][0] == "blue striped heart"
    assert v["caption"].startswith("a blue striped heart and ")
    assert v["caption"].endswith("on a dotted background")
    shapes = [n.split()[-1] for n in v["names"]]
    colours = [n.split()[0] for n in v["names"]]
    assert len(set(shapes)) == 3 and len(set(colours)) == 3   # still distinct in the scene


def test_scene_view_is_deterministic_and_the_seed_moves_the_layout():
    a = widgets.scene_view(seed=1)
    b = widgets.scene_view(seed=1)
    c = widgets.scene_view(seed=2)
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["masks"], b["masks"])
    assert not np.array_equal(a["masks"], c["masks"])
    # the default: two objects, a solid red star first, on gray
    assert a["masks"].shape[0] == 3 and a["names"][0] == "red star"
    assert a["caption"].endswith("on a gray background")


def test_scene_view_pattern_is_drawn_and_white_objects_get_a_visible_second_colour():
    solid = widgets.scene_view(n_objects=1, colour="white", pattern="solid", seed=0)
    dotted = widgets.scene_view(n_objects=1, colour="white", pattern="dotted", seed=0)
    assert np.array_equal(solid["masks"], dotted["masks"])     # same layout
    inside = solid["masks"][1]
    assert not np.array_equal(solid["image"][inside], dotted["image"][inside])


@pytest.mark.parametrize("kw", [{"shape": "hexagon"}, {"colour": "pink"}, {"pattern": "plaid"},
                                {"background": "sky"}, {"n_objects": 4}])
def test_scene_view_rejects_unknown_choices(kw):
    with pytest.raises(ValueError):
        widgets.scene_view(**kw)


def test_scene_explorer_drives_from_code():
    pytest.importorskip("ipywidgets")
    import matplotlib
    matplotlib.use("Agg")
    w = widgets.scene_explorer()
    assert w.result["names"][0] == "red star"
    names = [c.description for c in w.children[:6]]
    assert names == ["n_objects", "shape", "colour", "pattern", "background", "seed"]
    w.children[1].value = "circle"                        # the shape dropdown
    assert w.result["names"][0] == "red circle"
    assert set(w.children[4].options) == set(world.BACKGROUNDS)
