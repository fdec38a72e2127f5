# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Cross-attention: where does the model look for each word?
#
# [![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/conceptlab/conceptlab/blob/main/notebooks/01_cross_attention.ipynb)
#
# **What you will learn**
# - what a cross-attention layer computes, first as five lines of torch on toy tensors;
# - that the course's U-Net computes exactly that: we recompute one real layer's attention
#   probabilities by hand and check them against what `conceptlab` records;
# - how `conceptlab.record_attention` hooks a diffusers U-Net (a context manager) and what
#   it stores;
# - attention maps of a real image, per word, per layer (16x16 vs 8x8) and per timestep;
# - which layers and timesteps localise objects best, **measured** on 30 held-out scenes
#   against ground-truth masks, beside two trivial baselines.
#
# **Prerequisites**: notebook 00 (the shapes world and the bundled model); matrix products
# and the softmax. **Runtime**: about 25 s on a 2-core CPU (measured, idle).
#
# Everything here is what the method of this course (Break-a-Scene and *Visual
# Concept-driven Image Generation*) builds on: masks for new concepts are estimated from
# these maps (notebook 02), and a loss on them teaches new tokens where their concept is
# (notebooks 04-05).

# %%
# NBVAL_SKIP
# On Colab, or a machine without the course: install it and move into its notebooks/ folder.
import importlib.util, os, subprocess, sys
COURSE = "https://github.com/conceptlab/conceptlab"  # the course's one URL: pyproject.toml
if importlib.util.find_spec("conceptlab") is None:
    subprocess.check_call(["git", "clone", "-q", "--depth", "1", COURSE, "conceptlab-course"])
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "./conceptlab-course"])
    os.chdir("conceptlab-course/notebooks")

# %%
import os
import numpy as np
import torch
import matplotlib.pyplot as plt
from conceptlab import load_pipeline, record_attention
from conceptlab.shapes import world
from conceptlab.viz.figures import image_row, overlay_map

torch.set_num_threads(2)
_ = torch.manual_seed(0)

# %% [markdown]
# ## 1. Cross-attention on toy tensors
#
# A cross-attention layer lets every **pixel** of the U-Net's feature map read from the
# **words** of the prompt. With image features $x$ ($N$ pixels $\times$ $C$ channels) and
# text embeddings $c$ ($T$ tokens $\times$ $D$):
#
# $$Q = x W_q,\quad K = c W_k,\quad V = c W_v,\qquad
#   P = \mathrm{softmax}_{\text{tokens}}\!\left(\frac{Q K^\top}{\sqrt d}\right),\qquad
#   \text{out} = P V .$$
#
# $P$ is $N \times T$: **each row is a probability distribution over the tokens**, "how
# much this pixel reads each word". A column $P[:, j]$, reshaped to the image grid, is the
# *attention map* of word $j$.
#
# A toy: an 8x8 "image" whose pixels in one square carry features resembling the
# embedding of the word "square".

# %%
tokens = ["<start>", "a", "red", "square", "<end>"]
T, D = len(tokens), 6
c = torch.randn(T, D)                               # text embeddings, one row per token
inside = torch.zeros(8, 8, dtype=torch.bool)
inside[2:6, 1:5] = True                             # where the "square" is
x = 0.5 * torch.randn(64, D) + 2.0 * inside.reshape(64, 1) * c[3]   # pixel features

W_q, W_k, W_v = torch.eye(D), torch.eye(D), torch.randn(D, D)    # learned in a real model
Q, K, V = x @ W_q, c @ W_k, c @ W_v
P = torch.softmax(Q @ K.T / D**0.5, dim=-1)        # (64 pixels, 5 tokens)
out = P @ V                                          # (64, D): what each pixel read
print("P:", tuple(P.shape), " rows sum to 1:", bool(torch.allclose(P.sum(-1), torch.ones(64))))

# %%
fig, axes = plt.subplots(1, 3, figsize=(9, 3), gridspec_kw=dict(width_ratios=[1.3, 1, 1]))
axes[0].imshow(P.T, aspect="auto", cmap="magma", interpolation="nearest")
axes[0].set_yticks(range(T), tokens); axes[0].set_xlabel("pixel (row-major)")
axes[0].set_title("P transposed: tokens x pixels", fontsize=9)
axes[1].imshow(P[:, 3].reshape(8, 8), cmap="magma", vmin=0, vmax=1)
axes[1].set_title("attention map of 'square'", fontsize=9)
axes[2].imshow(P[:, 2].reshape(8, 8), cmap="magma", vmin=0, vmax=1)
axes[2].set_title("attention map of 'red'", fontsize=9)
for ax in axes[1:]:
    ax.set_axis_off()
fig.tight_layout(); plt.show()

# %% [markdown]
# Pixels whose query resembles the key of "square" put most of their probability on that
# token, so the column of "square" lights up exactly where the square is. A real layer has
# several **heads**: the channels of $Q$, $K$, $V$ are split into `heads` groups of size
# $d$, each group computes its own $P$, and maps are usually averaged over heads.
#
# ## 2. The real model
# The model is chosen in one place. `"shapes-ldm"` is the course's bundled model; any
# local Stable Diffusion folder works the same way (see notebook 00).

# %%
MODEL = os.environ.get("CONCEPTLAB_MODEL", "shapes-ldm")
pipe = load_pipeline(MODEL)
print(type(pipe.unet).__name__, "latent", pipe.unet.config.sample_size, "x",
      pipe.unet.config.sample_size)

# %% [markdown]
# One scene with three objects, with its caption:

# %%
sc = world.render_scene(world.sample_scene(seed=5, n_objects=3))
print(sc.caption)
shape_words = [o.shape for o in sc.spec.objects]
_ = plt.figure(figsize=(2.5, 2.5)); _ = plt.imshow(sc.image); _ = plt.axis("off")
plt.show()

# %% [markdown]
# ### Where the cross-attention layers are
# In a diffusers U-Net every transformer block has a self-attention `attn1` and a
# cross-attention `attn2`. Ours has cross-attention at two resolutions of the 16x16 latent:
# 16x16 (the outer blocks) and 8x8 (the inner blocks and the middle).

# %%
from conceptlab.attention import cross_attention_layers, layer_resolutions

res_of = layer_resolutions(pipe.unet)
for name in cross_attention_layers(pipe.unet):
    print(f"{res_of[name]:>2}x{res_of[name]:<2}  {name}")

# %% [markdown]
# ## 3. One real layer, by hand
# We take one 16x16 layer, grab the inputs of its `attn2` module with a forward pre-hook
# (plain PyTorch, fine for a one-off look), and run the U-Net once on a noisy latent of the
# scene. At the same time the library records the layer's probabilities
# (`record_attention`, section 4).

# %%
from conceptlab.models import encode_image, encode_prompt

name = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"
attn = pipe.unet.get_submodule(name.removesuffix(".processor"))
print(type(attn).__name__, "heads:", attn.heads, " to_q:", attn.to_q, " to_k:", attn.to_k)

captured = {}
def grab_inputs(module, args, kwargs):
    captured["x"] = (args[0] if args else kwargs["hidden_states"]).detach()
    captured["c"] = kwargs["encoder_hidden_states"].detach()

z0 = encode_image(pipe, sc.image)                          # (1, 8, 16, 16)
t = torch.tensor([400])
zt = pipe.scheduler.add_noise(z0, torch.randn(z0.shape, generator=torch.Generator().manual_seed(0)), t)
emb = encode_prompt(pipe, sc.caption)                      # (1, 32 tokens, 128)

handle = attn.register_forward_pre_hook(grab_inputs, with_kwargs=True)
try:
    with torch.no_grad(), record_attention(pipe.unet) as store:
        pipe.unet(zt, t, encoder_hidden_states=emb)
finally:
    handle.remove()
print("latent z0:", tuple(z0.shape), " image features x:", tuple(captured["x"].shape),
      " text embeddings c:", tuple(captured["c"].shape))

# %% [markdown]
# The same five lines as in the toy, now with the layer's own projections and its heads:

# %%
with torch.no_grad():
    x, c = captured["x"], captured["c"]
    q, k = attn.to_q(x), attn.to_k(c)                  # (1, 256, 64), (1, 32, 64)
    h = attn.heads
    d = q.shape[-1] // h
    q = q.reshape(1, -1, h, d).transpose(1, 2)         # (1, heads, 256 pixels, d)
    k = k.reshape(1, -1, h, d).transpose(1, 2)         # (1, heads, 32 tokens, d)
    P_hand = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)   # (1, heads, 256, 32)

P_lib = store.maps[name][0]                           # (1, heads, 16, 16, 32)
diff = (P_hand - P_lib.reshape(P_hand.shape)).abs().max().item()
print("by hand:", tuple(P_hand.shape), " recorded:", tuple(P_lib.shape))
print(f"max |P_hand - P_recorded| = {diff:.1e}")

# %%
# NBVAL_CHECK_OUTPUT
print(tuple(P_lib.shape), diff < 1e-5)

# %% [markdown]
# They agree to float precision: a map of word $j$ in this course is exactly the column
# $P[:, j]$ of a U-Net layer, nothing more.
#
# ## 4. The library's hook: `record_attention`
# Hooking modules by hand is fragile (diffusers has renamed the attention class and changed
# processor signatures several times). `record_attention` uses the public API instead:
# `unet.set_attn_processor` installs a recording processor on every `attn2`, the processor
# computes attention exactly like diffusers' `AttnProcessor` and keeps $P$, and the original
# processors are restored on exit, even after an exception.
#
# ```python
# with record_attention(pipe.unet) as store:     # max_resolution=32, keep_graph=False
#     pipe.unet(latents, t, encoder_hidden_states=emb)
# store.maps[layer]     # list, one entry per U-Net call: (batch, heads, h, w, tokens)
# store.stacked()       # head-, layer- and call-averaged: (batch, h, w, tokens)
# ```

# %%
for n, calls in store.maps.items():
    print(f"{n.removesuffix('.transformer_blocks.0.attn2.processor'):<28} calls: {len(calls)}  "
          f"shape: {tuple(calls[0].shape)}")
print("stacked():", tuple(store.stacked().shape))
print("restored:", sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()}))

# %% [markdown]
# Recording must not change what the model computes. The recording processor uses plain
# attention where diffusers uses PyTorch's fused kernel, so outputs agree to float rounding:

# %%
# NBVAL_CHECK_OUTPUT
with torch.no_grad():
    plain = pipe.unet(zt, t, encoder_hidden_states=emb).sample
    with record_attention(pipe.unet):
        hooked = pipe.unet(zt, t, encoder_hidden_states=emb).sample
print("U-Net output unchanged by the hook:", torch.allclose(plain, hooked, atol=1e-4))

# %% [markdown]
# ## 5. Attention maps of a real image
# `conceptlab.maps.attention_maps` does what Break-a-Scene's mask step does: encode the
# image with the VAE, noise the latent at `n_timesteps` random timesteps, run the U-Net on
# all noisy copies in one batch while recording, and average over heads. The result keeps
# every layer and timestep, so we can slice it afterwards. We ask for **all** layers and
# the full timestep range here, to compare them.

# %%
from conceptlab.maps import attention_maps, default_attention_config

maps = attention_maps(pipe, sc.image, sc.caption, n_timesteps=40, seed=0, layers="all",
                      t_range=(0, 1000))
print(maps)
print(maps.words)

# %% [markdown]
# ### Per word
# Each map below is min-max normalised on its own (bright = most attention *for that
# word*), averaged over all layers and the 40 timesteps.

# %%
words = list(dict.fromkeys(maps.words))          # distinct words, in caption order
fig, axes = plt.subplots(1, len(words) + 1, figsize=(1.45 * (len(words) + 1), 1.9))
axes[0].imshow(sc.image); axes[0].set_title("image", fontsize=8)
for ax, w in zip(axes[1:], words):
    ax.imshow(maps.for_word(w, size=64), cmap="magma", vmin=0, vmax=1)
    ax.set_title(w, fontsize=8)
for ax in axes:
    ax.set_axis_off()
fig.tight_layout(); plt.show()

# %% [markdown]
# Colour and shape words land on their objects, the background words ('black',
# 'background') on the background. Function words ('a', 'and', 'on') name nothing: their
# normalised maps show faint leftovers (object edges, the complement of the objects), not
# a place. How much attention does each token get overall? Averaged over pixels
# (unnormalised probabilities; each pixel's row sums to 1 over all 32 tokens, padding
# included):

# %%
n_real = int((maps.input_ids != pipe.tokenizer.pad_token_id).sum()) + 1   # + the end token
mass = [maps.for_token(i, normalize=False).mean().item() for i in range(len(maps.tokens))]
fig, ax = plt.subplots(figsize=(9, 2.4))
ax.bar(range(n_real), mass[:n_real])
ax.bar(n_real, sum(mass[n_real:]), color="gray")
ax.set_xticks(range(n_real + 1), maps.tokens[:n_real] + ["(padding)"], rotation=60, fontsize=7)
ax.set_ylabel("mean attention"); ax.set_title("attention mass per token", fontsize=9)
fig.tight_layout(); plt.show()

# %% [markdown]
# Most of each pixel's attention goes to the **padding** tokens after the prompt: the
# softmax must put its mass somewhere, and a pixel with nothing to read parks it there
# (Stable Diffusion does the same with its start token). A word's raw probabilities are
# therefore small, and differ from word to word; that is why every map is normalised on its
# own before we compare or threshold it.
#
# ### Per layer
# The same three shape words and the background word at every layer, each at its own
# resolution (all 40 timesteps averaged):

# %%
probe = shape_words + [sc.spec.background, "background"]
per_layer = {w: maps.per_layer(w) for w in probe}
by_res = sorted(maps.layers, key=lambda n: -res_of[n])      # the 16x16 layers first
fig, axes = plt.subplots(len(probe), len(by_res), figsize=(1.25 * len(by_res), 1.35 * len(probe)))
for j, n in enumerate(by_res):
    axes[0, j].set_title(f"{n.split('.transformer')[0].replace('attentions.', 'a')}\n"
                         f"{res_of[n]}x{res_of[n]}", fontsize=6)
    for i, w in enumerate(probe):
        axes[i, j].imshow(per_layer[w][n], cmap="magma", vmin=0, vmax=1)
        axes[i, j].set_xticks([]); axes[i, j].set_yticks([])
        if j == 0:
            axes[i, j].set_ylabel(w, fontsize=8)
fig.tight_layout(); plt.show()

# %% [markdown]
# ### Per timestep
# At a small $t$ the latent is almost clean and the U-Net "sees" the objects; at a large
# $t$ it is mostly noise. Does that show in the maps? The 40 timesteps, grouped into four
# ranges, and their average:

# %%
bins = [(0, 250), (250, 500), (500, 750), (750, 1000)]
fig, axes = plt.subplots(len(shape_words), len(bins) + 1, figsize=(1.5 * (len(bins) + 1), 1.55 * len(shape_words)))
for i, w in enumerate(shape_words):
    for j, (lo, hi) in enumerate(bins + [(0, 1000)]):
        axes[i, j].imshow(maps.for_word(w, size=64, t_range=(lo, hi)), cmap="magma", vmin=0, vmax=1)
        axes[i, j].set_xticks([]); axes[i, j].set_yticks([])
        n_t = int(((maps.timesteps >= lo) & (maps.timesteps < hi)).sum())
        if i == 0:
            axes[i, j].set_title(f"t in [{lo}, {hi})\n{n_t} steps", fontsize=7)
    axes[i, 0].set_ylabel(w, fontsize=8)
fig.tight_layout(); plt.show()

# %% [markdown]
# On this scene the columns look much alike: each shape word's peak sits on its object in
# every range. The differences are small and show best as numbers: for each word and range,
# the IoU of the map's mask (above half its peak) with the object's true mask, and the share
# of the map's total (normalised) attention that falls *outside* the object:

# %%
from conceptlab.masks import iou

print(f"{'':>9}" + "".join(f"{f't {lo}-{hi}':>13}" for lo, hi in bins + [(0, 1000)]))
for k, w in enumerate(shape_words):
    gt_k = sc.masks[k + 1]
    cells = []
    for lo, hi in bins + [(0, 1000)]:
        a = maps.for_word(w, size=64, t_range=(lo, hi)).numpy()
        cells.append(f"{iou(a >= 0.5, gt_k):.2f} / {a[~gt_k].sum() / a.sum():.2f}")
    print(f"{w:>9}" + "".join(f"{c:>13}" for c in cells))
print("(IoU / share of attention outside the object)")

# %% [markdown]
# The peak is in the same place in every range, and for the star and the triangle the IoU
# hardly moves. What changes at $t \ge 750$ is the attention *away* from the object: the
# share outside grows sharply for the star and the triangle (more than half of it lies
# outside them), as faint stray patches that the min-max colour scale of the figure barely
# shows; the circle's map also spreads and its IoU drops. Even at low $t$ a fair share lies
# outside the object: a 16x16 map, upsampled, has soft edges. One scene is one example;
# section 6 measures this on 30.
#
# ## 6. Measured: which layers and timesteps localise best?
# Looking at one image proves little. We measure on **30 held-out scenes** (seeds
# $\ge 10^6$, never used in training; 1-3 objects each): for every object, take the map of
# its **shape word**, upsample to 64x64, min-max normalise, threshold at 0.5, and compute
# the IoU with the object's ground-truth mask. We do this per layer resolution (16x16,
# 8x8, all layers) and per timestep range, from one set of 40 timesteps per scene.
#
# Two baselines that know nothing about the words tell us what a number means:
# - **disc**: a centred disc of radius 0.2 x the image (objects are often near the centre);
# - **union**: the union of *all* objects' true masks (perfect object-vs-background, but
#   no idea which object is which).

# %%
from conceptlab.masks import iou

def shape_word_ious(pipe, n_scenes=30, first_seed=1_000_000, n_timesteps=40):
    S = 64
    yy, xx = np.mgrid[0:S, 0:S]
    disc = (xx - (S - 1) / 2) ** 2 + (yy - (S - 1) / 2) ** 2 < (0.2 * S) ** 2
    settings = [(res, b) for res in (16, 8, "all") for b in bins + [(0, 1000)]]
    out = {s: [] for s in settings} | {"disc": [], "union": []}
    for i in range(n_scenes):
        s = world.render_scene(world.sample_scene(seed=first_seed + i))
        m = attention_maps(pipe, s.image, s.caption, n_timesteps=n_timesteps, seed=i,
                           layers="all", t_range=(0, 1000))
        for k, obj in enumerate(s.spec.objects):
            gt = s.masks[k + 1]
            out["disc"].append(iou(disc, gt))
            out["union"].append(iou(s.masks[1:].any(0), gt))
            for res, (lo, hi) in settings:
                a = m.for_word(obj.shape, size=S, layers=res, t_range=(lo, hi))
                out[(res, (lo, hi))].append(iou((a >= 0.5).numpy(), gt))
    return {k: float(np.mean(v)) for k, v in out.items()}, len(out["disc"])

result, n_objects = shape_word_ious(pipe)
print(f"{n_objects} objects in 30 held-out scenes: mean IoU of the shape word's map")
print("layers  " + "".join(f"{f't {lo}-{hi}':>12}" for lo, hi in bins + [(0, 1000)]))
for res in (16, 8, "all"):
    print(f"{str(res):>6}  " + "".join(f"{result[(res, b)]:>12.2f}" for b in bins + [(0, 1000)]))
print(f"baselines: centred disc {result['disc']:.2f}, union of all objects {result['union']:.2f}")

# %%
fig, ax = plt.subplots(figsize=(7, 2.8))
labels = [f"{lo}-{hi}" for lo, hi in bins + [(0, 1000)]]
for j, res in enumerate((16, 8, "all")):
    ax.bar(np.arange(5) + 0.27 * (j - 1), [result[(res, b)] for b in bins + [(0, 1000)]], 0.27,
           label=f"{res}x{res} layers" if res != "all" else "all layers")
ax.axhline(result["disc"], ls="--", c="gray", label="centred disc")
ax.axhline(result["union"], ls=":", c="k", label="union of objects")
ax.set_xticks(range(5), labels); ax.set_xlabel("timestep range"); ax.set_ylabel("mean IoU")
ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1)); fig.tight_layout(); plt.show()

# %% [markdown]
# What the numbers say:
# - the **16x16 layers** localise better than the 8x8 ones: one cell of an 8x8 map covers
#   8x8 image pixels, about the size of a small object, so upsampled 8x8 maps are blobs.
#   Adding the 8x8 layers to the 16x16 ones ("all") changes little. This is why
#   Break-a-Scene uses Stable Diffusion's 16x16 layers (its 64x64 layers are noisy, its
#   8x8 ones too coarse);
# - **low timesteps** localise best and the noisiest ones worst: at $t \ge 750$ there is
#   little image left to look at (and, see the note below, this model was taught to ground
#   words only at $t < 750$). Yet the average over *all* timesteps is close to the best
#   range: averaging many noisy views cancels the noise of single ones, which is why the
#   method averages over ~50 random $t$ (exercise 3 measures how fast that pays off);
# - the shape word beats both baselines, including the union of all objects: the map
#   knows *which* object the word names, not only where objects are.
#
# The library's default for a pipeline (`default_attention_config`) is what the mask
# estimation of notebooks 02-05 uses; for the bundled model it is stored with the model
# (`conceptlab.json`, chosen by the benchmark on other held-out scenes):

# %%
cfg = default_attention_config(pipe)
print("default layers:", sorted({res_of[n] for n in cfg["layers"]}), "x", len(cfg["layers"]),
      "layers;  t_range:", cfg["t_range"])

# %%
# NBVAL_CHECK_OUTPUT
best = max((v, k) for k, v in result.items() if isinstance(k, tuple))[0]
print("16x16 beats 8x8 (all t):", result[(16, (0, 1000))] > result[(8, (0, 1000))])
print("best setting beats both baselines:", best > max(result["disc"], result["union"]))
print("t < 250 beats t >= 750 (16x16):", result[(16, (0, 250))] > result[(16, (750, 1000))])

# %% [markdown]
# ### An honest note on this model
# Stable Diffusion learns word-localising attention from billions of captioned images. A
# model trained for a few hours on a CPU does not, so the bundled model was trained with an
# extra **attention-grounding loss** that uses the renderer's exact masks (see its model
# card, `data/models/shapes-ldm/README.md`): what you see above was partly *taught*. The
# same recipe trained **without** that loss (the control in the card) localises clearly
# worse. The loss was applied only at timesteps $t < 750$ (`grounding_tmax` in the model's
# `train_config.json`), which is part of why the noisiest range above localises so poorly.
# The method of notebooks 03-05 never sees a ground-truth mask, and on Stable Diffusion the
# same code works on attention learned from data.

# %%
import json
train_config = os.path.join(pipe.name_or_path, "train_config.json")
if os.path.isfile(train_config):              # the bundled model (not Stable Diffusion)
    tc = json.load(open(train_config))
    print("grounding loss weight:", tc["grounding_weight"], "| applied at t <", tc["grounding_tmax"])
quality = os.path.join(pipe.name_or_path, "quality.json")
if os.path.isfile(quality):
    q = json.load(open(quality))
    print(f"model card: best shape-word IoU {q['localisation']['best']['iou']:.2f} "
          f"(layers {q['localisation']['best']['res']}, t {q['localisation']['best']['bin']})")
    if "control" in q:
        print(f"control without the grounding loss: {q['control']['localisation']['best']['iou']:.2f}", end="")
        if "control_peer" in q:
            print(f" (the grounded model after as many training steps: "
                  f"{q['control_peer']['localisation']['best']['iou']:.2f})", end="")
        print()
else:
    print("no quality.json next to this model: see its model card")

# %% [markdown]
# ## 7. Explore
# Pick a word, a layer and a timestep (index into `maps.timesteps`, or "all").

# %%
# NBVAL_IGNORE_OUTPUT
from conceptlab.viz.widgets import attention_explorer, attention_view

explorer = attention_explorer(sc.image, maps, words=shape_words + [w for w in words if w not in shape_words])
explorer

# %% [markdown]
# The explorer at its default values (the first shape word, all layers, all timesteps),
# as a static figure:

# %%
v = attention_view(maps, shape_words[0])
fig = image_row([sc.image, v["map"], overlay_map(sc.image, v["map"])],
                ["image", f"'{shape_words[0]}' (all t)", "overlay"], scale=2.0, cmap="magma")
plt.show()

# %% [markdown]
# ## Summary
# - A cross-attention layer computes $P = \mathrm{softmax}(QK^\top/\sqrt d)$ over the
#   prompt's tokens for every pixel; the column of word $j$, on the image grid, is its
#   attention map. The course's U-Net computes exactly that (checked by hand above).
# - `record_attention` hooks every `attn2` through `unet.set_attn_processor`, keeps $P$,
#   and restores the model's processors on exit without changing its output.
# - Most of each pixel's attention goes to padding tokens, so every word's map is
#   normalised on its own before it is compared or thresholded.
# - Measured on held-out scenes, the 16x16 layers and the low timesteps localise shape
#   words best, and an average over many timesteps comes close to the best range; the shape
#   word beats both word-blind baselines. This bundled model was *taught* to localise
#   (the grounding loss); Stable Diffusion learns it from data.
#
# ## Exercises
# 1. **Heads.** `store.maps[name][0]` keeps the 4 heads of the layer of section 3. Plot the
#    map of one shape word for each head. Do the heads agree?
# 2. **Colour or shape?** Repeat the measurement of section 6 (with the model's default
#    layers and timesteps) for the *colour* word of each object instead of its shape word,
#    on 10 scenes. Which word localises better?
# 3. **How many timesteps?** With the 16x16 layers and timesteps drawn from the full range
#    $[0, 1000)$, compute the mean shape-word IoU on 8 held-out scenes for `n_timesteps` =
#    1, 4 and 16. How fast does averaging pay off? What changes with `t_range=(0, 250)`?
# 4. **Softmax over what?** In the toy of section 1, what happens to the map of "square" if
#    you take the softmax over *pixels* (`dim=0`) instead of tokens? What does a column
#    then mean?
# 5. **Why divide by $\sqrt d$? (derivation)** Let the $d$ entries of a query $q$ and a key
#    $k$ be independent, with mean 0 and variance 1. Derive the mean and the variance of the
#    logit $q \cdot k$, and of $q \cdot k / \sqrt d$. What would happen to the softmax of
#    section 1 for large $d$ without the division? Check the variances numerically for
#    $d$ = 16 (this model's head size) and $d$ = 64.

# %% jupyter={"outputs_hidden": true, "source_hidden": true} tags=["solution"]
# Solution 1: one map per head, each scaled to its own maximum, and two numbers per head:
# the share of the head's attention to the word that falls inside the object (its true
# mask, on the 16x16 grid) and its correlation with the average of the heads.
tok = maps.word_indices(shape_words[0])[0]
per_head = P_lib[0, ..., tok]                               # (heads, 16, 16)
gt16 = sc.masks[1].reshape(16, 4, 16, 4).mean((1, 3)) > 0.5  # the object, on the 16x16 grid
mean_map = per_head.mean(0).flatten()
for i, m in enumerate(per_head):
    inside = float(m[torch.from_numpy(gt16)].sum() / m.sum())
    corr = float(torch.corrcoef(torch.stack([m.flatten(), mean_map]))[0, 1])
    print(f"head {i}: {inside:.2f} of its attention inside the {shape_words[0]}, "
          f"correlation with the mean of the heads {corr:.2f}")
fig = image_row([sc.image] + [m for m in per_head],
                ["image"] + [f"head {i}" for i in range(len(per_head))], cmap="magma")
plt.show()
# The four heads agree on where the star is (each correlates strongly with their mean), but
# not on how tightly: heads 0 and 1 put nearly all their attention to the word inside the
# star, heads 2 and 3 spread a third or a quarter of it around. The average keeps the
# shared peak.

# %% jupyter={"outputs_hidden": true, "source_hidden": true} tags=["solution"]
# Solution 2: colour words vs shape words (one set of maps per scene serves both)
vals = {"colour": [], "shape": []}
prec = {"colour": [], "shape": []}          # share of the predicted mask inside the object
rec = {"colour": [], "shape": []}           # share of the object the predicted mask covers
for i in range(10):
    s = world.render_scene(world.sample_scene(seed=1_000_000 + i))
    m = attention_maps(pipe, s.image, s.caption, n_timesteps=8, seed=i)   # default layers / t
    for k, o in enumerate(s.spec.objects):
        gt_k = s.masks[k + 1]
        for kind, w in (("colour", o.colour), ("shape", o.shape)):
            pred = (m.for_word(w, size=64) >= 0.5).numpy()
            vals[kind].append(iou(pred, gt_k))
            prec[kind].append((pred & gt_k).sum() / max(pred.sum(), 1))
            rec[kind].append((pred & gt_k).sum() / gt_k.sum())
for kind, v in vals.items():
    print(f"{kind} words: mean IoU {np.mean(v):.2f}, inside the object "
          f"{np.mean(prec[kind]):.2f}, object covered {np.mean(rec[kind]):.2f}")
# The shape word is the better handle on an object in this model. A colour word's mask is
# in the right place (all of it inside the object) but covers only about a fifth of the
# object: its map is sharply peaked on a small part, so "above half the peak" is small.

# %% jupyter={"outputs_hidden": true, "source_hidden": true} tags=["solution"]
# Solution 3: the same 8 scenes, timesteps drawn from the full range and from [0, 250)
scenes3 = [world.render_scene(world.sample_scene(seed=1_000_000 + i)) for i in range(8)]
for t_range in ((0, 1000), (0, 250)):
    for n_t in (1, 4, 16):
        vals = []
        for i, s in enumerate(scenes3):
            m = attention_maps(pipe, s.image, s.caption, n_timesteps=n_t, seed=i, layers=16,
                               t_range=t_range)
            vals += [iou((m.for_word(o.shape, size=64) >= 0.5).numpy(), s.masks[k + 1])
                     for k, o in enumerate(s.spec.objects)]
        print(f"t_range={t_range}, n_timesteps={n_t:>2}: mean IoU {np.mean(vals):.2f}")
# Over the full range one random timestep is often a noisy one and the IoU is poor; 4
# averaged recover most of it and 16 nearly all. With t_range=(0, 250), the model's
# default, every draw is a low-noise timestep: a single one already gives the best IoU,
# and more add nothing here.

# %% jupyter={"outputs_hidden": true, "source_hidden": true} tags=["solution"]
# Solution 4: softmax over pixels makes each *column* a distribution over the image:
# "where does this word send its value", not "what does this pixel read". Every word,
# even "<start>", then has a map summing to 1, and the competition between words is gone.
P_pix = torch.softmax(Q @ K.T / D**0.5, dim=0)
print("each column sums to 1:", bool(torch.allclose(P_pix.sum(0), torch.ones(T))))
fig = image_row([P_pix[:, j].reshape(8, 8) for j in range(T)], tokens, cmap="magma")
plt.show()

# %% [markdown] jupyter={"source_hidden": true} tags=["solution"]
# **Solution 5.** With $q \cdot k = \sum_{i=1}^{d} q_i k_i$ and $q_i$, $k_i$ independent:
# $\mathbb E[q_i k_i] = \mathbb E[q_i]\,\mathbb E[k_i] = 0$ and
# $\mathrm{Var}[q_i k_i] = \mathbb E[q_i^2]\,\mathbb E[k_i^2] - 0 = 1$. The $d$ terms are
# independent, so
#
# $$\mathbb E[q\cdot k] = 0,\qquad \mathrm{Var}[q \cdot k] = d,\qquad
#   \mathrm{Var}\big[q \cdot k / \sqrt d\big] = d / d = 1 .$$
#
# Without the division the logits' spread grows like $\sqrt d$; the softmax of widely
# spread logits puts almost all of a pixel's probability on its single largest logit (it
# saturates into an argmax), its gradients vanish, and the maps turn into hard, noisy
# one-hot choices. Dividing by $\sqrt d$ keeps the logits at unit scale whatever the head
# size.

# %% jupyter={"outputs_hidden": true, "source_hidden": true} tags=["solution"]
# Solution 5, checked: variance of the logits, and how peaked the softmax over 32 tokens gets
gen = torch.Generator().manual_seed(0)
for d_head in (16, 64):
    q5, k5 = torch.randn(5000, d_head, generator=gen), torch.randn(5000, 32, d_head, generator=gen)
    logits = (q5[:, None, :] * k5).sum(-1)                            # (5000 pixels, 32 tokens)
    for name5, z in (("q.k", logits), ("q.k / sqrt(d)", logits / d_head**0.5)):
        top = torch.softmax(z, -1).max(-1).values.mean()
        print(f"d = {d_head:>2}, {name5:<13}: variance {z.var():6.2f}, "
              f"mean largest softmax probability {top:.2f}")


# %% [markdown]
# ## References
# - Rahman, Mahajan, Lee, Ren, Tulyakov, Sigal. *Visual Concept-driven Image Generation with
#   Text-to-Image Diffusion Models* (the EM method of this course). arXiv:2402.11487.
# - Avrahami, Aberman, Fried, Cohen-Or, Lischinski. *Break-a-Scene: Extracting Multiple
#   Concepts from a Single Image*. SIGGRAPH Asia 2023. arXiv:2305.16311.
# - Gal, Alaluf, Atzmon, Patashnik, Bermano, Chechik, Cohen-Or. *An Image is Worth One Word:
#   Personalizing Text-to-Image Generation using Textual Inversion*. arXiv:2208.01618.
# - Kraehenbuehl, Koltun. *Efficient Inference in Fully Connected CRFs with Gaussian Edge
#   Potentials*. NeurIPS 2011. arXiv:1210.5644.
# - Wang et al. *TokenCompose: Grounding Diffusion with Token-level Supervision*: the idea
#   behind the grounding loss the bundled model was trained with. arXiv:2312.03626.
#
# The equations and hyper-parameters of the course, with their scales, on one page:
# `docs/cheatsheet.md`.
