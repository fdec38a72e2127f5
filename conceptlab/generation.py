"""Generate images with learned concept tokens.

    images = generate(pipe, concepts, "a photo of [v1] and [v2] on a gray background", n=4)
    image_grid(images, rows=1, cols=4, captions=["seed 0", "seed 1", "seed 2", "seed 3"])

Image i uses ``torch.Generator("cpu").manual_seed(seed + i)``, so it is the same whether
you ask for 1 or 4 images. Default sampler settings depend on the model
(:data:`GENERATION_DEFAULTS`, a dict you may edit): the bundled shapes model (latent side
<= 32) uses guidance 4.0 and 25 DDIM steps, Stable-Diffusion-sized models 7.5 and 50.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re

import numpy as np
import torch

from .concepts import ConceptTokens, _add_tokens, load_concepts, single_token_id

#: default sampler settings; tunable (e.g. ``GENERATION_DEFAULTS["bundled"]["guidance_scale"] = 5``)
GENERATION_DEFAULTS = {
    "bundled": {"guidance_scale": 4.0, "num_inference_steps": 25},
    "stable-diffusion": {"guidance_scale": 7.5, "num_inference_steps": 50},
}

_TOKEN_RE = re.compile(r"\[[^\[\]\s]+\]")


def model_kind(pipe) -> str:
    """'bundled' for the small conceptlab models (latent side <= 32), else 'stable-diffusion'."""
    s = pipe.unet.config.sample_size
    s = max(s) if isinstance(s, (tuple, list)) else s
    return "bundled" if s <= 32 else "stable-diffusion"


def generation_defaults(pipe) -> dict:
    return dict(GENERATION_DEFAULTS[model_kind(pipe)])


def concept_tokens_in(prompt: str) -> list[str]:
    """Every ``[...]``-looking word of a prompt (e.g. '[v1]')."""
    return _TOKEN_RE.findall(prompt or "")


def _as_list(concepts):
    if concepts is None:
        return []
    if isinstance(concepts, (ConceptTokens, str, os.PathLike)):
        return [concepts]
    return list(concepts)


def ensure_concepts(pipe, concepts) -> list[ConceptTokens]:
    """Make sure the concept tokens are in ``pipe``: a ConceptTokens whose tokens are missing
    is written in (tokens added, rows set from its ``embeddings``; present tokens are left
    as they are, they hold the live trained values); a saved folder is always loaded
    (its rows overwrite the pipeline's)."""
    out = []
    for c in _as_list(concepts):
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
            raise TypeError(f"concepts must be ConceptTokens or a saved folder, got {type(c)}")
    return out


def check_concept_prompt(pipe, prompt: str, known) -> None:
    """ValueError if the prompt names a ``[...]`` token that is not a known concept token."""
    known = sorted(set(known))
    unknown = [t for t in concept_tokens_in(prompt) if t not in known]
    if unknown:
        raise ValueError(f"unknown concept token(s) {unknown} in {prompt!r}; known concept "
                         f"tokens: {known or 'none (pass the concepts to generate)'}")
    n = len(pipe.tokenizer(prompt).input_ids)
    if n > pipe.tokenizer.model_max_length:
        raise ValueError(f"the prompt has {n} tokens, the text encoder takes "
                         f"{pipe.tokenizer.model_max_length}: shorten it")


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

    concepts     ConceptTokens, a folder saved by ``save_concepts``, a list of those, or
                 None; loaded into ``pipe`` if not yet present (see :func:`ensure_concepts`)
    prompt       may mix concept tokens and words; every ``[...]`` token must be a known
                 concept token (ValueError listing the known ones otherwise)
    seed         image i uses ``torch.Generator('cpu').manual_seed(seed + i)``
    guidance_scale, num_inference_steps  default per model (:data:`GENERATION_DEFAULTS`)
    output_type  "pil" -> list of PIL images; "np" -> (n, H, W, 3) uint8 array
    Extra keyword arguments go to the pipeline call (e.g. ``height``, ``eta``).
    """
    if output_type not in ("pil", "np"):
        raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    loaded = ensure_concepts(pipe, concepts)
    known = [name for c in loaded for name in c.names]
    known += [t for t in pipe.tokenizer.get_added_vocab() if _TOKEN_RE.fullmatch(t)]
    check_concept_prompt(pipe, prompt, known)
    if negative_prompt:
        check_concept_prompt(pipe, negative_prompt, known)
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


def image_grid(images, rows: int | None = None, cols: int | None = None, captions=None, *,
               scale: int = 1, pad: int = 2, background=(255, 255, 255)):
    """Paste images (PIL, or uint8 / [0, 1] float arrays) into one PIL image, row by row.

    rows, cols  default: one row (or enough rows for ``cols``); captions (one per image,
    or None) are written under each image with PIL's default font. ``scale`` enlarges
    each image by an integer factor (nearest neighbour; for 64-px images).
    """
    from PIL import Image, ImageDraw

    ims = []
    for im in images:
        if not isinstance(im, Image.Image):
            a = np.asarray(im)
            if a.dtype != np.uint8:
                a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
            im = Image.fromarray(a)
        im = im.convert("RGB")
        if scale > 1:
            im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
        ims.append(im)
    if not ims:
        raise ValueError("no images to put in a grid")
    N = len(ims)
    if rows is None and cols is None:
        rows, cols = 1, N
    elif rows is None:
        rows = -(-N // cols)
    elif cols is None:
        cols = -(-N // rows)
    if rows * cols < N:
        raise ValueError(f"a {rows}x{cols} grid cannot hold {N} images")
    if captions is not None and len(captions) != N:
        raise ValueError(f"{len(captions)} captions for {N} images")
    w = max(i.width for i in ims)
    h = max(i.height for i in ims)
    cap_h = 12 if captions is not None else 0
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + cap_h + pad) + pad), background)
    draw = ImageDraw.Draw(grid)
    for j, im in enumerate(ims):
        r, c = divmod(j, cols)
        x, y = pad + c * (w + pad), pad + r * (h + cap_h + pad)
        grid.paste(im, (x, y))
        if captions is not None and captions[j]:
            draw.text((x + 1, y + h), str(captions[j]), fill=(0, 0, 0))
    return grid


__all__ = [
    "GENERATION_DEFAULTS",
    "check_concept_prompt",
    "concept_tokens_in",
    "ensure_concepts",
    "generate",
    "generation_defaults",
    "image_grid",
    "model_kind",
]
