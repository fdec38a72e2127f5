# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Many concepts from one image, with masks (Break-a-Scene)
#
# **What you will learn**
# - how to learn **several** new words from **one** image: one token per concept, trained
#   together;
# - *union sampling*: each step names a random subset of the concepts, and the diffusion
#   loss looks only at the union of their masks;
# - why that is not enough: nothing in the masked loss says *which* token is *which* object.
#   We measure the entanglement with each token's attention map (its IoU with its own mask)
#   and with the generations;
# - Break-a-Scene's **cross-attention loss**, which ties each token's attention to its mask;
# - the payoff: the learned concepts in new arrangements, on new backgrounds, next to
#   ordinary words.
#
# **Prerequisites**: notebook 03 (concept tokens, the masked diffusion loss, the embedding
# norm) and notebook 01 (attention maps). **Runtime**: about 2 minutes on a 2-core CPU (measured, idle).

# %%
from collections import Counter

import numpy as np
import torch
import matplotlib.pyplot as plt

from conceptlab import load_pipeline
from conceptlab.tokens import add_concept_tokens
from conceptlab.shapes.examples import load_example
from IPython.display import display

from conceptlab.viz.figures import image_row, overlay_map, overlay_masks, sample_strips
from conceptlab.train import ConceptImage, TrainConfig, train_concepts

torch.set_num_threads(2)

# %% [markdown]
# ## 0. One image, two concepts
# Another bundled user image: a **green heart with yellow dots** (the base model saw dotted
# hearts, captioned only "a green dotted heart": never the dots' colour) and a white
# triangle on a gray background. Two
# concepts, two new tokens: `[v1]` the dotted heart, `[v2]` the triangle. The masks are
# given (Break-a-Scene's setting).

# %%
ex = load_example("dotted-heart-and-triangle")
K = 2
names = [f"[v{k + 1}]" for k in range(K)]
masks = ex.masks[:K]                                   # (K, 64, 64): the objects
judged = [("green", "heart"), ("white", "triangle")]   # what the classifier checks for each
for n, d in zip(names, ex.concepts):
    print(n, "=", d)
fig = image_row([ex.image] + [overlay_masks(ex.image, m[None]) for m in masks],
                titles=["user image"] + names, scale=2.2)
plt.show()


# %% [markdown]
# ## 1. Union sampling
# At each step and for each of the 4 samples of a batch, the trainer draws a random
# non-empty subset $s$ of the concepts (its size uniform in 1..K, then a random subset in a
# random order), builds the prompt naming exactly those tokens, and masks the diffusion loss
# with the union $M_s = \max_{i \in s} M_i$. Written out:

# %%
def union_sample(K, g):
    n = int(torch.randint(1, K + 1, (1,), generator=g))
    return torch.randperm(K, generator=g)[:n].tolist()


g = torch.Generator().manual_seed(0)
for _ in range(6):
    s = union_sample(K, g)
    print(f"{'a photo of ' + ' and '.join(names[i] for i in s):<32} loss mask: union of",
          [names[i] for i in s])

# %% [markdown]
# The single-token prompts are what separates the concepts: "a photo of [v1]" is only ever
# asked to explain the heart. The two-token prompts teach the tokens to work together, but
# their loss (on the union) is the same whichever token takes which object.

# %% [markdown]
# ## 2. Two runs: without and with the cross-attention loss
# Break-a-Scene's cross-attention loss compares each named token's attention map $A_i$
# (max-normalised) with its mask $M_i$ at the attention resolution:
#
# $$\mathcal L = \mathcal L_{\text{mask}} + \lambda_{\text{attn}} \sum_{i \in s}
#   \big\| A_i / \max A_i - M_i \big\|^2 .$$
#
# Same data, same random draws; only $\lambda_{\text{attn}}$ differs. Both tokens start
# from the same word, "shape", so nothing but training tells them apart.

# %%
data = ConceptImage(ex.image, masks)
config = TrainConfig.for_bundled()
print(f"{config.steps} steps, lr {config.lr}, batch {config.batch_size}, t in {config.t_range}, "
      f"norm_penalty {config.norm_penalty}, lambda_attn {config.lambda_attn}")

runs = {}
for lam in (0.0, config.lambda_attn):
    p = load_pipeline()
    c = add_concept_tokens(p, K, init_words="shape")
    h = train_concepts(p, data, c, config.replace(lambda_attn=lam), progress=False)
    runs[lam] = (p, c, h)

# %% [markdown]
# The sampled prompts of the first steps (the history keeps the first prompt of each step),
# and how often each subset size came up:

# %%
h = runs[0.0][2]
print(h.prompts[:8])
print(sorted(Counter(pr.count("[v") for pr in h.prompts).items()))

# %% [markdown]
# ## 3. Where does each token look?
# Attention of each token in "a photo of [v1] and [v2]" on the user image (20 noise levels),
# thresholded at half its maximum and compared with the token's own mask (IoU), and with the
# *other* concept's mask (a token that looks at both objects scores on both).

# %%
from conceptlab.maps import attention_maps
from conceptlab.masks import iou

prompt_all = "a photo of " + " and ".join(names)


def token_maps(p):
    am = attention_maps(p, ex.image, prompt_all, n_timesteps=20, seed=0)
    return [am.for_word(n, size=(64, 64)).numpy() for n in names]


tmaps = {lam: token_maps(p) for lam, (p, c, h) in runs.items()}
ious = {lam: np.array([[iou(a > 0.5, m) for m in masks] for a in tm])
        for lam, tm in tmaps.items()}        # ious[lam][token, mask]

fig, axes = plt.subplots(len(tmaps), K, figsize=(2.4 * K, 2.6 * len(tmaps)))
for i, (lam, tm) in enumerate(tmaps.items()):
    for k, a in enumerate(tm):
        axes[i, k].imshow(overlay_map(ex.image, a)); axes[i, k].set_axis_off()
        axes[i, k].set_title(f"lambda_attn {lam}: {names[k]}\nIoU own {ious[lam][k, k]:.2f}, "
                             f"other {ious[lam][k, 1 - k]:.2f}", fontsize=8)
fig.tight_layout(); plt.show()

# %%
for lam, m in ious.items():
    print(f"lambda_attn {lam}:")
    for k, n in enumerate(names):
        print(f"   {n}: IoU with its own mask {m[k, k]:.2f}, with the other mask {m[k, 1 - k]:.2f}")

# %%
# NBVAL_CHECK_OUTPUT
lam = config.lambda_attn
print("with the loss, every token overlaps its own concept more than the other:",
      bool(all(ious[lam][k, k] > ious[lam][k, 1 - k] for k in range(K))))
print("without the loss, too:", bool(all(ious[0.0][k, k] > ious[0.0][k, 1 - k] for k in range(K))))
print("own-mask IoUs of the two runs within 0.1 of each other:",
      bool(abs(np.diag(ious[lam]).mean() - np.diag(ious[0.0]).mean()) < 0.1))

# %% [markdown]
# **On this model and this image the tokens are not entangled, even without the loss.**
# Each token looks at its own object in both runs (IoU with its own mask about 0.85, with
# the other's 0.00), and the cross-attention loss changes little. The base model was
# trained to ground object words in their objects, and each single-token prompt ("a photo
# of [v1]", asked only to explain the heart's pixels) already pulls its token onto its
# object.
#
# This was not so on the previous bundled model (v1, whose attention for patterned objects
# was weak): there `[v2]` looked at the *heart* without the loss (IoU 0.58 with the heart's
# mask, 0.00 with its own) and the loss moved it onto the triangle (0.81). Nothing in the
# masked diffusion loss forbids entanglement: it asks only that the prompt, as a whole,
# explain the pixels inside the union of the masks, and a token can contribute from
# anywhere. Whether it happens depends on the model and the image; the loss is the guard
# that makes it not happen. Exercise 5 looks for it on another image.
#
# The trainer also keeps attention snapshots during training (`history.plot_attention()`):
# each token's map every 1/8 of the run, at a fixed noise level.

# %%
for lam, (p, c, h) in runs.items():
    fig = h.plot_attention()             # library figures come closed: display() shows them
    fig.suptitle(f"lambda_attn = {lam}", fontsize=9)
    fig.tight_layout()
    display(fig)

# %% [markdown]
# ## 4. What does each token draw?
# Eight samples of "a photo of [v1]", of "a photo of [v2]" and of "a photo of [v1] and [v2]"
# per run, judged by the classifier: does the image show each named concept's colour, its
# shape, both (the pair head: *this* colour on *this* shape)?

# %%
from conceptlab.shapes.judge import judge
from conceptlab.generation import generate


def judged_samples(p, c, prompt, objects, n=8):
    imgs = generate(p, c, prompt, n=n, seed=0, output_type="np")
    j = judge(imgs, [objects] * n)
    return imgs, {k: float(np.mean([r[k + "_ok"] for r in j])) for k in ("colour", "shape", "both")}


gen = {}
for lam, (p, c, h) in runs.items():
    for k, n in enumerate(names):
        gen[lam, n] = judged_samples(p, c, f"a photo of {n}", [judged[k]])
    gen[lam, " and ".join(names)] = judged_samples(p, c, prompt_all, judged)
fig = sample_strips([gen[key][0] for key in gen],
                    [f"lambda_attn {lam}: 'a photo of {n}'" for lam, n in gen])
plt.show()

# %%
for (lam, n), (imgs, s) in gen.items():
    print(f"lambda_attn {lam}, 'a photo of {n}': colour {s['colour']:.2f} "
          f"shape {s['shape']:.2f} both {s['both']:.2f}")

# %% [markdown]
# Reading the samples and the numbers (8 samples per prompt, so one sample is 0.12 of a
# single-concept prompt and 0.06 of a two-concept one; the run stored here):
#
# - **The concepts come back.** `[v1]` draws a green object covered in yellow (and some red)
#   dots, the user's dotted heart's colours and pattern, in every sample, alone and together
#   with `[v2]`; `[v2]` draws a white, pointed, triangle-like shape. Neither run's heart
#   looks like a heart: the shape is lost, the appearance is kept.
# - **The judge under-counts `[v1]`'s colour** (0.38-0.56): it reads an object's main colour
#   on solid training objects, and a green object covered in yellow dots is ambiguous to it.
#   Look at the images for this one; the judge's reading of `[v2]` (white in every sample,
#   a triangle in 0.38) matches what you see.
# - **With and without the attention loss** the samples are alike, as the attention above
#   predicts on this image.
#
# ## 5. New arrangements and combinations
# With the tokens of the run with the cross-attention loss: the two concepts swapped, a
# concept on a background it was never seen on, and a concept next to an ordinary object.

# %%
p, c, h = runs[config.lambda_attn]
new_prompts = {
    "a photo of [v2] and [v1]": [judged[1], judged[0]],
    "a photo of [v1] on a dotted background": [judged[0]],
    "a photo of [v2] on a black background": [judged[1]],
    "a photo of [v1] and a yellow circle": [judged[0], ("yellow", "circle")],
    "a photo of [v2] and a blue star": [judged[1], ("blue", "star")],
}
combo = {pr: judged_samples(p, c, pr, objs) for pr, objs in new_prompts.items()}
fig = sample_strips([v[0] for v in combo.values()], list(combo))
plt.show()

# %%
for pr, (imgs, s) in combo.items():
    print(f"{pr:<42} colour {s['colour']:.2f} shape {s['shape']:.2f} both {s['both']:.2f}")

# %%
# NBVAL_CHECK_OUTPUT
print(len(combo), "prompts x", combo[next(iter(combo))][0].shape, "images")

# %% [markdown]
# What carries over to new prompts (the run stored here):
#
# - **ordinary words survive next to the tokens**: "[v2] and a blue star" shows a white
#   shape and a blue star in almost every sample (colours 1.00, shapes 0.94), "[v2] on a
#   black background" keeps the black background (the black-background and dotted prompts
#   are judged on the concepts only; look at the figure). This is what the norm penalty
#   protects (notebook 03, section 6);
# - **both tokens keep their appearance everywhere**: white for `[v2]`, green with yellow
#   dots for `[v1]`, swapped order included;
# - the heart's shape is not reproduced, in any prompt.
#
# **Honesty note.** On this model Break-a-Scene's phase 1 (tokens only, masked loss) brings
# a concept's colours and pattern back; its shape only partly (the triangle) or not at all
# (the heart). The cross-attention loss, the recipe's guard against entangled tokens, has
# nothing to fix on this image. On Stable Diffusion the same code learns far more from one
# image; here it is the mechanism that you can inspect end to end in a few minutes.
#
# ## Exercises
# 1. Add the background as a third concept (`ex.masks[2]`, init word "background") and
#    generate "a photo of [v1] and [v2] on [v3]".
# 2. Train with `norm_penalty=0` (notebook 03, section 6). How long do the rows grow, and
#    what happens to the ordinary words of "a photo of [v2] and a blue star"?
# 3. Set `lambda_attn` ten times larger. Does the IoU keep rising? What happens to the
#    diffusion loss and to the generations?
# 4. Generation has its own knob: the guidance scale (`generate(..., guidance_scale=...)`,
#    default 4 for this model). Judge "a photo of [v2] and [v1]" at 2 and 8.
# 5. **Looking for entanglement.** Train the three concepts of `load_example("three-objects")`
#    (given masks, every token initialised from "shape") with and without the attention loss,
#    and measure each token's IoU with every mask as in section 3. Does any token look at
#    another concept's object without the loss? Which objects are most alike to the model?

# %% jupyter={"source_hidden": true} tags=["solution"]
# Solution sketch for exercise 4
for gs in (2.0, 8.0):
    imgs = generate(p, c, "a photo of [v2] and [v1]", n=8, seed=0, guidance_scale=gs,
                    output_type="np")
    j = judge(imgs, [[judged[1], judged[0]]] * 8)
    print(f"guidance {gs}: colour {np.mean([r['colour_ok'] for r in j]):.2f}, "
          f"shape {np.mean([r['shape_ok'] for r in j]):.2f}")
