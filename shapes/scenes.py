"""The shapes world: seeded scenes of flat coloured shapes, their captions and ground truth.

Everything the judge, the trainer and the benchmarks know about the world lives here, so a
caption, the picture drawn for it and the ground truth used to score a model never disagree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (235, 200, 30),
    "green": (40, 170, 60),
    "blue": (40, 90, 225),
    "purple": (150, 60, 200),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND: tuple[int, int, int] = (235, 235, 235)
PLACES: tuple[str, ...] = ("left", "right", "top", "bottom")
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")

IMAGE_SIZE = 64
MIN_HALF_SIZE = 8
MAX_HALF_SIZE = 12
GAP = 3
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Thing:
    """One object a caption names: a colour and a shape."""

    colour: str
    shape: str

    def __str__(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Layout:
    """What a caption says: the objects in word order and where they stand.

    `place[i]` is an absolute place (left/right/top/bottom of the picture) for object i or None;
    `relation` is (i, word, j) meaning object i is `word` (left/right/above/below) of object j.
    """

    things: tuple[Thing, ...]
    place: tuple[str | None, ...]
    relation: tuple[int, str, int] | None = None


@dataclass
class SceneObject:
    """Ground truth for one drawn object: mask and box in image pixels (box is x0, y0, x1, y1 inclusive)."""

    colour: str
    shape: str
    centre: tuple[float, float]
    half_size: int
    mask: np.ndarray
    box: tuple[int, int, int, int]


@dataclass
class Scene:
    image: np.ndarray
    caption: str
    layout: Layout
    objects: list[SceneObject] = field(default_factory=list)


def caption_of(layout: Layout) -> str:
    """The natural-language caption for a layout (inverse of `parse_caption`)."""
    t = layout.things
    if layout.relation is not None:
        i, word, j = layout.relation
        if len(t) != 2:
            raise ValueError("a relation caption names exactly two objects")
        if word in ("left", "right") and layout.place[i] is not None:
            return f"a {t[i]} on the {layout.place[i]} and a {t[j]} on the {layout.place[j]}"
        phrase = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}[word]
        return f"a {t[i]} {phrase} a {t[j]}"
    if len(t) == 1:
        place = layout.place[0]
        if place is None:
            return f"a {t[0]}"
        preposition = "on the" if place in ("left", "right") else "at the"
        return f"a {t[0]} {preposition} {place}"
    names = [f"a {thing}" for thing in t]
    return ", ".join(names[:-1]) + " and " + names[-1]


def erasure_prompts(concept: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(contexts, preserve) for erasing `concept` (a colour, a shape, or "colour shape") from a model of this world:
    the one-object captions that name it, and those that do not. Erasing from the captions users type, not from
    templates ("a photo of a circle") the world never says, is what makes the erasure reach "a red circle"; bare words
    ("a red") stay out, as they are what "a red circle" becomes when UCE drops the word with no guide."""
    words = set(concept.split())
    captions = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
    named = tuple(c for c in captions if words <= set(c.split()[1:]))
    kept = tuple(c for c in captions if not words & set(c.split()[1:]))
    return named or (f"a {concept}",), kept


_THING = r"(?:a|an) (\w+) (\w+)"
_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(rf"^{_THING} on the (left|right) and {_THING} on the (left|right)$"), "pair-places"),
    (re.compile(rf"^{_THING} (to the left of|to the right of|above|below) {_THING}$"), "pair-relation"),
    (re.compile(rf"^{_THING} (?:on|at) the (left|right|top|bottom)$"), "one-place"),
]


def swap_first_shape(layout: Layout) -> Layout:
    """The layout with its first object turned into the next shape (circle, square, triangle, circle): a word swap's target."""
    first = layout.things[0]
    turned = Thing(first.colour, SHAPES[(SHAPES.index(first.shape) + 1) % len(SHAPES)])
    return replace(layout, things=(turned, *layout.things[1:]))


def parse_caption(caption: str) -> Layout:
    """Read a caption of this world back into a Layout.

    Accepts the templates `caption_of` writes; case and surrounding spaces or a final full stop
    are ignored. Raises ValueError naming the caption when it is not one of them or names an
    unknown colour or shape.
    """
    text = " ".join(caption.lower().strip().rstrip(".").split())
    for pattern, kind in _PATTERNS:
        m = pattern.match(text)
        if not m:
            continue
        g = m.groups()
        if kind == "pair-places":
            things = (_thing(g[0], g[1], caption), _thing(g[3], g[4], caption))
            if g[2] == g[5]:
                raise ValueError(f"caption {caption!r} puts both objects on the {g[2]}")
            return Layout(things, (g[2], g[5]), (0, g[2], 1))
        if kind == "pair-relation":
            word = {"to the left of": "left", "to the right of": "right", "above": "above", "below": "below"}[g[2]]
            return Layout((_thing(g[0], g[1], caption), _thing(g[3], g[4], caption)), (None, None), (0, word, 1))
        return Layout((_thing(g[0], g[1], caption),), (g[2],))
    parts = re.split(r", | and ", text)
    things = []
    for part in parts:
        m = re.fullmatch(_THING, part)
        if not m:
            raise ValueError(
                f"caption {caption!r} is not one of the shapes world's templates, e.g. "
                "'a red circle', 'a red circle on the left', 'a red circle and a blue square', "
                "'a red circle above a blue square'"
            )
        things.append(_thing(m.group(1), m.group(2), caption))
    return Layout(tuple(things), (None,) * len(things))


def _thing(colour: str, shape: str, caption: str) -> Thing:
    if colour not in COLOURS:
        raise ValueError(f"caption {caption!r} names colour {colour!r}; the world has {', '.join(COLOURS)}")
    if shape not in SHAPES:
        raise ValueError(f"caption {caption!r} names shape {shape!r}; the world has {', '.join(SHAPES)}")
    return Thing(colour, shape)


def shape_mask(shape: str, cx: float, cy: float, half: float, size: int | tuple[int, int], supersample: int = 1) -> np.ndarray:
    """Coverage in [0, 1] of a shape centred at (cx, cy) with half-extent `half`, on a grid of `size` (n or (h, w)).

    Shapes are upright: a circle of radius `half`, a square of side 2*half, a triangle with its
    apex at the top centre and its base along the bottom of the 2*half box. With supersample > 1
    the edges are anti-aliased by averaging a finer grid.
    """
    height, width = (size, size) if isinstance(size, int) else size
    y, x = np.meshgrid((np.arange(height * supersample) + 0.5) / supersample, (np.arange(width * supersample) + 0.5) / supersample, indexing="ij")
    dx, dy = x - cx, y - cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= half * half
    elif shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif shape == "triangle":
        depth = (dy + half) / (2 * half)
        inside = (depth >= 0) & (depth <= 1) & (np.abs(dx) <= half * depth)
    else:
        raise ValueError(f"unknown shape {shape!r}; the world has {', '.join(SHAPES)}")
    cover = inside.astype(np.float32)
    if supersample > 1:
        cover = cover.reshape(height, supersample, width, supersample).mean(axis=(1, 3))
    return cover


def render(objects: list[tuple[str, str, float, float, int]], size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[SceneObject]]:
    """Draw (colour, shape, cx, cy, half) objects on the background; returns uint8 HxWx3 and ground truth."""
    image = np.empty((size, size, 3), np.float32)
    image[:] = BACKGROUND
    truth = []
    for colour, shape, cx, cy, half in objects:
        x0, y0 = max(int(cx - half) - 1, 0), max(int(cy - half) - 1, 0)
        x1, y1 = min(int(cx + half) + 2, size), min(int(cy + half) + 2, size)
        cover = np.zeros((size, size), np.float32)
        cover[y0:y1, x0:x1] = shape_mask(shape, cx - x0, cy - y0, half, (y1 - y0, x1 - x0), SUPERSAMPLE)
        image = image * (1 - cover[..., None]) + np.asarray(COLOURS[colour], np.float32) * cover[..., None]
        mask = cover >= 0.5
        ys, xs = np.nonzero(mask)
        truth.append(SceneObject(colour, shape, (cx, cy), half, mask, (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), truth


def sample_layout(rng: np.random.Generator) -> Layout:
    """A random caption layout: 1-3 objects of distinct colours, some with places or a relation."""
    count = rng.choice([1, 2, 3], p=[0.35, 0.5, 0.15])
    colours = rng.choice(list(COLOURS), size=count, replace=False)
    things = tuple(Thing(str(c), str(rng.choice(SHAPES))) for c in colours)
    kind = rng.random()
    if count == 1:
        place = str(rng.choice(PLACES)) if kind < 0.5 else None
        return Layout(things, (place,))
    if count == 2 and kind < 0.25:
        left = int(rng.integers(2))
        places = ("left", "right") if left == 0 else ("right", "left")
        return Layout(things, places, (0, places[0], 1))
    if count == 2 and kind < 0.6:
        return Layout(things, (None, None), (0, str(rng.choice(RELATIONS)), 1))
    return Layout(things, (None,) * count)


def _centre_range(place: str | None, axis: str, half: int, size: int) -> tuple[float, float]:
    lo, hi = half + 1.0, size - half - 1.0
    edge = 0.36 * size
    if (axis == "x" and place == "left") or (axis == "y" and place == "top"):
        return lo, max(lo, edge)
    if (axis == "x" and place == "right") or (axis == "y" and place == "bottom"):
        return min(hi, size - edge), hi
    return lo, hi


def _satisfies(layout: Layout, centres: list[tuple[float, float]], halves: list[int]) -> bool:
    for a in range(len(centres)):
        for b in range(a + 1, len(centres)):
            (xa, ya), (xb, yb) = centres[a], centres[b]
            reach = halves[a] + halves[b] + GAP
            if abs(xa - xb) < reach and abs(ya - yb) < reach:
                return False
    if layout.relation is not None:
        i, word, j = layout.relation
        (xi, yi), (xj, yj) = centres[i], centres[j]
        margin = 0.5 * (halves[i] + halves[j])
        if word == "left" and not xi + margin < xj:
            return False
        if word == "right" and not xi > xj + margin:
            return False
        if word == "above" and not yi + margin < yj:
            return False
        if word == "below" and not yi > yj + margin:
            return False
        if layout.place[i] is not None and not (xi < 0.5 * IMAGE_SIZE) == (layout.place[i] == "left"):
            return False
        if layout.place[j] is not None and not (xj < 0.5 * IMAGE_SIZE) == (layout.place[j] == "left"):
            return False
    return True


def place_objects(layout: Layout, rng: np.random.Generator, size: int = IMAGE_SIZE) -> list[tuple[str, str, float, float, int]]:
    """Positions and sizes for a layout's objects: non-overlapping, true to every place word."""
    for _ in range(1000):
        halves = [int(rng.integers(MIN_HALF_SIZE, MAX_HALF_SIZE + 1)) for _ in layout.things]
        centres = []
        for place, half in zip(layout.place, halves):
            single = place if layout.relation is None else None
            x0, x1 = _centre_range(single if single in ("left", "right") else None, "x", half, size)
            y0, y1 = _centre_range(single if single in ("top", "bottom") else None, "y", half, size)
            centres.append((float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1))))
        if _satisfies(layout, centres, halves):
            return [(t.colour, t.shape, cx, cy, h) for t, (cx, cy), h in zip(layout.things, centres, halves)]
    raise RuntimeError(f"could not place {caption_of(layout)!r} without overlap")


def make_scene(seed: int, layout: Layout | None = None) -> Scene:
    """The scene for a seed: a random layout (or the given one), placed and rendered."""
    rng = np.random.default_rng(seed)
    layout = layout or sample_layout(rng)
    image, objects = render(place_objects(layout, rng))
    return Scene(image, caption_of(layout), layout, objects)
