"""Seconds per concept-training step and peak memory (bundled model; SD-1.5-shaped pipeline).

    python -m benchmarks concept_step_time                  # -> .../concept_step_time/bundled.json
    python -m benchmarks concept_step_time --models sd15 --threads 1   # SD-1.5-shaped, 512 px

Every configuration runs in its own subprocess, so its peak resident memory (ru_maxrss) is
its own. Each trains 2 concepts on a bundled example image with ``ConceptTrainer`` and
reports the median seconds of steps 2..N (step 1 pays one-off costs).

- bundled, phase 1: the preset ``TrainConfig.for_bundled()`` (batch 4, attention loss on);
- bundled, phase 2: the same plus the U-Net, fully (``phase2="full"``) and with LoRA
  (``phase2="lora"``, needs peft);
- ``sd15``: the same code on a pipeline with Stable Diffusion 1.5's shapes (U-Net 860M,
  CLIP ViT-L text encoder, SD VAE) and RANDOM weights (no weights can be downloaded here):
  one 512x512 image, batch 1, fp32, CPU, phase 1 and phase 2 with LoRA (a full phase 2
  needs about 14 GB for weights, gradients and AdamW state before any activation). Its
  timings show the code scales; its losses mean nothing.

Timings are measured afresh on every run (nothing is cached).
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
import time


def measure(kind: str, phase: str, steps: int, threads: int, queue):
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import numpy as np
    import torch

    from conceptlab.models import load_pipeline, weights_fingerprint
    from conceptlab.shapes.examples import load_example
    from conceptlab.tokens import new_concepts
    from conceptlab.train import ConceptImage, ConceptTrainer, TrainConfig

    torch.set_num_threads(threads)
    ex = load_example("striped-star-and-heart")
    image, masks = ex.image, ex.masks[:2]
    fingerprint = None
    if kind == "sd15":
        from benchmarks.frame import sd15_pipeline

        pipe = sd15_pipeline()
        image = np.asarray(__import__("PIL.Image").Image.fromarray(image).resize((512, 512)))
        cfg = TrainConfig.for_stable_diffusion(batch_size=1)
    else:
        pipe = load_pipeline()
        cfg = TrainConfig.for_bundled()
        fingerprint = weights_fingerprint(pipe)   # before training changes any weight
    n1 = steps if phase == "phase 1" else 1
    cfg = cfg.replace(steps=n1, phase2="none" if phase == "phase 1" else phase.split()[-1],
                      phase2_steps=0 if phase == "phase 1" else steps)
    c = new_concepts(pipe, 2, init_words=["star", "heart"])
    times = []
    t = [time.perf_counter()]

    def cb(trainer, logs):
        now = time.perf_counter()
        times.append(now - t[0])
        t[0] = now

    trainer = ConceptTrainer(pipe, ConceptImage(image, masks), c, cfg, progress=False,
                             attention_every=0, callback=cb)
    t[0] = time.perf_counter()
    trainer.train()
    trainer.close()
    # phase 2 timings: the steps after the single phase-1 step
    times = times[1:] if phase != "phase 1" else times
    queue.put({"model": kind, "phase": phase, "steps": len(times),
               "seconds_per_step": statistics.median(times[1:] or times),
               "first_step_s": times[0], "batch": cfg.batch_size,
               "image": int(image.shape[0]), "threads": threads,
               "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
               "weights_fingerprint": fingerprint})


def run_job(kind, phase, steps, threads):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=measure, args=(kind, phase, steps, threads, q))
    p.start()
    p.join()
    if p.exitcode != 0:
        return {"model": kind, "phase": phase, "error": f"exit code {p.exitcode}"}
    return q.get()


QUICK = {"steps": 3}


def result_name(args) -> str:
    return "+".join(args.models)


def add_arguments(ap):
    ap.add_argument("--steps", type=int, default=12, help="steps per bundled measurement")
    ap.add_argument("--models", nargs="+", default=["bundled"], choices=["bundled", "sd15"])


def run(args, ctx):
    try:
        import peft  # noqa: F401
        lora = True
    except ImportError:
        lora = False
        print("peft not installed: phase 2 with LoRA skipped (pip install peft)")
    jobs = []
    if "bundled" in args.models:
        jobs += [("bundled", "phase 1", args.steps), ("bundled", "phase 2 full", args.steps)]
        jobs += [("bundled", "phase 2 lora", args.steps)] if lora else []
        ctx.set_model(name="shapes-ldm (bundled)")
    if "sd15" in args.models:
        # full phase 2 on SD 1.5 needs ~14 GB for weights, gradients and AdamW state alone;
        # on a 24 GB CPU machine LoRA is the phase 2 to measure
        jobs += [("sd15", "phase 1", 3)] + ([("sd15", "phase 2 lora", 3)] if lora else [])
    rows = []
    print(f"{'model':>8} {'phase':>13} {'image':>6} {'batch':>6} {'s/step':>8} "
          f"{'1st step s':>11} {'peak RSS GB':>12}")
    for kind, phase, steps in jobs:
        r = run_job(kind, phase, steps, args.threads)
        rows.append(r)
        if "error" in r:
            print(f"{kind:>8} {phase:>13}  failed: {r['error']}")
            continue
        if kind == "bundled" and r.get("weights_fingerprint"):
            ctx.set_model(name="shapes-ldm (bundled)", fingerprint=r["weights_fingerprint"])
        print(f"{kind:>8} {phase:>13} {r['image']:>6} {r['batch']:>6} "
              f"{r['seconds_per_step']:>8.3f} {r['first_step_s']:>11.2f} "
              f"{r['peak_rss_gb']:>12.2f}", flush=True)
    import torch
    print(f"torch {torch.__version__}, {args.threads} threads, CPU")
    return {"rows": rows}
