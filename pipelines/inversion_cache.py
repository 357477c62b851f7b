"""A disk cache of inversions keyed by everything they depend on: image content, caption, model weights, settings.

The diffusers community pipeline keys its cache by file name and hands back a stale inversion
when the caption changes; here any change to the pixels, the caption, any weight of the model or
any setting gives another key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from xattn.denoiser import model_state

log = logging.getLogger(__name__)
DEFAULT_CACHE = Path(os.environ.get("XATTN_CACHE", "~/.cache/xattn")).expanduser() / "inversions"


def model_fingerprint(pipe: DiffusionPipeline) -> str:
    """A digest of every weight of the pipeline's denoiser (UNet or transformer), text encoders and VAE (a float64 sum and a strided sample per tensor).

    Weights changed in place (an erasure loaded, a LoRA fused) and LoRA adapters change it; a path
    does not name weights. The denoiser's count under their diffusers names (`xattn.denoiser.model_state`):
    a compiled UNet is the UNet it wraps, and an IP-Adapter or fused projections add nothing.
    """
    digest = hashlib.sha256()
    for name in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        state = model_state(module) if name in ("unet", "transformer") else module.state_dict()
        for key, tensor in state.items():
            flat = tensor.detach().flatten()
            sample = flat[:: max(1, flat.numel() // 16)].float().cpu().numpy()
            total = torch.sum(flat, dtype=torch.float64).item() if flat.is_floating_point() else int(flat.sum())
            digest.update(f"{name}.{key}:{tuple(tensor.shape)}:{tensor.dtype}:{total!r}".encode())
            digest.update(sample.tobytes())
    return digest.hexdigest()


def arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """A SHA-256 of named arrays (name, shape, dtype and bytes, in name order): what a run started from, for a cache key
    or a checkpoint to compare."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{array.shape}:{array.dtype}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def inversion_key(image: Image.Image, caption: str, fingerprint: str, settings: dict) -> str:
    digest = hashlib.sha256(np.asarray(image.convert("RGB"), dtype=np.uint8).tobytes())
    digest.update(json.dumps({"caption": caption, "model": fingerprint, **settings}, sort_keys=True).encode())
    return digest.hexdigest()[:32]


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class InversionCache:
    """One safetensors file per key in `folder`, written atomically with a checksum of its tensors; an entry that is
    cut short, altered or non-finite is dropped (and so rebuilt by the caller), with a warning."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self.folder / f"{key}.safetensors"
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                expected = (handle.metadata() or {}).get("sha256")
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            whole = expected == _checksum(tensors) and all(torch.isfinite(t).all() for t in tensors.values())
        except (SafetensorError, OSError, RuntimeError):
            whole = False
        if whole:
            return tensors
        log.warning("cached inversion %s is damaged (cut short, altered or non-finite); inverting again", path)
        path.unlink(missing_ok=True)
        return None

    def save(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{key}.safetensors"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, str(tmp), metadata=metadata | {"sha256": _checksum(tensors)})
        os.replace(tmp, path)
        return path
