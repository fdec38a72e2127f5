"""Training data of concept learning: images with concept masks, and one step's batch.

    ConceptImage(image,            # path, PIL image or (H, W, 3) uint8 array
                 masks,            # (K_i, H, W) bool (or float in [0, 1]): one row per concept
                 concept_ids)      # K_i ints: which concept (index into the tokens) each row is

so a concept may appear in one image or in several, and an image may hold any subset of the
concepts. All images must have the same size (they are batched).

A batch (Break-a-Scene's "union sampling"), for each of ``batch_size`` samples:

1. pick an image at random, then a random non-empty subset ``s`` of the concepts in it
   (size uniform in 1..K_i, then a uniform subset, in random order);
2. flip image and masks horizontally with probability 1/2 (``config.flip``);
3. ``t ~ U{t_lo .. t_hi-1}``; then ``eps ~ N(0, I)`` for the whole batch.

`draw_samples` makes those draws (all from ONE ``torch.Generator``, in a fixed order:
resuming a run replays them exactly) and `assemble` turns them into a `Batch`
of tensors: clean latents, noise, timesteps, the prompt ids, where each concept token sits
in them, and the masks of the concepts each prompt names.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..models import prompt_ids, to_uint8


@dataclass
class ConceptImage:
    """One training image, the masks of the concepts it shows, and which concepts they are.

    The fields are converted on creation: the image to (H, W, 3) uint8, the masks to a
    (K_i, H', W') bool or float32 array.

    Attributes:
        image: a path, a PIL image or an (H, W, 3) array (see
            `conceptlab.models.to_uint8`).
        masks: (K_i, H', W') bool or float in [0, 1] (any resolution; (H', W') is read as
            one mask), row j = the mask of concept ``concept_ids[j]``.
        concept_ids: K_i distinct concept indices (default ``0 .. K_i-1``).

    Raises:
        ValueError: the masks are not (K, H, W) bool or float in [0, 1] with K >= 1, or
            the concept ids are not one distinct id per mask row.
    """

    image: np.ndarray
    masks: np.ndarray
    concept_ids: list = None

    def __post_init__(self):
        self.image = to_uint8(self.image)
        m = self.masks
        m = m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m)
        if m.ndim == 2:
            m = m[None]
        if m.ndim != 3 or m.shape[0] < 1:
            raise ValueError(f"masks must be (K, H, W) with K >= 1, got shape {m.shape}")
        if m.dtype != bool:
            if not (np.issubdtype(m.dtype, np.number)):
                raise ValueError(f"masks must be bool or float in [0, 1], got dtype {m.dtype}")
            m = m.astype(np.float32)
            if not np.isfinite(m).all() or m.min() < 0 or m.max() > 1:
                raise ValueError("float masks must lie in [0, 1]")
        self.masks = m
        if self.concept_ids is None:
            self.concept_ids = list(range(m.shape[0]))
        self.concept_ids = [int(c) for c in self.concept_ids]
        if len(self.concept_ids) != m.shape[0]:
            raise ValueError(f"{m.shape[0]} masks but {len(self.concept_ids)} concept ids "
                             f"{self.concept_ids}: give one id per mask row")
        if len(set(self.concept_ids)) != len(self.concept_ids):
            raise ValueError(f"concept ids must be distinct within an image: {self.concept_ids}")

    @classmethod
    def from_scene(cls, scene, concept_ids=None, background: bool = False) -> ConceptImage:
        """From a `conceptlab.shapes.world.Scene`.

        Args:
            scene: the scene; its objects (in drawing order) are the concepts.
            concept_ids: as for the class (default ``0 .. K_i-1``).
            background: add the background as the last concept.

        Returns:
            The `ConceptImage`.
        """
        masks = list(scene.object_masks) + ([scene.background_mask] if background else [])
        return cls(scene.image, np.stack(masks), concept_ids)

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the image."""
        return self.image.shape[:2]


def make_concept_images(images, masks, concept_ids=None) -> list[ConceptImage]:
    """Zip images, per-image masks and per-image concept ids into `ConceptImage` objects.

    Args:
        images: a list of images, or one (H, W, 3) array (then ``masks`` is its masks).
        masks: per image, its (K_i, H, W) masks.
        concept_ids: per image, its concept ids; None: image i's mask rows are concepts
            ``0 .. K_i-1``.

    Returns:
        One `ConceptImage` per image.

    Raises:
        ValueError: the numbers of images and mask arrays differ, or as for
            `ConceptImage`.
    """
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images, masks = [images], [masks]
    images, masks = list(images), list(masks)
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} images but {len(masks)} mask arrays")
    ids = [None] * len(images) if concept_ids is None else list(concept_ids)
    return [ConceptImage(im, m, c) for im, m, c in zip(images, masks, ids)]


def as_data(data) -> list[ConceptImage]:
    """Training data as a list of `ConceptImage`.

    Args:
        data: a `ConceptImage` or a non-empty list of them.

    Returns:
        The list.

    Raises:
        TypeError: ``data`` is neither.
    """
    if isinstance(data, ConceptImage):
        return [data]
    data = list(data)
    if not data or not all(isinstance(d, ConceptImage) for d in data):
        raise TypeError("data must be a ConceptImage or a non-empty list of them (see "
                        "make_concept_images(images, masks, concept_ids))")
    return data


def full_size_masks(data: list[ConceptImage], size) -> list[torch.Tensor]:
    """Each image's masks as float tensors at the image size (nearest-exact resampling).

    Args:
        data: the training images.
        size: (H, W) of the images.

    Returns:
        Per image, its (K_i, H, W) float masks.
    """
    out = []
    for d in data:
        m = torch.from_numpy(np.asarray(d.masks, np.float32))
        if tuple(m.shape[-2:]) != tuple(size):
            m = F.interpolate(m[None], size=tuple(size), mode="nearest-exact")[0]
        out.append(m)
    return out


# ----------------------------------------------------------------------------- one batch
@dataclass
class Sample:
    """The random choices of one sample of a batch.

    Attributes:
        image: index of the image.
        subset: concept indices, in prompt order.
        flip: whether image and masks are flipped horizontally.
        t: the timestep.
    """

    image: int
    subset: list  # concept indices, in prompt order
    flip: bool
    t: int


@dataclass
class Batch:
    """Everything one loss evaluation needs (B samples, K concepts).

    Attributes:
        z0: (B, C, h, w) clean latents (flipped where the sample is).
        noise: (B, C, h, w).
        t: (B,) int64 timesteps.
        ids: (B, T) prompt ids.
        positions: (B, K) position of concept k's token in prompt b, or -1.
        masks: (B, K, H, W) mask of concept k in sample b (0 if not named).
        valid: (B, K) bool: concept k is named in prompt b.
        prompts: the B prompts.
    """

    z0: torch.Tensor         # (B, C, h, w) clean latents (flipped where the sample is)
    noise: torch.Tensor      # (B, C, h, w)
    t: torch.Tensor          # (B,) int64
    ids: torch.Tensor        # (B, T) prompt ids
    positions: torch.Tensor  # (B, K) position of concept k's token in prompt b, or -1
    masks: torch.Tensor      # (B, K, H, W) mask of concept k in sample b (0 if not named)
    valid: torch.Tensor      # (B, K) bool: concept k is named in prompt b
    prompts: list


def draw_samples(generator: torch.Generator, data: list[ConceptImage], batch_size: int,
                 t_range, flip: bool) -> list[Sample]:
    """The random choices of one batch (see the module doc), in a fixed draw order.

    Args:
        generator: the source of every draw.
        data: the training images.
        batch_size: samples to draw.
        t_range: (lo, hi), timesteps drawn from [lo, hi).
        flip: allow horizontal flips (with probability 1/2).

    Returns:
        One `Sample` per batch entry.
    """
    g = generator
    lo, hi = t_range
    samples = []
    for _ in range(batch_size):
        i = int(torch.randint(len(data), (1,), generator=g))
        present = data[i].concept_ids
        n = int(torch.randint(1, len(present) + 1, (1,), generator=g))
        perm = torch.randperm(len(present), generator=g)[:n].tolist()
        flipped = bool(torch.rand((), generator=g) < 0.5) and flip
        t = int(torch.randint(lo, hi, (1,), generator=g))
        samples.append(Sample(i, [present[j] for j in perm], flipped, t))
    return samples


def token_positions(ids: torch.Tensor, samples, token_ids, names, prompts, *,
                    strict: bool = True) -> torch.Tensor:
    """Where each named concept's token is in each prompt's ids.

    Args:
        ids: (B, T) prompt ids.
        samples: the B samples.
        token_ids: the K concept tokens' ids.
        names: the K concept tokens.
        prompts: the B prompts (for the error message).
        strict: a token cut from a too-long prompt is an error instead of -1.

    Returns:
        (B, K) positions (-1: not named).

    Raises:
        ValueError: with ``strict``, a named token is not in its prompt's ids.
    """
    positions = torch.full((len(samples), len(token_ids)), -1, dtype=torch.long)
    for b, s in enumerate(samples):
        for k in s.subset:
            where = (ids[b] == token_ids[k]).nonzero()
            if len(where) == 0:
                if strict:
                    raise ValueError(f"token {names[k]} was cut from the prompt {prompts[b]!r} "
                                     "(too long for the text encoder)")
                continue
            positions[b, k] = int(where[0])
    return positions


def assemble(samples, noise, latents, masks, row_of, tokenizer, concepts, token_ids,
             config) -> Batch:
    """Tensors of a batch.

    Args:
        samples: the B samples (`draw_samples`).
        noise: (B, C, h, w) noise.
        latents: ``latents[i]`` is image i's (2, C, h, w) (unflipped, flipped) latent pair.
        masks: ``masks[i]`` is image i's (K_i, H, W) masks.
        row_of: ``row_of[i][k]`` is concept k's row in ``masks[i]``.
        tokenizer: the pipeline's tokenizer.
        concepts: the concept tokens (their ``prompt`` and ``names``).
        token_ids: the concept tokens' ids in the applied pipeline.
        config: the `TrainConfig` (its ``template`` and ``joiner``).

    Returns:
        The `Batch`.

    Raises:
        ValueError: a concept token was cut from a too-long prompt.
    """
    B, K = len(samples), len(concepts)
    z0 = torch.stack([latents[s.image][int(s.flip)] for s in samples])
    H, W = masks[0].shape[-2:]
    m = torch.zeros(B, K, H, W)
    valid = torch.zeros(B, K, dtype=torch.bool)
    for b, s in enumerate(samples):
        for k in s.subset:
            mk = masks[s.image][row_of[s.image][k]]
            m[b, k] = mk.flip(-1) if s.flip else mk
            valid[b, k] = True
    prompts = [concepts.prompt(s.subset, config.template, config.joiner) for s in samples]
    ids = prompt_ids(tokenizer, prompts)
    positions = token_positions(ids, samples, token_ids, concepts.names, prompts)
    t = torch.tensor([s.t for s in samples], dtype=torch.long, device=z0.device)
    return Batch(z0, noise.to(z0.device, z0.dtype), t, ids, positions, m, valid, prompts)


__all__ = [
    "Batch",
    "ConceptImage",
    "Sample",
    "as_data",
    "assemble",
    "draw_samples",
    "full_size_masks",
    "make_concept_images",
    "token_positions",
]
