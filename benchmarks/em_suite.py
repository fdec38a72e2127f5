"""The paper's Figure 3 on the shapes world: mask IoU over training, EM vs fixed masks.

    python benchmarks/em_suite.py --n-scenes 20            # writes benchmarks/results/em_suite.*

For each held-out scene (2-3 objects, patterned objects included, plus the background as
a concept) the concepts are learned three times through ``conceptlab.learn_concepts``:

- ``em``: masks re-estimated from attention every ``steps/4`` steps (the method);
- ``fixed``: masks estimated once at step 0 and never updated (baseline);
- ``given``: the ground-truth masks (Break-a-Scene, the oracle ceiling).

At every E-step time the masks that the tokens' attention gives are scored against the
ground truth (IoU per concept; the ground truth is never used for training except by
``given``). For ``fixed`` the masks used for training stay those of step 0.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from conceptlab import world
from conceptlab.em import learn_concepts
from conceptlab.pipeline import load_pipeline
from conceptlab.training import TrainConfig

RESULTS = Path(__file__).parent / "results"


def suite_scenes(n: int, seed: int = 2_000_000):
    out = []
    for i in range(n):
        spec = world.sample_scene(seed=seed + i, n_objects=2 + i % 2, patterns=world.PATTERNS)
        sc = world.render_scene(spec)
        out.append(sc)
    return out


def run_suite(pipe, scenes, methods=("em", "fixed", "given"), steps=None, seed=0,
              progress=False, log=print, batch_size=None, after_scene=None):
    """Returns {method: {"steps": [...], "eval_iou": (n_scenes, n_eval, ) mean over
    concepts, "used_iou": ..., "per_concept": ...}}."""
    cfg = TrainConfig.for_bundled()
    if steps is not None:
        cfg = cfg.replace(steps=steps)
    if batch_size is not None:
        cfg = cfg.replace(batch_size=batch_size)
    res = {m: {"eval_iou": [], "used_iou": [], "steps": None, "seconds": 0.0} for m in methods}
    for i, sc in enumerate(scenes):
        gt = np.concatenate([sc.masks[1:], sc.masks[:1]])  # objects, then background
        words = [o.shape for o in sc.spec.objects] + ["background"]
        for m in methods:
            t0 = time.time()
            # a fresh copy of the token table per run: tokens are added to the pipeline
            c = learn_concepts(pipe, sc.image, words, method=m, config=cfg, seed=seed,
                               masks=[gt] if m == "given" else None, gt_masks=[gt],
                               progress=progress, token_prefix=f"s{i}{m[0]}")
            res[m]["seconds"] += time.time() - t0
            res[m]["steps"] = c.eval_steps
            res[m]["eval_iou"].append([float(np.mean(r)) for r in c.eval_iou_history])
            used = [float(np.mean(r)) for r in c.iou_history]
            res[m]["used_iou"].append(used)
        log(f"scene {i + 1}/{len(scenes)} ({len(words)} concepts): "
            + ", ".join(f"{m} {res[m]['eval_iou'][-1][0]:.2f}->{res[m]['eval_iou'][-1][-1]:.2f}"
                        for m in methods))
        if after_scene is not None:
            after_scene(res, i + 1)
    return res


def summarise(res):
    out = {}
    for m, r in res.items():
        a = np.array(r["eval_iou"])
        out[m] = {"steps": r["steps"], "mean": a.mean(0).round(4).tolist(),
                  "sem": (a.std(0) / np.sqrt(len(a))).round(4).tolist(),
                  "seconds_per_run": round(r["seconds"] / max(1, len(a)), 1)}
    return out


def plot(summary, path=None, title=None):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.3))
    style = {"em": ("EM (masks re-estimated)", "C0", "-"),
             "fixed": ("fixed masks (step 0)", "C1", "--"),
             "given": ("given masks (oracle)", "C2", ":")}
    for m, s in summary.items():
        label, c, ls = style.get(m, (m, None, "-"))
        x, y, e = np.array(s["steps"]), np.array(s["mean"]), np.array(s["sem"])
        ax.plot(x, y, ls, color=c, marker="o", label=label)
        ax.fill_between(x, y - e, y + e, color=c, alpha=0.15)
    ax.set_xlabel("training step")
    ax.set_ylabel("mask IoU vs ground truth")
    ax.set_title(title or "masks from the tokens' attention (+CRF)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=100)
    return fig


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="shapes-ldm")
    ap.add_argument("--n-scenes", type=int, default=20)
    ap.add_argument("--steps", type=int, default=None, help="default: TrainConfig.for_bundled()")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    ap.add_argument("--methods", default="em,fixed,given")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "em_suite"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, device="cpu", progress=False)
    t0 = time.time()
    scenes = suite_scenes(args.n_scenes)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/em_suite.py " + " ".join(argv if argv is not None else
                                                      __import__("sys").argv[1:])

    def save(res, done):  # after every scene: an interrupted suite still leaves its results
        summary = summarise(res)
        with open(args.out + ".json", "w") as f:
            json.dump({"command": cmd.strip(), "n_scenes": done, "n_planned": len(scenes),
                       "summary": summary, "per_scene": res}, f, indent=1)
        plot(summary, args.out + ".png",
             f"{done} held-out scenes, 2-3 objects + background").clf()
        return summary

    res = run_suite(pipe, scenes, tuple(args.methods.split(",")), args.steps,
                    batch_size=args.batch_size, after_scene=save)
    summary = save(res, len(scenes))
    print(f"mean mask IoU over {len(scenes)} scenes (all concepts), at steps {summary[next(iter(summary))]['steps']}:")
    for m, s in summary.items():
        print(f"  {m:>6}: " + "  ".join(f"{v:.3f}" for v in s["mean"])
              + f"   ({s['seconds_per_run']:.0f} s per run)")
    print(f"(total {time.time() - t0:.0f} s; wrote {args.out}.json and .png)")


if __name__ == "__main__":
    main()
