"""Train the shipped shape/colour classifier (data/classifier) and measure it.

    python benchmarks/train_classifier.py                 # ~6 min of one CPU thread
    python benchmarks/train_classifier.py --n-train 1000 --steps 100 --out /tmp/clf  # smoke

Prints and stores in data/classifier/config.json (``metrics``):

- held-out accuracy per named object, per head (colour / shape / pair), and false-positive
  rates, on 1000 fresh scenes (a random stream disjoint from training);
- the same on *degraded* scenes: area-downsampled to 16x16 and bilinearly upsampled back
  (much blurrier than the bundled model's VAE output);
- with ``--pipeline DIR``: the same on VAE round trips of held-out scenes (``vae_ceiling``);
- the blob test: scenes whose objects are replaced by circles / irregular smooth blobs of
  the same colour; ``star`` is the fraction of those images where the shape head says
  "star" (it must not).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from conceptlab import classifier as C


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data/classifier")
    ap.add_argument("--n-train", type=int, default=5000)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--independent", type=float, default=0.5,
                    help="fraction of training scenes with repeated shapes / colours")
    ap.add_argument("--pair-pos-weight", type=float, default=2.0)
    ap.add_argument("--eval-n", type=int, default=1000)
    ap.add_argument("--blob-n", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pipeline", default=None,
                    help="optional StableDiffusionPipeline folder: also score VAE round trips")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0, c0 = time.time(), time.process_time()
    model, metrics = C.train_classifier(n_train=args.n_train, steps=args.steps, seed=args.seed,
                                        batch=args.batch, lr=args.lr, eval_n=0,
                                        independent=args.independent,
                                        pair_pos_weight=args.pair_pos_weight)
    metrics["wall_s"] = round(time.time() - t0, 1)
    metrics["cpu_s"] = round(time.process_time() - c0, 1)
    print(f"trained in {metrics['wall_s']} s wall, {metrics['cpu_s']} s CPU "
          f"({args.threads} thread), {metrics['parameters']} parameters", flush=True)

    images, objects = C.render_scenes(args.eval_n, "heldout", seed=0)
    x = C.to_tensor(images)
    metrics["heldout"] = dict(C.score(C.predict(model, x), objects), n_images=args.eval_n,
                              n_objects=sum(len(o) for o in objects))
    metrics["heldout_down16"] = dict(C.score(C.predict(model, C.downsample_degrade(x, 16)),
                                             objects), n_images=args.eval_n)
    metrics["heldout_down24"] = dict(C.score(C.predict(model, C.downsample_degrade(x, 24)),
                                             objects), n_images=args.eval_n)
    metrics["blobs_circle"] = C.blob_rates(model, n=args.blob_n, seed=0, wobble=0.0)
    metrics["blobs_irregular"] = C.blob_rates(model, n=args.blob_n, seed=1, wobble=0.12)
    if args.pipeline:
        from diffusers import StableDiffusionPipeline

        vae = StableDiffusionPipeline.from_pretrained(args.pipeline).vae.float().eval()
        metrics["vae_roundtrip"] = C.vae_ceiling(vae, n=300, model=model)["vae"]
    metrics["torch"] = torch.__version__

    for key in ("heldout", "heldout_down24", "heldout_down16", "vae_roundtrip"):
        if key not in metrics:
            continue
        m = metrics[key]
        print(f"{key:15s} " + "  ".join(
            f"{h}: acc {m[h]['accuracy']:.3f} fp {m[h]['false_positive']:.3f} "
            f"exact {m[h]['exact']:.3f}" for h in C.HEADS))
    for key in ("blobs_circle", "blobs_irregular"):
        b = metrics[key]
        print(f"{key:15s} said star {b['star']:.3f}  any non-circle {b['any_non_circle']:.3f}  "
              f"circle {b['circle']:.3f}  colours found {b['colour']:.3f}")

    C.save_classifier(model, args.out, metrics)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"saved {args.out} ({size / 1024:.0f} KiB)")
    print(json.dumps({k: metrics[k] for k in ("heldout", "blobs_circle")}, indent=1))
    return metrics


if __name__ == "__main__":
    main()
