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

FORMAT = "xattn-erasure/1"


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
    return metadata


@dataclass
class Erasure:
    """An erasure applied to a pipeline's UNet; `remove()` puts the original tensors back."""

    unet: torch.nn.Module
    originals: dict[str, torch.Tensor]
    metadata: dict[str, str]

    def remove(self) -> None:
        params = dict(self.unet.named_parameters())
        with torch.no_grad():
            for name, value in self.originals.items():
                params[name].copy_(value)
        self.originals = {}

    def __enter__(self) -> Erasure:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_erasure(pipe: DiffusionPipeline, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Erasure:
    """Copy changed tensors (diffusers names) into `pipe.unet` in place; the Erasure puts the originals back."""
    params = dict(pipe.unet.named_parameters())
    unknown = [n for n in tensors if n not in params]
    if unknown:
        raise ValueError(f"the erasure changes tensors this UNet lacks: {unknown[:3]}; it was made for another architecture")
    originals = {n: params[n].detach().clone() for n in tensors}
    with torch.no_grad():
        for n, value in tensors.items():
            params[n].copy_(value.to(params[n]))
    return Erasure(pipe.unet, originals, metadata or {})


def load_erasure(pipe: DiffusionPipeline, path: Path | str) -> Erasure:
    """Apply an erasure file to `pipe.unet` in place; refuses a file made for other base weights."""
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
