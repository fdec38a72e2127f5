"""Learning concept tokens AND their masks together, without user masks (the EM method).

    learned = learn_concepts(pipe, image, ["star", "heart", "background"])
    learned.masks[0]           # (K, H, W) bool, one mask per concept, found by the method
    generate(pipe, learned, "a photo of [v1] and [v2]")      # pipe itself is never changed

The alternation (``docs/cheatsheet.md``; notebook 05 writes it out by hand), a hard-EM /
coordinate ascent in which the masks are the latent variables:

- **E-step** (:func:`conceptlab.estep.estimate_all_masks`, model frozen): masks from each
  token's timestep-averaged cross-attention, assigned against a background channel and
  refined by a DenseCRF; an empty or full new mask keeps the previous one;
- **M-step** (:class:`conceptlab.train.ConceptTrainer`): train the tokens with the masked
  diffusion loss and the cross-attention loss on the current masks;
- repeat the E-step every ``em_every`` steps, and once more at the end of phase 1;
- with a phase 2 in the config (``TrainConfig.phase2``), the tokens and the U-Net are then
  trained together on those final masks (Break-a-Scene's second phase).

Without ``init_words`` the concepts are discovered first
(:func:`conceptlab.discovery.discover_concepts`: how many each image holds, and their masks):
every object token starts from the word its discovered concept's attention reads most
(:meth:`conceptlab.discovery.Discovery.top_words`), the background's from "background", and
EM starts from the discovered masks (``method="fixed"`` keeps them).
``discovery={"object_words": "shared"}`` starts every object token from one shared word
instead (:func:`shared_object_word`: the paper's setting; its concept fidelity is lower,
``docs/results.md``). Concepts of several images that look alike are named in the result's
``warnings``.

Baselines through the same call: ``method="fixed"`` (E-step once at step 0),
``method="given"`` (masks passed in: Break-a-Scene), ``method="none"`` (no masks: plain
textual inversion on the whole image, no attention loss).

The defaults follow how the tokens start (:meth:`TrainConfig.for_model`,
:meth:`MaskConfig.for_words`): class words use the paper's max-normalised attention loss
and the "max" E-step rule; tokens that start equal (one repeated word, or random rows) use
the BCE attention loss, the "centered" rule and a softer CRF, measured best there
(``docs/results.md``).

What is not the algorithm is a callback (:mod:`conceptlab.em_callbacks`): resumable runs
(``checkpoint_dir``) and evaluation against true masks (``GroundTruthIoU``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from .em_callbacks import Callbacks, Checkpoints, as_mask_list
from .estep import MaskConfig, e_step_schedule, estimate_all_masks
from .models import check_seed, native_size, to_uint8
from .result import LearnedConcepts
from .tokens import ConceptTokens, new_concepts
from .train import ConceptImage, ConceptTrainer, TrainConfig

METHODS = ("em", "fixed", "given", "none")


@dataclass
class Task:
    """The checked inputs: images, one init word per concept, which concepts each image
    shows, and the given masks (``method="given"``)."""

    images: list
    words: list
    concept_ids: list
    given_masks: list | None = None
    start_masks: list | None = None     # discovered concepts: the masks EM starts from

    def words_of(self, i: int) -> list:
        return [self.words[c] for c in self.concept_ids[i]]

    @property
    def words_per_image(self) -> list:
        return [self.words_of(i) for i in range(len(self.images))]


@dataclass
class EMRun:
    """The state of one :func:`learn_concepts` call, which the callbacks read and write."""

    pipe: object
    task: Task
    method: str
    config: TrainConfig
    mask_config: MaskConfig
    tokens: ConceptTokens
    em_every: int | None
    callbacks: Callbacks
    masks: list | None = None          # per image, the current (K_i, H, W) masks
    trainer: ConceptTrainer | None = None
    stops: set = field(default_factory=set)   # steps the loop must stop at (callbacks add)
    complete: bool = True

    def __post_init__(self):
        phase1 = self.config.steps if self.config.phase2 != "none" else self.config.total_steps
        self.schedule = e_step_schedule(phase1, self.em_every, self.method)
        if self.method == "em":
            self.schedule.append(phase1)  # the final masks: from the final tokens
        t = self.task
        self.result = LearnedConcepts(self.tokens, self.method, t.images, t.concept_ids, [])

    @property
    def tokens_per_image(self) -> list:
        return [[self.tokens.names[c] for c in ids] for ids in self.task.concept_ids]

    def data(self) -> list[ConceptImage]:
        return [ConceptImage(im, m, c) for im, m, c in
                zip(self.task.images, self.masks, self.task.concept_ids)]

    def e_step(self, step: int) -> list:
        """Masks of every image from the current tokens' attention."""
        return estimate_all_masks(self.pipe, self.task.images, self.tokens_per_image,
                                  self.task.words_per_image, self.mask_config, step=step,
                                  previous=self.masks, seed=self.config.seed,
                                  warn_list=self.result.warnings)

    def first_masks(self) -> list:
        if self.task.start_masks is not None:
            return self.task.start_masks
        if self.method == "given":
            return self.task.given_masks
        if self.method == "none":  # the whole image for every concept
            return [np.ones((len(c), *im.shape[:2]), bool)
                    for im, c in zip(self.task.images, self.task.concept_ids)]
        return self.e_step(0)

    def use_masks(self, step: int, masks: list):
        self.masks = masks
        self.result.e_steps.append(int(step))
        self.result.mask_history.append([m.copy() for m in masks])

    def next_stop(self, step: int) -> int:
        return min([s for s in {*self.schedule, *self.stops} if s > step]
                   + [self.config.total_steps])

    def finish(self) -> LearnedConcepts:
        r = self.result
        r.masks, r.history, r.complete = self.masks, self.trainer.history, self.complete
        if not self.complete:
            msg = (f"interrupted at step {self.trainer.step_count} of "
                   f"{self.config.total_steps}: the result is INCOMPLETE; call again (with "
                   "a checkpoint_dir) to resume")
            r.warnings.append(msg)
            warnings.warn(msg, stacklevel=3)
        return r


def learn_concepts(pipe, images, init_words=None, *, method: str = "em", masks=None,
                   concept_images=None, steps: int | None = None, em_every: int | None = None,
                   config: TrainConfig | None = None, mask_config: MaskConfig | None = None,
                   seed: int = 0, progress: bool = True, checkpoint_dir=None,
                   overwrite: bool = False, callbacks=(), resize: bool = False,
                   discovery: dict | None = None) -> LearnedConcepts:
    """Learn one token per concept (and, with ``method="em"``, its mask) from images.

    The pipeline is left exactly as it was: the tokens are applied only while learning.

    Args:
        pipe: a Stable-Diffusion-style pipeline (``load_pipeline``).
        images: one image or a list (path / PIL / (H, W, 3) array / tensor) at the model's
            size; another size is an error unless ``resize=True`` (resized, with a warning).
        init_words: one word per concept, e.g. ``["star", "heart", "background"]``; None
            entries start from a random row. The concept whose word is "background" gets
            every pixel no other concept claims. None (the default): the concepts of each
            image are discovered (the module doc).
        method: "em", "fixed", "given" or "none" (the module doc).
        masks: ``method="given"``: per image, (K_i, H, W) bool masks.
        concept_images: per image, the concept indices it shows (default: all in all).
        steps: training steps in all, split between the phases as the config splits them.
        em_every: steps between E-steps (default: a quarter of phase 1).
        config: training settings (default: :meth:`TrainConfig.for_model`).
        mask_config: E-step settings (default: :meth:`MaskConfig.for_words`).
        seed: seeds the rows, batches, noise and E-steps.
        progress: show a progress bar.
        checkpoint_dir: a folder that makes the run resumable
            (:class:`~conceptlab.em_callbacks.Checkpoints`); ``overwrite`` replaces another
            run there.
        callbacks: more :class:`~conceptlab.em_callbacks.Callback` objects, e.g.
            ``GroundTruthIoU(true_masks)``.
        resize: resize images of another size instead of refusing them.
        discovery: without ``init_words``, options of
            :func:`~conceptlab.discovery.discover_concepts` (e.g. ``{"threshold": 0.5}``),
            and ``"object_words"``: what the object tokens start from, one of
            `OBJECT_WORDS` (default ``"top"``, the word each concept's attention reads most;
            ``"shared"``: one shared word for all, the paper's setting).

    Returns:
        LearnedConcepts: the tokens, masks and history; ``.complete`` is False when the
            run was interrupted (Ctrl-C): call again with the same arguments to resume.
    """
    check_seed(seed)
    if init_words is None:
        task, notes = discovered_task(pipe, images, method, masks, concept_images, resize,
                                      seed, discovery)
    else:
        if discovery is not None:
            raise ValueError("discovery options are used only without init_words")
        task, notes = check_inputs(pipe, images, init_words, method, masks, concept_images,
                                   resize), []
    cfg, mcfg = choose_configs(pipe, task.words, method, config, mask_config, steps, seed)
    check_schedule(pipe, cfg, em_every, len(task.words))
    cbs = Callbacks([*callbacks, *([Checkpoints(checkpoint_dir, overwrite)]
                                   if checkpoint_dir else [])])
    run = EMRun(pipe, task, method, cfg, mcfg, new_concepts(pipe, len(task.words), task.words,
                                                            seed=seed), em_every, cbs)
    with run.tokens.applied(pipe):
        cbs.before_fit(run)                           # a resume restores the masks here
        if run.masks is None:
            run.use_masks(0, run.first_masks())       # E-step 0 (or the given masks)
        with ConceptTrainer(pipe, run.data(), run.tokens, cfg, progress=progress) as trainer:
            run.trainer = trainer
            cbs.before_train(run)                     # ... and the trainer's state here
            try:
                while True:
                    s = trainer.step_count
                    if s in run.schedule and s not in run.result.e_steps:
                        run.use_masks(s, run.e_step(s))          # E-step
                        trainer.set_data(run.data())
                    cbs.after_e_step(run)
                    if s >= cfg.total_steps:
                        break
                    trainer.train(run.next_stop(s) - s)          # M-step
                    if trainer.history.interrupted:
                        break
            except KeyboardInterrupt:                 # during an E-step: redone on resume
                trainer.history.interrupted = True
            run.complete = not trainer.history.interrupted
            cbs.after_fit(run)
    run.result.warnings.extend(notes)
    return run.finish()


# ----------------------------------------------------------------------------- inputs
def _check_words(init_words) -> list:
    if isinstance(init_words, str) or not isinstance(init_words, (list, tuple)):
        raise TypeError(f"init_words must be a list of words (one per concept), got "
                        f"{init_words!r}: e.g. ['star', 'heart', 'background']")
    if not init_words:
        raise ValueError("init_words must name at least one concept, e.g. ['shape', 'background']")
    for w in init_words:
        if w is not None and (not isinstance(w, str) or not w.strip()):
            raise ValueError(f"each init word must be a non-empty string or None, got {w!r}")
    return list(init_words)


def _check_concept_ids(concept_images, n_images: int, K: int) -> list:
    ids = concept_images or [list(range(K)) for _ in range(n_images)]
    if len(ids) != n_images:
        raise ValueError(f"{n_images} images but concept_images has {len(ids)} entries")
    ids = [list(range(K)) if c == "all" else [int(x) for x in c] for c in ids]
    for i, cs in enumerate(ids):
        if not cs or len(set(cs)) != len(cs) or not all(0 <= c < K for c in cs):
            raise ValueError(f"concept_images[{i}] = {cs}: a non-empty list of distinct "
                             f"concept indices in 0..{K - 1}")
    if sorted({c for cs in ids for c in cs}) != list(range(K)):
        raise ValueError(f"every concept 0..{K - 1} must appear in some image: {ids}")
    return ids


def check_inputs(pipe, images, init_words, method="em", masks=None, concept_images=None,
                 resize=False) -> Task:
    """Every argument check of :func:`learn_concepts` (ValueError / TypeError saying what
    is wrong and what to pass)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    words = _check_words(init_words)
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if not images:
        raise ValueError("no images given: pass one image or a list of them")
    size = native_size(pipe)
    imgs = [to_uint8(im, size, resize=resize) for im in images]
    seen: dict = {}
    for i, im in enumerate(imgs):
        j = seen.setdefault(im.tobytes(), i)
        if j != i:
            warnings.warn(f"image {i} is the same picture as image {j}: it counts twice as "
                          "often in every batch; pass each picture once", stacklevel=3)
    ids = _check_concept_ids(concept_images, len(imgs), len(words))
    if method == "given":
        if masks is None:
            raise ValueError("method='given' needs masks=[(K_i, H, W) bool per image]")
        masks = as_mask_list(masks, len(imgs), ids, size, size, "masks")
    elif masks is not None:
        raise ValueError(f"masks are only used by method='given' (got method={method!r})")
    return Task(imgs, words, ids, masks)


#: the shared word the tokens of discovered objects start from: the first of these that is
#: one token in each of the model's tokenizers (none: random rows; both are the paper's setting)
SHARED_OBJECT_WORDS = ("object", "shape", "thing")


def shared_object_word(pipe) -> str | None:
    """The word every discovered object's token starts from (`SHARED_OBJECT_WORDS`)."""
    from .tokens import _is_existing_token, encoder_attrs

    for word in SHARED_OBJECT_WORDS:
        if all(_is_existing_token(getattr(pipe, tok), word) for tok, _ in encoder_attrs(pipe)):
            return word
    return None


#: what the tokens of discovered objects start from (``learn_concepts(discovery=...)``):
#: "top", the word each concept's attention reads most; "shared", one shared word for all
OBJECT_WORDS = ("top", "shared")


def object_start_words(pipe, discovery, how: str = "top") -> list:
    """The start word of each discovered object's token, objects in ``discovery``'s order
    (the background left out): its top word (`Discovery.top_words`), or the shared word
    (`shared_object_word`; None: a random row). A top word that is not one token in each
    of the model's tokenizers falls back to the shared word."""
    from .tokens import _is_existing_token, encoder_attrs

    shared = shared_object_word(pipe)
    if how == "shared":
        top = [shared] * discovery.k
    else:
        top = [w if all(_is_existing_token(getattr(pipe, tok), w)
                        for tok, _ in encoder_attrs(pipe)) else shared
               for w in discovery.top_words()]
    return [w for k, w in enumerate(top) if k != discovery.background]


def _discovery_options(options) -> tuple[dict, str]:
    """(the options of discover_concepts, the object-word rule), checked."""
    if options is None:
        return {}, "top"
    if not isinstance(options, dict):
        raise TypeError(f"discovery must be a dict of options, got {type(options).__name__}")
    opts = dict(options)
    how = opts.pop("object_words", "top")
    if how not in OBJECT_WORDS:
        raise ValueError(f"discovery['object_words'] must be one of {OBJECT_WORDS}, got "
                         f"{how!r}")
    return opts, how


def discovered_task(pipe, images, method, masks, concept_images, resize, seed,
                    options) -> tuple[Task, list[str]]:
    """The task of a call without words: each image's concepts discovered, its objects
    first and its background last, and the notes for the result (concepts that look alike
    across images)."""
    from .discovery import discover_concepts, similar_concepts

    if method not in ("em", "fixed"):
        raise ValueError(f"method={method!r} needs init_words (--concepts); without them "
                         "the concepts are discovered, for method='em' or 'fixed'")
    if masks is not None or concept_images is not None:
        raise ValueError("masks and concept_images go with init_words (one word per concept)")
    opts, how = _discovery_options(options)
    imgs = check_inputs(pipe, images, ["background"], method, resize=resize).images
    words, ids, start, found = [], [], [], []
    concept_of = []                     # per image: discovered index -> concept id
    for i, im in enumerate(imgs):
        d = discover_concepts(pipe, im, seed=seed, **opts)
        if d.k < 2:
            raise ValueError(f"image {i}: no concept stands out from the background; name "
                             "the concepts (init_words / --concepts), or pass a lower "
                             "discovery threshold")
        order = [k for k in range(d.k) if k != d.background] + [d.background]
        ids.append(list(range(len(words), len(words) + d.k)))
        concept_of.append(dict(zip(order, ids[-1])))
        words += object_start_words(pipe, d, how) + ["background"]
        start.append(d.masks[order])
        found.append(d)
    notes = []
    if len(found) > 1:
        for m in similar_concepts(found):
            a = concept_of[m.image_a][m.concept_a]
            b = concept_of[m.image_b][m.concept_b]
            notes.append(f"concept {a + 1} of image {m.image_a} and concept {b + 1} of image "
                         f"{m.image_b} look alike (similarity {m.similarity:.2f}): they may "
                         "be one concept")
    return Task(imgs, words, ids, start_masks=start), notes


def choose_configs(pipe, words, method, config, mask_config, steps, seed):
    """The training and E-step configs: the given ones, or the defaults for this model,
    method and how the tokens start; ``steps`` is the whole run's length."""
    cfg = (config or TrainConfig.for_model(pipe, method, words)).replace(seed=seed)
    if steps is not None:
        cfg = cfg.with_total_steps(steps)
    if method == "none":
        cfg = cfg.replace(lambda_attn=0.0)
    return cfg, mask_config or MaskConfig.for_words(words)


def check_schedule(pipe, cfg: TrainConfig, em_every, K: int):
    """``em_every`` is a positive integer, and K concept tokens fit in one prompt."""
    if em_every is not None and (isinstance(em_every, bool) or not isinstance(em_every, int)
                                 or em_every < 1):
        raise ValueError(f"em_every must be an integer >= 1, got {em_every!r}")
    one = ["a"] * K  # each concept token is ONE token: count it as a one-token word
    n_tok = max(len(pipe.tokenizer(cfg.template.format(cfg.joiner.join(one))).input_ids),
                len(pipe.tokenizer("a photo of " + " and ".join(one)).input_ids))
    if n_tok > pipe.tokenizer.model_max_length:
        raise ValueError(f"{K} concepts make a prompt of {n_tok} tokens, more than the text "
                         f"encoder's {pipe.tokenizer.model_max_length}: learn fewer concepts "
                         "per image")


__all__ = ["METHODS", "OBJECT_WORDS", "EMRun", "MaskConfig", "Task", "check_inputs",
           "e_step_schedule", "learn_concepts", "object_start_words", "shared_object_word"]
