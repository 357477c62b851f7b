"""Install a controller in every attention layer of a UNet for the length of a `with` block.

    with attach(pipe, controller) as state:
        pipe(prompt)

Each layer's processor is replaced by one that computes what it computed (plain, sliced, xformers
or fused projections; an IP-Adapter's image attention kept) plus the controller; a processor
class xattn does not know is refused by name before anything changes. On exit, normal or by an
exception, the UNet gets back the very processor objects it had, its hook is removed, and the
pipeline's `encode_prompt` is its own again. A `torch.compile`d UNet is attached through the
module it wraps, so layers keep their diffusers names.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from diffusers.models.attention_processor import (
    AttnProcessor,
    AttnProcessor2_0,
    AttnProcessorNPU,
    FusedAttnProcessor2_0,
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
    SlicedAttnProcessor,
    XFormersAttnProcessor,
)

from xattn.controller import Controller
from xattn.denoiser import denoiser
from xattn.processor import XAttnProcessor
from xattn.sites import BatchLayout, layer_of

_ATTACHED = "_xattn_attached"
# Processors whose attention xattn's processor computes the same way (slicing and xformers only change memory and speed).
_PLAIN = (AttnProcessor, AttnProcessor2_0, AttnProcessorNPU, SlicedAttnProcessor, XFormersAttnProcessor)
_FUSED = (FusedAttnProcessor2_0,)
_IMAGE = (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0)


class CallState:
    """What the processors share about the current UNet call: latent size, step, batch layout.

    The step advances when the UNet is called with a new timestep (so several calls at one
    timestep, as guidance losses make, stay one step) and restarts at 0 when a pipeline encodes
    its prompt, i.e. at each pipeline call. `set_step` fixes it explicitly for custom loops.
    """

    def __init__(self) -> None:
        self.latent: tuple[int, int] = (0, 0)
        self.step = -1
        self.layout = BatchLayout(prompts=(), guidance=False)
        self._timestep: float | None = None
        self._fixed = False

    def set_step(self, step: int) -> None:
        self.step, self._fixed = step, True

    def restart(self, layout: BatchLayout) -> None:
        self.step, self._timestep, self._fixed = -1, None, False
        self.layout = layout

    @contextmanager
    def conditional_calls(self) -> Iterator[None]:
        """UNet calls inside the block run conditional rows only, whatever the pipeline's layout
        (a guidance loss's extra pass, on any subset of the images)."""
        layout = self.layout
        self.layout = BatchLayout(layout.prompts, layout.images_per_prompt, guidance=False)
        try:
            yield
        finally:
            self.layout = layout

    def before_unet(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        self.latent = tuple(sample.shape[-2:])
        value = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        if not self._fixed and value != self._timestep:
            self.step += 1
            self._timestep = value


def _layout_from_encode_prompt(signature: inspect.Signature, args, kwargs) -> BatchLayout:
    bound = signature.bind_partial(*args, **kwargs).arguments
    prompt = bound.get("prompt")
    if prompt is None:  # prompt_embeds: the words are unknown
        embeds = bound.get("prompt_embeds")
        prompts = (None,) * (embeds.shape[0] if embeds is not None else 1)
    else:
        prompts = (prompt,) if isinstance(prompt, str) else tuple(prompt)
    return BatchLayout(prompts, int(bound.get("num_images_per_prompt") or 1), bool(bound.get("do_classifier_free_guidance", True)))


def _attention_modules(unet) -> dict:
    """The UNet's attention modules under the keys of `unet.attn_processors`, found in one walk of
    the UNet (reading `attn_processors`, then installing and restoring with `set_attn_processor`,
    walks it five times: a few milliseconds per `with` block)."""
    return {f"{name}.processor": module for name, module in unet.named_modules() if hasattr(module, "get_processor")}


def _replacement(key: str, processor, controller: Controller, state: CallState) -> XAttnProcessor:
    """xattn's processor for a layer, computing what `processor` computes; an unknown class is refused by name."""
    kind = type(processor)
    if kind in _PLAIN:
        return XAttnProcessor(layer_of(key), controller, state)
    if kind in _FUSED:
        return XAttnProcessor(layer_of(key), controller, state, fused=True)
    if kind in _IMAGE:
        return XAttnProcessor(layer_of(key), controller, state, image_branch=processor)
    known = ", ".join(k.__name__ for k in (*_PLAIN, *_FUSED, *_IMAGE))
    raise TypeError(
        f"xattn cannot take over the attention processor {kind.__name__} at {key.removesuffix('.processor')}: it knows {known}. "
        "Restore diffusers' processors (pipe.unet.set_default_attn_processor()) or remove what installed it, then attach again"
    )


@contextmanager
def attach(target, controller: Controller) -> Iterator[CallState]:
    """Attach `controller` to every attention layer of `target` (a diffusers pipeline or UNet)."""
    called = getattr(target, "unet", target)
    unet = denoiser(target)
    if not hasattr(unet, "attn_processors"):
        raise TypeError(f"attach needs a diffusers pipeline with a UNet, or a UNet; got {type(target).__name__}")
    if getattr(unet, _ATTACHED, False):
        raise RuntimeError("a controller is already attached to this UNet; leave the first `with attach(...)` block before attaching another")
    layers = _attention_modules(unet)
    original = {key: module.processor for key, module in layers.items()}
    state = CallState()
    replacements = {key: _replacement(key, processor, controller, state) for key, processor in original.items()}
    encode = getattr(target, "encode_prompt", None) if target is not called and target is not unet else None
    hook = called.register_forward_pre_hook(state.before_unet, with_kwargs=True)
    try:
        for key, module in layers.items():
            module.set_processor(replacements[key])
        setattr(unet, _ATTACHED, True)
        if encode is not None:
            signature = inspect.signature(encode)

            @functools.wraps(encode)
            def encode_prompt(*args, **kwargs):
                state.restart(_layout_from_encode_prompt(signature, args, kwargs))
                return encode(*args, **kwargs)

            target.encode_prompt = encode_prompt
        yield state
    finally:
        for key, module in layers.items():
            module.set_processor(original[key])
        hook.remove()
        if hasattr(unet, _ATTACHED):
            delattr(unet, _ATTACHED)
        if "encode_prompt" in vars(target):
            del target.encode_prompt
