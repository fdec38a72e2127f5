"""Generation fidelity of one or more models over guidance scales (recipe iteration).

    python benchmarks/generation_sweep.py --models data/models/shapes-ldm runs/x/model \
        --guidance 2 4 6 8

For each model folder and guidance scale: the classifier-judged fidelity (colour, shape,
both) of ``--n-prompts`` prompts naming one or two coloured shapes on a background
(``classifier.fidelity_prompts``, the same prompts as ``model_quality.py``), ``--per-prompt``
images each, DDIM ``--steps`` steps. Prints one row per (model, guidance).

The scaling of fidelity with training steps (the model card's curve) is this script over a
run's snapshots, plotted with ``--plot``:

    python benchmarks/generation_sweep.py --models RUN/snapshot-* --n-prompts 20 \
        --json benchmarks/results/model_scaling.json --plot benchmarks/results/model_scaling.png

``--keep`` then measures only the snapshots the JSON does not hold yet.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

import torch

from conceptlab.fileio import atomic_write_json
from conceptlab.models import load_pipeline
from conceptlab.shapes.judge import fidelity, fidelity_prompts, load_classifier


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["shapes-ldm"])
    ap.add_argument("--guidance", nargs="+", type=float, default=[4.0])
    ap.add_argument("--n-prompts", type=int, default=40)
    ap.add_argument("--per-prompt", type=int, default=4)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="PNG: fidelity against the training step "
                    "read from each model's folder name (snapshot-NNNNN)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the rows already in --json and measure only the (model, "
                         "guidance) pairs it lacks at these settings (new snapshots of a run)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clf = load_classifier()
    prompts = fidelity_prompts(args.n_prompts)
    rows = []
    if args.keep and args.json and os.path.exists(args.json):
        with open(args.json) as f:
            rows = [r for r in json.load(f)
                    if r["n_images"] == args.n_prompts * args.per_prompt]
    done = {(r["model"], r["guidance"]) for r in rows}
    print(f"{'model':>40} {'guidance':>9} {'colour':>7} {'shape':>7} {'both':>7} "
          f"{'1 obj shape':>12} {'2 obj shape':>12} {'s':>6}")
    for m in args.models:
        todo = [gs for gs in args.guidance if (m, gs) not in done]
        if not todo:
            print(f"{m[-40:]:>40} kept from {args.json}")
            continue
        pipe = load_pipeline(m, progress=False)
        for gs in todo:
            t0 = time.time()
            r = fidelity(pipe, prompts, n_per_prompt=args.per_prompt, guidance_scale=gs,
                         steps=args.steps, model=clf)
            bc = r["by_count"]
            row = {"model": m, "guidance": gs, "colour": r["colour"], "shape": r["shape"],
                   "both": r["both"], "background": r["background"],
                   "shape_1": bc[1]["shape"], "shape_2": bc[2]["shape"],
                   "n_images": r["n_images"], "seconds": round(time.time() - t0, 1)}
            rows.append(row)
            print(f"{m[-40:]:>40} {gs:>9.1f} {r['colour']:>7.3f} {r['shape']:>7.3f} "
                  f"{r['both']:>7.3f} {row['shape_1']:>12.3f} {row['shape_2']:>12.3f} "
                  f"{row['seconds']:>6.0f}", flush=True)
    if args.json:
        atomic_write_json(args.json, rows, indent=1)
    if args.plot:
        plot_scaling(rows, args.plot)


def plot_scaling(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted((int(m.group(1)), r) for r in rows
                 if (m := re.search(r"snapshot-(\d+)", r["model"])))
    if not pts:
        raise SystemExit("--plot needs model folders named snapshot-NNNNN")
    steps = [s for s, _ in pts]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for key, style in (("colour", "o-"), ("shape", "s-"), ("both", "^-"), ("background", "d--")):
        ax.plot(steps, [r[key] for _, r in pts], style, label=key)
    ax.set_xlabel("U-Net training steps (EMA snapshot)")
    ax.set_ylabel("judged fraction")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"generation fidelity vs training ({pts[0][1]['n_images']} images each)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
