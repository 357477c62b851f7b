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
- "dpl" (Wang et al. 2023, `pipelines.dpl`): null-text, and before each of its steps the caption's object nouns'
  token embeddings learnt against cross-attention leakage; edits read them per step. "dpl-direct": the same tokens
  with the direct correction instead of null-text.

On flow-matching pipelines (SD3/SD3.5, Flux: `pipelines.flow`) the trajectory comes from inverting the rectified
flow by Euler instead, and sampling is the pipeline's Euler at the same levels: "direct" corrects it as above,
"euler" does nothing more (the flow's "ddim"). "fireflow" (Deng et al. 2024) inverts and samples with FireFlow's
second-order steps at one model call a step, which redraw closer than Euler's with no correction.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from PIL import Image

from pipelines.ddim import Level, ddim_coefficients, ddim_from, ddim_levels
from pipelines.dpl import (DPLSettings, Nouns, check_supported, clustered_background, encode_with, find_nouns,
                          initial_vectors, inversion_store, learn_step, map_capture, map_side, user_background)
from pipelines.flow import FireFlowScheduler, euler_from, euler_invert, fireflow_invert, flow_levels, is_flow_matching, pipeline_sigmas
from pipelines.generate import check_sampling, image_size
from pipelines.images import image_to_latent, prepare_image
from pipelines.inversion_cache import DEFAULT_CACHE, InversionCache, arrays_digest, inversion_key, model_fingerprint
from pipelines.stepping import with_callback
from xattn.align import refine_mapper
from xattn.attach import attach
from xattn.capture import MapCapture
from xattn.conditioning import TextConditioning, denoiser_output, distilled_guidance, encode_text
from xattn.denoiser import denoiser, has_ip_adapter
from xattn.families import cross_grids, pipeline_latents, spatial_latents
from xattn.tokens import pipeline_tokenizer

DIFFUSION_METHODS = ("direct", "null-text", "negative-prompt", "ddim", "dpl", "dpl-direct")
FLOW_METHODS = ("direct", "euler", "fireflow")
METHODS = tuple(dict.fromkeys(DIFFUSION_METHODS + FLOW_METHODS))
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
class Sampling:
    """A pipeline call's options for sampling from an inversion, and its `callback_on_step_end` body."""

    options: dict
    on_step_end: Callable[[int, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


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
    tokens: torch.Tensor | None = None  # (steps, positions, D): dpl's learnt input embeddings of the nouns' tokens per step
    token_positions: tuple[int, ...] = ()  # the caption's token positions those embeddings replace

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
        if self.nulls is not None and guidance != self.guidance:
            raise ValueError(f"{self.method} embeddings were optimised for guidance {self.guidance:g}; edit with guidance={self.guidance:g} or invert again")
        if (self.nulls is not None or self.method == "negative-prompt") and negative_prompt is not None:
            raise ValueError(f"{self.method} inversion sets the unconditional prompt itself; leave out negative_prompt "
                             "(null-text takes it when inverting, as its starting point)")

    def sampling(self, pipe: DiffusionPipeline, prompts: list[str]) -> Sampling:
        """What a pipeline call of `prompts` (the caption first) needs to sample from this inversion: the starting
        latents (and size, or for an img2img pipeline its image at full strength), the unconditional embeddings, with
        dpl every prompt's embeddings per step, and what to change after each step."""
        params = check_redraws(pipe)
        rows = len(prompts)
        options = {"latents": pipeline_latents(pipe, self.start.to(denoiser(pipe).dtype).expand(rows, -1, -1, -1).clone())}
        if is_flow_matching(pipe.scheduler):
            options["sigmas"] = pipeline_sigmas(self.steps)
        if "height" in params:
            options |= {"height": self.size[0], "width": self.size[1]}
        if "image" in params:
            options |= {"image": self.image, "strength": 1.0}
        learnt = self._learnt_embeddings(pipe, prompts)
        if learnt is not None:
            options["prompt_embeds"] = learnt[0]
        if self.nulls is not None or self.method == "negative-prompt":
            cond, uncond = encode_text(pipe, [self.caption], self.size, self.negative_prompt)
            negative = cond if self.method == "negative-prompt" else uncond.with_embeds(self.nulls[:1].to(uncond.embeds))
            negative = negative.rows(rows)
            options["negative_prompt_embeds"] = negative.embeds
            if negative.pooled is not None:
                options["negative_pooled_prompt_embeds"] = negative.pooled

        def on_step_end(step: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            """Direct adds to every row the correction that puts the source row back on the trajectory; null-text
            and dpl set the next step's unconditional and learnt embeddings."""
            changed = {}
            if self.method in ("direct", "dpl-direct"):
                latents = spatial_latents(pipe, tensors["latents"], tuple(self.latents.shape[-2:]))
                corrected = latents + (self.latents[self.steps - 1 - step].to(latents) - latents[:1])
                changed["latents"] = pipeline_latents(pipe, corrected)
            if step + 1 < self.steps and (self.nulls is not None or learnt is not None):
                embeds = tensors["prompt_embeds"].clone()
                guided = embeds.shape[0] == 2 * rows  # [unconditional, conditional] rows under classifier-free guidance
                if self.nulls is not None:
                    embeds[:rows] = self.nulls[step + 1].to(embeds)
                if learnt is not None:
                    embeds[rows if guided else 0 :] = learnt[step + 1].to(embeds)
                changed["prompt_embeds"] = embeds
            return changed

        return Sampling(options, on_step_end)

    def _learnt_embeddings(self, pipe: DiffusionPipeline, prompts: list[str]) -> torch.Tensor | None:
        """dpl: (steps, rows, T, D) embeddings of every prompt with each step's learnt noun vectors, placed where a
        prompt keeps a noun token of the caption (aligned as a refinement aligns them); None for other methods."""
        if self.tokens is None:
            return None
        tokenizer = pipeline_tokenizer(pipe)
        caption_ids = tokenizer(self.caption).input_ids
        placed = []
        for prompt in prompts:
            ids = tokenizer(prompt).input_ids
            mapper = refine_mapper(tokenizer, self.caption, prompt)[0].tolist() if prompt != self.caption else list(range(len(ids)))
            placed.append([(t, self.token_positions.index(s)) for t, s in enumerate(mapper[: len(ids)])
                           if s in self.token_positions and ids[t] == caption_ids[s]])
        with torch.no_grad():
            return torch.stack([torch.cat([encode_with(pipe, prompt, [t for t, _ in pairs], self.tokens[i, [k for _, k in pairs]])
                                           for prompt, pairs in zip(prompts, placed)]) for i in range(self.steps)])


def redraw_scheduler(scheduler, method: str):
    """The sampler an inversion by `method` redraws under, built from the pipeline's scheduler: deterministic DDIM, or
    on a rectified flow deterministic Euler, or FireFlow's."""
    if method == "fireflow":
        return FireFlowScheduler.from_config(scheduler.config, stochastic_sampling=False)
    return euler_from(scheduler) if is_flow_matching(scheduler) else ddim_from(scheduler)


@contextmanager
def redraw_sampling(pipe: DiffusionPipeline, method: str) -> Iterator[object]:
    """The pipeline samples with `redraw_scheduler` inside the block: inverted latents redraw their image only under
    the sampler they were inverted for. Its own scheduler comes back on exit."""
    original = pipe.scheduler
    pipe.scheduler = redraw_scheduler(original, method)
    try:
        yield pipe.scheduler
    finally:
        pipe.scheduler = original


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
        for level in pipe.progress_bar(list(reversed(levels))):
            c_x, c_out = ddim_coefficients(level.alpha, level.alpha_next, prediction)
            out = denoiser_output(pipe, path[-1], level.timestep, text)
            path.append((path[-1] - c_out * out) / c_x)
    return torch.cat(path)


def null_step(
    pipe: DiffusionPipeline,
    x: torch.Tensor,
    target: torch.Tensor,
    level: Level,
    prediction: str,
    cond: TextConditioning,
    uncond: TextConditioning,
    null: torch.Tensor,
    guidance: float,
    settings: NullTextSettings,
    step: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of null-text: the unconditional embedding (warm-started from `null`) that puts guided DDIM from `x` on
    `target`, (1, T, D) in float32, and the latent guided DDIM reaches with it."""
    c_x, c_out = ddim_coefficients(level.alpha, level.alpha_next, prediction)
    dtype = uncond.embeds.dtype
    with torch.no_grad():
        out_cond = denoiser_output(pipe, x, level.timestep, cond)
    null = null.detach().clone().requires_grad_(True)  # a fresh tensor: Adam updates in place, and the stored nulls must keep their values
    optimiser = torch.optim.Adam([null], lr=settings.rate(step))
    bound = settings.bound(step)
    for _ in range(settings.inner_steps):
        out_null = denoiser_output(pipe, x, level.timestep, uncond.with_embeds(null.to(dtype)))
        guided = out_null + guidance * (out_cond - out_null)
        loss = F.mse_loss((c_x * x + c_out * guided).float(), target.float())
        (null.grad,) = torch.autograd.grad(loss, [null])
        optimiser.step()
        if loss.item() < bound:
            break
    null = null.detach()
    with torch.no_grad():
        out_null = denoiser_output(pipe, x, level.timestep, uncond.with_embeds(null.to(dtype)))
        return null, c_x * x + c_out * (out_null + guidance * (out_cond - out_null))


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
    steps = len(levels)
    null, x, nulls = uncond.embeds.detach().float(), latents[-1:], []
    for i, level in enumerate(pipe.progress_bar(levels)):
        null, x = null_step(pipe, x, latents[steps - 1 - i : steps - i], level, prediction, cond, uncond, null, guidance, settings, i)
        nulls.append(null[0])
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
    nouns: Sequence[str] = (),
    masks: Mapping[str, np.ndarray | torch.Tensor] | None = None,
    dpl: DPLSettings = DPLSettings(),
    cache_dir: str | Path | None = DEFAULT_CACHE,
) -> Inversion:
    """Invert `image` (any size and mode; fitted to (height, width), the model's size by default, with a logged note) under `caption`.

    guidance is the scale the edits will use; only null-text and dpl depend on it (and on
    negative_prompt, the unconditional prompt their embeddings start from; default: the empty one), and the
    inverted flow of a guidance-distilled model (Flux-dev), whose velocity takes the scale as an input.
    nouns, masks, dpl: for "dpl" and "dpl-direct", the caption's object nouns (each occurrence is one object), optionally
    a boolean mask per noun at the model's image size (default: found by self-attention clustering), and the settings.
    Results are cached in `cache_dir` (None: no cache) by image content, caption, model weights and settings.
    """
    flow = is_flow_matching(pipe.scheduler)
    if method not in METHODS:
        raise ValueError(f"unknown inversion method {method!r}; choose one of {', '.join(METHODS)}")
    kind, methods = ("samples a rectified flow", FLOW_METHODS) if flow else ("samples a diffusion", DIFFUSION_METHODS)
    if method not in methods:
        raise ValueError(f"{type(pipe).__name__} {kind}: invert it with one of {', '.join(methods)}, not {method}")
    check_sampling(pipe, steps, guidance, 0)
    if method not in ("direct", "ddim", *FLOW_METHODS) and "callback_on_step_end" not in inspect.signature(pipe.__call__).parameters:
        raise ValueError(f"{type(pipe).__name__} lets a step callback change only the latents, and {method} inversion sets the "
                         "unconditional embedding as well: invert it with direct or ddim")
    if has_ip_adapter(pipe):
        raise ValueError("inversion runs the UNet on the caption alone, and this pipeline has an IP-Adapter loaded: "
                         "pipe.unload_ip_adapter() first")
    check_redraws(pipe)
    size = image_size(pipe, height, width)
    learning = method in ("dpl", "dpl-direct")
    found = None
    if learning:
        check_supported(pipe)
        found = find_nouns(pipe, caption, nouns)
        side = map_side(pipe, (size[0] // pipe.vae_scale_factor, size[1] // pipe.vae_scale_factor), dpl)
        background = user_background(masks, found.nouns, size, side) if masks is not None else None
    elif nouns or masks is not None:
        raise ValueError(f"nouns and masks are dpl's; {method} takes neither")
    prepared = prepare_image(image, size)
    for note in prepared.notes:
        log.warning("input image %s", note)
    settings = {"method": method, "steps": steps, "dtype": str(denoiser(pipe).dtype)}
    if flow and distilled_guidance(pipe):
        settings["guidance"] = guidance  # an input of the velocity the flow is inverted with
    if method in ("null-text", "dpl"):
        settings |= {"guidance": guidance, "negative_prompt": negative_prompt, **asdict(null_text)}
    if learning:
        drawn = None if masks is None else arrays_digest({noun: np.asarray(mask, dtype=bool) for noun, mask in masks.items()})
        settings |= {"nouns": list(found.words), "masks": drawn, **asdict(dpl)}
    cache = InversionCache(cache_dir) if cache_dir is not None else None
    key = inversion_key(prepared.image, caption, model_fingerprint(pipe), settings) if cache else None
    stored = cache.load(key) if cache else None
    if stored is not None:
        return Inversion(method, caption, steps, guidance, stored["latents"], stored.get("nulls"), prepared.image, prepared.notes,
                         negative_prompt=negative_prompt, tokens=stored.get("tokens"),
                         token_positions=tuple(found.positions) if found else ())
    began = time.perf_counter()
    if flow:
        latents = _invert_flow(pipe, prepared.image, caption, size, steps, guidance, fireflow_invert if method == "fireflow" else euler_invert)
        result = Inversion(method, caption, steps, guidance, latents, None, prepared.image, prepared.notes, time.perf_counter() - began)
        if cache:
            cache.save(key, {"latents": latents}, {"caption": caption} | {k: str(v) for k, v in settings.items()})
        return result
    scheduler = ddim_from(pipe.scheduler)
    levels = ddim_levels(scheduler, steps)
    prediction = scheduler.config.prediction_type
    cond, uncond = encode_text(pipe, [caption], size, negative_prompt)
    latent = image_to_latent(pipe, prepared.image)
    tokens = nulls = None
    if learning and background is None:
        store = inversion_store(pipe, tuple(latent.shape[-2:]), side)
        with attach(pipe, store):
            latents = ddim_invert(pipe, latent, cond, levels, prediction)
        background = clustered_background(store, found, side, dpl)
    else:
        latents = ddim_invert(pipe, latent, cond, levels, prediction)
    if learning:
        tokens, nulls = _learn_tokens(pipe, latents, caption, found, background, side, uncond, levels, prediction, guidance,
                                      null_text if method == "dpl" else None, dpl)
    elif method == "null-text":
        nulls = optimise_nulls(pipe, latents, cond, uncond, levels, prediction, guidance, null_text)
    result = Inversion(method, caption, steps, guidance, latents, nulls, prepared.image, prepared.notes, time.perf_counter() - began,
                       negative_prompt, tokens, tuple(found.positions) if found else ())
    if cache:
        tensors = {"latents": latents} | ({"nulls": nulls} if nulls is not None else {}) | ({"tokens": tokens} if tokens is not None else {})
        cache.save(key, tensors, {"caption": caption} | {k: str(v) for k, v in settings.items()})
    return result


def _invert_flow(pipe: DiffusionPipeline, image: Image.Image, caption: str, size: tuple[int, int], steps: int,
                 guidance: float, solver) -> torch.Tensor:
    """The caption's rectified flow inverted by `solver` from the image's latent: the conditional velocity alone (a
    guidance-distilled Flux takes `guidance` as its input)."""
    latent = image_to_latent(pipe, image)
    grid = cross_grids(pipe, tuple(latent.shape[-2:]))[0]
    cond, _ = encode_text(pipe, [caption], size)
    levels = flow_levels(pipe.scheduler, steps, grid[0] * grid[1], pipeline_sigmas(steps))
    return solver(lambda x, t: denoiser_output(pipe, x, t, cond, guidance=guidance), latent, levels)


def _learn_tokens(
    pipe: DiffusionPipeline,
    latents: torch.Tensor,
    caption: str,
    nouns: Nouns,
    background: torch.Tensor,
    side: int,
    uncond: TextConditioning,
    levels: list[Level],
    prediction: str,
    guidance: float,
    null_text: NullTextSettings | None,
    settings: DPLSettings,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dpl's loop from noise to image: at each step the nouns' vectors (warm-started), then with `null_text` the step's
    null embedding, guided DDIM advancing with both; without, the latent follows the inversion's trajectory (which the
    direct correction keeps the source on). (steps, positions, D) vectors and (steps, T, D) nulls or None."""
    steps = len(levels)
    vectors = initial_vectors(pipe, caption, nouns.positions)
    x, null = latents[-1:], uncond.embeds.detach().float()
    learnt, nulls = [], []
    capture = MapCapture(side)
    for i, level in enumerate(pipe.progress_bar(levels)):
        with map_capture(pipe, capture):
            vectors, _ = learn_step(pipe, capture, x, level, caption, nouns, vectors, background, settings, settings.thresholds(i, steps))
        learnt.append(vectors)
        target = latents[steps - 1 - i : steps - i]
        if null_text is None:
            x = target
            continue
        with torch.no_grad():
            cond = TextConditioning(encode_with(pipe, caption, nouns.positions, vectors))
        null, x = null_step(pipe, x, target, level, prediction, cond, uncond, null, guidance, null_text, i)
        nulls.append(null[0])
    return torch.stack(learnt), torch.stack(nulls) if nulls else None


def reconstruct(pipe: DiffusionPipeline, inversion: Inversion, output_type: str = "pil", **call_options):
    """The caption sampled from the inversion as an edit's source row is: the image redrawn. Other keyword arguments
    go to the pipeline call (PixArt's use_resolution_binning, ...)."""
    sampling = inversion.sampling(pipe, [inversion.caption])
    options = with_callback(pipe, sampling.options | call_options, lambda pipeline, step, timestep, tensors: sampling.on_step_end(step, tensors),
                            ["latents", "prompt_embeds"])
    with redraw_sampling(pipe, inversion.method):
        return pipe(None if "prompt_embeds" in options else [inversion.caption], num_inference_steps=inversion.steps,
                    guidance_scale=inversion.guidance, output_type=output_type, **options).images[0]
