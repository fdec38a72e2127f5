"""Draw the README's hero figure, docs/figures/hero.png, with the library on the bundled model.

    python docs/make_hero.py            # about a minute on a laptop CPU; seeded, so repeatable
    python docs/make_hero.py --fresh    # learn again even if outputs/hero/ holds a run

The learned concepts and the samples are kept in outputs/hero/ (not committed), so changing
the layout re-draws the figure in a second.

What `conceptlab demo` does, in one picture: the example "striped-star-and-heart" is
learned with EM (no masks given); the top row shows the masks at every E-step (flat label
colours over the dimmed image) with their IoU against the ground truth, which the method
never reads; the rows below are the learned concepts drawn in new prompts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "figures" / "hero.png"
CACHE = ROOT / "outputs" / "hero"
SEED = 0
N_SAMPLES = 4
PX = 96          # on-screen size of each tile (nearest-neighbour enlarged from 64 px)
GAP = 6


def learn():
    """The demo's run: (example, LearnedConcepts), seeded."""
    import torch

    from conceptlab import learn_concepts, load_pipeline
    from conceptlab.em_callbacks import GroundTruthIoU
    from conceptlab.shapes.examples import load_example

    torch.manual_seed(SEED)
    pipe = load_pipeline(progress=False)
    ex = load_example("striped-star-and-heart")
    concepts = learn_concepts(pipe, ex.image, ex.init_words, method="em", seed=SEED,
                              progress=False, callbacks=[GroundTruthIoU(ex.masks)])
    return pipe, ex, concepts


def compose(ex, concepts, generations, prompts):
    """One PIL image: the mask evolution row, then one row of samples per prompt."""
    from PIL import Image, ImageDraw, ImageFont

    from conceptlab.viz.figures import label_image

    font = ImageFont.load_default(size=12)
    cap = 20
    tiles = [("image", np.asarray(ex.image))]
    for step, masks, ious in zip(concepts.e_steps, concepts.mask_history,
                                 concepts.iou_history):
        tiles.append((f"step {step}\nmean IoU {np.mean(ious):.2f}", label_image(ex.image, masks[0])))
    tiles.append(("ground truth", label_image(ex.image, ex.masks)))
    mask_cap = 34
    cols = max(len(tiles), N_SAMPLES)
    width = GAP + cols * (PX + GAP)
    title_h = 22
    height = title_h + mask_cap + (cap + PX + GAP) * (1 + len(prompts)) + title_h + GAP
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)

    def tile(a, x, y):
        sheet.paste(Image.fromarray(np.asarray(a, np.uint8)).resize((PX, PX), Image.NEAREST),
                    (x, y))

    y = GAP
    draw.text((GAP, y), "EM: the masks at every E-step (no masks given)", fill=(0, 0, 0),
              font=ImageFont.load_default(size=15))
    y += title_h
    for j, (label, a) in enumerate(tiles):
        x = GAP + j * (PX + GAP)
        draw.multiline_text((x, y + 2), label, fill=(40, 40, 40), font=font, spacing=2)
        tile(a, x, y + mask_cap)
    y += mask_cap + PX + GAP + 6
    draw.text((GAP, y), "the learned concepts in new prompts", fill=(0, 0, 0),
              font=ImageFont.load_default(size=15))
    y += title_h
    for prompt, row in zip(prompts, generations):
        draw.text((GAP, y + 3), prompt, fill=(40, 40, 40), font=font)
        for j, a in enumerate(row):
            tile(a, GAP + j * (PX + GAP), y + cap)
        y += cap + PX + GAP
    return sheet.crop((0, 0, width, y))


def prompts_for(names) -> list[str]:
    return [f"a photo of {names[1]} and {names[0]}",
            f"a photo of {names[0]} and a yellow circle on a gray background"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fresh", action="store_true", help="learn again, ignoring outputs/hero/")
    args = ap.parse_args(argv)
    from conceptlab import LearnedConcepts, generate
    from conceptlab.shapes.examples import load_example

    samples = CACHE / "generations.npz"
    if args.fresh or not samples.exists():
        pipe, ex, concepts = learn()
        prompts = prompts_for(concepts.names)
        generations = [np.asarray(generate(pipe, concepts.tokens, p, n=N_SAMPLES, seed=SEED,
                                           output_type="np")) for p in prompts]
        CACHE.mkdir(parents=True, exist_ok=True)
        concepts.save(CACHE / "concepts")
        np.savez(samples, *generations)
    ex = load_example("striped-star-and-heart")
    concepts = LearnedConcepts.load(CACHE / "concepts")
    prompts = prompts_for(concepts.names)
    with np.load(samples) as z:
        generations = [z[f"arr_{i}"] for i in range(len(prompts))]
    sheet = compose(ex, concepts, generations, prompts)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(OUT, optimize=True)
    print(f"wrote {OUT.relative_to(ROOT)} ({os.path.getsize(OUT) // 1024} KB, "
          f"{sheet.size[0]}x{sheet.size[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
