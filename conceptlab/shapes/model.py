"""Build the miniature text-to-image latent diffusion model from standard classes.

Every part is a stock diffusers / transformers class, so the bundled model loads with
``diffusers.StableDiffusionPipeline.from_pretrained`` and everything in conceptlab that
works on it also works on Stable Diffusion:

- ``transformers.CLIPTokenizer`` with a word-level vocabulary built from the shapes world
  (one token per word: clean per-word attention maps);
- ``transformers.CLIPTextModel`` (2 layers, hidden size 128);
- ``diffusers.AutoencoderKL`` (64x64x3 -> 16x16x4);
- ``diffusers.UNet2DConditionModel`` with cross-attention at 16x16 and 8x8;
- ``diffusers.DDIMScheduler`` (scaled-linear betas, as Stable Diffusion).
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import asdict, dataclass, field

import torch

from . import world

SPECIAL = ("<|startoftext|>", "<|endoftext|>")
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-,.[]!?'"


@dataclass
class ModelConfig:
    """Sizes of the bundled model (``bundled``) and of the tiny test model (``tiny``)."""

    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    max_length: int = 32
    vae_channels: tuple = (16, 32, 64)
    latent_channels: int = 4
    unet_channels: tuple = (48, 96)
    unet_layers_per_block: int = 1
    unet_heads: int = 4
    image_size: int = 64
    extra: dict = field(default_factory=dict)

    def to_dict(self):
        return asdict(self)


BUNDLED_V1 = ModelConfig()  # the first shipped model (16x16x4 latents, U-Net 48/96)
BUNDLED = ModelConfig(latent_channels=8, unet_channels=(64, 128))  # model v2
TINY = ModelConfig(text_hidden=32, text_layers=1, text_heads=2, vae_channels=(8, 16, 16),
                   unet_channels=(16, 32), unet_heads=2, image_size=32)


# ----------------------------------------------------------------------------- tokenizer
def _bpe(word: str, ranks: dict) -> list[str]:
    """Byte-pair encode one word (with CLIP's '</w>' end marker) given merge ranks."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(itertools.pairwise(parts))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return parts


def build_vocab(words=None) -> tuple[dict, list[tuple[str, str]]]:
    """CLIP-format BPE vocabulary and merges in which every world word is ONE token.

    Characters (with and without the end-of-word marker) stay in the vocabulary, so any
    other word still tokenises (into pieces). Merges are added greedily, lowest priority
    last, which cannot change how earlier words are split.
    """
    words = list(words if words is not None else world.vocabulary())
    vocab: dict[str, int] = {}
    for tok in list(SPECIAL) + list(CHARS) + [c + "</w>" for c in CHARS]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    ranks: dict = {}
    for w in words:
        for piece in _split_like_clip(w):
            while len(parts := _bpe(piece, ranks)) > 1:
                pair = (parts[0], parts[1])
                ranks[pair] = len(merges)
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
    return vocab, merges


def _split_like_clip(word: str) -> list[str]:
    import re
    return re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", word.lower())


def build_tokenizer(max_length: int = 32):
    from transformers import CLIPTokenizer

    vocab, merges = build_vocab()
    try:
        tok = CLIPTokenizer(vocab=vocab, merges=merges)  # transformers 5
    except TypeError:  # transformers 4 reads the vocabulary and merges from files only
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "vocab.json"), "w") as f:
                json.dump(vocab, f)
            with open(os.path.join(d, "merges.txt"), "w") as f:
                f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
            tok = CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"),
                                pad_token="<|endoftext|>")
    tok.model_max_length = max_length
    for w in world.vocabulary():
        for piece in _split_like_clip(w):
            ids = tok(piece, add_special_tokens=False).input_ids
            assert len(ids) == 1, f"word {piece!r} is not a single token: {ids}"
    return tok


# ----------------------------------------------------------------------------- components
def build_components(cfg: ModelConfig = BUNDLED, seed: int = 0) -> dict:
    """Fresh, randomly initialised components of a StableDiffusionPipeline."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(cfg.max_length)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden,
        intermediate_size=4 * cfg.text_hidden, num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads, max_position_embeddings=cfg.max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=cfg.text_hidden,
    ))
    n = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(cfg.vae_channels),
        layers_per_block=1, latent_channels=cfg.latent_channels,
        norm_num_groups=min(8, cfg.vae_channels[0]), sample_size=cfg.image_size,
        mid_block_add_attention=False,  # fully convolutional: trains on crops
    )
    unet = UNet2DConditionModel(
        sample_size=cfg.image_size // 2 ** (n - 1), in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels, block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=cfg.unet_layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * len(cfg.unet_channels),
        up_block_types=("CrossAttnUpBlock2D",) * len(cfg.unet_channels),
        cross_attention_dim=cfg.text_hidden, attention_head_dim=cfg.unet_heads,
        norm_num_groups=min(16, cfg.unet_channels[0]),
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1, prediction_type="epsilon",
    )
    return dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                scheduler=scheduler)


def make_pipeline(components: dict):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe


def tiny_pipeline(seed: int = 0):
    """A random-weight SD-shaped pipeline built from config in code (for tests), like
    diffusers' ``get_dummy_components``: loads nothing, runs in milliseconds."""
    pipe = make_pipeline(build_components(TINY, seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe_model(pipe) -> dict:
    """Parameter counts and key sizes of a pipeline (for model cards and notebook 00)."""
    return {
        "text_encoder": count_parameters(pipe.text_encoder),
        "vae": count_parameters(pipe.vae),
        "unet": count_parameters(pipe.unet),
        "vocab_size": len(pipe.tokenizer),
        "latent_shape": [pipe.unet.config.in_channels, pipe.unet.config.sample_size,
                         pipe.unet.config.sample_size],
        "image_size": pipe.unet.config.sample_size * pipe.vae_scale_factor,
    }

