"""Dynamic Prompt Learning: the clustering and its naming on hand-made tensors, and real-image inversion and editing with
learnt noun tokens on the embedded model."""

import re

import numpy as np
import pytest
import torch

from pipelines.ddim import ddim_from, ddim_levels
from pipelines.dpl import DPLSettings, encode_with, find_nouns, initial_vectors, learn_step, map_capture, terms, user_background
from pipelines.edit import prompt_to_prompt
from pipelines.images import psnr
from pipelines.inversion import invert, reconstruct
from pipelines.loading import load_pipeline
from shapes.scenes import make_scene
from xattn.capture import MapCapture
from xattn.clustering import BACKGROUND, kmeans, name_clusters, regions
from xattn.conditioning import TextConditioning, denoiser_output


@pytest.fixture(scope="module")
def pipe():
    loaded = load_pipeline(None)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def two_object_scene():
    seed = 7_000_000
    while len((scene := make_scene(seed)).objects) != 2:
        seed += 1
    return scene


def test_kmeans_splits_separated_points_whatever_the_seed():
    points = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [5.0, 5.0], [5.1, 5.0], [5.0, 5.1]])
    for seed in range(5):
        labels = kmeans(points, 2, seed=seed)
        assert len(set(labels[:3].tolist())) == 1 and len(set(labels[3:].tolist())) == 1 and labels[0] != labels[3]
    with pytest.raises(ValueError, match="cannot split 6 points into 7 clusters"):
        kmeans(points, 7)


def test_clusters_are_named_by_the_word_that_fills_them():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    maps = torch.tensor([[[1.0, 0.9], [0.1, 0.0], [0.0, 0.1]],    # "circle": peak 1 on cluster 0 (mean 0.95)
                         [[0.0, 0.0], [2.0, 2.0], [0.2, 0.0]]])   # "square": cluster 1 at its peak; cluster 2 mean 0.05
    assert name_clusters(labels, maps, ["circle", "square"]) == ["circle", "square", BACKGROUND]
    self_attention = torch.tensor([[1.0, 0, 0, 0]] + [[0, 1 / 3, 1 / 3, 1 / 3]] * 3)  # pixel 0 apart from the rest
    found = regions(self_attention, torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]), ["circle"], clusters=2)
    assert found["circle"].tolist() == [[True, False], [False, False]] and found[BACKGROUND].sum() == 3


def test_nouns_are_found_per_occurrence_and_a_missing_one_is_named(pipe):
    nouns = find_nouns(pipe, "a blue circle above a yellow circle", ["circle"])
    assert nouns.words == ("circle#1", "circle#2") and nouns.positions == [3, 7]
    with pytest.raises(ValueError, match="'dog' is not a word of the caption 'a red circle'; its words are a, red, circle"):
        find_nouns(pipe, "a red circle", ["dog"])
    with pytest.raises(ValueError, match="dpl learns the caption's object nouns: name them"):
        find_nouns(pipe, "a red circle", [])


def test_user_masks_give_the_background_and_bad_ones_are_named():
    mask = np.zeros((64, 64), bool)
    mask[:32, :32] = True
    background = user_background({"circle": mask}, ["circle"], (64, 64), 8)
    assert background[:4, :4].sum() == 0 and background.sum() == 48
    with pytest.raises(ValueError, match=r"give one mask per noun: masks for \['circle'\] but the nouns are \['circle', 'square'\]"):
        user_background({"circle": mask}, ["circle", "square"], (64, 64), 8)
    with pytest.raises(ValueError, match=r"the mask of 'circle' is \(32, 32\); masks are \(height, width\) of the image"):
        user_background({"circle": mask[:32, :32]}, ["circle"], (64, 64), 8)


def test_learning_lowers_the_losses_and_stops_when_they_meet_the_thresholds(pipe):
    scene = two_object_scene()
    inversion = invert(pipe, scene.image, scene.caption, method="ddim", steps=5, cache_dir=None)
    nouns = find_nouns(pipe, scene.caption, [t.shape for t in scene.layout.things])
    level = ddim_levels(ddim_from(pipe.scheduler), 5)[1]
    x = inversion.latents[3:4]
    start = initial_vectors(pipe, scene.caption, nouns.positions)
    background = torch.zeros(8, 8)
    background[0] = 1.0
    with map_capture(pipe, MapCapture(8)) as capture:
        same, updates = learn_step(pipe, capture, x, level, scene.caption, nouns, start, background, DPLSettings(), (9.0, 9.0, 9.0))
        assert updates == 0 and torch.equal(same, start)
        settings = DPLSettings(inner_steps=10, learning_rate=1e-2, attention_weight=0, background_weight=0, disjoint_weight=1)
        learnt, updates = learn_step(pipe, capture, x, level, scene.caption, nouns, start, background, settings, (0.0, 0.0, 0.0))
        assert updates == 10

        def disjoint(vectors):
            embeds = encode_with(pipe, scene.caption, nouns.positions, vectors)
            maps = capture.run(lambda: denoiser_output(pipe, x, level.timestep, TextConditioning(embeds)))
            return float(terms(maps, nouns, background)[1])

        with torch.no_grad():
            assert disjoint(learnt) < disjoint(start)


@pytest.mark.parametrize("method", ["dpl", "dpl-direct"])
def test_dpl_inverts_redraws_and_edits_a_real_image(pipe, method, tmp_path):
    scene = two_object_scene()
    nouns = [t.shape for t in scene.layout.things]
    settings = DPLSettings(inner_steps=3)
    inversion = invert(pipe, scene.image, scene.caption, method=method, steps=10, nouns=nouns, dpl=settings, cache_dir=tmp_path)
    positions = find_nouns(pipe, scene.caption, nouns).positions
    assert inversion.tokens.shape == (10, len(positions), pipe.text_encoder.config.hidden_size)
    assert (inversion.nulls is not None) == (method == "dpl")
    redrawn = reconstruct(pipe, inversion)
    assert psnr(redrawn, scene.image) > (20 if method == "dpl" else 25)
    cached = invert(pipe, scene.image, scene.caption, method=method, steps=10, nouns=nouns, dpl=settings, cache_dir=tmp_path)
    assert cached.seconds == 0 and torch.equal(cached.tokens, inversion.tokens) and cached.token_positions == inversion.token_positions
    target = scene.caption.replace(nouns[0], "square" if nouns[0] != "square" else "circle", 1)
    source, edited = prompt_to_prompt(pipe, [scene.caption, target], steps=10, inversion=inversion, output_type="np").images
    assert np.isfinite(edited).all() and np.abs(edited - source).max() > 0.1
    sampling = inversion.sampling(pipe, [scene.caption, target])
    kept = find_nouns(pipe, target, [nouns[1]]).positions[-1]
    learnt = sampling.options["prompt_embeds"]
    plain = encode_with(pipe, target, [], None)[0]
    assert not torch.allclose(learnt[1, kept], plain[kept])  # the object the edit keeps keeps its learnt token
    assert torch.allclose(learnt[1, :kept], plain[:kept])  # the swapped noun (before it) is the target's own word


def test_nouns_the_clustering_cannot_tell_apart_are_named(pipe, caplog):
    scene = two_object_scene()
    nouns = [t.shape for t in scene.layout.things]
    inversion = invert(pipe, scene.image, scene.caption, method="dpl-direct", steps=3, nouns=nouns, dpl=DPLSettings(clusters=1),
                       cache_dir=None)
    assert inversion.tokens.shape[0] == 3
    assert "the self-attention clustering found no region for" in caplog.text and "Give a mask per noun" in caplog.text
    with pytest.raises(ValueError, match="nouns and masks are dpl's; null-text takes neither"):
        invert(pipe, scene.image, scene.caption, method="null-text", nouns=nouns, cache_dir=None)


def test_the_command_line_and_jobs_name_missing_nouns_and_bad_masks(pipe, tmp_path, capsys):
    from PIL import Image

    from pipelines.batch import run_batch
    from pipelines.jobs import Job
    from ui.cli import main

    scene = two_object_scene()
    photo = tmp_path / "photo.png"
    Image.fromarray(scene.image).save(photo)
    small = tmp_path / "small.png"
    Image.new("L", (32, 32), 255).save(small)
    base = ["invert", scene.caption, "--image", str(photo), "--inversion", "dpl", "--steps", "3", "--out", str(tmp_path / "out")]
    for extra, message in (([], "dpl learns the caption's object nouns: name them"),
                           (["--nouns", "dog"], "'dog' is not a word of the caption"),
                           (["--nouns", scene.layout.things[0].shape, "--masks", f"{scene.layout.things[0].shape}={small}"],
                            r"masks are \(height, width\) of the image as the model sees it, \(64, 64\)")):
        with pytest.raises(SystemExit):
            main(base + extra)
        assert re.search(message, capsys.readouterr().err)
    job = Job(1, "edit", {"image": str(photo), "source": scene.caption, "target": scene.caption, "inversion": "dpl", "nouns": ["dog"]})
    summary = run_batch(pipe, [job], tmp_path / "batch", "embedded", progress=False)
    assert "'dog' is not a word of the caption" in summary.invalid[0].reason


def test_edit_maps_name_the_prompts_words(pipe):
    scene = two_object_scene()
    nouns = [t.shape for t in scene.layout.things]
    inversion = invert(pipe, scene.image, scene.caption, method="dpl-direct", steps=3, nouns=nouns, dpl=DPLSettings(inner_steps=1),
                       cache_dir=None)
    result = prompt_to_prompt(pipe, [scene.caption, scene.caption], steps=3, inversion=inversion, maps=True)
    assert nouns[0] in result.maps.word_maps(image=0)
