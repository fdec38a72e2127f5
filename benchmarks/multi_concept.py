"""Multi-concept generation, method by method: the paper's evaluation on the shapes world.

    python -m benchmarks multi_concept     # -> benchmarks/results/multi_concept/methods.{json,npz,png}

For each image (the bundled examples, then ``--n-suite`` held-out suite scenes of
``em_suite.py``), its concepts (objects and background, class-word init) are learned four
ways with the final preset, ``TrainConfig.for_bundled()`` (phase 1, then phase 2):

- ``none``: textual inversion, no masks and no attention loss;
- ``fixed``: masks from one E-step at step 0;
- ``em``: the method, masks re-estimated during phase 1;
- ``given``: the true masks (Break-a-Scene, the ceiling);

and once more ``em (phase 1 only)`` (``phase2="none"``), for what phase 2 does. Each is
judged by :func:`conceptlab.evaluate.evaluate` (the offline ShapesJudge, ``--n`` samples
per prompt, seeds 0..n-1): concept fidelity, identity, diversity ("a photo of [vk]"), prompt
fidelity ("[vk] and [vl]", the same on a new plain background and on the learned one),
both-present (those and "[vl] above [vk]"), the relation, and the final masks' IoU.

Table: per method the mean over images and its 95% t-interval (each image's value is the
mean over its concepts, prompts and samples). For every bundled example, 4 samples of
its first single-concept and first two-concept prompts are kept (``.npz``, uint8, keys
"example|method|single" and "...|pair") for notebook 06. Each (scene, method) run is cached
(same model, samples per prompt and preset): a partial run resumes, and a larger ``--n-suite``
computes only the new scenes; results are written atomically after every run.
"""

from __future__ import annotations

import time

import numpy as np

from conceptlab.em import learn_concepts
from conceptlab.evaluate import (
    MEASURES,
    ConceptSpec,
    concept_specs,
    evaluate,
    format_table,
    interval95,
)
from conceptlab.models import load_pipeline
from conceptlab.shapes.examples import example_spec, list_examples, load_example
from conceptlab.shapes.suites import suite_scenes
from conceptlab.train import TrainConfig

from .frame import save_npz

METHODS = {  # name: (learn_concepts method, phase 2)
    "none": ("none", None),
    "fixed": ("fixed", None),
    "em": ("em", None),
    "given": ("given", None),
    "em (phase 1 only)": ("em", "none"),
}
GOAL_MEASURES = ("concept_fidelity", "both_present")
N_KEPT = 4   # samples per shown prompt kept in the .npz


def scenes(n_suite: int, examples=None) -> list[tuple[str, np.ndarray, np.ndarray, list, str,
                                                     list]]:
    """(name, image, masks (objects then background), objects, background, init words)."""
    out = []
    for name in examples or list_examples():
        ex, spec = load_example(name), example_spec(name)
        out.append((name, ex.image, ex.masks, spec.objects, spec.background, ex.init_words))
    for i, sc in enumerate(suite_scenes(n_suite)):
        masks = np.concatenate([sc.masks[1:], sc.masks[:1]])
        objs = sc.spec.objects
        out.append((f"suite-{i}", sc.image, masks, objs, sc.spec.background,
                    [o.shape for o in objs] + ["background"]))
    return out


def method_config(pipe, method: str, **changes) -> TrainConfig:
    """The final preset of a method: ``TrainConfig.for_model`` (lambda_attn 0.1 for the
    methods that estimate their own masks on the bundled model, 1.0 for given masks).
    ``changes``: fields to change (``--steps``, ``--phase2-steps``; none by default)."""
    how, phase2 = METHODS[method]
    cfg = TrainConfig.for_model(pipe, how, **({} if phase2 is None else {"phase2": phase2}))
    return cfg.replace(**changes) if changes else cfg


def run_one(model, scene, method: str, n: int, seed: int = 0, changes=None):
    name, image, masks, objects, background, words = scene
    how = METHODS[method][0]
    pipe = load_pipeline(model, progress=False)   # fresh: phase 2 changes the U-Net
    cfg = method_config(pipe, method, **(changes or {}))
    t0 = time.time()
    c = learn_concepts(pipe, image, words, method=how, config=cfg, seed=seed,
                       masks=[masks] if how == "given" else None, progress=False)
    seconds = time.time() - t0
    specs: list[ConceptSpec] = concept_specs(image, masks, objects, background, c.names)
    ev = evaluate(pipe, c, specs, n=n, seed=0, gt_masks=None if how == "none" else [masks],
                  return_images=True)
    # kept for the notebook: the first single-concept prompt and the first two-concept one
    shown = {kind: next((r["prompt"] for r in ev["prompts"] if r["kind"] in kinds), None)
             for kind, kinds in (("single", ("single",)), ("pair", ("pair", "recombined")))}
    return ({"scene": name, "method": method, "train_seconds": round(seconds, 1),
             "config": cfg.to_dict(),
             "summary": ev["summary"], "prompts": ev["prompts"]},
            {k: (p, ev["images"][p][:N_KEPT]) for k, p in shown.items() if p})


def summarise(rows) -> dict:
    out = {}
    for m in METHODS:
        r = [x for x in rows if x["method"] == m]
        if r:
            out[m] = {k: interval95([x["summary"][k] for x in r]) for k in MEASURES}
            out[m]["n_scenes"] = len(r)
    return out


def goal_check(summary) -> list[str]:
    lines = []
    if not all(m in summary for m in ("none", "fixed", "em", "given")):
        return lines
    for k in GOAL_MEASURES:
        em, fx, no, gv = (summary[m][k] for m in ("em", "fixed", "none", "given"))
        above = em["mean"] > fx["mean"] and em["mean"] > no["mean"]
        within = gv["ci95"] is not None and abs(em["mean"] - gv["mean"]) <= gv["ci95"]
        lines.append(f"{k}: EM {em['mean']:.3f} vs fixed {fx['mean']:.3f}, none "
                     f"{no['mean']:.3f} -> {'above both' if above else 'NOT above both'}; "
                     f"given {gv['mean']:.3f} +-{gv['ci95'] or 0:.3f} -> EM "
                     f"{'within' if within else 'outside'} its interval")
    return lines


def plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from conceptlab.viz.figures import method_bars

    fig = method_bars(summary, ("concept_fidelity", "identity", "prompt_fidelity",
                                "both_present", "diversity", "mask_iou"))
    fig.savefig(path, dpi=100)
    plt.close(fig)


RESULT_NAME = "methods"
QUICK = {"n": 1, "n_suite": 0, "examples": ["striped-star-and-heart"], "methods": "none",
         "steps": 2, "phase2_steps": 2}
ITEM_OPTIONS = ("n_suite", "methods", "examples")   # which runs, not what they measure


def add_arguments(ap):
    ap.add_argument("--model", default="shapes-ldm")
    ap.add_argument("--n", type=int, default=6, help="samples per prompt")
    ap.add_argument("--n-suite", type=int, default=5, help="held-out suite scenes")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--examples", nargs="*", default=None,
                    help="bundled examples (default: every one)")
    ap.add_argument("--steps", type=int, default=None,
                    help="phase-1 steps (default: each method's preset)")
    ap.add_argument("--phase2-steps", type=int, default=None,
                    help="phase-2 steps (default: each method's preset)")


def run(args, ctx):
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}: choose from {list(METHODS)}")
    changes = {k: v for k, v in (("steps", args.steps), ("phase2_steps", args.phase2_steps))
               if v is not None}
    pipe = load_pipeline(args.model, progress=False)
    ctx.set_model(pipe, name=args.model)   # its weights fingerprint: cached runs need the same
    res = {"n_samples": args.n,
           "configs": {m: method_config(pipe, m, **changes).to_dict() for m in METHODS},
           "rows": [], "seconds": 0.0}
    samples = {}
    all_scenes = scenes(args.n_suite, args.examples)
    for scene in all_scenes:
        for m in methods:
            t0 = time.time()
            # a run is reused only if it was trained with the preset its method has now
            key = {"scene": scene[0], "method": m, "n": args.n,
                   "config": method_config(pipe, m, **changes).to_dict()}
            row, shown = ctx.cached(key, lambda scene=scene, m=m: run_one(
                args.model, scene, m, args.n, changes=changes))
            res["rows"].append(row)
            res["seconds"] = round(res["seconds"] + time.time() - t0, 1)
            if not scene[0].startswith("suite-"):
                for kind, (prompt, imgs) in shown.items():
                    samples[f"{scene[0]}|{m}|{kind}"] = imgs
                    res.setdefault("sample_prompts", {}).setdefault(scene[0], {})[kind] = prompt
            s = row["summary"]
            print(f"{scene[0]:>28} {m:>18}: " + " ".join(
                f"{k} {s[k]:.2f}" for k in MEASURES if s[k] is not None)
                + f" ({time.time() - t0:.0f} s)", flush=True)
            res["summary"] = summarise(res["rows"])
            save_npz(ctx.path(".npz"), samples)
            ctx.write(res, complete=False)
    res["summary"] = summarise(res["rows"])
    plot(res["summary"], ctx.path(".png"))
    n_sc = len({r["scene"] for r in res["rows"]})
    print(f"\n{n_sc} images ({len(args.examples or list_examples())} bundled examples + "
          f"{args.n_suite} suite scenes), {args.n} samples per prompt; mean and 95% interval "
          "over images:")
    print(format_table(res["summary"]))
    for line in goal_check(res["summary"]):
        print(line)
    print(f"total {res['seconds']:.0f} s")
    return res
