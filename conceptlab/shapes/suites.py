"""Held-out scene suites of the shapes world, and the mask-method table of notebook 02.

Every suite is drawn from seeds the model's training stream never uses (training scenes
come from one stream seeded 0; suites start at 1_000_000):

- `held_out_scenes` (seeds 1_000_000+): any scene, for model quality;
- `held_out_multi_object_scenes` (1_000_000+): 2 and 3 objects alternately, for masks;
- `suite_scenes` (2_000_000+): 2-3 objects, patterned ones included: the EM suite.

`mask_quality_table` turns each object's shape-word attention into masks five ways
(``METHODS``) and scores them; ``benchmarks/mask_quality.py`` prints it for 100 scenes.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import masks as M
from ..crf import crf_backend, refine_masks
from ..maps import attention_maps
from . import world


def held_out_scenes(n, seed=1_000_000, size=64, **kw):
    """Scenes ``seed + i``, any scene: for model quality.

    Args:
        n: number of scenes.
        seed: seed of the first scene.
        size: side in pixels.
        **kw: go to `conceptlab.shapes.world.sample_scene`.

    Returns:
        The rendered scenes.
    """
    return [world.render_scene(world.sample_scene(seed=seed + i, **kw), size) for i in range(n)]


def held_out_multi_object_scenes(n_scenes: int, seed: int = 1_000_000):
    """Scenes ``seed + i`` with 2 objects for even i and 3 for odd i.

    Args:
        n_scenes: number of scenes.
        seed: seed of the first scene.

    Returns:
        The rendered scenes.
    """
    return [world.render_scene(world.sample_scene(seed=seed + i, n_objects=2 + i % 2))
            for i in range(n_scenes)]


def suite_scenes(n: int, seed: int = 2_000_000):
    """The EM suite: scene ``seed + i`` with 2 + i % 2 objects, any pattern.

    Args:
        n: number of scenes.
        seed: seed of the first scene.

    Returns:
        The rendered scenes.
    """
    return [world.render_scene(world.sample_scene(seed=seed + i, n_objects=2 + i % 2,
                                                  patterns=world.PATTERNS))
            for i in range(n)]


METHODS = ("threshold 0.5", "mean", "otsu", "argmax + background", "argmax + CRF")


def masks_by_method(image, concept_maps, background_threshold: float = 0.3,
                    crf_backend_name: str = "auto") -> dict:
    """Masks of each method of `METHODS` for the raw concept maps of one image.

    Args:
        image: (H, W, 3) image.
        concept_maps: (K, h, w) raw concept maps.
        background_threshold: as for `conceptlab.masks.assign_masks`.
        crf_backend_name: as for `conceptlab.crf.dense_crf`.

    Returns:
        ``{method: (K, H, W) bool}``.
    """
    H, W = image.shape[:2]
    up = M.resize_map(torch.as_tensor(concept_maps, dtype=torch.float32), (H, W)).clamp_min(0)
    unit = M.normalize(up, "minmax")
    return {
        "threshold 0.5": M.binarize(unit, "threshold", 0.5).numpy(),
        "mean": M.binarize(unit, "mean").numpy(),
        "otsu": M.binarize(unit, "otsu").numpy(),
        "argmax + background": M.assign_masks(up, background_threshold).numpy(),
        "argmax + CRF": refine_masks(image, up.numpy(), background_threshold=background_threshold,
                                     backend=crf_backend_name),
    }


@torch.no_grad()
def mask_quality_table(pipe, n_scenes: int = 30, seed: int = 1_000_000, *,
                       n_timesteps: int = 50, background_threshold: float = 0.3,
                       backend: str = "auto", return_maps: bool = False) -> dict:
    """Mean IoU of each method's masks against the ground truth on held-out scenes.

    Args:
        pipe: the pipeline (the bundled shapes model).
        n_scenes: number of scenes (`held_out_multi_object_scenes`).
        seed: seed of the first scene.
        n_timesteps: as for `conceptlab.maps.attention_maps`.
        background_threshold: as for `conceptlab.masks.assign_masks`.
        backend: the CRF backend (as for `conceptlab.crf.crf_backend`).
        return_maps: also return the concept maps.

    Returns:
        ``{"table": {method: mean IoU over objects}, "by_n_objects": {2: {...}, 3: {...}},
            "rows": [per object: {"scene", "n_objects", "background", "shape", method: IoU,
            ...}], "overlap_scenes": {per-word method: number of scenes where two objects'
            masks share pixels}, "n_scenes", "n_objects", "crf_backend"}``, plus
            ``"concept_maps"`` (one raw (K, h, w) array per scene, in scene order) if
            ``return_maps``.
    """
    backend = crf_backend(backend)
    rows, kept = [], []
    overlap = {m: 0 for m in ("threshold 0.5", "mean", "otsu")}
    for i, sc in enumerate(held_out_multi_object_scenes(n_scenes, seed)):
        words = [o.shape for o in sc.spec.objects]
        maps = attention_maps(pipe, sc.image, sc.caption, n_timesteps=n_timesteps, seed=i)
        concept = maps.concept_maps(words)                       # (K, h, w), raw
        pred = masks_by_method(sc.image, concept.numpy(), background_threshold, backend)
        for m in overlap:
            overlap[m] += int((pred[m].sum(0) > 1).any())
        if return_maps:
            kept.append(concept.numpy())
        for k, word in enumerate(words):
            r = {"scene": seed + i, "n_objects": len(words), "shape": word,
                 "background": sc.spec.background}
            r.update({m: float(M.iou(pred[m][k], sc.masks[k + 1])) for m in METHODS})
            rows.append(r)

    def mean(sel):
        return {m: float(np.mean([r[m] for r in rows if sel(r)])) for m in METHODS}

    out = {"table": mean(lambda r: True),
           "by_n_objects": {n: mean(lambda r, n=n: r["n_objects"] == n) for n in (2, 3)
                            if any(r["n_objects"] == n for r in rows)},
           "rows": rows, "overlap_scenes": overlap, "n_scenes": n_scenes,
           "n_objects": len(rows), "crf_backend": backend}
    if return_maps:
        out["concept_maps"] = kept
    return out


def format_table(result: dict) -> str:
    """The table as text: one line per method, overall and by number of objects.

    Args:
        result: what `mask_quality_table` returns.

    Returns:
        The text.
    """
    ns = list(result["by_n_objects"])
    head = f"{'method':<22}{'mean IoU':>10}" + "".join(f"{f'{n} objects':>11}" for n in ns)
    lines = [f"{result['n_scenes']} held-out scenes, {result['n_objects']} objects "
             f"(CRF backend: {result['crf_backend']})", head, "-" * len(head)]
    for m in METHODS:
        lines.append(f"{m:<22}{result['table'][m]:>10.3f}"
                     + "".join(f"{result['by_n_objects'][n][m]:>11.3f}" for n in ns))
    lines.append("scenes where per-word masks overlap: " + ", ".join(
        f"{m} {k}/{result['n_scenes']}" for m, k in result["overlap_scenes"].items()))
    return "\n".join(lines)


__all__ = ["METHODS", "format_table", "held_out_multi_object_scenes", "held_out_scenes",
           "mask_quality_table", "masks_by_method", "suite_scenes"]
