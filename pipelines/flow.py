"""Rectified-flow steps, forward and inverted, for flow-matching pipelines (SD3/SD3.5, Flux).

A flow-matching model predicts the velocity v = noise - image along x_sigma = (1 - sigma) image +
sigma noise, and its sampler steps x_next = x + (sigma_next - sigma) v(x, sigma) (Euler, diffusers'
FlowMatchEulerDiscreteScheduler). Inverting walks the same levels upward from the image: plain Euler
evaluates the model at each step's own level on the latent it starts from, the approximation DDIM
inversion makes (`pipelines.ddim`), so the direct correction works on flows unchanged. FireFlow
(Deng et al. 2024) is second order at one model call a step: a midpoint step whose first half
reuses the previous step's midpoint velocity.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

from xattn.families import cross_grids

Velocity = Callable[[torch.Tensor, float], torch.Tensor]  # v(x, timestep), the timestep on the scheduler's 0-1000 scale


@dataclass(frozen=True)
class FlowLevel:
    """One sampling step: the scheduler's timestep and the noise levels it steps from and to."""

    timestep: float
    sigma: float
    sigma_next: float


def is_flow_matching(scheduler) -> bool:
    """Whether a scheduler samples a rectified flow (velocity prediction) rather than a diffusion."""
    return "FlowMatch" in type(scheduler).__name__


def pipeline_sigmas(steps: int) -> np.ndarray:
    """The unshifted noise levels an inversion's sampling passes as the pipeline call's `sigmas` (Flux's own
    default; SD3's spaces its levels a little differently), so that inverting and sampling visit the same levels."""
    return np.linspace(1.0, 1 / steps, steps)


def flow_levels(scheduler, steps: int, image_tokens: int, sigmas: np.ndarray | None) -> list[FlowLevel]:
    """The levels a pipeline samples at when called with these `sigmas` (None: the scheduler's own spacing), noisiest
    first, read from a copy of its scheduler: the config's shift, or the resolution-dependent one (Flux's `mu`) for
    this many image tokens."""
    probe = FlowMatchEulerDiscreteScheduler.from_config(copy.deepcopy(scheduler.config))
    config = probe.config
    mu = calculate_shift(image_tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15)) if config.use_dynamic_shifting else None
    probe.set_timesteps(steps, sigmas=sigmas, mu=mu)
    levels = probe.sigmas.tolist()
    return [FlowLevel(float(t), levels[i], levels[i + 1]) for i, t in enumerate(probe.timesteps.tolist())]


def sampling_levels(pipe, steps: int, latent: tuple[int, int]) -> list[FlowLevel]:
    """The levels the pipeline samples at by default for an (h, w) spatial latent: Flux's pipeline passes its own
    `sigmas` (`pipeline_sigmas`), SD3's takes its scheduler's spacing."""
    grid = cross_grids(pipe, latent)[0]
    sigmas = pipeline_sigmas(steps) if pipe.scheduler.config.use_dynamic_shifting else None
    return flow_levels(pipe.scheduler, steps, grid[0] * grid[1], sigmas)


def euler_invert(velocity: Velocity, latent: torch.Tensor, levels: list[FlowLevel]) -> torch.Tensor:
    """(steps + 1, C, h, w): `latent` walked up the levels by Euler, the model evaluated at each step's level on the
    latent it starts from."""
    path = [latent]
    with torch.no_grad():
        for level in reversed(levels):
            path.append(path[-1] + (level.sigma - level.sigma_next) * velocity(path[-1], level.timestep))
    return torch.cat(path)


def fireflow_invert(velocity: Velocity, latent: torch.Tensor, levels: list[FlowLevel]) -> torch.Tensor:
    """(steps + 1, C, h, w): `latent` walked up the levels by FireFlow's midpoint steps (one model call a step, and
    one more at the start), the midpoints' timesteps on the levels' scale."""
    scale = levels[0].timestep / levels[0].sigma  # the scheduler's timesteps per unit of noise level
    path = [latent]
    with torch.no_grad():
        first = levels[-1]
        moving = velocity(latent, first.sigma_next * scale)
        for level in reversed(levels):
            half = (level.sigma - level.sigma_next) / 2
            midpoint = path[-1] + half * moving
            moving = velocity(midpoint, (level.sigma_next + half) * scale)
            path.append(path[-1] + 2 * half * moving)
    return torch.cat(path)


def euler_from(scheduler) -> FlowMatchEulerDiscreteScheduler:
    """Deterministic Euler with the scheduler's config (its shift), what an inversion redraws under."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler) and not scheduler.config.stochastic_sampling:
        return scheduler
    return FlowMatchEulerDiscreteScheduler.from_config(scheduler.config, stochastic_sampling=False)


class FireFlowScheduler(FlowMatchEulerDiscreteScheduler):
    """FireFlow's sampler (Deng et al. 2024) for any flow-matching pipeline: the same levels as Euler's, each step a
    midpoint step whose first half reuses the previous step's midpoint velocity.

    The pipeline evaluates its denoiser where the latents it holds are, so this scheduler hands it the points FireFlow
    evaluates: the start, then each step's midpoint; a step's own state stays inside, and the latents between calls
    are midpoints (the last call's are the result). So `steps` steps take `steps + 1` calls, at the start's timestep
    and the midpoints', and a step-end callback sees midpoints: corrections and blending that act on a step's state
    do not apply."""

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu: float | None = None,
                      timesteps=None) -> None:
        """Euler's levels; then a call at the first and one at each step's midpoint (the pipeline reads the signature)."""
        super().set_timesteps(num_inference_steps, device, sigmas, mu, timesteps)
        sigmas = self.sigmas
        midpoints = (sigmas[:-1] + sigmas[1:]) / 2 * self.config.num_train_timesteps
        self.timesteps = torch.cat([self.timesteps[:1], midpoints.to(self.timesteps)])
        self._calls, self._state = 0, None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, **_):
        sigmas, call = self.sigmas.tolist(), self._calls
        self._calls += 1
        if call == 0:
            self._state = sample
        else:
            self._state = self._state + (sigmas[call] - sigmas[call - 1]) * model_output
        steps = len(sigmas) - 1
        out = self._state if call == steps else self._state + (sigmas[call + 1] - sigmas[call]) / 2 * model_output
        out = out.to(sample.dtype)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=out) if return_dict else (out,)
