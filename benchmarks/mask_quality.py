"""Mask quality: from cross-attention maps to object masks, four ways, on held-out scenes.

    python -m benchmarks mask_quality        # bundled model, 100 scenes -> .../held_out.json
    python -m benchmarks mask_quality --model path/to/pipeline --n-scenes 30 --name other

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

:func:`conceptlab.shapes.suites.mask_quality_table` returns the table and the per-object
rows; notebook 02 calls it on 30 scenes, this benchmark measures it on 100.
"""

from __future__ import annotations

import time

from conceptlab.shapes.suites import format_table, mask_quality_table

RESULT_NAME = "held_out"
QUICK = {"n_scenes": 2, "n_timesteps": 4}


def add_arguments(ap):
    ap.add_argument("--model", default="shapes-ldm")
    ap.add_argument("--n-scenes", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1_000_000)
    ap.add_argument("--n-timesteps", type=int, default=50)
    ap.add_argument("--background-threshold", type=float, default=0.3)
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "pydensecrf"])


def run(args, ctx):
    from conceptlab import load_pipeline

    pipe = load_pipeline(args.model, device="cpu", progress=False)
    ctx.set_model(pipe, name=args.model)
    t0 = time.time()
    result = mask_quality_table(pipe, args.n_scenes, args.seed, n_timesteps=args.n_timesteps,
                                background_threshold=args.background_threshold,
                                backend=args.backend)
    print(format_table(result))
    print(f"(benchmark time {time.time() - t0:.0f} s)")
    return result
