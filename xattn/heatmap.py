"""Heat maps from recorded attention: aggregate, upsample, normalise, colour, overlay, grid."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from xattn.store import Key

NORMALISATIONS = ("minmax", "max", "sum", "tokens", "none")


def aggregate(selected: list[tuple[Key, torch.Tensor, int]], size: tuple[int, int]) -> torch.Tensor:
    """Mean map per token over every recorded layer and step, at `size`: (rows, keys, H, W).

    Each resolution's sum is upsampled (bilinear, so maps stay non-negative) and the total is
    divided by the number of layer-steps, so every layer at every step weighs the same.
    """
    total, count = None, 0
    for key, sums, n in selected:
        rows, _, keys = sums.shape
        grid = sums.transpose(1, 2).reshape(rows, keys, *key.resolution)
        up = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
        total = up if total is None else total + up
        count += n
    return total / count


def normalise(maps: torch.Tensor, how: str, word_tokens: list[int] | None = None) -> torch.Tensor:
    """Normalise (..., H, W) maps: "minmax" to [0, 1], "max" by the peak, "sum" to a distribution over pixels,
    "tokens" to each token's share of the attention the words get at each pixel (needs word_tokens
    and maps of shape (keys, H, W)), "none" as they are."""
    if how == "minmax":
        low = maps.amin(dim=(-2, -1), keepdim=True)
        return (maps - low) / (maps.amax(dim=(-2, -1), keepdim=True) - low).clamp_min(1e-12)
    if how == "max":
        return maps / maps.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    if how == "sum":
        return maps / maps.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    if how == "tokens":
        if word_tokens is None:
            raise ValueError('normalise="tokens" needs the token indices of the prompt\'s words')
        return maps / maps[word_tokens].sum(0, keepdim=True).clamp_min(1e-12)
    if how == "none":
        return maps
    raise ValueError(f"unknown normalisation {how!r}; choose one of {', '.join(NORMALISATIONS)}")


_STOPS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float32)


def colourise(heat: np.ndarray) -> np.ndarray:
    """A [0, 1] map to RGB uint8 with a perceptually ordered dark-to-bright colour map."""
    x = np.clip(heat, 0, 1) * (len(_STOPS) - 1)
    low = np.floor(x).astype(int).clip(0, len(_STOPS) - 2)
    frac = (x - low)[..., None]
    return np.rint(_STOPS[low] * (1 - frac) + _STOPS[low + 1] * frac).astype(np.uint8)


def overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.6) -> Image.Image:
    """The image with a [0, 1] heat map blended over it (heat resized to the image if needed)."""
    base = np.asarray(image.convert("RGB"), np.float32)
    if heat.shape != base.shape[:2]:
        heat = np.asarray(Image.fromarray(np.float32(heat)).resize(image.size, Image.BILINEAR))
    blended = (1 - alpha) * base + alpha * colourise(heat).astype(np.float32)
    return Image.fromarray(np.rint(blended).astype(np.uint8))


LABEL_HEIGHT = 20


def _label_font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=14)


def grid(images: list[Image.Image], captions: list[str], columns: int = 6, scale: int = 1) -> Image.Image:
    """Tiles with a caption strip under each, for a quick look at many maps at once."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    w, h = images[0].size
    w, h = w * scale, h * scale
    columns = max(1, min(columns, len(images)))
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * w, rows * (h + LABEL_HEIGHT)), "white")
    draw = ImageDraw.Draw(sheet)
    font = _label_font()
    for i, (tile, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * w, (i // columns) * (h + LABEL_HEIGHT)
        sheet.paste(tile.resize((w, h), Image.NEAREST), (x, y))
        draw.text((x + 3, y + h + 2), caption, fill="black", font=font)
    return sheet


def with_colour_scale(sheet: Image.Image, low: str, high: str, title: str) -> Image.Image:
    """The sheet with the heat colours as a vertical bar on its right, its ends labelled, so a tile's colours read as values."""
    font = _label_font()
    bar_width, margin = 16, 6
    text_width = int(max(font.getlength(t) for t in (low, high, title))) + margin
    out = Image.new("RGB", (sheet.width + margin + bar_width + text_width, sheet.height), "white")
    out.paste(sheet, (0, 0))
    top, bottom = LABEL_HEIGHT, max(sheet.height - LABEL_HEIGHT, LABEL_HEIGHT + 2)
    ramp = colourise(np.linspace(1, 0, bottom - top)[:, None].repeat(bar_width, 1))
    x = sheet.width + margin
    out.paste(Image.fromarray(ramp), (x, top))
    draw = ImageDraw.Draw(out)
    draw.text((x, 2), title, fill="black", font=font)
    draw.text((x + bar_width + 4, top), high, fill="black", font=font)
    draw.text((x + bar_width + 4, bottom - LABEL_HEIGHT + 4), low, fill="black", font=font)
    return out
