"""Interactive explorers for the notebooks (ipywidgets).

Widgets are thin: the logic behind every slider is a pure function below
(``threshold_view``, ``crf_view``, ``attention_view``), unit-tested, and each explorer just
draws its result. Every explorer returns an ``ipywidgets.interactive``; set
``w.children[i].value`` to move a slider from code (its ``.result`` holds the view dict).
"""

from __future__ import annotations

import numpy as np
import torch

from .. import crf as _crf
from .. import masks as _masks


# ----------------------------------------------------------------------------- pure logic
def threshold_view(attn_map, threshold: float = 0.5, method: str = "threshold",
                   gt_mask=None, normalize_mode: str = "minmax", size=None) -> dict:
    """Normalise an attention map, binarise it, and score it against a ground-truth mask.

    The map is upsampled (bilinear) to the mask's size (or ``size``) before thresholding.

    Args:
        attn_map: (h, w) float.
        threshold: the threshold of ``method="threshold"``.
        method: ``"threshold"``, ``"mean"`` or ``"otsu"`` (as for
            `conceptlab.masks.binarize`).
        gt_mask: (H, W) bool or None.
        normalize_mode: as for `conceptlab.masks.normalize`.
        size: (H, W) to upsample to, instead of the mask's size.

    Returns:
        ``{"map": (H, W) float in [0, 1], "mask": (H, W) bool, "iou": float | None,
            "threshold": the threshold used (Otsu / mean pick their own)}``.

    Raises:
        ValueError: ``method`` is unknown.
    """
    m = torch.as_tensor(np.asarray(attn_map), dtype=torch.float32)
    target = size or (None if gt_mask is None else np.asarray(gt_mask).shape)
    if target is not None and tuple(m.shape) != tuple(target):
        m = _masks.resize_map(m, tuple(target))
    m = torch.as_tensor(_masks.normalize(m, normalize_mode))
    if method == "threshold":
        used = float(threshold)
    elif method == "mean":
        used = float(m.mean())
    elif method == "otsu":
        used = float(_masks.otsu_threshold(m))
    else:
        raise ValueError(f"method must be 'threshold', 'mean' or 'otsu', got {method!r}")
    mask = torch.as_tensor(_masks.binarize(m, method, threshold))
    out = {"map": m.numpy(), "mask": mask.numpy(), "threshold": used, "iou": None}
    if gt_mask is not None:
        out["iou"] = float(_masks.iou(mask.numpy(), np.asarray(gt_mask, bool)))
    return out


def crf_view(image, maps, *, background_threshold: float = 0.3, sxy_bilateral: float | None = None,
             srgb: float | None = None, compat_bilateral: float | None = None,
             n_iters: int | None = None,
             temperature: float = 0.1, gt_masks=None, backend: str = "auto") -> dict:
    """Masks before and after the DenseCRF for K concept maps, with IoUs if ground truth.

    CRF parameters left as None take ``conceptlab.crf.DEFAULT_CRF_PARAMS``.

    Args:
        image: (H, W, 3) uint8.
        maps: (K, h, w) raw attention.
        background_threshold: as for `conceptlab.masks.assign_masks`.
        sxy_bilateral: CRF parameter, or None.
        srgb: CRF parameter, or None.
        compat_bilateral: CRF parameter, or None.
        n_iters: CRF parameter, or None.
        temperature: as for `conceptlab.masks.unary_from_maps`.
        gt_masks: (K, H, W) bool or None.
        backend: as for `conceptlab.crf.dense_crf`.

    Returns:
        ``{"before": (K, H, W) bool, "after": (K, H, W) bool, "iou_before": [K] | None,
            "iou_after": [K] | None, "backend": str}``.
    """
    img = np.asarray(image, np.uint8)
    H, W = img.shape[:2]
    m = torch.as_tensor(np.asarray(maps), dtype=torch.float32)
    up = _masks.resize_map(m, (H, W)).clamp_min(0)
    before = np.asarray(_masks.assign_masks(up, background_threshold), bool)
    params = {k: v for k, v in dict(sxy_bilateral=sxy_bilateral, srgb=srgb,
                                    compat_bilateral=compat_bilateral, n_iters=n_iters).items()
              if v is not None}
    if "n_iters" in params:
        params["n_iters"] = int(params["n_iters"])
    probs = _masks.unary_from_maps(up, background_threshold, temperature)
    res = _crf.dense_crf(img, probs, backend=backend, **params)
    after = np.asarray(_masks.labels_to_masks(res.labels, m.shape[0]), bool)
    out = {"before": before, "after": after, "backend": res.backend,
           "iou_before": None, "iou_after": None}
    if gt_masks is not None:
        gt = np.asarray(gt_masks, bool)
        out["iou_before"] = [float(_masks.iou(before[k], gt[k])) for k in range(len(gt))]
        out["iou_after"] = [float(_masks.iou(after[k], gt[k])) for k in range(len(gt))]
    return out


def attention_view(maps, word: str, layer: str = "all", timestep: int | str = "all",
                   size=None) -> dict:
    """One word's map from `conceptlab.maps.AttentionMaps`.

    Args:
        maps: the `conceptlab.maps.AttentionMaps`.
        word: a word of the prompt.
        layer: one layer, or ``"all"`` (all default layers).
        timestep: one timestep index, or ``"all"`` (the average over all).
        size: (H, W) to upsample to, or None.

    Returns:
        ``{"map": (h, w) float in [0, 1], "t": the timestep value or None, "layer": ...}``.
    """
    layers = None if layer == "all" else [layer]
    ts = None if timestep == "all" else [int(timestep)]
    m = maps.for_word(word, size=size, layers=layers, timesteps=ts)
    t = None if timestep == "all" else int(maps.timesteps[int(timestep)])
    return {"map": m.numpy(), "t": t, "layer": layer}


def discovery_view(discovery, threshold: float) -> dict:
    """The concepts ``discover_concepts`` would find with another merge threshold.

    Args:
        discovery: a :class:`conceptlab.discovery.Discovery` of ``method="agglomerative"``.
        threshold: the relative merge distance at which the tree is cut, in (0, 1].

    Returns:
        ``{"k", "grid_labels" (h, w), "scores"}``: K, the attention grid's clusters (small
            clusters absorbed, as the library does) and the relative merge distances.

    Raises:
        ValueError: the discovery did not merge a tree (``method`` is not "agglomerative").
    """
    from ..discovery import cluster_cells

    if discovery.method != "agglomerative":
        raise ValueError(f"the threshold cuts the tree of method='agglomerative'; this "
                         f"discovery used {discovery.method!r}")
    f = discovery.features.reshape(-1, discovery.features.shape[-1]).astype(np.float64)
    labels, _, scores = cluster_cells(f, discovery.attention_shape, threshold=threshold)
    return {"k": int(labels.max()) + 1, "grid_labels": labels, "scores": scores}


# ----------------------------------------------------------------------------- explorers
def _show(images, titles, suptitle=None):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(images), figsize=(2.2 * len(images), 2.5), squeeze=False)
    for ax, im, t in zip(axes[0], images, titles):
        ax.imshow(im, cmap="magma" if np.asarray(im).ndim == 2 else None, vmin=0,
                  interpolation="nearest")
        ax.set_title(t, fontsize=8)
        ax.set_axis_off()
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    plt.show()


def threshold_explorer(image, attn_map, gt_mask=None, threshold: float = 0.5):
    """Slider: threshold on a (min-max normalised) attention map -> live mask and IoU.

    Args:
        image: (H, W, 3) image.
        attn_map: (h, w) attention map.
        gt_mask: (H, W) bool or None.
        threshold: the slider's start value.

    Returns:
        The ``ipywidgets.interactive``.
    """
    import ipywidgets as w

    def f(threshold=threshold, method="threshold"):
        v = threshold_view(attn_map, threshold, method, gt_mask, size=np.asarray(image).shape[:2])
        iou = "" if v["iou"] is None else f"IoU {v['iou']:.2f}"
        _show([image, v["map"], v["mask"]], ["image", "attention (min-max)",
                                             f"mask > {v['threshold']:.2f}  {iou}"])
        return v

    return w.interactive(f, threshold=w.FloatSlider(value=threshold, min=0.0, max=1.0, step=0.05),
                         method=w.Dropdown(options=["threshold", "mean", "otsu"]))


def crf_explorer(image, maps, gt_masks=None, **defaults):
    """Sliders for the DenseCRF's bilateral kernel (sxy, srgb, compat) and iterations.

    Args:
        image: (H, W, 3) uint8.
        maps: (K, h, w) raw attention.
        gt_masks: (K, H, W) bool or None.
        **defaults: the sliders' start values, in place of ``DEFAULT_CRF_PARAMS``.

    Returns:
        The ``ipywidgets.interactive``.
    """
    import ipywidgets as w

    from .figures import overlay_masks

    p = dict(_crf.DEFAULT_CRF_PARAMS)
    p.update(defaults)

    def f(sxy_bilateral=p["sxy_bilateral"], srgb=p["srgb"],
          compat_bilateral=p["compat_bilateral"], n_iters=p["n_iters"], background_threshold=0.3):
        v = crf_view(image, maps, background_threshold=background_threshold,
                     sxy_bilateral=sxy_bilateral, srgb=srgb, compat_bilateral=compat_bilateral,
                     n_iters=n_iters, gt_masks=gt_masks)
        tb = ta = ""
        if v["iou_before"] is not None:
            tb = f"  mean IoU {np.mean(v['iou_before']):.2f}"
            ta = f"  mean IoU {np.mean(v['iou_after']):.2f}"
        _show([image, overlay_masks(image, v["before"]), overlay_masks(image, v["after"])],
              ["image", "argmax" + tb, f"+ CRF ({v['backend']})" + ta])
        return v

    return w.interactive(
        f, sxy_bilateral=w.FloatSlider(value=p["sxy_bilateral"], min=1, max=40, step=1),
        srgb=w.FloatSlider(value=p["srgb"], min=2, max=60, step=1),
        compat_bilateral=w.FloatSlider(value=p["compat_bilateral"], min=0, max=20, step=0.5),
        n_iters=w.IntSlider(value=p["n_iters"], min=0, max=20),
        background_threshold=w.FloatSlider(value=0.3, min=0.05, max=0.95, step=0.05))


def discovery_explorer(image, discovery, threshold: float | None = None):
    """Slider: the merge threshold -> K, the clusters of the attention grid, and where the
    threshold cuts the merge distances.

    Args:
        image: (H, W, 3) uint8, the discovered image.
        discovery: its :class:`conceptlab.discovery.Discovery` (``method="agglomerative"``).
        threshold: the slider's start value (default: the discovery's own).

    Returns:
        The ``ipywidgets.interactive``.
    """
    import ipywidgets as w
    import matplotlib.pyplot as plt

    start = discovery.threshold if threshold is None else threshold

    def f(threshold=start):
        v = discovery_view(discovery, threshold)
        fig, axes = plt.subplots(1, 3, figsize=(8, 2.6), width_ratios=[1, 1, 1.6])
        axes[0].imshow(image)
        axes[0].set_title("image", fontsize=8)
        axes[1].imshow(v["grid_labels"], cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
        axes[1].set_title(f"K = {v['k']}", fontsize=8)
        for ax in axes[:2]:
            ax.set_axis_off()
        last = v["scores"][-15:]
        axes[2].bar(np.arange(len(last)) - len(last) + 1, last, color="0.6")
        axes[2].axhline(threshold, color="C3", lw=1)
        axes[2].set_xlabel("merge (0: the last)", fontsize=8)
        axes[2].set_title("merge distance / largest", fontsize=8)
        fig.tight_layout()
        plt.show()
        return v

    return w.interactive(f, threshold=w.FloatSlider(value=start, min=0.05, max=1.0, step=0.05))


FUNCTION_WORDS = {"a", "an", "and", "on", "of", "with", "the", "photo", "picture", "image", "in",
                  "to", "front", "next", "beside", "together"}


def first_content_word(words) -> str:
    """The first word that is not a function word ('a', 'photo', 'of', ...).

    The word an explorer should open on (a shape word or a concept token rather than 'a').

    Args:
        words: the prompt's words.

    Returns:
        That word, or the first word if all are function words.

    Raises:
        ValueError: ``words`` is empty.
    """
    words = list(words)
    if not words:
        raise ValueError("no words to choose from")
    return next((x for x in words if x.lower() not in FUNCTION_WORDS), words[0])


def attention_explorer(image, maps, words=None):
    """Dropdowns / slider: word, layer and timestep of an AttentionMaps object.

    Opens on the first content word of the prompt (see `first_content_word`).

    Args:
        image: (H, W, 3) image.
        maps: the `conceptlab.maps.AttentionMaps`.
        words: the words to offer (default: the prompt's words).

    Returns:
        The ``ipywidgets.interactive``.
    """
    import ipywidgets as w

    from .figures import overlay_map

    words = words or maps.words
    layers = ["all"] + list(maps.layers)
    steps = ["all"] + list(range(len(maps.timesteps)))

    start = first_content_word(words)

    def f(word=start, layer="all", timestep="all"):
        v = attention_view(maps, word, layer, timestep)
        t = "all t" if v["t"] is None else f"t = {v['t']}"
        _show([image, v["map"], overlay_map(image, v["map"])],
              ["image", f"'{word}' ({t})", "overlay"],
              suptitle=None if layer == "all" else layer.replace(".processor", ""))
        return v

    return w.interactive(f, word=w.Dropdown(options=words, value=start),
                         layer=w.Dropdown(options=layers),
                         timestep=w.SelectionSlider(options=steps, value="all"))
