"""Speed of attention-map extraction: batched vs sequential timesteps, and hook overhead.

    python -m benchmarks attention_speed                 # bundled model if present
    python -m benchmarks attention_speed --model tiny --threads 1

Measures (and writes to ``benchmarks/results/attention_speed/timings.json``)
- the time of ``conceptlab.maps.attention_maps`` with 50 timesteps, batched (one U-Net
  call per chunk of up to 64) vs ``sequential_attention_maps`` (one call per timestep),
  median of 3 runs, and the speed-up;
- the overhead of ``record_attention`` over a plain U-Net forward (batch 8, median of 5).

Model: ``--model PATH`` (a StableDiffusionPipeline folder) or ``tiny``; default the first
of data/models/shapes-ldm, runs/bundled/model, the newest runs/bundled/snapshot-*, else the
random-weight tiny pipeline (with a note: its timings say little about the real model).
"""

from __future__ import annotations

import glob
import os
import statistics
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CANDIDATES = ("data/models/shapes-ldm", "runs/bundled/model")


def find_model() -> str | None:
    for c in CANDIDATES:
        p = os.path.join(ROOT, c)
        if os.path.isfile(os.path.join(p, "model_index.json")):
            return p
    snaps = [p for p in glob.glob(os.path.join(ROOT, "runs/bundled/snapshot-*"))
             if os.path.isfile(os.path.join(p, "model_index.json"))]
    return max(snaps, key=os.path.getmtime) if snaps else None


def load(model: str | None):
    import torch

    from conceptlab.shapes.model import tiny_pipeline

    if model == "tiny" or model is None:
        if model is None:
            print("note: no trained model found (data/models/shapes-ldm, runs/bundled/model, "
                  "runs/bundled/snapshot-*); using the random-weight tiny pipeline")
        return tiny_pipeline(0), "tiny_pipeline()"
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32,
                                                   safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, model


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


RESULT_NAME = "timings"
QUICK = {"timesteps": 4, "repeats": 1}


def add_arguments(ap):
    ap.add_argument("--model", default=None, help="pipeline folder, or 'tiny'")
    ap.add_argument("--timesteps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3, help="runs per map timing (median)")


def run(args, ctx):
    import torch

    from conceptlab.attention import record_attention
    from conceptlab.maps import (
        attention_maps,
        default_attention_config,
        sequential_attention_maps,
    )
    from conceptlab.models import native_size
    from conceptlab.shapes import world

    pipe, name = load(args.model if args.model is not None else find_model())
    ctx.set_model(pipe, name=os.path.relpath(name, ROOT) if os.path.isabs(name) else name)
    side = native_size(pipe)
    size = (side, side)
    scene = world.render_scene(world.sample_scene(seed=0, n_objects=2), size=side)
    cfg = default_attention_config(pipe)
    print(f"model: {name}  image {size[1]}x{size[0]}  device {pipe.device}  "
          f"threads {torch.get_num_threads()}")
    print(f"prompt: {scene.caption!r}")
    print(f"layers ({len(cfg['layers'])}): {cfg['layers']}  t_range {cfg['t_range']}")

    n = args.timesteps

    def batched():
        return attention_maps(pipe, scene.image, scene.caption, n_timesteps=n)

    def sequential():
        return sequential_attention_maps(pipe, scene.image, scene.caption, n_timesteps=n)

    a, b = batched(), sequential()  # warm-up, and check they agree
    diff = (a.raw - b.raw).abs().max().item()
    tb = timed(batched, args.repeats)
    ts = timed(sequential, args.repeats)
    print(f"attention_maps, {n} timesteps (median of {args.repeats}): batched {tb * 1e3:.1f} ms"
          f"  sequential {ts * 1e3:.1f} ms  speed-up x{ts / tb:.2f}  (max |diff| {diff:.1e})")

    unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    s = unet.config.sample_size
    hw = (s, s) if isinstance(s, int) else tuple(s)
    z = torch.randn(8, unet.config.in_channels, *hw, generator=g).to(unet.device, unet.dtype)
    t = torch.randint(0, 1000, (8,), generator=g).to(unet.device)
    ids = pipe.tokenizer([scene.caption] * 8, padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        emb = pipe.text_encoder(ids.to(pipe.text_encoder.device))[0].to(unet.device, unet.dtype)

        def plain():
            unet(z, t, emb, return_dict=False)

        def recorded():  # installing + removing the hook is part of the cost
            with record_attention(unet, max_resolution=max(hw)):
                unet(z, t, emb, return_dict=False)

        plain(), recorded()
        tp = timed(plain, 5)
        tr = timed(recorded, 5)
    print(f"U-Net forward, batch 8 (median of 5): plain {tp * 1e3:.1f} ms  with "
          f"record_attention (all layers) {tr * 1e3:.1f} ms  overhead x{tr / tp:.2f}")
    return {"image": list(size), "prompt": scene.caption,
            "layers": [str(x) for x in cfg["layers"]],
            "t_range": None if cfg["t_range"] is None else [int(x) for x in cfg["t_range"]],
            "timesteps": n, "repeats": args.repeats,
            "maps_batched_ms": round(tb * 1e3, 2), "maps_sequential_ms": round(ts * 1e3, 2),
            "maps_speedup": round(ts / tb, 3), "maps_max_abs_diff": diff,
            "unet_plain_ms": round(tp * 1e3, 2), "unet_recorded_ms": round(tr * 1e3, 2),
            "record_attention_overhead": round(tr / tp, 3)}
