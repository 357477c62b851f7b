import numpy as np
import pytest
from scipy import ndimage

from shapes.judge import match_caption, read_objects
from shapes.scenes import BACKGROUND, Layout, Thing, make_scene, render

SCENES = [make_scene(seed) for seed in range(1000, 1300)]


def degraded(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur and colour noise like a generated image's."""
    x = ndimage.gaussian_filter(image.astype(np.float32), (1.0, 1.0, 0))
    x += rng.normal(0, 10, x.shape) + rng.normal(0, 12, (1, 1, 3))
    return np.clip(x, 0, 255)


def test_judge_is_exact_on_renders():
    for scene in SCENES:
        verdict = match_caption(scene.image, scene.caption)
        assert verdict.ok, (scene.caption, verdict.missing, verdict.extra)
        for obj, truth in zip(sorted(verdict.found, key=lambda o: o.colour), sorted(scene.objects, key=lambda o: o.colour)):
            # equal up to the ring of pixels the shape's edge covers about half of
            assert not (obj.mask & ~ndimage.binary_dilation(truth.mask)).any()
            assert not (ndimage.binary_erosion(truth.mask) & ~obj.mask).any()


def test_judge_holds_on_blurred_noisy_renders():
    rng = np.random.default_rng(0)
    ok = [match_caption(degraded(s.image, rng), s.caption).ok for s in SCENES]
    assert np.mean(ok) >= 0.97


def test_wrong_caption_is_rejected_with_what_differs():
    image, _ = render([("red", "circle", 20.0, 30.0, 10)])
    verdict = match_caption(image, "a red square")
    assert not verdict.ok and verdict.missing == ["red square"] and verdict.extra == ["red circle"]
    assert match_caption(image, "a red circle on the left").placement is True
    assert match_caption(image, "a red circle on the right").placement is False
    assert match_caption(image, "a red circle").placement is None
    pair, _ = render([("red", "circle", 15.0, 15.0, 9), ("blue", "triangle", 45.0, 45.0, 9)])
    assert match_caption(pair, "a red circle above a blue triangle").ok
    assert match_caption(pair, "a red circle below a blue triangle").placement is False
    assert not match_caption(pair, "a red circle").ok


def test_a_badly_drawn_shape_is_no_shape():
    image = np.full((64, 64, 3), BACKGROUND, np.uint8)
    image[20:28, 10:54] = (220, 40, 40)
    (obj,) = read_objects(image)
    assert obj.colour == "red" and obj.shape is None
    cross = np.full((64, 64, 3), BACKGROUND, np.uint8)
    cross[14:50, 28:36] = cross[28:36, 14:50] = (40, 90, 225)
    (obj,) = read_objects(cross)
    assert obj.shape is None
    assert not match_caption(cross, Layout((Thing("blue", "square"),), (None,))).ok


def four_pointed_star(inner: float) -> np.ndarray:
    """A blue star of outer radius 14 whose four inner vertices sit at `inner` times that radius."""
    angles = np.arange(8) * np.pi / 4 + np.pi / 4
    radii = np.where(np.arange(8) % 2 == 0, 14.0, 14.0 * inner)
    ys, xs = np.mgrid[0:64, 0:64] + 0.5
    angle = np.arctan2(ys - 32, xs - 32)
    # inside when the pixel centre is on the inner side of the star's edge in its sector
    k = np.floor(((angle - np.pi / 4) % (2 * np.pi)) / (np.pi / 4)).astype(int)
    a0, a1 = angles[k], angles[(k + 1) % 8]
    p0 = np.stack([32 + radii[k] * np.cos(a0), 32 + radii[k] * np.sin(a0)])
    p1 = np.stack([32 + radii[(k + 1) % 8] * np.cos(a1), 32 + radii[(k + 1) % 8] * np.sin(a1)])
    cross = (p1[0] - p0[0]) * (ys - p0[1]) - (p1[1] - p0[1]) * (xs - p0[0])
    origin = (p1[0] - p0[0]) * (32 - p0[1]) - (p1[1] - p0[1]) * (32 - p0[0])
    image = np.full((64, 64, 3), BACKGROUND, np.uint8)
    image[np.sign(cross) == np.sign(origin)] = (40, 90, 225)
    return image


def test_a_deformed_shape_is_no_shape_though_it_fills_a_template():
    (square,) = read_objects(four_pointed_star(np.cos(np.pi / 4)))
    assert square.shape == "square" and square.convexity > 0.97
    (star,) = read_objects(four_pointed_star(0.55))
    assert star.shape_iou > 0.85 and star.shape is None and star.convexity < 0.88
    assert not match_caption(four_pointed_star(0.55), "a blue square").ok
    clipped, _ = render([("red", "circle", 9.0, 30.0, 12)])
    (obj,) = read_objects(clipped)
    assert obj.clipped and obj.shape is None and obj.shape_iou > 0.72
    touching, _ = render([("red", "circle", 12.0, 30.0, 12)])  # its leftmost pixels on the edge, nothing cut
    assert not read_objects(touching)[0].clipped and read_objects(touching)[0].shape == "circle"


def test_blurred_renders_stay_convex():
    rng = np.random.default_rng(1)
    convexity = [o.convexity for s in SCENES[:100] for o in read_objects(degraded(s.image, rng))]
    assert min(convexity) >= 0.88


def test_empty_image_has_no_objects_and_bad_arrays_are_refused():
    assert read_objects(np.full((64, 64, 3), BACKGROUND, np.uint8)) == []
    with pytest.raises(ValueError, match="H x W x 3"):
        read_objects(np.zeros((64, 64)))
