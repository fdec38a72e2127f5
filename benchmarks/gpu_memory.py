"""Peak memory of concept training on full-size SD 1.5 and SDXL shapes, per memory option.

    python -m benchmarks gpu_memory                 # -> benchmarks/results/gpu_memory/
    python -m benchmarks gpu_memory --families sd15 --quick

Each measurement runs in its own process: a pipeline with the real architecture and random
weights (:func:`conceptlab.families.random_pipeline`, ``size="full"``; memory depends on
the shapes, not the values), two concepts, batch 1, one training step of each phase it
needs (phase 1: the concept rows; phase 2: the rows and LoRA adapters of rank 4, or the
whole U-Net), through :class:`conceptlab.train.ConceptTrainer` as ``learn_concepts`` runs
it, with the cross-attention loss on.

- On a CUDA machine: the pipeline in float16 with float32 trainable tensors (conceptlab's
  :class:`~conceptlab.train.precision.MasterWeights`), peak ``torch.cuda.max_memory_allocated``.
- On the CPU: float32 (the CPU has no fast half precision), the peak resident memory of
  the process (``ru_maxrss``), and the same minus the memory once the pipeline is built
  (what training adds).

Options, each on or off: ``gradient_checkpointing`` (TrainConfig), and on CUDA
``adamw8bit`` (bitsandbytes). Attention runs through PyTorch's SDPA, diffusers' default,
in every layer the loss does not read (the loss's layers keep their probabilities).
A configuration that cannot fit the machine is recorded as such, not run.
"""

from __future__ import annotations

import multiprocessing as mp
import resource

RESULT_NAME = "peaks"
QUICK = {"families": "sd15", "phases": "phase1"}
PHASES = ("phase1", "lora", "full")


def add_arguments(ap):
    ap.add_argument("--families", default="sd15,sdxl", help="comma-separated: sd15, sdxl")
    ap.add_argument("--phases", default="phase1,lora,full",
                    help="comma-separated: phase1, lora (phase 2 LoRA), full (phase 2 U-Net)")
    ap.add_argument("--max-gb", type=float, default=None,
                    help="skip a run whose estimated need exceeds this (default: the "
                         "machine's memory)")


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def measure(family: str, phase: str, checkpointing: bool, eight_bit: bool, threads: int,
            queue):
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import numpy as np
    import torch

    from conceptlab.families import random_pipeline
    from conceptlab.models import native_size
    from conceptlab.tokens import new_concepts
    from conceptlab.train import ConceptImage, ConceptTrainer, TrainConfig

    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    pipe = random_pipeline(family, "full")
    if cuda:
        pipe = pipe.to("cuda", torch.float16)
    side = native_size(pipe)
    image = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    masks = np.zeros((2, side, side), bool)
    masks[0, : side // 2] = True
    masks[1, side // 2:] = True
    cfg = TrainConfig.for_stable_diffusion(
        batch_size=1, steps=1, phase2="none" if phase == "phase1" else phase,
        phase2_steps=0 if phase == "phase1" else 1, gradient_checkpointing=checkpointing,
        optimizer="adamw8bit" if eight_bit else "adamw", checkpoint_every=0)
    c = new_concepts(pipe, 2, init_words=["star", "heart"])
    base = _rss_gb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**30
    trainer = ConceptTrainer(pipe, ConceptImage(image, masks), c, cfg, progress=False,
                             attention_every=0)
    trainer.train()
    trainer.close()
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
        device = torch.cuda.get_device_name()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        device = "cpu"
    queue.put({"family": family, "phase": phase, "gradient_checkpointing": checkpointing,
               "adamw8bit": eight_bit, "device": device,
               "dtype": "float16 (fp32 trainables)" if cuda else "float32",
               "peak_gb": round(peak, 2), "model_gb": round(base, 2),
               "training_gb": round(peak - base, 2), "image": side, "batch": 1})


#: float32 bytes per U-Net parameter that a full phase 2 holds (weight, gradient, 2 Adam
#: moments, the saved copy that is put back) and per parameter of the rest (weights)
FULL_BYTES, REST_BYTES = 20, 4
PARAMS = {"sd15": (0.86e9, 0.20e9), "sdxl": (2.57e9, 0.90e9)}   # U-Net, the rest


def estimate_gb(family: str, phase: str) -> float:
    """A lower bound of what a CPU (float32) run needs, to skip what cannot fit."""
    unet, rest = PARAMS[family]
    per_unet = FULL_BYTES if phase == "full" else REST_BYTES
    return (unet * per_unet + rest * REST_BYTES) / 2**30


def run_job(*args):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=measure, args=(*args, q))
    p.start()
    p.join()
    if p.exitcode is not None and p.exitcode < 0:
        return {"error": f"killed by signal {-p.exitcode}: more than this machine's "
                         f"{machine_gb():.0f} GB"}
    if p.exitcode != 0:
        return {"error": f"failed with exit code {p.exitcode} (its traceback is in the log)"}
    return q.get()


def machine_gb() -> float:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) / 2**20


def run(args, ctx):
    import torch

    cuda = torch.cuda.is_available()
    limit = args.max_gb or machine_gb()
    rows = []
    for family in args.families.split(","):
        for phase in args.phases.split(","):
            if phase not in PHASES:
                raise ValueError(f"unknown phase {phase!r}: one of {PHASES}")
            for ckpt in (False, True):
                for eight in ((False, True) if cuda and phase == "full" else (False,)):
                    need = estimate_gb(family, phase)
                    key = {"family": family, "phase": phase, "gradient_checkpointing": ckpt,
                           "adamw8bit": eight}
                    if not cuda and need > limit:
                        row = {**key, "skipped": f"needs more than {need:.0f} GB in float32; "
                                                 f"this machine has {limit:.0f} GB"}
                    else:
                        row = {**key, **run_job(family, phase, ckpt, eight, args.threads or 2)}
                    rows.append(row)
                    print(row, flush=True)
    return {"rows": rows, "device": "cuda" if cuda else "cpu"}


def table(result: dict) -> str:
    """Markdown: one row per measurement."""
    lines = ["| model | phase | gradient checkpointing | 8-bit AdamW | device, dtype | peak GB | "
             "training adds GB |", "|---|---|---|---|---|---|---|"]
    names = {"phase1": "phase 1 (rows)", "lora": "phase 2 LoRA r4", "full": "phase 2 full"}
    for r in result["rows"]:
        fam = {"sd15": "SD 1.5 (512 px)", "sdxl": "SDXL (1024 px)"}[r["family"]]
        opts = ("on" if r["gradient_checkpointing"] else "off",
                "on" if r["adamw8bit"] else "off")
        if "skipped" in r or "error" in r:
            lines.append(f"| {fam} | {names[r['phase']]} | {opts[0]} | {opts[1]} | - | "
                         f"not measured: {r.get('skipped') or r.get('error')} | |")
            continue
        lines.append(f"| {fam} | {names[r['phase']]} | {opts[0]} | {opts[1]} | "
                     f"{r['device']}, {r['dtype']} | {r['peak_gb']:.1f} | "
                     f"{r['training_gb']:.1f} |")
    return "\n".join(lines)
