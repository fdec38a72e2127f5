"""The bundled example "user images" (``data/examples``).

Each example is a 64x64 PNG with 2-3 concepts, at least one of them a particular patterned
instance (a striped, two-tone or dotted object with a second colour of its own: the base
model saw such objects only under coarse captions, "a blue striped star"), plus a
background. Their ground-truth masks are stored beside them for EVALUATION only: the EM
method never reads them. ``conceptlab make-examples`` regenerates the folder deterministically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..fileio import atomic_write_json
from ..models import data_dir
from . import world

# name -> (spec, concept descriptions); objects are placed by hand so each concept is clear.
O = world.ShapeObject
EXAMPLE_SPECS = {
    "striped-star-and-heart": world.SceneSpec(
        [O("star", "blue", 0.30, 0.36, 0.21, 8.0, "striped", "white"),
         O("heart", "red", 0.68, 0.66, 0.20, -10.0, "solid")],
        "beige"),
    "two-tone-square-and-circle": world.SceneSpec(
        [O("square", "yellow", 0.32, 0.66, 0.19, 12.0, "two-tone", "purple"),
         O("circle", "orange", 0.70, 0.32, 0.19, 0.0, "solid")],
        "striped", ((90, 90, 90), (145, 145, 145)), 3, 30.0, 0.22),
    "dotted-heart-and-triangle": world.SceneSpec(
        [O("heart", "green", 0.66, 0.34, 0.20, -5.0, "dotted", "yellow"),
         O("triangle", "white", 0.32, 0.66, 0.20, 10.0, "solid")],
        "gray"),
    "three-objects": world.SceneSpec(
        [O("star", "orange", 0.25, 0.27, 0.17, 0.0, "two-tone", "blue"),
         O("circle", "red", 0.72, 0.30, 0.16, 0.0, "striped", "white"),
         O("square", "green", 0.45, 0.73, 0.16, -15.0, "solid")],
        "black"),
    "striped-triangle-on-dots": world.SceneSpec(
        [O("triangle", "purple", 0.36, 0.40, 0.22, -6.0, "striped", "yellow"),
         O("circle", "white", 0.72, 0.70, 0.17, 0.0, "solid")],
        "dotted", ((70, 70, 70), (125, 125, 125)), 5, 0.0, 0.2),
}


def _describe_object(o: world.ShapeObject) -> str:
    if o.pattern == "solid":
        return f"{o.colour} {o.shape}"
    if o.pattern == "two-tone":
        return f"{o.colour} and {o.colour2} two-tone {o.shape}"
    return f"{o.colour} {o.shape} with {o.colour2} {'stripes' if o.pattern == 'striped' else 'dots'}"


@dataclass
class Example:
    """A bundled example image, its concepts and its (evaluation-only) masks.

    Attributes:
        name: the example's name.
        image: (64, 64, 3) uint8.
        masks: (K, 64, 64) bool: one per concept, objects first, background last.
        concepts: human descriptions, same order as masks.
        init_words: class words to initialise concept tokens, same order.
    """

    name: str
    image: np.ndarray  # (64, 64, 3) uint8
    masks: np.ndarray  # (K, 64, 64) bool: one per concept, objects first, background last
    concepts: list[str]  # human descriptions, same order as masks
    init_words: list[str]  # class words to initialise concept tokens, same order

    @property
    def n_concepts(self) -> int:
        """The number of concepts K."""
        return len(self.concepts)


def write_examples(out_dir: str | Path | None = None) -> list[str]:
    """Render every example of `EXAMPLE_SPECS` with its masks and metadata.

    Writes ``{name}.png``, ``{name}.masks.png`` (pixel value i+1 = concept i) and
    ``{name}.json`` per example.

    Args:
        out_dir: the folder to write (default: the bundled ``examples`` folder).

    Returns:
        The examples' names.
    """
    out = Path(out_dir) if out_dir else data_dir() / "examples"
    out.mkdir(parents=True, exist_ok=True)
    for name, spec in EXAMPLE_SPECS.items():
        sc = world.render_scene(spec)
        Image.fromarray(sc.image).save(out / f"{name}.png")
        masks = list(sc.masks[1:]) + [sc.masks[0]]  # objects, then background
        label = np.zeros(sc.image.shape[:2], np.uint8)
        for i, m in enumerate(masks):
            label[m] = i + 1
        Image.fromarray(label).save(out / f"{name}.masks.png")
        meta = {
            "concepts": [_describe_object(o) for o in spec.objects] + [f"{spec.background} background"],
            "init_words": [o.shape for o in spec.objects] + ["background"],
            "mask_encoding": "pixel value i+1 = concept i (masks.png); used for evaluation only",
            "spec": spec.to_dict(),
        }
        atomic_write_json(out / f"{name}.json", meta, indent=1)
    return list(EXAMPLE_SPECS)


def list_examples() -> list[str]:
    """The names of the bundled examples, sorted.

    Returns:
        The names.
    """
    return sorted(p.stem for p in (data_dir() / "examples").glob("*.json"))


def example_spec(name: str) -> world.SceneSpec:
    """The scene description a bundled example was rendered from (objects, background).

    Args:
        name: the example's name (see `list_examples`).

    Returns:
        The `conceptlab.shapes.world.SceneSpec`.

    Raises:
        ValueError: no bundled example has that name.
    """
    d = data_dir() / "examples"
    if not (d / f"{name}.json").exists():
        raise ValueError(f"no example {name!r}; bundled examples: {list_examples()}")
    return world.SceneSpec.from_dict(json.loads((d / f"{name}.json").read_text())["spec"])


def load_example(name: str) -> Example:
    """A bundled example image with its concepts and (evaluation-only) masks.

    Args:
        name: the example's name (see `list_examples`).

    Returns:
        The `Example`.

    Raises:
        ValueError: no bundled example has that name.
    """
    d = data_dir() / "examples"
    if not (d / f"{name}.json").exists():
        raise ValueError(f"no example {name!r}; bundled examples: {list_examples()}")
    meta = json.loads((d / f"{name}.json").read_text())
    image = np.array(Image.open(d / f"{name}.png").convert("RGB"))
    label = np.array(Image.open(d / f"{name}.masks.png"))
    k = len(meta["concepts"])
    masks = label[None] == np.arange(1, k + 1)[:, None, None]
    return Example(name, image, masks, meta["concepts"], meta["init_words"])
