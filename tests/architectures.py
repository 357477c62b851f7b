"""Tiny random-weight pipelines built like the real ones, offline, for coverage tests.

Each follows its model's published configuration where it matters to xattn: SD 1.5's PNDM
scheduler (skip_prk_steps, steps_offset 1), SD 2.1-v's v-prediction DDIM and linear projections,
SDXL's two text encoders, size ids and Euler scheduler, the SDXL refiner's img2img pipeline with
only the second text encoder and aesthetic-score ids. `SETUPS` adds what users load on top: fused
projections, attention slicing, FreeU, peft LoRA, IP-Adapter, float16 and bfloat16,
`torch.compile`, and the img2img and inpaint pipelines. `TRANSFORMERS` holds the transformer families: SD3
(patch grid, the last block's context `context_pre_only`, CLIP-L and CLIP-G side by side, then T5), SD3.5 (qk-norm,
dual attention), Flux (double- then single-stream blocks, RoPE, 2x2 packing, distilled guidance) and PixArt-alpha
(DiT cross-attention to T5), with a sentencepiece (Unigram, "▁") tokenizer of their own for T5.
"""

from __future__ import annotations

import copy

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from shapes import MODEL_PATH

# The schedulers' published configurations (scheduler/scheduler_config.json of each model).
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False)
SD21_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                      steps_offset=1, prediction_type="v_prediction")
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1,
                      timestep_spacing="leading", interpolation_type="linear", prediction_type="epsilon", use_karras_sigmas=False)
IMAGE_EMBED = 16  # the tiny image encoder's projection width


def _tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(MODEL_PATH / "tokenizer")


def _text_config(hidden: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                          pad_token_id=49407, projection_dim=hidden)


def _vae() -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(32, 32), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32)


def _sd(unet: UNet2DConditionModel, scheduler) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=CLIPTextModel(_text_config()), tokenizer=_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sd1_unet(sample_size: int, channels: tuple[int, ...], down: tuple[str, ...], up: tuple[str, ...]) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=sample_size, block_out_channels=channels, layers_per_block=1, cross_attention_dim=32,
                                attention_head_dim=2, norm_num_groups=32, down_block_types=down, up_block_types=up)


def sd1() -> StableDiffusionPipeline:
    """SD 1.5 layout and scheduler (PNDM), 16x16 latent: cross-attention at 16x16 and 8x8 (down, up) and 4x4 (mid)."""
    unet = _sd1_unet(16, (32, 64, 64), ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                     ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    return _sd(unet, PNDMScheduler.from_config(SD15_SCHEDULER))


def sd1_64() -> StableDiffusionPipeline:
    """SD 1.5's four levels at a 64x64 latent: cross-attention at 64, 32, 16 and 8 (mid)."""
    unet = _sd1_unet(64, (32, 32, 32, 32), ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    return _sd(unet, PNDMScheduler.from_config(SD15_SCHEDULER))


def sd2_v() -> StableDiffusionPipeline:
    """SD 2.1-v: linear projections, per-block head dims, upcast attention, v-prediction DDIM."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True, norm_num_groups=32,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return _sd(unet, DDIMScheduler.from_config(SD21_SCHEDULER))


def _sdxl_unet(cross: int, time_ids: int, pooled: int) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=cross,
                                attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                projection_class_embeddings_input_dim=pooled + time_ids * 8, norm_num_groups=32,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))


def sdxl() -> StableDiffusionXLPipeline:
    """SDXL base: two text encoders, six size ids, two transformer layers in the deeper block, Euler."""
    unet = _sdxl_unet(cross=64, time_ids=6, pooled=32)
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=CLIPTextModel(_text_config()),
                                     text_encoder_2=CLIPTextModelWithProjection(_text_config()), tokenizer=_tokenizer(),
                                     tokenizer_2=_tokenizer(), unet=unet, scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
                                     force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_refiner() -> StableDiffusionXLImg2ImgPipeline:
    """SDXL's refiner: img2img, the second text encoder only, five ids (size, crop, aesthetic score)."""
    unet = _sdxl_unet(cross=64, time_ids=5, pooled=64)
    torch.manual_seed(0)
    pipe = StableDiffusionXLImg2ImgPipeline(vae=_vae(), text_encoder=None, text_encoder_2=CLIPTextModelWithProjection(_text_config(64)),
                                            tokenizer=None, tokenizer_2=_tokenizer(), unet=unet,
                                            scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER), requires_aesthetics_score=True,
                                            force_zeros_for_empty_prompt=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


ARCHITECTURES = {"sd1": sd1, "sd1-64": sd1_64, "sd2-v": sd2_v, "sdxl": sdxl}

T5_WORDS = ("a", "an", "red", "blue", "green", "yellow", "circle", "square", "tri", "and", "on", "the", "left", "right",
            "of", "above", "below", "photo", "cat", "dog")
# The published schedulers: SD3's shift 3; Flux-dev's resolution-dependent (dynamic) shift.
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)


def t5_tokenizer() -> T5TokenizerFast:
    """A sentencepiece-style tokenizer built like T5's: Unigram pieces with "▁" for a leading space, </s> appended,
    <pad> 0. Shape words are pieces of their own except "triangle" ("▁tri" + "angle"); other words fall to letters."""
    letters = "abcdefghijklmnopqrstuvwxyz0123456789.,'!?-"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0), ("angle", -3.5)]
    vocab += [("▁" + w, -3.0) for w in T5_WORDS] + [(c, -6.0) for c in letters]
    vocab += [("▁" + c, -7.0) for c in letters if c not in T5_WORDS]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                           model_max_length=512)


def _t5(width: int) -> T5EncoderModel:
    torch.manual_seed(2)
    return T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer()), d_model=width, d_kv=8, d_ff=2 * width, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8)).eval()


def _flow_vae() -> AutoencoderKL:
    """SD3's and Flux's VAE config: a shift as well as a scale."""
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(32, 32), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=32, scaling_factor=1.5305, shift_factor=0.0609)


def _sd3(qk_norm: str | None, dual_attention_layers: tuple[int, ...], t5: bool) -> StableDiffusion3Pipeline:
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                                        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
                                        pooled_projection_dim=64, out_channels=4, pos_embed_max_size=32, qk_norm=qk_norm,
                                        dual_attention_layers=dual_attention_layers)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER), vae=_flow_vae(),
        text_encoder=CLIPTextModelWithProjection(_text_config()), tokenizer=_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_text_config()), tokenizer_2=_tokenizer(),
        text_encoder_3=_t5(64) if t5 else None, tokenizer_3=t5_tokenizer() if t5 else None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3() -> StableDiffusion3Pipeline:
    """SD3 medium's layout: joint blocks, the last one's context `context_pre_only`; CLIP-L + CLIP-G, then T5."""
    return _sd3(None, (), t5=True)


def sd3_no_t5() -> StableDiffusion3Pipeline:
    """SD3 loaded with text_encoder_3=None, as users do to save memory: T5's positions hold zeros."""
    return _sd3(None, (), t5=False)


def sd35() -> StableDiffusion3Pipeline:
    """SD3.5 medium's additions: RMS qk-norm and an image-only second attention (`attn2`) in the first blocks."""
    return _sd3("rms_norm", (0, 1), t5=True)


def flux() -> FluxPipeline:
    """Flux-dev's layout: double-stream then single-stream blocks, RoPE on (text, row, column) ids, latents packed 2x2,
    CLIP's pooled vector and T5's tokens, guidance distilled into an embedding (no unconditional rows)."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                                         num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                         guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    pipe = FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=_flow_vae(),
                        text_encoder=CLIPTextModel(_text_config()), tokenizer=_tokenizer(), text_encoder_2=_t5(32),
                        tokenizer_2=t5_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixart() -> PixArtAlphaPipeline:
    """PixArt-alpha: DiT blocks (adaLN-single) with cross-attention to T5 tokens, learnt sigma, DPM-Solver++."""
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
                                           caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8,
                                           attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                           norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    pipe = PixArtAlphaPipeline(tokenizer=t5_tokenizer(), text_encoder=_t5(32), vae=_vae(), transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


TRANSFORMERS = {"sd3": sd3, "sd3-no-t5": sd3_no_t5, "sd3.5": sd35, "flux": flux, "pixart": pixart}


def _with_image_encoder(pipe):
    torch.manual_seed(1)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                              patch_size=8, projection_dim=IMAGE_EMBED)
    pipe.register_modules(image_encoder=CLIPVisionModelWithProjection(vision),
                          feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}))
    return pipe


def load_ip_adapter(pipe) -> None:
    """A random IP-Adapter (base kind: 4 image tokens) in diffusers' own loader format, and a tiny image encoder."""
    unet = pipe.unet
    cross = unet.config.cross_attention_dim
    torch.manual_seed(2)
    projection = {"proj.weight": torch.randn(4 * cross, IMAGE_EMBED) * 0.2, "proj.bias": torch.zeros(4 * cross),
                  "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    layers, key = {}, 1
    modules = dict(unet.named_modules())
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            inner = modules[name.removesuffix(".processor")].to_k.out_features
            layers[f"{key}.to_k_ip.weight"] = torch.randn(inner, cross) * 0.2
            layers[f"{key}.to_v_ip.weight"] = torch.randn(inner, cross) * 0.2
            key += 2
    unet._load_ip_adapter_weights([{"image_proj": projection, "ip_adapter": layers}])
    _with_image_encoder(pipe)


def add_lora(pipe) -> None:
    """A peft LoRA on every attention projection, with random (nonzero) up and down weights."""
    from peft import LoraConfig

    torch.manual_seed(3)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))


def load_lora(pipe) -> None:
    """The same kind of LoRA, loaded as users load a file: `load_lora_weights` of a state dict in diffusers' format."""
    from peft.utils import get_peft_model_state_dict

    donor = copy.deepcopy(pipe)
    add_lora(donor)
    pipe.load_lora_weights({f"unet.{k}": v for k, v in get_peft_model_state_dict(donor.unet).items()})


def _variant(base, *changes):
    def build():
        pipe = base()
        for change in changes:
            change(pipe)
        return pipe

    return build


def _sibling(base, cls):
    def build():
        pipe = cls.from_pipe(base())
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return build


SETUPS = {
    "sd15": sd1,
    "sd15+fused": _variant(sd1, lambda p: p.unet.fuse_qkv_projections()),
    "sd15+slicing": _variant(sd1, lambda p: p.enable_attention_slicing(1)),
    "sd15+freeu": _variant(sd1, lambda p: p.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)),
    "sd15+lora": _variant(sd1, load_lora),
    "sd15+ip-adapter": _variant(sd1, load_ip_adapter),
    "sd15+fp16": _variant(sd1, lambda p: p.to(dtype=torch.float16)),
    "sd15+bf16": _variant(sd1, lambda p: p.to(dtype=torch.bfloat16)),
    "sd15+compile": _variant(sd1, lambda p: setattr(p, "unet", torch.compile(p.unet, backend="eager"))),
    "sd15-img2img": _sibling(sd1, StableDiffusionImg2ImgPipeline),
    "sd15-inpaint": _sibling(sd1, StableDiffusionInpaintPipeline),
    "sd21-v": sd2_v,
    "sdxl": sdxl,
    "sdxl+fp16": _variant(sdxl, lambda p: p.to(dtype=torch.float16)),
    "sdxl+lora": _variant(sdxl, add_lora),
    "sdxl+ip-adapter": _variant(sdxl, load_ip_adapter),
    "sdxl-img2img": _sibling(sdxl, StableDiffusionXLImg2ImgPipeline),
    "sdxl-inpaint": _sibling(sdxl, StableDiffusionXLInpaintPipeline),
    "sdxl-refiner": sdxl_refiner,
}
