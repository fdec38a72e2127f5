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
# norm) and notebook 01 (attention maps). **Runtime**: about 2-3 minutes on a 2-core CPU.

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
print("without the loss, a token overlaps the other concept more than its own:",
      bool(any(ious[0.0][k, 1 - k] > ious[0.0][k, k] for k in range(K))))
print("with the loss, every token overlaps its own concept more than the other:",
      bool(all(ious[lam][k, k] > ious[lam][k, 1 - k] for k in range(K))))
print("mean own-mask IoU up by more than 0.2:",
      bool(np.diag(ious[lam]).mean() > np.diag(ious[0.0]).mean() + 0.2))

# %% [markdown]
# **Without the loss the tokens are entangled.** `[v2]` was meant to be the triangle, yet
# in "a photo of [v1] and [v2]" it looks at the *heart* (IoU 0.58 with the heart's mask,
# 0.00 with its own), just like `[v1]`. Nothing in the masked diffusion loss forbids it:
# the loss only asks that the prompt, as a whole, explain the pixels inside the union of
# the masks, and a token can contribute to that from anywhere. (Both tokens start from the
# same word, "shape", and the heart is the more salient object.)
#
# **With the loss each token looks at its own object**: `[v2]` now covers the triangle
# (IoU 0.81) and nothing of the heart; `[v1]` stays on the heart (0.36: its map peaks at
# the heart's centre and misses the dotted edges at 16x16).
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
# Reading the numbers (8 samples per prompt, so one sample is 0.12 of a single-concept
# prompt and 0.06 of a two-concept one; these are the numbers of the run stored here):
#
# - **Together.** "a photo of [v1] and [v2]" shows the two concepts' colours for 0.38 of
#   the named objects without the loss and 0.62 with it: entangled tokens compete for the
#   same object.
# - **Alone.** The triangle's token gives white objects in most samples with or without the
#   loss. The heart's token gave green in 0.88 of its samples without the loss and 0.38 with
#   it, drifting towards blue. Do not read much into that difference: with 200 steps on one
#   image, training is sensitive to everything, even float rounding. The same setting run
#   with one thread instead of two gave *the same attention IoUs* (0.36 / 0.81) and green in
#   0.88-1.0 of the samples in our tuning runs.
# - **Shapes** are rarely reproduced (0.12-0.25 heart or triangle, the dots never): this
#   2.4M-parameter model, trained for about 40 CPU-minutes, draws "a green heart" as a heart
#   only about 0.4 of the time to begin with.
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
# - **ordinary words survive next to the tokens**: dotted and black backgrounds, a yellow
#   circle, a blue star ("[v2] and a blue star": colours 0.75, shapes 0.56). This is
#   what the norm penalty protects (notebook 03, section 6);
# - **the triangle's token keeps its colour everywhere** (white on black: 1.00), while the
#   heart's token, already weak in this run, loses its green in most combinations (0.00 on
#   a dotted background);
# - shapes and the dotted pattern are not reproduced, for the reasons above.
#
# **Honesty note.** On this model Break-a-Scene's recipe does what it claims where it can
# be measured robustly: the cross-attention loss disentangles the tokens (IoU with the own
# mask from 0.15 to about 0.6 on average) and two-concept prompts improve. Concept *fidelity* is
# limited to colours, and varies from run to run. On Stable Diffusion the same code learns
# far more from one image; here it is the mechanism, not the picture quality, that you can
# inspect end to end in a few minutes.
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

# %% jupyter={"source_hidden": true} tags=["solution"]
# Solution sketch for exercise 4
for gs in (2.0, 8.0):
    imgs = generate(p, c, "a photo of [v2] and [v1]", n=8, seed=0, guidance_scale=gs,
                    output_type="np")
    j = judge(imgs, [[judged[1], judged[0]]] * 8)
    print(f"guidance {gs}: colour {np.mean([r['colour_ok'] for r in j]):.2f}, "
          f"shape {np.mean([r['shape_ok'] for r in j]):.2f}")
