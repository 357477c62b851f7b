"""Attention-loss guidance through real pipelines: capture, the update schedule, agreement with
diffusers' Attend-and-Excite, per-image optimisation in a batch, layouts, architectures, bad input."""

import logging

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionAttendAndExcitePipeline

from pipelines.guidance import compose, method_settings
from pipelines.loading import load_pipeline
from shapes.judge import match_caption
from tests.architectures import ARCHITECTURES
from xattn.attach import attach
from xattn.capture import MapCapture
from xattn.conditioning import denoiser_output, encode_text
from xattn.tokens import word_tokens

PROMPT = "a red circle and a blue square"


@pytest.fixture(scope="module")
def pipe():
    pipe = load_pipeline(None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _unet_calls(pipe, run) -> int:
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        run()
    finally:
        hook.remove()
    return len(calls)


def test_capture_is_differentiable_and_stops_after_the_last_captured_layer(pipe):
    text, _ = encode_text(pipe, [PROMPT], 64)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    capture = MapCapture(8)  # the embedded UNet's 8x8 layers: down_blocks.1 and up_blocks.1
    reached = []
    hook = pipe.unet.up_blocks[2].register_forward_pre_hook(lambda *_: reached.append(1))
    try:
        with attach(pipe, capture):
            full = capture.run(lambda: denoiser_output(pipe, latents, 999, text))
            cut = capture.run(lambda: denoiser_output(pipe, latents, 999, text))
    finally:
        hook.remove()
    assert reached == [1]  # the first call ran to the end; the second stopped in up_blocks.1
    assert full.shape == (1, 8, 8, 77)
    assert torch.allclose(full.sum(-1), torch.ones(1, 8, 8), atol=1e-5)
    assert torch.equal(full, cut)
    circle = word_tokens(pipe.tokenizer, PROMPT, "circle")[0]
    (grad,) = torch.autograd.grad(cut[..., circle].amax(), latents)
    assert grad.abs().sum() > 0


def test_capture_names_a_resolution_the_unet_lacks(pipe):
    text, _ = encode_text(pipe, [PROMPT], 64)
    capture = MapCapture(32)
    with attach(pipe, capture), pytest.raises(ValueError, match="no cross-attention layer at 32x32"):
        capture.run(lambda: denoiser_output(pipe, torch.randn(1, 4, 16, 16), 999, text))


def test_no_guidance_is_plain_generation(pipe):
    result = compose(pipe, PROMPT, ["circle", "square"], method="none", seed=3, steps=5, output_type="np")
    plain = pipe(PROMPT, num_inference_steps=5, guidance_scale=5.0, generator=torch.Generator().manual_seed(3), output_type="np").images
    assert np.abs(result.images[0] - plain[0]).max() < 1e-5  # the recorded layers compute explicit probabilities
    assert result.losses.isnan().all()
    assert result.step_maps.shape == (5, 1, 2, 16, 16)
    assert torch.allclose(result.step_maps.amax(dim=(-2, -1)), torch.ones(5, 1, 2))


def test_attend_and_excite_preset_is_the_authors_algorithm(pipe, caplog):
    """diffusers' pipeline runs the authors' loop: the token softmax over every position but the first and the
    last, and a refinement whose next update is decided by the loss from before the last one."""
    tokens = [word_tokens(pipe.tokenizer, PROMPT, w)[0] for w in ("circle", "square")]
    reference = StableDiffusionAttendAndExcitePipeline(**{k: v for k, v in pipe.components.items() if k != "image_encoder"},
                                                       requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    # The preset at 8 steps: refinement at steps 0, 2 and 3, updates while step < 4, maps at the layout side (8 here).
    with caplog.at_level(logging.ERROR):
        expected = reference(PROMPT, token_indices=tokens, num_inference_steps=8, guidance_scale=5.0, max_iter_to_alter=4,
                             thresholds={0: 0.05, 2: 0.5, 3: 0.8}, attn_res=(8, 8), generator=torch.Generator().manual_seed(1),
                             output_type="np").images[0]
    ours = compose(pipe, PROMPT, ["circle", "square"], method="attend-excite", seed=1, steps=8, output_type="np")
    plain = compose(pipe, PROMPT, ["circle", "square"], method="none", seed=1, steps=8, output_type="np")
    unrefined = compose(pipe, PROMPT, ["circle", "square"], settings=method_settings("attend-excite", refinement={}), seed=1, steps=8,
                        output_type="np")
    assert np.abs(ours.images[0] - expected).max() < 1e-3
    assert np.abs(unrefined.images[0] - expected).max() > 1e-2  # the refinement ran and is matched too
    assert np.abs(plain.images[0] - expected).max() > 0.05  # the guidance changed the picture
    assert not ours.losses[:4].isnan().any() and ours.losses[4:].isnan().all()


def test_call_options_reach_the_pipeline(pipe):
    common = dict(seed=3, steps=4, height=64, width=96, negative_prompt="green", num_images_per_prompt=2, output_type="np")
    result = compose(pipe, PROMPT, ["circle", "square"], method="none", **common)
    plain = pipe([PROMPT] * 2, num_inference_steps=4, guidance_scale=5.0, height=64, width=96, negative_prompt=["green"] * 2,
                 generator=[torch.Generator().manual_seed(s) for s in (3, 4)], output_type="np").images
    assert result.images[0].shape == (64, 96, 3)
    assert np.abs(np.stack(result.images) - plain).max() < 1e-4  # explicit probabilities in the recorded layers: rounding apart
    assert result.step_maps.shape == (4, 2, 2, 8, 12)  # the 16x24 latent's cross-attention grid nearest 16: 8x12
    left = np.zeros((64, 96))
    left[16:48, :40] = 1
    laid = compose(pipe, PROMPT, ["circle", "square"], layout={"circle": left}, **common)
    assert np.isfinite(laid.images[0]).all() and not laid.losses.isnan().any()


def test_updates_and_refinements_run_on_their_steps(pipe):
    def run(threshold: float, method: str = "attend-excite"):
        settings = method_settings(method, refinement={0.0: threshold}, max_refinements=2)
        return lambda: compose(pipe, PROMPT, ["circle", "square"], settings=settings, steps=10, output_type="latent")

    # 10 pipeline passes + one guidance pass at each of the 5 guided steps;
    # an unreachable threshold adds 2 refinement passes and a fresh pass for the step's own update.
    assert _unet_calls(pipe, run(0.0)) == 15
    assert _unet_calls(pipe, run(0.999)) == 18
    assert _unet_calls(pipe, run(0.999, "astar")) == 10 + 10 + 3  # A-STAR guides every step


def test_each_image_of_a_batch_is_guided_on_its_own_maps(pipe):
    prompts = [PROMPT, "a green triangle and a yellow circle"]
    concepts = [["circle", "square"], ["triangle", "circle"]]
    settings = method_settings("attend-excite", refinement={0.0: 0.999}, max_refinements=2)
    batch = compose(pipe, prompts, concepts, settings=settings, seed=4, steps=6, output_type="np")
    alone = compose(pipe, prompts[1], concepts[1], settings=settings, seed=5, steps=6, output_type="np")
    astar = compose(pipe, prompts, concepts, seed=4, steps=6, output_type="np")
    astar_alone = compose(pipe, prompts[1], concepts[1], seed=5, steps=6, output_type="np")
    assert np.abs(batch.images[1] - alone.images[0]).max() < 1e-3
    assert np.abs(astar.images[1] - astar_alone.images[0]).max() < 1e-3
    assert batch.concepts == concepts and batch.prompts == prompts


def test_astar_losses_fall_as_the_maps_separate(pipe):
    result = compose(pipe, "a blue circle, a red triangle and a green square", ["circle", "triangle", "square"], seed=0, output_type="np")
    losses = result.losses[:, 0]
    assert not losses.isnan().any()
    assert losses[1:].mean() < losses[1]  # step 0 has no retention target yet; later steps improve on step 1
    assert result.overlap().item() < 0.05


def test_a_layout_mask_places_a_concept(pipe):
    left = np.zeros((64, 64))
    left[16:48, 2:30] = 1
    right = np.fliplr(left)
    result = compose(pipe, PROMPT, ["circle", "square"], layout={"circle": left, "square": right}, seed=2)
    verdict = match_caption(np.asarray(result.images[0]), PROMPT)
    centres = {o.shape: o.centre for o in verdict.found}  # (x, y)
    assert verdict.exact
    assert centres["circle"][0] < 32 < centres["square"][0]


@pytest.mark.parametrize("name", ["sd1-64", "sd2-v", "sdxl"])
def test_guidance_runs_on_every_architecture(name):
    arch = ARCHITECTURES[name]()
    side = arch.unet.config.sample_size * arch.vae_scale_factor
    result = compose(arch, "a red circle and a blue square", ["circle", "square"], steps=3, height=side, width=side, output_type="np")
    expected_side = {"sd1-64": 16, "sd2-v": 16, "sdxl": 8}[name]  # the cross-attention side nearest 16
    assert result.step_maps.shape == (3, 1, 2, expected_side, expected_side)
    assert not result.losses.isnan().any() and result.images[0].shape == (side, side, 3)


def test_bad_input_is_named(pipe):
    with pytest.raises(ValueError, match="'hexagon' is not a word of the prompt"):
        compose(pipe, PROMPT, ["circle", "hexagon"], steps=2)
    with pytest.raises(ValueError, match="list of words"):
        compose(pipe, PROMPT, "circle", steps=2)
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        compose(pipe, PROMPT, ["circle"], method="magic", steps=2)
    with pytest.raises(ValueError, match="same number of concepts"):
        compose(pipe, [PROMPT, "a red circle"], [["circle", "square"], ["circle"]], steps=2)
    with pytest.raises(ValueError, match="which are not concepts"):
        compose(pipe, PROMPT, ["circle", "square"], layout={"red": np.ones((4, 4))}, steps=2)
    with pytest.raises(ValueError, match="guide no step .* as method 'none' does"):
        compose(pipe, PROMPT, ["circle", "square"], method="none", layout={"circle": np.ones((4, 4))}, steps=2)
    with pytest.raises(ValueError, match="through the placement loss"):
        compose(pipe, PROMPT, ["circle", "square"], settings=method_settings("astar", placement=0.0), layout={"circle": np.ones((4, 4))},
                steps=2)
    with pytest.raises(ValueError, match="use maps='tokens'"):
        method_settings("astar", attend_excite=1.0)
    with pytest.raises(ValueError, match="fraction of the steps"):
        method_settings("astar", guided_steps=2)
