"""Size on disk of a saved concepts folder: phase 2 as LoRA or as a full U-Net, per model.

    python -m benchmarks phase2_files        # -> benchmarks/results/phase2_files/sizes.json

What ``save_concepts`` writes for two concepts with a phase-2 U-Net change, on the bundled
model and on a pipeline with Stable Diffusion 1.5's architecture (random weights: the file
sizes depend only on the shapes and dtypes, not on the values):

- ``lora``: the LoRA adapters of ``TrainConfig.lora_rank`` on every attention projection
  (``to_q``, ``to_k``, ``to_v``, ``to_out.0``), as ``pytorch_lora_weights.safetensors``;
- ``full``: every U-Net weight, as a diffusers ``unet/`` folder.

The textual-inversion files and the sidecar are counted too. The weights are written in
float32, as training keeps them.
"""

from __future__ import annotations

import os
import tempfile
import time

RESULT_NAME = "sizes"
QUICK = {"models": "bundled"}


def add_arguments(ap):
    ap.add_argument("--models", default="bundled,sd15",
                    help="comma-separated: bundled (the shapes model), sd15 (SD 1.5's shapes)")
    ap.add_argument("--lora-rank", type=int, default=None,
                    help="LoRA rank (default: TrainConfig's)")


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


def change_of(pipe, mode: str, rank: int):
    """A U-Net change of the shapes training makes (the values do not matter here)."""
    from conceptlab.unet_delta import UNetChange, lora_applied, lora_config, lora_state_dict

    if mode == "full":
        weights = {k: v.detach().float() for k, v in pipe.unet.named_parameters()}
        return UNetChange("full", weights, unet_config=dict(pipe.unet.config))
    with lora_applied(pipe.unet, lora_config(rank)):
        return UNetChange("lora", lora_state_dict(pipe.unet), lora_config(rank))


def measure(pipe, rank: int) -> dict:
    from conceptlab.concept_files import save_concepts
    from conceptlab.tokens import new_concepts

    out = {}
    for mode in ("lora", "full"):
        c = new_concepts(pipe, 2, ["star", "heart"])
        c.unet = change_of(pipe, mode, rank)
        with tempfile.TemporaryDirectory() as d:
            t0 = time.time()
            save_concepts(c, os.path.join(d, "concepts"))
            seconds = time.time() - t0
            out[mode] = {"bytes": folder_bytes(os.path.join(d, "concepts")),
                         "save_seconds": round(seconds, 2),
                         "tensors": len(c.unet.weights)}
        del c
    return out


def run(args, ctx):
    from conceptlab.models import load_pipeline
    from conceptlab.train import TrainConfig

    rank = args.lora_rank or TrainConfig().lora_rank
    result = {"lora_rank": rank, "models": {}}
    for name in args.models.split(","):
        if name == "bundled":
            pipe = load_pipeline(progress=False)
            ctx.set_model(pipe, name="shapes-ldm")
        elif name == "sd15":
            from benchmarks.frame import sd15_pipeline

            pipe = sd15_pipeline()
        else:
            raise ValueError(f"unknown model {name!r}: bundled or sd15")
        n_params = sum(p.numel() for p in pipe.unet.parameters())
        result["models"][name] = {"unet_parameters": n_params, **measure(pipe, rank)}
        r = result["models"][name]
        print(f"{name}: U-Net {n_params / 1e6:.1f} M parameters; lora {r['lora']['bytes'] / 1e6:.2f}"
              f" MB, full {r['full']['bytes'] / 1e6:.1f} MB", flush=True)
        del pipe
    return result
