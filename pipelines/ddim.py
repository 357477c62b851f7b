"""Deterministic DDIM as one linear step, forward and inverted.

A DDIM step (eta 0) from noise level a to level b is linear in the latent and the model's
output: x_b = c_x * x_a + c_out * out. Running it backwards (inversion) solves the same line for
x_a, with the model evaluated on x_b instead of x_a: the approximation every DDIM inversion makes
(google's `next_step` for epsilon models). Written per prediction type, so v-prediction models
(SD 2.x 768, the embedded model) invert with the same function as epsilon models, including a
last level of zero signal (zero-terminal-SNR schedules), where the epsilon form would divide by 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DiffusionPipeline

from xattn.conditioning import TextConditioning, denoiser_output, distilled_guidance


def ddim_coefficients(alpha_from: float, alpha_to: float, prediction: str) -> tuple[float, float]:
    """(c_x, c_out) with x_to = c_x * x_from + c_out * out; alphas are cumulative products (alpha-bar)."""
    a_f, s_f = math.sqrt(alpha_from), math.sqrt(1 - alpha_from)
    a_t, s_t = math.sqrt(alpha_to), math.sqrt(1 - alpha_to)
    if prediction == "epsilon":  # x0 = (x - s_f eps) / a_f
        return a_t / a_f, s_t - a_t * s_f / a_f
    if prediction == "v_prediction":  # x0 = a_f x - s_f v, eps = s_f x + a_f v
        return a_t * a_f + s_t * s_f, s_t * a_f - a_t * s_f
    if prediction == "sample":  # x0 = out, eps = (x - a_f out) / s_f
        return s_t / s_f, a_t - s_t * a_f / s_f
    raise ValueError(f"unknown prediction type {prediction!r}; expected epsilon, v_prediction or sample")


@dataclass(frozen=True)
class Level:
    """One denoising step: the model's timestep, the alpha-bar it starts from and the one it lands on."""

    timestep: int
    alpha: float
    alpha_next: float


def ddim_levels(scheduler: DDIMScheduler, steps: int) -> list[Level]:
    """The denoising steps of `scheduler` for `steps` steps, in sampling order (noisiest first), as DDIMScheduler.step takes them."""
    scheduler.set_timesteps(steps)
    stride = scheduler.config.num_train_timesteps // steps
    levels = []
    for t in scheduler.timesteps.tolist():
        after = t - stride
        alpha_next = scheduler.alphas_cumprod[after] if after >= 0 else scheduler.final_alpha_cumprod
        levels.append(Level(int(t), float(scheduler.alphas_cumprod[t]), float(alpha_next)))
    return levels


def ddim_from(scheduler) -> DDIMScheduler:
    """Deterministic DDIM with the scheduler's betas, spacing, offset and prediction type, built as
    google/prompt-to-prompt builds it: no clipping of the predicted sample and the last step landing
    on the first training level, not on a clean 1 (DDIM's own defaults for keys a PNDM or Euler
    config lacks would clip and end on alpha 1, which costs an inversion 0.4-1.5 dB)."""
    if isinstance(scheduler, DDIMScheduler) and not scheduler.config.clip_sample and not scheduler.config.set_alpha_to_one:
        return scheduler
    return DDIMScheduler.from_config(scheduler.config, clip_sample=False, set_alpha_to_one=False)


def guided_output(pipe: DiffusionPipeline, latents: torch.Tensor, timestep, cond: TextConditioning, uncond: TextConditioning,
                  guidance: float) -> torch.Tensor:
    """Classifier-free guided prediction, unconditional and conditional rows in one denoiser call as the pipelines do;
    a guidance-distilled denoiser (Flux-dev) takes the scale as an input instead, on the conditional rows alone."""
    if distilled_guidance(pipe):
        return denoiser_output(pipe, latents, timestep, cond, guidance=guidance)
    if guidance == 1:
        return denoiser_output(pipe, latents, timestep, cond)
    both = denoiser_output(pipe, torch.cat([latents, latents]), timestep, TextConditioning.stack(uncond, cond))
    out_uncond, out_cond = both.chunk(2)
    return out_uncond + guidance * (out_cond - out_uncond)


def ddim_sample(pipe: DiffusionPipeline, latents: torch.Tensor, cond: TextConditioning, uncond: TextConditioning, levels: list[Level],
                prediction: str, guidance: float, stop: int | None = None) -> torch.Tensor:
    """Guided deterministic DDIM from `latents` through the first `stop` of `levels` (all of them when None).

    What ESD samples its x_t with and what unlearning draws the model's own images with, whatever
    sampler the pipeline carries and whatever its call takes (an img2img pipeline needs an image).
    """
    x = latents
    with torch.no_grad():
        for level in levels[:stop]:
            c_x, c_out = ddim_coefficients(level.alpha, level.alpha_next, prediction)
            x = c_x * x + c_out * guided_output(pipe, x, level.timestep, cond, uncond, guidance)
    return x
