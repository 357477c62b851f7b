"""The closed-form edit against a hand-solved case and the properties UCE relies on."""

import pytest
import torch

from pipelines.closed_form import ridge_edit


def test_one_dimensional_case_by_hand():
    # W = [[2]], erase c = 1 -> target 0, lam = 1, s_e = 1: W' = (1*2 + 0*1) / (1 + 1) = 1.
    assert ridge_edit(torch.tensor([[2.0]]), torch.tensor([[1.0]]), torch.tensor([[0.0]]), lam=1.0).item() == pytest.approx(1.0)
    # adding a preserved input p = 1 (also 1): W' = (2 + 0 + 2) / (1 + 1 + 1) = 4/3.
    edited = ridge_edit(torch.tensor([[2.0]]), torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[1.0]]), lam=1.0)
    assert edited.item() == pytest.approx(4 / 3)


def test_erased_inputs_go_to_their_targets_and_preserved_ones_stay():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 8, generator=g)
    erase, guide, keep = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g), torch.randn(3, 8, generator=g)
    targets = (weight @ guide.T).T  # UCE: erased inputs take what the guide concept gave
    edited = ridge_edit(weight, erase, targets, keep, lam=1e-6)
    assert torch.allclose(edited @ erase.T, targets.T, atol=1e-3)
    assert torch.allclose(edited @ keep.T, weight @ keep.T, atol=1e-3)
    before = (weight @ erase.T - targets.T).norm()
    assert before > 1.0


def test_shapes_and_lam_are_checked():
    with pytest.raises(ValueError, match=r"erase inputs must be \(n, 4\)"):
        ridge_edit(torch.zeros(3, 4), torch.zeros(2, 5), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="one per erase input"):
        ridge_edit(torch.zeros(3, 4), torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="lam must be positive"):
        ridge_edit(torch.zeros(3, 4), torch.zeros(2, 4), torch.zeros(2, 3), lam=0.0)
