"""Cross-attention maps of a real image: where the model reads each word of a prompt.

Given an image and its caption, `attention_maps` encodes the image with the VAE,
noises the latent at ``n_timesteps`` random timesteps, runs the U-Net on all of them in
one batch while `conceptlab.attention.record_attention` keeps the cross-attention
probabilities, and returns an `AttentionMaps` object (in the spirit of DAAM):

    >>> maps = attention_maps(pipe, image, "a blue star and a red heart on a beige background")
    >>> maps.words                       # ['a', 'blue', 'star', 'and', ...]
    >>> maps.for_word("star")            # (h, w) float in [0, 1]
    >>> maps.for_word("star", size=(64, 64))    # upsampled to the image
    >>> maps.concept_maps(["star", "heart"])    # (K, h, w) raw maps, for mask estimation

Computation, for image ``x`` and prompt tokens ``c``:

    z0  = VAE.encode(x).latent_dist.mean * scaling_factor
    t_i ~ U{t_lo, ..., t_hi - 1},  eps_i ~ N(0, I)        i = 1..n  (torch.Generator(seed))
    z_i = scheduler.add_noise(z0, eps_i, t_i)
    U-Net(z_i, t_i, text_encoder(c)) for all i at once (chunks of ``batch_size``)
    A[i, layer] = mean over heads of softmax(Q K^T / sqrt(d))   (h_layer, w_layer, tokens)

Which layers and which timestep range give the best maps depends on the model:

- Stable-Diffusion-sized models (latent ``sample_size >= 64``): the 16x16 cross-attention
  layers (the choice of Break-a-Scene / Prompt-to-Prompt) and ``t`` in ``[0, 1000)``.
- Any pipeline folder may carry a ``conceptlab.json`` with ``attention_layers`` (e.g.
  ``["resolution:16"]`` or explicit layer names) and ``attention_t_range`` (e.g.
  ``[0, 1000]``). The bundled shapes model ships one; its values are chosen by the
  model-quality benchmark (best mask IoU on held-out scenes).
- Otherwise: all cross-attention layers at the largest resolution <= 16, ``t`` in
  ``[0, 1000)``.

`default_attention_config` returns this choice. Everything here works for any
``StableDiffusionPipeline``-like object (``vae``, ``text_encoder``, ``tokenizer``, ``unet``,
``scheduler``) with a CLIP-style tokenizer.

Shapes of `AttentionMaps` (``n`` timesteps, ``L`` layers, ``T`` tokens =
``tokenizer.model_max_length``, ``h x w`` the largest resolution among the layers):

- ``.timesteps``       (n,) int64, sorted ascending
- ``.raw``             (n, L, h, w, T) float32 on CPU, head-averaged; layers of lower
  resolution bilinearly upsampled to ``h x w``
- ``.layer_maps[name]`` (n, h_l, w_l, T) the same at each layer's own resolution
- ``.for_token(i)`` / ``.for_word(w)`` (h, w) (or ``size``); ``.per_timestep(w)`` (n, h, w);
  ``.concept_maps([...])`` (K, h, w)

Why one module of about 750 lines: computing the maps and reading them (``AttentionMaps``)
share the token positions, layer selection and model defaults; split, each half would
import the other's private parts. About half of it is docstrings and argument checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .attention import cross_attention_layers, layer_resolutions, record_attention
from .models import (
    check_prompt,
    conditioning,
    encode_pixels,
    latent_size,
    model_folder_config,
    native_size,
    num_train_timesteps,
    prompt_ids,
    to_model_input,
)

__all__ = [
    "AttentionMaps",
    "attention_maps",
    "default_attention_config",
    "encode_prompt_with_ids",
    "resolve_layers",
    "select_layers",
    "sequential_attention_maps",
    "word_occurrences",
    "word_token_indices",
]

MAX_BATCH = 64
SD_LATENT_SIZE = 64  # latent side of Stable Diffusion 1.x/2.x at 512x512
EOW = "</w>"  # CLIP's end-of-word marker


# ----------------------------------------------------------------------------- helpers
def _is_special(tok: str) -> bool:
    return tok.startswith("<|") and tok.endswith("|>")


# ----------------------------------------------------------------------------- layers
def select_layers(names: list[str], resolution_of: dict, layers=None) -> list[str]:
    """The entries of ``names`` (in order) chosen by ``layers``.

    Args:
        names: cross-attention processor names, in U-Net order.
        resolution_of: ``resolution_of[name]`` is each layer's map side.
        layers: ``None`` or ``"all"`` (all), an int (a resolution: every layer whose map is
            that many pixels wide, e.g. 16), a string ``"resolution:16"``, a full processor
            name (the ``".processor"`` suffix is optional), a dotted prefix
            (``"up_blocks.1"``, ``"mid_block"``), or a list mixing these.

    Returns:
        The chosen names, in the order of ``names``.

    Raises:
        ValueError: an entry matches nothing (the message lists what exists), ``layers`` is
            an empty list, or a ``"resolution:"`` selector is malformed.
        TypeError: an entry is neither a string nor an int.
    """
    if layers is None:
        return list(names)
    items = [layers] if isinstance(layers, (str, int)) else list(layers)
    if not items:
        raise ValueError("layers is empty: pass None or 'all' for all cross-attention layers")
    chosen: set[str] = set()
    for item in items:
        if isinstance(item, str) and item.strip().lower() == "all":
            chosen.update(names)
            continue
        r = None
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            r = int(item)
        elif isinstance(item, str) and item.split(":")[0].strip().lower() in ("resolution", "res"):
            try:
                r = int(item.split(":", 1)[1])
            except (IndexError, ValueError):
                raise ValueError(f"bad layer selector {item!r}: use e.g. 'resolution:16'") from None
        if r is not None:
            hit = [n for n in names if resolution_of[n] == r]
            if not hit:
                raise ValueError(f"no cross-attention layer at resolution {r}; there are "
                                 f"resolutions {sorted(set(resolution_of.values()), reverse=True)}")
            chosen.update(hit)
            continue
        if not isinstance(item, str):
            raise TypeError(f"layers entries must be names, ints (resolutions) or 'all', "
                            f"got {item!r}")
        key = item.strip()
        hit = [n for n in names if n == key or n == key + ".processor"
               or n.startswith(key.rstrip(".") + ".")]
        if not hit:
            raise ValueError(f"unknown cross-attention layer {item!r}; available: {names}")
        chosen.update(hit)
    return [n for n in names if n in chosen]


def resolve_layers(unet, layers=None) -> list[str]:
    """Cross-attention processor names of ``unet`` selected by ``layers``, in U-Net order.

    Args:
        unet: a diffusers U-Net.
        layers: a selection as for `select_layers`; ``None`` means all layers.

    Returns:
        The chosen processor names.

    Raises:
        ValueError: the U-Net has no cross-attention layers, or as for `select_layers`.
        TypeError: as for `select_layers`.
    """
    names = cross_attention_layers(unet)
    if not names:
        raise ValueError("this U-Net has no cross-attention layers")
    return select_layers(names, layer_resolutions(unet), layers)


def default_attention_config(pipe) -> dict:
    """``dict(layers=[processor names], t_range=(lo, hi))`` to use for this pipeline.

    1. ``conceptlab.json`` in the pipeline's folder (``pipe.name_or_path``), keys
       ``attention_layers`` and ``attention_t_range`` (each optional). The bundled model's
       file is written by the model-quality benchmark, which picks the layers and range
       giving the best attention masks.
    2. Stable-Diffusion-sized U-Nets (latent side >= 64): the cross-attention layers whose
       side is nearest a quarter of the latent side, ``t`` in ``[0, num_train_timesteps)``:
       16x16 at 512 px (SD 1.5; Break-a-Scene's choice), 24x24 at 768 px (SD 2.1), 32x32
       at 1024 px (SDXL, whose 128x128 latent has no attention layer at full size).
    3. Otherwise all cross-attention layers at the largest resolution <= 16, same ``t``.

    Args:
        pipe: a Stable-Diffusion-style pipeline.

    Returns:
        ``{"layers": [processor names], "t_range": (lo, hi)}``.

    Raises:
        ValueError: the U-Net has no cross-attention layers, or the folder's
            ``attention_layers`` select none (as for `resolve_layers`).
    """
    unet = pipe.unet
    n_train = num_train_timesteps(pipe)
    cfg = model_folder_config(pipe)
    layers = cfg.get("attention_layers")
    if layers is not None:
        names = resolve_layers(unet, layers)
    else:
        res = layer_resolutions(unet)
        if not res:
            raise ValueError("this U-Net has no cross-attention layers")
        side = min(latent_size(pipe))
        if side >= SD_LATENT_SIZE:  # a quarter of the latent side: 16 at 512 px (SD 1.5),
            target = min(res.values(), key=lambda r: abs(r - side / 4))  # 24 at 768, 32 SDXL
        else:
            small = [r for r in res.values() if r <= 16]
            target = max(small) if small else min(res.values())
        names = [n for n in res if res[n] == target]
    t_range = cfg.get("attention_t_range")
    t_range = (0, n_train) if t_range is None else (int(t_range[0]), int(t_range[1]))
    return {"layers": names, "t_range": t_range}


# ----------------------------------------------------------------------------- tokens
def _word_ids(tokenizer, word: str) -> list[int]:
    return list(tokenizer(word, add_special_tokens=False).input_ids)


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    return prompt_ids(tokenizer, prompt)[0].tolist()


def word_occurrences(tokenizer, prompt: str, word: str) -> list[list[int]]:
    """Token positions of each occurrence of ``word`` in the padded ``prompt`` ids.

    Positions index ``tokenizer(prompt, padding="max_length", truncation=True).input_ids``
    (BOS at 0). A word that the tokenizer splits into several pieces ("zebra" -> z, e, br,
    a) gives several positions per occurrence; ``word`` may also be a phrase ("red star").
    An occurrence must start at a word boundary, so "a" does not match the last piece of
    "zebra".

    Args:
        tokenizer: a CLIP-style tokenizer.
        prompt: the prompt.
        word: a word or phrase.

    Returns:
        One list of token positions per occurrence; ``[]`` if the word is absent.

    Raises:
        ValueError: ``word`` contains no token.
    """
    target = _word_ids(tokenizer, word)
    if not target:
        raise ValueError(f"{word!r} contains no token")
    ids = _prompt_ids(tokenizer, prompt)
    toks = tokenizer.convert_ids_to_tokens(ids)
    eow = any(t.endswith(EOW) for t in tokenizer.convert_ids_to_tokens(target))
    out, n, i = [], len(target), 0
    while i + n <= len(ids):
        if ids[i:i + n] == target and (
                not eow or i == 0 or toks[i - 1].endswith(EOW) or _is_special(toks[i - 1])):
            out.append(list(range(i, i + n)))
            i += n
        else:
            i += 1
    return out


def word_token_indices(tokenizer, prompt: str, word: str, occurrence: int | None = None
                       ) -> list[int]:
    """Positions (in the padded input ids, BOS at 0) of the tokens forming ``word``.

    Args:
        tokenizer: a CLIP-style tokenizer.
        prompt: the prompt.
        word: a word or phrase.
        occurrence: only the ``occurrence``-th occurrence (0-based; negative counts from
            the end); all occurrences (flattened) by default.

    Returns:
        The token positions; ``[]`` if the word is absent (``AttentionMaps.for_word``
            raises instead).

    Raises:
        ValueError: ``word`` contains no token, or there is no ``occurrence``-th
            occurrence.
    """
    occ = word_occurrences(tokenizer, prompt, word)
    if occurrence is None:
        return [i for o in occ for i in o]
    if not -len(occ) <= occurrence < len(occ):
        raise ValueError(f"occurrence={occurrence} but {word!r} appears {len(occ)} time(s) in "
                         f"{prompt!r}")
    return list(occ[occurrence])


def encode_prompt_with_ids(pipe, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings and token ids, padded to ``model_max_length``.

    Warns when the prompt is truncated. (``conceptlab.models.encode_prompt`` returns the
    embeddings only.)

    Args:
        pipe: a Stable-Diffusion-style pipeline.
        prompt: the prompt.

    Returns:
        ``(embeddings (1, T, D), input_ids (T,))``.
    """
    cond, ids = _conditioning_with_ids(pipe, prompt)
    return cond.hidden, ids


def _conditioning_with_ids(pipe, prompt: str):
    """(:class:`~conceptlab.models.Conditioning` of the prompt, its first tokenizer's ids)."""
    check_prompt(pipe, prompt)
    ids = torch.tensor(_prompt_ids(pipe.tokenizer, prompt))
    with torch.no_grad():
        return conditioning(pipe, [prompt], ids=ids[None]), ids


def _noiser(pipe):
    """Scheduler whose ``add_noise`` is x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps for any
    integer t (DDPM-style). Sigma-based schedulers (Euler, ...) noise differently and need
    ``set_timesteps``; for those a DDPMScheduler with the same betas is used."""
    from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler

    s = pipe.scheduler
    if isinstance(s, (DDIMScheduler, DDPMScheduler, PNDMScheduler)):
        return s
    return DDPMScheduler.from_config(s.config)


# ----------------------------------------------------------------------------- result
@dataclass(eq=False, repr=False)
class AttentionMaps:
    """Head-averaged cross-attention maps of one (image, prompt) pair.

    See the module docstring for shapes. Normalised maps (``normalize=True``) are min-max
    scaled to [0, 1] after averaging over heads, layers and timesteps (and after resizing
    to ``size``); a constant map becomes all zeros.

    Attributes:
        prompt: the prompt.
        input_ids: (T,) token ids of the padded prompt.
        tokens: T token strings, "</w>" stripped, specials kept.
        timesteps: (n,) timesteps, sorted ascending.
        layers: processor names, U-Net order.
        layer_maps: name -> (n, h_l, w_l, T) head-averaged maps.
        layer_resolution: name -> h_l.
        t_range: (lo, hi) the timesteps were drawn from, hi exclusive.
        seed: the seed of the timesteps and noise (None when a generator was given).
    """

    prompt: str
    input_ids: torch.Tensor            # (T,)
    tokens: list                       # T token strings, "</w>" stripped, specials kept
    timesteps: torch.Tensor            # (n,)
    layers: list                       # processor names, U-Net order
    layer_maps: dict                   # name -> (n, h_l, w_l, T)
    layer_resolution: dict             # name -> h_l
    t_range: tuple = (0, 1000)
    seed: int | None = None
    _raw: torch.Tensor | None = field(default=None, repr=False)
    _tokenizer: object = field(default=None, repr=False)

    # --------------------------------------------------------------- shapes
    @property
    def shape(self) -> tuple[int, int]:
        """(h, w) of the common map grid (the largest layer resolution)."""
        return max((m.shape[1:3] for m in self.layer_maps.values()), key=lambda s: s[0] * s[1])

    @property
    def resolution(self) -> int:
        """Side (height) of the common map grid, e.g. 16."""
        return int(self.shape[0])

    @property
    def raw(self) -> torch.Tensor:
        """(n_timesteps, n_layers, h, w, tokens) head-averaged probabilities on the common grid.

        Lower-resolution layers are upsampled bilinearly.
        """
        if self._raw is None:
            self._raw = torch.stack([self._resized(n) for n in self.layers], 1)
        return self._raw

    def _resized(self, name: str) -> torch.Tensor:
        m = self.layer_maps[name]
        if tuple(m.shape[1:3]) == tuple(self.shape):
            return m
        return F.interpolate(m.permute(0, 3, 1, 2), size=self.shape, mode="bilinear",
                             align_corners=False).permute(0, 2, 3, 1)

    def __repr__(self):
        return (f"AttentionMaps(prompt={self.prompt!r}, timesteps={len(self.timesteps)}, "
                f"layers={len(self.layers)}, resolution={self.resolution}, "
                f"tokens={len(self.tokens)})")

    # --------------------------------------------------------------- words
    @property
    def words(self) -> list[str]:
        """Words of the prompt as tokenised.

        Specials and padding are excluded; the pieces of a split word are joined.
        """
        out, cur = [], ""
        for tok, raw in zip(self.tokens, self._raw_tokens()):
            if _is_special(raw):
                if cur:
                    out.append(cur)
                    cur = ""
                continue
            cur += tok
            if raw.endswith(EOW):
                out.append(cur)
                cur = ""
        if cur:
            out.append(cur)
        return out

    def _raw_tokens(self) -> list[str]:
        if self._tokenizer is not None:
            return self._tokenizer.convert_ids_to_tokens(self.input_ids.tolist())
        return [t if _is_special(t) else t + EOW for t in self.tokens]

    def word_indices(self, word: str, occurrence: int | None = None) -> list[int]:
        """Token positions of ``word`` (all occurrences, or the ``occurrence``-th).

        Args:
            word: a word or phrase of the prompt.
            occurrence: only this occurrence (0-based); all occurrences by default.

        Returns:
            The token positions.

        Raises:
            ValueError: the word is absent (the message lists the prompt's words), or
                there is no ``occurrence``-th occurrence.
            RuntimeError: no tokenizer is attached.
        """
        if self._tokenizer is None:
            raise RuntimeError("no tokenizer attached; use for_token with indices")
        idx = word_token_indices(self._tokenizer, self.prompt, word, occurrence)
        if not idx:
            raise ValueError(f"word {word!r} is not in the prompt {self.prompt!r}; its words "
                             f"are {self.words}")
        return idx

    # --------------------------------------------------------------- selection
    def _layer_sel(self, layers) -> list[str]:
        try:
            return select_layers(self.layers, self.layer_resolution, layers)
        except ValueError as e:
            raise ValueError(f"{e} (among the recorded layers)") from None

    def _time_sel(self, timesteps=None, t_range=None) -> torch.Tensor:
        """Indices into ``self.timesteps``: ``timesteps`` = int / slice / list / bool mask
        of indices; ``t_range=(lo, hi)`` = timestep values lo <= t < hi."""
        n = len(self.timesteps)
        idx = torch.arange(n)
        if timesteps is not None:
            if isinstance(timesteps, slice):
                idx = idx[timesteps]
            else:
                sel = torch.as_tensor(timesteps)
                idx = idx[sel.reshape(-1) if sel.dtype != torch.bool else sel]
        if t_range is not None:
            lo, hi = t_range
            t = self.timesteps[idx]
            idx = idx[(t >= lo) & (t < hi)]
        if len(idx) == 0:
            raise ValueError(f"no timestep selected (timesteps={timesteps}, t_range={t_range}; "
                             f"available: {self.timesteps.tolist()})")
        return idx

    def _average(self, token_idx, layers=None, timesteps=None, t_range=None) -> torch.Tensor:
        """(n_selected_timesteps, h, w): mean over the chosen layers and tokens."""
        tok = torch.as_tensor(token_idx, dtype=torch.long).reshape(-1)
        T = len(self.tokens)
        if len(tok) == 0 or tok.min() < -T or tok.max() >= T:
            raise IndexError(f"token index {token_idx} out of range for {T} tokens")
        ti = self._time_sel(timesteps, t_range)
        maps = []
        for n in self._layer_sel(layers):
            m = self.layer_maps[n][ti][..., tok].mean(-1)  # (n_sel, h_l, w_l)
            if tuple(m.shape[-2:]) != tuple(self.shape):  # bilinear is linear: same as
                m = F.interpolate(m[:, None], size=self.shape, mode="bilinear",  # .raw
                                  align_corners=False)[:, 0]
            maps.append(m)
        return torch.stack(maps).mean(0)

    @staticmethod
    def _finish(m: torch.Tensor, size, normalize: bool) -> torch.Tensor:
        """Resize (..., h, w) to ``size`` (bilinear) and min-max normalise each map."""
        if size is not None:
            size = (size, size) if isinstance(size, int) else tuple(size)
            lead = m.shape[:-2]
            m = F.interpolate(m.reshape(-1, 1, *m.shape[-2:]), size=size, mode="bilinear",
                              align_corners=False).reshape(*lead, *size)
        if normalize:
            lo = m.amin((-2, -1), keepdim=True)
            hi = m.amax((-2, -1), keepdim=True)
            span = hi - lo
            m = torch.where(span > 0, (m - lo) / span.clamp_min(1e-12), torch.zeros_like(m))
        return m

    # --------------------------------------------------------------- maps
    def for_token(self, index, size=None, layers=None, timesteps=None, *, t_range=None,
                  normalize: bool = True) -> torch.Tensor:
        """(h, w) map of token position(s) ``index``.

        The map is averaged over heads, the chosen layers, timesteps and tokens, upsampled
        to ``size`` and min-max normalised to [0, 1] unless ``normalize=False``.

        Args:
            index: a token position or a list of positions (averaged).
            size: (H, W) (or an int side) to upsample to; the common grid by default.
            layers: None = all recorded; names, resolutions, "all" (as for
                `select_layers`).
            timesteps: indices into ``.timesteps`` (int / slice / list / bool mask).
            t_range: (lo, hi) timestep values, lo <= t < hi.
            normalize: min-max normalise to [0, 1].

        Returns:
            The (h, w) (or ``size``) map.

        Raises:
            IndexError: a token position is out of range.
            ValueError: no timestep or no layer is selected.
        """
        m = self._average(index, layers, timesteps, t_range).mean(0)
        return self._finish(m, size, normalize)

    def for_word(self, word: str, size=None, layers=None, timesteps=None, *, occurrence=None,
                 t_range=None, normalize: bool = True) -> torch.Tensor:
        """(h, w) map of ``word`` (or phrase).

        The mean over its tokens and, unless ``occurrence`` is given, over all its
        occurrences. Same options as `for_token`.

        Args:
            word: a word or phrase of the prompt.
            size: as for `for_token`.
            layers: as for `for_token`.
            timesteps: as for `for_token`.
            occurrence: only this occurrence (0-based).
            t_range: as for `for_token`.
            normalize: as for `for_token`.

        Returns:
            The (h, w) (or ``size``) map.

        Raises:
            ValueError: the word is absent, or as for `for_token`.
        """
        return self.for_token(self.word_indices(word, occurrence), size, layers, timesteps,
                              t_range=t_range, normalize=normalize)

    def per_layer(self, word, size=None, timesteps=None, *, occurrence=None, t_range=None,
                  normalize: bool = True) -> dict:
        """One map per recorded layer, at the layer's own resolution (or ``size``).

        Args:
            word: a word or token position(s).
            size: (H, W) (or an int side) to resize every map to.
            timesteps: as for `for_token`.
            occurrence: only this occurrence of ``word`` (0-based).
            t_range: as for `for_token`.
            normalize: min-max normalise each map to [0, 1].

        Returns:
            ``{layer name: (h_l, w_l) map}``, averaged over the chosen timesteps.
        """
        idx = self._indices(word, occurrence)
        ti = self._time_sel(timesteps, t_range)
        tok = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        return {n: self._finish(self.layer_maps[n][ti][..., tok].mean(-1).mean(0), size,
                                normalize) for n in self.layers}

    def per_timestep(self, word, size=None, layers=None, *, occurrence=None,
                     normalize: bool = False) -> torch.Tensor:
        """Raw maps (layer- and token-averaged), one per entry of ``.timesteps``.

        Args:
            word: a word or token position(s).
            size: (H, W) (or an int side) to upsample to.
            layers: as for `for_token`.
            occurrence: only this occurrence of ``word`` (0-based).
            normalize: scale each map to [0, 1].

        Returns:
            (n_timesteps, h, w) maps.
        """
        return self._finish(self._average(self._indices(word, occurrence), layers), size,
                            normalize)

    def concept_maps(self, words_or_indices, size=None, layers=None, timesteps=None, *,
                     t_range=None, normalize: bool = False) -> torch.Tensor:
        """(K, h, w) stacked maps, raw (not normalised) by default.

        For example for ``conceptlab.masks.assign_labels``.

        Args:
            words_or_indices: one entry per concept: a word / phrase, a token position, or
                a list of positions (averaged); a single word or position is one entry.
            size: (H, W) (or an int side) to upsample to.
            layers: as for `for_token`.
            timesteps: as for `for_token`.
            t_range: as for `for_token`.
            normalize: min-max normalise each map to [0, 1].

        Returns:
            (K, h, w) maps.

        Raises:
            ValueError: no entry was given, or a word is absent.
        """
        if isinstance(words_or_indices, (str, int)):
            words_or_indices = [words_or_indices]
        out = [self._average(self._indices(w), layers, timesteps, t_range).mean(0)
               for w in words_or_indices]
        if not out:
            raise ValueError("concept_maps needs at least one word or index")
        return self._finish(torch.stack(out), size, normalize)

    def _indices(self, w, occurrence=None):
        return self.word_indices(w, occurrence) if isinstance(w, str) else w


# ----------------------------------------------------------------------------- compute
def _check_t_range(t_range, n_train) -> tuple[int, int]:
    lo, hi = int(t_range[0]), int(t_range[1])
    hi = min(hi, n_train)
    if not 0 <= lo < hi:
        raise ValueError(f"t_range must satisfy 0 <= lo < hi <= {n_train}, got {t_range}")
    return lo, hi


def attention_maps(pipe, image, prompt: str, *, n_timesteps: int = 50, seed: int = 0,
                   layers=None, t_range=None, batch_size: int | None = None,
                   generator: torch.Generator | None = None, resize: bool = False,
                   concepts=None) -> AttentionMaps:
    """Cross-attention maps of ``prompt`` on ``image`` (see the module docstring).

    Args:
        pipe: a Stable-Diffusion-style pipeline.
        image: PIL image or (H, W, 3) uint8 array / tensor at the pipeline's native size
            (ValueError otherwise, unless ``resize=True``).
        prompt: the caption whose words are mapped.
        n_timesteps: number of noised copies, t ~ U[t_range) (sorted ascending).
        seed: timesteps and noise come from ``torch.Generator().manual_seed(seed)`` unless
            a ``generator`` is given: same seed -> identical maps.
        layers: see `resolve_layers`; ``None`` -> `default_attention_config`.
        t_range: (lo, hi), hi exclusive; ``None`` -> `default_attention_config`.
        batch_size: U-Net batch (timesteps per forward); default ``min(n_timesteps, 64)``.
        generator: if given, the source of the timesteps and noise instead of ``seed``.
        resize: resize an image of another size (with a warning) instead of refusing it.
        concepts: learned concepts (``ConceptTokens`` or ``LearnedConcepts``) applied for
            this call only, so that ``prompt`` may name their tokens.

    Returns:
        The `AttentionMaps`.

    Raises:
        ValueError: the image has the wrong size (without ``resize``), or
            ``n_timesteps``, ``batch_size``, ``t_range`` or ``layers`` is invalid.
    """
    if concepts is not None:
        with getattr(concepts, "tokens", concepts).applied(pipe):
            return attention_maps(pipe, image, prompt, n_timesteps=n_timesteps, seed=seed,
                                  layers=layers, t_range=t_range, batch_size=batch_size,
                                  generator=generator, resize=resize)
    return _compute(pipe, image, prompt, n_timesteps=n_timesteps, seed=seed, layers=layers,
                    t_range=t_range, batch_size=batch_size, generator=generator, resize=resize)


def sequential_attention_maps(pipe, image, prompt: str, *, n_timesteps: int = 50,
                              seed: int = 0, layers=None, t_range=None,
                              generator: torch.Generator | None = None, resize: bool = False
                              ) -> AttentionMaps:
    """`attention_maps` computed one timestep per U-Net call.

    The reference for the batched path and its speed-up: same inputs, equal results up to
    float rounding.

    Args:
        pipe: a Stable-Diffusion-style pipeline.
        image: as for `attention_maps`.
        prompt: the caption whose words are mapped.
        n_timesteps: number of noised copies.
        seed: as for `attention_maps`.
        layers: as for `attention_maps`.
        t_range: as for `attention_maps`.
        generator: as for `attention_maps`.
        resize: as for `attention_maps`.

    Returns:
        The `AttentionMaps`.
    """
    return _compute(pipe, image, prompt, n_timesteps=n_timesteps, seed=seed, layers=layers,
                    t_range=t_range, batch_size=1, generator=generator, resize=resize)


def _compute(pipe, image, prompt, *, n_timesteps, seed, layers, t_range, batch_size,
             generator, resize) -> AttentionMaps:
    if n_timesteps < 1:
        raise ValueError(f"n_timesteps must be >= 1, got {n_timesteps}")
    unet, vae = pipe.unet, pipe.vae
    defaults = default_attention_config(pipe) if layers is None or t_range is None else None
    names = defaults["layers"] if layers is None else resolve_layers(unet, layers)
    lo, hi = _check_t_range(defaults["t_range"] if t_range is None else t_range,
                            num_train_timesteps(pipe))
    res = layer_resolutions(unet)
    bs = min(n_timesteps, MAX_BATCH) if batch_size is None else int(batch_size)
    if bs < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    x = to_model_input(image, native_size(pipe), resize)
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        latent = encode_pixels(vae, x).to(unet.device, unet.dtype)
        cond, ids = _conditioning_with_ids(pipe, prompt)

        # all randomness drawn up front on the CPU: independent of batch_size and device
        t_all = torch.randint(lo, hi, (n_timesteps,), generator=g).sort().values
        noise = torch.randn((n_timesteps, *latent.shape[1:]), generator=g)
        noise = noise.to(latent.device, latent.dtype)
        noiser = _noiser(pipe)

        h, w = latent.shape[-2:]
        max_res = max(res[n] for n in names)
        chunks: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        with record_attention(unet, max_resolution=max(max_res, h, w), keep_graph=False,
                              layers=names, latent_shape=(h, w)) as store:
            for start in range(0, n_timesteps, bs):
                t = t_all[start:start + bs].to(unet.device)
                b = len(t)
                z = noiser.add_noise(latent.expand(b, -1, -1, -1), noise[start:start + bs], t)
                unet(z, t, **cond.unet_kwargs(b, unet.dtype), return_dict=False)
                for n in names:
                    calls = store.maps.get(n, [])
                    if len(calls) != 1:
                        raise RuntimeError(f"expected one recorded call of {n}, got "
                                           f"{len(calls)}")
                    chunks[n].append(calls[0].mean(1).float().cpu())  # (b, h_l, w_l, T)
                store.clear()

    layer_maps = {n: torch.cat(chunks[n]) for n in names}
    tok_raw = pipe.tokenizer.convert_ids_to_tokens(ids.tolist())
    tokens = [t.removesuffix(EOW) for t in tok_raw]
    return AttentionMaps(
        prompt=prompt, input_ids=ids, tokens=tokens, timesteps=t_all, layers=list(names),
        layer_maps=layer_maps, layer_resolution={n: layer_maps[n].shape[1] for n in names},
        t_range=(lo, hi), seed=None if generator is not None else seed, _tokenizer=pipe.tokenizer)
