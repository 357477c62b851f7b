"""Losses over cross-attention maps: Attend-and-Excite and A-STAR for test-time guidance, and Dynamic Prompt
Learning's (Wang et al. 2023) for learning token embeddings of a real image's objects.

All functions are pure and batched: concept maps are (rows, concepts, h, w), one row per image,
and every loss returns one value per row, so a batch's summed loss has, for each image's latent,
the gradient of that image's own loss (images never share maps).

Concept maps come in two kinds, both in [0, 1] as A-STAR's retention loss needs (its Eq. 3
saturates on maps normalised to sum to 1): Attend-and-Excite's token shares (`token_shares`: per
pixel, a softmax over the prompt's tokens at temperature 1/100), and each concept's own attention
scaled to a peak of 1 (`token_attention`, then `peak_normalised`), which is low where the concept
is absent. Either is smoothed with a 3x3 Gaussian (`smooth`) before a loss reads it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# Attend-and-Excite's code builds its kernel as exp(-((x - mu) / (2 sigma))^2) with sigma = 0.5,
# which is a Gaussian of standard deviation 0.5 * sqrt(2). The formula here is the textbook one,
# and this default reproduces the kernel A&E actually used (centre 0.332, edge 0.122, corner 0.045).
AE_SIGMA = 0.5 * 2**0.5


def gaussian_kernel(size: int = 3, sigma: float = AE_SIGMA) -> torch.Tensor:
    """Normalised 2-D Gaussian of standard deviation `sigma`, (size, size)."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"the smoothing kernel needs an odd size of at least 1; got {size}")
    if sigma <= 0:
        raise ValueError(f"the smoothing sigma must be positive; got {sigma}")
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    line = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = line[:, None] * line[None, :]
    return kernel / kernel.sum()


def smooth(maps: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve every (h, w) map of a (..., h, w) tensor with `kernel`, reflect-padded (as A&E)."""
    pad = kernel.shape[-1] // 2
    if pad == 0:
        return maps * kernel.reshape(())
    shape = maps.shape
    x = maps.reshape(-1, 1, *shape[-2:])
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect" if min(shape[-2:]) > pad else "replicate")
    return F.conv2d(x, kernel.to(x)[None, None]).reshape(shape)


def token_shares(
    probs: torch.Tensor,
    concepts: Sequence[Sequence[Sequence[int]]],
    spans: Sequence[tuple[int, int]],
    temperature: float = 100.0,
) -> torch.Tensor:
    """A&E's concept maps, (rows, concepts, h, w), from (rows, h, w, keys) cross-attention probabilities.

    At each pixel, a softmax at `temperature` over the text tokens sharpens which token the pixel
    attends to most; a concept's map is the mean over its tokens. concepts[r][k] are the token
    indices of row r's k-th concept; spans[r] = (start, end) the keys the softmax runs over, a
    slice: start 1 drops CLIP's start-of-text (0 on T5, which has none); end the end-of-text index
    to use only the prompt's own tokens, or -1 for diffusers' A&E (every token but the last).
    """
    rows = []
    for row, tokens, (start, end) in zip(probs, concepts, spans, strict=True):
        shares = (row[..., start:end] * temperature).softmax(-1)
        rows.append(torch.stack([shares[..., [t - start for t in concept]].mean(-1) for concept in tokens]))
    return torch.stack(rows)


def token_attention(probs: torch.Tensor, concepts: Sequence[Sequence[Sequence[int]]]) -> torch.Tensor:
    """The attention each pixel pays to each concept (mean over its tokens), (rows, concepts, h, w)."""
    return torch.stack([torch.stack([row[..., list(concept)].mean(-1) for concept in tokens]) for row, tokens in zip(probs, concepts, strict=True)])


def peak_normalised(maps: torch.Tensor) -> torch.Tensor:
    """Each map divided by its own maximum, so it lies in [0, 1] with a peak of 1."""
    return maps / maps.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)


def peaks(maps: torch.Tensor) -> torch.Tensor:
    """Each concept map's maximum, (rows, concepts)."""
    return maps.amax(dim=(-2, -1))


def attend_excite_loss(maps: torch.Tensor) -> torch.Tensor:
    """Attend-and-Excite: max over concepts of max(0, 1 - peak), per row; only the most neglected concept counts."""
    return (1 - peaks(maps)).clamp_min(0).amax(-1)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(min(a, b)) / sum(a + b) over the last two dims: 0.5 for equal maps, 0 for disjoint ones."""
    return torch.minimum(a, b).sum(dim=(-2, -1)) / (a + b).sum(dim=(-2, -1)).clamp_min(1e-8)


def segregation_loss(maps: torch.Tensor) -> torch.Tensor:
    """A-STAR Eq. 2: the overlap of every pair of concept maps, summed over pairs, per row."""
    count = maps.shape[1]
    total = maps.new_zeros(maps.shape[0])
    for m in range(count):
        for n in range(m):
            total = total + _overlap(maps[:, m], maps[:, n])
    return total


def retention_loss(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """A-STAR Eq. 3: sum over concepts of 1 - overlap(map, binary mask), per row; 0.5 per concept at best."""
    return (1 - _overlap(maps, masks.to(maps))).sum(-1)


def layout_loss(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Backward layout guidance (Chen et al., WACV 2024, Eq. 3), per row: the sum over concepts of (1 - the share of the
    concept's attention that falls inside its mask)^2; 0 when all of it is inside.

    Unlike retention's IoU, the share does not ask a small object's map to fill a large region,
    so a mask of half the image pulls the object into that half instead of spreading its
    attention. A concept whose mask is NaN (none given) adds nothing.
    """
    known = ~masks.isnan().flatten(-2).any(-1)
    inside = (maps * masks.nan_to_num(0.0).to(maps)).sum((-2, -1)) / maps.sum((-2, -1)).clamp_min(1e-8)
    return ((1 - inside) ** 2 * known.to(maps)).sum(-1)


def binary_masks(maps: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """A-STAR's B: where each map reaches `threshold` of its own maximum, as detached 0/1 floats."""
    m = maps.detach()
    return (m >= threshold * m.amax(dim=(-2, -1), keepdim=True)).to(m.dtype)


def mean_overlap(maps: torch.Tensor) -> torch.Tensor:
    """Mean over concept pairs of the soft IoU sum(min)/sum(max), per row: 1 for equal maps, 0 for disjoint ones."""
    count = maps.shape[1]
    pairs = [(m, n) for m in range(count) for n in range(m)]
    if not pairs:
        return maps.new_zeros(maps.shape[0])
    iou = [torch.minimum(maps[:, m], maps[:, n]).sum((-2, -1)) / torch.maximum(maps[:, m], maps[:, n]).sum((-2, -1)).clamp_min(1e-8) for m, n in pairs]
    return torch.stack(iou, -1).mean(-1)


def step_sizes(scale: float, steps: int, end: float = 0.5) -> torch.Tensor:
    """A&E's schedule: scale * sqrt(linspace(1, end, steps)), larger early when the layout forms."""
    return scale * torch.linspace(1.0, end, steps, dtype=torch.float64).sqrt()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of maps flattened over their last two dims."""
    return F.cosine_similarity(a.flatten(-2), b.flatten(-2), dim=-1, eps=1e-8)


def disjoint_loss(maps: torch.Tensor) -> torch.Tensor:
    """DPL's L_dj: mean over pairs of object tokens of the cosine similarity of their (raw) maps, per row; 0 with one object."""
    count = maps.shape[1]
    pairs = [_cosine(maps[:, m], maps[:, n]) for m in range(count) for n in range(m)]
    return torch.stack(pairs, -1).mean(-1) if pairs else maps.new_zeros(maps.shape[0])


def background_loss(maps: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """DPL's L_bg: mean over object tokens of the cosine similarity between a token's (raw) map and the (h, w) background
    mask, per row: attention leaking onto the background."""
    return _cosine(maps, background.to(maps).expand_as(maps)).mean(-1)


def dpl_threshold(step: int, alpha: float, beta: float) -> float:
    """DPL's gradual threshold beta * exp(-step / alpha): a loss under it at denoising step `step` needs no update."""
    return beta * math.exp(-step / alpha)
