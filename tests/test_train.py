import json
import math
import os

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer

from shapes import MODEL_PATH
from shapes.scenes import Layout, Thing, make_scene
from shapes.train import (
    IDENTITY_SCALE,
    Settings,
    attention_loss,
    identity_loss,
    learning_rate,
    main,
    pixel_attention_loss,
    train_vae,
    unconditional_weights,
    word_classes,
    word_positions,
)


def test_attention_loss_is_minus_log_share_inside_the_mask():
    probs = torch.tensor([[[0.2, 0.5, 0.3], [0.5, 0.25, 0.25], [0.6, 0.25, 0.15], [0.7, 0.0, 0.3]]])  # (B=1, N=4 (2x2), T=3)
    masks = torch.zeros(1, 1, 16, 16)
    masks[0, 0, :8, :8] = 1  # top-left quarter -> first cell of the 2x2 map
    words = torch.tensor([[[1, 2, 0]]])
    weight = torch.tensor([[[1.0, 1.0, 0.0]]])  # the third word is not supervised
    share_1 = 0.5 / (0.5 + 0.25 + 0.25 + 0.0)
    share_2 = 0.3 / (0.3 + 0.25 + 0.15 + 0.3)
    expected = -(math.log(share_1) + math.log(share_2)) / 2
    assert attention_loss([probs], masks, words, weight).item() == pytest.approx(expected, rel=1e-6)
    assert attention_loss([probs], masks, words, torch.zeros(1, 1, 3)).item() == 0.0


@pytest.mark.parametrize(
    "layout, expected",
    [
        (Layout((Thing("red", "circle"),), (None,)), [(2, 3, -1)]),
        (Layout((Thing("red", "circle"),), ("top",)), [(2, 3, 6)]),  # a red circle at the top
        (Layout((Thing("red", "circle"), Thing("blue", "square")), (None, None), (0, "above", 1)), [(2, 3, 4), (6, 7, -1)]),
        (Layout((Thing("red", "circle"), Thing("blue", "square")), ("left", "right"), (0, "left", 1)), [(2, 3, 6), (9, 10, 13)]),
        (Layout((Thing("red", "circle"), Thing("blue", "circle")), (None, None), (1, "left", 0)), [(9, 10, -1), (2, 3, 6)]),
    ],
)
def test_word_positions_give_each_object_its_colour_shape_and_place_word(layout, expected):
    tokenizer = CLIPTokenizer.from_pretrained(MODEL_PATH / "tokenizer")
    assert word_positions(tokenizer, make_scene(0, layout)) == expected


def test_identity_loss_is_cross_entropy_of_cosine_logits_at_a_fixed_scale():
    states = torch.tensor([[[3.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])  # (B=1, T=3, D=2)
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([[0, 0, -100]])  # the third token is ignored
    first = math.log(1 + math.exp(-IDENTITY_SCALE))  # cosine 1 to its own word, 0 to the other
    second = math.log(1 + math.exp(IDENTITY_SCALE))  # cosine 0 to its own word, 1 to the other
    assert identity_loss(states, targets, prototypes).item() == pytest.approx((first + second) / 2, rel=1e-5)
    # growing the classifier cannot lower it: only the states' directions count
    assert identity_loss(states, targets, 100 * prototypes).item() == pytest.approx((first + second) / 2, rel=1e-5)


def test_pixel_attention_loss_by_hand():
    # A 2x2 map, 4 tokens; object 0 (word at token 1) covers pixel 0, object 1 (token 2) pixel 1; pixels 2, 3 are background.
    probs = torch.tensor([[[0.1, 0.6, 0.2, 0.1],     # object 0's pixel: own share 0.6 / 0.8
                           [0.2, 0.4, 0.4, 0.0],     # object 1's pixel: own share 0.4 / 0.8
                           [0.7, 0.1, 0.1, 0.1],     # background: object words 0.2
                           [0.9, 0.0, 0.05, 0.05]]])  # background: object words 0.05
    masks = torch.zeros(1, 2, 2, 2)
    masks[0, 0, 0, 0] = masks[0, 1, 0, 1] = 1
    words, weight = torch.tensor([[[1], [2]]]), torch.ones(1, 2, 1)
    background = (-math.log(0.8) - math.log(0.95)) / 2
    binding = (-math.log(0.6 / 0.8) - math.log(0.4 / 0.8)) / 2
    assert pixel_attention_loss([probs], masks, words, weight).item() == pytest.approx(background + binding, rel=1e-5)
    # An object whose words are not supervised (weight 0) counts neither as an object nor as background.
    weight[0, 1] = 0
    background = (-math.log(1 - 0.4) - math.log(1 - 0.1) - math.log(1 - 0.0)) / 3
    binding = -math.log(0.6 / 0.6)
    assert pixel_attention_loss([probs], masks, words, weight).item() == pytest.approx(background + binding, rel=1e-5)


def test_learning_rate_runs_a_first_cosine_then_a_second_lower_cycle():
    settings = Settings(steps=100, rewarm_steps=40, warmup=10, lr=1.0)
    assert learning_rate(4, settings) == pytest.approx(0.5 * (0.55 + 0.45 * math.cos(math.pi * 4 / 60)))  # warming up
    assert learning_rate(30, settings) == pytest.approx(0.55)  # half-way through the first cosine
    assert learning_rate(59, settings) == pytest.approx(0.55 + 0.45 * math.cos(math.pi * 59 / 60))  # near its floor of 0.1
    assert learning_rate(60, settings) == pytest.approx(0.3)  # the second cycle starts at 0.3x
    assert learning_rate(80, settings) == pytest.approx(0.2)  # half-way down to 0.1x
    assert learning_rate(100, settings) == pytest.approx(0.1)
    one_cycle = Settings(steps=100, rewarm_steps=0, warmup=10, lr=1.0)
    assert learning_rate(50, one_cycle) == pytest.approx(0.55)
    with pytest.raises(ValueError, match="rewarm_steps"):
        Settings(steps=100, rewarm_steps=100)
    with pytest.raises(ValueError, match="uncond_one_object_weight"):
        Settings(uncond_one_object_weight=-0.5)


def test_word_classes_number_the_caption_words_and_skip_special_tokens():
    ids = torch.tensor([[49406, 320, 736, 49407, 49407], [49406, 320, 1746, 49407, 49407]])
    lookup = word_classes(ids, (49406, 49407))
    assert lookup[ids].tolist() == [[-100, 0, 1, -100, -100], [-100, 0, 2, -100, -100]]


def test_unconditional_weights_drop_one_object_scenes_less_often_at_the_same_mean_rate():
    valid = torch.zeros(4, 3, 3, dtype=torch.bool)
    for scene, objects in enumerate([1, 2, 3, 2]):
        valid[scene, :objects, :2] = True
    valid[0, 0, 2] = True  # a place word does not add an object
    weights = unconditional_weights(valid, 0.4)
    assert torch.allclose(weights, torch.tensor([0.4, 1.0, 1.0, 1.0]) / 0.85)
    assert math.isclose(weights.mean().item(), 1.0, rel_tol=1e-6)
    assert torch.equal(unconditional_weights(valid, 1.0), torch.ones(4))


def test_vae_stage_is_seeded_from_its_initial_weights_on(tmp_path):
    settings = Settings(vae_steps=2, vae_full_steps=1, vae_batch=2)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = train_vae(settings, tmp_path / "a").state_dict()
    torch.rand(7)  # a different global random state must not matter
    second = train_vae(settings, tmp_path / "b").state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_short_training_writes_a_loadable_model_and_resumes(tmp_path):
    common = ["--out", str(tmp_path / "model"), "--work", str(tmp_path / "work"), "--tokenizer", str(MODEL_PATH / "tokenizer"),
              "--vae-steps", "2", "--vae-full-steps", "1", "--scenes", "64", "--batch", "4", "--checkpoint-every", "2", "--rewarm-steps", "1"]
    main([*common, "--steps", "2"])
    (work,) = [p for p in (tmp_path / "work").iterdir() if p.is_dir()]
    main([*common, "--steps", "2"])  # finished: nothing is redone
    steps = [json.loads(line)["step"] for line in (work / "train-log.jsonl").read_text().splitlines()]
    assert steps == [0]
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "model")
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_a_run_killed_between_its_two_checkpoint_writes_resumes_from_the_pending_optimizer_state(tmp_path):
    common = ["--out", str(tmp_path / "model"), "--work", str(tmp_path / "work"), "--tokenizer", str(MODEL_PATH / "tokenizer"), "--steps", "2",
              "--vae-steps", "2", "--vae-full-steps", "1", "--scenes", "64", "--batch", "4", "--checkpoint-every", "1", "--rewarm-steps", "1"]
    main(common)
    (work,) = [p for p in (tmp_path / "work").iterdir() if p.is_dir()]
    final = torch.load(work / "optimizer.pt", weights_only=True)
    assert final["step"] == 2
    # as if killed after the step-2 weights replaced the step-1 ones, before the optimizer state was renamed
    os.replace(work / "optimizer.pt", work / "optimizer.pt.tmp")
    torch.save(final | {"step": 1}, work / "optimizer.pt")
    weights = (work / "denoiser.safetensors").read_bytes()
    main(common)
    assert torch.load(work / "optimizer.pt", weights_only=True)["step"] == 2 and not (work / "optimizer.pt.tmp").exists()
    assert (work / "denoiser.safetensors").read_bytes() == weights  # step 2 was not trained again over the wrong state
    torch.save(final | {"step": 1}, work / "optimizer.pt")  # and with no pending state: a clear error, not a silent mix
    with pytest.raises(RuntimeError, match="weights at step 2, optimizer state at step 1"):
        main(common)
