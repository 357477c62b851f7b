"""The attention losses against hand-computed values and the papers' formulas."""

import math

import pytest
import torch

from xattn import losses


def test_default_kernel_is_the_one_attend_and_excite_actually_uses():
    # A&E builds exp(-((x - mu) / (2 * 0.5))^2); normalised over 3x3 that is centre .3319, edge .1221, corner .0449.
    k = losses.gaussian_kernel()
    edge = math.exp(-1)
    corner = math.exp(-2)
    total = 1 + 4 * edge + 4 * corner
    assert k[1, 1].item() == pytest.approx(1 / total, abs=1e-6)
    assert k[0, 1].item() == pytest.approx(edge / total, abs=1e-6)
    assert k[0, 0].item() == pytest.approx(corner / total, abs=1e-6)
    assert k[1, 1].item() == pytest.approx(0.3319, abs=1e-4)


def test_textbook_sigma_half_kernel():
    k = losses.gaussian_kernel(3, 0.5)
    assert k[1, 1].item() == pytest.approx(0.6193, abs=1e-4)
    assert k.sum().item() == pytest.approx(1.0)


def test_kernel_rejects_bad_sizes():
    with pytest.raises(ValueError, match="odd size"):
        losses.gaussian_kernel(4)
    with pytest.raises(ValueError, match="positive"):
        losses.gaussian_kernel(3, 0.0)


def test_smoothing_keeps_a_constant_map_and_spreads_a_point_as_the_kernel():
    k = losses.gaussian_kernel()
    flat = torch.full((2, 3, 6, 6), 0.25)
    assert torch.allclose(losses.smooth(flat, k), flat)
    point = torch.zeros(1, 1, 5, 5)
    point[0, 0, 2, 2] = 1.0
    assert torch.allclose(losses.smooth(point, k)[0, 0, 1:4, 1:4], k.flip(0).flip(1))


def test_token_shares_is_a_sharpened_softmax_over_the_prompt_tokens():
    # keys: [sot, a, red, circle, eot, pad]; one pixel.
    probs = torch.tensor([[[[0.70, 0.05, 0.10, 0.12, 0.02, 0.01]]]])
    shares = losses.token_shares(probs, [[(3,), (2, 3)]], [(1, 4)], temperature=100.0)
    logits = torch.tensor([5.0, 10.0, 12.0])
    expected = logits.softmax(0)
    assert shares.shape == (1, 2, 1, 1)
    assert shares[0, 0, 0, 0].item() == pytest.approx(expected[2].item(), rel=1e-5)
    assert shares[0, 1, 0, 0].item() == pytest.approx((expected[1] + expected[2]).item() / 2, rel=1e-5)
    every = losses.token_shares(probs, [[(3,)]], [(1, -1)], temperature=100.0)  # diffusers' 1:-1 also counts the eot
    assert every[0, 0, 0, 0].item() == pytest.approx(torch.tensor([5.0, 10.0, 12.0, 2.0]).softmax(0)[2].item(), rel=1e-5)
    t5 = losses.token_shares(probs[..., 1:], [[(2,)]], [(0, 3)], temperature=100.0)  # T5: no start-of-text, "circle" at 2
    assert t5[0, 0, 0, 0].item() == pytest.approx(expected[2].item(), rel=1e-5)


def test_token_attention_and_peak_normalisation():
    probs = torch.zeros(1, 2, 2, 4)
    probs[0, :, :, 1] = torch.tensor([[0.1, 0.2], [0.3, 0.4]])
    probs[0, :, :, 2] = torch.tensor([[0.3, 0.0], [0.1, 0.0]])
    maps = losses.token_attention(probs, [[(1,), (1, 2)]])
    assert torch.allclose(maps[0, 1], torch.tensor([[0.2, 0.1], [0.2, 0.2]]))
    norm = losses.peak_normalised(maps)
    assert torch.allclose(norm[0, 0], torch.tensor([[0.25, 0.5], [0.75, 1.0]]))
    assert torch.allclose(norm.amax(dim=(-2, -1)), torch.ones(1, 2))


def test_attend_excite_loss_is_the_most_neglected_concepts_gap():
    maps = torch.zeros(2, 2, 3, 3)
    maps[0, 0, 1, 1], maps[0, 1, 0, 2] = 0.9, 0.4
    maps[1, 0, 0, 0], maps[1, 1, 2, 2] = 1.0, 1.2
    assert torch.allclose(losses.attend_excite_loss(maps), torch.tensor([0.6, 0.0]))
    assert torch.allclose(losses.peaks(maps), torch.tensor([[0.9, 0.4], [1.0, 1.2]]))


def test_segregation_is_eq2_summed_over_pairs():
    a = torch.tensor([[1.0, 0.5]])
    b = torch.tensor([[0.5, 1.0]])
    maps = torch.stack([a, b])[None]
    assert losses.segregation_loss(maps).item() == pytest.approx(1.0 / 3.0)  # (0.5 + 0.5) / 3
    same = torch.rand(1, 1, 4, 4).expand(1, 3, 4, 4)
    assert losses.segregation_loss(same).item() == pytest.approx(1.5)  # three pairs of 0.5
    apart = torch.zeros(1, 2, 2, 2)
    apart[0, 0, 0], apart[0, 1, 1] = 1.0, 1.0
    assert losses.segregation_loss(apart).item() == 0.0
    assert losses.segregation_loss(torch.rand(1, 1, 4, 4)).item() == 0.0


def test_retention_is_eq3_summed_over_concepts():
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    assert losses.retention_loss(mask, mask).item() == pytest.approx(0.5)
    assert losses.retention_loss(torch.zeros_like(mask), mask).item() == pytest.approx(1.0)
    maps = torch.tensor([[[[0.5, 0.5], [1.0, 0.0]]]])
    # sum(min) = 0.5 + 1.0 = 1.5; sum(A + B) = 2.0 + 2.0 = 4.0
    assert losses.retention_loss(maps, mask).item() == pytest.approx(1 - 1.5 / 4.0)
    two = torch.cat([maps, mask], 1)
    assert losses.retention_loss(two, torch.cat([mask, mask], 1)).item() == pytest.approx(1 - 1.5 / 4.0 + 0.5)


def test_layout_loss_is_the_squared_share_outside_each_mask():
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    assert losses.layout_loss(mask * 0.7, mask).item() == pytest.approx(0.0)  # all attention inside, at any scale
    maps = torch.tensor([[[[0.5, 0.5], [1.0, 0.0]]]])
    # inside: 0.5 + 1.0 of 2.0 -> (1 - 0.75)^2
    assert losses.layout_loss(maps, mask).item() == pytest.approx(0.0625)
    two = torch.cat([maps, torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])], 1)  # the second wholly outside its mask: 1
    assert losses.layout_loss(two, torch.cat([mask, mask], 1)).item() == pytest.approx(1.0625)
    unknown = torch.cat([mask, torch.full_like(mask, float("nan"))], 1)  # no mask for the second concept
    assert losses.layout_loss(two, unknown).item() == pytest.approx(0.0625)
    pulled = torch.full((1, 1, 4, 4), 0.3, requires_grad=True)
    half = torch.zeros(1, 1, 4, 4)
    half[..., :, :2] = 1.0
    losses.layout_loss(pulled, half).backward()
    assert (pulled.grad[..., :, :2] < 0).all() and (pulled.grad[..., :, 2:] > 0).all()


def test_retention_gradient_pulls_attention_into_the_mask():
    maps = torch.full((1, 1, 4, 4), 0.3, requires_grad=True)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1.0
    losses.retention_loss(maps, mask).backward()
    assert (maps.grad[..., :2, :] < 0).all() and (maps.grad[..., 2:, :] > 0).all()


def test_segregation_gradient_pushes_the_overlap_apart():
    # L = sum(min) / sum(a + b) = 0.8 / 2; dL/dx_j = (1[x_j is the smaller] * 2 - 0.8) / 4.
    maps = torch.tensor([[[[0.8, 0.2]], [[0.6, 0.4]]]], requires_grad=True)
    losses.segregation_loss(maps).backward()
    assert torch.allclose(maps.grad[0, :, 0], torch.tensor([[-0.2, 0.3], [0.3, -0.2]]))


def test_binary_masks_threshold_each_map_at_a_fraction_of_its_peak():
    maps = torch.tensor([[[[0.2, 0.5], [0.9, 1.0]], [[0.1, 0.05], [0.0, 0.2]]]], requires_grad=True)
    masks = losses.binary_masks(maps, 0.5)
    assert not masks.requires_grad
    assert masks.tolist() == [[[[0.0, 1.0], [1.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]]]


def test_mean_overlap_is_the_pairs_soft_iou():
    a = torch.tensor([[1.0, 0.5]])
    b = torch.tensor([[0.5, 1.0]])
    assert losses.mean_overlap(torch.stack([a, b])[None]).item() == pytest.approx(1.0 / 2.0)  # 1 / 2
    assert losses.mean_overlap(torch.stack([a, a])[None]).item() == pytest.approx(1.0)
    assert losses.mean_overlap(a[None, None]).item() == 0.0


def test_step_sizes_follow_attend_and_excite():
    alphas = losses.step_sizes(20.0, 50)
    assert [round(float(alphas[i]), 2) for i in (0, 10, 20, 49)] == [20.0, 18.95, 17.84, 14.14]


def test_disjoint_loss_is_the_mean_pairwise_cosine_of_the_object_maps():
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    c = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    maps = torch.stack([torch.stack([a, b, c]), torch.stack([a, a, a])])
    # row 0: cos(a, b) = 1/sqrt(2), cos(a, c) = 0, cos(b, c) = 0; row 1: identical maps
    assert torch.allclose(losses.disjoint_loss(maps), torch.tensor([(1 / math.sqrt(2)) / 3, 1.0]))
    assert losses.disjoint_loss(maps[:, :1]).tolist() == [0.0, 0.0]


def test_background_loss_is_the_mean_cosine_of_each_object_map_with_the_background():
    background = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    inside = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    leaking = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    maps = torch.stack([inside, leaking])[None]
    # cos(inside, bg) = 0; cos(leaking, bg) = 1 / (sqrt(2) sqrt(3))
    assert torch.allclose(losses.background_loss(maps, background), torch.tensor([(1 / math.sqrt(6)) / 2]))


def test_dpl_thresholds_decay_as_the_paper_schedules_them():
    assert losses.dpl_threshold(0, alpha=25, beta=0.3) == 0.3
    assert math.isclose(losses.dpl_threshold(25, alpha=25, beta=0.9), 0.9 / math.e)
