"""Random-weight pipelines shaped like Stable Diffusion 1.5, 2.1 and SDXL.

No Stable Diffusion weights can be downloaded where conceptlab is built and tested, so the
code paths that real models take are checked on pipelines built from diffusers' and
transformers' own classes with random weights:

- ``"sd15"``: ``StableDiffusionPipeline``, 512 px (64x64 latent), epsilon prediction, one
  CLIP text encoder, convolutional projections in the transformer blocks;
- ``"sd21"``: ``StableDiffusionPipeline``, 768 px (96x96 latent), v-prediction, linear
  projections (``use_linear_projection``), per-level head counts (the tiny one has no
  attention at the first, 96x96 level: seconds per step on a CPU otherwise);
- ``"sdxl"``: ``StableDiffusionXLPipeline``, 1024 px (128x128 latent), two text encoders
  (CLIP and CLIP-with-projection, their hidden states concatenated), ``text_time`` added
  conditions, no attention at the first level, several transformer layers per block.

``size="tiny"`` gives the same structure with a few channels (seconds on a CPU: the
tests); ``size="full"`` gives the real architectures' sizes (``benchmarks/gpu_memory.py``
measures their training memory). The tokenizer is the bundled model's small one (the
shapes world's words) in both, so prompts and init words are the same as in the course.

    pipe = random_pipeline("sdxl")          # tiny, seconds to build
    pipe.save_pretrained(folder)            # then: conceptlab learn ... --model folder
"""

from __future__ import annotations

import torch

FAMILIES = ("sd15", "sd21", "sdxl")

#: the real architectures' settings that differ between the families
_FULL = {
    "sd15": dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280),
                 cross_attention_dim=768, attention_head_dim=8, layers_per_block=2),
    "sd21": dict(sample_size=96, block_out_channels=(320, 640, 1280, 1280),
                 cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                 use_linear_projection=True, layers_per_block=2),
    "sdxl": dict(sample_size=128, block_out_channels=(320, 640, 1280),
                 cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                 layers_per_block=2),
}
_TINY = {
    "sd15": dict(sample_size=64, block_out_channels=(8, 8, 16, 16), cross_attention_dim=32,
                 attention_head_dim=2, layers_per_block=1, norm_num_groups=8),
    "sd21": dict(sample_size=96, block_out_channels=(8, 16, 16), cross_attention_dim=32,
                 attention_head_dim=(2, 2, 4), use_linear_projection=True,
                 layers_per_block=1, norm_num_groups=8),
    "sdxl": dict(sample_size=128, block_out_channels=(8, 16, 16), cross_attention_dim=64,
                 attention_head_dim=(2, 2, 4), transformer_layers_per_block=(1, 1, 2),
                 use_linear_projection=True, addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=8 * 6 + 32, layers_per_block=1,
                 norm_num_groups=8),
}
#: text encoders: (hidden size, layers, heads, intermediate size, activation)
_TEXT = {
    "full": {"sd15": [(768, 12, 12, 3072, "quick_gelu")],
             "sd21": [(1024, 23, 16, 4096, "gelu")],
             "sdxl": [(768, 12, 12, 3072, "quick_gelu"), (1280, 32, 20, 5120, "gelu")]},
    "tiny": {"sd15": [(32, 2, 2, 37, "quick_gelu")],
             "sd21": [(32, 2, 2, 37, "gelu")],
             "sdxl": [(32, 2, 2, 37, "quick_gelu"), (32, 2, 2, 37, "gelu")]},
}


def _unet(family: str, size: str):
    from diffusers import UNet2DConditionModel

    kw = dict((_FULL if size == "full" else _TINY)[family])
    levels = len(kw["block_out_channels"])
    if family == "sdxl" or (family == "sd21" and size == "tiny"):
        # SDXL has no attention at the first level; the tiny SD 2.1 drops it too, because
        # its 96x96 self-attention would take seconds per step on a CPU (its maps are the
        # 24x24 layers all the same)
        kw |= dict(down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
                   up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
                   **({"addition_embed_type": "text_time", "addition_embed_type_num_heads": 64}
                      if family == "sdxl" else {}))
    else:
        kw |= dict(down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
                   up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1))
    return UNet2DConditionModel(in_channels=4, out_channels=4, **kw)


def _vae(family: str, size: str):
    from diffusers import AutoencoderKL

    channels = (128, 256, 512, 512) if size == "full" else (8, 8, 8, 8)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=channels, layers_per_block=2 if size == "full" else 1,
        latent_channels=4, norm_num_groups=32 if size == "full" else 8,
        sample_size=_TINY[family]["sample_size"] * 8,
        scaling_factor=0.13025 if family == "sdxl" else 0.18215)


def _text_encoder(spec, tok, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    hidden, layers, heads, inter, act = spec
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         max_position_embeddings=77, hidden_act=act, projection_dim=hidden,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def _scheduler(family: str):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    kw = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              steps_offset=1, timestep_spacing="leading")
    if family == "sdxl":
        return EulerDiscreteScheduler(**kw)
    return DDIMScheduler(**kw, clip_sample=False, set_alpha_to_one=False,
                         prediction_type="v_prediction" if family == "sd21" else "epsilon")


def random_pipeline(family: str = "sd15", size: str = "tiny", seed: int = 0):
    """A pipeline of ``family``'s architecture with random weights (see the module doc).

    Args:
        family: "sd15", "sd21" or "sdxl".
        size: "tiny" (a few channels, for tests) or "full" (the real sizes: 0.9 G U-Net
            parameters for SD 1.5 and 2.1, 2.6 G for SDXL).
        seed: seeds the weights.

    Returns:
        A ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` on the CPU in float32.

    Raises:
        ValueError: an unknown family or size.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from .shapes.model import build_tokenizer

    torch.manual_seed(seed)
    tok = build_tokenizer(77)
    specs = _TEXT[size][family]
    parts = dict(unet=_unet(family, size), vae=_vae(family, size), tokenizer=tok,
                 text_encoder=_text_encoder(specs[0], tok, with_projection=False),
                 scheduler=_scheduler(family))
    if family == "sdxl":
        tok2 = build_tokenizer(77)
        parts |= dict(tokenizer_2=tok2, text_encoder_2=_text_encoder(specs[1], tok2, True))
        pipe = StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


__all__ = ["FAMILIES", "random_pipeline"]
