"""Step-0 E-step masks with and without the background channel for the background concept.

    python -m benchmarks background_channel --n-scenes 20   # -> .../step0_masks.json

On the EM suite's held-out scenes (``em_suite.suite_scenes``), new tokens initialised from
the class words (each object's shape word, and "background") give step-0 masks two ways:

- ``own map``: every concept, the background one too, wins pixels with its own attention
  (argmax against the threshold channel, then the CRF); unclaimed pixels belong to no one;
- ``background channel``: the object concepts compete, the background concept takes every
  pixel they leave (``estimate_masks(..., background=k)``, what ``learn_concepts`` does for
  the concept whose init word is "background").

Gives the mean IoU with the ground truth for objects, for the background and for all.
"""

from __future__ import annotations

import numpy as np

from conceptlab.estep import MaskConfig, estimate_masks
from conceptlab.masks import iou
from conceptlab.models import load_pipeline
from conceptlab.shapes.suites import suite_scenes
from conceptlab.tokens import new_concepts

RESULT_NAME = "step0_masks"
THREADS = 1
QUICK = {"n_scenes": 2}


def add_arguments(ap):
    ap.add_argument("--n-scenes", type=int, default=20)


def run(args, ctx):
    pipe = load_pipeline(progress=False)
    ctx.set_model(pipe, name="shapes-ldm")
    res = {"own map": {"objects": [], "background": []},
           "background channel": {"objects": [], "background": []}}
    for i, sc in enumerate(suite_scenes(args.n_scenes)):
        words = [o.shape for o in sc.spec.objects] + ["background"]
        gt = np.concatenate([sc.masks[1:], sc.masks[:1]])
        c = new_concepts(pipe, len(words), words)
        for name, bg in (("own map", None), ("background channel", len(words) - 1)):
            est = estimate_masks(pipe, sc.image, c.names, seed=0, config=MaskConfig(),
                                 background=bg, concepts=c)
            ious = [iou(est.masks[k], gt[k]) for k in range(len(words))]
            res[name]["objects"] += ious[:-1]
            res[name]["background"].append(ious[-1])
    print(f"step-0 mask IoU, {args.n_scenes} suite scenes (objects / background / all):")
    summary = {}
    for name, r in res.items():
        allv = r["objects"] + r["background"]
        summary[name] = {"objects": round(float(np.mean(r["objects"])), 4),
                         "background": round(float(np.mean(r["background"])), 4),
                         "all": round(float(np.mean(allv)), 4)}
        print(f"  {name:>19}: {np.mean(r['objects']):.3f} / {np.mean(r['background']):.3f} / "
              f"{np.mean(allv):.3f}")
    return {"n_scenes": args.n_scenes, "summary": summary,
            "per_concept": {k: {kk: [float(x) for x in vv] for kk, vv in v.items()}
                            for k, v in res.items()}}
