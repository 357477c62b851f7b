"""Tiny random-weight pipelines of the real architectures, built offline, for coverage tests."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from shapes import MODEL_PATH


def _tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(MODEL_PATH / "tokenizer")


def _text_config(hidden: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                          pad_token_id=49407, projection_dim=hidden)


def _vae() -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(32, 32), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32)


def _scheduler(prediction: str = "epsilon") -> DDIMScheduler:
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction)


def _sd(unet: UNet2DConditionModel, prediction: str = "epsilon") -> StableDiffusionPipeline:
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=CLIPTextModel(_text_config()), tokenizer=_tokenizer(), unet=unet,
                                   scheduler=_scheduler(prediction), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd1() -> StableDiffusionPipeline:
    """SD 1.x layout, 16x16 latent: cross-attention at 16x16 and 8x8 (down, up) and 4x4 (mid)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=32,
                                attention_head_dim=2, norm_num_groups=32,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    return _sd(unet)


def sd1_64() -> StableDiffusionPipeline:
    """SD 1.x's four levels at a 64x64 latent: cross-attention at 64, 32, 16 and 8 (mid)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, block_out_channels=(32, 32, 32, 32), layers_per_block=1, cross_attention_dim=32,
                                attention_head_dim=2, norm_num_groups=32,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    return _sd(unet)


def sd2_v() -> StableDiffusionPipeline:
    """SD 2.x: linear projections, per-block head dims, upcast attention, v-prediction."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True, norm_num_groups=32,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return _sd(unet, "v_prediction")


def sdxl() -> StableDiffusionXLPipeline:
    """SDXL: two text encoders, added time ids, two transformer layers in the deeper block."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
                                attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                projection_class_embeddings_input_dim=80, norm_num_groups=32,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=CLIPTextModel(_text_config()),
                                     text_encoder_2=CLIPTextModelWithProjection(_text_config()), tokenizer=_tokenizer(),
                                     tokenizer_2=_tokenizer(), unet=unet, scheduler=_scheduler(), force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


ARCHITECTURES = {"sd1": sd1, "sd1-64": sd1_64, "sd2-v": sd2_v, "sdxl": sdxl}
