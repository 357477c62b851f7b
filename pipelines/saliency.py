"""Weight saliency (SalUn): the top fraction of weights by |gradient|, and optimiser steps that move only those.

The threshold is the k-th largest |g| over all chosen tensors, found by histograms that narrow to
one bin, then an exact sort of that bin's few values: a few passes over the gradients and no
copy of them all, where SalUn's code concatenates every gradient and argsorts it twice (6.4 GiB
per argsort for SD 1.4's 860 M weights).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def top_fraction_threshold(values: Mapping[str, torch.Tensor], fraction: float, bins: int = 4096, exact: int = 1 << 20) -> float:
    """The k-th largest |value| over all tensors, k = ceil(fraction * total); |v| >= it selects the top fraction (ties included)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction is the share of weights to keep salient, in (0, 1]; got {fraction}")
    tensors = [v.detach().abs().flatten() for v in values.values()]
    total = sum(t.numel() for t in tensors)
    if total == 0:
        raise ValueError("no weights to rank: the parameter group is empty")
    k = max(1, -(-int(round(fraction * total * 1e6)) // 1_000_000))
    lo, hi = 0.0, max(float(t.max()) for t in tensors if t.numel())
    while True:
        above = sum(int((t > hi).sum()) for t in tensors)
        rank = k - above
        inside = [t[(t >= lo) & (t <= hi)] for t in tensors]
        count = sum(i.numel() for i in inside)
        if count <= exact or hi <= lo:
            if hi <= lo:
                return lo
            ordered = torch.cat(inside).sort(descending=True).values
            return float(ordered[rank - 1])
        counts = sum(torch.histc(i.float(), bins=bins, min=lo, max=hi) for i in inside)
        edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
        from_top = counts.flip(0).cumsum(0)
        b = bins - 1 - int(torch.searchsorted(from_top, torch.tensor(float(rank))))
        lo, hi = float(edges[b]), float(edges[b + 1])


def saliency_masks(grads: Mapping[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """Boolean masks, per tensor, of the weights whose |gradient| is in the top `fraction` of all of them."""
    threshold = top_fraction_threshold(grads, fraction)
    return {name: g.detach().abs() >= threshold for name, g in grads.items()}


def masked_step(optimizer: torch.optim.Optimizer, params: Mapping[str, torch.nn.Parameter], masks: Mapping[str, torch.Tensor]) -> None:
    """optimizer.step() that leaves every weight outside its mask exactly as it was.

    Zeroing gradients is not enough: AdamW's decoupled weight decay (and any momentum left from
    before) still moves them. So the frozen entries are saved before the step and written back.
    """
    frozen = {name: params[name].detach()[~masks[name]].clone() for name in masks}
    optimizer.step()
    with torch.no_grad():
        for name, values in frozen.items():
            params[name][~masks[name]] = values
