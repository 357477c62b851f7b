"""The judge: reads any RGB image of the shapes world back into objects, and scores captions.

Colour comes from hue (the palette's hues are far apart and a blurred edge keeps its hue while
losing saturation), objects are connected components of one colour, and the shape is the
template (circle, square, triangle drawn in the component's box) that overlaps it best. A blob
that matches no template well is reported with shape None, so a badly drawn shape never passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from shapes.scenes import COLOURS, SHAPES, Layout, parse_caption, shape_mask

COVERAGE = 0.5
MIN_AREA_FRACTION = 0.012
MIN_SHAPE_IOU = 0.72
MAX_ASPECT = 1.45


@dataclass
class JudgedObject:
    colour: str
    shape: str | None
    mask: np.ndarray
    box: tuple[int, int, int, int]
    centre: tuple[float, float]
    shape_iou: float


@dataclass
class Verdict:
    """How an image answers a caption: objects exact (nothing missing, nothing extra) and places honoured."""

    exact: bool
    placement: bool | None
    found: list[JudgedObject]
    missing: list[str]
    extra: list[str]

    @property
    def ok(self) -> bool:
        return self.exact and self.placement is not False


def _hue(rgb: np.ndarray) -> np.ndarray:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    delta = np.maximum(mx - mn, 1e-6)
    h = np.where(mx == r, ((g - b) / delta) % 6, np.where(mx == g, (b - r) / delta + 2, (r - g) / delta + 4))
    return h * 60.0


_PALETTE_HUES = {name: float(_hue(np.asarray(rgb, np.float32))) for name, rgb in COLOURS.items()}
_PALETTE_SATURATION = np.asarray([max(rgb) - min(rgb) for rgb in COLOURS.values()], np.float32)


def colour_labels(image: np.ndarray) -> np.ndarray:
    """Per-pixel palette index (order of COLOURS), or -1 for background.

    A pixel belongs to a colour when its saturation is at least half that colour's: on an
    anti-aliased or blurred edge over the grey background, that is where the shape covers half
    the pixel, the same rule as the ground-truth masks.
    """
    rgb = np.asarray(image, np.float32)
    saturation = rgb.max(-1) - rgb.min(-1)
    hue = _hue(rgb)
    hues = np.asarray(list(_PALETTE_HUES.values()), np.float32)
    distance = np.abs((hue[..., None] - hues + 180.0) % 360.0 - 180.0)
    labels = distance.argmin(-1)
    return np.where(saturation >= COVERAGE * _PALETTE_SATURATION[labels], labels, -1)


def _classify_shape(mask: np.ndarray) -> tuple[str | None, float]:
    """The shape whose template of equal area and centroid overlaps the mask best, and that IoU.

    Fitting by moments rather than by bounding box keeps the judge exact on blurred images, where
    corners and the triangle's apex fade but area and centroid hardly move.
    """
    ys, xs = np.nonzero(mask)
    area = float(len(xs))
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    if max(width, height) > MAX_ASPECT * min(width, height):
        return None, 0.0
    best, best_iou = None, 0.0
    for shape in SHAPES:
        half = {"circle": np.sqrt(area / np.pi), "square": 0.5 * np.sqrt(area), "triangle": np.sqrt(0.5 * area)}[shape]
        centre_y = cy - half / 3 if shape == "triangle" else cy
        template = shape_mask(shape, cx, centre_y, half, mask.shape, supersample=2) >= 0.5
        iou = float((template & mask).sum() / max((template | mask).sum(), 1))
        if iou > best_iou:
            best, best_iou = shape, iou
    return (best if best_iou >= MIN_SHAPE_IOU else None), best_iou


def read_objects(image: np.ndarray) -> list[JudgedObject]:
    """Every object in an RGB image (H x W x 3, uint8 or float 0-255), largest first."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"the judge reads H x W x 3 RGB images; got an array of shape {image.shape}")
    labels = colour_labels(image)
    min_area = MIN_AREA_FRACTION * image.shape[0] * image.shape[1]
    found = []
    for index, colour in enumerate(COLOURS):
        layer = ndimage.binary_opening(labels == index, structure=np.ones((2, 2), bool))
        layer = ndimage.binary_fill_holes(layer)
        components, count = ndimage.label(layer)
        for k in range(1, count + 1):
            mask = components == k
            area = int(mask.sum())
            if area < min_area:
                continue
            ys, xs = np.nonzero(mask)
            box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
            shape, iou = _classify_shape(mask)
            found.append(JudgedObject(colour, shape, mask, box, (float(xs.mean()), float(ys.mean())), iou))
    found.sort(key=lambda o: -int(o.mask.sum()))
    return found


def match_caption(image: np.ndarray, caption: str | Layout) -> Verdict:
    """Does the image show exactly the caption's objects, where the caption puts them?"""
    layout = parse_caption(caption) if isinstance(caption, str) else caption
    found = read_objects(image)
    wanted = [str(t) for t in layout.things]
    seen = [f"{o.colour} {o.shape}" if o.shape else f"{o.colour} blob" for o in found]
    missing = list(wanted)
    extra = []
    matched: dict[int, JudgedObject] = {}
    for obj, name in zip(found, seen):
        if name in missing:
            i = next(i for i, w in enumerate(wanted) if w == name and i not in matched)
            matched[i] = obj
            missing.remove(name)
        else:
            extra.append(name)
    exact = not missing and not extra
    placement = _placement(layout, matched, image.shape[1], image.shape[0]) if exact else None
    return Verdict(exact, placement, found, missing, extra)


def _placement(layout: Layout, matched: dict[int, JudgedObject], width: int, height: int) -> bool | None:
    """None when the caption has no place words; else whether every one holds."""
    checks = []
    if layout.relation is not None:
        i, word, j = layout.relation
        (xi, yi), (xj, yj) = matched[i].centre, matched[j].centre
        checks.append({"left": xi < xj, "right": xi > xj, "above": yi < yj, "below": yi > yj}[word])
    for i, place in enumerate(layout.place):
        if place is None:
            continue
        x, y = matched[i].centre
        checks.append({"left": x < width / 2, "right": x > width / 2, "top": y < height / 2, "bottom": y > height / 2}[place])
    return all(checks) if checks else None
