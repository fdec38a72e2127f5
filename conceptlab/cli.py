"""The ``conceptlab`` command line. ``conceptlab --help`` lists the subcommands.

Why one module of about 550 lines: each subcommand is a small ``cmd_*`` function and its
``_add_*`` argument parser beside it, and they share one error policy (:func:`main`: one
line on stderr, exit 2); the work itself is in the library.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from dataclasses import fields

import numpy as np


class Interrupted(Exception):
    """A run stopped by Ctrl-C, its checkpoint saved: exit 130."""


def _threads(n):
    import torch
    if n:
        torch.set_num_threads(n)


def _int_at_least(lo):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    return parse


def _seed(text):
    from .models import check_seed

    try:
        return check_seed(int(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _float_in(lo, hi=None):
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(v) or not v >= lo or (hi is not None and not v <= hi):
            raise argparse.ArgumentTypeError(
                f"must be a finite number in [{lo}, {hi}], got {v}" if hi is not None
                else f"must be a finite number >= {lo}, got {v}")
        return v
    return parse


def cmd_sample(args):
    from .fileio import check_number
    from .generation import sample_grid
    from .models import check_seed, load_pipeline
    from .viz.figures import save_captioned_grid

    check_seed(args.seed)
    if args.guidance is not None:
        check_number("--guidance", args.guidance, 0)  # inf passes the parser's >= 0
    _threads(args.threads)
    _safe_output(args.out)
    pipe = load_pipeline(args.model, progress=False if getattr(args, "quiet", False) else None)
    prompts = args.prompt or [
        "a red star on a gray background",
        "a blue circle and a yellow heart on a black background",
        "a green square and an orange triangle on a striped background",
        "a white heart on a brown background",
        "a purple star and a red circle and a yellow square on a beige background",
    ]
    t0 = time.time()
    rows, prompts = sample_grid(pipe, prompts, n_per_prompt=args.n, seed=args.seed,
                                guidance_scale=args.guidance,
                                num_inference_steps=args.inference_steps)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "samples.png")
    save_captioned_grid(rows, prompts, path)
    print(f"wrote {path} ({len(prompts)} prompts x {args.n} images, {time.time() - t0:.1f} s)")


def _safe_output(path: str, what: str = "--out") -> str:
    """Refuse an output inside the bundled data or a model folder (it would replace their
    files and break later loads)."""
    from .concept_files import refuse_bundled_data

    p = refuse_bundled_data(path, what)
    for folder in (p, os.path.dirname(p), os.path.dirname(os.path.dirname(p))):
        if os.path.isfile(os.path.join(folder, "model_index.json")):
            raise ValueError(f"{what} {path} is inside the model folder {folder}: write "
                             "elsewhere")
    return path


def _concept_words(text: str) -> list[str]:
    words = [w.strip() for w in text.split(",")]
    if any(not w for w in words):
        raise ValueError(f"--concepts {text!r} has an empty entry: give one class word per "
                         "concept, e.g. --concepts star,heart,background")
    return words


def cmd_learn(args):
    from .fileio import folder_lock
    from .many import check_learn_folder, fit_to_model, launched_processes, learn_into_folder
    from .models import load_pipeline, to_uint8

    _threads(args.threads)
    words = None if args.concepts is None else _concept_words(args.concepts)  # None: discover
    if words is not None and args.object_words is not None:
        raise ValueError("--object-words is for discovered concepts: leave out --concepts, "
                         "or --object-words")
    if words is None and args.background_threshold is not None:
        raise ValueError("--background-threshold goes with --concepts: discovered concepts "
                         "use the E-step's defaults for their start words")
    images = [to_uint8(path) for path in args.images]     # bad images: before the model load
    ckpt = os.path.join(args.out, "checkpoint")
    state = launched_processes() if "RANK" in os.environ else None  # accelerate launch
    main = state is None or state.is_main_process
    if main:
        check_learn_folder(args.out, resume=args.resume, overwrite=args.overwrite)
    # one run at a time into a folder; data-parallel processes share the main one's lock
    with folder_lock(args.out) if main else contextlib.nullcontext():
        device = None if state is None else str(state.device)
        pipe = load_pipeline(args.model, device=device, progress=False if args.quiet else None)
        images, notes = fit_to_model(pipe, images, args.images)
        for note in notes:
            print("note:", note)
        concepts = learn_into_folder(pipe, images, words, args.out, method=args.method,
                                     steps=args.steps, em_every=args.em_every, seed=args.seed,
                                     background_threshold=0.3 if args.background_threshold
                                     is None else args.background_threshold,
                                     overwrite=args.overwrite, progress=not args.quiet,
                                     object_words=args.object_words or "top")
        if not concepts.complete:
            raise Interrupted(f"interrupted: the run is INCOMPLETE and nothing was saved to "
                              f"{args.out} as a result; its checkpoint is in {ckpt}: run the "
                              "same command again to resume")
    if main:
        if words is None:
            for i, ids in enumerate(concepts.concept_ids):
                starts = concepts.tokens.init_words
                print(f"image {i}: discovered {len(ids) - 1} object(s) and the background: "
                      + ", ".join(f"{concepts.names[c]} (from {starts[c] or 'a random row'})"
                                  for c in ids))
        print(f"learned {', '.join(concepts.names)} ({args.method}); saved to {args.out}")
        for w in concepts.warnings:
            print("warning:", w)
    return pipe, concepts


def cmd_learn_many(args):
    """Learn every image of a folder into OUT/<stem>; under ``accelerate launch`` the
    processes share the images (:mod:`conceptlab.many`)."""
    from .many import ManyReport, launched_processes, learn_many

    _threads(args.threads)
    words = _concept_words(args.concepts)
    _safe_output(args.out)
    state = launched_processes()
    report = learn_many(args.model, args.folder, args.out, words,
                        process_index=state.process_index, num_processes=state.num_processes,
                        method=args.method, steps=args.steps, em_every=args.em_every,
                        seed=args.seed, background_threshold=args.background_threshold,
                        overwrite=args.overwrite, progress=not args.quiet,
                        device=str(state.device))
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        report = ManyReport.merge(gather_object([report]))
    if state.is_main_process:
        print(report.summary(), flush=True)
    state.wait_for_everyone()        # the summary is out before any process exits non-zero
    if not state.is_main_process:    # the main process prints the error too
        if report.interrupted or report.failed:
            raise SystemExit(130 if report.interrupted else 2)
        return report
    if report.interrupted:
        raise Interrupted(f"interrupted: run the same command again to resume; finished "
                          f"results in {args.out} are kept")
    if report.failed:
        raise RuntimeError(f"{len(report.failed)} of {len(report.outcomes)} images failed "
                           "(the reasons are above); run the same command again to retry them")
    return report


def cmd_generate(args):
    from .generation import generate
    from .models import load_pipeline
    from .result import LearnedConcepts
    from .viz.figures import save_captioned_grid

    _threads(args.threads)
    _safe_output(args.out)
    concepts = LearnedConcepts.load(args.concepts, allow_other_model=args.allow_other_model)
    pipe = load_pipeline(args.model, progress=False if getattr(args, "quiet", False) else None)
    rows = [np.asarray(generate(pipe, concepts, p, n=args.n, seed=args.seed,
                                guidance_scale=args.guidance,
                                num_inference_steps=args.inference_steps,
                                output_type="np")) for p in args.prompt]
    seeds = f"seeds {args.seed}-{args.seed + args.n - 1}" if args.n > 1 else f"seed {args.seed}"
    g = "" if args.guidance is None else f", guidance {args.guidance:g}"
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "generations.png")
    save_captioned_grid(rows, [f"{p}  ({seeds}{g})" for p in args.prompt], path)
    print(f"wrote {path} ({len(rows)} prompts x {args.n} images)")


def cmd_evaluate(args):
    """Print the paper's measures for a folder of learned concepts (``conceptlab learn``)."""
    from .evaluate import (
        MEASURES,
        ClipJudge,
        ShapesJudge,
        concept_specs_of_example,
        evaluate,
        format_table,
        specs_from_result,
    )
    from .fileio import atomic_write_json
    from .models import load_pipeline
    from .result import LearnedConcepts
    from .shapes.examples import load_example

    _threads(args.threads)
    if args.json:
        _safe_output(args.json, "--json")
    pipe = load_pipeline(args.model, progress=False)
    concepts = LearnedConcepts.load(args.concepts, allow_other_model=args.allow_other_model)
    gt = None
    if args.example:
        if args.words:
            raise ValueError("give --example or --words, not both")
        ex = load_example(args.example)
        if len(ex.init_words) != len(concepts.names) or len(concepts.images) != 1 or \
                concepts.images[0].shape != ex.image.shape or \
                not np.array_equal(concepts.images[0], ex.image):
            raise ValueError(f"{args.concepts} holds {len(concepts.names)} concepts of "
                             f"{len(concepts.images)} image(s); the example {ex.name!r} has "
                             f"{len(ex.init_words)} concepts in one image, and its image "
                             "must be the one learned from: not learned from it")
        specs = concept_specs_of_example(ex, concepts.names)
        gt = [ex.masks]
    else:
        specs = specs_from_result(concepts, args.words)
    judge = ClipJudge(args.clip) if args.clip else ShapesJudge()
    ev = evaluate(pipe, concepts, specs, judge=judge, n=args.n, seed=args.seed, gt_masks=gt)
    for r in ev["prompts"]:
        vals = "  ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in r.items()
                         if isinstance(v, float))
        print(f"  {r['prompt']:<52} {vals}")
    print(f"\n{judge.name} judge, {args.n} samples per prompt (seeds {args.seed}-"
          f"{args.seed + args.n - 1}); '-': this judge cannot say")
    print(format_table({os.path.basename(os.path.normpath(args.concepts)) or args.concepts:
                        {k: {"mean": ev["summary"][k], "ci95": None} for k in MEASURES}}))
    if args.json:
        atomic_write_json(args.json, {k: v for k, v in ev.items() if k != "images"}, indent=1)
        print(f"wrote {args.json}")


def cmd_demo(args):
    """Learn the concepts of a bundled example with EM, then generate them in new prompts."""
    from .em import learn_concepts
    from .em_callbacks import GroundTruthIoU
    from .fileio import atomic_write_json
    from .generation import generate
    from .masks import iou
    from .models import load_pipeline
    from .shapes.examples import load_example
    from .viz.figures import image_grid_figure, label_image, save_captioned_grid

    _threads(args.threads)
    _safe_output(args.out)
    t0 = time.time()
    pipe = load_pipeline(args.model, progress=False if getattr(args, "quiet", False) else None)
    ex = load_example(args.example)
    os.makedirs(args.out, exist_ok=True)
    print(f"example {ex.name!r}: concepts {ex.concepts}")
    concepts = learn_concepts(pipe, ex.image, ex.init_words, method="em", steps=args.steps,
                              seed=args.seed, progress=not args.quiet,
                              callbacks=[GroundTruthIoU(ex.masks)],
                              checkpoint_dir=os.path.join(args.out, "demo-checkpoint"),
                              overwrite=True)  # the demo's own folder: it always runs afresh
    if not concepts.complete:
        raise Interrupted("interrupted: the demo is incomplete")
    concepts.save(os.path.join(args.out, "concepts"))
    fig = concepts.plot_mask_evolution()
    fig.savefig(os.path.join(args.out, "mask_evolution.png"), dpi=100)
    final = concepts.masks[0]
    fig = image_grid_figure([[ex.image, label_image(ex.image, final),
                              label_image(ex.image, ex.masks)]],
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
    atomic_write_json(os.path.join(args.out, "summary.json"), summary, indent=1)
    print("mask IoU vs ground truth per E-step:")
    for s, row in zip(concepts.e_steps, concepts.iou_history):
        print(f"  step {s:>4}: " + "  ".join(f"{n} {v:.2f}" for n, v in zip(names, row)))
    print("final mask IoU: " + ", ".join(f"{n} ({c}) {v:.2f}"
                                         for n, c, v in zip(names, ex.concepts, ious)))
    print(f"mean IoU {np.mean(ious):.3f}; outputs in {args.out}/ "
          f"(mask_evolution.png, final_masks.png, generations.png, summary.json); "
          f"{time.time() - t0:.0f} s")


def cmd_train_model(args):
    """Train the bundled model; under ``accelerate launch`` every process runs this and
    they train data-parallel (:mod:`conceptlab.shapes.train`)."""
    from .shapes.train import (
        ModelTrainConfig,
        check_batches,
        new_accelerator,
        start_from_vae,
        train_model,
    )

    kw = {f.name: getattr(args, f.name) for f in fields(ModelTrainConfig)
          if getattr(args, f.name, None) is not None}
    cfg = ModelTrainConfig(**kw)  # checks every number (ValueError: exit 2, nothing written)
    accelerator = new_accelerator()
    check_batches(cfg, accelerator.num_processes)
    if args.from_vae and accelerator.is_main_process:
        start_from_vae(cfg, args.from_vae)
    accelerator.wait_for_everyone()
    out = train_model(cfg, progress=not args.quiet, accelerator=accelerator)
    if accelerator.is_main_process:
        n = accelerator.num_processes
        print(f"saved the pipeline to {out}" + (f" ({n} processes)" if n > 1 else ""))


def cmd_make_examples(args):
    from .shapes.examples import write_examples

    names = write_examples(args.out)
    print(f"wrote {len(names)} examples: {', '.join(names)}")


def _common(sp, out="outputs"):
    sp.add_argument("--model", default="shapes-ldm",
                    help="bundled model name, local diffusers folder or hub id")
    sp.add_argument("--out", default=out, help="output folder (default: %(default)s)")
    sp.add_argument("--seed", type=_seed, default=0)
    sp.add_argument("--threads", type=_int_at_least(0), default=0,
                    help="torch CPU threads (0: default)")


def _add_demo(sub):
    sp = sub.add_parser("demo", help="the main job: learn an example's concepts with EM, "
                        "write masks and generations to outputs/, print the mask IoU")
    _common(sp)
    sp.add_argument("--example", default="striped-star-and-heart",
                    help="bundled example (data/examples)")
    sp.add_argument("--steps", type=_int_at_least(1), default=None,
                    help="training steps in all, phases 1 and 2 (default: the preset's)")
    sp.add_argument("-n", type=_int_at_least(1), default=4, help="images per prompt")
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(func=cmd_demo)


def _add_sample(sub):
    sp = sub.add_parser("sample", help="write a captioned grid of generations")
    _common(sp)
    sp.add_argument("prompt", nargs="*", help="prompts (default: a fixed set)")
    sp.add_argument("-n", type=_int_at_least(1), default=4, help="images per prompt")
    sp.add_argument("--inference-steps", type=_int_at_least(1), default=None,
                    help="sampler steps (default: the model's)")
    sp.add_argument("--guidance", type=_float_in(0), default=None,
                    help="guidance scale (default: the model's)")
    sp.set_defaults(func=cmd_sample)


def _add_learn(sub):
    sp = sub.add_parser("learn", help="learn one token (and mask) per concept from images")
    sp.add_argument("images", nargs="+", help="image files (resized to the model's size)")
    sp.add_argument("--concepts", default=None,
                    help="comma-separated class words, one per concept, e.g. "
                         "shape,shape,background (default: discover the concepts; the "
                         "background is always the last concept of each image)")
    sp.add_argument("--method", default="em", choices=["em", "fixed", "none"])
    sp.add_argument("--steps", type=_int_at_least(1), default=None,
                    help="training steps in all, phases 1 and 2 (default: the preset's)")
    sp.add_argument("--em-every", type=_int_at_least(1), default=None)
    sp.add_argument("--background-threshold", type=_float_in(0, 1), default=None,
                    help="the E-step's background threshold, with --concepts (default 0.3)")
    sp.add_argument("--object-words", choices=["top", "shared"], default=None,
                    help="without --concepts, what the discovered objects' tokens start "
                         "from: top, the word each one's attention reads most (default), "
                         "or shared, one word for all (the paper's setting)")
    sp.add_argument("--quiet", action="store_true")
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--overwrite", action="store_true",
                   help="replace a run or result already in --out")
    g.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out (an error if there is none)")
    _common(sp, out="outputs/concepts")
    sp.set_defaults(func=cmd_learn)


def _add_learn_many(sub):
    sp = sub.add_parser("learn-many", help="learn the concepts of every image of a folder, one "
                        "result folder per image (resumable; several processes share the "
                        "images under `accelerate launch`)")
    sp.add_argument("folder", help="a folder of images (.png, .jpg, ...); OUT/<name> per image")
    sp.add_argument("--out", required=True, help="the folder of results")
    sp.add_argument("--concepts", required=True,
                    help="comma-separated class words, one per concept, the same for every "
                         "image, e.g. star,background")
    sp.add_argument("--method", default="em", choices=["em", "fixed", "none"])
    sp.add_argument("--steps", type=_int_at_least(1), default=None,
                    help="training steps per image, phases 1 and 2 (default: the preset's)")
    sp.add_argument("--em-every", type=_int_at_least(1), default=None)
    sp.add_argument("--background-threshold", type=_float_in(0, 1), default=0.3)
    sp.add_argument("--quiet", action="store_true")
    sp.add_argument("--overwrite", action="store_true",
                    help="learn again into result folders that hold a result or another run")
    sp.add_argument("--model", default="shapes-ldm",
                    help="bundled model name, local diffusers folder or hub id")
    sp.add_argument("--seed", type=_seed, default=0, help="the seed of every image's run")
    sp.add_argument("--threads", type=_int_at_least(0), default=0,
                    help="torch CPU threads per process (0: default)")
    sp.set_defaults(func=cmd_learn_many)


def _add_generate(sub):
    sp = sub.add_parser("generate", help="generate images with learned concept tokens")
    sp.add_argument("concepts", help="folder written by `conceptlab learn`")
    sp.add_argument("--allow-other-model", action="store_true",
                    help="use the concepts with --model although its weights differ from "
                         "the model they were learned on")
    sp.add_argument("prompt", nargs="+", help='prompts, e.g. "a photo of [v1] next to [v2]"')
    sp.add_argument("-n", type=_int_at_least(1), default=4,
                    help="images per prompt, seeds --seed .. --seed + n - 1")
    sp.add_argument("--inference-steps", type=_int_at_least(1), default=None,
                    help="sampler steps (default: the model's)")
    sp.add_argument("--guidance", type=_float_in(0), default=None,
                    help="guidance scale (default: the model's)")
    _common(sp, out="outputs")
    sp.set_defaults(func=cmd_generate)


def _add_evaluate(sub):
    sp = sub.add_parser("evaluate", help="print the paper's measures (identity, prompt "
                        "fidelity, diversity, ...) for a folder of learned concepts")
    sp.add_argument("concepts", help="folder written by `conceptlab learn` or the demo")
    sp.add_argument("--allow-other-model", action="store_true",
                    help="use the concepts with --model although its weights differ")
    sp.add_argument("--words", nargs="+", default=None,
                    help='class words per concept of the (first) image, e.g. "a blue striped '
                         'star" "a red heart" "a beige background" (default: the init words)')
    sp.add_argument("--example", default=None,
                    help="the bundled example the concepts were learned from: its true "
                         "attributes, and the masks' IoU")
    sp.add_argument("--clip", default=None, metavar="DIR",
                    help="a LOCAL CLIP folder: CLIP-I / CLIP-T / embedding diversity instead "
                         "of the offline shapes judge")
    sp.add_argument("-n", type=_int_at_least(2), default=8, help="samples per prompt")
    sp.add_argument("--json", default=None, help="also write the evaluation to this file")
    sp.add_argument("--model", default="shapes-ldm",
                    help="bundled model name, local diffusers folder or hub id")
    sp.add_argument("--seed", type=_seed, default=0)
    sp.add_argument("--threads", type=_int_at_least(0), default=0,
                    help="torch CPU threads (0: default)")
    sp.set_defaults(func=cmd_evaluate)


def _add_train_model(sub):
    from .shapes.train import ModelTrainConfig

    sp = sub.add_parser("train-model", help="train the bundled model from scratch (resumable; "
                        "data-parallel under `accelerate launch`)")
    for f in fields(ModelTrainConfig):
        sp.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(f.default),
                        default=None, help=f"default: {f.default}")
    sp.add_argument("--from-vae", default=None, metavar="RUN",
                    help="reuse the data and trained VAE of another run folder (same data / "
                         "VAE settings); train only the U-Net, e.g. a control")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(func=cmd_train_model)


def cmd_upgrade(args):
    """Convert a result folder of conceptlab 0.1 to the standard files."""
    from .legacy import upgrade_folder
    from .models import load_pipeline

    pipe = load_pipeline(args.model, progress=False)
    result = upgrade_folder(args.folder, pipe)
    print(f"converted {args.folder}: {', '.join(result.names)}"
          + (f" (phase 2: {result.tokens.unet.mode})" if result.tokens.unet else ""))


def _add_upgrade(sub):
    sp = sub.add_parser("upgrade", help="convert a concepts folder written by conceptlab 0.1")
    sp.add_argument("folder", help="the folder (concepts.safetensors, em.json, masks.npz)")
    sp.add_argument("--model", default="shapes-ldm",
                    help="the base model the concepts were learned on (its weights identify "
                         "it from now on)")
    sp.set_defaults(func=cmd_upgrade)


def _add_make_examples(sub):
    sp = sub.add_parser("make-examples", help="re-render the bundled example images")
    sp.add_argument("--out", default=None, help="folder (default: data/examples)")
    sp.set_defaults(func=cmd_make_examples)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="conceptlab",
        description="Multi-concept personalisation of text-to-image diffusion models.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_add_demo, _add_sample, _add_learn, _add_learn_many, _add_generate, _add_evaluate,
                _add_train_model, _add_upgrade, _add_make_examples):
        add(sub)
    return p


def main(argv=None):
    """Run a subcommand. Every error is one line on stderr and exit code 2 (1 for an
    unexpected one, 130 for Ctrl-C); ``--debug`` shows the traceback instead."""
    parser = build_parser()
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # version chatter off
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"conceptlab {args.command}: interrupted", file=sys.stderr)
        return 130
    except Interrupted as e:
        print(f"conceptlab {args.command}: {e}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, OSError, ImportError,
            KeyError) as e:
        if args.debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"conceptlab {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except Exception as e:
        if args.debug:
            raise
        print(f"conceptlab {args.command}: unexpected error ({type(e).__name__}: {e}); rerun "
              "with --debug for the traceback and report it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
