"""Generate images with learned concept tokens.

    from conceptlab.viz.figures import image_grid
    images = generate(pipe, concepts, "a photo of [v1] and [v2] on a gray background", n=4)
    image_grid(images, rows=1, cols=4)         # one PIL image

Image i uses ``torch.Generator("cpu").manual_seed(seed + i)``, so it is the same picture
whether you ask for 1 or 4 images (the same call repeats bit for bit; across batch sizes
float rounding may move a pixel by a grey level or two). Default sampler settings depend on
the model (`GENERATION_DEFAULTS`, a dict you may edit): the bundled shapes model (latent side
<= 32) uses guidance 4.0 and 25 DDIM steps, Stable-Diffusion-sized models 7.5 and 50.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

from .concept_files import load_concepts
from .models import CONCEPT_TOKEN_RE, check_prompt, check_seed, model_kind
from .tokens import ConceptTokens

GENERATION_DEFAULTS = {
    "bundled": {"guidance_scale": 4.0, "num_inference_steps": 25},
    "stable-diffusion": {"guidance_scale": 7.5, "num_inference_steps": 50},
}
"""Default sampler settings per model kind; tunable
(e.g. ``GENERATION_DEFAULTS["bundled"]["guidance_scale"] = 5``)."""



#: the largest guidance scale accepted (SD is used at 1-15; far above, images saturate to black)
MAX_GUIDANCE = 100.0


def generation_defaults(pipe) -> dict:
    """The default sampler settings of ``pipe``'s model kind.

    Args:
        pipe: a Stable-Diffusion-style pipeline.

    Returns:
        A copy of its entry of `GENERATION_DEFAULTS` (``guidance_scale``,
            ``num_inference_steps``).
    """
    return dict(GENERATION_DEFAULTS[model_kind(pipe)])


def concept_tokens_in(prompt: str) -> list[str]:
    """Every ``[...]``-looking word of a prompt (e.g. '[v1]').

    Args:
        prompt: a prompt (None counts as empty).

    Returns:
        The ``[...]`` words, in order.
    """
    return CONCEPT_TOKEN_RE.findall(prompt or "")


def concept_sets(concepts) -> list[ConceptTokens]:
    """The `ConceptTokens` of ``concepts``.

    Args:
        concepts: ConceptTokens, a LearnedConcepts (what ``learn_concepts`` returns), a
            saved folder or embedding file, a list of those, or None.

    Returns:
        One `ConceptTokens` per set (an empty list for None).

    Raises:
        TypeError: an entry is none of these.
    """
    if concepts is None:
        return []
    if isinstance(concepts, (ConceptTokens, str, os.PathLike)) or hasattr(concepts, "tokens"):
        concepts = [concepts]
    out = []
    for c in concepts:
        c = getattr(c, "tokens", c)
        if isinstance(c, (str, os.PathLike)):
            c = load_concepts(c)
        if not isinstance(c, ConceptTokens):
            raise TypeError(f"concepts must be ConceptTokens, LearnedConcepts (what "
                            f"learn_concepts returns) or a saved folder, got {type(c).__name__}")
        out.append(c)
    return out


@contextlib.contextmanager
def concepts_applied(pipe, concepts):
    """Every set of ``concepts`` applied to ``pipe`` for the block, removed after.

    Args:
        pipe: a Stable-Diffusion-style pipeline.
        concepts: as for `concept_sets`.

    Yields:
        ``pipe``, with the concepts applied.
    """
    with contextlib.ExitStack() as stack:
        for c in concept_sets(concepts):
            stack.enter_context(c.applied(pipe))
        yield pipe


def check_concept_prompt(pipe, prompt: str) -> None:
    """Checks that ``pipe`` can read ``prompt``.

    Args:
        pipe: a Stable-Diffusion-style pipeline.
        prompt: the prompt to check.

    Raises:
        ValueError: the prompt is longer than the text encoder takes, or names a ``[...]``
            token that is not a concept token of ``pipe``
            (`conceptlab.models.check_prompt`).
    """
    n = len(pipe.tokenizer(prompt).input_ids)
    if n > pipe.tokenizer.model_max_length:
        raise ValueError(f"the prompt has {n} tokens, the text encoder takes "
                         f"{pipe.tokenizer.model_max_length}: shorten it")
    check_prompt(pipe, prompt)


@contextlib.contextmanager
def _progress(pipe, show: bool):
    old = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    pipe.set_progress_bar_config(disable=not show)
    try:
        yield
    finally:
        pipe._progress_bar_config = old


def generate(pipe, concepts, prompt: str, *, n: int = 4, seed: int = 0,
             guidance_scale: float | None = None, num_inference_steps: int | None = None,
             negative_prompt: str | None = None, output_type: str = "pil",
             progress: bool = False, batch_size: int = 16, **pipe_kwargs):
    """Sample ``n`` images of ``prompt``.

    Args:
        pipe: a Stable-Diffusion-style pipeline.
        concepts: ConceptTokens, the LearnedConcepts of ``learn_concepts``, a folder saved
            by either or an embedding file, a list of those, or None; applied to ``pipe``
            for this call only (the pipeline is left as it was).
        prompt: may mix concept tokens and words; every ``[...]`` token must be a known
            concept token (ValueError listing the known ones otherwise).
        n: number of images, >= 1.
        seed: image i uses ``torch.Generator('cpu').manual_seed(seed + i)``.
        guidance_scale: classifier-free guidance scale, >= 0; default per model
            (`GENERATION_DEFAULTS`).
        num_inference_steps: sampler steps, >= 1; default per model
            (`GENERATION_DEFAULTS`).
        negative_prompt: optional negative prompt, checked like ``prompt``.
        output_type: ``"pil"`` -> list of PIL images; ``"np"`` -> (n, H, W, 3) uint8
            array.
        progress: show the pipeline's progress bar.
        batch_size: images per pipeline call (memory does not grow with ``n``); image i is
            the same picture whatever the batch, up to float rounding.
        **pipe_kwargs: go to the pipeline call (e.g. ``height``, ``eta``).

    Returns:
        ``n`` PIL images, or an (n, H, W, 3) uint8 array for ``output_type="np"``.

    Raises:
        ValueError: an argument is out of range, or a prompt is too long or names an
            unknown ``[...]`` token.
        TypeError: ``prompt`` is not a string, or ``concepts`` is not one of the kinds
            above.
    """
    if output_type not in ("pil", "np"):
        raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt must be a string, got {type(prompt).__name__}")
    if guidance_scale is not None and (isinstance(guidance_scale, bool)
                                       or not 0 <= guidance_scale <= MAX_GUIDANCE):
        raise ValueError(f"guidance_scale must be a number in [0, {MAX_GUIDANCE:g}], got "
                         f"{guidance_scale!r} (larger values only saturate the images)")
    check_seed(seed)
    check_seed(int(seed) + n - 1)   # image i uses seed + i
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if num_inference_steps is not None and (not isinstance(num_inference_steps, int)
                                            or num_inference_steps < 1):
        raise ValueError(f"num_inference_steps must be an integer >= 1, got "
                         f"{num_inference_steps!r}")
    d = generation_defaults(pipe)
    gs = d["guidance_scale"] if guidance_scale is None else guidance_scale
    steps = d["num_inference_steps"] if num_inference_steps is None else num_inference_steps
    chunks = []
    with concepts_applied(pipe, concepts), _progress(pipe, progress), torch.no_grad():
        check_concept_prompt(pipe, prompt)  # the concepts' tokens are known here
        if negative_prompt:
            check_concept_prompt(pipe, negative_prompt)
        for start in range(0, n, batch_size):   # memory flat in n
            k = min(batch_size, n - start)
            gens = [torch.Generator("cpu").manual_seed(int(seed) + start + i) for i in range(k)]
            out = pipe([prompt] * k, negative_prompt=[negative_prompt] * k if negative_prompt
                       else None, generator=gens, guidance_scale=gs,
                       num_inference_steps=steps, output_type="np", **pipe_kwargs)
            chunks.append((np.asarray(out.images) * 255).round().clip(0, 255).astype(np.uint8))
    arr = np.concatenate(chunks)
    if output_type == "np":
        return arr
    from PIL import Image
    return [Image.fromarray(a) for a in arr]


def sample_grid(pipe, prompts, *, n_per_prompt: int = 4, seed: int = 0,
                guidance_scale: float | None = None, num_inference_steps: int | None = None,
                concepts=None):
    """``n_per_prompt`` images per prompt (the model's default sampler settings, as `generate`).

    Image j of a prompt uses ``torch.Generator().manual_seed(seed + j)``: deterministic,
    and the same picture however many images are requested (up to float rounding, which
    depends on the batch size).

    Args:
        pipe: a Stable-Diffusion-style pipeline.
        prompts: one prompt or a list of prompts.
        n_per_prompt: images per prompt.
        seed: seed of the first image of every prompt.
        guidance_scale: as for `generate`.
        num_inference_steps: as for `generate`.
        concepts: as for `generate`.

    Returns:
        (rows of (n, H, W, 3) uint8 arrays, prompts): one row per prompt, and the prompts
            as a list.

    Raises:
        ValueError: as for `generate`.
        TypeError: as for `generate`.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    rows = [generate(pipe, concepts, p, n=n_per_prompt, seed=seed, guidance_scale=guidance_scale,
                     num_inference_steps=num_inference_steps, output_type="np")
            for p in prompts]
    return rows, prompts


__all__ = [
    "GENERATION_DEFAULTS",
    "check_concept_prompt",
    "concept_sets",
    "concept_tokens_in",
    "concepts_applied",
    "generate",
    "generation_defaults",
    "sample_grid",
]
