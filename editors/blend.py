"""Local blending: after each denoising step, the targets keep the source's latents outside the edit.

The region is where the source's words and the target's words attend (their cross-attention
maps summed over tokens, averaged over layers and steps so far, max-pooled 3x3, upsampled to the
latent, scaled to a maximum of 1 per image, thresholded), minus where `subtract` words attend;
or a mask the user gives. The latent update is x_tgt <- x_src + m (x_tgt - x_src).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from editors.schedules import Bound


@dataclass(frozen=True)
class LocalBlend:
    """Blend words of the source and of the targets (or a user mask), from step `start` on.

    threshold: of the max-normalised pooled map; subtract: target words whose region is kept out
    of the mask (unpooled map above subtract_threshold); resolution: the side of the attention
    maps read (the recorded resolution nearest to it is used; 16 is the paper's for 512 px SD).
    mask: a 2-D array, any size, nonzero where the targets may change; it replaces the words.
    """

    source_words: Sequence[str] = ()
    target_words: Sequence[str] = ()
    threshold: float = 0.3
    start: Bound = 0.2
    subtract: Sequence[str] = ()
    subtract_threshold: float = 0.3
    resolution: int = 16
    mask: np.ndarray | torch.Tensor | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.mask is None and not (self.source_words or self.target_words):
            raise ValueError("local blending needs words (source_words and/or target_words) or a mask")
        if self.mask is not None and np.ndim(self.mask) != 2:
            raise ValueError(f"a blend mask is a 2-D array (height, width); got shape {np.shape(self.mask)}")
        for name in ("threshold", "subtract_threshold"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} is a fraction of the map's maximum, in [0, 1); got {getattr(self, name)}")


def region(maps: torch.Tensor, latent: tuple[int, int], threshold: float, pool: bool) -> torch.Tensor:
    """Boolean (rows, H, W) region where each row's (rows, h, w) word map exceeds `threshold` of its maximum."""
    x = maps[:, None].float()
    if pool:
        x = F.max_pool2d(x, 3, stride=1, padding=1)
    x = F.interpolate(x, size=latent, mode="nearest")[:, 0]
    x = x / x.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    return x > threshold


def user_region(mask: np.ndarray | torch.Tensor, latent: tuple[int, int]) -> torch.Tensor:
    """A user mask (any size) as a boolean (H, W) latent mask: nearest resize, nonzero is inside."""
    m = torch.as_tensor(np.asarray(mask, dtype=np.float32))
    return F.interpolate(m[None, None], size=latent, mode="nearest")[0, 0] > 0


def blend_latents(latents: torch.Tensor, mask: torch.Tensor, images: int = 1) -> torch.Tensor:
    """Every target row becomes source + mask * (row - source), the source being the same image of the first
    prompt: rows are each prompt's `images` images in turn; mask is (target rows, H, W) or (H, W)."""
    source = latents[:images]
    sources = source.repeat(len(latents) // images - 1, *[1] * (latents.ndim - 1))
    m = mask.to(latents.dtype)
    m = m[:, None] if m.ndim == 3 else m[None, None]
    return torch.cat([source, sources + m * (latents[images:] - sources)])
