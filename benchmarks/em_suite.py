"""EM vs fixed vs given masks: mask IoU over training (the paper's Figure 3).

    python -m benchmarks em_suite --n-scenes 20   # -> benchmarks/results/em_suite/class_words.json

For each held-out scene (2-3 objects, patterned objects included, plus the background as
a concept) the concepts are learned three times through ``conceptlab.learn_concepts``:

- ``em``: masks re-estimated from attention every ``steps/4`` steps (the method);
- ``fixed``: masks estimated once at step 0 and never updated (baseline);
- ``given``: the ground-truth masks (Break-a-Scene, the oracle ceiling).

At every E-step time the masks that the tokens' attention gives are scored against the
ground truth (IoU per concept; the ground truth is never used for training except by
``given``). For ``fixed`` the masks used for training stay those of step 0.

Two settings (``--init``):

- ``class`` (default): each object token starts from its own shape word, so the first
  E-step already knows which object is which (result ``class_words``);
- ``shape`` (the paper's setting, its Figure 2: both subjects "person"): every object token
  starts from the word "shape" and only the alternation can tell them apart; masks are
  then scored against the objects in the order that fits best (``GroundTruthIoU(...,
  match_order=True)``; result ``shared_word``).

The settings are the library's defaults for how the tokens start, as ``learn_concepts``
chooses them (``TrainConfig.for_model``, ``MaskConfig.for_words``): class words get the
paper's max-normalised attention loss and the "max" E-step rule; tokens that start equal
get the BCE loss, the "centered" rule and CRF temperature 0.3. Flags change them for
ablations: ``--competition``, ``--fill-empty`` (an empty token takes a separate region of a
token holding two), ``--temperature`` (the CRF's unaries), ``--attn-target``. The pilots
are in ``results/pilots/em_suite/``, written up in ``results/PRESETS.md``.

The summary gives, per method, the re-estimated curve (``mean``, ``final``) and the masks
the method itself ends with (``final_used``: EM's last E-step; fixed: its step-0 masks).
Each (scene, method) run is cached: an interrupted suite resumes, and a partial result is
written after every scene.
"""

from __future__ import annotations

import dataclasses
import textwrap
import time

import numpy as np

from conceptlab.em import learn_concepts
from conceptlab.em_callbacks import GroundTruthIoU
from conceptlab.estep import MaskConfig
from conceptlab.models import load_pipeline
from conceptlab.shapes.suites import suite_scenes
from conceptlab.train import TrainConfig

# What the object tokens start from (the background token always starts from "background"):
# "class": each object's own shape word (the first masks are already good); "shape": the
# same uninformative word for every object (the paper's setting: both subjects "person"),
# so the first E-step cannot know which object is which; "random": random rows.
INITS = ("class", "shape", "random")


def init_words(scene, init: str = "class") -> list:
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    objs = scene.spec.objects
    words = {"class": [o.shape for o in objs], "shape": ["shape"] * len(objs),
             "random": [None] * len(objs)}[init]
    return words + ["background"]


def run_suite(pipe, scenes, methods=("em", "fixed", "given"), steps=None, seed=0,
              progress=False, log=print, batch_size=None, after_scene=None, cached=None,
              changes=None, mask_config=None, em_every=None, init="class"):
    """Returns {method: {"steps": [...], "eval_iou": (n_scenes, n_eval) mean over concepts,
    "used_iou": ..., "per_concept": ..., "seconds": ...}}. ``cached(key, fn)``: the frame's
    resume (``Context.cached``); each (scene, method) run is one item. ``changes``:
    TrainConfig fields to change (ablations). ``init``: what each object token starts from
    (``INITS``)."""
    # the library's defaults for how the tokens start (the same for every scene of a suite);
    # the masks are the alternation's (phase 1): no phase 2 unless an ablation asks for it
    words0 = init_words(scenes[0], init)
    cfg = TrainConfig.for_model(pipe, "em", words0, **{"phase2": "none", **(changes or {})})
    mask_config = mask_config or MaskConfig.for_words(words0)
    if steps is not None:
        cfg = cfg.replace(steps=steps)
    if batch_size is not None:
        cfg = cfg.replace(batch_size=batch_size)
    if cached is None:
        def cached(key, fn):
            return fn()
    res = {m: {"eval_iou": [], "used_iou": [], "per_concept": [], "steps": None,
               "seconds": 0.0} for m in methods}
    for i, sc in enumerate(scenes):
        gt = np.concatenate([sc.masks[1:], sc.masks[:1]])  # objects, then background
        words = init_words(sc, init)
        for m in methods:
            def one(i=i, sc=sc, gt=gt, words=words, m=m):
                t0 = time.time()
                score = GroundTruthIoU([gt], match_order=init != "class")
                c = learn_concepts(pipe, sc.image, words, method=m, config=cfg, seed=seed,
                                   masks=[gt] if m == "given" else None, callbacks=[score],
                                   progress=progress, mask_config=mask_config,
                                   em_every=em_every)
                return {"seconds": time.time() - t0, "steps": c.eval_steps,
                        "eval_iou": [float(np.mean(r)) for r in c.eval_iou_history],
                        "per_concept": [[float(v) for v in r] for r in c.eval_iou_history],
                        "used_iou": [float(np.mean(r)) for r in c.iou_history]}

            # suite scene i is the same for every --n-scenes (seed 2_000_000 + i)
            key = {"scene": i, "method": m, "words": words, "config": cfg.to_dict(),
                   "mask_config": dataclasses.asdict(mask_config) if mask_config else None,
                   "em_every": em_every, "init": init, "seed": seed}
            run = cached(key, one)
            res[m]["seconds"] += run["seconds"]
            res[m]["steps"] = run["steps"]
            for k in ("eval_iou", "per_concept", "used_iou"):
                res[m][k].append(run[k])
        log(f"scene {i + 1}/{len(scenes)} ({len(words)} concepts): "
            + ", ".join(f"{m} {res[m]['eval_iou'][-1][0]:.2f}->{res[m]['eval_iou'][-1][-1]:.2f}"
                        for m in methods))
        if after_scene is not None:
            after_scene(res, i + 1)
    return res


def summarise(res):
    """Per method: the mean curve of ``eval_iou`` (masks estimated from the tokens at each
    E-step time), its final value, and ``final_used``: the masks the method itself ends
    with (EM: its last E-step; fixed: its step-0 masks, never updated; given: the given
    masks are not estimated, so their re-estimate). EM vs fixed is compared both ways."""
    out = {}
    for m, r in res.items():
        a = np.array(r["eval_iou"])
        used = np.array([u[-1] for u in r["used_iou"]]) if r["used_iou"] else a[:, -1]
        out[m] = {"steps": r["steps"], "mean": a.mean(0).round(4).tolist(),
                  "sem": (a.std(0) / np.sqrt(len(a))).round(4).tolist(),
                  "final": round(float(a[:, -1].mean()), 4),
                  "final_used": round(float(used.mean()), 4),
                  "rises": round(float((a[:, -1] > a[:, 0]).mean()), 4),
                  "seconds_per_run": round(r["seconds"] / max(1, len(a)), 1)}
    if "em" in res and "fixed" in res:
        em, fx = np.array(res["em"]["eval_iou"]), np.array(res["fixed"]["eval_iou"])
        n = min(len(em), len(fx))
        fx_used = np.array([u[-1] for u in res["fixed"]["used_iou"]])[:n]
        d = em[:n, -1] - fx[:n, -1]
        out["em_vs_fixed"] = {"em_wins": int((d > 0).sum()), "ties": int((d == 0).sum()),
                              "n_scenes": n, "mean_difference": round(float(d.mean()), 4),
                              "wins_by_0.05": int((d > 0.05).sum()),
                              "losses_by_0.05": int((d < -0.05).sum()),
                              "mean_difference_vs_fixed_masks":
                                  round(float((em[:n, -1] - fx_used).mean()), 4)}
    return out


def plot(summary, path=None, title=None):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.3))
    style = {"em": ("EM (its masks, re-estimated)", "C0", "-"),
             "fixed": ("fixed: trained on step-0 masks,\nscored on re-estimates", "C1", "--"),
             "given": ("given masks (oracle), re-estimates", "C2", ":")}
    for m, s in summary.items():
        if m == "em_vs_fixed":
            continue
        label, c, ls = style.get(m, (m, None, "-"))
        x, y, e = np.array(s["steps"]), np.array(s["mean"]), np.array(s["sem"])
        ax.plot(x, y, ls, color=c, marker="o", label=label)
        ax.fill_between(x, y - e, y + e, color=c, alpha=0.15)
        if m == "fixed" and "final_used" in s:   # the masks the fixed method keeps: flat
            ax.plot(x, np.full(len(x), s["final_used"]), color="0.5", lw=1,
                    label="fixed: its own masks (step 0)")
    ax.set_xlabel("training step")
    ax.set_ylabel("mask IoU vs ground truth")
    ax.set_title(textwrap.fill(title or "masks from the tokens' attention (+CRF)", 60),
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=100)
    return fig


RESULT_NAMES = {"class": "class_words", "shape": "shared_word", "random": "random_init"}
QUICK = {"n_scenes": 1, "steps": 4, "batch_size": 1, "methods": "em,fixed",
         "n_timesteps": 4}


def result_name(args) -> str:
    """Named by what it measures: the setting of the object tokens' first words."""
    return RESULT_NAMES[args.init]


def add_arguments(ap):
    ap.add_argument("--model", default="shapes-ldm")
    ap.add_argument("--n-scenes", type=int, default=20)
    ap.add_argument("--steps", type=int, default=None, help="default: TrainConfig.for_bundled()")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    ap.add_argument("--methods", default="em,fixed,given")
    ap.add_argument("--em-every", type=int, default=None,
                    help="E-step period in training steps (default: steps/4)")
    ap.add_argument("--init", default="class", choices=INITS,
                    help="object tokens start from their class word, 'shape', or random")
    ap.add_argument("--competition", default=None, choices=("max", "centered"),
                    help="how object maps compete in the E-step (MaskConfig.competition)")
    ap.add_argument("--temperature", type=float, default=None,
                    help="E-step CRF unary temperature (MaskConfig.temperature, default 0.1)")
    ap.add_argument("--fill-empty", action="store_true",
                    help="E-step: an empty object mask takes a region from one holding two")
    ap.add_argument("--lambda-attn", type=float, default=None, help="ablation: attention loss")
    ap.add_argument("--attn-target", default=None, choices=("max", "raw", "bce"),
                    help="ablation: attention loss on max-normalised maps, raw shares, or BCE")
    ap.add_argument("--no-crf", action="store_true", help="ablation: E-step without the CRF")
    ap.add_argument("--n-timesteps", type=int, default=None, help="E-step timesteps (default 50)")


def run(args, ctx):
    pipe = load_pipeline(args.model, device="cpu", progress=False)
    ctx.set_model(pipe, name=args.model)   # cached runs are reused only on the same model
    t0 = time.time()
    scenes = suite_scenes(args.n_scenes)

    def result(res, done):
        return {"n_scenes": done, "n_planned": len(scenes), "summary": summarise(res),
                "per_scene": res}

    def save(res, done):  # after every scene: an interrupted suite still leaves its results
        r = result(res, done)
        ctx.write(r, complete=done == len(scenes))
        plot(r["summary"], ctx.path(".png"),
             f"{done} held-out scenes, 2-3 objects + background"
             + ("" if args.init == "class" else f"; object tokens from {args.init!r}")).clf()
        return r

    methods = tuple(args.methods.split(","))
    changes = {} if args.lambda_attn is None else {"lambda_attn": args.lambda_attn}
    if args.attn_target:
        changes["attn_target"] = args.attn_target
    words0 = init_words(scenes[0], args.init)
    mcfg = MaskConfig.for_words(words0)       # the library's default for this start
    if args.no_crf:
        mcfg = dataclasses.replace(mcfg, crf=False)
    if args.temperature:
        mcfg = dataclasses.replace(mcfg, temperature=args.temperature)
    if args.fill_empty:
        mcfg = dataclasses.replace(mcfg, fill_empty=True)
    if args.competition:
        mcfg = dataclasses.replace(mcfg, competition=args.competition)
    if args.n_timesteps:
        mcfg = dataclasses.replace(mcfg, n_timesteps=args.n_timesteps)
    res = run_suite(pipe, scenes, methods, args.steps, batch_size=args.batch_size,
                    after_scene=save, cached=ctx.cached, changes=changes, mask_config=mcfg,
                    em_every=args.em_every, init=args.init)
    out = save(res, len(scenes))
    summary = out["summary"]
    print(f"mean mask IoU over {len(scenes)} scenes (all concepts), at steps {summary[next(iter(summary))]['steps']}:")
    for m, s in summary.items():
        if m == "em_vs_fixed":
            print(f"  EM above fixed (re-estimated at the end) on {s['em_wins']} of "
                  f"{s['n_scenes']} scenes, by > 0.05 on {s['wins_by_0.05']}, below by > 0.05 "
                  f"on {s['losses_by_0.05']} (mean {s['mean_difference']:+.3f}); EM's final "
                  f"masks vs the fixed method's own (step-0) masks: "
                  f"{s['mean_difference_vs_fixed_masks']:+.3f}")
            continue
        print(f"  {m:>6}: " + "  ".join(f"{v:.3f}" for v in s["mean"])
              + f"   final {s['final']:.3f}, its own masks {s['final_used']:.3f}, rises on "
              f"{s['rises']:.0%} of scenes  ({s['seconds_per_run']:.0f} s per run)")
    print(f"(total {time.time() - t0:.0f} s)")
    return out
