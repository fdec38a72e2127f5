"""A small shape/colour classifier that judges generated images of the shapes world.

It answers one question about an image: *which coloured shapes are in it?* The course uses
it to measure the **fidelity** of the bundled text-to-image model: for prompts naming one
or two coloured shapes on a background, the fraction of named objects that the generated
image shows with the named colour AND the named shape.

The network (``ShapeColourNet``, ~150k parameters, plain ``torch.nn``) reads a 64x64 RGB
scene and has three multi-label heads (independent sigmoids, BCE loss):

- ``colour`` (7 logits): which colours are present as objects (``world.COLOURS`` order);
- ``shape``  (5 logits): which shapes are present (``world.SHAPES`` order);
- ``pair``   (35 logits): which (colour, shape) combinations are present, index
  ``colour_index * 5 + shape_index`` (``PAIRS``).

The pair head is what ``judge`` uses for "both": with two objects in a prompt, "a red star
and a blue circle", an image showing a *blue star and a red circle* has both colours and
both shapes present, but neither named pair. Colour-and-shape presence would count it as
correct; the pair head does not.

It is trained on rendered world scenes (1-3 objects, every background; half of the objects
patterned, striped / two-tone / dotted with a second colour, labelled by their FIRST colour,
the one a caption names; half of the scenes with shapes / colours allowed to repeat, see
``render_scenes``) with augmentation that imitates the small VAE's output (blur or downsample-upsample, noise and single-pixel specks,
slight colour jitter), so that it judges generated images fairly. Training and held-out
scenes come from disjoint random streams (``scene_rng``); the measured held-out accuracy is
stored with the weights (``load_classifier().config["metrics"]``).

Generated images are VAE decodes: ``vae_ceiling(pipe.vae)`` scores VAE round trips of
held-out scenes, the fidelity a perfect denoiser would reach. Read fidelity against it.

    >>> clf = load_classifier()                       # data/classifier (shipped weights)
    >>> judge(images, [[("red", "star")], [("blue", "circle"), ("yellow", "heart")]])
    >>> fidelity(pipe, fidelity_prompts(2), n_per_prompt=2)   # {'colour': .., 'shape': ..}

This module is inference only; the training (augmentation, the blob test, the degraded
renders) is ``tools/train_judge.py``, which also wrote the shipped weights.

Why one module of about 770 lines (over a third of it docstrings): everything here is inference on one network (the
network, reading images, judging prompts, fidelity of a pipeline, the VAE ceiling); its
training lives in ``tools/train_judge.py``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..fileio import atomic_write_json
from . import world

COLOURS = tuple(world.COLOURS)
SHAPES = tuple(world.SHAPES)
PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES)
HEADS = {"colour": len(COLOURS), "shape": len(SHAPES), "pair": len(PAIRS)}
IMAGE_SIZE = 64
THRESHOLD = 0.5
DEFAULT_PATH = "data/classifier"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# Scenes are drawn from one random stream per (split, seed): the training and held-out
# streams never share a generator, so held-out scenes are never training scenes.
SPLITS = {"train": 0x7A11, "heldout": 0x4E1D}


# ----------------------------------------------------------------------------- network
class ConvBNReLU(nn.Sequential):
    """3x3 convolution (no bias), batch norm, ReLU.

    Args:
        cin: input channels.
        cout: output channels.
        stride: stride of the convolution.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class ShapeColourNet(nn.Module):
    """Small CNN: 64x64 RGB -> logits of the colour, shape and pair heads.

    64 --conv s2--> 32 --conv--> pool 16 --conv, conv--> pool 8 --conv--> global max+mean
    pooling -> one linear layer for all 47 logits. Max pooling over positions suits
    "is there an object like this anywhere" questions; the receptive field (~50 px) covers
    the largest object.

    Args:
        widths: channels of the five convolutions.
    """

    def __init__(self, widths=(24, 32, 64, 64, 128)):
        super().__init__()
        w = tuple(int(x) for x in widths)
        self.widths = w
        self.features = nn.Sequential(
            ConvBNReLU(3, w[0], stride=2),  # 32x32
            ConvBNReLU(w[0], w[1]),
            nn.MaxPool2d(2),  # 16x16
            ConvBNReLU(w[1], w[2]),
            ConvBNReLU(w[2], w[3]),
            nn.MaxPool2d(2),  # 8x8
            ConvBNReLU(w[3], w[4]),
        )
        self.head = nn.Linear(2 * w[4], sum(HEADS.values()))

    def forward(self, x: torch.Tensor) -> dict:
        """Logits of the three heads.

        Args:
            x: (N, 3, 64, 64) float in [0, 1].

        Returns:
            A dict of logits per head, ``{head: (N, k)}``.
        """
        h = self.features((x - 0.5) / 0.25)
        h = torch.cat([h.amax(dim=(2, 3)), h.mean(dim=(2, 3))], 1)
        logits = self.head(h)
        out, i = {}, 0
        for name, k in HEADS.items():
            out[name] = logits[:, i:i + k]
            i += k
        return out


def count_parameters(model: nn.Module) -> int:
    """The number of parameters of ``model``.

    Args:
        model: a torch module.

    Returns:
        The number of parameter elements.
    """
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- data
def scene_rng(split: str, seed: int = 0) -> np.random.Generator:
    """The random stream of scenes for a split and seed.

    Args:
        split: "train" or "heldout".
        seed: the seed within the split.

    Returns:
        The numpy generator.
    """
    return np.random.default_rng([SPLITS[split], int(seed)])


def labels_of(objects) -> dict:
    """Multi-hot targets for a list of (colour, shape).

    Args:
        objects: the (colour, shape) pairs of one image.

    Returns:
        ``{head: float32 array}``.
    """
    y = {name: np.zeros(k, np.float32) for name, k in HEADS.items()}
    for c, s in objects:
        ci, si = COLOURS.index(c), SHAPES.index(s)
        y["colour"][ci] = 1
        y["shape"][si] = 1
        y["pair"][ci * len(SHAPES) + si] = 1
    return y


def render_scenes(n: int, split: str = "heldout", seed: int = 0, independent: float = 0.0,
                  **scene_kwargs):
    """n rendered scenes: images (n, 64, 64, 3) uint8 and per image its (colour, shape)s.

    ``independent``: the fraction of scenes whose objects get their shape and colour drawn
    independently (repeats allowed, e.g. two circles). World scenes never repeat a shape or
    a colour; a classifier trained on them alone learns that prior ("three objects: three
    different shapes") and sees shapes that are not there when a generated image repeats one.

    Args:
        n: number of scenes.
        split: "train" or "heldout" (see `scene_rng`).
        seed: the seed within the split.
        independent: the fraction of scenes with independently drawn shapes and colours.
        **scene_kwargs: go to `conceptlab.shapes.world.sample_scene`.

    Returns:
        (images (n, 64, 64, 3) uint8, per image its list of (colour, shape)).
    """
    rng = scene_rng(split, seed)
    images = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    objects = []
    for i in range(n):
        spec = world.sample_scene(rng=rng, **scene_kwargs)
        if independent and rng.random() < independent:
            for o in spec.objects:
                o.shape = SHAPES[rng.integers(len(SHAPES))]
                o.colour = COLOURS[rng.integers(len(COLOURS))]
        images[i] = world.render_scene(spec, IMAGE_SIZE).image
        objects.append([(o.colour, o.shape) for o in spec.objects])
    return images, objects


# ----------------------------------------------------------------------------- image utils
def to_tensor(images) -> torch.Tensor:
    """Images -> (N, 3, 64, 64) float in [0, 1].

    Accepts a (N, H, W, 3) uint8 array (or float array in [0, 1]), a single image, or a
    list of PIL images / arrays. Images that are not 64x64 are RESIZED to 64x64 (bilinear,
    antialiased when shrinking): e.g. the tiny test pipeline makes 32x32 images.

    Args:
        images: the images, in one of the formats above (or a tensor).

    Returns:
        (N, 3, 64, 64) float in [0, 1].
    """
    if isinstance(images, torch.Tensor):
        x = images.float()
        if x.ndim == 4 and x.shape[1] != 3 and x.shape[-1] == 3:
            x = x.permute(0, 3, 1, 2)
        if x.max() > 1.5:
            x = x / 255.0
    else:
        if not isinstance(images, np.ndarray):
            images = [np.asarray(im.convert("RGB") if hasattr(im, "convert") else im)
                      for im in images]
            sizes = {im.shape for im in images}
            if len(sizes) > 1:  # mixed sizes: resize one by one
                return torch.cat([to_tensor(im[None]) for im in images])
            images = np.stack(images)
        a = np.asarray(images)
        if a.ndim == 3:
            a = a[None]
        x = torch.from_numpy(np.ascontiguousarray(a)).float()
        if a.dtype == np.uint8:
            x = x / 255.0
        x = x.permute(0, 3, 1, 2)
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                          align_corners=False, antialias=x.shape[-1] > IMAGE_SIZE)
    return x.clamp(0, 1).contiguous()


@torch.no_grad()
def predict(model: nn.Module, images, batch: int = 256) -> dict:
    """Probabilities of every head for images.

    Args:
        model: the classifier.
        images: the images (see `to_tensor` for formats).
        batch: images per forward pass.

    Returns:
        ``{head: (N, k) numpy}``.
    """
    x = to_tensor(images)
    model.eval()
    outs = {h: [] for h in HEADS}
    for i in range(0, len(x), batch):
        o = model(x[i:i + batch])
        for h in HEADS:
            outs[h].append(torch.sigmoid(o[h].float()))
    return {h: torch.cat(v).numpy() for h, v in outs.items()}


def targets(objects) -> torch.Tensor:
    """0/1 label vectors (colour, shape, pair heads concatenated) of scenes' objects.

    Args:
        objects: per scene, its (colour, shape) pairs.

    Returns:
        (N, 47) tensor.
    """
    ys = [labels_of(o) for o in objects]
    return torch.from_numpy(np.stack([np.concatenate([y[h] for h in HEADS]) for y in ys]))


def score(probs: dict, objects, threshold: float = THRESHOLD) -> dict:
    """Per-head accuracy per named object and false-positive rate over absent labels.

    ``accuracy``: fraction of objects whose colour / shape / pair is predicted present
    (prob > threshold). ``false_positive``: fraction of absent labels predicted present.
    ``exact``: fraction of images whose whole label set for that head is right.

    Args:
        probs: what `predict` returns.
        objects: per image, its (colour, shape) pairs.
        threshold: a label is predicted present above this probability.

    Returns:
        ``{head: {"accuracy", "false_positive", "exact"}}``.
    """
    y = targets(objects).numpy() > 0.5
    out, i = {}, 0
    for h, k in HEADS.items():
        p = probs[h] > threshold
        t = y[:, i:i + k]
        i += k
        out[h] = {
            "accuracy": float(p[t].mean()),
            "false_positive": float(p[~t].mean()),
            "exact": float((p == t).all(1).mean()),
        }
    return out


@torch.no_grad()
def vae_ceiling(vae, n: int = 300, seed: int = 0, model: nn.Module | None = None,
                batch: int = 50) -> dict:
    """Scores on held-out scenes passed through a VAE (encode, latent mean, decode).

    Generated images are VAE decodes, so this is the fidelity a perfect U-Net would get: it
    separates what the VAE loses (or what the classifier misjudges in VAE output) from what
    the denoiser gets wrong.

    Args:
        vae: the pipeline's VAE.
        n: number of held-out scenes.
        seed: picks the scenes.
        model: the classifier (default: ``load_classifier()``).
        batch: images per VAE pass.

    Returns:
        ``{"clean": score, "vae": score, "mse": float, "n_images": n}`` (scores as
            `score` returns them).
    """
    model = model if model is not None else load_classifier()
    images, objects = render_scenes(n, "heldout", 20_000 + seed)
    x = to_tensor(images)
    p = next(vae.parameters())
    size = vae.config.sample_size if isinstance(vae.config.sample_size, int) else IMAGE_SIZE
    xin = F.interpolate(x, size=(size, size), mode="area") if size != IMAGE_SIZE else x
    rec = []
    for i in range(0, n, batch):
        z = vae.encode((xin[i:i + batch] * 2 - 1).to(p.device, p.dtype)).latent_dist.mode()
        rec.append(((vae.decode(z).sample.float().cpu() + 1) / 2).clamp(0, 1))
    rec = to_tensor(torch.cat(rec))
    return {"clean": score(predict(model, x), objects), "vae": score(predict(model, rec), objects),
            "mse": float(((rec - x) ** 2).mean()), "n_images": n}


# ----------------------------------------------------------------------------- save / load
def _resolve(path) -> Path:
    """A relative path that does not exist from the working directory is looked up from
    the repository root (so notebooks in notebooks/ find data/classifier)."""
    p = Path(path)
    if not p.is_absolute() and not p.exists() and p.parts and p.parts[0] == "data":
        from ..models import data_dir

        alt = data_dir().joinpath(*p.parts[1:])
        if alt.exists():
            return alt
    return p


def save_classifier(model: ShapeColourNet, path=DEFAULT_PATH, metrics: dict | None = None):
    """Write ``model.safetensors`` (fp16) and ``config.json`` to ``path``.

    Args:
        model: the classifier.
        path: the folder to write.
        metrics: stored in ``config.json`` with the architecture and labels.

    Returns:
        ``path``.
    """
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous()
             for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(state, os.path.join(path, WEIGHTS_FILE))
    cfg = {
        "architecture": "ShapeColourNet", "widths": list(model.widths),
        "image_size": IMAGE_SIZE, "threshold": THRESHOLD,
        "heads": {"colour": list(COLOURS), "shape": list(SHAPES),
                  "pair": [f"{c} {s}" for c, s in PAIRS]},
        "parameters": count_parameters(model), "dtype": "float16",
        "metrics": metrics or {},
    }
    atomic_write_json(os.path.join(path, CONFIG_FILE), cfg, indent=1)
    return path


_CACHE: dict = {}


def load_classifier(path=DEFAULT_PATH, cache: bool = True) -> ShapeColourNet:
    """Load a saved classifier (float32, eval mode).

    ``model.config`` holds config.json (including its measured held-out accuracy under
    ``metrics``).

    Args:
        path: the folder; a relative path under ``data`` that does not exist is looked up
            in the bundled data folder (``models.data_dir()``).
        cache: reuse (and keep) the loaded model of the same folder.

    Returns:
        The `ShapeColourNet`.

    Raises:
        FileNotFoundError: the folder has no weights.
        RuntimeError: the weights do not match the architecture.
    """
    from safetensors.torch import load_file

    p = _resolve(path)
    key = str(p.resolve())
    if cache and key in _CACHE:
        return _CACHE[key]
    if not (p / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"no classifier weights at {p / WEIGHTS_FILE}; train them with "
                                "`python -m tools.train_judge`")
    with open(p / CONFIG_FILE) as f:
        cfg = json.load(f)
    model = ShapeColourNet(cfg["widths"])
    state = {k: v.float() for k, v in load_file(str(p / WEIGHTS_FILE)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.endswith("num_batches_tracked")]
    if bad or unexpected:
        raise RuntimeError(f"classifier weights do not match: missing {bad}, "
                           f"unexpected {unexpected}")
    model.config = cfg
    model.eval()
    if cache:
        _CACHE[key] = model
    return model


# ----------------------------------------------------------------------------- judging
def judge(images, objects, model: nn.Module | None = None,
          threshold: float = THRESHOLD) -> list[dict]:
    """Judge each named object of each image.

    Args:
        images: (N, H, W, 3) uint8 (or float in [0, 1]) or a list of PIL images; inputs
            that are not 64x64 are resized to 64x64 (see `to_tensor`).
        objects: per image, the list of (colour, shape) named in its prompt.
        model: defaults to ``load_classifier()``.
        threshold: a label is present above this probability.

    Returns:
        A flat list, one dict per named object, in order: ``image`` (index), ``colour``,
            ``shape``, ``colour_ok`` / ``shape_ok`` (the colour / shape head says present),
            ``both_ok`` (the PAIR head says this (colour, shape) combination is present;
            not ``colour_ok and shape_ok``, which would accept a swapped "blue star and red
            circle" for "a red star and a blue circle"), and the probabilities
            ``p_colour``, ``p_shape``, ``p_pair``.

    Raises:
        ValueError: the numbers of images and object lists differ.
    """
    model = model if model is not None else load_classifier()
    n = len(images)
    if len(objects) != n:
        raise ValueError(f"{n} images but {len(objects)} object lists")
    probs = predict(model, images)
    out = []
    for i, objs in enumerate(objects):
        for colour, shape in objs:
            ci, si = COLOURS.index(colour), SHAPES.index(shape)
            pc = float(probs["colour"][i, ci])
            ps = float(probs["shape"][i, si])
            pp = float(probs["pair"][i, ci * len(SHAPES) + si])
            out.append({"image": i, "colour": colour, "shape": shape,
                        "colour_ok": pc > threshold, "shape_ok": ps > threshold,
                        "both_ok": pp > threshold,
                        "p_colour": pc, "p_shape": ps, "p_pair": pp})
    return out


def border_pixels(image: np.ndarray, border: int = 4) -> np.ndarray:
    """The ring of ``border`` pixels around an image.

    Args:
        image: (H, W, 3) image.
        border: width of the ring in pixels.

    Returns:
        (N, 3) float32 pixels.
    """
    im = np.asarray(image, dtype=np.float32)
    return np.concatenate([im[:border].reshape(-1, 3), im[-border:].reshape(-1, 3),
                           im[border:-border, :border].reshape(-1, 3),
                           im[border:-border, -border:].reshape(-1, 3)])


def as_uint8_batch(images) -> np.ndarray:
    """(N, H, W, 3) uint8 from one image or many.

    Args:
        images: PIL images, uint8 arrays, or floats in [0, 1]; one image or many.

    Returns:
        (N, H, W, 3) uint8.
    """
    if hasattr(images, "convert"):
        images = [images]
    if isinstance(images, (list, tuple)):
        images = [np.asarray(im.convert("RGB")) if hasattr(im, "convert") else np.asarray(im)
                  for im in images]
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.dtype != np.uint8:
        images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    return images


def _loop(a: np.ndarray, off: int) -> np.ndarray:
    """The pixels of the square loop ``off`` pixels in from the edge, in order around it."""
    H, W = a.shape[:2]
    return np.concatenate([a[off, off:W - off], a[off:H - off, W - 1 - off],
                           a[H - 1 - off, off:W - off][::-1], a[off:H - off, off][::-1]])


def background_features(image, ring: int = 8) -> dict:
    """What `classify_background` reads from the ``ring`` outer pixels of an image.

    Args:
        image: (H, W, 3) image.
        ring: width in pixels of the outer ring.

    Returns:
        ``median`` colour, ``crossings`` (most mid-level brightness crossings along one of
            the loops 1, 3, 5, 7 px in: 0-6 on plain backgrounds, where only an object edge
            crosses, 14-40 on textures) and ``balance`` (fraction of ring pixels on the
            minority side of the mid-level: ~0.5 for stripes, ~0.2 for dots).
    """
    im = np.asarray(image, np.float32)
    lum = im.mean(-1)
    crossings = 0
    for off in (1, 3, 5, 7):
        line = _loop(lum, off)
        line = (np.roll(line, 1) + line + np.roll(line, -1)) / 3  # pixel noise is no edge
        lo, hi = np.percentile(line, [5, 95])
        if hi - lo >= 30:
            above = line > (lo + hi) / 2
            crossings = max(crossings, int((above != np.roll(above, 1)).sum()))
    pixels = np.concatenate([_loop(im, o) for o in range(ring)])
    plum = pixels.mean(-1)
    lo, hi = np.percentile(plum, [5, 95])
    f = float((plum > (lo + hi) / 2).mean())
    return {"median": np.median(pixels, 0), "crossings": crossings, "balance": min(f, 1 - f)}


def classify_background(images, *, max_distance: float = 45.0, max_crossings: int = 10,
                        balance_split: float = 0.37) -> list[str]:
    """The background of each image, one of ``world.BACKGROUNDS``.

    No network: three rules on `background_features` (objects in the shapes world rarely
    reach the outer 8 pixels):

    1. green (median G above R and B by 15): "grassy";
    2. few brightness crossings (< ``max_crossings``) and a median colour within
       ``max_distance`` (RGB) of a plain background: the nearest plain background;
    3. otherwise a grey two-level texture: "striped" if ``balance`` > ``balance_split``,
       else "dotted".

    Its accuracy on held-out clean, degraded and VAE-decoded renders is printed by
    ``benchmarks/model_quality.py``.

    Args:
        images: one image or many (see `as_uint8_batch`).
        max_distance: rule 2's largest RGB distance to a plain background.
        max_crossings: rule 2's bound on the brightness crossings.
        balance_split: rule 3's split between "striped" and "dotted".

    Returns:
        One background name per image.
    """
    plain = {k: np.array(v, np.float32) for k, v in world.PLAIN_BACKGROUNDS.items()}
    out = []
    for im in as_uint8_batch(images):
        f = background_features(im)
        med = f["median"]
        dist = {k: float(np.linalg.norm(med - c)) for k, c in plain.items()}
        nearest = min(dist, key=dist.get)
        if med[1] > med[0] + 15 and med[1] > med[2] + 15:
            out.append("grassy")
        elif f["crossings"] < max_crossings and dist[nearest] < max_distance:
            out.append(nearest)
        else:
            out.append("striped" if f["balance"] > balance_split else "dotted")
    return out


def judge_background(images, names, *, max_distance: float = 45.0) -> np.ndarray:
    """Does each image show the named background (any of ``world.BACKGROUNDS``)?

    True where `classify_background` says that name. Checked against rendered scenes in
    the tests.

    Args:
        images: one image or many (see `as_uint8_batch`).
        names: one name, or one per image.
        max_distance: as for `classify_background`.

    Returns:
        A bool array, one entry per image.

    Raises:
        ValueError: the numbers of images and names differ, or a name is unknown.
    """
    images = as_uint8_batch(images)
    names = [names] * len(images) if isinstance(names, str) else list(names)
    if len(names) != len(images):
        raise ValueError(f"{len(images)} images but {len(names)} background names")
    for name in set(names):
        if name not in world.BACKGROUNDS:
            raise ValueError(f"unknown background {name!r}: choose one of {world.BACKGROUNDS}")
    said = classify_background(images, max_distance=max_distance)
    return np.array([got == name for got, name in zip(said, names)])


def named_background(prompt: str) -> str | None:
    """'... on a striped background' -> 'striped'.

    Args:
        prompt: the prompt.

    Returns:
        The background name, or None if the prompt names none.
    """
    m = re.search(r"\bon an? (\w+) background\b", prompt)
    return m.group(1) if m and m.group(1) in world.BACKGROUNDS else None


def fidelity_prompts(n: int = 20, seed: int = 0) -> list[tuple[str, list]]:
    """n prompts naming coloured shapes on a background.

    One shape at even positions, two at odd positions, with distinct colours and shapes.

    Args:
        n: number of prompts.
        seed: picks the prompts.

    Returns:
        ``[(prompt, [(colour, shape), ...]), ...]``, e.g.
            ``("a red star on a gray background", [("red", "star")])``.
    """
    rng = np.random.default_rng([0xF1DE, int(seed)])
    out = []
    for i in range(n):
        k = 1 + i % 2
        cols = rng.choice(len(COLOURS), k, replace=False)
        shps = rng.choice(len(SHAPES), k, replace=False)
        objs = [(COLOURS[c], SHAPES[s]) for c, s in zip(cols, shps)]
        bg = world.BACKGROUNDS[rng.integers(len(world.BACKGROUNDS))]
        phrases = [world.ShapeObject(s, c, 0.5, 0.5, 0.2).phrase() for c, s in objs]
        art = "an" if bg[0] in "aeiou" else "a"
        out.append((" and ".join(phrases) + f" on {art} {bg} background", objs))
    return out


def fidelity(pipe, prompts_objects, n_per_prompt: int = 4, seed: int = 0,
             guidance_scale: float = 7.5, steps: int = 25, model: nn.Module | None = None,
             batch_size: int | None = None, return_images: bool = False) -> dict:
    """Generation fidelity of a StableDiffusionPipeline, judged by the classifier.

    For each (prompt, objects) generates ``n_per_prompt`` images with generators seeded
    ``seed + i`` and judges every named object.

    Args:
        pipe: a StableDiffusionPipeline.
        prompts_objects: (prompt, [(colour, shape), ...]) pairs, e.g. `fidelity_prompts`.
        n_per_prompt: images per prompt.
        seed: image i of a prompt is seeded ``seed + i``.
        guidance_scale: the sampler's guidance scale.
        steps: the sampler's steps.
        model: the classifier (default: ``load_classifier()``).
        batch_size: images per pipeline call (default: ``n_per_prompt``).
        return_images: also return the generated images.

    Returns:
        Fractions of named objects with the right ``colour``, ``shape`` and ``both`` (pair
            head, see `judge`), the fraction of images that keep the prompt's named
            ``background`` (`judge_background`), the same split by the number of objects
            in the prompt (``by_count``), per-prompt results, counts, and with
            ``return_images`` the generated uint8 images (a list per prompt).
    """
    model = model if model is not None else load_classifier()
    batch_size = batch_size or n_per_prompt
    records, per_prompt, all_images, background_kept = [], [], [], []
    for prompt, objs in prompts_objects:
        imgs = []
        for j in range(0, n_per_prompt, batch_size):
            b = min(batch_size, n_per_prompt - j)
            gens = [torch.Generator().manual_seed(seed + j + i) for i in range(b)]
            res = pipe([prompt] * b, num_inference_steps=steps, guidance_scale=guidance_scale,
                       generator=gens, output_type="np")
            imgs.append((np.clip(res.images, 0, 1) * 255).round().astype(np.uint8))
        imgs = np.concatenate(imgs)
        recs = judge(imgs, [list(objs)] * len(imgs), model)
        for r in recs:
            r["prompt"], r["n_named"] = prompt, len(objs)
        records += recs
        per_prompt.append({"prompt": prompt, **_aggregate(recs)})
        bg = named_background(prompt)
        if bg is not None:
            kept = judge_background(imgs, bg)
            background_kept += kept.tolist()
            per_prompt[-1]["background"] = float(kept.mean())
        if return_images:
            all_images.append(imgs)
    out = _aggregate(records)
    out["background"] = float(np.mean(background_kept)) if background_kept else float("nan")
    out["by_count"] = {k: _aggregate([r for r in records if r["n_named"] == k])
                       for k in sorted({r["n_named"] for r in records})}
    out.update(n_images=len(prompts_objects) * n_per_prompt, per_prompt=per_prompt,
               records=records, guidance_scale=guidance_scale, steps=steps, seed=seed)
    if return_images:
        out["images"] = all_images
    return out


def _aggregate(records) -> dict:
    if not records:
        return {"colour": float("nan"), "shape": float("nan"), "both": float("nan"),
                "n_objects": 0}
    return {
        "colour": float(np.mean([r["colour_ok"] for r in records])),
        "shape": float(np.mean([r["shape_ok"] for r in records])),
        "both": float(np.mean([r["both_ok"] for r in records])),
        "n_objects": len(records),
    }


__all__ = [
    "COLOURS",
    "HEADS",
    "PAIRS",
    "SHAPES",
    "ShapeColourNet",
    "background_features",
    "border_pixels",
    "classify_background",
    "fidelity",
    "fidelity_prompts",
    "judge",
    "judge_background",
    "labels_of",
    "load_classifier",
    "named_background",
    "predict",
    "render_scenes",
    "save_classifier",
    "scene_rng",
    "score",
    "targets",
    "to_tensor",
    "vae_ceiling",
]
