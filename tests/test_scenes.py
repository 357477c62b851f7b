import numpy as np
import pytest

from shapes.scenes import (
    COLOURS,
    GAP,
    IMAGE_SIZE,
    Layout,
    Thing,
    caption_of,
    make_scene,
    parse_caption,
    shape_mask,
    swap_first_shape,
)

SCENES = [make_scene(seed) for seed in range(400)]


def test_scenes_are_reproducible_and_vary_with_seed():
    a, b = make_scene(7), make_scene(7)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert not np.array_equal(make_scene(8).image, a.image)


def test_scene_contents():
    counts = {len(s.objects) for s in SCENES}
    assert counts == {1, 2, 3}
    for scene in SCENES:
        assert scene.image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and scene.image.dtype == np.uint8
        colours = [o.colour for o in scene.objects]
        assert len(set(colours)) == len(colours)
        assert [(o.colour, o.shape) for o in scene.objects] == [(t.colour, t.shape) for t in scene.layout.things]
        for i, a in enumerate(scene.objects):
            x0, y0, x1, y1 = a.box
            ys, xs = np.nonzero(a.mask)
            assert (xs.min(), ys.min(), xs.max(), ys.max()) == (x0, y0, x1, y1)
            for b in scene.objects[i + 1 :]:
                separated_x = abs(a.centre[0] - b.centre[0]) >= a.half_size + b.half_size + GAP
                separated_y = abs(a.centre[1] - b.centre[1]) >= a.half_size + b.half_size + GAP
                assert separated_x or separated_y
                assert not (a.mask & b.mask).any()


def test_object_pixels_have_their_colour():
    for scene in SCENES[:50]:
        for obj in scene.objects:
            core = scene.image[obj.mask].astype(int)
            assert np.median(core, axis=0).tolist() == list(COLOURS[obj.colour])


def test_place_words_are_true_to_the_picture():
    checked = 0
    for scene in SCENES:
        layout = scene.layout
        for obj, place in zip(scene.objects, layout.place):
            x, y = obj.centre
            if place is None:
                continue
            checked += 1
            assert {"left": x < 32, "right": x > 32, "top": y < 32, "bottom": y > 32}[place], scene.caption
        if layout.relation:
            i, word, j = layout.relation
            (xi, yi), (xj, yj) = scene.objects[i].centre, scene.objects[j].centre
            checked += 1
            assert {"left": xi < xj, "right": xi > xj, "above": yi < yj, "below": yi > yj}[word], scene.caption
    assert checked > 100


def test_captions_round_trip_and_read_naturally():
    assert all(parse_caption(s.caption) == s.layout for s in SCENES)
    red, blue, green = Thing("red", "circle"), Thing("blue", "square"), Thing("green", "triangle")
    assert caption_of(Layout((red, blue), (None, None))) == "a red circle and a blue square"
    assert caption_of(Layout((green,), ("left",))) == "a green triangle on the left"
    assert caption_of(Layout((green,), ("top",))) == "a green triangle at the top"
    assert caption_of(Layout((red, blue), (None, None), (0, "above", 1))) == "a red circle above a blue square"
    assert caption_of(Layout((red, blue), ("right", "left"), (0, "right", 1))) == "a red circle on the right and a blue square on the left"
    assert caption_of(Layout((red, blue, green), (None,) * 3)) == "a red circle, a blue square and a green triangle"
    assert parse_caption("  A Red Circle and a blue square. ") == Layout((red, blue), (None, None))


def test_word_order_varies_independently_of_placement():
    firsts_left = [s.objects[0].centre[0] < s.objects[1].centre[0] for s in SCENES if len(s.objects) == 2 and s.layout.relation is None]
    assert 0.3 < np.mean(firsts_left) < 0.7


@pytest.mark.parametrize(
    "caption, message",
    [("a pink circle", "colour 'pink'"), ("a red hexagon", "shape 'hexagon'"), ("two red circles", "templates"),
     ("a red circle on the left and a blue square on the left", "both objects")],
)
def test_bad_captions_say_what_is_wrong(caption, message):
    with pytest.raises(ValueError, match=message):
        parse_caption(caption)


def test_shape_areas_match_geometry():
    half = 10.0
    area = {s: shape_mask(s, 32, 32, half, 64, supersample=8).sum() for s in ("circle", "square", "triangle")}
    assert area["circle"] == pytest.approx(np.pi * half**2, rel=0.01)
    assert area["square"] == pytest.approx(4 * half**2, rel=0.01)
    assert area["triangle"] == pytest.approx(2 * half**2, rel=0.01)


def test_swap_first_shape_turns_only_the_first_object():
    layout = parse_caption("a blue triangle above a red circle")
    assert caption_of(swap_first_shape(layout)) == "a blue circle above a red circle"
    assert caption_of(swap_first_shape(parse_caption("a green circle on the left"))) == "a green square on the left"
