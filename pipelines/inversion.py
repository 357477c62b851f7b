"""Invert a real image into what redraws it under DDIM: a starting latent, and what steers each step.

    inversion = invert(pipe, "photo.png", "a red circle")           # method="direct"
    result = prompt_to_prompt(pipe, ["a red circle", "a red square"], inversion=inversion)

Every method starts with DDIM inversion of the caption at guidance 1 (the trajectory z*_0 = the
encoded image, ..., z*_T). They differ in how guided sampling is kept on that trajectory:
- "direct" (Ju et al. 2023, "PnP Inversion"): after each step, the correction that puts the
  source row back on the trajectory is added to every row (the source redraws exactly, up to the
  VAE, with no optimisation; targets get the same correction of the inversion's error, the
  paper's code's "add_target" variant, which kept more of the background in our benchmark).
- "null-text" (Mokady et al. 2023): one unconditional embedding per step, optimised with Adam
  (float32, early stop) so guided sampling lands on z*_{t-1}; source and targets share them.
- "negative-prompt" (Miyake et al. 2023): the caption's own embedding as the unconditional one,
  so the source's guided prediction is the conditional one the inversion used.
- "ddim": nothing; guided sampling drifts from the trajectory as the guidance grows.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from PIL import Image

from pipelines.conditioning import TextConditioning, encode_text, unet_output
from pipelines.ddim import Level, ddim_coefficients, ddim_from, ddim_levels, ddim_sampling
from pipelines.generate import check_sampling, image_size
from pipelines.images import image_to_latent, prepare_image
from pipelines.inversion_cache import DEFAULT_CACHE, InversionCache, inversion_key, model_fingerprint
from xattn.denoiser import has_ip_adapter

METHODS = ("direct", "null-text", "negative-prompt", "ddim")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NullTextSettings:
    """The reference's optimisation (google/prompt-to-prompt, and the diffusers community pipeline):
    at denoising step i, Adam at learning_rate * (1 - i / 100), at most `inner_steps` updates,
    stopping once the loss is under early_stop + 2e-5 i (the test follows each update)."""

    inner_steps: int = 10
    learning_rate: float = 1e-2
    early_stop: float = 1e-5

    def rate(self, step: int) -> float:
        return self.learning_rate * (1 - step / 100)

    def bound(self, step: int) -> float:
        return self.early_stop + 2e-5 * step


@dataclass
class Inversion:
    method: str
    caption: str
    steps: int
    guidance: float
    latents: torch.Tensor  # (steps + 1, C, h, w): the encoded image, then one latent per step up to x_T
    nulls: torch.Tensor | None  # (steps, T, D): null-text's unconditional embedding for each step
    image: Image.Image  # the input as the model saw it
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0  # how long inverting took; 0 when it came from the cache
    negative_prompt: str | None = None  # null-text's starting point for its unconditional embeddings

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the image as the model saw it."""
        return self.image.size[1], self.image.size[0]

    @property
    def start(self) -> torch.Tensor:
        return self.latents[-1:]

    def check_prompts(self, prompts: list[str], steps: int, guidance: float, negative_prompt: str | None = None) -> None:
        """A clear error when an edit does not match what was inverted."""
        if prompts[0] != self.caption:
            raise ValueError(f"the source prompt {prompts[0]!r} must be the caption the image was inverted with, {self.caption!r}")
        if steps != self.steps:
            raise ValueError(f"the image was inverted for {self.steps} steps; edit with steps={self.steps} or invert again")
        if self.method == "null-text" and guidance != self.guidance:
            raise ValueError(f"null-text embeddings were optimised for guidance {self.guidance:g}; edit with guidance={self.guidance:g} or invert again")
        if self.method in ("null-text", "negative-prompt") and negative_prompt is not None:
            raise ValueError(f"{self.method} inversion sets the unconditional prompt itself; leave out negative_prompt "
                             "(null-text takes it when inverting, as its starting point)")

    def call_options(self, pipe: DiffusionPipeline, rows: int) -> dict:
        """What a pipeline call of `rows` prompts needs to sample from this inversion: the starting latents (and
        size, or for an img2img pipeline its image at full strength) and the unconditional embeddings."""
        params = check_redraws(pipe)
        options = {"latents": self.start.to(pipe.unet.dtype).expand(rows, -1, -1, -1).clone()}
        if "height" in params:
            options |= {"height": self.size[0], "width": self.size[1]}
        if "image" in params:
            options |= {"image": self.image, "strength": 1.0}
        if self.method not in ("null-text", "negative-prompt"):
            return options
        cond, uncond = encode_text(pipe, [self.caption], self.size, self.negative_prompt)
        negative = cond if self.method == "negative-prompt" else uncond.with_embeds(self.nulls[:1].to(uncond.embeds))
        negative = negative.rows(rows)
        options["negative_prompt_embeds"] = negative.embeds
        if negative.pooled is not None:
            options["negative_pooled_prompt_embeds"] = negative.pooled
        return options

    def on_step_end(self, step: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What changes after denoising step `step`: direct adds to every row the correction that puts the source
        row back on the trajectory; null-text sets the next step's null embedding."""
        changed = {}
        if self.method == "direct":
            latents = tensors["latents"]
            changed["latents"] = latents + (self.latents[self.steps - 1 - step].to(latents) - latents[:1])
        if self.method == "null-text" and step + 1 < self.steps:
            embeds = tensors["prompt_embeds"].clone()
            embeds[: embeds.shape[0] // 2] = self.nulls[step + 1].to(embeds)
            changed["prompt_embeds"] = embeds
        return changed


def check_redraws(pipe: DiffusionPipeline) -> Mapping[str, inspect.Parameter]:
    """The pipeline call's parameters, if it can start from an inverted latent; else a clear error."""
    params = inspect.signature(pipe.__call__).parameters
    if "latents" not in params or "mask_image" in params:
        raise ValueError(f"{type(pipe).__name__} cannot redraw an inversion (it takes no starting latents, or needs a mask); "
                         "use the text-to-image pipeline of the same model (e.g. StableDiffusionPipeline.from_pipe(pipe)), "
                         "and LocalBlend(mask=...) to edit inside a mask")
    return params


def ddim_invert(pipe: DiffusionPipeline, latent: torch.Tensor, text: TextConditioning, levels: list[Level], prediction: str) -> torch.Tensor:
    """(steps + 1, C, h, w): `latent` walked up the noise levels, the model evaluated at each target level on the current latent."""
    path = [latent]
    with torch.no_grad():
        for level in reversed(levels):
            c_x, c_out = ddim_coefficients(level.alpha, level.alpha_next, prediction)
            out = unet_output(pipe, path[-1], level.timestep, text)
            path.append((path[-1] - c_out * out) / c_x)
    return torch.cat(path)


def optimise_nulls(
    pipe: DiffusionPipeline,
    latents: torch.Tensor,
    cond: TextConditioning,
    uncond: TextConditioning,
    levels: list[Level],
    prediction: str,
    guidance: float,
    settings: NullTextSettings,
) -> torch.Tensor:
    """(steps, T, D) unconditional embeddings, each warm-started from the previous step's, that put guided DDIM on the trajectory."""
    steps, dtype = len(levels), uncond.embeds.dtype
    null = uncond.embeds.detach().float()
    x, nulls = latents[-1:], []
    for i, level in enumerate(levels):
        c_x, c_out = ddim_coefficients(level.alpha, level.alpha_next, prediction)
        target = latents[steps - 1 - i : steps - i].float()
        with torch.no_grad():
            out_cond = unet_output(pipe, x, level.timestep, cond)
        null = null.detach().clone().requires_grad_(True)  # a fresh tensor: Adam updates in place, and the stored nulls must keep their values
        optimiser = torch.optim.Adam([null], lr=settings.rate(i))
        bound = settings.bound(i)
        for _ in range(settings.inner_steps):
            out_null = unet_output(pipe, x, level.timestep, uncond.with_embeds(null.to(dtype)))
            guided = out_null + guidance * (out_cond - out_null)
            loss = F.mse_loss((c_x * x + c_out * guided).float(), target)
            (null.grad,) = torch.autograd.grad(loss, [null])
            optimiser.step()
            if loss.item() < bound:
                break
        null = null.detach()
        nulls.append(null[0])
        with torch.no_grad():
            out_null = unet_output(pipe, x, level.timestep, uncond.with_embeds(null.to(dtype)))
            x = c_x * x + c_out * (out_null + guidance * (out_cond - out_null))
    return torch.stack(nulls)


def invert(
    pipe: DiffusionPipeline,
    image: str | Path | Image.Image | np.ndarray,
    caption: str,
    *,
    method: str = "direct",
    steps: int = 25,
    guidance: float = 5.0,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    null_text: NullTextSettings = NullTextSettings(),
    cache_dir: str | Path | None = DEFAULT_CACHE,
) -> Inversion:
    """Invert `image` (any size and mode; fitted to (height, width), the model's size by default, with a logged note) under `caption`.

    guidance is the scale the edits will use; only null-text depends on it, and on
    negative_prompt, the unconditional prompt its embeddings start from (default: the empty one).
    Results are cached in `cache_dir` (None: no cache) by image content, caption, model weights and settings.
    """
    if method not in METHODS:
        raise ValueError(f"unknown inversion method {method!r}; choose one of {', '.join(METHODS)}")
    check_sampling(pipe, steps, guidance, 0)
    if has_ip_adapter(pipe):
        raise ValueError("inversion runs the UNet on the caption alone, and this pipeline has an IP-Adapter loaded: "
                         "pipe.unload_ip_adapter() first")
    check_redraws(pipe)
    prepared = prepare_image(image, image_size(pipe, height, width))
    for note in prepared.notes:
        log.warning("input image %s", note)
    settings = {"method": method, "steps": steps, "dtype": str(pipe.unet.dtype)}
    if method == "null-text":
        settings |= {"guidance": guidance, "negative_prompt": negative_prompt, **asdict(null_text)}
    cache = InversionCache(cache_dir) if cache_dir is not None else None
    key = inversion_key(prepared.image, caption, model_fingerprint(pipe), settings) if cache else None
    stored = cache.load(key) if cache else None
    if stored is not None:
        return Inversion(method, caption, steps, guidance, stored["latents"], stored.get("nulls"), prepared.image, prepared.notes,
                         negative_prompt=negative_prompt)
    began = time.perf_counter()
    scheduler = ddim_from(pipe.scheduler)
    levels = ddim_levels(scheduler, steps)
    prediction = scheduler.config.prediction_type
    cond, uncond = encode_text(pipe, [caption], image_size(pipe, height, width), negative_prompt)
    latents = ddim_invert(pipe, image_to_latent(pipe, prepared.image), cond, levels, prediction)
    nulls = optimise_nulls(pipe, latents, cond, uncond, levels, prediction, guidance, null_text) if method == "null-text" else None
    result = Inversion(method, caption, steps, guidance, latents, nulls, prepared.image, prepared.notes, time.perf_counter() - began,
                       negative_prompt)
    if cache:
        tensors = {"latents": latents} | ({"nulls": nulls} if nulls is not None else {})
        cache.save(key, tensors, {"caption": caption} | {k: str(v) for k, v in settings.items()})
    return result


def reconstruct(pipe: DiffusionPipeline, inversion: Inversion, output_type: str = "pil"):
    """The caption sampled from the inversion as an edit's source row is: the image redrawn."""
    with ddim_sampling(pipe):
        return pipe(
            [inversion.caption],
            num_inference_steps=inversion.steps,
            guidance_scale=inversion.guidance,
            output_type=output_type,
            callback_on_step_end=lambda pipeline, step, timestep, tensors: inversion.on_step_end(step, tensors),
            callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
            **inversion.call_options(pipe, 1),
        ).images[0]
