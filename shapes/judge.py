"""The judge: reads any RGB image of the shapes world back into objects, and scores captions.

Colour comes from hue (the palette's hues are far apart and a blurred edge keeps its hue while
losing saturation), objects are connected components of one colour, and the shape is the
template (circle, square, triangle drawn in the component's box) that overlaps it best. A blob
that matches no template well is reported with shape None, so a badly drawn shape never passes;
so is one that overlaps a template well but is deformed: concave where its template is convex
(a four-pointed star over a square's area), or cut by the image's border, which the world's
scenes keep clear of.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull

from shapes.scenes import COLOURS, SHAPES, Layout, parse_caption, shape_mask

COVERAGE = 0.5
MIN_AREA_FRACTION = 0.012
MIN_SHAPE_IOU = 0.72
MAX_ASPECT = 1.45
MIN_CONVEXITY = 0.88
MIN_CUT = 0.4


@dataclass
class JudgedObject:
    colour: str
    shape: str | None
    mask: np.ndarray
    box: tuple[int, int, int, int]
    centre: tuple[float, float]
    shape_iou: float
    convexity: float
    clipped: bool


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


def _solidity(mask: np.ndarray) -> float:
    """The mask's area over the area of the convex hull of its pixels' squares."""
    ys, xs = np.nonzero(mask)
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    return float(mask.sum() / ConvexHull(corners).volume)


def _classify_shape(mask: np.ndarray) -> tuple[str | None, float, float]:
    """The shape whose template of equal area and centroid overlaps the mask best, that IoU, and the convexity.

    Fitting by moments rather than by bounding box keeps the judge exact on blurred images, where
    corners and the triangle's apex fade but area and centroid hardly move. Convexity is the
    mask's solidity over its template's, both rasterised alike, so the staircase edges of a
    pixelated circle or triangle cost nothing: 1 for a clean shape, at least 0.90 on blurred,
    noisy renders, 0.85 for a square whose sides are pinched to a four-pointed star.
    """
    ys, xs = np.nonzero(mask)
    area = float(len(xs))
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    if max(width, height) > MAX_ASPECT * min(width, height):
        return None, 0.0, 0.0
    best, best_iou, best_template = None, 0.0, mask
    for shape in SHAPES:
        half = {"circle": np.sqrt(area / np.pi), "square": 0.5 * np.sqrt(area), "triangle": np.sqrt(0.5 * area)}[shape]
        centre_y = cy - half / 3 if shape == "triangle" else cy
        template = shape_mask(shape, cx, centre_y, half, mask.shape, supersample=2) >= 0.5
        iou = float((template & mask).sum() / max((template | mask).sum(), 1))
        if iou > best_iou:
            best, best_iou, best_template = shape, iou, template
    convexity = _solidity(mask) / _solidity(best_template) if best_template.any() else 0.0
    well_drawn = best_iou >= MIN_SHAPE_IOU and convexity >= MIN_CONVEXITY
    return (best if well_drawn else None), best_iou, convexity


def _cut_by_border(mask: np.ndarray, box: tuple[int, int, int, int]) -> bool:
    """Whether the border cuts the object: on some edge of the image, its pixels span at least 0.4 of its extent
    along that edge. A circle drawn tangent to an edge covers 0.3 of its width there; cut by one pixel, 0.43."""
    width, height = box[2] - box[0] + 1, box[3] - box[1] + 1
    edges = ((mask[0], width), (mask[-1], width), (mask[:, 0], height), (mask[:, -1], height))
    return any(edge.sum() >= MIN_CUT * extent for edge, extent in edges)


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
            shape, iou, convexity = _classify_shape(mask)
            clipped = _cut_by_border(mask, box)
            centre = (float(xs.mean()), float(ys.mean()))
            found.append(JudgedObject(colour, None if clipped else shape, mask, box, centre, iou, convexity, clipped))
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
