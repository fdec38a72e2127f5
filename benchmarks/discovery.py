"""Concept discovery: how many concepts a scene holds, and their masks, with no words given.

    python -m benchmarks discovery --suite dev    # development suite: thresholds -> .../dev.json
    python -m benchmarks discovery                # held-out suite, 60 scenes -> .../held_out.json

``conceptlab.discovery.discover_concepts`` runs on shapes-world scenes with exact masks:
1, 2 or 3 objects (``n_objects = 1 + i % 3``), every background (plain and textured), every
object pattern equally likely (solid, striped, two-tone, dotted). Two suites, never mixed:

- ``dev``: seeds 3_000_000 + i. The only scenes anything is tuned on. For each
  agglomerative setting the threshold (the relative merge distance at which the tree is
  cut) is swept, and the one with the best K accuracy is kept (ties: the middle of the
  tied values); the sweep is recorded.
- ``held_out``: seeds 4_000_000 + i. Measured once with the thresholds that the dev result
  chose (``--thresholds-from``). Nothing is learned from these scenes.

Per setting (``SETTINGS``: clustering method x the attention features clustered):

- K accuracy: how often K = objects + 1 (background); the confusion of true vs found K;
- matched IoU: discovered masks matched one to one to the true masks (objects and
  background; Hungarian matching, the largest total IoU), IoU averaged over the true
  masks (a true mask left unmatched counts 0); also per number of objects;
- background: how often the concept called background is matched to the true background;
- seconds per image (wall time of one ``discover_concepts`` call, torch threads as run).

The held-out run also checks ``similar_concepts``: each multi-object scene is paired with a
new scene holding one of its objects (same shape, colour, pattern and size, elsewhere) among
other objects; the top match is right when it pairs the concepts matched to that object.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from conceptlab.discovery import cluster_cells, discover_concepts, similar_concepts
from conceptlab.models import load_pipeline
from conceptlab.shapes import world

SUITES = {"dev": 3_000_000, "held_out": 4_000_000}
PARTNER_SEED = 5_000_000
# name -> discover_concepts options (the threshold of an agglomerative setting is tuned)
SETTINGS = {
    "agglomerative, cross-attention": dict(method="agglomerative", features="cross-attention"),
    "agglomerative, self-attention": dict(method="agglomerative", features="self-attention"),
    "agglomerative, both": dict(method="agglomerative", features="both"),
    "agglomerative, cross-attention, no CRF": dict(method="agglomerative",
                                                    features="cross-attention", refine=False),
    "spectral eigengap, cross-attention": dict(method="spectral", features="cross-attention"),
    "spectral eigengap, self-attention": dict(method="spectral", features="self-attention"),
    "finch, cross-attention": dict(method="finch", features="cross-attention"),
    "finch, self-attention": dict(method="finch", features="self-attention"),
}
#: the setting of ``discover_concepts``' defaults (its threshold is the one the dev suite
#: chose for it): nearly the best K accuracy on dev, with the best masks (the CRF)
DEFAULT = "agglomerative, cross-attention"
SWEEP = [round(x, 3) for x in np.arange(0.2, 0.81, 0.05)]
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEV = "benchmarks/results/discovery/dev.json"   # relative to the repository root
THREADS = 1
QUICK = {"n_scenes": 3, "n_timesteps": 4, "settings": ["agglomerative, cross-attention"],
         "thresholds_from": "none"}
ITEM_OPTIONS = ("settings",)


def add_arguments(ap):
    ap.add_argument("--suite", choices=list(SUITES), default="held_out")
    ap.add_argument("--n-scenes", type=int, default=60)
    ap.add_argument("--n-timesteps", type=int, default=16)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--thresholds-from", default=DEFAULT_DEV,
                    help="the dev result whose chosen thresholds the held-out run uses "
                         "('none': the library's default)")


def result_name(args) -> str:
    return args.suite


def scenes(suite: str, n: int):
    """The suite's scenes: seed + i, 1 + i % 3 objects, any background and pattern."""
    return [world.render_scene(world.sample_scene(
        seed=SUITES[suite] + i, n_objects=1 + i % 3, patterns=world.PATTERNS))
        for i in range(n)]


def matched_ious(masks: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(IoU of each true mask with its match (0 if none), match of each true mask (-1))."""
    from scipy.optimize import linear_sum_assignment

    inter = (masks[:, None] & truth[None]).sum((2, 3))
    union = (masks[:, None] | truth[None]).sum((2, 3))
    iou = inter / np.maximum(union, 1)
    rows, cols = linear_sum_assignment(-iou)
    best, match = np.zeros(len(truth)), np.full(len(truth), -1)
    best[cols], match[cols] = iou[rows, cols], rows
    return best, match


def score(d, sc) -> dict:
    ious, match = matched_ious(d.masks, sc.masks)
    return {"true_k": len(sc.masks), "k": d.k, "iou": float(ious.mean()),
            "ious": [float(x) for x in ious], "match": [int(x) for x in match],
            "background_ok": bool(match[0] == d.background)}


def thresholds(args, ctx) -> dict:
    if args.suite == "dev" or args.thresholds_from == "none":
        return {}
    path = ROOT / args.thresholds_from
    if not path.exists():
        raise SystemExit(f"no dev result at {path}: run `python -m benchmarks discovery "
                         "--suite dev` first (it chooses the thresholds)")
    chosen = json.loads(path.read_text())["chosen_thresholds"]
    return chosen


def sweep(pipe, args, ctx, suite_scenes) -> tuple[dict, dict]:
    """Dev only: K accuracy of every threshold, per feature kind; the chosen thresholds."""
    table, chosen = {}, {}
    kinds = sorted({SETTINGS[s]["features"] for s in args.settings
                    if SETTINGS[s]["method"] == "agglomerative"})
    for kind in kinds:
        hits = np.zeros(len(SWEEP))
        for i, sc in enumerate(suite_scenes):
            def ks(sc=sc, i=i, kind=kind):
                d = discover_concepts(pipe, sc.image, features=kind, seed=i, refine=False,
                                      n_timesteps=args.n_timesteps)
                f = d.features.reshape(-1, d.features.shape[-1])
                return [int(cluster_cells(f, d.attention_shape, threshold=t)[0].max()) + 1
                        for t in SWEEP]
            hits += np.array(ctx.cached({"sweep": kind, "seed": SUITES["dev"] + i,
                                         "n_timesteps": args.n_timesteps}, ks)) == len(sc.masks)
        acc = hits / len(suite_scenes)
        best = [t for t, a in zip(SWEEP, acc) if a == acc.max()]
        chosen[kind] = best[len(best) // 2]
        table[kind] = {str(t): round(float(a), 4) for t, a in zip(SWEEP, acc)}
        print(f"threshold sweep ({kind}): " + " ".join(f"{t}:{a:.2f}" for t, a in
                                                       zip(SWEEP, acc)) + f" -> {chosen[kind]}")
    return table, chosen


def summarise(rows: list[dict]) -> dict:
    true_k = np.array([r["true_k"] for r in rows])
    k = np.array([r["k"] for r in rows])
    confusion = {str(t): {str(f): int(((true_k == t) & (k == f)).sum())
                          for f in sorted(set(k.tolist()))} for t in sorted(set(true_k.tolist()))}
    by_n = {str(n - 1): round(float(np.mean([r["iou"] for r in rows if r["true_k"] == n])), 4)
            for n in sorted(set(true_k.tolist()))}
    right = [r["iou"] for r in rows if r["k"] == r["true_k"]]
    return {"k_accuracy": round(float(np.mean(k == true_k)), 4),
            "k_too_few": round(float(np.mean(k < true_k)), 4),
            "k_too_many": round(float(np.mean(k > true_k)), 4),
            "confusion": confusion,
            "iou": round(float(np.mean([r["iou"] for r in rows])), 4),
            "iou_by_n_objects": by_n,
            "iou_when_k_right": round(float(np.mean(right)), 4) if right else None,
            "object_iou": round(float(np.mean([x for r in rows for x in r["ious"][1:]])), 4),
            "background_iou": round(float(np.mean([r["ious"][0] for r in rows])), 4),
            "background_right": round(float(np.mean([r["background_ok"] for r in rows])), 4),
            "seconds_per_image": round(float(np.mean([r["seconds"] for r in rows])), 3),
            "n_scenes": len(rows)}


def partner(sc, i: int):
    """A scene holding ``sc``'s first object (same look and size, elsewhere) among others."""
    spec = world.sample_scene(seed=PARTNER_SEED + i, n_objects=1 + i % 3,
                              patterns=world.PATTERNS)
    obj, other = sc.spec.objects[0], spec.objects[0]
    spec.objects[0] = world.ShapeObject(obj.shape, obj.colour, other.cx, other.cy, obj.radius,
                                        obj.angle, obj.pattern, obj.colour2)
    twins = [o for o in spec.objects[1:] if (o.shape, o.colour) == (obj.shape, obj.colour)]
    return None if twins else world.render_scene(spec)


def similarity_check(pipe, args, ctx, suite_scenes, kw) -> dict:
    """Top match of similar_concepts on pairs sharing one object: right or not."""
    right, sims = [], []
    for i, sc in enumerate(suite_scenes):
        other = partner(sc, i)
        if len(sc.masks) < 3 or other is None:
            continue

        def one(i=i, sc=sc, other=other):
            da = discover_concepts(pipe, sc.image, seed=i, n_timesteps=args.n_timesteps, **kw)
            db = discover_concepts(pipe, other.image, seed=i, n_timesteps=args.n_timesteps,
                                   **kw)
            ma, mb = score(da, sc)["match"][1], score(db, other)["match"][1]
            top = similar_concepts([da, db], min_similarity=0.0)
            hit = bool(top) and (top[0].concept_a, top[0].concept_b) == (ma, mb)
            return {"right": hit, "similarity": top[0].similarity if top else None}
        r = ctx.cached({"similar": SUITES[args.suite] + i, "kw": kw,
                        "n_timesteps": args.n_timesteps}, one)
        right.append(r["right"])
        sims.append(r["similarity"])
    return {"pairs": len(right), "top_match_right": round(float(np.mean(right)), 4)
            if right else None}


def run(args, ctx):
    pipe = load_pipeline(progress=False)
    ctx.set_model(pipe, name="shapes-ldm")
    suite_scenes = scenes(args.suite, args.n_scenes)
    chosen = thresholds(args, ctx)
    out = {"suite": args.suite, "seeds": f"{SUITES[args.suite]} + i, i < {args.n_scenes}",
           "n_scenes": args.n_scenes, "n_timesteps": args.n_timesteps}
    if args.suite == "dev":
        out["threshold_sweep"], chosen = sweep(pipe, args, ctx, suite_scenes)
        out["chosen_thresholds"] = chosen
    out["settings"], out["summary"], out["rows"] = {}, {}, {}
    for name in args.settings:
        kw = dict(SETTINGS[name])
        if kw["method"] == "agglomerative" and kw["features"] in chosen:
            kw["threshold"] = chosen[kw["features"]]
        out["settings"][name] = kw
        rows = []
        for i, sc in enumerate(suite_scenes):
            def one(sc=sc, i=i, kw=kw):
                t0 = time.perf_counter()
                d = discover_concepts(pipe, sc.image, seed=i, n_timesteps=args.n_timesteps,
                                      **kw)
                return {**score(d, sc), "seconds": time.perf_counter() - t0}
            rows.append(ctx.cached({"scene": SUITES[args.suite] + i, "kw": kw,
                                    "n_timesteps": args.n_timesteps}, one))
        out["summary"][name] = s = summarise(rows)
        out["rows"][name] = [{"seed": SUITES[args.suite] + i, **r} for i, r in enumerate(rows)]
        print(f"{name:<42} K right {s['k_accuracy']:.2f}  IoU {s['iou']:.3f}  background "
              f"{s['background_right']:.2f}  {s['seconds_per_image']:.2f} s/image")
        ctx.write(out, complete=False)
    out["default"] = DEFAULT
    if args.suite == "held_out" and DEFAULT in out["settings"]:
        out["similar_concepts"] = similarity_check(pipe, args, ctx, suite_scenes,
                                                   out["settings"][DEFAULT])
        print(f"similar_concepts: {out['similar_concepts']}")
    return out
