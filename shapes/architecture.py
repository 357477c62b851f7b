"""The embedded model's architecture: a Stable-Diffusion-format model small enough to train on 2 CPU cores.

64 px images, a VAE with 4x down-sampling (16x16x4 latents, as SD's 8x at 512 px gives 64x64x4),
a UNet with cross-attention at 16x16, 8x8 and 4x4, and a CLIP text encoder over CLIP's real
49,408-token vocabulary. Every part is a stock diffusers/transformers class, so the pipelines and
attention processors that run it run SD 1.x unchanged.
"""

from __future__ import annotations

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

IMAGE_SIZE = 64
LATENT_SIZE = 16
TEXT_WIDTH = 64

# SD's betas rescaled to zero terminal SNR (Lin et al. 2024), so the last step is pure noise and the
# text alone decides how many objects there are and where: with SD's own schedule a 16x16 latent
# keeps enough signal at t=999 that the starting noise picked count and shape. Zero SNR needs
# v-prediction and steps that start at t=999 ("trailing").
SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    rescale_betas_zero_snr=True,
    timestep_spacing="trailing",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,  # unused by trailing spacing; StableDiffusionPipeline warns about any other value
    prediction_type="v_prediction",
)


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=IMAGE_SIZE,
    )


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        attention_head_dim=4,
        cross_attention_dim=TEXT_WIDTH,
        norm_num_groups=32,
    )


def build_text_encoder() -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=TEXT_WIDTH,
            intermediate_size=4 * TEXT_WIDTH,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            projection_dim=TEXT_WIDTH,
        )
    )


def train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**{k: v for k, v in SCHEDULE.items() if k != "set_alpha_to_one"})


def sample_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULE)


# The embedded MM-DiT: SD3's layout at the shapes world's size. Its tokenizers pad captions to CAPTION_TOKENS (the
# world's longest caption is 15 tokens), which SD3's pipeline also takes as the length of the T5 positions it fills with
# zeros when `text_encoder_3=None`: 24 + 24 text tokens beside 64 image tokens, where 77 + 77 would triple the cost.
CAPTION_TOKENS = 24
MMDIT_WIDTH = 128


def build_mmdit() -> SD3Transformer2DModel:
    """The MM-DiT, initialised adaLN-Zero (DiT, Peebles and Xie 2023): every block's modulation and the output layer
    start at zero, so each block starts as the identity and the model predicts zero. Against diffusers' default
    initialisation, same recipe otherwise, it drew 43 % of one-object prompts exactly against 38 %, and 13 % of
    two-object prompts against 6 % (benchmarks/RESULTS.md, issue 30)."""
    model = SD3Transformer2DModel(sample_size=LATENT_SIZE, patch_size=2, in_channels=4, out_channels=4, num_layers=6,
                                  attention_head_dim=32, num_attention_heads=4, joint_attention_dim=2 * TEXT_WIDTH,
                                  caption_projection_dim=MMDIT_WIDTH, pooled_projection_dim=2 * TEXT_WIDTH,
                                  pos_embed_max_size=4 * LATENT_SIZE // 2)
    zeroed = [layer for block in model.transformer_blocks for layer in (block.norm1.linear, block.norm1_context.linear)]
    with torch.no_grad():
        for layer in (*zeroed, model.norm_out.linear, model.proj_out):
            layer.weight.zero_()
            layer.bias.zero_()
    return model


def build_projected_text_encoder() -> CLIPTextModelWithProjection:
    """SD3's CLIP encoders' class: the pooled, projected vector beside the token states."""
    return CLIPTextModelWithProjection(build_text_encoder().config)


def flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Rectified flow sampling at the world's size: SD3's scheduler without its 1024 px shift."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
