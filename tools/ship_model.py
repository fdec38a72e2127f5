"""Ship a trained model into data/models/<name>: weights, log, measured quality, model card.

    python -m tools.ship_model runs/bundled --name shapes-ldm \
        --control runs/control/model --control-peer runs/bundled/snapshot-00500

1. copies the pipeline folder (fp16 safetensors), the training log and config;
2. measures it with the model_quality benchmark (``benchmarks.model_quality.evaluate_model``;
   also the control model and the grounded snapshot with the same number of U-Net steps,
   if given) -> quality.json;
3. writes conceptlab.json: the attention layers / timestep range that localised best
   (the library's defaults for this model, read by conceptlab.maps);
4. renders samples.png (a labelled sheet, every sample 128 px) and writes the model card
   README.md from those files, with the scaling curve (``--scaling``, a PNG written by
   ``python -m benchmarks generation_sweep --plot``) and the log of recipes tried
   (``benchmarks/results/model_recipes.md``, kept by hand, its numbers from the files it
   names).
Every number in the card is read from quality.json / the log, never typed in.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from benchmarks import model_quality
from conceptlab.attention import layer_resolutions
from conceptlab.fileio import atomic_write_json
from conceptlab.generation import sample_grid
from conceptlab.models import load_pipeline
from conceptlab.shapes.model import describe_model
from conceptlab.viz.figures import sample_sheet

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "benchmarks" / "results" / "model_recipes.md"

SAMPLE_PROMPTS = [
    "a red star on a gray background",
    "a blue circle and a yellow heart on a black background",
    "a green square and an orange triangle on a striped background",
    "a white heart on a brown background",
    "a purple triangle and a red circle on a beige background",
    "a yellow star and a blue square on a dotted background",
]


def _portable(obj):
    """Paths in a shipped file are relative: the run folder as ``runs/NAME``, the shipped
    model by its name (no machine's home or checkout in the repository)."""
    if isinstance(obj, dict):
        return {k: _portable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_portable(v) for v in obj]
    if isinstance(obj, str):
        for root, short in ((str(ROOT / "data" / "models") + "/", ""),
                            (str(Path.home() / ".cache" / "conceptlab") + "/", "")):
            obj = obj.replace(root, short)
    return obj


def dir_size_mb(path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("run", help="training run folder (holds model/, train_log.jsonl)")
    ap.add_argument("--name", default="shapes-ldm")
    ap.add_argument("--control", default=None, help="pipeline folder of the control model")
    ap.add_argument("--control-peer", default=None,
                    help="grounded snapshot with the control's number of U-Net steps")
    ap.add_argument("--n-scenes", type=int, default=100)
    ap.add_argument("--n-generation-prompts", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--command", default=None, help="the exact training command, for the card")
    ap.add_argument("--wall-minutes", type=float, default=None)
    ap.add_argument("--hardware", default="a 2-core AMD EPYC CPU (torch 2.13, CPU build)")
    ap.add_argument("--scaling", default=None, help="PNG of fidelity vs training steps")
    ap.add_argument("--card-only", action="store_true",
                    help="keep the shipped weights and their quality.json; measure only the "
                         "control (if given) and rewrite samples.png and the card")
    ap.add_argument("--reuse-control", action="store_true",
                    help="take the control's and its peer's figures from the shipped "
                         "quality.json when they were measured on the same folders (they do "
                         "not depend on the shipped weights)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    run = Path(args.run)
    dest = ROOT / "data" / "models" / args.name
    old = json.loads((dest / "quality.json").read_text()) if (dest / "quality.json").exists() else {}
    if args.card_only:
        q = old
    else:
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(run / "model", dest)
        for f in ("train_log.jsonl", "train_config.json"):
            shutil.copy(run / f, dest / f)
        q = model_quality.evaluate_model(str(dest), n_scenes=args.n_scenes,
                                         n_generation_prompts=args.n_generation_prompts)
        atomic_write_json(dest / "quality.json", q, indent=1)
    for key, folder, title in (("control", args.control, "control (no attention-grounding loss)"),
                               ("control_peer", args.control_peer,
                                "grounded model at the control's step count")):
        if not folder:
            continue
        if args.reuse_control and old.get(key, {}).get("model") == _portable(folder):
            print(f"\n== {title}: figures reused from the shipped quality.json ==")
            q[key] = old[key]
            continue
        print(f"\n== {title} ==")
        q[key] = model_quality.evaluate_model(folder, n_scenes=args.n_scenes,
                                              skip_generation=True)
    q = _portable(q)
    atomic_write_json(dest / "quality.json", q, indent=1)
    cfg_path = dest / "train_config.json"
    atomic_write_json(cfg_path, _portable(json.loads(cfg_path.read_text())), indent=1)

    # attention defaults: the best layer resolution and timestep range
    best = q["localisation"]["best"]
    lo, hi = (int(x) for x in best["bin"].split("-"))
    layers = ["all"] if best["res"] == "all" else [f"resolution:{best['res']}"]
    defaults = {"attention_layers": layers, "attention_t_range": [lo, hi],
                "chosen_by": "python -m benchmarks model_quality (best mean shape-word IoU)"}
    (dest / "conceptlab.json").write_text(json.dumps(defaults, indent=1))

    pipe = load_pipeline(str(dest), device="cpu", progress=False)
    rows, prompts = sample_grid(pipe, SAMPLE_PROMPTS, n_per_prompt=6, seed=0)
    sample_sheet(rows, prompts).save(dest / "samples.png")
    if args.scaling:
        shutil.copy(args.scaling, dest / "scaling.png")
    write_card(dest, pipe, q, defaults, args)
    print(f"\nshipped {dest} ({dir_size_mb(dest):.1f} MB)")


def write_card(dest: Path, pipe, q: dict, defaults: dict, args):
    info = describe_model(pipe)
    cfg = json.loads((dest / "train_config.json").read_text())
    log = [json.loads(line) for line in (dest / "train_log.jsonl").read_text().splitlines()]
    last = {(r["stage"], r["step"]): r for r in log if "step" in r}  # a resume repeats steps
    vae = sorted((r for (st, _), r in last.items() if st == "vae"), key=lambda r: r["step"])
    unet = sorted((r for (st, _), r in last.items() if st == "unet"), key=lambda r: r["step"])
    last = unet[-10:]
    final_loss = sum(r["loss"] for r in last) / max(1, len(last))
    final_ground = sum(r["grounding"] for r in last) / max(1, len(last))
    res = layer_resolutions(pipe.unet)
    loc = q["localisation"]
    gen = q.get("generation")
    # wall time from the log: each (re)start of a stage restarts its clock
    wall = 0.0
    for stage in ("vae", "unet"):
        prev = None
        for r in (r for r in log if r.get("stage") == stage and "time" in r):
            if prev is not None and r["time"] < prev:
                wall += prev
            prev = r["time"]
        wall += prev or 0.0
    lines = [
        f"# {dest.name}: a miniature text-to-image latent diffusion model of the shapes world",
        "",
        "Trained from scratch by `conceptlab` on a 2-core CPU, for teaching. It is a standard",
        "`diffusers.StableDiffusionPipeline` (no safety checker): "
        f"`StableDiffusionPipeline.from_pretrained(\"data/models/{dest.name}\")` or "
        "`conceptlab.load_pipeline()` loads it.",
        "",
        "## Architecture",
        "",
        "| part | class | parameters |",
        "|---|---|---|",
        f"| tokenizer | `CLIPTokenizer`, word-level vocabulary of the shapes world | "
        f"{info['vocab_size']} tokens |",
        f"| text encoder | `CLIPTextModel` ({pipe.text_encoder.config.num_hidden_layers} layers, "
        f"hidden {pipe.text_encoder.config.hidden_size}) | {info['text_encoder']:,} |",
        f"| VAE | `AutoencoderKL` {info['image_size']}x{info['image_size']}x3 -> "
        f"{'x'.join(str(x) for x in info['latent_shape'][1:])}x{info['latent_shape'][0]} | "
        f"{info['vae']:,} |",
        f"| U-Net | `UNet2DConditionModel` channels {tuple(pipe.unet.config.block_out_channels)}, "
        f"cross-attention at {sorted(set(res.values()), reverse=True)} | {info['unet']:,} |",
        "| scheduler | `DDIMScheduler` (scaled-linear betas, 1000 steps) | |",
        "",
        f"Weights: fp16 safetensors, {dir_size_mb(dest):.1f} MB in this folder.",
        "",
        "## Licence",
        "",
        "MIT, like the rest of conceptlab (the repository's `LICENSE`). The model was trained "
        "from scratch by conceptlab on procedurally rendered scenes of the shapes world "
        "(`conceptlab.shapes.world`): no external data and no pretrained weights went into it.",
        "",
        "## Training",
        "",
        "```",
        args.command or f"conceptlab train-model --out {args.run}",
        "```",
        "",
        f"- data: {cfg['n_images']:,} rendered scenes of 1-3 objects, "
        f"{cfg.get('pattern_p', 0):.0%} of them striped / two-tone / dotted and captioned "
        "coarsely (\"a blue striped star\": the second colour is never named), varied "
        "captions, horizontal flips;",
        f"- VAE: {cfg['vae_steps']} steps, batch {cfg['vae_batch']} of {cfg['vae_crop']}px crops, "
        f"MSE + 0.5 L1 + L1 on image gradients + tiny KL; final loss {vae[-1]['loss']:.3f};",
        f"- U-Net + text encoder: {cfg['unet_steps']} steps, batch {cfg['batch']}, AdamW lr "
        f"{cfg['lr']} (cosine), min-SNR-{cfg['min_snr_gamma']:g} weighting, "
        f"{cfg['p_uncond']:.0%} empty captions, EMA {cfg['ema_decay']}; final diffusion loss "
        f"{final_loss:.4f} (mean of the last {len(last)} logged steps);",
        f"- attention-grounding loss, weight {cfg['grounding_weight']}, timesteps < "
        f"{cfg['grounding_tmax']}: final {final_ground:.3f}.",
    ]
    minutes = args.wall_minutes or wall / 60
    lines.append(f"- wall time: {minutes:.0f} minutes of training (from the log; data and "
                 f"encoding not counted) on {args.hardware}.")
    lines += [
        "",
        "**What was taught, not learned.** The attention-grounding loss (after TokenCompose, "
        "Wang et al. 2024) uses the renderer's exact masks during base-model training: each "
        "colour, shape and background word is pushed to put its attention inside its own "
        "region. It emulates what Stable Diffusion learns from web-scale data. The "
        "concept-learning method of the course never sees ground-truth masks. The control "
        "below is the same recipe without it.",
        "",
        "## Measured quality (`python -m benchmarks model_quality`, held-out scenes)",
        "",
        f"1. VAE reconstruction PSNR: {q['vae_psnr']['all']:.1f} dB (plain backgrounds "
        f"{q['vae_psnr'].get('plain', float('nan')):.1f}, textured "
        f"{q['vae_psnr'].get('textured', float('nan')):.1f}).",
        f"2. Cross-attention localisation (shape word, min-max normalised, threshold 0.5, no "
        f"CRF), {args.n_scenes} scenes with 1-3 objects: best setting: layers at "
        f"{loc['best']['res']}, t in [{loc['best']['bin']}): **IoU {loc['best']['iou']:.3f}**; by "
        "caption position (1st / 2nd / 3rd object named): "
        + " / ".join(f"{v:.3f}" for v in loc["best_by_position"].values())
        + f". Baselines: centred disc {loc['baselines']['disc']['all']:.3f}, union of all "
        f"objects {loc['baselines']['union']['all']:.3f}.",
        "",
        "   | layers | " + " | ".join(sorted({k.split('|')[1] for k in loc['by_res_bin']}))
        + " |",
        "   |---|" + "---|" * len({k.split('|')[1] for k in loc["by_res_bin"]}),
    ]
    bins = sorted({k.split("|")[1] for k in loc["by_res_bin"]})
    for r in sorted({k.split("|")[0] for k in loc["by_res_bin"]}):
        lines.append(f"   | {r} | " + " | ".join(f"{loc['by_res_bin'][f'{r}|{b}']:.3f}"
                                                 for b in bins) + " |")
    lines += judge_lines(q.get("judge_validation"))
    lines += generation_lines(gen)
    if "control" in q:
        c = q["control"]["localisation"]
        peer = q.get("control_peer", {}).get("localisation")
        steps = json.loads((Path(args.control).parent / "train_config.json").read_text()
                           )["unet_steps"] if args.control else "?"
        lines += ["", "**Control without the grounding loss** (same data, VAE and recipe, "
                  f"{steps} U-Net steps on its own full cosine schedule; compared with the "
                  f"grounded run's EMA snapshot at step {steps}): best IoU {c['best']['iou']:.3f} "
                  f"(layers {c['best']['res']}, t {c['best']['bin']}), by position "
                  + " / ".join(f"{v:.3f}" for v in c["best_by_position"].values())
                  + (f"; the grounded model at the same step count: {peer['best']['iou']:.3f}"
                     if peer else "") + "."]
    lines += ["", "The library's attention defaults for this model (`conceptlab.json`): "
              f"layers {defaults['attention_layers']}, timesteps {defaults['attention_t_range']}.",
              "", "## Samples", "", "![samples](samples.png)", "",
              "Each row: one prompt, seeds 0-5, 25 DDIM steps, guidance 4; each 64-px sample "
              "shown at 128 px (pixels doubled).", ""]
    if (dest / "scaling.png").exists():
        lines += ["## Fidelity against training steps", "",
                  "![scaling](scaling.png)", "",
                  "EMA snapshots of the shipped run (`python -m benchmarks generation_sweep "
                  "--plot --name scaling`; `benchmarks/results/generation_sweep/scaling.json`).",
                  ""]
    if RECIPES.exists():  # hand-kept log of the recipes tried, numbers from the files it names
        lines += ["", RECIPES.read_text().rstrip()]
    (dest / "README.md").write_text("\n".join(lines))


def judge_lines(jv: dict | None) -> list[str]:
    """The card's section 3: the judges on held-out renders."""
    lines = []
    if jv:
        lines += ["", f"3. The judges, on {jv['n_images']} held-out renders (the classifier: "
                  "named objects whose shape / colour / pair it sees; the background rules: "
                  "the right one of 7):", "",
                  "   | renders | shape | colour | pair | background |", "   |---|---|---|---|---|"]
        names = {"clean": "clean", "blur": "blurred (sigma 1 px)",
                 "down-up": "2x down- and up-sampled", "noise": "noise (sigma 8 grey levels)",
                 "vae": "through this model's VAE"}
        for k, name in names.items():
            v = jv[k]
            lines.append(f"   | {name} | {v['shape']:.3f} | {v['colour']:.3f} | "
                         f"{v['pair']:.3f} | {v['background']:.3f} |")
        if jv.get("blob_test"):
            lines += ["", "   Objects replaced by irregular blobs of their colour are called a "
                      f"star in {jv['blob_test']['star']:.3f} of images (a blob is not a star "
                      "by luck; `tools/train_judge.py`)."]
    return lines


def generation_lines(gen: dict | None) -> list[str]:
    """The card's section 4: generation fidelity."""
    lines = []
    if gen:
        lines += ["", f"4. Generation fidelity ({gen.get('n_images', '?')} images of "
                  f"{len(gen.get('per_prompt', []))} held-out prompts naming 1-2 coloured "
                  f"shapes, guidance {gen.get('guidance_scale')}, {gen.get('steps')} DDIM steps, "
                  "judged as above): "
                  f"**colour {gen['colour']:.3f}, shape {gen['shape']:.3f}**, both "
                  f"{gen['both']:.3f}, named background kept {gen.get('background', float('nan')):.3f} "
                  "(chance for shape: 0.2)."]
        for k, v in gen.get("by_count", {}).items():
            lines.append(f"   - prompts naming {k} object(s): colour {v['colour']:.3f}, shape "
                         f"{v['shape']:.3f}, both {v['both']:.3f}")
    return lines


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"({time.time() - t0:.0f} s)")
