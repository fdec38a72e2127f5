"""The shapes world: procedural scenes of coloured shapes with captions and exact masks.

A scene is 1-3 objects drawn over a background. Everything is deterministic from a seed:

    >>> scene = render_scene(sample_scene(seed=3))
    >>> scene.image.shape, scene.caption, scene.masks.shape   # (64, 64, 3) uint8, str, (K+1, 64, 64)

Objects are drawn at 4x the output resolution and box-downsampled (anti-aliasing); the
masks are the *visible* pixels of each object (later objects occlude earlier ones) at
the output resolution: a pixel belongs to the object that covers most of it, or to the
background. ``masks[0]`` is the background, ``masks[i]`` is object ``i`` (drawing order).

Concepts and instances: the bundled model (v2) is trained on solid objects and, a quarter of
the time, patterned ones ("striped", "two-tone", "dotted"), captioned coarsely: "a blue
striped star" never says the stripes' colour. The bundled example images hold particular
instances (a blue star with *white* stripes, at one size and angle): the "user concepts"
the course learns new tokens for, as a user's dog is one particular dog
(``data/examples``).

Why one module of about 510 lines (over a third of it docstrings): the layouts, their
drawing and their captions make one world, and the scenes, masks and captions must agree.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "heart")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (245, 220, 40),
    "purple": (140, 60, 190),
    "orange": (250, 140, 30),
    "white": (245, 245, 245),
}
PLAIN_BACKGROUNDS = {
    "gray": (128, 128, 128),
    "black": (25, 25, 25),
    "brown": (115, 80, 50),
    "beige": (215, 200, 165),
}
TEXTURED_BACKGROUNDS = ("striped", "dotted", "grassy")
BACKGROUNDS = tuple(PLAIN_BACKGROUNDS) + TEXTURED_BACKGROUNDS
PATTERNS = ("solid", "striped", "two-tone", "dotted")  # the second colour is never captioned

# radius range (fraction of image size) by number of objects: big objects localise better
RADIUS = {1: (0.17, 0.30), 2: (0.15, 0.23), 3: (0.13, 0.20)}
SUPERSAMPLE = 4

PREFIXES = ("", "a photo of ", "a picture of ", "an image of ")
CAPTION_WORDS = ["a", "an", "and", "on", "of", "with", "the", "photo", "picture", "image", "background", "shape", "in", "front", "next", "to", "above", "below", "left", "right", "beside", "together"]


@dataclass
class ShapeObject:
    """One object of a scene.

    Attributes:
        shape: one of `SHAPES`.
        colour: one of `COLOURS`.
        cx: centre x, fraction of the image width.
        cy: centre y, fraction of the image height (images are square).
        radius: circumradius, fraction of the image width.
        angle: rotation in degrees.
        pattern: one of `PATTERNS`.
        colour2: second colour of a patterned object (None: white).
    """

    shape: str
    colour: str
    cx: float  # centre, fraction of the image width
    cy: float
    radius: float  # fraction of the image width
    angle: float = 0.0  # degrees
    pattern: str = "solid"
    colour2: str | None = None  # second colour of a patterned object

    def phrase(self, with_colour: bool = True, with_pattern: bool = False) -> str:
        """The object's noun phrase, e.g. 'a red star'.

        With ``with_pattern`` a patterned object is 'a blue striped star' (its first colour
        and its pattern word: a coarse caption, as a web caption would say "a striped
        cat").

        Args:
            with_colour: name the (first) colour.
            with_pattern: name the pattern of a patterned object.

        Returns:
            The phrase, with its article.
        """
        noun = self.shape
        if with_pattern and self.pattern != "solid":
            noun = f"{self.pattern} {noun}"
        if not with_colour:
            return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"
        return f"{'an' if self.colour[0] in 'aeiou' else 'a'} {self.colour} {noun}"


@dataclass
class SceneSpec:
    """The layout of a scene, from which `render_scene` draws it.

    Attributes:
        objects: the objects, in drawing order.
        background: one of `BACKGROUNDS`.
        bg_colours: texture colours, chosen by the sampler.
        texture_seed: seed of the "grassy" texture.
        texture_angle: angle in degrees of the "striped" texture.
        texture_period: period of the striped and dotted textures, fraction of the image
            width.
    """

    objects: list[ShapeObject]
    background: str
    bg_colours: tuple = ()  # texture colours, chosen by the sampler
    texture_seed: int = 0
    texture_angle: float = 0.0
    texture_period: float = 0.2  # fraction of the image width

    def to_dict(self) -> dict:
        """The spec as plain data (JSON-ready).

        Returns:
            ``{field: value}``, objects as dicts.
        """
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SceneSpec:
        """The spec of a `to_dict` output.

        Args:
            d: ``{field: value}``.

        Returns:
            The spec.
        """
        d = dict(d)
        d["objects"] = [ShapeObject(**o) for o in d["objects"]]
        d["bg_colours"] = tuple(tuple(c) for c in d.get("bg_colours", ()))
        return cls(**d)


@dataclass
class Scene:
    """A rendered scene.

    Attributes:
        image: (H, W, 3) uint8.
        masks: (K+1, H, W) bool; [0] background, [i] object i (drawing order).
        caption: the scene's caption.
        spec: the layout it was drawn from.
        words: per object: (colour word, shape word).
    """

    image: np.ndarray  # (H, W, 3) uint8
    masks: np.ndarray  # (K+1, H, W) bool; [0] background, [i] object i (drawing order)
    caption: str
    spec: SceneSpec
    words: list = field(default_factory=list)  # per object: (colour word, shape word)

    @property
    def object_masks(self) -> np.ndarray:
        """(K, H, W) bool masks of the objects, in drawing order."""
        return self.masks[1:]

    @property
    def background_mask(self) -> np.ndarray:
        """(H, W) bool mask of the background."""
        return self.masks[0]


# ----------------------------------------------------------------------------- geometry
def shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float = 0.0) -> list:
    """Vertices (x, y) in pixels of a shape of circumradius ``r`` centred at (cx, cy).

    Args:
        shape: one of `SHAPES`.
        cx: centre x in pixels.
        cy: centre y in pixels.
        r: circumradius in pixels.
        angle: rotation in degrees.

    Returns:
        The vertices, as (x, y) tuples.

    Raises:
        ValueError: an unknown shape.
    """
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r * 0.92
    elif shape == "square":
        s = r * 0.80
        pts = np.array([[-s, -s], [s, -s], [s, s], [-s, s]])
    elif shape == "triangle":
        t = np.deg2rad(np.array([-90, 30, 150]))
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
        pts[:, 1] += r * 0.18  # centre the bounding box
    elif shape == "star":
        t = np.deg2rad(-90 + 36 * np.arange(10))
        rad = np.where(np.arange(10) % 2 == 0, r, r * 0.42)
        pts = np.stack([np.cos(t) * rad, np.sin(t) * rad], 1)
        pts[:, 1] += r * 0.1
    elif shape == "heart":
        t = np.linspace(0, 2 * np.pi, 120, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y + 2.5], 1) * (r / 16.5)
    else:
        raise ValueError(f"unknown shape {shape!r}: choose one of {SHAPES}")
    a = np.deg2rad(angle)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    pts = pts @ rot.T + np.array([cx, cy])
    return [tuple(p) for p in pts]


def _texture(spec: SceneSpec, size: int) -> np.ndarray:
    """Background image (size, size, 3) uint8 at supersampled resolution."""
    if spec.background in PLAIN_BACKGROUNDS:
        return np.broadcast_to(
            np.array(PLAIN_BACKGROUNDS[spec.background], np.uint8), (size, size, 3)
        ).copy()
    c1, c2 = (np.array(c, np.float32) for c in spec.bg_colours)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if spec.background == "striped":
        a = np.deg2rad(spec.texture_angle)
        u = xx * np.cos(a) + yy * np.sin(a)
        w = (np.floor(u / (spec.texture_period / 2)) % 2)[..., None]
    elif spec.background == "dotted":
        p = spec.texture_period
        dx = (xx % p) - p / 2
        dy = (yy % p) - p / 2
        w = ((dx**2 + dy**2) < (0.28 * p) ** 2).astype(np.float32)[..., None]
    elif spec.background == "grassy":
        rng = np.random.default_rng(spec.texture_seed)
        small = rng.random((12, 12)).astype(np.float32)
        img = Image.fromarray((small * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        w = (np.asarray(img, np.float32) / 255.0)[..., None]
    else:
        raise ValueError(f"unknown background {spec.background!r}: choose one of {BACKGROUNDS}")
    return (c1 * (1 - w) + c2 * w).clip(0, 255).astype(np.uint8)


def _object_fill(obj: ShapeObject, size: int) -> np.ndarray:
    """Fill image (size, size, 3) for an object: solid colour or its pattern."""
    c1 = np.array(COLOURS[obj.colour], np.float32)
    if obj.pattern == "solid":
        return np.broadcast_to(c1, (size, size, 3))
    c2 = np.array(COLOURS[obj.colour2 or "white"], np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a = np.deg2rad(obj.angle)
    u = (xx - obj.cx) * np.cos(a) + (yy - obj.cy) * np.sin(a)
    v = -(xx - obj.cx) * np.sin(a) + (yy - obj.cy) * np.cos(a)
    if obj.pattern == "striped":
        w = (np.floor(v / (obj.radius * 0.5)) % 2)[..., None]
    elif obj.pattern == "two-tone":
        w = (u > 0).astype(np.float32)[..., None]
    elif obj.pattern == "dotted":
        p = obj.radius * 0.6
        d = ((u % p) - p / 2) ** 2 + ((v % p) - p / 2) ** 2
        w = (d < (0.3 * p) ** 2).astype(np.float32)[..., None]
    else:
        raise ValueError(f"unknown pattern {obj.pattern!r}: choose one of {PATTERNS}")
    return c1 * (1 - w) + c2 * w


def _box_down(a: np.ndarray, f: int) -> np.ndarray:
    h, w = a.shape[:2]
    return a.reshape(h // f, f, w // f, f, *a.shape[2:]).mean(axis=(1, 3))


def render_scene(spec: SceneSpec, size: int = 64, caption: str | None = None) -> Scene:
    """Draw a scene at ``size`` x ``size``.

    Args:
        spec: the layout.
        size: side in pixels, >= 8.
        caption: the caption (default: `describe` of ``spec``).

    Returns:
        The `Scene`: image, masks and caption.

    Raises:
        ValueError: ``size`` < 8, or an unknown shape, background or pattern.
    """
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")
    big = size * SUPERSAMPLE
    canvas = _texture(spec, big).astype(np.float32)
    owner = np.zeros((big, big), np.int64)  # 0 = background, i = object i
    for i, obj in enumerate(spec.objects, start=1):
        m = Image.new("L", (big, big), 0)
        poly = shape_polygon(obj.shape, obj.cx * big, obj.cy * big, obj.radius * big, obj.angle)
        ImageDraw.Draw(m).polygon(poly, fill=255)
        inside = np.asarray(m) > 127
        canvas[inside] = _object_fill(obj, big)[inside]
        owner[inside] = i
    image = _box_down(canvas, SUPERSAMPLE).round().clip(0, 255).astype(np.uint8)
    k = len(spec.objects)
    onehot = (owner[None] == np.arange(k + 1)[:, None, None]).astype(np.float32)
    cover = _box_down(onehot.transpose(1, 2, 0), SUPERSAMPLE).transpose(2, 0, 1)
    masks = cover.argmax(0)[None] == np.arange(k + 1)[:, None, None]
    words = [(o.colour, o.shape) for o in spec.objects]
    return Scene(image, masks, caption if caption is not None else describe(spec), spec, words)


# ----------------------------------------------------------------------------- sampling
def describe(spec: SceneSpec, order=None, prefix: str = "", with_colour=True,
             with_background=True, with_pattern=False) -> str:
    """Caption such as 'a red star and a blue circle on a striped background'.

    Args:
        spec: the layout.
        order: the objects' order in the caption (default: drawing order).
        prefix: put in front, e.g. "a photo of ".
        with_colour: name the objects' colours.
        with_background: name the background.
        with_pattern: name the objects' patterns.

    Returns:
        The caption.
    """
    objs = [spec.objects[i] for i in (order if order is not None else range(len(spec.objects)))]
    phrases = [o.phrase(with_colour, with_pattern) for o in objs]
    text = " and ".join(phrases)
    if with_background:
        text += f" on {'an' if spec.background[0] in 'aeiou' else 'a'} {spec.background} background"
    return prefix + text


def sample_scene(seed: int | None = None, rng: np.random.Generator | None = None,
                 n_objects: int | None = None, shapes=SHAPES, colours=tuple(COLOURS),
                 backgrounds=BACKGROUNDS, patterns=("solid",), max_rotation: float = 25.0,
                 max_overlap: float = 0.15, pattern_p: float | None = None) -> SceneSpec:
    """Random scene layout. Shapes and colours are distinct within a scene.

    ``patterns`` defaults to solid only; pass e.g. ``PATTERNS`` to include patterned
    objects (each pattern equally likely). With ``pattern_p`` an object is patterned with
    that probability (then one of the non-solid ``patterns``, equally likely): the
    model-v2 training distribution uses ``PATTERNS`` with ``pattern_p=0.25``.

    Args:
        seed: seed of a new generator, when ``rng`` is not given.
        rng: the random generator to draw from.
        n_objects: 1, 2 or 3 (default: random, 1 most likely).
        shapes: the shapes to choose from.
        colours: the colours to choose from.
        backgrounds: the backgrounds to choose from.
        patterns: the patterns to choose from.
        max_rotation: largest rotation in degrees, either way.
        max_overlap: how much two objects may overlap, as a fraction of the sum of their
            radii.
        pattern_p: probability that an object is patterned (None: every pattern equally
            likely).

    Returns:
        The `SceneSpec`.

    Raises:
        ValueError: ``n_objects`` is not 1, 2 or 3.
    """
    if rng is None:
        rng = np.random.default_rng(seed)
    k = int(n_objects if n_objects is not None else rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    if not 1 <= k <= 3:
        raise ValueError(f"n_objects must be 1, 2 or 3, got {k}")
    shp = rng.choice(len(shapes), k, replace=False)
    col = rng.choice(len(colours), k, replace=False)
    background = str(backgrounds[rng.integers(len(backgrounds))])
    objects: list[ShapeObject] = []
    rmin, rmax = RADIUS[k]
    for i in range(k):
        for _attempt in range(200):
            r = rng.uniform(rmin, rmax)
            cx, cy = rng.uniform(r, 1 - r, size=2)
            ok = all(
                math.hypot(cx - o.cx, cy - o.cy) > (r + o.radius) * (1 - max_overlap)
                for o in objects
            )
            if ok:
                break
        if pattern_p is None:
            pattern = str(patterns[rng.integers(len(patterns))])
        else:
            fancy = [p for p in patterns if p != "solid"]
            pattern = str(fancy[rng.integers(len(fancy))]) if fancy and rng.random() < pattern_p \
                else "solid"
        colour2 = None
        if pattern != "solid":
            others = [c for c in COLOURS if c != colours[col[i]]]
            colour2 = str(others[rng.integers(len(others))])
        objects.append(ShapeObject(
            shape=str(shapes[shp[i]]), colour=str(colours[col[i]]), cx=float(cx), cy=float(cy),
            radius=float(r), angle=float(rng.uniform(-max_rotation, max_rotation)),
            pattern=pattern, colour2=colour2,
        ))
    bg_colours: tuple = ()
    if background in TEXTURED_BACKGROUNDS:
        if background == "grassy":
            bg_colours = ((40, 90, 30), (120, 160, 60))
        else:
            base = rng.uniform(60, 200)
            bg_colours = (tuple([int(base)] * 3), tuple([int(min(255, base + 55))] * 3)) \
                if rng.random() < 0.5 else \
                (tuple([int(base)] * 3), tuple([int(max(0, base - 55))] * 3))
    return SceneSpec(objects, background, bg_colours, int(rng.integers(2**31)),
                     float(rng.uniform(0, 180)), float(rng.uniform(0.16, 0.25)))


def sample_caption(spec: SceneSpec, rng: np.random.Generator,
                   with_pattern: bool = False) -> tuple[str, list[int]]:
    """A varied training caption.

    Args:
        spec: the layout.
        rng: the random generator to draw from.
        with_pattern: name the objects' patterns.

    Returns:
        (caption, object order in the caption).
    """
    order = list(rng.permutation(len(spec.objects)))
    prefix = PREFIXES[rng.integers(len(PREFIXES))]
    with_colour = rng.random() > 0.07
    with_background = rng.random() > 0.10
    return describe(spec, order, prefix, with_colour, with_background, with_pattern), order


def vocabulary() -> list[str]:
    """Every word a caption of the world can contain (the tokenizer's vocabulary).

    Returns:
        The words, each once.
    """
    words = list(CAPTION_WORDS) + list(SHAPES) + list(COLOURS) + list(BACKGROUNDS)
    words += ["striped", "two-tone", "dotted", "solid"]
    out: list[str] = []
    for w in words:
        if w not in out:
            out.append(w)
    return out


def make_dataset(n: int, seed: int = 0, size: int = 64, with_pattern: bool = False,
                 **scene_kwargs):
    """n training scenes with varied captions.

    Args:
        n: number of scenes.
        seed: seed of the generator.
        size: side in pixels.
        with_pattern: captions name patterns.
        **scene_kwargs: go to `sample_scene`.

    Returns:
        A dict: images (n, H, W, 3) uint8, masks list of (K+1, H, W) bool, captions list,
            orders list (object index order in caption), specs list.
    """
    rng = np.random.default_rng(seed)
    images = np.zeros((n, size, size, 3), np.uint8)
    masks, captions, orders, specs = [], [], [], []
    for i in range(n):
        spec = sample_scene(rng=rng, **scene_kwargs)
        caption, order = sample_caption(spec, rng, with_pattern)
        sc = render_scene(spec, size, caption)
        images[i] = sc.image
        masks.append(sc.masks)
        captions.append(caption)
        orders.append(order)
        specs.append(spec)
    return {"images": images, "masks": masks, "captions": captions, "orders": orders,
            "specs": specs}


def to_pil(image: np.ndarray, scale: int = 1) -> Image.Image:
    """A PIL image of a uint8 array, enlarged ``scale`` times (nearest neighbour).

    Args:
        image: (H, W, 3) image.
        scale: integer enlargement.

    Returns:
        The PIL image.
    """
    img = Image.fromarray(np.asarray(image, np.uint8))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "PATTERNS",
    "SHAPES",
    "Scene",
    "SceneSpec",
    "ShapeObject",
    "describe",
    "make_dataset",
    "render_scene",
    "sample_caption",
    "sample_scene",
    "shape_polygon",
    "to_pil",
    "vocabulary",
]
