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
# # 05 · EM: learning concepts *and* their masks, without user masks
#
# **What you will learn**
# - why Break-a-Scene needs masks, and how the EM idea removes that need;
# - what can go wrong when a model's own attention decides where it learns (a
#   self-confirming loop), and how the DenseCRF's image evidence breaks it;
# - to run `learn_concepts` step by step, watch the masks improve, and measure it;
# - to reproduce the paper's Figure 3 (mask IoU over training: EM vs fixed masks).
#
# **Prerequisites**: notebooks 01-04 (attention maps, CRF masks, concept tokens, the masked
# and cross-attention losses). **Runtime**: about 3 minutes on a 2-core CPU.
#
# ## The idea
# Break-a-Scene (notebook 04) learns a token per concept from **given** masks $M_i$:
#
# $$\mathcal{L} = \big\| M_s \odot (\epsilon - \epsilon_\theta(z_t, t, p_s)) \big\|^2
#   + \lambda \sum_{i \in s} \big\| A_i / \max A_i - M_i \big\|^2 .$$
#
# Without masks, treat them as hidden variables and alternate, as in EM:
#
# - **E-step** (model frozen): with the prompt "a photo of [v1] and [v2] and [v3]", average
#   each token's cross-attention map over many noise levels; normalise; give every pixel to
#   the token that attends to it most, or to *nothing* if no token beats a threshold; snap
#   the result to the image's edges with a DenseCRF. These are the masks $M_i$.
# - **M-step**: a few hundred steps of the loss above with those masks.
# - Repeat: better tokens give sharper attention, which gives better masks, which give
#   better tokens.
#
# **What could go wrong.** The E-step reads the tokens' own attention, and the M-step trains
# the tokens to attend exactly there: a token that starts out looking at the wrong place is
# *rewarded* for it. Alone, the loop can only confirm itself. The CRF brings in evidence the
# tokens do not have, the image's colours and edges: a mask that covers half of a red star
# grows to the whole star, because the star's pixels look alike. That is why the paper
# refines with a CRF rather than thresholding, and why the initial class word matters.

# %%
import numpy as np
import torch
import matplotlib.pyplot as plt
from conceptlab import load_pipeline, learn_concepts, generate
from conceptlab.estep import MaskConfig, estimate_masks
from conceptlab.shapes.examples import load_example
from conceptlab.viz.figures import image_grid_figure, overlay_masks, overlay_map
from conceptlab.train import TrainConfig

import warnings
# the library warns when an E-step gives an empty mask; show those warnings in one line
warnings.formatwarning = lambda message, category, *args, **kwargs: f"{category.__name__}: {message}\n"

torch.set_num_threads(2)
pipe = load_pipeline()
ex = load_example("striped-star-and-heart")
print(ex.concepts, "| class words:", ex.init_words)

# %% [markdown]
# ## 1. One E-step by hand
# Three new tokens, initialised from the class words `star`, `heart`, `background`. Their
# attention maps, the argmax with a background channel, and the CRF-refined masks.
#
# **The background concept is special.** A token that means "the background" does not
# attend to the background the way a shape token attends to its shape: look at the third
# map below, which is weak and diffuse. If it had to win pixels by its own attention it
# would get almost none. So the background concept takes the assignment's *background
# channel*: the object tokens compete (argmax against the threshold, then the CRF) and
# every pixel no object claims goes to it. `learn_concepts` does this for the concept whose
# init word is "background" (`MaskConfig.background_word`); `background=2` below does it by
# hand. (On the 20-scene suite of section 4 this one rule lifted the background's step-0
# IoU from about 0.1 to about 0.9.)

# %%
from conceptlab.tokens import add_concept_tokens

tokens = add_concept_tokens(pipe, ["[a1]", "[a2]", "[a3]"], ex.init_words)
est = estimate_masks(pipe, ex.image, tokens.names, seed=0, background=2)
own = estimate_masks(pipe, ex.image, tokens.names, seed=0)   # background by its own map
print(est.prompt, "| CRF backend:", est.crf_backend)
print(f"background mask covers {est.masks[2].mean():.2f} of the image "
      f"(by its own attention it would cover {own.masks[2].mean():.2f}; truth "
      f"{ex.masks[2].mean():.2f})")
fig = image_grid_figure(
    [[ex.image] + [overlay_map(ex.image, m / m.max()) for m in est.maps],
     [ex.image, overlay_masks(ex.image, est.masks_no_crf), overlay_masks(ex.image, est.masks),
      overlay_masks(ex.image, ex.masks)]],
    col_titles=["image", "[a1] attention", "[a2] attention", "[a3] attention"], scale=1.8)
fig.axes[5].set_title("argmax + background", fontsize=8)
fig.axes[6].set_title("+ DenseCRF", fontsize=8)
fig.axes[7].set_title("ground truth (eval only)", fontsize=8)
plt.show()

# %% [markdown]
# The E-step has knobs: the background threshold of the assignment, and the CRF's kernel
# widths, weights and iterations. Move the sliders (notebook 02 explains each) on the two
# object tokens' maps; the static figure above is what the defaults give.

# %%
from conceptlab.viz.widgets import crf_explorer

crf_explorer(ex.image, est.maps[:2], ex.masks[:2])

# %%
# NBVAL_CHECK_OUTPUT
from conceptlab.masks import iou

ious0 = [iou(est.masks[k], ex.masks[k]) for k in range(3)]
print("masks disjoint:", not (est.masks.sum(0) > 1).any())
print("step-0 IoU above 0.3 for every concept:", all(v > 0.3 for v in ious0))

# %%
print("step-0 IoU per concept:", [round(float(v), 2) for v in ious0])

# %% [markdown]
# ## 2. The full alternation
# `learn_concepts` runs E-step, M-step, E-step, ... (here an E-step every quarter of the
# run and a last one at the end). The ground-truth masks are passed **for evaluation only**:
# they are scored at every E-step and never used for training.
#
#
# The training settings are the course preset for EM on this model,
# `TrainConfig.for_model(pipe, "em")`: notebook 04's preset with a **10x weaker
# cross-attention loss** (`lambda_attn` 0.1 instead of 1.0). Section 4 shows why: with
# the strong loss, EM cannot move its masks. Here 160 steps, to fit the notebook's budget.

# %%
cfg = TrainConfig.for_model(pipe, "em", steps=160)
print(f"lambda_attn {cfg.lambda_attn}, {cfg.steps} steps, batch {cfg.batch_size}, lr {cfg.lr}")
concepts = learn_concepts(pipe, ex.image, ex.init_words, method="em", config=cfg,
                          seed=0, progress=False, gt_masks=ex.masks)
print("E-steps at", concepts.e_steps, "| training steps:", cfg.total_steps)
for s, row in zip(concepts.e_steps, concepts.iou_history):
    print(f"step {s:>4}: IoU " + "  ".join(f"{n} {v:.2f}" for n, v in zip(concepts.names, row)))

# %%
fig = concepts.plot_mask_evolution()
plt.show()

# %% [markdown]
# **Read the figure critically: on this image the masks do not change.** Every E-step
# hands back the step-0 masks (the IoUs above are identical at every step). The heart
# and the background are solid-coloured and were nearly exact from the start. The striped
# star is the hard case, and EM does not fix it: the CRF's appearance kernel groups pixels
# *by colour*, so the star's white stripes go with the pale background, and the mask keeps
# only the blue stripes (IoU 0.35). The slightly better tokens after training still point
# at the same blue pixels, and the CRF snaps them to the same regions again: the loop has
# nothing new to confirm. A colour-based CRF cannot know that two colours form one object;
# the attention has to carry that, and this small model's attention for a concept it never
# saw is coarse.

# %%
fig = concepts.history.plot()
plt.show()

# %% [markdown]
# ### Where re-estimating pays off
# The first scene of the EM suite of section 4: a red square with dots and a green circle
# with stripes on grass, two particular patterned instances. Same method, the suite's
# shorter settings (80 steps of batch 2), EM against the fixed masks:

# %%
from conceptlab.shapes.suites import suite_scenes

scene = suite_scenes(1)[0]
scene_gt = np.concatenate([scene.masks[1:], scene.masks[:1]])     # objects, then background
scene_words = [o.shape for o in scene.spec.objects] + ["background"]
suite_cfg = TrainConfig.for_model(pipe, "em", steps=80, batch_size=2)
runs = {m: learn_concepts(pipe, scene.image, scene_words, method=m, config=suite_cfg, seed=0,
                          progress=False, gt_masks=[scene_gt], token_prefix="s" + m[0])
        for m in ("em", "fixed")}
print(scene.caption)
print("IoU of the masks EM trains on, per E-step:")
for s_, row in zip(runs["em"].e_steps, runs["em"].iou_history):
    print(f"  step {s_:>3}: " + "  ".join(f"{w} {v:.2f}" for w, v in zip(scene_words, row)))
print("mean IoU of the masks the tokens' attention gives, at steps", runs["em"].eval_steps)
for m, c in runs.items():
    print(f"  {m:<5}" + "".join(f"{np.mean(r):>6.2f}" for r in c.eval_iou_history))

# %%
fig = runs["em"].plot_mask_evolution()
plt.show()

# %% [markdown]
# At step 0 the square's token attends to a small part of the square (IoU 0.13): the
# dotted pattern is new to the model. After one M-step on that small mask, its attention
# covers the whole square, and the second E-step, with the CRF, returns an almost exact
# mask (0.95); EM keeps it. The fixed-mask run keeps training on the step-0 mask, and its
# tokens' attention gets *worse* (0.62 -> 0.32): it learns exactly what it was given. The
# circle is lost by both (IoU 0): its token never looks at it, and no alternation
# recovers an object whose token never attends to it.

# %% [markdown]
# ## 3. The learned concepts in new prompts
# The masks are not needed any more: the tokens alone carry the concepts.

# %%
names = concepts.names
prompts = [f"a photo of {names[0]}", f"a photo of {names[1]} and {names[0]}",
           f"a photo of {names[0]} on a gray background",
           f"a photo of {names[1]} and a yellow circle on {names[2]}"]
rows = [generate(pipe, concepts.tokens, p, n=6, seed=0, output_type="np") for p in prompts]
fig = image_grid_figure(rows, row_titles=prompts, scale=1.2)
plt.show()

# %% [markdown]
# How faithful are they? The course's shape/colour classifier judges the concept's colour
# and shape in the single-concept generations (the stripes are not judged: the classifier
# reads an object's main colour and its shape, and "blue" is the star's main colour).

# %%
from conceptlab.shapes.judge import judge

star = ex.concepts[0].split()  # "blue star with white stripes"
verdict = judge(rows[0], [[(star[0], star[1])]] * len(rows[0]))
print(f"'{prompts[0]}': colour {np.mean([v['colour_ok'] for v in verdict]):.2f}, "
      f"shape {np.mean([v['shape_ok'] for v in verdict]):.2f} of {len(rows[0])} images")

# %% [markdown]
# The star's token draws something the classifier calls a star in most samples, and its
# blue in none: the token learned from a mask that held only the blue stripes *and* from
# a 16x16 attention that mixes in the white ones, and this model has no word for "blue
# with white stripes". Concept fidelity on this model is measured over 11 concepts in
# `benchmarks/concept_fidelity.py` (notebook 04 and the README).

# %% [markdown]
# ## 4. EM vs fixed masks (the paper's Figure 3)
# The baseline estimates masks once, at step 0, and trains on them to the end. Does
# re-estimating help? `benchmarks/em_suite.py` learns the concepts of held-out scenes
# (2-3 objects, patterned ones included, plus the background) three times each: EM, fixed
# masks, and the ground-truth masks (Break-a-Scene, the oracle). At every E-step time it
# scores the masks the tokens' attention gives (+CRF) against the ground truth. It takes
# longer than a notebook should, so here we read the table and figure it saved (with the
# command that made them).

# %% [markdown]
# First the small version, on our image: the same run with `method="fixed"` (step-0 masks
# kept to the end). Both runs are scored the same way at the same steps: the masks that
# the tokens' attention (+CRF) gives, against the ground truth.

# %%
fixed = learn_concepts(pipe, ex.image, ex.init_words, method="fixed", config=cfg, seed=0,
                       progress=False, gt_masks=ex.masks, token_prefix="f")
print("step " + "".join(f"{s:>7}" for s in concepts.eval_steps))
for name, c in (("em", concepts), ("fixed", fixed)):
    print(f"{name:<5}" + "".join(f"{np.mean(r):>7.2f}" for r in c.eval_iou_history))

# %% [markdown]
# One image says little: the suite has 20. `benchmarks/em_suite.py` saved its table and
# figure with the command that made them. It runs EM's preset (`lambda_attn` 0.1) for all
# three methods, 80 steps of batch 2 per run (shorter than the notebook's run, to fit 60
# runs in about 20 CPU-minutes).

# %%
import json, os
from IPython.display import Image as ShowImage, display

results = os.path.join("..", "benchmarks", "results")


def load_suite(name):
    with open(os.path.join(results, name)) as f:
        return json.load(f)


from conceptlab.models import weights_fingerprint

full = load_suite("em_suite.json")
summ = full["summary"]
print("made by:", full["command"], "|", full["n_scenes"], "of", full["n_planned"], "scenes")
print("measured on the model this notebook runs:", full.get("model") == weights_fingerprint(pipe))
print("mean IoU at steps", summ["em"]["steps"])
for m in ("em", "fixed", "given"):
    s = summ[m]
    print(f"{m:>6}: " + " ".join(f"{v:.2f}" for v in s["mean"])
          + f" | final {s['final']:.2f} | {s['seconds_per_run']:.0f} s per run")
em_f = np.array(full["per_scene"]["em"]["eval_iou"])[:, -1]
fx_f = np.array(full["per_scene"]["fixed"]["eval_iou"])[:, -1]
d = em_f - fx_f
print(f"EM ends above fixed on {int((d > 0).sum())} of {len(d)} scenes, within 0.01 on "
      f"{int((abs(d) < 0.01).sum())}, more than 0.05 below on {int((d < -0.05).sum())}; "
      f"EM final >= 0.6 on {int((em_f >= 0.6).sum())} scenes")
display(ShowImage(os.path.join(results, "em_suite.png")))

# %% [markdown]
# **What the suite says.** On average EM and the fixed masks end level (0.51 each), far
# below the given-mask ceiling (0.67). Scene by scene, EM ends clearly above the fixed
# masks on some scenes (like the one above) and clearly below on about as many, and on
# half of them the two end within 0.01: the loop changed nothing. The paper's result (EM
# well above fixed masks, close to the ceiling) is **not reproduced** on this model, and
# its goal (EM >= 0.6) is not reached. The main reason is the step 0: this small model's
# coarse (16x16) attention for patterned objects it never saw often lands on the wrong
# object or on nothing, and no alternation recovers an object whose token never attends to
# it (the circle above).
#
# ### Why the weak attention loss? The ablation
# The same suite with one thing changed at a time (`benchmarks/results/em_ablation_*.json`;
# the shorter ones ran the first 8 scenes, so all rows compare those 8):

# %%
settings = [("lambda 0.1 (EM preset)", "em_suite.json"),
            ("lambda 1.0 (notebook 04 preset)", "em_ablation_lambda1.json"),
            ("lambda 0 (no attention loss)", "em_ablation_lambda0.json"),
            ("lambda 0.1, no CRF", "em_ablation_nocrf_lambda0.1.json")]
print(f"{'setting (first 8 scenes)':<34}{'EM':>6}{'fixed':>7}{'given':>7}{'EM > fixed':>12}")
for name, fname in settings:
    if not os.path.exists(os.path.join(results, fname)):
        continue
    per = load_suite(fname)["per_scene"]
    fin = {m: np.array(v["eval_iou"])[:8, -1] for m, v in per.items()}
    given = f"{fin['given'].mean():>7.2f}" if "given" in fin else f"{'':>7}"
    print(f"{name:<34}{fin['em'].mean():>6.2f}{fin['fixed'].mean():>7.2f}{given}"
          f"{int((fin['em'] > fin['fixed']).sum()):>8} of 8")

# %% [markdown]
# How the strong loss fails, scene by scene, in the 20-scene run with `lambda_attn` 1.0:

# %%
strong = load_suite("em_ablation_lambda1.json")["per_scene"]
e1 = np.array(strong["em"]["eval_iou"])[:, -1]
f1 = np.array(strong["fixed"]["eval_iou"])[:, -1]
d1 = e1 - f1
print(f"lambda 1.0, 20 scenes: EM {e1.mean():.2f}, fixed {f1.mean():.2f}; EM and fixed end "
      f"within 0.01 on {int((abs(d1) < 0.01).sum())} scenes, EM more than 0.05 lower on "
      f"{int((d1 < -0.05).sum())}, higher on {int((d1 > 0.05).sum())}")
for i in np.flatnonzero(d1 < -0.05):
    pe = np.array(strong["em"]["per_concept"][i])
    pf = np.array(strong["fixed"]["per_concept"][i])
    k = int(np.argmax(pf[-1] - pe[-1]))            # the concept EM lost most on
    print(f"  scene {i + 1:>2}, concept {k + 1}: EM {pe[0, k]:.2f} -> {pe[-1, k]:.2f}, "
          f"fixed {pf[0, k]:.2f} -> {pf[-1, k]:.2f}")

# %% [markdown]
# Two failure modes, both the self-confirming loop of the introduction:
#
# - **the loop confirms itself exactly.** With a strong cross-attention loss each token's
#   attention becomes a copy of the mask it was trained on, so the next E-step hands back
#   the same masks: EM and fixed end the same;
# - **an E-step error is locked in.** Where an E-step loses most of an object (lines
#   above), the next M-step trains the token to attend to the smaller region, and nothing
#   brings the rest back. Fixed masks never re-estimate, so they never lose it.
#
# Without the attention loss (lambda 0) nothing ties a token to any region at all, and
# EM drifts far worse. In between, the masked *diffusion* loss, which sees the pixels, can
# move the tokens while the attention loss keeps them near their masks: that is the
# setting where re-estimating helps. And the CRF's image evidence is part of what makes
# it help: without the CRF, at the same lambda, EM no longer ends above the fixed masks.

# %% [markdown]
# ## Exercises
# 1. Initialise every token from the same word (`["shape", "shape", "background"]`). What
#    happens at the first E-step, and why? (Hint: identical embeddings give identical maps.)
# 2. Turn the CRF off (`MaskConfig(crf=False)`) and rerun section 2. Does EM still improve
#    the masks?
# 3. Learn the concepts of `three-objects` (four concepts). Which concept is hardest, and
#    does the IoU history tell you why?

# %% jupyter={"source_hidden": true} tags=["solution"]
# Solution sketch for exercise 2
no_crf = learn_concepts(pipe, ex.image, ex.init_words, config=cfg.replace(steps=80), seed=0, progress=False,
                        gt_masks=ex.masks, mask_config=MaskConfig(crf=False),
                        token_prefix="nocrf")
for s, row in zip(no_crf.e_steps, no_crf.iou_history):
    print(f"step {s:>4}: mean IoU without CRF {np.mean(row):.2f}")
