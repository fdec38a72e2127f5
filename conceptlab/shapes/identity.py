"""Which pattern an object has, and how much a generated object looks like a given one.

The judge (`conceptlab.shapes.judge`) names colours and shapes. Learned concepts are
*instances* ("a blue star with thin white stripes"), so judging them needs two more things,
the shapes world's analogue of the paper's CLIP-I / Break-a-Scene's DINO similarity:

- `read_pattern`: solid / striped / two-tone / dotted, from a small network
  (``PatternNet``, ~25k parameters) that reads a 32x32 crop of the object alone (every
  pixel outside the object black, as Break-a-Scene blacks out the non-concept pixels);
- `identity_similarity`: the cosine similarity of `identity_features` of two
  objects: the object's colour histogram over the world's colours (main AND second colour,
  in proportion), the pattern network's features and the judge's shape probabilities,
  each unit-normalised, so that each counts one third.

An object is found in a generated image by `object_mask`: the pixels whose colour is
far from the image's border colour (the background), largest connected part kept. In a
source image the concept's own mask is used instead.

    >>> net = load_pattern_net()                       # data/classifier/pattern.safetensors
    >>> read_pattern(images, net)                      # ['striped', 'solid', ...]
    >>> identity_similarity(source_image, source_mask, generated_images)   # (n,) cosines

The network is trained by ``tools/train_pattern.py`` on rendered scenes (held-out
accuracy on clean and degraded renders is stored with the weights:
``load_pattern_net().config["metrics"]``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..fileio import atomic_write_json
from . import world

PATTERNS = tuple(world.PATTERNS)          # ("solid", "striped", "two-tone", "dotted")
CROP = 32
WEIGHTS_FILE = "pattern.safetensors"
CONFIG_FILE = "pattern.json"
_PALETTE = np.array([world.COLOURS[c] for c in world.COLOURS], np.float32)  # (7, 3)


# ----------------------------------------------------------------------------- the object
def object_mask(image: np.ndarray, min_distance: float = 60.0, ring: int = 3) -> np.ndarray:
    """The pixels far from the border's median colour, the largest connected part kept.

    Args:
        image: (H, W, 3) image.
        min_distance: RGB distance from the border's median colour of an object pixel.
        ring: width in pixels of the border.

    Returns:
        (H, W) bool: the largest connected part (4-neighbours); empty when nothing stands
            out from the background.
    """
    img = np.asarray(image, np.float32)
    border = np.concatenate([img[:ring].reshape(-1, 3), img[-ring:].reshape(-1, 3),
                             img[:, :ring].reshape(-1, 3), img[:, -ring:].reshape(-1, 3)])
    bg = np.median(border, 0)
    fg = np.linalg.norm(img - bg, axis=-1) > min_distance
    if not fg.any():
        return fg
    from scipy import ndimage

    labels, n = ndimage.label(fg)
    sizes = ndimage.sum(fg, labels, range(1, n + 1))
    return labels == (1 + int(np.argmax(sizes)))


def object_crop(image: np.ndarray, mask: np.ndarray | None = None, size: int = CROP) -> np.ndarray:
    """The object's bounding square, every pixel outside the mask black, resized.

    Args:
        image: (H, W, 3) uint8 image.
        mask: (H, W) bool; defaults to `object_mask`; an empty mask gives the whole image.
        size: side of the crop in pixels.

    Returns:
        (size, size, 3) float in [0, 1].
    """
    img = np.asarray(image, np.float32) / 255.0
    m = object_mask(image) if mask is None else np.asarray(mask, bool)
    if not m.any():
        m = np.ones(img.shape[:2], bool)
    ys, xs = np.nonzero(m)
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    half = max(ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()) / 2 + 1
    pad = int(np.ceil(half)) + 1
    big = np.pad(img * m[..., None], ((pad, pad), (pad, pad), (0, 0)))
    y0, x0 = round(cy - half) + pad, round(cx - half) + pad
    side = round(2 * half)
    crop = torch.from_numpy(big[y0:y0 + side, x0:x0 + side]).permute(2, 0, 1)[None]
    out = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False,
                        antialias=True)
    return out[0].permute(1, 2, 0).clamp(0, 1).numpy()


def colour_histogram(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Fractions of the object's pixels nearest to each world colour.

    Args:
        image: (H, W, 3) image.
        mask: (H, W) bool; defaults to `object_mask` (an empty mask: all pixels).

    Returns:
        (7,) float32 fractions, in ``world.COLOURS`` order.
    """
    img = np.asarray(image, np.float32)
    m = object_mask(image) if mask is None else np.asarray(mask, bool)
    px = img[m] if m.any() else img.reshape(-1, 3)
    nearest = np.linalg.norm(px[:, None] - _PALETTE[None], axis=-1).argmin(1)
    return np.bincount(nearest, minlength=len(_PALETTE)).astype(np.float32) / len(px)


# ----------------------------------------------------------------------------- the network
class PatternNet(nn.Module):
    """32x32 object crop -> 4 pattern logits; `features` is the 64-d pooled vector.

    Args:
        widths: channels of the three convolutions.
    """

    def __init__(self, widths=(16, 32, 64)):
        super().__init__()
        layers, cin = [], 3
        for w in widths:
            layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            cin = w
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(cin, len(PATTERNS))
        self.widths = tuple(widths)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features of crops.

        Args:
            x: (N, 3, 32, 32) crops in [0, 1].

        Returns:
            (N, widths[-1]) features.
        """
        return self.trunk(x).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pattern logits of crops.

        Args:
            x: (N, 3, 32, 32) crops in [0, 1].

        Returns:
            (N, 4) logits, in `PATTERNS` order.
        """
        return self.head(self.features(x))


def crops_tensor(crops) -> torch.Tensor:
    """The network's input from crops.

    Args:
        crops: one (H, W, 3) crop or many (see `object_crop`).

    Returns:
        (N, 3, H, W) float tensor.
    """
    a = np.asarray(crops, np.float32)
    if a.ndim == 3:
        a = a[None]
    return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


def save_pattern_net(net: PatternNet, folder, metrics: dict | None = None):
    """Write the network (fp16 ``pattern.safetensors``) and its ``pattern.json`` to ``folder``.

    Args:
        net: the network.
        folder: the folder to write.
        metrics: stored in ``pattern.json`` with the architecture and labels.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
          for k, v in net.state_dict().items()}
    save_file(sd, str(folder / WEIGHTS_FILE))
    atomic_write_json(folder / CONFIG_FILE,
                      {"architecture": "PatternNet", "widths": list(net.widths), "crop": CROP,
                       "patterns": list(PATTERNS), "metrics": metrics or {}}, indent=1)


_CACHE: dict = {}


def load_pattern_net(folder=None) -> PatternNet:
    """The shipped pattern network (``data/classifier``), in eval mode, cached.

    Args:
        folder: the folder to load from (default: the bundled ``classifier`` folder).

    Returns:
        The `PatternNet`.

    Raises:
        FileNotFoundError: the folder has no pattern network.
    """
    from safetensors.torch import load_file

    from ..models import data_dir

    folder = Path(folder) if folder is not None else data_dir() / "classifier"
    key = str(folder.resolve())
    if key in _CACHE:
        return _CACHE[key]
    cfg_path, w_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not (cfg_path.exists() and w_path.exists()):
        raise FileNotFoundError(f"no pattern network in {folder} ({CONFIG_FILE} and "
                                f"{WEIGHTS_FILE}): run python -m tools.train_pattern")
    cfg = json.loads(cfg_path.read_text())
    net = PatternNet(tuple(cfg["widths"]))
    net.load_state_dict({k: v.float() for k, v in load_file(str(w_path)).items()})
    net.config = cfg
    net.eval()
    _CACHE[key] = net
    return net


# ----------------------------------------------------------------------------- reading objects
@torch.no_grad()
def read_pattern(images, net: PatternNet | None = None, masks=None) -> list[str]:
    """The pattern of the (main) object of each image.

    Args:
        images: uint8 (N, H, W, 3) or a list.
        net: the pattern network (default: `load_pattern_net`).
        masks: per image, the object's mask (default: `object_mask`).

    Returns:
        One of `PATTERNS` per image.
    """
    net = net or load_pattern_net()
    images = list(images)
    masks = [None] * len(images) if masks is None else list(masks)
    x = crops_tensor([object_crop(im, m) for im, m in zip(images, masks)])
    return [PATTERNS[i] for i in net(x).argmax(1).tolist()]


@torch.no_grad()
def identity_features(images, masks=None, net: PatternNet | None = None,
                      judge_model=None) -> np.ndarray:
    """Identity features of the (main) object of each image.

    Args:
        images: N images.
        masks: per image, the object's mask (default: `object_mask`).
        net: the pattern network (default: `load_pattern_net`).
        judge_model: the shapes judge (default: its ``load_classifier()``).

    Returns:
        (N, 7 + 64 + 5): colour histogram, pattern features, judge shape probabilities,
            each part unit-normalised and the whole divided by sqrt(3).
    """
    from .judge import load_classifier, predict

    net = net or load_pattern_net()
    judge_model = judge_model or load_classifier()
    images = [np.asarray(im) for im in images]
    masks = [None] * len(images) if masks is None else list(masks)
    masks = [object_mask(im) if m is None else np.asarray(m, bool) for im, m in zip(images, masks)]
    hist = np.stack([colour_histogram(im, m) for im, m in zip(images, masks)])
    pat = net.features(crops_tensor([object_crop(im, m) for im, m in zip(images, masks)]))
    # the judge reads whole scenes: show it the object alone on black
    alone = np.stack([(im * m[..., None]).astype(np.uint8) for im, m in zip(images, masks)])
    shape = predict(judge_model, alone)["shape"]
    parts = [torch.as_tensor(hist), pat.float(), torch.as_tensor(shape).float()]
    return torch.cat([F.normalize(p, dim=1) for p in parts], 1).numpy() / np.sqrt(3)


def identity_similarity(source_image, source_mask, images, **kw) -> np.ndarray:
    """Cosine similarity between the source concept and the main object of each image.

    Args:
        source_image: (H, W, 3) source image.
        source_mask: (H, W) bool, the concept's mask in it.
        images: N generated images.
        **kw: go to `identity_features` (``net``, ``judge_model``).

    Returns:
        (N,) cosines; 1 = same colours in the same proportions, same pattern, same shape.
    """
    ref = identity_features([source_image], [source_mask], **kw)[0]
    feats = identity_features(images, None, **kw)
    return feats @ ref


__all__ = ["PATTERNS", "PatternNet", "colour_histogram", "identity_features",
           "identity_similarity", "load_pattern_net", "object_crop", "object_mask",
           "read_pattern", "save_pattern_net"]
