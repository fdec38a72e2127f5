"""Figures shared by the notebooks, the command line and the benchmarks.

Functions return matplotlib Figures (or write files); they never call ``plt.show()``.
"""

from __future__ import annotations

import numpy as np


def _plt():
    import matplotlib.pyplot as plt  # falls back to the Agg backend without a display
    return plt


def image_row(images, titles=None, scale: float = 1.6, cmap=None, vmin=None, vmax=None):
    """One row of images (uint8 RGB or float maps) with optional titles."""
    plt = _plt()
    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(scale * n, scale * 1.1 + (0.3 if titles else 0)),
                             squeeze=False)
    for i, (ax, im) in enumerate(zip(axes[0], images)):
        im = np.asarray(im.detach().cpu() if hasattr(im, "detach") else im)
        ax.imshow(im, cmap=cmap if im.ndim == 2 else None, vmin=vmin, vmax=vmax,
                  interpolation="nearest")
        ax.set_axis_off()
        if titles:
            ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    return fig


def sample_strips(rows, titles, height: float = 1.3, width: float = 8.0):
    """One strip per row of sample images (a list / (n, H, W, 3) array, side by side),
    titled on the left: how the notebooks show n samples of several prompts."""
    plt = _plt()
    fig, axes = plt.subplots(len(rows), 1, figsize=(width, height * len(rows)), squeeze=False)
    for ax, row, title in zip(axes[:, 0], rows, titles):
        ax.imshow(np.concatenate([np.asarray(im) for im in row], 1), interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(title, fontsize=8, loc="left")
    fig.tight_layout()
    return fig


def image_grid_figure(rows, row_titles=None, col_titles=None, scale: float = 1.3):
    """Grid of images: ``rows`` is a list of lists (or arrays (n, H, W, 3))."""
    plt = _plt()
    r, c = len(rows), max(len(x) for x in rows)
    fig, axes = plt.subplots(r, c, figsize=(scale * c, scale * r + 0.35 * r), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(c):
            ax = axes[i][j]
            ax.set_axis_off()
            if j < len(row):
                im = np.asarray(row[j])
                ax.imshow(im, cmap="magma" if im.ndim == 2 else None, interpolation="nearest")
            if i == 0 and col_titles:
                ax.set_title(col_titles[j], fontsize=8)
        if row_titles:
            axes[i][0].set_title(row_titles[i], fontsize=8, loc="left")
    fig.tight_layout()
    return fig


def sample_sheet(rows, captions=None, *, px: int = 128, gap: int = 6, font_size: int = 15,
                 background=(255, 255, 255)):
    """One PIL image of sample rows, each image ``px`` pixels wide ON SCREEN (nearest-
    neighbour enlarged, so no pixel is invented), each row under its caption (the prompt).

    A notebook shows a PIL image at its own pixel size, so a 64-px sample appears 128 px
    wide, whatever the figure DPI: the legible way to show the shapes world's samples.
    rows: a list of lists / (n, H, W, 3) arrays (uint8 or float in [0, 1]).
    """
    from PIL import Image, ImageDraw, ImageFont

    rows = [list(r) for r in rows]
    if not rows or not any(rows):
        raise ValueError("no images to show")
    if captions is not None and len(captions) != len(rows):
        raise ValueError(f"{len(captions)} captions for {len(rows)} rows")
    font = ImageFont.load_default(size=font_size)
    cap_h = font_size + 8 if captions is not None else 0
    cols = max(len(r) for r in rows)
    W = gap + cols * (px + gap)
    H = gap + len(rows) * (cap_h + px + gap)
    sheet = Image.new("RGB", (W, H), background)
    draw = ImageDraw.Draw(sheet)
    for i, row in enumerate(rows):
        y = gap + i * (cap_h + px + gap)
        if captions is not None:
            draw.text((gap, y + 2), str(captions[i]), fill=(20, 20, 20), font=font)
        for j, im in enumerate(row):
            a = np.asarray(im)
            if a.dtype != np.uint8:
                a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
            tile = Image.fromarray(a).convert("RGB").resize((px, px), Image.NEAREST)
            sheet.paste(tile, (gap + j * (px + gap), y + cap_h))
    return sheet


def save_captioned_grid(rows, captions, path):
    """Write :func:`sample_sheet` of ``rows`` (one caption per row) to ``path`` (PNG)."""
    sample_sheet(rows, captions).save(path)
    return path


MASK_COLOURS = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48],
                         [145, 30, 180], [70, 240, 240]], np.float32)


def overlay_masks(image, masks, alpha: float = 0.5) -> np.ndarray:
    """RGB uint8 image with each boolean mask (K, H, W) tinted in its own colour."""
    img = np.asarray(image, np.float32).copy()
    masks = np.asarray(masks.detach().cpu() if hasattr(masks, "detach") else masks)
    for k, m in enumerate(masks.astype(bool)):
        c = MASK_COLOURS[k % len(MASK_COLOURS)]
        img[m] = (1 - alpha) * img[m] + alpha * c
    return img.clip(0, 255).astype(np.uint8)


def overlay_map(image, heat, alpha: float = 0.6) -> np.ndarray:
    """RGB uint8 image blended with a [0, 1] heat map (any resolution, upsampled)."""
    import torch
    img = np.asarray(image, np.float32)
    h = torch.as_tensor(np.asarray(heat.detach().cpu() if hasattr(heat, "detach") else heat),
                        dtype=torch.float32)
    h = torch.nn.functional.interpolate(h[None, None], size=img.shape[:2], mode="bilinear",
                                        align_corners=False)[0, 0].clamp(0, 1).numpy()
    import matplotlib
    cm = matplotlib.colormaps["magma"](h)[..., :3] * 255
    return ((1 - alpha) * img + alpha * cm).clip(0, 255).astype(np.uint8)


def loss_curve(steps, values, labels=None, title=None, logy=False):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3))
    values = values if isinstance(values[0], (list, tuple, np.ndarray)) else [values]
    for i, v in enumerate(values):
        ax.plot(steps[: len(v)] if hasattr(steps, "__len__") else range(len(v)), v,
                label=labels[i] if labels else None)
    if labels:
        ax.legend(fontsize=8)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title, fontsize=9)
    ax.set_xlabel("step")
    fig.tight_layout()
    return fig


def method_bars(summary, measures, methods=None, title=None):
    """Grouped bars with 95% intervals: ``summary`` is {method: {measure: {"mean", "ci95"}}}
    (what ``benchmarks/multi_concept.py`` writes); one panel per measure, one bar per
    method. A measure a method has no value for is left out of its panel."""
    plt = _plt()
    methods = list(methods or summary)
    fig, axes = plt.subplots(1, len(measures), figsize=(2.3 * len(measures), 2.9), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, m in zip(axes[0], measures):
        for i, meth in enumerate(methods):
            s = summary.get(meth, {}).get(m) or {}
            if s.get("mean") is None:
                continue
            ax.bar(i, s["mean"], color=colours[i % len(colours)],
                   yerr=s["ci95"] if s.get("ci95") is not None else None, capsize=3)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=60, ha="right", fontsize=7)
        ax.set_title(m.replace("_", " "), fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def image_grid(images, rows: int | None = None, cols: int | None = None, captions=None, *,
               scale: int = 1, pad: int = 2, background=(255, 255, 255)):
    """Paste images (PIL, or uint8 / [0, 1] float arrays) into one PIL image, row by row.

    rows, cols  default: one row (or enough rows for ``cols``); captions (one per image,
    or None) are written under each image with PIL's default font. ``scale`` enlarges
    each image by an integer factor (nearest neighbour; for 64-px images).
    """
    from PIL import Image, ImageDraw

    ims = []
    for im in images:
        if not isinstance(im, Image.Image):
            a = np.asarray(im)
            if a.dtype != np.uint8:
                a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
            im = Image.fromarray(a)
        im = im.convert("RGB")
        if scale > 1:
            im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
        ims.append(im)
    if not ims:
        raise ValueError("no images to put in a grid")
    N = len(ims)
    if rows is None and cols is None:
        rows, cols = 1, N
    elif rows is None:
        rows = -(-N // cols)
    elif cols is None:
        cols = -(-N // rows)
    if rows * cols < N:
        raise ValueError(f"a {rows}x{cols} grid cannot hold {N} images")
    if captions is not None and len(captions) != N:
        raise ValueError(f"{len(captions)} captions for {N} images")
    w = max(i.width for i in ims)
    h = max(i.height for i in ims)
    cap_h = 12 if captions is not None else 0
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + cap_h + pad) + pad), background)
    draw = ImageDraw.Draw(grid)
    for j, im in enumerate(ims):
        r, c = divmod(j, cols)
        x, y = pad + c * (w + pad), pad + r * (h + cap_h + pad)
        grid.paste(im, (x, y))
        if captions is not None and captions[j]:
            draw.text((x + 1, y + h), str(captions[j]), fill=(0, 0, 0))
    return grid
