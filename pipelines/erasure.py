"""Erasure files: only the tensors an unlearning method changed, as safetensors with what made them.

    erasure = load_erasure(pipe, "erase-circle.safetensors")   # the UNet now has the erased weights
    erasure.remove()                                           # and now its own again

    with apply_erasure(pipe, unlearn(pipe, settings).tensors):  # or straight from `pipelines.unlearn`, for a block
        pipe("a red circle")

The metadata names the method, the concept, the settings and a fingerprint of the base model's
weights; a file made for other weights is refused before anything changes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from safetensors import SafetensorError, safe_open

from pipelines.inversion_cache import model_fingerprint
from shapes.train import save_atomic
from xattn.denoiser import base_parameters, called_denoiser, denoiser

FORMAT = "xattn-erasure/1"
LARGEST_CHANGE = 100.0  # an erased tensor's largest value, in multiples of the base tensor's


def save_erasure(path: Path | str, tensors: dict[str, torch.Tensor], *, method: str, concept: str, base: str, settings: dict) -> Path:
    """Write the changed UNet tensors (diffusers names) atomically, with method, concept, base fingerprint and settings."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FORMAT, "method": method, "concept": concept, "base": base, "settings": json.dumps(settings, sort_keys=True)}
    save_atomic({k: v.detach().cpu() for k, v in tensors.items()}, path, metadata)
    return path


def read_metadata(path: Path | str) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except SafetensorError as error:
        raise ValueError(f"{path} is not a safetensors file ({error}); give an erasure file from `xattn unlearn`") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not an xattn erasure file (no '{FORMAT}' metadata); make one with `xattn unlearn`")
    missing = [key for key in ("method", "concept", "base") if not metadata.get(key)]
    if missing:
        raise ValueError(f"{path} lacks the erasure metadata {', '.join(missing)}; it is damaged or hand-made: make it again with `xattn unlearn`")
    return metadata


def _refresh_fused(unet: torch.nn.Module, names) -> None:
    """Copy changed query/key/value weights into the fused projections that `fuse_qkv_projections` made of them:
    the fused processor reads those, so an erasure must land there too."""
    touched = {name.rsplit(".", 2)[0] for name in names if name.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v")}
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for name in touched:
            attn = modules.get(name)
            for fused, parts in (("to_qkv", ("to_q", "to_k", "to_v")), ("to_kv", ("to_k", "to_v"))):
                target = getattr(attn, fused, None)
                if target is None:
                    continue
                target.weight.copy_(torch.cat([getattr(attn, p).weight for p in parts]))
                if target.bias is not None:
                    target.bias.copy_(torch.cat([getattr(attn, p).bias for p in parts]))


@dataclass
class Erasure:
    """An erasure applied to a pipeline's denoiser; `remove()` puts the original tensors back."""

    model: torch.nn.Module
    originals: dict[str, torch.Tensor]
    metadata: dict[str, str]

    def remove(self) -> None:
        _write(self.model, self.originals)
        self.originals = {}

    def __enter__(self) -> Erasure:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _write(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = base_parameters(model)
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    _refresh_fused(denoiser(model), tensors)


def apply_erasure(pipe: DiffusionPipeline, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Erasure:
    """Copy changed tensors (diffusers names) into the pipeline's denoiser in place, where the model reads them (a LoRA layer's base
    weight, fused projections too); the Erasure puts the originals back. Every tensor is checked before any is written."""
    params = base_parameters(pipe)
    unknown = [n for n in tensors if n not in params]
    if unknown:
        raise ValueError(f"the erasure changes tensors this denoiser lacks: {unknown[:3]}; it was made for another architecture")
    for name, value in tensors.items():
        if tuple(value.shape) != tuple(params[name].shape):
            raise ValueError(f"the erasure's {name} is {tuple(value.shape)} but the denoiser's is {tuple(params[name].shape)}; "
                             "it was made for another model")
        if not value.is_floating_point():
            raise ValueError(f"the erasure's {name} is {str(value.dtype).removeprefix('torch.')}, not floating point; it is damaged "
                             "or hand-made: make it again with `xattn unlearn`")
        if not torch.isfinite(value).all():
            raise ValueError(f"the erasure's {name} holds non-finite values; it is damaged: make it again")
        largest, usual = value.abs().max().item(), params[name].detach().abs().max().item()
        if largest > LARGEST_CHANGE * max(usual, 1e-3):
            raise ValueError(f"the erasure's {name} holds values up to {largest:.3g} where the denoiser's reach {usual:.3g}; no unlearning "
                             "method moves weights that far, so it is damaged or hand-made: make it again with `xattn unlearn`")
    originals = {n: params[n].detach().clone() for n in tensors}
    model = called_denoiser(pipe)
    try:
        _write(model, {n: value.to(params[n]) for n, value in tensors.items()})
    except BaseException:
        _write(model, originals)
        raise
    return Erasure(model, originals, metadata or {})


def load_erasure(pipe: DiffusionPipeline, path: Path | str) -> Erasure:
    """Apply an erasure file to the pipeline's denoiser in place; refuses a file made for other base weights."""
    metadata = read_metadata(path)
    found = model_fingerprint(pipe)
    if metadata["base"] != found:
        raise ValueError(
            f"{path} erases {metadata['concept']!r} from other base weights (fingerprint {metadata['base'][:12]}, this model "
            f"{found[:12]}); load it into the model it was made from, with no other erasure applied"
        )
    with safe_open(str(path), framework="pt") as handle:
        tensors = {n: handle.get_tensor(n) for n in handle.keys()}
    return apply_erasure(pipe, tensors, metadata)
