"""Measure the bundled model: VAE reconstruction, cross-attention localisation, generation.

    python -m benchmarks model_quality                # the bundled model -> .../shipped_model.json
    python -m benchmarks model_quality --model runs/control/model --skip-generation

Held-out scenes are drawn with seeds >= 1_000_000 (training scenes come from one stream
seeded 0). Prints every figure; the result file holds them all (``tools/ship_model.py``
calls :func:`evaluate_model` for the model card's ``quality.json``).

1. VAE PSNR on held-out scenes (overall, plain and textured backgrounds).
2. Localisation: IoU between the thresholded (min-max normalised, 0.5), timestep-averaged
   cross-attention map of each object's SHAPE word (upsampled to 64x64) and its
   ground-truth mask, per layer resolution, per timestep range and per caption position,
   beside two trivial baselines (a centred disc; the union of all objects).
3. The judges validated: classifier accuracy and background-rule accuracy on held-out
   renders, clean, blurred, down/up-sampled, noised and through this model's VAE.
4. Generation fidelity: fraction of generated objects whose named colour / shape / both
   are judged present by the shipped shape/colour classifier (conceptlab.shapes.judge),
   and fraction of images that keep the prompt's named background.
"""

from __future__ import annotations

import re
import time

import numpy as np
import torch
import torch.nn.functional as F

from conceptlab.attention import layer_resolutions, record_attention
from conceptlab.models import encode_prompt, load_pipeline, native_size
from conceptlab.shapes import world
from conceptlab.shapes.suites import held_out_scenes

T_BINS = [(0, 250), (250, 500), (500, 750), (750, 1000)]


@torch.no_grad()
def vae_psnr(pipe, scenes):
    out = {"all": [], "plain": [], "textured": []}
    for sc in scenes:
        x = torch.from_numpy(sc.image).permute(2, 0, 1)[None].float() / 127.5 - 1
        z = pipe.vae.encode(x).latent_dist.mean
        rec = pipe.vae.decode(z).sample.clamp(-1, 1)
        mse = ((rec - x) / 2).pow(2).mean().item()
        p = 10 * np.log10(1.0 / max(mse, 1e-10))
        out["all"].append(p)
        out["plain" if sc.spec.background in world.PLAIN_BACKGROUNDS else "textured"].append(p)
    return {k: float(np.mean(v)) for k, v in out.items() if v}


def iou(a, b):
    inter = np.logical_and(a, b).sum()
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else inter / union


def threshold_map(m, size=64):
    m = torch.as_tensor(m, dtype=torch.float32)
    m = F.interpolate(m[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    m = (m - m.min()) / (m.max() - m.min() + 1e-8)
    return (m >= 0.5).numpy()


@torch.no_grad()
def localisation(pipe, scenes, n_timesteps=20, seed=0):
    """Per scene and object: shape-word maps per resolution and timestep bin -> IoU."""
    g = torch.Generator().manual_seed(seed)
    res_of = layer_resolutions(pipe.unet)
    resolutions = sorted(set(res_of.values()), reverse=True)
    vocab = pipe.tokenizer.get_vocab()
    rows = []  # dicts: n_objects, position, res, bin, iou
    base = {"disc": [], "union": []}
    S = scenes[0].image.shape[0]
    yy, xx = np.mgrid[0:S, 0:S]
    disc = (xx - (S - 1) / 2) ** 2 + (yy - (S - 1) / 2) ** 2 < (0.2 * S) ** 2
    per_bin = n_timesteps // len(T_BINS)
    for sc in scenes:
        rng = np.random.default_rng(int(torch.randint(1 << 30, (1,), generator=g)))
        order = list(rng.permutation(len(sc.spec.objects)))
        caption = world.describe(sc.spec, order)
        ids = pipe.tokenizer(caption, padding="max_length",
                             max_length=pipe.tokenizer.model_max_length).input_ids
        x = torch.from_numpy(sc.image).permute(2, 0, 1)[None].float() / 127.5 - 1
        z0 = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        ts = torch.cat([torch.randint(lo, hi, (per_bin,), generator=g) for lo, hi in T_BINS])
        noise = torch.randn((len(ts),) + z0.shape[1:], generator=g)
        zt = pipe.scheduler.add_noise(z0.expand(len(ts), -1, -1, -1), noise, ts)
        emb = encode_prompt(pipe, caption).expand(len(ts), -1, -1)
        with record_attention(pipe.unet) as store:
            pipe.unet(zt, ts, emb)
        union = sc.masks[1:].any(0)
        for pos, oi in enumerate(order):
            obj = sc.spec.objects[oi]
            tok = ids.index(vocab[obj.shape + "</w>"])
            gt = sc.masks[oi + 1]
            base["disc"].append((len(order), pos, iou(disc, gt)))
            base["union"].append((len(order), pos, iou(union, gt)))
            for res in resolutions + ["all"]:
                names = [n for n, r in res_of.items() if res == "all" or r == res]
                maps = store.stacked(names)[..., tok]  # (T, h, w)
                for b, (lo, hi) in enumerate(T_BINS + [(0, 500), (0, 1000)]):
                    sel = (ts >= lo) & (ts < hi)
                    m = maps[sel].mean(0)
                    rows.append(dict(n=len(order), pos=pos, res=res, bin=f"{lo}-{hi}",
                                     iou=float(iou(threshold_map(m, S), gt))))
    return rows, base


def summarise_localisation(rows, base):
    def mean(**where):
        """Mean IoU over the rows whose fields equal ``where`` (compared as text)."""
        v = [r["iou"] for r in rows if all(str(r[k]) == str(x) for k, x in where.items())]
        return float(np.mean(v)) if v else float("nan")

    out = {"by_res_bin": {}, "baselines": {}}
    resolutions = sorted({str(r["res"]) for r in rows})
    for res in resolutions:
        for b in sorted({r["bin"] for r in rows}):
            out["by_res_bin"][f"{res}|{b}"] = mean(res=res, bin=b)
    best = max(out["by_res_bin"], key=out["by_res_bin"].get)
    res, b = best.split("|")
    out["best"] = {"res": res, "bin": b, "iou": out["by_res_bin"][best]}
    out["best_by_position"] = {p: mean(res=res, bin=b, pos=p) for p in range(3)}
    out["best_by_n_objects"] = {n: mean(res=res, bin=b, n=n) for n in (1, 2, 3)}
    out["default_all_t"] = {r: mean(res=r, bin="0-1000") for r in resolutions}
    for k, v in base.items():
        out["baselines"][k] = {
            "all": float(np.mean([x[2] for x in v])),
            "by_position": {p: float(np.mean([x[2] for x in v if x[1] == p])) for p in range(3)},
        }
    return out


def degrade(images: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
    """Degraded copies of uint8 renders: Gaussian blur (sigma 1 px), a bilinear 2x
    down/up-sampling round trip, or Gaussian pixel noise (sigma 8 grey levels)."""
    from PIL import Image, ImageFilter

    if kind == "clean":
        return images
    if kind == "blur":
        return np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(1.0)))
                         for im in images])
    if kind == "down-up":
        s = images.shape[1]
        return np.stack([np.asarray(Image.fromarray(im).resize((s // 2, s // 2), Image.BILINEAR)
                                    .resize((s, s), Image.BILINEAR)) for im in images])
    if kind == "noise":
        rng = np.random.default_rng(seed)
        return np.clip(images + rng.normal(0, 8, images.shape), 0, 255).round().astype(np.uint8)
    raise ValueError(kind)


@torch.no_grad()
def vae_round_trip(vae, images: np.ndarray, batch: int = 50) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i:i + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        out.append(((rec + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(np.uint8))
    return np.concatenate(out)


def judge_validation(pipe, n: int = 280, seed: int = 0) -> dict:
    """The judges on held-out renders: clean, degraded, and through this model's VAE.
    Shape / colour / pair accuracy of the classifier (named objects predicted present) and
    accuracy of the background rules (one of the 7 backgrounds, each equally often)."""
    from conceptlab.shapes.judge import (
        classify_background,
        load_classifier,
        predict,
        render_scenes,
        score,
        to_tensor,
    )

    clf = load_classifier()
    images, objects = render_scenes(n, "heldout", 30_000 + seed)
    specs = [world.sample_scene(seed=3_000_000 + seed * n + i,
                                backgrounds=(world.BACKGROUNDS[i % len(world.BACKGROUNDS)],))
             for i in range(n)]
    bg_images = np.stack([world.render_scene(sp).image for sp in specs])
    truth = [sp.background for sp in specs]
    out = {"n_images": n}
    for kind in ("clean", "blur", "down-up", "noise", "vae"):
        imgs = vae_round_trip(pipe.vae, images) if kind == "vae" else degrade(images, kind, seed)
        bgs = vae_round_trip(pipe.vae, bg_images) if kind == "vae" else degrade(bg_images, kind, seed)
        sc = score(predict(clf, to_tensor(imgs)), objects)
        got = classify_background(bgs)
        out[kind] = {h: sc[h]["accuracy"] for h in ("shape", "colour", "pair")}
        out[kind]["background"] = float(np.mean([g == t for g, t in zip(got, truth)]))
    out["blob_test"] = clf.config.get("metrics", {}).get("blobs_irregular")
    return out


QUICK = {"n_scenes": 4, "n_timesteps": 4, "n_generation_prompts": 2,
         "images_per_prompt": 1, "steps": 5}


def result_name(args) -> str:
    """The shipped model's figures are ``shipped_model``; another model is named by its
    path (``runs/quick/model`` -> ``runs_quick_model``; ``--name`` to choose)."""
    if args.model == "shapes-ldm":
        return "shipped_model"
    return re.sub(r"[^A-Za-z0-9]+", "_", args.model).strip("_") or "model"


def add_arguments(ap):
    ap.add_argument("--model", default="shapes-ldm")
    ap.add_argument("--n-scenes", type=int, default=100)
    ap.add_argument("--n-timesteps", type=int, default=20)
    ap.add_argument("--n-generation-prompts", type=int, default=40)
    ap.add_argument("--images-per-prompt", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--skip-generation", action="store_true")


def run(args, ctx):
    pipe = load_pipeline(args.model, device="cpu", progress=False)
    ctx.set_model(pipe, name=args.model)
    return evaluate_model(args.model, pipe=pipe, n_scenes=args.n_scenes,
                          n_timesteps=args.n_timesteps,
                          n_generation_prompts=args.n_generation_prompts,
                          images_per_prompt=args.images_per_prompt, guidance=args.guidance,
                          steps=args.steps, skip_generation=args.skip_generation)


def evaluate_model(model: str, pipe=None, n_scenes: int = 100, n_timesteps: int = 20,
                   n_generation_prompts: int = 40, images_per_prompt: int = 4,
                   guidance: float = 4.0, steps: int = 25,
                   skip_generation: bool = False) -> dict:
    """Every figure of the model (printed as it goes); the defaults are the benchmark's."""
    from types import SimpleNamespace

    args = SimpleNamespace(model=model, n_scenes=n_scenes, n_timesteps=n_timesteps,
                           n_generation_prompts=n_generation_prompts,
                           images_per_prompt=images_per_prompt, guidance=guidance,
                           steps=steps, skip_generation=skip_generation)
    if pipe is None:
        pipe = load_pipeline(args.model, device="cpu", progress=False)
    results = {"model": args.model}
    t0 = time.time()
    scenes = held_out_scenes(args.n_scenes, size=native_size(pipe))
    results["vae_psnr"] = vae_psnr(pipe, scenes)
    p = results["vae_psnr"]
    print(f"1. VAE PSNR on {len(scenes)} held-out scenes: {p['all']:.2f} dB "
          f"(plain backgrounds {p.get('plain', float('nan')):.2f}, "
          f"textured {p.get('textured', float('nan')):.2f})")
    rows, base = localisation(pipe, scenes, args.n_timesteps)
    loc = summarise_localisation(rows, base)
    results["localisation"] = loc
    print(f"2. Cross-attention localisation (shape word, min-max, threshold 0.5), "
          f"{len(scenes)} scenes, {sum(len(s.spec.objects) for s in scenes)} objects:")
    print("   mean IoU by layer resolution x timestep range:")
    for k, v in loc["by_res_bin"].items():
        print(f"     res {k.split('|')[0]:>3}  t {k.split('|')[1]:>9}: {v:.3f}")
    b = loc["best"]
    print(f"   best: res {b['res']}, t {b['bin']}: IoU {b['iou']:.3f}")
    print("   best setting by caption position (1st/2nd/3rd object named): "
          + " / ".join(f"{v:.3f}" for v in loc["best_by_position"].values()))
    print("   best setting by number of objects (1/2/3): "
          + " / ".join(f"{v:.3f}" for v in loc["best_by_n_objects"].values()))
    for k, v in loc["baselines"].items():
        print(f"   baseline {k:>5}: {v['all']:.3f} (by position "
              + " / ".join(f"{x:.3f}" for x in v["by_position"].values()) + ")")
    jv = judge_validation(pipe)
    results["judge_validation"] = jv
    print(f"3. The judges on {jv['n_images']} held-out renders (accuracy: shape / colour / "
          "pair of the classifier; background rules):")
    for kind in ("clean", "blur", "down-up", "noise", "vae"):
        v = jv[kind]
        print(f"   {kind:>8}: shape {v['shape']:.3f}, colour {v['colour']:.3f}, "
              f"pair {v['pair']:.3f}, background {v['background']:.3f}")
    if jv["blob_test"]:
        print(f"   blob test (objects replaced by irregular blobs): called a star in "
              f"{jv['blob_test']['star']:.3f} of images")
    if not args.skip_generation:
        from conceptlab.shapes.judge import fidelity, fidelity_prompts, load_classifier

        clf = load_classifier()
        prompts = fidelity_prompts(args.n_generation_prompts, seed=7)
        fid = fidelity(pipe, prompts, n_per_prompt=args.images_per_prompt, seed=0,
                       guidance_scale=args.guidance, steps=args.steps, model=clf)
        fid.pop("records", None)  # per-object records: too long for quality.json
        results["generation"] = fid
        print(f"4. Generation fidelity ({len(prompts)} prompts x {args.images_per_prompt} "
              f"images, guidance {args.guidance}, {args.steps} DDIM steps): colour "
              f"{fid['colour']:.3f}, shape {fid['shape']:.3f}, both {fid['both']:.3f}, "
              f"named background kept {fid['background']:.3f}")
        for k, v in fid["by_count"].items():
            print(f"   prompts naming {k} object(s): colour {v['colour']:.3f}, shape "
                  f"{v['shape']:.3f}, both {v['both']:.3f}")
    print(f"(benchmark time {time.time() - t0:.0f} s)")
    return results
