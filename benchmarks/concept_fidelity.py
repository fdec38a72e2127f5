"""Concept tokens learned with GIVEN masks: does the mask help? (issue: concept tokens)

    python benchmarks/concept_fidelity.py            # writes benchmarks/results/concept_fidelity.json

For each bundled example image (``data/examples``, 5 images, 11 object concepts, several of
them with patterns the base model never saw), the object concepts of the image are learned
together (Break-a-Scene's union sampling, the preset ``TrainConfig.for_bundled()``) three
ways:

- ``no mask``: every concept's mask is the whole image (plain textual inversion);
- ``masked``: the ground-truth masks in the masked diffusion loss, no attention loss;
- ``masked + attn``: the masked loss plus the cross-attention loss (the preset's lambda).

Then, per concept, three figures:

- **concept fidelity**: "a photo of [vi]" (``--n`` samples, seeds 0..n-1), the fraction the
  shape/colour classifier judges to show the concept's (main) colour AND its shape;
- **prompt fidelity**: "a photo of [vi] on a {bg} background", with {bg} a plain background
  other than the image's own, the fraction whose border shows that background
  (``classifier.judge_background``);
- **localisation**: IoU of the token's min-max normalised attention map on its own image
  (prompt "a photo of [v1] and [v2] ...", 16 timesteps, 0.5 threshold) with its mask.

The model's own ceiling for the same judgement is printed too: the ordinary words
"a photo of a {colour} {shape}" judged the same way.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from conceptlab.generation import generate
from conceptlab.maps import attention_maps
from conceptlab.masks import iou
from conceptlab.models import data_dir, load_pipeline
from conceptlab.shapes import world
from conceptlab.shapes.examples import list_examples, load_example
from conceptlab.shapes.judge import judge, judge_background, load_classifier
from conceptlab.tokens import add_concept_tokens, vocabulary_mean_norm
from conceptlab.train import ConceptImage, TrainConfig, train_concepts

RESULTS = Path(__file__).parent / "results"
VARIANTS = {
    "no mask": {"mask": False, "lambda_attn": 0.0},
    "masked": {"mask": True, "lambda_attn": 0.0},
    "masked + attn": {"mask": True, "lambda_attn": None},   # None: the preset's value
}


def other_background(own: str) -> str:
    return "black" if own == "gray" else "gray"


def spec_of(ex) -> dict:
    return json.loads((data_dir() / "examples" / f"{ex.name}.json").read_text())["spec"]


def object_concepts(ex):
    """The example's object concepts: indices, init words, (colour, shape) labels."""
    objs = spec_of(ex)["objects"]
    out = []
    for k, word in enumerate(ex.init_words):
        if word == "background":
            continue
        o = objs[k]
        out.append((k, word, (o["colour"], o["shape"])))
    return out


def run_one(model, ex, variant: str, cfg: TrainConfig, n: int, clf, log=print) -> list[dict]:
    pipe = load_pipeline(model)   # fresh: no tokens of earlier runs
    vocab = vocabulary_mean_norm(pipe)
    v = VARIANTS[variant]
    concepts = object_concepts(ex)
    ks = [k for k, _, _ in concepts]
    masks = ex.masks[ks] if v["mask"] else np.ones((len(ks),) + ex.masks.shape[1:], bool)
    c = add_concept_tokens(pipe, len(ks), init_words=[w for _, w, _ in concepts])
    lam = cfg.lambda_attn if v["lambda_attn"] is None else v["lambda_attn"]
    t0 = time.time()
    train_concepts(pipe, ConceptImage(ex.image, masks), c, cfg.replace(lambda_attn=lam),
                   progress=False, attention_every=0)
    train_s = time.time() - t0
    bg = other_background(spec_of(ex)["background"])
    prompt_all = cfg.template.format(cfg.joiner.join(c.names))
    am = attention_maps(pipe, ex.image, prompt_all, n_timesteps=16, seed=0)
    rows = []
    for j, (k, word, (colour, shape)) in enumerate(concepts):
        name = c.names[j]
        imgs = generate(pipe, c, f"a photo of {name}", n=n, seed=0, output_type="np")
        rec = judge(imgs, [[(colour, shape)]] * n, clf)
        imgs_bg = generate(pipe, c, f"a photo of {name} on a {bg} background", n=n, seed=0,
                           output_type="np")
        a = am.for_word(name, size=ex.image.shape[:2]).numpy()
        rows.append({
            "image": ex.name, "variant": variant, "concept": ex.concepts[k], "token": name,
            "colour": colour, "shape": shape,
            "colour_ok": float(np.mean([r["colour_ok"] for r in rec])),
            "shape_ok": float(np.mean([r["shape_ok"] for r in rec])),
            "concept_fidelity": float(np.mean([r["colour_ok"] and r["shape_ok"] for r in rec])),
            "prompt_background": bg,
            "prompt_fidelity": float(judge_background(imgs_bg, bg).mean()),
            "attention_iou": float(iou(a > 0.5, ex.masks[k])),
            "train_seconds": round(train_s, 1),
            "norm_ratio": float(c.norms()[j] / vocab),
        })
        log(f"  {ex.name:>28} {variant:>14} {name}: fidelity {rows[-1]['concept_fidelity']:.2f} "
            f"(colour {rows[-1]['colour_ok']:.2f} shape {rows[-1]['shape_ok']:.2f}) "
            f"bg {rows[-1]['prompt_fidelity']:.2f} IoU {rows[-1]['attention_iou']:.2f}")
    return rows


def words_ceiling(pipe, examples, n, clf) -> dict:
    """The same judgements for the ordinary words of each concept (no learning)."""
    fid, bgs = [], []
    for ex in examples:
        bg = other_background(spec_of(ex)["background"])
        for k, word, (colour, shape) in object_concepts(ex):
            phrase = world.ShapeObject(shape, colour, 0.5, 0.5, 0.2).phrase()
            imgs = generate(pipe, None, f"a photo of {phrase}", n=n, seed=0, output_type="np")
            rec = judge(imgs, [[(colour, shape)]] * n, clf)
            fid.append(np.mean([r["colour_ok"] and r["shape_ok"] for r in rec]))
            imgs = generate(pipe, None, f"a photo of {phrase} on a {bg} background", n=n,
                            seed=0, output_type="np")
            bgs.append(judge_background(imgs, bg).mean())
    return {"concept_fidelity": float(np.mean(fid)), "prompt_fidelity": float(np.mean(bgs))}


def summarise(rows) -> dict:
    out = {}
    for v in VARIANTS:
        r = [x for x in rows if x["variant"] == v]
        if r:
            out[v] = {k: float(np.mean([x[k] for x in r])) for k in
                      ("concept_fidelity", "colour_ok", "shape_ok", "prompt_fidelity",
                       "attention_iou", "train_seconds", "norm_ratio")}
            out[v]["n_concepts"] = len(r)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="shapes-ldm")
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: preset)")
    ap.add_argument("--examples", nargs="*", default=None)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "concept_fidelity.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    clf = load_classifier()
    cfg = TrainConfig.for_bundled()
    if args.steps:
        cfg = cfg.replace(steps=args.steps)
    examples = [load_example(n) for n in (args.examples or list_examples())]
    t0 = time.time()
    rows = []
    for ex in examples:
        for v in VARIANTS:
            rows += run_one(args.model, ex, v, cfg, args.n, clf)
    ceiling = words_ceiling(pipe, examples, args.n, clf)
    summary = summarise(rows)
    res = {"command": "python benchmarks/concept_fidelity.py " + " ".join(
               f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
               if v not in (None, 0) and k not in ("out", "model", "examples")),
           "model": args.model, "config": cfg.to_dict(), "n_samples": args.n,
           "summary": summary, "words_ceiling": ceiling, "rows": rows,
           "seconds": round(time.time() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"\n{len(examples)} images, {summary[next(iter(summary))]['n_concepts']} object "
          f"concepts, {args.n} samples per prompt, {cfg.steps} steps per run")
    print(f"{'':>15}{'concept fid.':>14}{'colour':>8}{'shape':>8}{'prompt fid.':>13}"
          f"{'attn IoU':>10}{'|v|/mean':>10}{'train s':>9}")
    for v, s in summary.items():
        print(f"{v:>15}{s['concept_fidelity']:>14.2f}{s['colour_ok']:>8.2f}{s['shape_ok']:>8.2f}"
              f"{s['prompt_fidelity']:>13.2f}{s['attention_iou']:>10.2f}{s['norm_ratio']:>10.2f}"
              f"{s['train_seconds']:>9.1f}")
    print(f"{'words (ceiling)':>15}{ceiling['concept_fidelity']:>14.2f}{'':>16}"
          f"{ceiling['prompt_fidelity']:>13.2f}")
    print(f"total {res['seconds']:.0f} s; written to {args.out}")


if __name__ == "__main__":
    main()
