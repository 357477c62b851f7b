import numpy as np
import pytest
import torch
from PIL import Image

from xattn.heatmap import aggregate, colourise, grid, normalise, overlay, with_colour_scale
from xattn.store import Key


def test_aggregate_is_the_mean_over_layer_steps_at_image_size():
    # one 1x1 layer recorded 2 times (sum 2*[0.25, 0.75]) and one 2x2 layer recorded once
    low = torch.tensor([[[0.5, 1.5]]])  # (rows=1, queries=1, keys=2)
    high = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.0, 1.0]]])  # (1, 4, 2)
    maps = aggregate([(Key("cross", (1, 1), None, None), low, 2), (Key("cross", (2, 2), None, None), high, 1)], (2, 2))
    expected_token0 = (torch.tensor([[0.5, 0.5], [0.5, 0.5]]) + torch.tensor([[1.0, 0.0], [0.5, 0.0]])) / 3
    assert maps.shape == (1, 2, 2, 2)
    assert torch.allclose(maps[0, 0], expected_token0)
    assert torch.allclose(maps.sum(1), torch.ones(1, 2, 2))


def test_normalisations():
    m = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    assert torch.allclose(normalise(m, "minmax"), torch.tensor([[0.0, 0.2], [0.4, 1.0]]))
    assert torch.allclose(normalise(m, "max"), m / 6)
    assert torch.allclose(normalise(m, "sum"), m / 12)
    assert torch.equal(normalise(m, "none"), m)
    tokens = torch.stack([m, 3 * m, m])  # token 1 gets 3x token 0's attention
    assert torch.allclose(normalise(tokens, "tokens", [0, 1])[1], torch.full((2, 2), 0.75))
    with pytest.raises(ValueError, match="unknown normalisation 'softmax'"):
        normalise(m, "softmax")


def test_colours_overlays_and_grids():
    ends = colourise(np.array([0.0, 1.0]))
    assert ends[0].tolist() == [0, 0, 4] and ends[1].tolist() == [252, 255, 164]
    assert (np.diff(colourise(np.linspace(0, 1, 50)).astype(int).sum(-1)) >= 0).all()  # brighter as heat grows
    image = Image.new("RGB", (8, 8), (100, 100, 100))
    hot = overlay(image, np.ones((4, 4)), alpha=1.0)
    assert hot.size == (8, 8) and np.asarray(hot)[0, 0].tolist() == [252, 255, 164]
    sheet = grid([image] * 5, [f"w{i}" for i in range(5)], columns=3, scale=2)
    assert sheet.size == (3 * 16, 2 * (16 + 20))
    assert np.asarray(sheet)[16 + 2 :, :16].min() < 100  # the first caption is drawn under its tile
    scaled = np.asarray(with_colour_scale(sheet, "min", "max", "each word"))
    assert scaled.shape[0] == sheet.size[1] and scaled.shape[1] > sheet.size[0]
    bar = scaled[20:-20, 3 * 16 + 6 + 8]
    assert bar[0].tolist() == [252, 255, 164] and bar[-1].tolist() == [0, 0, 4]  # brightest at the top
    with pytest.raises(ValueError, match="5 images but 4 captions"):
        grid([image] * 5, ["a"] * 4)
