"""Do learned concepts come back? Phase 1 (tokens) vs phase 1 + 2 (tokens + U-Net).

    python -m benchmarks concept_fidelity     # -> benchmarks/results/concept_fidelity/preset.json

Images: the bundled examples (``data/examples``) and ``--n-user`` generated "user images"
(2 objects of held-out scenes, seeds 3_000_000+, most objects particular patterned instances
the model only saw under coarse captions). The object concepts of an image are learned
together (union sampling) three ways, with the GIVEN masks (this benchmark measures what
the masks do for the tokens; EM's masks are ``em_suite.py``'s):

- ``no mask``: every mask is the whole image, no attention loss (textual inversion);
- ``masked``: the true masks in the masked diffusion loss, no attention loss;
- ``masked + attn``: the masked loss plus the cross-attention loss (the preset's lambda);

each measured after phase 1 (the tokens alone) and again after phase 2 (tokens + U-Net,
``TrainConfig.for_bundled(phase2=...)``). Per concept, ``--n`` samples per prompt, seeds
0..n-1:

- **concept fidelity**: "a photo of [vi]" shows the concept's colour AND shape (judge) AND
  pattern (``identity.read_pattern``);
- **identity**: ``identity.identity_similarity`` between the masked source concept and each
  sample; beside it the class-word baseline: the same measures for the coarse caption the
  model knows ("a photo of a blue striped star"), no learning;
- **prompt fidelity**: "a photo of [vi] on a {bg} background" keeps the named background
  (another plain one than the image's), and "a photo of [vi] and a {colour} {shape}" shows
  the named other object; the mean of the two;
- **localisation**: IoU of the token's attention on its own image (min-max normalised,
  16 timesteps, threshold 0.5) with its mask.

Means with standard errors over concepts. Each (image, variant) run is cached: a partial
run resumes (same model, settings and samples per prompt).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from conceptlab.generation import generate
from conceptlab.maps import attention_maps
from conceptlab.masks import iou
from conceptlab.models import load_pipeline
from conceptlab.shapes import world
from conceptlab.shapes.examples import example_spec, list_examples, load_example
from conceptlab.shapes.identity import identity_similarity, load_pattern_net, read_pattern
from conceptlab.shapes.judge import judge, judge_background, load_classifier
from conceptlab.tokens import new_concepts
from conceptlab.train import ConceptImage, ConceptTrainer, TrainConfig

VARIANTS = {
    "no mask": {"mask": False, "lambda_attn": 0.0},
    "masked": {"mask": True, "lambda_attn": 0.0},
    "masked + attn": {"mask": True, "lambda_attn": None},   # None: the preset's value
}
METRICS = ("concept_fidelity", "colour_ok", "shape_ok", "pattern_ok", "identity",
           "prompt_fidelity", "background_kept", "other_object_kept", "attention_iou")
PLAIN = [b for b in world.BACKGROUNDS if b not in world.TEXTURED_BACKGROUNDS]


@dataclass
class Case:
    name: str
    image: np.ndarray            # (64, 64, 3) uint8
    masks: np.ndarray            # (K, 64, 64) bool, the object concepts
    objects: list                # world.ShapeObject per concept
    background: str


def example_cases(names=None) -> list[Case]:
    out = []
    for n in names or list_examples():
        ex = load_example(n)
        spec = example_spec(n)
        ks = [k for k, w in enumerate(ex.init_words) if w != "background"]
        out.append(Case(n, ex.image, ex.masks[ks], [spec.objects[k] for k in ks],
                        spec.background))
    return out


def user_cases(n: int, seed: int = 3_000_000) -> list[Case]:
    out = []
    for i in range(n):
        spec = world.sample_scene(seed=seed + i, n_objects=2, patterns=world.PATTERNS,
                                  pattern_p=0.75)
        sc = world.render_scene(spec)
        out.append(Case(f"user-{i}", sc.image, sc.masks[1:], list(spec.objects),
                        spec.background))
    return out


def class_words(o) -> str:
    """What the base model was taught to call this object: 'a blue striped star'."""
    return o.phrase(with_pattern=True)


def other_object(o, k: int) -> tuple[str, str]:
    """A (colour, shape) unlike the concept, for "[vi] and a {colour} {shape}"."""
    colours = [c for c in world.COLOURS if c not in (o.colour, o.colour2)]
    shapes = [s for s in world.SHAPES if s != o.shape]
    return colours[k % len(colours)], shapes[k % len(shapes)]


def measure(pipe, c, case: Case, n: int, clf, pnet) -> list[dict]:
    """The per-concept figures of the concepts ``c`` as the pipeline holds them now."""
    bg = next(b for b in PLAIN if b != case.background)
    am = attention_maps(pipe, case.image, "a photo of " + " and ".join(c.names),
                        n_timesteps=16, seed=0)
    rows = []
    for j, (name, o) in enumerate(zip(c.names, case.objects)):
        imgs = generate(pipe, c, f"a photo of {name}", n=n, seed=0, output_type="np")
        rec = judge(imgs, [[(o.colour, o.shape)]] * n, clf)
        pat = read_pattern(imgs, pnet)
        ok_c = np.array([r["colour_ok"] for r in rec])
        ok_s = np.array([r["shape_ok"] for r in rec])
        ok_p = np.array([p == o.pattern for p in pat])
        ident = identity_similarity(case.image, case.masks[j], imgs, net=pnet,
                                    judge_model=clf)
        imgs_bg = generate(pipe, c, f"a photo of {name} on a {bg} background", n=n, seed=0,
                           output_type="np")
        colour2, shape2 = other_object(o, j)
        imgs_o = generate(pipe, c, f"a photo of {name} and a {colour2} {shape2}", n=n, seed=0,
                          output_type="np")
        bg_ok = float(judge_background(imgs_bg, bg).mean())
        other_ok = float(np.mean([r["both_ok"] for r in judge(imgs_o, [[(colour2, shape2)]] * n,
                                                             clf)]))
        a = am.for_word(name, size=case.image.shape[:2]).numpy()
        rows.append({
            "concept": name, "object": class_words(o), "colour2": o.colour2,
            "colour_ok": float(ok_c.mean()), "shape_ok": float(ok_s.mean()),
            "pattern_ok": float(ok_p.mean()),
            "concept_fidelity": float((ok_c & ok_s & ok_p).mean()),
            "identity": float(ident.mean()),
            "background_kept": bg_ok, "other_object_kept": other_ok,
            "prompt_fidelity": (bg_ok + other_ok) / 2,
            "attention_iou": float(iou(a > 0.5, case.masks[j])),
        })
    return rows


def run_case(model, case: Case, variant: str, cfg: TrainConfig, n: int, clf, pnet,
             log=print) -> list[dict]:
    pipe = load_pipeline(model, progress=False)
    v = VARIANTS[variant]
    masks = case.masks if v["mask"] else np.ones_like(case.masks)
    c = new_concepts(pipe, len(case.objects), init_words=[o.shape for o in case.objects])
    lam = cfg.lambda_attn if v["lambda_attn"] is None else v["lambda_attn"]
    rows = []
    t0 = time.time()
    with ConceptTrainer(pipe, ConceptImage(case.image, masks), c, cfg.replace(lambda_attn=lam),
                        progress=False, attention_every=0) as tr:
        for phase, until in ((1, cfg.steps), (2, cfg.total_steps)):
            if phase == 2 and cfg.phase2 == "none":
                break
            tr.train(until - tr.step_count)
            c.update_from(pipe)
            seconds = time.time() - t0
            for r in measure(pipe, c, case, n, clf, pnet):
                rows.append({"image": case.name, "variant": variant, "phase": phase,
                             "train_seconds": round(seconds, 1), **r})
                log(f"  {case.name:>28} {variant:>14} phase {phase} {r['concept']} "
                    f"({r['object']}): fidelity {r['concept_fidelity']:.2f} (c {r['colour_ok']:.2f}"
                    f" s {r['shape_ok']:.2f} p {r['pattern_ok']:.2f}) identity "
                    f"{r['identity']:.3f} prompt {r['prompt_fidelity']:.2f} "
                    f"IoU {r['attention_iou']:.2f}")
            t0 = time.time()
    return rows


def class_word_baseline(pipe, cases, n, clf, pnet) -> list[dict]:
    rows = []
    for case in cases:
        for j, o in enumerate(case.objects):
            imgs = generate(pipe, None, f"a photo of {class_words(o)}", n=n, seed=0,
                            output_type="np")
            rec = judge(imgs, [[(o.colour, o.shape)]] * n, clf)
            pat = read_pattern(imgs, pnet)
            ok = [r["colour_ok"] and r["shape_ok"] and p == o.pattern for r, p in zip(rec, pat)]
            ident = identity_similarity(case.image, case.masks[j], imgs, net=pnet,
                                        judge_model=clf)
            rows.append({"image": case.name, "object": class_words(o),
                         "concept_fidelity": float(np.mean(ok)),
                         "pattern_ok": float(np.mean([p == o.pattern for p in pat])),
                         "identity": float(ident.mean())})
    return rows


def mean_sem(values) -> dict:
    a = np.asarray(values, float)
    return {"mean": round(float(a.mean()), 4),
            "sem": round(float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else 0.0, 4),
            "n": len(a)}


def summarise(rows, baseline) -> dict:
    out = {}
    for v in VARIANTS:
        for phase in (1, 2):
            r = [x for x in rows if x["variant"] == v and x["phase"] == phase]
            if r:
                out[f"{v} | phase {phase}"] = {k: mean_sem([x[k] for x in r]) for k in METRICS}
    if baseline:
        out["class words (no learning)"] = {k: mean_sem([x[k] for x in baseline])
                                            for k in ("concept_fidelity", "pattern_ok",
                                                      "identity")}
    return out


def print_table(summary):
    cols = ("concept_fidelity", "pattern_ok", "identity", "prompt_fidelity", "attention_iou")
    print(f"{'':>32}" + "".join(f"{c.replace('_', ' '):>20}" for c in cols))
    for k, s in summary.items():
        print(f"{k:>32}" + "".join(
            f"{s[c]['mean']:>12.3f} +-{s[c]['sem']:.3f}" if c in s else f"{'':>20}" for c in cols))


RESULT_NAME = "preset"
QUICK = {"n": 1, "n_user": 0, "examples": ["striped-star-and-heart"],
         "variants": "masked + attn", "steps": 2, "phase2_steps": 2}


def add_arguments(ap):
    ap.add_argument("--model", default="shapes-ldm")
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--n-user", type=int, default=10, help="generated user images")
    ap.add_argument("--examples", nargs="*", default=None, help="default: every example")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--user-variants", default=None,
                    help="variants for the user images (default: --variants)")
    ap.add_argument("--phase2", default=None, choices=("none", "full", "lora"))
    ap.add_argument("--phase2-steps", type=int, default=None)
    ap.add_argument("--phase2-lr", type=float, default=None)
    ap.add_argument("--steps", type=int, default=None, help="phase-1 steps (default: preset)")


def run(args, ctx):
    changes = {k: v for k, v in (("phase2", args.phase2), ("phase2_steps", args.phase2_steps),
                                 ("phase2_lr", args.phase2_lr), ("steps", args.steps))
               if v is not None}
    cfg = TrainConfig.for_bundled(**changes)
    pipe = load_pipeline(args.model, progress=False)
    clf, pnet = load_classifier(), load_pattern_net()
    jobs = [(case, v) for case in example_cases(args.examples)
            for v in args.variants.split(",")]
    jobs += [(case, v) for case in user_cases(args.n_user)
             for v in (args.user_variants or args.variants).split(",")]
    for _, v in jobs:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}: choose from {list(VARIANTS)}")
    ctx.set_model(pipe, name=args.model)   # its weights fingerprint
    res = {"config": cfg.to_dict(), "n_samples": args.n, "rows": [], "done": [],
           "baseline": [], "seconds": 0.0}

    def save(complete=False):
        res["summary"] = summarise(res["rows"], res["baseline"])
        ctx.write(res, complete=complete)

    for case, v in jobs:
        key = {"image": case.name, "variant": v, "n": args.n, "config": cfg.to_dict()}
        t0 = time.time()
        res["rows"] += ctx.cached(key, lambda case=case, v=v: run_case(
            args.model, case, v, cfg, args.n, clf, pnet))
        res["done"].append(f"{case.name}|{v}")
        res["seconds"] = round(res["seconds"] + time.time() - t0, 1)
        save()
    cases = example_cases(args.examples) + user_cases(args.n_user)
    res["baseline"] = ctx.cached(
        {"class_word_baseline": [c.name for c in cases], "n": args.n},
        lambda: class_word_baseline(pipe, cases, args.n, clf, pnet))
    save(complete=True)
    n_concepts = len({(r["image"], r["concept"]) for r in res["rows"]})
    print(f"\n{n_concepts} object concepts in {len({r['image'] for r in res['rows']})} images, "
          f"{args.n} samples per prompt; phase 1: {cfg.steps} steps, phase 2: "
          f"{cfg.phase2} {cfg.phase2_steps if cfg.phase2 != 'none' else 0} steps at lr "
          f"{cfg.phase2_lr:g}")
    print_table(res["summary"])
    print(f"total {res['seconds']:.0f} s")
    return res
