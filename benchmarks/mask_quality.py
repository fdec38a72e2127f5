"""Mask quality: from cross-attention maps to object masks, four ways, on held-out scenes.

    python benchmarks/mask_quality.py                        # bundled model, 100 scenes
    python benchmarks/mask_quality.py --model path/to/pipeline --n-scenes 30

For every held-out multi-object scene (seeds >= 1_000_000, alternately 2 and 3 objects,
never used in training) the concept maps are each object's SHAPE-word cross-attention map
(``conceptlab.maps.attention_maps`` with the pipeline's default layers and timestep range,
averaged over ``n_timesteps`` random timesteps), upsampled bilinearly to the image. Each
method turns them into one mask per object, scored by IoU against the ground truth:

- ``threshold 0.5``: each map min-max normalised on its own, ``> 0.5`` (masks may overlap);
- ``mean``: each map above its own mean;
- ``otsu``: each map above its own Otsu threshold;
- ``argmax + background``: ``conceptlab.masks.assign_masks`` (maps divided by their max, a
  constant background channel ``background_threshold``, argmax: disjoint masks);
- ``argmax + CRF``: ``conceptlab.crf.refine_masks`` (the same scores as probabilities,
  refined by a DenseCRF on the image; default parameters).

:func:`mask_quality_table` returns the table and the per-object rows; notebook 02 calls it
on 30 scenes, ``__main__`` prints it for 100.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from conceptlab import masks as M
from conceptlab import world
from conceptlab.crf import crf_backend, refine_masks
from conceptlab.maps import attention_maps

METHODS = ("threshold 0.5", "mean", "otsu", "argmax + background", "argmax + CRF")


def held_out_multi_object_scenes(n_scenes: int, seed: int = 1_000_000):
    """Scenes ``seed + i`` with 2 objects for even i and 3 for odd i."""
    return [world.render_scene(world.sample_scene(seed=seed + i, n_objects=2 + i % 2))
            for i in range(n_scenes)]


def masks_by_method(image, concept_maps, background_threshold: float = 0.3,
                    crf_backend_name: str = "auto") -> dict:
    """{method: (K, H, W) bool} for raw concept maps (K, h, w) of one image (H, W, 3)."""
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

    Returns ``{"table": {method: mean IoU over objects}, "by_n_objects": {2: {...}, 3: {...}},
    "rows": [per object: {"scene", "n_objects", "background", "shape", method: IoU, ...}],
    "overlap_scenes": {per-word method: number of scenes where two objects' masks share
    pixels}, "n_scenes", "n_objects", "crf_backend"}``, plus ``"concept_maps"`` (one raw
    (K, h, w) array per scene, in scene order) if ``return_maps``.
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
    """The table as text: one line per method, overall and by number of objects."""
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


def main(argv=None):
    from conceptlab import load_pipeline

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="shapes-ldm")
    ap.add_argument("--n-scenes", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1_000_000)
    ap.add_argument("--n-timesteps", type=int, default=50)
    ap.add_argument("--background-threshold", type=float, default=0.3)
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "pydensecrf"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, device="cpu", progress=False)
    t0 = time.time()
    result = mask_quality_table(pipe, args.n_scenes, args.seed, n_timesteps=args.n_timesteps,
                                background_threshold=args.background_threshold,
                                backend=args.backend)
    print(format_table(result))
    print(f"(benchmark time {time.time() - t0:.0f} s)")
    return result


if __name__ == "__main__":
    main()
