"""The ``conceptlab`` command line. ``conceptlab --help`` lists the subcommands."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import fields

import numpy as np


def _threads(n):
    import torch
    if n:
        torch.set_num_threads(n)


def cmd_sample(args):
    from .figures import save_captioned_grid
    from .pipeline import load_pipeline, sample_grid

    _threads(args.threads)
    pipe = load_pipeline(args.model)
    prompts = args.prompt or [
        "a red star on a gray background",
        "a blue circle and a yellow heart on a black background",
        "a green square and an orange triangle on a striped background",
        "a white heart on a brown background",
        "a purple star and a red circle and a yellow square on a beige background",
    ]
    t0 = time.time()
    rows, prompts = sample_grid(pipe, prompts, n_per_prompt=args.n, seed=args.seed,
                                guidance_scale=args.guidance, num_inference_steps=args.steps)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "samples.png")
    save_captioned_grid(rows, prompts, path)
    print(f"wrote {path} ({len(prompts)} prompts x {args.n} images, {time.time() - t0:.1f} s)")


def cmd_learn(args):
    from .em import MaskConfig, learn_concepts
    from .pipeline import load_pipeline, native_size, to_uint8_image

    _threads(args.threads)
    pipe = load_pipeline(args.model)
    size = native_size(pipe)
    images = []
    for path in args.images:
        if not os.path.exists(path):
            raise ValueError(f"no such image: {path}")
        img = to_uint8_image(path)
        if img.shape[:2] != (size, size):
            print(f"note: {path} is {img.shape[1]}x{img.shape[0]}; resizing to {size}x{size}")
            img = to_uint8_image(img, size, resize=True)
        images.append(img)
    words = [w.strip() or None for w in args.concepts.split(",")]
    concepts = learn_concepts(pipe, images, words, method=args.method, steps=args.steps,
                              em_every=args.em_every, seed=args.seed, progress=not args.quiet,
                              checkpoint_dir=os.path.join(args.out, "checkpoint"),
                              mask_config=MaskConfig(background_threshold=args.background_threshold))
    concepts.save(args.out)
    fig = concepts.plot_mask_evolution()
    fig.savefig(os.path.join(args.out, "mask_evolution.png"), dpi=100)
    print(f"learned {', '.join(concepts.names)} ({args.method}); saved to {args.out}")
    for w in concepts.warnings:
        print("warning:", w)
    return pipe, concepts


def cmd_generate(args):
    from .em import Concepts
    from .figures import save_captioned_grid
    from .generation import generate
    from .pipeline import load_pipeline

    _threads(args.threads)
    pipe = load_pipeline(args.model)
    if not os.path.exists(os.path.join(args.concepts, "em.json")):
        raise ValueError(f"{args.concepts} holds no learned concepts (run `conceptlab learn` "
                         "first and pass its --out folder)")
    concepts = Concepts.load(args.concepts, pipe)
    rows = [np.asarray(generate(pipe, concepts.tokens, p, n=args.n, seed=args.seed,
                                output_type="np")) for p in args.prompt]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "generations.png")
    save_captioned_grid(rows, args.prompt, path)
    print(f"wrote {path}")


def cmd_demo(args):
    """Learn the concepts of a bundled example with EM, then generate them in new prompts."""
    import json

    from .em import learn_concepts
    from .examples import load_example
    from .figures import image_grid_figure, overlay_masks, save_captioned_grid
    from .generation import generate
    from .masks import iou
    from .pipeline import load_pipeline

    _threads(args.threads)
    t0 = time.time()
    pipe = load_pipeline(args.model)
    ex = load_example(args.example)
    os.makedirs(args.out, exist_ok=True)
    print(f"example {ex.name!r}: concepts {ex.concepts}")
    concepts = learn_concepts(pipe, ex.image, ex.init_words, method="em", steps=args.steps,
                              seed=args.seed, progress=not args.quiet, gt_masks=ex.masks,
                              checkpoint_dir=os.path.join(args.out, "checkpoint"))
    concepts.save(os.path.join(args.out, "concepts"))
    fig = concepts.plot_mask_evolution()
    fig.savefig(os.path.join(args.out, "mask_evolution.png"), dpi=100)
    final = concepts.masks[0]
    fig = image_grid_figure([[ex.image, overlay_masks(ex.image, final),
                              overlay_masks(ex.image, ex.masks)]],
                            col_titles=["image", "learned masks", "ground truth"], scale=2.5)
    fig.savefig(os.path.join(args.out, "final_masks.png"), dpi=100)
    names = concepts.names
    prompts = [f"a photo of {names[0]}", f"a photo of {names[1]}",
               f"a photo of {names[1]} and {names[0]}"]
    if len(names) > 2:
        prompts.append(f"a photo of {names[0]} and {names[1]} on {names[-1]}")
    prompts.append(f"a photo of {names[0]} and a yellow circle on a gray background")
    rows = [np.asarray(generate(pipe, concepts.tokens, p, n=args.n, seed=args.seed,
                                output_type="np")) for p in prompts]
    save_captioned_grid(rows, prompts, os.path.join(args.out, "generations.png"))
    ious = [float(iou(final[k], ex.masks[k])) for k in range(len(names))]
    summary = {"example": ex.name, "concepts": dict(zip(names, ex.concepts)),
               "iou_per_concept": [round(v, 3) for v in ious],
               "iou_over_e_steps": concepts.iou_history, "e_steps": concepts.e_steps,
               "seconds": round(time.time() - t0, 1)}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print("mask IoU vs ground truth per E-step:")
    for s, row in zip(concepts.e_steps, concepts.iou_history):
        print(f"  step {s:>4}: " + "  ".join(f"{n} {v:.2f}" for n, v in zip(names, row)))
    print("final mask IoU: " + ", ".join(f"{n} ({c}) {v:.2f}"
                                         for n, c, v in zip(names, ex.concepts, ious)))
    print(f"mean IoU {np.mean(ious):.3f}; outputs in {args.out}/ "
          f"(mask_evolution.png, final_masks.png, generations.png, summary.json); "
          f"{time.time() - t0:.0f} s")


def cmd_train_model(args):
    from .train_model import TrainConfig, train_model

    kw = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
          if getattr(args, f.name, None) is not None}
    out = train_model(TrainConfig(**kw), progress=not args.quiet)
    print(f"saved the pipeline to {out}")


def cmd_make_examples(args):
    from .examples import write_examples

    names = write_examples(args.out)
    print(f"wrote {len(names)} examples: {', '.join(names)}")


def build_parser() -> argparse.ArgumentParser:
    from .train_model import TrainConfig

    p = argparse.ArgumentParser(
        prog="conceptlab",
        description="Multi-concept personalisation of text-to-image diffusion models.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def common(sp, out="outputs"):
        sp.add_argument("--model", default="shapes-ldm",
                        help="bundled model name, local diffusers folder or hub id")
        sp.add_argument("--out", default=out, help="output folder (default: %(default)s)")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")

    sp = sub.add_parser("demo", help="the main job: learn an example's concepts with EM, "
                        "write masks and generations to outputs/, print the mask IoU")
    common(sp)
    sp.add_argument("--example", default="striped-star-and-heart",
                    help="bundled example (data/examples)")
    sp.add_argument("--steps", type=int, default=None, help="training steps (default: preset)")
    sp.add_argument("-n", type=int, default=4, help="images per prompt")
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser("sample", help="write a captioned grid of generations")
    common(sp)
    sp.add_argument("prompt", nargs="*", help="prompts (default: a fixed set)")
    sp.add_argument("-n", type=int, default=4, help="images per prompt")
    sp.add_argument("--steps", type=int, default=25, help="DDIM steps")
    sp.add_argument("--guidance", type=float, default=4.0, help="guidance scale")
    sp.set_defaults(func=cmd_sample)

    sp = sub.add_parser("learn", help="learn one token (and mask) per concept from images")
    sp.add_argument("images", nargs="+", help="image files (resized to the model's size)")
    sp.add_argument("--concepts", required=True,
                    help="comma-separated class words, one per concept, e.g. shape,shape,background")
    sp.add_argument("--method", default="em", choices=["em", "fixed", "none"])
    sp.add_argument("--steps", type=int, default=None)
    sp.add_argument("--em-every", type=int, default=None)
    sp.add_argument("--background-threshold", type=float, default=0.3)
    sp.add_argument("--quiet", action="store_true")
    common(sp, out="outputs/concepts")
    sp.set_defaults(func=cmd_learn)

    sp = sub.add_parser("generate", help="generate images with learned concept tokens")
    sp.add_argument("concepts", help="folder written by `conceptlab learn`")
    sp.add_argument("prompt", nargs="+", help='prompts, e.g. "a photo of [v1] next to [v2]"')
    sp.add_argument("-n", type=int, default=4)
    common(sp, out="outputs")
    sp.set_defaults(func=cmd_generate)

    sp = sub.add_parser("train-model", help="train the bundled model from scratch (resumable)")
    for f in fields(TrainConfig):
        sp.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(f.default),
                        default=None, help=f"default: {f.default}")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(func=cmd_train_model)

    sp = sub.add_parser("make-examples", help="re-render the bundled example images")
    sp.add_argument("--out", default=None, help="folder (default: data/examples)")
    sp.set_defaults(func=cmd_make_examples)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # version chatter off
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"conceptlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
