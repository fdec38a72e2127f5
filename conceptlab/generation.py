"""Generate images with learned concept tokens.

    from conceptlab.viz.figures import image_grid
    images = generate(pipe, concepts, "a photo of [v1] and [v2] on a gray background", n=4)
    image_grid(images, rows=1, cols=4)         # one PIL image

Image i uses ``torch.Generator("cpu").manual_seed(seed + i)``, so it is the same picture
whether you ask for 1 or 4 images (the same call repeats bit for bit; across batch sizes
float rounding may move a pixel by a grey level or two). Default sampler settings depend on the model
(:data:`GENERATION_DEFAULTS`, a dict you may edit): the bundled shapes model (latent side
<= 32) uses guidance 4.0 and 25 DDIM steps, Stable-Diffusion-sized models 7.5 and 50.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import numpy as np
import torch

from .models import CONCEPT_TOKEN_RE, check_prompt, model_kind
from .tokens import ConceptTokens, _add_tokens, load_concepts, single_token_id

#: default sampler settings; tunable (e.g. ``GENERATION_DEFAULTS["bundled"]["guidance_scale"] = 5``)
GENERATION_DEFAULTS = {
    "bundled": {"guidance_scale": 4.0, "num_inference_steps": 25},
    "stable-diffusion": {"guidance_scale": 7.5, "num_inference_steps": 50},
}



def generation_defaults(pipe) -> dict:
    return dict(GENERATION_DEFAULTS[model_kind(pipe)])


def concept_tokens_in(prompt: str) -> list[str]:
    """Every ``[...]``-looking word of a prompt (e.g. '[v1]')."""
    return CONCEPT_TOKEN_RE.findall(prompt or "")


def _as_list(concepts):
    if concepts is None:
        return []
    if isinstance(concepts, (ConceptTokens, str, os.PathLike)) or _is_result(concepts):
        return [concepts]
    return list(concepts)


def _is_result(obj) -> bool:
    """A :class:`conceptlab.result.LearnedConcepts` (or anything holding ``.tokens``)."""
    return isinstance(getattr(obj, "tokens", None), ConceptTokens)


def ensure_concepts(pipe, concepts) -> list[ConceptTokens]:
    """Make sure the concept tokens are in ``pipe``: a ConceptTokens whose tokens are missing
    is written in (tokens added, rows set from its ``embeddings``; present tokens are left
    as they are, they hold the live trained values); a saved folder is always loaded
    (its rows overwrite the pipeline's)."""
    out = []
    for c in _as_list(concepts):
        if _is_result(c):
            c = c.tokens
        if isinstance(c, ConceptTokens):
            if not c.present_in(pipe):
                vocab = pipe.tokenizer.get_vocab()
                missing = [n for n in c.names if n not in vocab]
                D = pipe.text_encoder.get_input_embeddings().weight.shape[1]
                if missing and c.embeddings.shape[1] != D:
                    raise ValueError(f"these concepts were trained on {c.base_model!r} (hidden "
                                     f"size {c.embeddings.shape[1]}), this pipeline has {D}")
                if missing:
                    _add_tokens(pipe, missing)
                ids = [single_token_id(pipe.tokenizer, n) for n in c.names]
                c = dataclasses.replace(c, token_ids=ids)  # the caller's object is not changed
                w = pipe.text_encoder.get_input_embeddings().weight
                with torch.no_grad():
                    for k, name in enumerate(c.names):
                        if name in missing:
                            w[ids[k]] = c.embeddings[k].to(w)
            out.append(c)
        elif isinstance(c, (str, os.PathLike)):
            out.append(load_concepts(pipe, c))
        else:
            raise TypeError(f"concepts must be ConceptTokens, LearnedConcepts (what "
                            f"learn_concepts returns) or a saved folder, got {type(c).__name__}")
    return out


def check_concept_prompt(pipe, prompt: str) -> None:
    """ValueError if the prompt is longer than the text encoder takes, or names a ``[...]``
    token that is not a concept token of ``pipe`` (:func:`conceptlab.models.check_prompt`)."""
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
             progress: bool = False, **pipe_kwargs):
    """Sample ``n`` images of ``prompt``.

    concepts     ConceptTokens, the LearnedConcepts of ``learn_concepts``, a folder saved
                 by either, a list of those, or None; loaded into ``pipe`` if not yet present (see :func:`ensure_concepts`)
    prompt       may mix concept tokens and words; every ``[...]`` token must be a known
                 concept token (ValueError listing the known ones otherwise)
    seed         image i uses ``torch.Generator('cpu').manual_seed(seed + i)``
    guidance_scale, num_inference_steps  default per model (:data:`GENERATION_DEFAULTS`)
    output_type  "pil" -> list of PIL images; "np" -> (n, H, W, 3) uint8 array
    Extra keyword arguments go to the pipeline call (e.g. ``height``, ``eta``).
    """
    if output_type not in ("pil", "np"):
        raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt must be a string, got {type(prompt).__name__}")
    if guidance_scale is not None and not guidance_scale >= 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale!r}")
    if num_inference_steps is not None and (not isinstance(num_inference_steps, int)
                                            or num_inference_steps < 1):
        raise ValueError(f"num_inference_steps must be an integer >= 1, got "
                         f"{num_inference_steps!r}")
    ensure_concepts(pipe, concepts)  # first: its tokens are then known to check_prompt
    check_concept_prompt(pipe, prompt)
    if negative_prompt:
        check_concept_prompt(pipe, negative_prompt)
    d = generation_defaults(pipe)
    gs = d["guidance_scale"] if guidance_scale is None else guidance_scale
    steps = d["num_inference_steps"] if num_inference_steps is None else num_inference_steps
    gens = [torch.Generator("cpu").manual_seed(int(seed) + i) for i in range(n)]
    with _progress(pipe, progress), torch.no_grad():
        out = pipe([prompt] * n, negative_prompt=[negative_prompt] * n if negative_prompt
                   else None, generator=gens, guidance_scale=gs, num_inference_steps=steps,
                   output_type="np", **pipe_kwargs)
    arr = (np.asarray(out.images) * 255).round().clip(0, 255).astype(np.uint8)
    if output_type == "np":
        return arr
    from PIL import Image
    return [Image.fromarray(a) for a in arr]


def sample_grid(pipe, prompts, *, n_per_prompt: int = 4, seed: int = 0,
                guidance_scale: float | None = None, num_inference_steps: int | None = None,
                concepts=None):
    """``n_per_prompt`` images per prompt (the model's default sampler settings, as
    :func:`generate`); returns (rows of (n, H, W, 3) uint8 arrays, prompts).

    Image j of a prompt uses ``torch.Generator().manual_seed(seed + j)``: deterministic,
    and the same picture however many images are requested (up to float rounding, which
    depends on the batch size).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    rows = [generate(pipe, concepts, p, n=n_per_prompt, seed=seed, guidance_scale=guidance_scale,
                     num_inference_steps=num_inference_steps, output_type="np")
            for p in prompts]
    return rows, prompts


__all__ = [
    "GENERATION_DEFAULTS",
    "check_concept_prompt",
    "concept_tokens_in",
    "ensure_concepts",
    "generate",
    "generation_defaults",
    "sample_grid",
]
