"""Guidance, Prompt-to-Prompt and inversion with every scheduler a user may set (SD 1.5 ships PNDM), and which
UNet calls begin a denoising step for each."""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

import xattn
from editors import Swap
from pipelines.ddim import ddim_from
from pipelines.edit import prompt_to_prompt
from pipelines.guidance import compose
from pipelines.images import image_to_latent, latent_to_image
from pipelines.inversion import invert
from pipelines.stepping import Calls
from tests.architectures import SD15_SCHEDULER, sd1
from xattn.sites import denoising_steps

SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpm++ 2m": (DPMSolverMultistepScheduler, {}),
    "dpm++ 2m sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": (UniPCMultistepScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
}
PROMPT = "a red circle and a blue square"


@pytest.fixture(scope="module")
def pipe():
    return sd1()


def _plain(pipe, prompts, steps=4, seed=1):
    return pipe(prompts, num_inference_steps=steps, guidance_scale=5.0, output_type="np",
                generator=[torch.Generator().manual_seed(seed) for _ in prompts]).images


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_guidance_edits_and_inversion_run_with_the_scheduler(pipe, name):
    cls, options = SCHEDULERS[name]
    pipe.scheduler = cls.from_config(SD15_SCHEDULER, **options)
    none = compose(pipe, PROMPT, ["circle", "square"], method="none", steps=4, seed=1, output_type="np")
    assert np.abs(none.images[0] - _plain(pipe, [PROMPT])[0]).max() < 1e-5  # a stochastic sampler draws from the seed too
    assert none.step_maps.shape[0] == 4  # one map per denoising step, not per UNet call
    astar = compose(pipe, PROMPT, ["circle", "square"], steps=4, seed=1, output_type="np")
    assert np.isfinite(astar.images[0]).all() and not astar.losses.isnan().any()
    assert np.abs(astar.images[0] - none.images[0]).max() > 1e-3

    prompts = [PROMPT, PROMPT.replace("blue", "green")]
    edited = prompt_to_prompt(pipe, prompts, Swap(), steps=4, seed=1, output_type="np").images
    assert np.abs(edited[0] - _plain(pipe, prompts)[0]).max() < 1e-5

    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    scheduler = pipe.scheduler
    inversion = invert(pipe, image, PROMPT, steps=3, cache_dir=None)
    source, target = prompt_to_prompt(pipe, prompts, Swap(), steps=3, inversion=inversion, output_type="np").images
    redrawn = np.asarray(latent_to_image(pipe, image_to_latent(pipe, inversion.image)), dtype=np.float32) / 255
    assert np.abs(source - redrawn).max() <= 0.5 / 255 + 1e-3 and np.isfinite(target).all()
    assert pipe.scheduler is scheduler


def test_calls_that_begin_a_step_by_hand():
    pndm = Calls([801, 601, 601, 401, 201, 1])  # PNDM (skip_prk_steps): the second call evaluates step 0's prediction
    assert pndm.steps == (0, 1, 1, 2, 3, 4) and pndm.count == 5
    assert [pndm.begins(c) for c in range(6)] == [True, False, True, True, True, True]
    assert [pndm.settles(c) for c in range(6)] == [False, True, True, True, True, True]
    heun = Calls([999, 749, 749, 499, 499])
    assert heun.steps == (0, 1, 1, 2, 2) and [heun.begins(c) for c in range(5)] == [True, False, True, False, True]


@pytest.mark.parametrize("name", ["pndm", "heun", "euler"])
def test_the_step_xattn_counts_is_the_step_of_the_call(pipe, name):
    cls, options = SCHEDULERS[name]
    pipe.scheduler = cls.from_config(SD15_SCHEDULER, **options)
    seen = []
    with xattn.attach(pipe, xattn.Controller()) as state:
        pipe(PROMPT, num_inference_steps=5, output_type="latent",
             callback_on_step_end=lambda p, call, t, tensors: seen.append(state.step) or {})
    calls = Calls.planned(pipe.scheduler, 5)
    assert seen == list(calls.steps) == denoising_steps(pipe.scheduler.timesteps) and calls.count == 5


def test_inversion_builds_ddim_as_the_reference_does():
    for scheduler in (PNDMScheduler(), EulerDiscreteScheduler(), DDIMScheduler(clip_sample=True, set_alpha_to_one=True)):
        ddim = ddim_from(scheduler)
        assert isinstance(ddim, DDIMScheduler) and not ddim.config.clip_sample and not ddim.config.set_alpha_to_one
        assert ddim.config.steps_offset == scheduler.config.steps_offset
    kept = DDIMScheduler(clip_sample=False, set_alpha_to_one=False)
    assert ddim_from(kept) is kept
