"""The model's own noising, regression target and sampler: what unlearning trains on, for a diffusion or a flow.

A diffusion (SD 1.x/2.x/XL, PixArt): DDPM's forward process from the betas the model was trained with, whatever
sampler the pipeline carries (Euler's `add_noise` works on its own sigmas and steps), x_t = sqrt(a_t) x_0 +
sqrt(1 - a_t) e at a uniformly drawn training timestep; the target per prediction type; guided deterministic DDIM.
A rectified flow (SD3, Flux): x_s = (1 - s) x_0 + s e at s uniform in (0, 1), the model fed the timestep 1000 s as
its pipeline feeds it; the target is the velocity e - x_0; guided Euler at the levels the pipeline samples at (its
shift, Flux's resolution-dependent one).
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

from pipelines.ddim import ddim_from, ddim_levels, ddim_sample, guided_output
from pipelines.flow import is_flow_matching, sampling_levels
from xattn.conditioning import TextConditioning


def denoising_target(process: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What a diffusion's denoiser should predict for x_t under its parametrisation (epsilon, v or the sample)."""
    kind = process.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return process.get_velocity(latents, noise, t)
    return latents


class DiffusionProcess:
    """A diffusion's forward process and deterministic DDIM over `sample_steps` levels."""

    def __init__(self, scheduler, sample_steps: int) -> None:
        self.forward = DDPMScheduler.from_config(scheduler.config)
        self.sampler = ddim_from(scheduler)
        self.levels = ddim_levels(self.sampler, sample_steps)

    def noised(self, latents: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, target) for a uniformly drawn training timestep per row."""
        t = torch.randint(0, self.forward.config.num_train_timesteps, (len(latents),), generator=generator)
        noise = randn_tensor(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
        t = t.to(latents.device)
        return self.forward.add_noise(latents, noise, t), t, denoising_target(self.forward, latents, noise, t)

    def timestep(self, stop: int) -> float:
        """The model's timestep after `stop` sampling steps."""
        return float(self.levels[stop].timestep)

    def sample(self, pipe: DiffusionPipeline, latents: torch.Tensor, cond: TextConditioning, uncond: TextConditioning,
               guidance: float, stop: int | None = None) -> torch.Tensor:
        """Guided DDIM from `latents` through the first `stop` levels (all when None)."""
        return ddim_sample(pipe, latents, cond, uncond, self.levels, self.sampler.config.prediction_type, guidance, stop)


class FlowProcess:
    """A rectified flow's straight-line noising and guided Euler over the pipeline's `sample_steps` levels."""

    def __init__(self, pipe: DiffusionPipeline, sample_steps: int, latent: tuple[int, int]) -> None:
        self.scale = pipe.scheduler.config.num_train_timesteps
        self.levels = sampling_levels(pipe, sample_steps, latent)

    def noised(self, latents: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_s, timestep, velocity target) for a uniformly drawn noise level s per row."""
        sigma = torch.rand(len(latents), generator=generator).to(latents.device, latents.dtype)
        noise = randn_tensor(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
        s = sigma.reshape(-1, *([1] * (latents.ndim - 1)))
        return (1 - s) * latents + s * noise, sigma * self.scale, noise - latents

    def timestep(self, stop: int) -> float:
        return self.levels[stop].timestep

    def sample(self, pipe: DiffusionPipeline, latents: torch.Tensor, cond: TextConditioning, uncond: TextConditioning,
               guidance: float, stop: int | None = None) -> torch.Tensor:
        """Guided Euler from `latents` through the first `stop` levels (all when None)."""
        x = latents
        with torch.no_grad():
            for level in self.levels[:stop]:
                x = x + (level.sigma_next - level.sigma) * guided_output(pipe, x, level.timestep, cond, uncond, guidance)
        return x


def training_process(pipe: DiffusionPipeline, sample_steps: int, latent: tuple[int, int]) -> DiffusionProcess | FlowProcess:
    """The process the pipeline's denoiser was trained on; `latent` is the (h, w) of its spatial latents."""
    if is_flow_matching(pipe.scheduler):
        return FlowProcess(pipe, sample_steps, latent)
    return DiffusionProcess(pipe.scheduler, sample_steps)
