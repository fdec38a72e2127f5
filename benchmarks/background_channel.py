"""Step-0 E-step masks with and without the background channel for the background concept.

    python benchmarks/background_channel.py --n-scenes 20

On the EM suite's held-out scenes (``em_suite.suite_scenes``), new tokens initialised from
the class words (each object's shape word, and "background") give step-0 masks two ways:

- ``own map``: every concept, the background one too, wins pixels with its own attention
  (argmax against the threshold channel, then the CRF); unclaimed pixels belong to no one;
- ``background channel``: the object concepts compete, the background concept takes every
  pixel they leave (``estimate_masks(..., background=k)``, what ``learn_concepts`` does for
  the concept whose init word is "background").

Prints the mean IoU with the ground truth for objects and for the background.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from conceptlab.estep import MaskConfig, estimate_masks
from conceptlab.masks import iou
from conceptlab.models import load_pipeline
from conceptlab.shapes.suites import suite_scenes
from conceptlab.tokens import add_concept_tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-scenes", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(progress=False)
    res = {"own map": {"objects": [], "background": []},
           "background channel": {"objects": [], "background": []}}
    for i, sc in enumerate(suite_scenes(args.n_scenes)):
        words = [o.shape for o in sc.spec.objects] + ["background"]
        gt = np.concatenate([sc.masks[1:], sc.masks[:1]])
        c = add_concept_tokens(pipe, [f"[b{i}_{k}]" for k in range(len(words))], words)
        for name, bg in (("own map", None), ("background channel", len(words) - 1)):
            est = estimate_masks(pipe, sc.image, c.names, seed=0, config=MaskConfig(),
                                 background=bg)
            ious = [iou(est.masks[k], gt[k]) for k in range(len(words))]
            res[name]["objects"] += ious[:-1]
            res[name]["background"].append(ious[-1])
    print(f"step-0 mask IoU, {args.n_scenes} suite scenes (objects / background / all):")
    for name, r in res.items():
        allv = r["objects"] + r["background"]
        print(f"  {name:>19}: {np.mean(r['objects']):.3f} / {np.mean(r['background']):.3f} / "
              f"{np.mean(allv):.3f}")


if __name__ == "__main__":
    main()
