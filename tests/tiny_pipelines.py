"""Tiny random SD3.5 and SD1.5 pipelines of the real diffusers / transformers classes, saved with
``save_pretrained``: the paper path's loading, conditioning and training code runs on them without
weights or network."""

from __future__ import annotations

import string
from pathlib import Path

RESOLUTION = 32  # the tiny VAEs downsample 8x, as the real ones: 4 x 4 latents
T5_LENGTH = 8
CLIP_LENGTH = 16
PROMPTS = ["a photo of a cat", "a dog"]


def clip_tokenizer():
    """Byte-level BPE over single letters (no merges): every lower-case prompt is representable."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in string.ascii_lowercase:
        vocab[letter] = len(vocab)
        vocab[f"{letter}</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_LENGTH)


def t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(letter, -3.0) for letter in string.ascii_lowercase]
    pieces += [(f"\u2581{word}", -1.0) for word in ("a", "photo", "of", "cat", "dog")]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_LENGTH)


def clip(width: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=54,
        hidden_size=width,
        intermediate_size=2 * width,
        projection_dim=width,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_LENGTH,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def vae(latent_channels: int, scaling_factor: float, shift_factor: float | None):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=RESOLUTION,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )


def save_sd3(directory: Path, resolution: int = RESOLUTION) -> None:
    """``resolution``: the pixel size the transformer's position embedding covers (the VAE is size-free)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    t5 = T5EncoderModel(
        T5Config(vocab_size=35, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2, pad_token_id=0)
    )
    transformer = SD3Transformer2DModel(
        sample_size=resolution // 8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5's width; the CLIP states (8 + 12) are zero-padded to it
        caption_projection_dim=16,
        pooled_projection_dim=8 + 12,
        pos_embed_max_size=max(4, resolution // 16),
        dual_attention_layers=(0,),  # SD3.5-M's MMDiT-X block and qk-norm
        qk_norm="rms_norm",
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=2.5),  # not 3: the shift must be read, not assumed
        vae=vae(16, scaling_factor=1.5, shift_factor=0.1),
        text_encoder=clip(8, projection=True),
        tokenizer=clip_tokenizer(),
        text_encoder_2=clip(12, projection=True),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer(),
    )
    pipe.save_pretrained(directory)


def save_sd15(directory: Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=8,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae(4, scaling_factor=0.18215, shift_factor=None),
        text_encoder=clip(8, projection=False),
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory)


def save_taesd3(directory: Path, scaling_factor: float = 1.5, shift_factor: float = 0.1) -> None:
    """A tiny random TAESD3 (``AutoencoderTiny`` with SD3's 16 latent channels) in the repo's layout:
    config.json and weights at the root. Scale and shift are not 1 and 0, so the decode formula shows."""
    from diffusers import AutoencoderTiny

    AutoencoderTiny(
        latent_channels=16,
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    ).save_pretrained(directory)
