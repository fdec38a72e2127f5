"""Learning from discovered concepts: masks before and after EM, and concept fidelity.

    python -m benchmarks discovery_learning     # -> benchmarks/results/discovery_learning/

The held-out scenes of ``python -m benchmarks discovery`` (seeds 4_000_000 + i, 1 + i % 3
objects, plain and textured backgrounds, every object pattern), none used for tuning. Each
scene's concepts are learned twice with EM through ``conceptlab.learn_concepts``, the
library's defaults for each start, phase 1 only (the tokens; ``--steps`` of it):

- ``discovered``: no words, the library's default: the concepts are discovered
  (``discover_concepts``, its defaults), each object token starts from the word its
  discovered concept's attention reads most (``Discovery.top_words``), EM starts from the
  discovered masks;
- ``shared word``: the same, but every object token starts from one shared word (the
  paper's setting, ``discovery={"object_words": "shared"}``);
- ``named``: the true number of concepts and each object's class word (``star``, ...), the
  background's "background"; EM starts from the attention of those words;
- ``profile words``: the discovered number of concepts, each object token started from the
  word its discovered concept attends to most (``Discovery.top_words``), the background's
  from "background", as named words: EM starts from the attention of those words, not from
  the discovered masks (the words are read from the model, not given).

Figures:

- matched mask IoU (discovered or final masks matched one to one to the true masks,
  objects and background, averaged over the true masks; a true mask left unmatched counts
  0): of the discovered masks (before EM), and of each run's final masks (after EM);
- concept fidelity per true object: "a photo of [vi]" with the object's token (for
  ``discovered``: the token whose final mask matches the object; none matched: 0), ``--n``
  samples (seeds 0..n-1), the share that shows the object's colour AND shape (the judge)
  AND pattern (``identity.read_pattern``), as ``python -m benchmarks concept_fidelity``
  measures it; the gap is ``named - discovered``, over all scenes and over the scenes where
  discovery found the right K.

Each (scene, setting) run is cached: an interrupted run resumes.
"""

from __future__ import annotations

import time

import numpy as np

from conceptlab.discovery import discover_concepts
from conceptlab.em import discovered_task, learn_concepts
from conceptlab.generation import generate
from conceptlab.models import load_pipeline
from conceptlab.shapes import world
from conceptlab.shapes.identity import load_pattern_net, read_pattern
from conceptlab.shapes.judge import judge, load_classifier
from conceptlab.train import TrainConfig

SEED = 4_000_000          # the held-out suite of benchmarks/discovery.py
SETTINGS = ("discovered", "shared word", "named", "profile words")
#: the object-word rule of the settings that learn without words
OBJECT_WORDS = {"discovered": "top", "shared word": "shared"}
THREADS = 2
RESULT_NAME = "held_out"
QUICK = {"n_scenes": 2, "steps": 20, "n": 2}


def add_arguments(ap):
    ap.add_argument("--n-scenes", type=int, default=30)
    ap.add_argument("--steps", type=int, default=None,
                    help="phase-1 steps (default: the library's preset)")
    ap.add_argument("--n", type=int, default=4, help="samples per concept")


def scenes(n: int):
    """Seed + i, 1 + i % 3 objects, any background and pattern (as benchmarks/discovery)."""
    return [world.render_scene(world.sample_scene(
        seed=SEED + i, n_objects=1 + i % 3, patterns=world.PATTERNS)) for i in range(n)]


def matched(masks: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(IoU of each true mask with its one-to-one match (0: none), the match (-1: none))."""
    from scipy.optimize import linear_sum_assignment

    inter = (truth[:, None] & masks[None]).sum((2, 3))
    union = (truth[:, None] | masks[None]).sum((2, 3))
    iou = inter / np.maximum(union, 1)
    rows, cols = linear_sum_assignment(-iou)
    out, match = np.zeros(len(truth)), -np.ones(len(truth), int)
    out[rows], match[rows] = iou[rows, cols], cols
    return out, match


def profile_words(pipe, image) -> list[str]:
    """Per discovered object, the word its concept attends to most (not the background's
    top word), objects in the order ``learn_concepts`` puts them, then "background"."""
    d = discover_concepts(pipe, image, seed=0)
    top = d.top_words()
    return [top[k] for k in range(d.k) if k != d.background] + ["background"]


def discovery_options(setting) -> dict | None:
    """``learn_concepts(discovery=...)`` of a setting that learns without words."""
    return {"object_words": OBJECT_WORDS[setting]} if setting in OBJECT_WORDS else None


def config(pipe, image, steps, setting, words):
    """The library's default config for how the tokens start, phase 1 only."""
    if setting in OBJECT_WORDS:
        words = discovered_task(pipe, image, "em", None, None, False, 0,
                                discovery_options(setting))[0].words
    cfg = TrainConfig.for_model(pipe, "em", words).replace(phase2="none")
    return cfg if steps is None else cfg.with_total_steps(steps)


def fidelity(pipe, learned, token: int, obj, n: int, clf, pnet) -> float:
    imgs = generate(pipe, learned, f"a photo of {learned.names[token]}", n=n, seed=0,
                    output_type="np")
    rec = judge(imgs, [[(obj.colour, obj.shape)]] * n, clf)
    pat = read_pattern(imgs, pnet)
    ok = [r["colour_ok"] and r["shape_ok"] and p == obj.pattern for r, p in zip(rec, pat)]
    return float(np.mean(ok))


def run_one(pipe, sc, setting, args, clf, pnet) -> dict:
    truth = sc.masks                                   # background first, then the objects
    objects = list(sc.spec.objects)
    if setting == "named":
        words = [o.shape for o in objects] + ["background"]
    else:
        words = profile_words(pipe, sc.image) if setting == "profile words" else None
    cfg = config(pipe, sc.image, args.steps, setting, words)
    t0 = time.perf_counter()
    r = learn_concepts(pipe, sc.image, words, config=cfg, seed=0, progress=False,
                       discovery=discovery_options(setting))
    seconds = time.perf_counter() - t0
    first, final = r.mask_history[0][0], r.masks[0]
    before, _ = matched(first, truth)
    after, match = matched(final, truth)
    background = len(r.names) - 1                      # both settings put it last
    fid = [fidelity(pipe, r, int(match[j + 1]), o, args.n, clf, pnet)
           if match[j + 1] >= 0 and match[j + 1] != background else 0.0
           for j, o in enumerate(objects)]
    return {"true_k": len(truth), "k": len(r.names), "iou_before": float(before.mean()),
            "iou_after": float(after.mean()), "fidelity": fid,
            "objects": [o.phrase(with_pattern=True) for o in objects],
            "train_seconds": round(seconds, 1)}


def summarise(rows: list[dict]) -> dict:
    fid = [f for r in rows for f in r["fidelity"]]
    return {"k_accuracy": round(float(np.mean([r["k"] == r["true_k"] for r in rows])), 4),
            "iou_before_em": round(float(np.mean([r["iou_before"] for r in rows])), 4),
            "iou_after_em": round(float(np.mean([r["iou_after"] for r in rows])), 4),
            "concept_fidelity": round(float(np.mean(fid)), 4),
            "fidelity_sem": round(float(np.std(fid, ddof=1) / np.sqrt(len(fid))), 4)
            if len(fid) > 1 else None,
            "n_objects": len(fid), "n_scenes": len(rows),
            "train_seconds": round(float(np.mean([r["train_seconds"] for r in rows])), 1)}


def run(args, ctx):
    pipe = load_pipeline(progress=False)
    ctx.set_model(pipe, name="shapes-ldm")
    clf, pnet = load_classifier(), load_pattern_net()
    out = {"seeds": f"{SEED} + i, i < {args.n_scenes}", "n_scenes": args.n_scenes,
           "steps": args.steps, "n_samples": args.n, "summary": {}, "rows": {}}
    for setting in SETTINGS:
        rows = []
        for i, sc in enumerate(scenes(args.n_scenes)):
            key = {"scene": SEED + i, "setting": setting, "steps": args.steps, "n": args.n}
            if setting in OBJECT_WORDS:
                key["object_words"] = OBJECT_WORDS[setting]
            rows.append(ctx.cached(key,
                                   lambda sc=sc, setting=setting: run_one(pipe, sc, setting, args,
                                                                      clf, pnet)))
            ctx.log(f"{setting:>10} scene {i}: K {rows[-1]['k']}/{rows[-1]['true_k']} IoU "
                    f"{rows[-1]['iou_before']:.2f} -> {rows[-1]['iou_after']:.2f} fidelity "
                    f"{np.round(rows[-1]['fidelity'], 2).tolist()}")
            out["rows"][setting] = [{"seed": SEED + j, **x} for j, x in enumerate(rows)]
            out["summary"][setting] = summarise(rows)
            ctx.write(out, complete=False)
    s = out["summary"]
    out["fidelity_gap"] = round(s["named"]["concept_fidelity"]
                                - s["discovered"]["concept_fidelity"], 4)
    right = [i for i, r in enumerate(out["rows"]["discovered"]) if r["k"] == r["true_k"]]
    out["when_k_right"] = {"n_scenes": len(right), **{
        name: round(float(np.mean([f for i in right for f in out["rows"][name][i]["fidelity"]])),
                    4) if right else None for name in SETTINGS}}
    for setting, v in s.items():
        print(f"{setting:>10}: K right {v['k_accuracy']:.2f}  IoU before EM "
              f"{v['iou_before_em']:.3f} after {v['iou_after_em']:.3f}  concept fidelity "
              f"{v['concept_fidelity']:.3f}")
    print(f"fidelity gap (named - discovered): {out['fidelity_gap']:.3f}")
    w = out["when_k_right"]
    if w["n_scenes"]:
        print(f"on the {w['n_scenes']} scenes where discovery found K: concept fidelity "
              f"discovered {w['discovered']:.3f}, named {w['named']:.3f}")
    return out
