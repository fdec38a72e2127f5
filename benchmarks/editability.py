"""Identity against editability: phase-2 steps x lambda_attn, on user images with given masks.

    python -m benchmarks editability          # -> benchmarks/results/editability/sweep.json

The trade notebook 06 plots. On ``--n-user`` generated "user images" (2 objects each,
``concept_fidelity.user_cases``), the object concepts are learned together with the GIVEN
masks (so the masks are not what varies) by the bundled preset (``TrainConfig.for_bundled``:
phase 1 of the tokens, then phase 2 of tokens + the whole U-Net), once per
``--lambdas`` value of the cross-attention loss weight. Along each run the concepts are
measured after phase 1 and again after each of ``--phase2-steps`` steps of phase 2 (the
learning rate is constant, so the state after 50 steps of a 150-step phase 2 is the state a
50-step phase 2 ends in). Per concept, ``--n`` samples per prompt, seeds 0..n-1, with
``concept_fidelity.measure``:

- **identity**: ``identity.identity_similarity`` of the masked source concept and "a photo
  of [vi]";
- **prompt fidelity** (editability): the mean of "on a {bg} background" kept and "and a
  {colour} {shape}" drawn, for prompts that put the concept somewhere new;
- concept fidelity (colour, shape and pattern) and the attention IoU, beside them.

Means with standard errors over concepts, per (phase-2 steps, lambda_attn). Each (image,
lambda_attn) run is cached: a partial run resumes.
"""

from __future__ import annotations

import time

from benchmarks.concept_fidelity import mean_sem, measure, user_cases
from conceptlab.models import load_pipeline
from conceptlab.shapes.identity import load_pattern_net
from conceptlab.shapes.judge import load_classifier
from conceptlab.tokens import new_concepts
from conceptlab.train import ConceptImage, ConceptTrainer, TrainConfig

METRICS = ("identity", "prompt_fidelity", "background_kept", "other_object_kept",
           "concept_fidelity", "attention_iou")
RESULT_NAME = "sweep"
QUICK = {"n": 1, "n_user": 1, "lambdas": "0.1", "phase2_steps": "0,1", "steps": 1}


def add_arguments(ap):
    ap.add_argument("--model", default="shapes-ldm")
    ap.add_argument("--n", type=int, default=2, help="samples per prompt")
    ap.add_argument("--n-user", type=int, default=1, help="generated user images")
    ap.add_argument("--lambdas", default="0,0.1", help="lambda_attn values, comma-separated")
    ap.add_argument("--phase2-steps", default="0,50,100",
                    help="phase-2 steps at which to measure, comma-separated")
    ap.add_argument("--steps", type=int, default=None, help="phase-1 steps (default: preset)")


def _log(*args):
    print(*args, flush=True)      # the log of a background run shows each line as it comes


def run_sweep(model, case, lam: float, cfg: TrainConfig, checkpoints, n: int, clf, pnet,
              log=_log) -> list[dict]:
    """Learn the concepts of ``case`` once; measure them at each phase-2 step count."""
    pipe = load_pipeline(model, progress=False)
    c = new_concepts(pipe, len(case.objects), init_words=[o.shape for o in case.objects])
    last = max(checkpoints)
    run_cfg = cfg.replace(lambda_attn=lam, phase2_steps=last,
                          phase2=cfg.phase2 if last > 0 else "none")
    rows = []
    t0 = time.time()
    with ConceptTrainer(pipe, ConceptImage(case.image, case.masks), c, run_cfg,
                        progress=False, attention_every=0) as tr:
        for p2 in sorted(checkpoints):
            tr.train(cfg.steps + p2 - tr.step_count)
            c.update_from(pipe)
            seconds = round(time.time() - t0, 1)
            for r in measure(pipe, c, case, n, clf, pnet):
                rows.append({"image": case.name, "lambda_attn": lam, "phase2_steps": p2,
                             "train_seconds": seconds, **r})
                log(f"  {case.name:>8} lambda {lam:<4g} phase-2 steps {p2:>3} {r['concept']} "
                    f"({r['object']}): identity {r['identity']:.3f} prompt "
                    f"{r['prompt_fidelity']:.2f} (bg {r['background_kept']:.2f} other "
                    f"{r['other_object_kept']:.2f}) fidelity {r['concept_fidelity']:.2f}")
    return rows


def summarise(rows) -> list[dict]:
    """One entry per (phase-2 steps, lambda_attn): each metric's mean and standard error
    over concepts."""
    out = []
    for lam in sorted({r["lambda_attn"] for r in rows}):
        for p2 in sorted({r["phase2_steps"] for r in rows}):
            sel = [r for r in rows if r["lambda_attn"] == lam and r["phase2_steps"] == p2]
            if sel:
                out.append({"lambda_attn": lam, "phase2_steps": p2,
                            **{k: mean_sem([r[k] for r in sel]) for k in METRICS}})
    return out


def print_table(summary):
    print(f"{'lambda':>7} {'phase 2':>8}" + "".join(f"{m.replace('_', ' '):>20}"
                                                   for m in METRICS[:2] + METRICS[4:5]))
    for s in summary:
        print(f"{s['lambda_attn']:>7g} {s['phase2_steps']:>8}" + "".join(
            f"{s[m]['mean']:>12.3f} +-{s[m]['sem']:.3f}" for m in METRICS[:2] + METRICS[4:5]))


def run(args, ctx):
    lambdas = [float(x) for x in args.lambdas.split(",")]
    checkpoints = sorted({int(x) for x in args.phase2_steps.split(",")})
    changes = {"steps": args.steps} if args.steps is not None else {}
    cfg = TrainConfig.for_bundled(**changes)
    pipe = load_pipeline(args.model, progress=False)
    ctx.set_model(pipe, name=args.model)
    clf, pnet = load_classifier(), load_pattern_net()
    res = {"config": cfg.to_dict(), "n_samples": args.n, "lambdas": lambdas,
           "phase2_steps": checkpoints, "rows": [], "done": [], "seconds": 0.0}
    for case in user_cases(args.n_user):
        for lam in lambdas:
            key = {"image": case.name, "lambda_attn": lam, "checkpoints": checkpoints,
                   "n": args.n, "config": cfg.to_dict()}
            t0 = time.time()
            res["rows"] += ctx.cached(key, lambda case=case, lam=lam: run_sweep(
                args.model, case, lam, cfg, checkpoints, args.n, clf, pnet))
            res["done"].append(f"{case.name}|{lam:g}")
            res["seconds"] = round(res["seconds"] + time.time() - t0, 1)
            res["summary"] = summarise(res["rows"])
            ctx.write(res, complete=False)
    res["summary"] = summarise(res["rows"])
    n_concepts = len({(r["image"], r["concept"]) for r in res["rows"]})
    print(f"\n{n_concepts} object concepts in {args.n_user} user images, {args.n} samples per "
          f"prompt; phase 1: {cfg.steps} steps, phase 2: {cfg.phase2} at lr {cfg.phase2_lr:g}")
    print_table(res["summary"])
    print(f"total {res['seconds']:.0f} s")
    return res
