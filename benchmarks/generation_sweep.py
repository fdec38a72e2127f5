"""Generation fidelity of one or more models over guidance scales (recipe iteration).

    python -m benchmarks generation_sweep --models data/models/shapes-ldm runs/x/model \
        --guidance 2 4 6 8                        # -> benchmarks/results/generation_sweep/guidance.json

For each model folder and guidance scale: the classifier-judged fidelity (colour, shape,
both) of ``--n-prompts`` prompts naming one or two coloured shapes on a background
(``classifier.fidelity_prompts``, the same prompts as ``model_quality.py``), ``--per-prompt``
images each, DDIM ``--steps`` steps. Prints one row per (model, guidance).

The scaling of fidelity with training steps (the model card's curve) is this benchmark over
a run's snapshots, plotted with ``--plot``:

    python -m benchmarks generation_sweep --models RUN/snapshot-* --n-prompts 20 --plot \
        --name scaling                          # -> .../generation_sweep/scaling.{json,png}

Each (model, guidance) row is cached by the model's weights fingerprint and the settings,
so a re-run over a run's snapshots measures only the new ones (``--keep`` is accepted and
changes nothing).
"""

from __future__ import annotations

import re
import time

from conceptlab.models import load_pipeline
from conceptlab.shapes.judge import fidelity, fidelity_prompts, load_classifier

THREADS = 1
QUICK = {"n_prompts": 2, "per_prompt": 1, "steps": 5}
ITEM_OPTIONS = ("keep", "plot")


def result_name(args) -> str:
    return "guidance" if len(args.guidance) > 1 else "fidelity"


def add_arguments(ap):
    ap.add_argument("--models", nargs="+", default=["shapes-ldm"])
    ap.add_argument("--guidance", nargs="+", type=float, default=[4.0])
    ap.add_argument("--n-prompts", type=int, default=40)
    ap.add_argument("--per-prompt", type=int, default=4)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--plot", nargs="?", const="", default=None,
                    help="PNG (default: beside the result): fidelity against the training "
                         "step read from each model's folder name (snapshot-NNNNN)")
    ap.add_argument("--keep", action="store_true",
                    help="(no effect: rows already measured are always reused from the cache)")


def run(args, ctx):
    clf = load_classifier()
    prompts = fidelity_prompts(args.n_prompts)
    rows = []
    print(f"{'model':>40} {'guidance':>9} {'colour':>7} {'shape':>7} {'both':>7} "
          f"{'1 obj shape':>12} {'2 obj shape':>12} {'s':>6}")
    for m in args.models:
        pipe = load_pipeline(m, progress=False)
        fp = ctx.set_model(pipe, name=m if len(args.models) == 1 else None)
        for gs in args.guidance:
            def measure(m=m, gs=gs, pipe=pipe):
                t0 = time.time()
                r = fidelity(pipe, prompts, n_per_prompt=args.per_prompt, guidance_scale=gs,
                             steps=args.steps, model=clf)
                bc = r["by_count"]
                return {"model": m, "guidance": gs, "colour": r["colour"], "shape": r["shape"],
                        "both": r["both"], "background": r["background"],
                        "shape_1": bc[1]["shape"], "shape_2": bc[2]["shape"],
                        "n_images": r["n_images"], "seconds": round(time.time() - t0, 1)}

            row = ctx.cached({"guidance": gs, "n_prompts": args.n_prompts,
                              "per_prompt": args.per_prompt, "steps": args.steps}, measure)
            row = {**row, "model": m, "weights_fingerprint": fp}
            rows.append(row)
            print(f"{m[-40:]:>40} {gs:>9.1f} {row['colour']:>7.3f} {row['shape']:>7.3f} "
                  f"{row['both']:>7.3f} {row['shape_1']:>12.3f} {row['shape_2']:>12.3f} "
                  f"{row['seconds']:>6.0f}", flush=True)
    if len(args.models) > 1:   # one fingerprint per row; none for the whole result
        ctx.model, ctx.model_fingerprint = "several: each row's weights_fingerprint", None
    if args.plot is not None:
        plot_scaling(rows, args.plot or ctx.path(".png"))
    return {"rows": rows}


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
