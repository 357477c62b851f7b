"""Saliency thresholds against a full sort, and masked steps that hold under AdamW."""

import pytest
import torch

from pipelines.saliency import masked_step, saliency_masks, top_fraction_threshold


@pytest.mark.parametrize("fraction", [0.5, 0.1, 0.013, 1.0])
def test_threshold_equals_the_full_sort(fraction):
    g = torch.Generator().manual_seed(0)
    grads = {"a": torch.randn(300, 40, generator=g) ** 3, "b": torch.randn(2000, generator=g), "c": torch.zeros(500)}
    every = torch.cat([t.abs().flatten() for t in grads.values()]).sort(descending=True).values
    k = -(-round(fraction * every.numel() * 1e6) // 1_000_000)
    # exact=64 forces several histogram passes before the final sort.
    assert top_fraction_threshold(grads, fraction, bins=16, exact=64) == every[k - 1].item()
    masks = saliency_masks(grads, fraction)
    assert sum(int(m.sum()) for m in masks.values()) >= k


def test_ties_at_zero_and_bad_fractions():
    grads = {"a": torch.tensor([0.0, 0.0, 0.0, 2.0])}
    assert top_fraction_threshold(grads, 0.25) == 2.0
    assert top_fraction_threshold(grads, 0.5, exact=1) == 0.0
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        top_fraction_threshold(grads, 0.0)


def test_masked_adamw_step_moves_only_salient_weights():
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([weight], lr=0.1, weight_decay=0.5)
    mask = torch.tensor([True, False, True, False])
    weight.grad = torch.tensor([1.0, 1.0, -1.0, 0.0]) * mask
    masked_step(optimizer, {"w": weight}, {"w": mask})
    assert weight[1].item() == 1.0 and weight[3].item() == 1.0
    assert weight[0].item() < 1.0 and weight[2].item() > 1.0
    plain = torch.nn.Parameter(torch.ones(4))
    plain.grad = torch.zeros(4)
    torch.optim.AdamW([plain], lr=0.1, weight_decay=0.5).step()
    assert plain[1].item() < 1.0  # masking the gradient alone: weight decay still moves it
