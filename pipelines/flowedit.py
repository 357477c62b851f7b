"""FlowEdit (Kulikov et al. 2024): edit a real image on a flow-matching model with no inversion.

    result = flow_edit(pipe, "photo.png", "a red circle", "a red square")
    result.images[1]                     # the edit; images[0] is the input as the model saw it

From the clean image, an edit latent z (starting at the image's latent x) moves down the noise
levels by the difference of two velocities: the target prompt's at z + (x_t - x), and the source
prompt's at x_t, where x_t = (1 - t) x + t noise with fresh noise at each step. Where the two
prompts agree the difference vanishes, so the image is kept without any inversion error. Steps
above `n_max` are skipped (how far from the image the edit may go); below `n_min` the target is
sampled plainly from its noised point instead. Each prompt has its own guidance scale.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from pipelines.ddim import guided_output
from pipelines.flow import is_flow_matching, sampling_levels
from pipelines.generate import check_sampling, image_size
from pipelines.images import image_to_latent, latent_to_image, prepare_image
from xattn.conditioning import distilled_guidance, encode_text


@dataclass(frozen=True)
class FlowEditSettings:
    """The authors' settings (their SD3_exp.yaml; `FLUX` below is their FLUX_exp.yaml): steps T, the edit runs over
    the last n_max of them, plainly samples the last n_min, averages n_avg noise draws per step."""

    steps: int = 50
    n_max: int = 33
    n_min: int = 0
    n_avg: int = 1
    source_guidance: float = 3.5
    target_guidance: float = 13.5

    def __post_init__(self) -> None:
        if not 0 <= self.n_min <= self.n_max <= self.steps:
            raise ValueError(f"FlowEdit needs 0 <= n_min <= n_max <= steps; got n_min={self.n_min}, n_max={self.n_max}, steps={self.steps}")
        if self.n_avg < 1:
            raise ValueError(f"n_avg is how many noise draws a step averages, at least 1; got {self.n_avg}")


SD3 = FlowEditSettings()
FLUX = FlowEditSettings(steps=28, n_max=24, source_guidance=1.5, target_guidance=5.5)


@dataclass
class FlowEditResult:
    images: list  # the input as the model saw it, then the edit
    prompts: list[str]
    settings: FlowEditSettings


def default_settings(pipe: DiffusionPipeline) -> FlowEditSettings:
    """The authors' settings for the kind of model: Flux's for a guidance-distilled denoiser, SD3's otherwise."""
    return FLUX if distilled_guidance(pipe) else SD3


def settings_for(pipe: DiffusionPipeline, **chosen) -> FlowEditSettings:
    """The model's default settings with the chosen ones (None: the default's) in their place."""
    return replace(default_settings(pipe), **{name: value for name, value in chosen.items() if value is not None})


def flow_edit(
    pipe: DiffusionPipeline,
    image: str | Path | Image.Image | np.ndarray,
    source_prompt: str,
    target_prompt: str,
    *,
    settings: FlowEditSettings | None = None,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    output_type: str = "pil",
) -> FlowEditResult:
    """Edit `image` (fitted to (height, width), the model's size by default) from what `source_prompt` says it shows
    into `target_prompt`. settings: default the authors' for this kind of model (`default_settings`). seed: the
    noise each step draws."""
    if output_type not in ("pil", "np", "latent"):
        raise ValueError(f"output_type {output_type!r}: choose pil, np or latent")
    if not is_flow_matching(pipe.scheduler):
        raise ValueError(f"FlowEdit edits flow-matching models (SD3, Flux); {type(pipe).__name__} samples a diffusion: "
                         "invert the image and edit with prompt_to_prompt(..., inversion=...)")
    settings = settings or default_settings(pipe)
    check_sampling(pipe, settings.steps, settings.target_guidance, seed)
    size = image_size(pipe, height, width)
    fitted = prepare_image(image, size).image
    source = image_to_latent(pipe, fitted)
    levels = sampling_levels(pipe, settings.steps, tuple(source.shape[-2:]))  # as the authors' code does
    texts = [encode_text(pipe, [prompt], size, negative_prompt) for prompt in (source_prompt, target_prompt)]
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def velocity(x: torch.Tensor, level, which: int) -> torch.Tensor:
        cond, uncond = texts[which]
        scale = (settings.source_guidance, settings.target_guidance)[which]
        return guided_output(pipe, x, level.timestep, cond, uncond, scale)

    def noised(level) -> torch.Tensor:
        noise = torch.randn(source.shape, generator=generator).to(source)
        return (1 - level.sigma) * source + level.sigma * noise

    edit, plain = source.clone(), None
    with torch.no_grad():
        for i, level in enumerate(pipe.progress_bar(levels)):
            if settings.steps - i > settings.n_max:
                continue
            if settings.steps - i > settings.n_min:
                delta = torch.zeros_like(source, dtype=torch.float32)
                for _ in range(settings.n_avg):
                    x_t = noised(level)
                    delta += (velocity(edit + x_t - source, level, 1) - velocity(x_t, level, 0)).float() / settings.n_avg
                edit = (edit.float() + (level.sigma_next - level.sigma) * delta).to(source.dtype)
                continue
            if plain is None:
                plain = edit + noised(level) - source
            plain = (plain.float() + (level.sigma_next - level.sigma) * velocity(plain, level, 1).float()).to(source.dtype)
    result = edit if plain is None else plain
    if not torch.isfinite(result).all():
        raise ValueError("FlowEdit produced non-finite latents (NaN or inf); in float16 try float32, or lower target_guidance")
    if output_type == "latent":
        return FlowEditResult([source[0], result[0]], [source_prompt, target_prompt], settings)
    images = [fitted, latent_to_image(pipe, result)]
    if output_type == "np":
        images = [np.asarray(image, dtype=np.float32) / 255 for image in images]
    return FlowEditResult(images, [source_prompt, target_prompt], settings)
