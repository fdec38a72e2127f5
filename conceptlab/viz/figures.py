"""Figures shared by the notebooks, the command line and the benchmarks.

Functions return matplotlib Figures (or write files); they never call ``plt.show()``.
"""

from __future__ import annotations

import numpy as np


def _plt():
    import matplotlib.pyplot as plt  # falls back to the Agg backend without a display
    return plt


def image_row(images, titles=None, scale: float = 1.6, cmap=None, vmin=None, vmax=None):
    """One row of images (uint8 RGB or float maps) with optional titles.

    Args:
        images: images or maps (arrays or tensors).
        titles: one title per image, or None.
        scale: inches per image.
        cmap: colour map of 2-D maps.
        vmin: lower end of the colour scale.
        vmax: upper end of the colour scale.

    Returns:
        The matplotlib figure.
    """
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
    """One strip per row of sample images, titled on the left.

    How the notebooks show n samples of several prompts.

    Args:
        rows: per strip, its images (a list / (n, H, W, 3) array, side by side).
        titles: one title per strip.
        height: inches per strip.
        width: width of the figure in inches.

    Returns:
        The matplotlib figure.
    """
    plt = _plt()
    fig, axes = plt.subplots(len(rows), 1, figsize=(width, height * len(rows)), squeeze=False)
    for ax, row, title in zip(axes[:, 0], rows, titles):
        ax.imshow(np.concatenate([np.asarray(im) for im in row], 1), interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(title, fontsize=8, loc="left")
    fig.tight_layout()
    return fig


def image_grid_figure(rows, row_titles=None, col_titles=None, scale: float = 1.3):
    """Grid of images.

    Args:
        rows: a list of lists (or arrays (n, H, W, 3)); 2-D entries are shown as maps.
        row_titles: one title per row, or None.
        col_titles: one title per column, or None.
        scale: inches per image.

    Returns:
        The matplotlib figure.
    """
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
    """One PIL image of sample rows, each row under its caption (the prompt).

    Each image is ``px`` pixels wide ON SCREEN (nearest-neighbour enlarged, so no pixel is
    invented). A notebook shows a PIL image at its own pixel size, so a 64-px sample
    appears 128 px wide, whatever the figure DPI: the legible way to show the shapes
    world's samples.

    Args:
        rows: a list of lists / (n, H, W, 3) arrays (uint8 or float in [0, 1]).
        captions: one caption per row, or None.
        px: on-screen width (and height) of each image.
        gap: pixels between images and rows.
        font_size: caption font size.
        background: RGB colour of the sheet.

    Returns:
        The PIL image.

    Raises:
        ValueError: there is no image, or the captions do not match the rows.
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
    """Write `sample_sheet` of ``rows`` (one caption per row) to ``path`` (PNG).

    Args:
        rows: as for `sample_sheet`.
        captions: one caption per row.
        path: the file to write.

    Returns:
        ``path``.

    Raises:
        ValueError: as for `sample_sheet`.
    """
    sample_sheet(rows, captions).save(path)
    return path


MASK_COLOURS = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48],
                         [145, 30, 180], [70, 240, 240]], np.float32)


def label_image(image, masks, dim: float = 0.4) -> np.ndarray:
    """Masks as flat label colours over a dimmed grey copy of the image: the course's one
    way of drawing masks (the object's own colours never mix with the label colours).

    Args:
        image: (H, W, 3) RGB image.
        masks: (K, H, W) bool masks (array or tensor); mask k gets ``MASK_COLOURS[k]``
            (a later mask wins where two overlap).
        dim: brightness of the grey image under the unlabelled pixels, in [0, 1].

    Returns:
        (H, W, 3) uint8.
    """
    img = np.asarray(image, np.float32)
    masks = np.asarray(masks.detach().cpu() if hasattr(masks, "detach") else masks, bool)
    if masks.ndim != 3 or masks.shape[1:] != img.shape[:2]:
        raise ValueError(f"masks must be (K, H, W) with (H, W) = {img.shape[:2]}, got "
                         f"{masks.shape}")
    out = np.repeat(img.mean(-1, keepdims=True) * dim, 3, -1)
    for k, m in enumerate(masks):
        out[m] = MASK_COLOURS[k % len(MASK_COLOURS)]
    return out.clip(0, 255).astype(np.uint8)


def draw_masks(ax, image, masks, names=None, outlines=None, legend: bool = True,
               title: str | None = None):
    """Draw masks on a matplotlib axis in the course's style: flat label colours
    (`label_image`), white outlines of reference masks, and a legend of the names.

    Args:
        ax: the axis.
        image: (H, W, 3) RGB image.
        masks: (K, H, W) bool masks.
        names: one name per mask for the legend (None: no legend).
        outlines: (M, H, W) bool masks drawn as white outlines (e.g. the true masks).
        legend: draw the legend (when ``names`` are given).
        title: the axis title.
    """
    from matplotlib.patches import Patch

    ax.imshow(label_image(image, masks))
    for g in ([] if outlines is None else np.asarray(outlines, bool)):
        if g.any() and not g.all():
            ax.contour(g, levels=[0.5], colors="white", linewidths=0.8)
    if names is not None and legend:
        ax.legend(handles=[Patch(color=MASK_COLOURS[k % len(MASK_COLOURS)] / 255, label=str(n))
                           for k, n in enumerate(names)],
                  loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=min(len(names), 3),
                  fontsize=7, frameon=False, handlelength=1.0, columnspacing=0.8)
    if title is not None:
        ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def overlay_masks(image, masks, alpha: float = 0.5) -> np.ndarray:
    """RGB uint8 image with each boolean mask tinted in its own colour.

    Args:
        image: (H, W, 3) RGB image.
        masks: (K, H, W) bool masks (array or tensor).
        alpha: weight of the tint.

    Returns:
        (H, W, 3) uint8.
    """
    img = np.asarray(image, np.float32).copy()
    masks = np.asarray(masks.detach().cpu() if hasattr(masks, "detach") else masks)
    for k, m in enumerate(masks.astype(bool)):
        c = MASK_COLOURS[k % len(MASK_COLOURS)]
        img[m] = (1 - alpha) * img[m] + alpha * c
    return img.clip(0, 255).astype(np.uint8)


def overlay_map(image, heat, alpha: float = 0.6) -> np.ndarray:
    """RGB uint8 image blended with a [0, 1] heat map (any resolution, upsampled).

    Args:
        image: (H, W, 3) RGB image.
        heat: (h, w) map in [0, 1] (array or tensor), drawn with the magma colour map.
        alpha: weight of the map.

    Returns:
        (H, W, 3) uint8.
    """
    import torch
    img = np.asarray(image, np.float32)
    h = torch.as_tensor(np.asarray(heat.detach().cpu() if hasattr(heat, "detach") else heat),
                        dtype=torch.float32)
    h = torch.nn.functional.interpolate(h[None, None], size=img.shape[:2], mode="bilinear",
                                        align_corners=False)[0, 0].clamp(0, 1).numpy()
    import matplotlib
    cm = matplotlib.colormaps["magma"](h)[..., :3] * 255
    return ((1 - alpha) * img + alpha * cm).clip(0, 255).astype(np.uint8)


def method_bars(summary, measures, methods=None, title=None):
    """Grouped bars with 95% intervals: one panel per measure, one bar per method.

    A measure a method has no value for is left out of its panel.

    Args:
        summary: ``{method: {measure: {"mean", "ci95"}}}`` (what
            ``benchmarks/multi_concept.py`` writes).
        measures: the measures, one panel each.
        methods: the methods to show, in order (default: all of ``summary``).
        title: the figure title, or None.

    Returns:
        The matplotlib figure.
    """
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


def _as_pil_rgb(im, scale: int = 1):
    """A PIL RGB image from PIL or a uint8 / [0, 1] float array, enlarged ``scale`` times."""
    from PIL import Image

    if not isinstance(im, Image.Image):
        a = np.asarray(im)
        if a.dtype != np.uint8:
            a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
        im = Image.fromarray(a)
    im = im.convert("RGB")
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    return im


def _grid_shape(N: int, rows, cols) -> tuple[int, int]:
    if rows is None and cols is None:
        return 1, N
    if rows is None:
        return -(-N // cols), cols
    if cols is None:
        return rows, -(-N // rows)
    return rows, cols


def image_grid(images, rows: int | None = None, cols: int | None = None, captions=None, *,
               scale: int = 1, pad: int = 2, background=(255, 255, 255)):
    """Paste images (PIL, or uint8 / [0, 1] float arrays) into one PIL image, row by row.

    Args:
        images: the images.
        rows: number of rows; default: one row (or enough rows for ``cols``).
        cols: number of columns; default: enough for ``rows``.
        captions: one per image, or None; written under each image with PIL's default
            font.
        scale: enlarges each image by an integer factor (nearest neighbour; for 64-px
            images).
        pad: pixels between images.
        background: RGB colour of the grid.

    Returns:
        The PIL image.

    Raises:
        ValueError: there is no image, the grid is too small, or the captions do not
            match the images.
    """
    from PIL import Image, ImageDraw

    ims = [_as_pil_rgb(im, scale) for im in images]
    if not ims:
        raise ValueError("no images to put in a grid")
    N = len(ims)
    rows, cols = _grid_shape(N, rows, cols)
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
