"""The denoiser a pipeline runs, under the names diffusers gives its layers, and the weights that are its own.

A UNet wrapped by `torch.compile` names every layer `_orig_mod.<name>`; a peft LoRA layer keeps
its original weight as `<name>.base_layer.weight` beside its adapters; `fuse_qkv_projections`
adds `to_qkv` / `to_kv` copies of the query, key and value weights; an IP-Adapter lives in the
attention processors and the encoder projection. Layer selection, erasure files and weight
fingerprints use the plain diffusers names of the model's own weights, whatever is around them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

_FUSED = ("to_qkv", "to_kv", "to_added_qkv")


def called_denoiser(target) -> torch.nn.Module:
    """The module a pipeline calls to denoise (its UNet or transformer, `torch.compile`d or not), or `target` itself."""
    for name in ("unet", "transformer"):
        model = getattr(target, name, None)
        if model is not None:
            return model
    return target


def denoiser(target) -> torch.nn.Module:
    """The denoiser of a pipeline (its UNet or transformer), or the denoiser itself, unwrapped from `torch.compile`."""
    model = called_denoiser(target)
    return getattr(model, "_orig_mod", model)


def canonical_name(name: str) -> str:
    """A parameter's diffusers name: `to_k.base_layer.weight` (under a peft LoRA layer) is `to_k.weight`."""
    return name.replace(".base_layer.", ".")


def has_ip_adapter(target) -> bool:
    """Whether an IP-Adapter is loaded: the UNet then needs image embeddings in every call."""
    return getattr(denoiser(target).config, "encoder_hid_dim_type", None) == "ip_image_proj"


def _added(unet: torch.nn.Module, name: str) -> bool:
    """Whether a tensor belongs to an add-on, not to the model: an IP-Adapter's, or a fused copy of projections."""
    module = name.rsplit(".", 1)[0]
    ip_adapter = ".processor." in f".{name}" or (name.startswith("encoder_hid_proj.") and has_ip_adapter(unet))
    return ip_adapter or module.endswith(_FUSED)


def _lora(name: str) -> bool:
    return ".lora_" in f".{name}"


def model_state(target) -> dict[str, torch.Tensor]:
    """The tensors that make the UNet's text-conditioned prediction, by diffusers name: its own weights and any
    LoRA adapters (not an IP-Adapter's, not fused copies). What a fingerprint of the model reads."""
    unet = denoiser(target)
    return {canonical_name(k): v for k, v in unet.state_dict().items() if not _added(unet, k)}


def base_parameters(target) -> dict[str, torch.nn.Parameter]:
    """The model's own parameters by diffusers name: no adapters, no fused copies.

    Under a peft LoRA layer this is its base layer's weight, which the model reads with the
    adapter's delta added: what an erasure edits.
    """
    unet = denoiser(target)
    return {canonical_name(k): p for k, p in unet.named_parameters() if not _added(unet, k) and not _lora(k)}


@contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """The module's weights out of the autograd graph for the block: guidance and token learning differentiate with
    respect to latents or embeddings only, and weights that require grad make every layer keep its input for their
    gradient (8 % of an A&E run's time on the embedded model)."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)
