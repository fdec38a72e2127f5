"""Train and validate the pattern network and the identity similarity (conceptlab.shapes.identity).

    python -m tools.train_pattern          # writes data/classifier/pattern.{safetensors,json}

Training: single-object scenes of the training stream (each pattern equally likely, every
background), each seen clean and through ``train_judge.augment`` (blur, down-up-sampling,
colour jitter, noise, specks: what a small VAE does), cropped the way the judge crops a
generated image (``object_mask``) and, for the clean copy, by the true mask too.

Validation (held-out scenes, printed and stored with the weights):
- pattern accuracy on clean, blurred, down/up-sampled and noised renders, and on renders
  passed through the bundled model's VAE (what generated images are);
- identity similarity: the same instance re-rendered elsewhere (another position, size,
  angle, background) vs another instance with the same class words ("a blue striped star"
  with another second colour or another pattern) vs another shape or colour; and the
  fraction of pairs in which the same instance scores above the other instance.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch
import torch.nn.functional as F

from conceptlab.models import data_dir
from conceptlab.shapes import identity as I
from conceptlab.shapes import world
from conceptlab.shapes.judge import scene_rng
from tools.train_judge import augment, downsample_degrade, gaussian_blur


def single_object_scenes(n: int, split: str, seed: int = 0):
    rng = scene_rng(split, seed)
    return [world.render_scene(world.sample_scene(rng=rng, n_objects=1, patterns=world.PATTERNS,
                                                  pattern_p=0.75)) for _ in range(n)]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().byte().numpy()


def as_float(images) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


def crops_and_labels(scenes, g: torch.Generator, n_aug: int = 2):
    imgs = [s.image for s in scenes]
    labels = [I.PATTERNS.index(s.spec.objects[0].pattern) for s in scenes]
    crops, ys = [], []
    for im, sc, y in zip(imgs, scenes, labels):
        crops.append(I.object_crop(im, sc.masks[1]))   # the source side: the true mask
        ys.append(y)
    x = as_float(imgs)
    for _ in range(n_aug):
        deg = to_uint8(augment(x.clone(), g))
        for im, y in zip(deg, labels):
            crops.append(I.object_crop(im))             # the generated side: found
            ys.append(y)
    return I.crops_tensor(crops), torch.tensor(ys)


@torch.no_grad()
def through_vae(x: torch.Tensor, model: str = "shapes-ldm") -> torch.Tensor:
    """VAE round trips of images (N, 3, H, W) in [0, 1]: what a perfect denoiser would give."""
    from conceptlab.models import encode_pixels, load_pipeline

    vae = load_pipeline(model, progress=False).vae
    out = []
    for i in range(0, len(x), 50):
        z = encode_pixels(vae, x[i:i + 50] * 2 - 1)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        y = vae.decode(z / vae.config.scaling_factor + shift).sample
        out.append(((y.float() + 1) / 2).clamp(0, 1))
    return torch.cat(out)


def degraded(scenes, how: str) -> list[np.ndarray]:
    x = as_float([s.image for s in scenes])
    if how == "vae":
        x = through_vae(x)
    if how == "blur":
        x = gaussian_blur(x, 1.0)
    elif how == "down-up":
        x = downsample_degrade(x, 24)
    elif how == "noise":
        x = (x + 0.04 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    return list(to_uint8(x))


def identity_check(n: int = 200, seed: int = 7, net=None) -> dict:
    """Same instance elsewhere vs another instance of the same class words vs other words."""
    rng = np.random.default_rng(seed)
    same, other_inst, other_word = [], [], []
    for i in range(n):
        spec = world.sample_scene(rng=rng, n_objects=1, patterns=world.PATTERNS, pattern_p=1.0)
        o = spec.objects[0]
        src = world.render_scene(spec)

        def moved(obj, spec=spec):
            return dataclasses.replace(
                spec, objects=[dataclasses.replace(
                    obj, cx=float(rng.uniform(0.35, 0.65)), cy=float(rng.uniform(0.35, 0.65)),
                    radius=float(np.clip(obj.radius * rng.uniform(0.8, 1.2), 0.12, 0.3)),
                    angle=float(rng.uniform(-25, 25)))],
                background=str(rng.choice([b for b in world.BACKGROUNDS
                                           if b not in world.TEXTURED_BACKGROUNDS])))
        others2 = [c for c in world.COLOURS if c not in (o.colour, o.colour2)]
        alt_pattern = [p for p in world.PATTERNS if p not in (o.pattern, "solid")]
        inst = dataclasses.replace(o, colour2=str(rng.choice(others2))) if i % 2 == 0 else \
            dataclasses.replace(o, pattern=str(rng.choice(alt_pattern)))
        word = dataclasses.replace(o, shape=str(rng.choice([s for s in world.SHAPES
                                                            if s != o.shape])))
        imgs = [world.render_scene(moved(x)).image for x in (o, inst, word)]
        sims = I.identity_similarity(src.image, src.masks[1], imgs, net=net)
        same.append(sims[0])
        other_inst.append(sims[1])
        other_word.append(sims[2])
    same, other_inst, other_word = map(np.array, (same, other_inst, other_word))
    return {"same_instance": round(float(same.mean()), 4),
            "other_instance_same_words": round(float(other_inst.mean()), 4),
            "other_shape": round(float(other_word.mean()), 4),
            "same_above_other_instance": round(float((same > other_inst).mean()), 4),
            "n_pairs": n}


def validate(net) -> dict:
    """Held-out pattern accuracy per degradation and the identity check (printed)."""
    held = single_object_scenes(600, "heldout")
    truth = [s.spec.objects[0].pattern for s in held]
    metrics = {}
    print(f"held-out pattern accuracy ({len(held)} single-object scenes, object found by "
          "object_mask):")
    for how in ("clean", "blur", "down-up", "noise", "vae"):
        pred = I.read_pattern(degraded(held, how), net)
        acc = float(np.mean([p == t for p, t in zip(pred, truth)]))
        per = {p: round(float(np.mean([q == p for q, t in zip(pred, truth) if t == p])), 3)
               for p in I.PATTERNS}
        metrics[f"accuracy_{how}"] = round(acc, 4)
        metrics[f"per_pattern_{how}"] = per
        print(f"  {how:>8}: {acc:.3f}  " + "  ".join(f"{k} {v:.2f}" for k, v in per.items()))
    ident = identity_check(net=net)
    metrics["identity"] = ident
    print("identity similarity (200 pairs): same instance elsewhere "
          f"{ident['same_instance']:.3f}, another instance with the same words "
          f"{ident['other_instance_same_words']:.3f}, another shape {ident['other_shape']:.3f}; "
          f"same > other instance in {ident['same_above_other_instance']:.2f} of pairs")
    return metrics


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(data_dir() / "classifier"))
    ap.add_argument("--evaluate-only", action="store_true",
                    help="re-validate the shipped network (its weights unchanged)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.evaluate_only:
        net = I.load_pattern_net(args.out)
        metrics = dict(net.config["metrics"])
        metrics.update(validate(net))
        I.save_pattern_net(net, args.out, metrics)
        print(f"re-validated {args.out}/{I.WEIGHTS_FILE}")
        return
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    x, y = crops_and_labels(single_object_scenes(args.n_train, "train"), g)
    t_data = time.time() - t0
    net = I.PatternNet()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=args.steps)
    net.train()
    for step in range(args.steps):
        idx = torch.randint(0, len(x), (args.batch,), generator=g)
        xb = x[idx]
        flip = torch.rand(args.batch, generator=g) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        loss = F.cross_entropy(net(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 300 == 0:
            print(f"step {step + 1}/{args.steps} loss {loss.item():.4f}", flush=True)
    net.eval()
    metrics = {"n_train": args.n_train, "steps": args.steps, "batch": args.batch,
               "data_s": round(t_data, 1), "train_s": round(time.time() - t0 - t_data, 1)}
    metrics.update(validate(net))
    metrics["wall_s"] = round(time.time() - t0, 1)
    I.save_pattern_net(net, args.out, metrics)
    I._CACHE.clear()
    print(f"wrote {args.out}/{I.WEIGHTS_FILE} ({metrics['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
