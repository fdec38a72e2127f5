"""Interactive explorers for the notebooks (ipywidgets).

Widgets are thin: the logic behind every slider is a pure function below
(``threshold_view``, ``crf_view``, ``attention_view``), unit-tested, and each explorer just
draws its result. Every explorer returns an ``ipywidgets.interactive``; set
``w.children[i].value`` to move a slider from code (its ``.result`` holds the view dict).

One pair (a ``*_view`` function and its ``*_explorer``) per lesson's widget: lesson 00
composes a scene (``scene_view``), 01 attention maps, 02 thresholds and the CRF, 03 the
token-learning runs (``token_run_view``), 04 the attention loss (``token_attention_view``),
05 the EM steps (``em_step_view``), 06 precomputed sample grids (``sample_grid_view``), 07
the discovery threshold (``discovery_view``).

Why one module of about 800 lines (most of it docstrings): every explorer shares the same
small drawing and slider helpers, and a lesson imports its widget from one place; the pure
functions have no dependencies beyond numpy and the library's masks.
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

    from .figures import label_image

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
        _show([image, label_image(image, v["before"]), label_image(image, v["after"])],
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


# ----------------------------------------------------------------------------- lesson 00
def scene_view(n_objects: int = 2, shape: str = "star", colour: str = "red",
               pattern: str = "solid", background: str = "gray", seed: int = 0,
               size: int = 64) -> dict:
    """A scene of the shapes world whose first object is chosen, with its true masks.

    The layout (positions, sizes, angles, the other objects) comes from
    `conceptlab.shapes.world.sample_scene` with ``seed``; the first object then gets
    ``shape``, ``colour`` and ``pattern`` (a patterned object's second colour is white, or red
    on a white object), and an other object that had that shape or colour swaps with it, so
    shapes and colours stay distinct within the scene.

    Args:
        n_objects: 1, 2 or 3.
        shape: one of `world.SHAPES`.
        colour: one of `world.COLOURS`.
        pattern: one of `world.PATTERNS`.
        background: one of `world.BACKGROUNDS`.
        seed: seed of the layout.
        size: side of the image in pixels.

    Returns:
        ``{"image": (size, size, 3) uint8, "masks": (n_objects + 1, size, size) bool
            ([0] background, [i] object i in drawing order), "names": one name per object
            mask (e.g. "red striped star"), "caption": the scene's caption (patterns
            named), "pixels": pixels per mask (background first), "scene": the rendered
            `conceptlab.shapes.world.Scene` (its ``spec`` lists the objects)}``.

    Raises:
        ValueError: an unknown shape, colour, pattern or background, or ``n_objects`` not
            1, 2 or 3.
    """
    from ..shapes import world

    for value, options, what in ((shape, world.SHAPES, "shape"), (colour, world.COLOURS, "colour"),
                                 (pattern, world.PATTERNS, "pattern"),
                                 (background, world.BACKGROUNDS, "background")):
        if value not in options:
            raise ValueError(f"unknown {what} {value!r}: choose one of {tuple(options)}")
    spec = world.sample_scene(seed=seed, n_objects=n_objects, backgrounds=(background,))
    first = spec.objects[0]
    for o in spec.objects[1:]:
        if o.shape == shape:
            o.shape = first.shape
        if o.colour == colour:
            o.colour = first.colour
    first.shape, first.colour, first.pattern = shape, colour, pattern
    first.colour2 = None if pattern == "solid" else ("red" if colour == "white" else "white")
    scene = world.render_scene(spec, size, world.describe(spec, with_pattern=True))
    names = [o.phrase(with_pattern=True).split(" ", 1)[1] for o in spec.objects]
    return {"image": scene.image, "masks": scene.masks, "names": names,
            "caption": scene.caption, "pixels": [int(m.sum()) for m in scene.masks],
            "scene": scene}


def scene_explorer(n_objects: int = 2, shape: str = "star", colour: str = "red",
                   pattern: str = "solid", background: str = "gray", seed: int = 0):
    """Sliders and dropdowns: compose a scene (`scene_view`) and see it with its true masks.

    Rendering takes milliseconds, so the explorer draws each scene as it is asked for.

    Args:
        n_objects: the slider's start value (1 to 3).
        shape: the first object's shape at start.
        colour: the first object's colour at start.
        pattern: the first object's pattern at start.
        background: the background at start.
        seed: the layout's seed at start.

    Returns:
        The ``ipywidgets.interactive``.
    """
    import ipywidgets as w
    import matplotlib.pyplot as plt

    from ..shapes import world
    from .figures import draw_masks

    def f(n_objects=n_objects, shape=shape, colour=colour, pattern=pattern,
          background=background, seed=seed):
        v = scene_view(n_objects, shape, colour, pattern, background, seed)
        fig, axes = plt.subplots(1, 2, figsize=(5.0, 3.0))
        axes[0].imshow(v["image"], interpolation="nearest")
        axes[0].set_title(v["caption"].replace(" on ", "\non "), fontsize=7)
        axes[0].set_axis_off()
        draw_masks(axes[1], v["image"], v["masks"][1:], names=v["names"],
                   title=f"true masks (background: {v['pixels'][0]} px)")
        fig.tight_layout()
        plt.show()
        return v

    return w.interactive(
        f, n_objects=w.IntSlider(value=n_objects, min=1, max=3),
        shape=w.Dropdown(options=list(world.SHAPES), value=shape),
        colour=w.Dropdown(options=list(world.COLOURS), value=colour),
        pattern=w.Dropdown(options=list(world.PATTERNS), value=pattern),
        background=w.Dropdown(options=list(world.BACKGROUNDS), value=background),
        seed=w.IntSlider(value=seed, min=0, max=99))


# ----------------------------------------------------------------------------- lesson 03
def run_record(history, samples, props=None, token: int = 0) -> dict:
    """What the lesson-03 explorer shows of one training run, as plain arrays.

    Args:
        history: the run's `conceptlab.train.TrainingHistory`.
        samples: (P, n, H, W, 3) uint8, n samples of each of P prompts.
        props: ``{property: (P,) fractions}`` measured on the samples, or None.
        token: which concept token's norm to follow.

    Returns:
        ``{"steps": (S,), "diffusion": (S,), "norm_ratio": (S,), "samples": (P, n, H, W, 3),
            "props": {property: (P,) array}}``; ``norm_ratio`` is the token's norm over the
            vocabulary's mean norm.

    Raises:
        ValueError: ``samples`` is not (P, n, H, W, 3), or the history has no vocabulary norm.
    """
    samples = np.asarray(samples)
    if samples.ndim != 5:
        raise ValueError(f"samples must be (P, n, H, W, 3), got shape {samples.shape}")
    if not history.vocab_norm:
        raise ValueError("the history has no vocab_norm: record it from a ConceptTrainer run")
    norms = np.asarray(history.embedding_norms, np.float64).reshape(len(history.steps), -1)
    return {"steps": np.asarray(history.steps), "diffusion": np.asarray(history.diffusion, float),
            "norm_ratio": norms[:, token] / history.vocab_norm, "samples": samples,
            "props": {k: np.asarray(v, float) for k, v in (props or {}).items()}}


def token_run_view(runs: dict, run: str, prompt: int = 0, window: int = 10) -> dict:
    """One of several precomputed training runs (lesson 03): its samples for one prompt,
    its loss curve (raw and running mean) and its norm curve.

    Args:
        runs: ``{name: run_record(...)}``.
        run: the name of the run to show.
        prompt: the index of the prompt whose samples to show.
        window: records per running mean of the loss (1: no smoothing).

    Returns:
        ``{"run", "samples": (n, H, W, 3), "steps", "loss", "loss_smooth", "norm_ratio",
            "final_norm_ratio": float, "props": {property: float} for that prompt}``.

    Raises:
        ValueError: ``run`` is not one of ``runs``, ``prompt`` is out of range or
            ``window`` < 1.
    """
    if run not in runs:
        raise ValueError(f"no run {run!r}: the runs are {list(runs)}")
    r = runs[run]
    n_prompts = len(r["samples"])
    if not 0 <= prompt < n_prompts:
        raise ValueError(f"prompt must be in 0..{n_prompts - 1}, got {prompt}")
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    loss = np.asarray(r["diffusion"], np.float64)
    c = np.cumsum(np.insert(loss, 0, 0.0))
    i = np.arange(1, len(loss) + 1)
    lo = np.maximum(0, i - window)
    return {"run": run, "samples": np.asarray(r["samples"][prompt]), "steps": r["steps"],
            "loss": loss, "loss_smooth": (c[i] - c[lo]) / (i - lo),
            "norm_ratio": np.asarray(r["norm_ratio"], np.float64),
            "final_norm_ratio": float(r["norm_ratio"][-1]),
            "props": {k: float(v[prompt]) for k, v in r["props"].items()}}


def token_run_explorer(runs: dict, prompts, run: str | None = None, window: int = 10):
    """Dropdowns: which training run and which prompt -> its samples, loss and norm curves.

    Args:
        runs: ``{name: run_record(...)}``, precomputed (the explorer trains nothing).
        prompts: the prompts of the samples, in the records' order.
        run: the run to open on (default: the first).
        window: the loss curve's running mean, the slider's start value.

    Returns:
        The ``ipywidgets.interactive``.
    """
    import ipywidgets as w
    import matplotlib.pyplot as plt

    names = list(runs)
    start = run or names[0]

    def f(run=start, prompt=prompts[0], window=window):
        v = token_run_view(runs, run, list(prompts).index(prompt), window)
        fig = plt.figure(figsize=(8, 4))
        top = fig.add_subplot(2, 1, 1)
        top.imshow(np.concatenate(list(v["samples"]), 1), interpolation="nearest")
        top.set_axis_off()
        top.set_title(f"{run}: '{prompt}'   " + "  ".join(f"{k} {x:.2f}" for k, x in
                                                           v["props"].items()), fontsize=8)
        a, b = fig.add_subplot(2, 2, 3), fig.add_subplot(2, 2, 4)
        a.plot(v["steps"], v["loss"], color="C0", alpha=0.3)
        a.plot(v["steps"], v["loss_smooth"], color="C0")
        a.set_title("diffusion loss", fontsize=8)
        b.plot(v["steps"], v["norm_ratio"], color="C1")
        b.axhline(1.0, color="gray", ls="--")
        b.set_title(f"|token| / vocabulary mean: {v['final_norm_ratio']:.1f} at the end", fontsize=8)
        for ax in (a, b):
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
        fig.tight_layout()
        plt.show()
        return v

    return w.interactive(f, run=w.Dropdown(options=names, value=start),
                         prompt=w.Dropdown(options=list(prompts)),
                         window=w.IntSlider(value=window, min=1, max=50))


# ----------------------------------------------------------------------------- lesson 04
def token_attention_view(runs: dict, setting, token: int, masks, threshold: float = 0.5) -> dict:
    """One concept token's attention in one of several precomputed runs (lesson 04), its
    thresholded map, and which concept's mask that map overlaps.

    Args:
        runs: ``{setting: {"maps": (K, H, W) float in [0, 1], "samples": (K, n, H, W, 3),
            optional "scores": K dicts}}``, e.g. keyed by ``lambda_attn``.
        setting: the key of the run to show.
        token: the concept index k.
        masks: (K, H, W) bool, the concepts' masks.
        threshold: the map is thresholded at this fraction of its range.

    Returns:
        ``{"map": (H, W), "mask": (H, W) bool, "iou": (K,) IoU with every mask,
            "looks_at": the index of the mask of highest IoU, or None when every IoU is 0,
            "own": whether that is the token's own mask, "samples": (n, H, W, 3),
            "scores": the token's scores or None}``.

    Raises:
        ValueError: unknown setting, ``token`` out of range, or maps and masks of different
            shapes.
    """
    if setting not in runs:
        raise ValueError(f"no run {setting!r}: the runs are {list(runs)}")
    r = runs[setting]
    maps = np.asarray(r["maps"], np.float64)
    masks = np.asarray(masks, bool)
    if maps.shape != masks.shape:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} must have the same shape")
    if not 0 <= token < len(maps):
        raise ValueError(f"token must be in 0..{len(maps) - 1}, got {token}")
    a = maps[token]
    span = a.max() - a.min()
    a = (a - a.min()) / span if span > 0 else np.zeros_like(a)
    mask = a > threshold
    ious = np.array([_masks.iou(mask, m) if (mask | m).any() else 0.0 for m in masks])
    looks_at = int(ious.argmax()) if ious.max() > 0 else None
    scores = r.get("scores")
    return {"map": a, "mask": mask, "iou": ious, "looks_at": looks_at,
            "own": looks_at == token, "samples": np.asarray(r["samples"][token]),
            "scores": None if scores is None else scores[token]}


def token_attention_explorer(image, runs: dict, masks, names, setting=None,
                             threshold: float = 0.5):
    """Dropdowns / slider: the run (e.g. lambda_attn), the token and the threshold -> the
    token's attention map, its mask against the concepts' masks, and its samples.

    Args:
        image: (H, W, 3) uint8, the user image.
        runs: as for `token_attention_view`, precomputed (the explorer trains nothing).
        masks: (K, H, W) bool.
        names: the K token names.
        setting: the run to open on (default: the first).
        threshold: the slider's start value.

    Returns:
        The ``ipywidgets.interactive``.
    """
    import ipywidgets as w
    import matplotlib.pyplot as plt

    from .figures import draw_masks, overlay_map

    settings = list(runs)
    start = settings[0] if setting is None else setting

    def f(setting=start, token=names[0], threshold=threshold):
        k = list(names).index(token)
        v = token_attention_view(runs, setting, k, masks, threshold)
        fig = plt.figure(figsize=(8, 4.2))
        a1, a2 = fig.add_subplot(2, 3, 1), fig.add_subplot(2, 3, 2)
        a1.imshow(overlay_map(image, v["map"]))
        a1.set_title(f"{setting}: {token}", fontsize=8)
        a1.set_axis_off()
        draw_masks(a2, image, v["mask"][None], outlines=masks,
                   title=f"map > {threshold:.2f}")
        a3 = fig.add_subplot(2, 3, 3)
        a3.barh(list(names)[::-1], v["iou"][::-1], color="0.5")
        a3.set_xlim(0, 1)
        a3.set_title("IoU with each concept's mask", fontsize=8)
        a3.tick_params(labelsize=7)
        bottom = fig.add_subplot(2, 1, 2)
        bottom.imshow(np.concatenate(list(v["samples"]), 1), interpolation="nearest")
        bottom.set_axis_off()
        bottom.set_title(f"samples of 'a photo of {token}'", fontsize=8)
        fig.tight_layout()
        plt.show()
        return v

    return w.interactive(f, setting=w.Dropdown(options=settings, value=start),
                         token=w.Dropdown(options=list(names)),
                         threshold=w.FloatSlider(value=threshold, min=0.05, max=0.95, step=0.05))


# ----------------------------------------------------------------------------- lesson 05
def em_step_view(attention_steps, attention_maps, e_steps, mask_history, step: int,
                 gt_masks=None) -> dict:
    """Where an EM run stood at training step ``step`` (lesson 05): the tokens' attention
    snapshot nearest that step and the masks the run was training on then.

    Selects from a finished run (``LearnedConcepts``: ``history.attention_steps`` /
    ``history.attention_maps`` and ``e_steps`` / ``mask_history``); computes nothing new.

    Args:
        attention_steps: the steps of the attention snapshots, increasing.
        attention_maps: per snapshot, (K, h, w) attention maps.
        e_steps: the steps of the E-steps, increasing.
        mask_history: per E-step, (K, H, W) bool masks (of one image).
        step: the training step to show.
        gt_masks: (K, H, W) bool true masks (evaluation only), or None.

    Returns:
        dict: ``{"snapshot_step": int, "maps": (K, h, w) each min-max normalised,
            "e_step": the latest E-step <= step, "masks": (K, H, W) bool, "iou": (K,) IoU
            with gt_masks or None}``.

    Raises:
        ValueError: no snapshots or no E-steps, lists of different lengths, or a step before
            the first E-step.
    """
    if not len(attention_steps) or not len(e_steps):
        raise ValueError("the run has no attention snapshots or no E-steps")
    if len(attention_steps) != len(attention_maps) or len(e_steps) != len(mask_history):
        raise ValueError("steps and their maps / masks must have the same length")
    if step < e_steps[0]:
        raise ValueError(f"step {step} is before the first E-step ({e_steps[0]})")
    a_steps = np.asarray(attention_steps)
    i = int(np.abs(a_steps - step).argmin())
    maps = np.asarray(attention_maps[i], np.float64)
    lo = maps.reshape(len(maps), -1).min(1)[:, None, None]
    hi = maps.reshape(len(maps), -1).max(1)[:, None, None]
    maps = np.where(hi > lo, (maps - lo) / np.where(hi > lo, hi - lo, 1), 0.0)
    j = int(np.searchsorted(np.asarray(e_steps), step, side="right") - 1)
    masks = np.asarray(mask_history[j], bool)
    ious = None
    if gt_masks is not None:
        ious = np.array([_masks.iou(m, g) for m, g in zip(masks, np.asarray(gt_masks, bool))])
    return {"snapshot_step": int(a_steps[i]), "maps": maps, "e_step": int(e_steps[j]),
            "masks": masks, "iou": ious}


def em_step_explorer(image, result, gt_masks=None, names=None, image_index: int = 0):
    """Slider through a finished EM run's training steps -> the tokens' attention there and
    the masks of the latest E-step (lesson 05).

    Args:
        image: (H, W, 3) uint8.
        result: a ``LearnedConcepts`` (its history's attention snapshots and its mask
            history); nothing is recomputed.
        gt_masks: (K, H, W) bool true masks (drawn as outlines), or None.
        names: the K token names (default: ``result.names``).
        image_index: which of the run's images (its masks).

    Returns:
        The ``ipywidgets.interactive``.
    """
    import ipywidgets as w
    import matplotlib.pyplot as plt

    from .figures import draw_masks, overlay_map

    h = result.history
    masks = [m[image_index] for m in result.mask_history]
    names = list(names or result.names)
    steps = list(h.attention_steps)

    def f(step=steps[0]):
        v = em_step_view(h.attention_steps, h.attention_maps, result.e_steps, masks, step,
                         gt_masks)
        K = len(v["maps"])
        fig, axes = plt.subplots(1, K + 1, figsize=(2.2 * (K + 1), 2.6))
        for k in range(K):
            axes[k].imshow(overlay_map(image, v["maps"][k]))
            axes[k].set_title(f"{names[k]} attention, step {v['snapshot_step']}", fontsize=8)
            axes[k].set_axis_off()
        title = f"masks of the E-step at {v['e_step']}"
        if v["iou"] is not None:
            title += "\nIoU " + " ".join(f"{x:.2f}" for x in v["iou"])
        draw_masks(axes[K], image, v["masks"], names=names, outlines=gt_masks, legend=False,
                   title=title)
        fig.tight_layout()
        plt.show()
        return v

    return w.interactive(f, step=w.SelectionSlider(options=steps, value=steps[0]))


# ----------------------------------------------------------------------------- lesson 06
def sample_grid_view(grids: dict, key, scores: dict | None = None, reference=None) -> dict:
    """One of several precomputed sample rows (lesson 06: a guidance scale, with or
    without phase 2), its scores, and how far its pixels are from a reference row.

    Args:
        grids: ``{key: (n, H, W, 3) uint8 samples}``.
        key: the row to show.
        scores: ``{key: {name: value}}`` or None.
        reference: a key to compare with (same shapes), or None.

    Returns:
        dict: ``{"images": (n, H, W, 3), "strip": (H, n * W, 3) the samples side by side,
            "scores": dict or None, "diff": mean absolute pixel difference from the
            reference (0-255 scale) or None, "changed": fraction of pixels that differ from
            the reference by more than 8 in some channel, or None}``.

    Raises:
        ValueError: an unknown key, or a reference of another shape.
    """
    for k in (key, reference):
        if k is not None and k not in grids:
            raise ValueError(f"no samples {k!r}: the keys are {list(grids)}")
    imgs = np.asarray(grids[key])
    diff = changed = None
    if reference is not None:
        ref = np.asarray(grids[reference])
        if ref.shape != imgs.shape:
            raise ValueError(f"reference {reference!r} has shape {ref.shape}, "
                             f"{key!r} has {imgs.shape}")
        d = np.abs(imgs.astype(np.int16) - ref.astype(np.int16))
        diff = float(d.mean())
        changed = float((d.max(-1) > 8).mean())
    return {"images": imgs, "strip": np.concatenate(list(imgs), 1),
            "scores": None if scores is None else scores.get(key), "diff": diff,
            "changed": changed}


def sample_grid_explorer(grids: dict, scores: dict | None = None, reference=None,
                         key=None):
    """Dropdown over precomputed sample rows -> the samples, their scores and their pixel
    difference from ``reference`` (lesson 06). Generates nothing.

    Args:
        grids: ``{key: (n, H, W, 3) uint8 samples}`` (`sample_grid_view`).
        scores: ``{key: {name: value}}`` or None.
        reference: a key to compare with, or None.
        key: the row to open on (default: the first).

    Returns:
        The ``ipywidgets.interactive``.
    """
    import ipywidgets as w
    import matplotlib.pyplot as plt

    keys = list(grids)

    def f(key=keys[0] if key is None else key):
        ref = reference
        if ref is not None and np.shape(grids[ref]) != np.shape(grids[key]):
            ref = None                        # rows of another size are not compared
        v = sample_grid_view(grids, key, scores, ref)
        fig, ax = plt.subplots(figsize=(1.6 * len(v["images"]), 2.0))
        ax.imshow(v["strip"], interpolation="nearest")
        ax.set_axis_off()
        parts = [f"{n} {x:.2f}" for n, x in (v["scores"] or {}).items()]
        if v["diff"] is not None:
            parts.append(f"pixels changed from {ref!r}: {v['changed']:.0%}")
        ax.set_title(f"{key}\n" + ", ".join(parts), fontsize=8)
        fig.tight_layout()
        plt.show()
        return v

    return w.interactive(f, key=w.Dropdown(options=keys, value=keys[0] if key is None else key))
