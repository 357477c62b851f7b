"""The architecture seam: what xattn knows about each family of denoiser. Nothing above `xattn/` asks which it is.

- UNet (SD 1.x/2.x, SDXL): `attn1` self- and `attn2` cross-attention in down, mid and up blocks, each level's
  query grid half the one above it.
- DiT cross-attention (PixArt-alpha/Sigma): transformer blocks over the patch grid, `attn1` self-attention, `attn2`
  cross-attention to T5 tokens.
- MM-DiT joint attention: one softmax over image and text tokens together. SD3/3.5 put the image first,
  [image; CLIP-L+G (77); T5], a context stream per block, SD3.5's extra image-only `attn2`; Flux puts the text first,
  [T5; image], in 19-ish double-stream blocks, then single-stream blocks over the concatenated sequence, with RoPE
  and its latents packed 2x2 into tokens.

Each family says where the layers are and what each site is (kind cross, self or joint; its block and stream), reads
the latent size, the image tokens' grid, the text length and the timestep from the denoiser's own call, says which
tokenizers index the text tokens at which offset, and gives each layer the processor that computes what its stock
one computes plus a controller. A denoiser of another family is refused, naming the supported ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import (
    AttnProcessor,
    AttnProcessor2_0,
    AttnProcessorNPU,
    FusedAttnProcessor2_0,
    FusedJointAttnProcessor2_0,
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
    JointAttnProcessor2_0,
    SlicedAttnProcessor,
    XFormersAttnProcessor,
)
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from xattn.denoiser import denoiser
from xattn.joint import FluxProcessor, SD3Processor
from xattn.processor import XAttnProcessor
from xattn.sites import Layer

# Processors whose attention xattn's processor computes the same way (slicing and xformers only change memory and speed).
_PLAIN = (AttnProcessor, AttnProcessor2_0, AttnProcessorNPU, SlicedAttnProcessor, XFormersAttnProcessor)
_IMAGE = (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0)
SUPPORTED = "UNets (SD 1.x/2.x, SDXL), PixArt-alpha/Sigma (DiT cross-attention), SD3/SD3.5 and Flux (MM-DiT joint attention)"


@dataclass(frozen=True)
class Call:
    """What one denoiser call says about its input: the (unpacked) latent's size, the image tokens' grid (a
    transformer's patch grid; None for a UNet, whose grid depends on the level), the text tokens, the timestep and
    the batch's rows."""

    latent: tuple[int, int]
    grid: tuple[int, int] | None
    text: int
    timestep: float
    rows: int = 0


@dataclass(frozen=True)
class TextStream:
    """Tokenizers whose token positions, shifted by `offset`, index the text tokens of the denoiser's attention. More
    than one tokenizer in a stream (SDXL's and SD3's two CLIPs) encode the same positions: a word must agree in both."""

    tokenizers: tuple
    offset: int


def _value(args, kwargs, index: int, name: str):
    return args[index] if len(args) > index else kwargs[name]


def _timestep(value) -> float:
    return float(value.flatten()[0]) if torch.is_tensor(value) else float(value)


def _context_length(args, kwargs, index: int) -> int:
    context = args[index] if len(args) > index else kwargs.get("encoder_hidden_states")
    return 0 if context is None else int(context.shape[1])


def _unknown_processor(processor, key: str, known: tuple) -> TypeError:
    names = ", ".join(k.__name__ for k in known)
    return TypeError(f"xattn cannot take over the attention processor {type(processor).__name__} at "
                     f"{key.removesuffix('.processor')}: it knows {names}. Restore diffusers' processors or remove what "
                     "installed this one, then attach again")


class UNet:
    joint = False
    packs = False  # whether the pipeline's latents are packed into tokens (Flux's 2x2)

    @staticmethod
    def joint_blocks(model) -> dict[str, int]:
        return {}

    @staticmethod
    def double_blocks(model) -> list:
        return []

    @staticmethod
    def layer(key: str) -> Layer:
        name = key.removesuffix(".processor")
        kind = "cross" if name.endswith("attn2") else "self"
        place = "mid" if name.startswith("mid_block") else "down" if name.startswith("down_blocks") else "up"
        block = int(name.split(".")[1]) if place != "mid" else 0
        return Layer(name, kind, place, block)

    @staticmethod
    def read_call(model, args, kwargs) -> Call:
        sample = _value(args, kwargs, 0, "sample")
        return Call(tuple(sample.shape[-2:]), None, _context_length(args, kwargs, 2), _timestep(_value(args, kwargs, 1, "timestep")),
                    sample.shape[0])

    @staticmethod
    def levels(model, latent: tuple[int, int]) -> list[tuple[str, tuple[int, int]]]:
        """Each down block's type and query grid at this latent size (a stride-2 convolution between levels rounds up)."""
        levels, grid = [], tuple(latent)
        for block in model.config.down_block_types:
            levels.append((block, grid))
            grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
        return levels

    @classmethod
    def cross_grids(cls, model, latent: tuple[int, int]) -> list[tuple[int, int]]:
        levels = cls.levels(model, latent)
        grids = {grid for block, grid in levels if "CrossAttn" in block}
        if "CrossAttn" in (model.config.mid_block_type or ""):
            grids.add(levels[-1][1])  # the mid block works at the last level's grid
        return sorted(grids)

    @classmethod
    def layout_side(cls, model, latent: tuple[int, int]) -> int:
        sides = [max(grid) for block, grid in cls.levels(model, latent) if "CrossAttn" in block]
        return min(sides) if sides else min(max(g) for g in cls.cross_grids(model, latent))

    @staticmethod
    def native_latent(pipe, model) -> int:
        return model.config.sample_size

    @staticmethod
    def latent_multiple(model) -> int:
        return 2 ** (len(model.config.block_out_channels) - 1)

    @staticmethod
    def text_streams(pipe) -> list[TextStream]:
        found = tuple(t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t is not None)
        return [TextStream(found, 0)] if found else []

    @staticmethod
    def processor(key: str, processor, controller, state):
        kind = type(processor)
        if kind in _PLAIN:
            return XAttnProcessor(UNet.layer(key), controller, state)
        if kind is FusedAttnProcessor2_0:
            return XAttnProcessor(UNet.layer(key), controller, state, fused=True)
        if kind in _IMAGE:
            return XAttnProcessor(UNet.layer(key), controller, state, image_branch=processor)
        raise _unknown_processor(processor, key, (*_PLAIN, FusedAttnProcessor2_0, *_IMAGE))


class _Transformer:
    """What the transformer families share: one grid of image tokens, the patch grid of the latent."""

    joint = False
    packs = False  # whether the pipeline's latents are packed into tokens (Flux's 2x2)

    @classmethod
    def joint_blocks(cls, model) -> dict[str, int]:
        """Blocks of joint attention per stream: SD3's and Flux's double-stream blocks, Flux's single-stream ones."""
        if not cls.joint:
            return {}
        single = getattr(model, "single_transformer_blocks", None)
        return {"double": len(model.transformer_blocks)} | ({"single": len(single)} if single is not None else {})

    @classmethod
    def double_blocks(cls, model) -> list:
        """(name, block) of each block whose joint attention keeps the text in a stream of its own (SD3's, Flux's
        double-stream blocks)."""
        return [(f"transformer_blocks.{i}", block) for i, block in enumerate(model.transformer_blocks)] if cls.joint else []

    @staticmethod
    def block_of(name: str) -> tuple[str, int]:
        match = re.match(r"(\w+)\.(\d+)\.", name)
        return ("single" if match.group(1) == "single_transformer_blocks" else "transformer"), int(match.group(2))

    @staticmethod
    def patch(model) -> int:
        return model.config.patch_size

    @classmethod
    def grid_of(cls, model, latent: tuple[int, int]) -> tuple[int, int]:
        p = cls.patch(model)
        return latent[0] // p, latent[1] // p

    @classmethod
    def read_call(cls, model, args, kwargs) -> Call:
        hidden = _value(args, kwargs, 0, "hidden_states")
        latent = tuple(hidden.shape[-2:])
        return Call(latent, cls.grid_of(model, latent), _context_length(args, kwargs, 1), _timestep(kwargs.get("timestep", 0)),
                    hidden.shape[0])

    @classmethod
    def cross_grids(cls, model, latent: tuple[int, int]) -> list[tuple[int, int]]:
        return [cls.grid_of(model, latent)]

    @classmethod
    def layout_side(cls, model, latent: tuple[int, int]) -> int:
        return max(cls.grid_of(model, latent))

    @staticmethod
    def native_latent(pipe, model) -> int:
        return model.config.sample_size

    @classmethod
    def latent_multiple(cls, model) -> int:
        return cls.patch(model)


class DiT(_Transformer):

    @classmethod
    def layer(cls, key: str) -> Layer:
        name = key.removesuffix(".processor")
        place, block = cls.block_of(name)
        return Layer(name, "cross" if name.endswith("attn2") else "self", place, block)

    @staticmethod
    def text_streams(pipe) -> list[TextStream]:
        return [TextStream((pipe.tokenizer,), 0)]

    @classmethod
    def processor(cls, key: str, processor, controller, state):
        if type(processor) in _PLAIN:
            return XAttnProcessor(cls.layer(key), controller, state)
        if type(processor) is FusedAttnProcessor2_0:
            return XAttnProcessor(cls.layer(key), controller, state, fused=True)
        raise _unknown_processor(processor, key, (*_PLAIN, FusedAttnProcessor2_0))


class SD3(_Transformer):
    """SD3/3.5: joint attention over [image; text] in every block; SD3.5's `attn2` attends over the image alone."""

    joint = True

    @classmethod
    def layer(cls, key: str) -> Layer:
        name = key.removesuffix(".processor")
        place, block = cls.block_of(name)
        return Layer(name, "self" if name.endswith("attn2") else "joint", place, block, "double")

    @staticmethod
    def text_streams(pipe) -> list[TextStream]:
        """The 77 CLIP positions (CLIP-L and CLIP-G side by side in the channels), then T5's; without T5
        (`text_encoder_3=None`) the pipeline fills those positions with zeros, which no word indexes."""
        streams = [TextStream((pipe.tokenizer, pipe.tokenizer_2), 0)]
        if getattr(pipe, "text_encoder_3", None) is not None:
            streams.append(TextStream((pipe.tokenizer_3,), pipe.tokenizer_max_length))
        return streams

    @classmethod
    def processor(cls, key: str, processor, controller, state):
        if type(processor) in (JointAttnProcessor2_0, FusedJointAttnProcessor2_0):
            return SD3Processor(cls.layer(key), controller, state, fused=type(processor) is FusedJointAttnProcessor2_0)
        raise _unknown_processor(processor, key, (JointAttnProcessor2_0, FusedJointAttnProcessor2_0))


class Flux(_Transformer):
    """Flux: joint attention over [text; image], in double-stream blocks (a stream each) and single-stream blocks
    (one sequence, text first); latents packed 2x2 into tokens, so the token grid is half the latent's."""

    joint = True
    packs = True

    @staticmethod
    def patch(model) -> int:
        return 2

    @classmethod
    def layer(cls, key: str) -> Layer:
        name = key.removesuffix(".processor")
        place, block = cls.block_of(name)
        return Layer(name, "joint", place, block, "single" if place == "single" else "double")

    @classmethod
    def read_call(cls, model, args, kwargs) -> Call:
        ids = kwargs["img_ids"]
        ids = ids[0] if ids.ndim == 3 else ids
        grid = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
        hidden = _value(args, kwargs, 0, "hidden_states")
        return Call((2 * grid[0], 2 * grid[1]), grid, _context_length(args, kwargs, 1), _timestep(kwargs.get("timestep", 0)),
                    hidden.shape[0])

    @staticmethod
    def native_latent(pipe, model) -> int:
        return pipe.default_sample_size

    @staticmethod
    def text_streams(pipe) -> list[TextStream]:
        """T5's positions only: Flux reads CLIP's pooled vector, not its tokens."""
        return [TextStream((pipe.tokenizer_2,), 0)]

    @classmethod
    def processor(cls, key: str, processor, controller, state):
        if type(processor) is FluxAttnProcessor:
            return FluxProcessor(cls.layer(key), controller, state)
        raise _unknown_processor(processor, key, (FluxAttnProcessor,))


_FAMILIES = {"UNet2DConditionModel": UNet, "PixArtTransformer2DModel": DiT, "SD3Transformer2DModel": SD3,
             "FluxTransformer2DModel": Flux}


def family_of(target):
    """The family of a pipeline's (or a model's) denoiser; another is a TypeError naming the supported ones."""
    model = denoiser(target)
    for cls in type(model).__mro__:
        if cls.__name__ in _FAMILIES:
            return _FAMILIES[cls.__name__]
    raise TypeError(f"xattn does not know the denoiser {type(model).__name__}; it supports {SUPPORTED}")


def cross_grids(target, latent: tuple[int, int]) -> list[tuple[int, int]]:
    """The (h, w) query grids of the denoiser's cross- (or joint) attention at this latent size, smallest first."""
    return family_of(target).cross_grids(denoiser(target), latent)


def cross_resolutions(target, latent: tuple[int, int]) -> list[int]:
    """Sides (the longer one) of the query grids of the denoiser's cross- (or joint) attention at this latent size."""
    return sorted({max(grid) for grid in cross_grids(target, latent)})


def layout_side(target, latent: tuple[int, int]) -> int:
    """The side where the papers read their layout maps: on a UNet the cross-attention side of its deepest level
    outside the mid block (16 for SD 1.x at 512 px: 64, 32, 16, then the 8x8 mid block; 24 for SD 2.x at 768 px, 32
    for SDXL at 1024 px, 8 for the embedded model); a UNet with cross-attention only in its mid block has that side.
    On a transformer, its one token grid."""
    return family_of(target).layout_side(denoiser(target), latent)


def nearest_cross_side(target, latent: tuple[int, int], wanted: int) -> int:
    """The cross-attention side nearest `wanted` (ties to the larger): 16 is the papers' at 512 px, and other
    sizes and denoisers have their own sides."""
    return min(cross_resolutions(target, latent), key=lambda s: (abs(s - wanted), -s))


def native_side(pipe) -> int:
    """The image side the pipeline's denoiser was made for, in pixels."""
    return family_of(pipe).native_latent(pipe, denoiser(pipe)) * pipe.vae_scale_factor


def side_multiple(pipe) -> int:
    """Image sides must be a multiple of this: the VAE's factor times the denoiser's own down-sampling."""
    return pipe.vae_scale_factor * family_of(pipe).latent_multiple(denoiser(pipe))


def has_joint_attention(pipe) -> bool:
    """Whether the pipeline's denoiser attends over image and text tokens in one softmax (SD3, Flux)."""
    return family_of(pipe).joint


def joint_block_counts(pipe) -> dict[str, int]:
    """How many blocks of joint attention the denoiser has per stream ("double"; Flux's "single" too); {} for none."""
    return family_of(pipe).joint_blocks(denoiser(pipe))


def check_joint_blocks(pipe, selected) -> None:
    """Every stream and block of a selection ({"double": [0, 1], "single": [...]}) exists in the denoiser's joint
    attention, else the error lists what does."""
    counts = joint_block_counts(pipe)
    have = ", ".join(f"{stream}: 0-{n - 1}" for stream, n in counts.items()) or "none"
    for stream, blocks in selected.items():
        if stream not in counts or any(not 0 <= b < counts[stream] for b in blocks):
            raise ValueError(f"blocks {stream}: {list(blocks)} is not among {type(pipe).__name__}'s joint-attention blocks ({have})")


def text_projections(pipe) -> list[str]:
    """Names of the linear layers that make the keys and values of text tokens which image queries read: each
    cross-attention layer's to_k and to_v; in MM-DiT's double-stream blocks the text stream's add_k_proj and
    add_v_proj (Flux's single-stream blocks project text and image with one layer, and have none of their own)."""
    model, family = denoiser(pipe), family_of(pipe)
    if family.joint:
        return [f"{name}.attn.{p}" for name, _ in family.double_blocks(model) for p in ("add_k_proj", "add_v_proj")]
    return [f"{key.removesuffix('.processor')}.{p}" for key in model.attn_processors if family.layer(key).kind == "cross"
            for p in ("to_k", "to_v")]


def pooled_projection(pipe) -> str | None:
    """The linear layer that first reads the pooled text embedding, where it conditions every block (SD3's and Flux's
    adaLN embedding); None where a concept reaches the image through the text tokens only (UNets' cross-attention,
    PixArt)."""
    return "time_text_embed.text_embedder.linear_1" if family_of(pipe).joint else None


def latent_channels(pipe) -> int:
    """Channels of the pipeline's spatial latent: the denoiser's input channels, a quarter of them where the latents
    are packed 2x2 into tokens (Flux)."""
    channels = denoiser(pipe).config.in_channels
    return channels // 4 if family_of(pipe).packs else channels


def spatial_latents(pipe, latents: torch.Tensor, latent: tuple[int, int]) -> torch.Tensor:
    """A pipeline's latents as (batch, channels, height, width) at this latent size: Flux's step-end latents come
    packed, 2x2 latent pixels per token."""
    if not family_of(pipe).packs:
        return latents
    (h, w), channels = latent, latents.shape[-1] // 4
    return latents.view(latents.shape[0], h // 2, w // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(-1, channels, h, w)


def pipeline_latents(pipe, spatial: torch.Tensor) -> torch.Tensor:
    """`spatial_latents` undone: the latents as the pipeline keeps them."""
    if not family_of(pipe).packs:
        return spatial
    b, c, h, w = spatial.shape
    return spatial.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def text_streams(pipe) -> list[TextStream]:
    """Which tokenizers index the text tokens of the pipeline's attention, at which offsets."""
    return family_of(pipe).text_streams(pipe)
