"""Prompt-to-Prompt on any diffusers SD 1.x/2.x/XL, PixArt, SD3/SD3.5 or Flux pipeline: one shared starting latent,
edits as objects.

    result = prompt_to_prompt(pipe, ["a red circle", "a red square"], seed=0)
    result.images[1]                     # the circle made a square, in the same place

Every input is checked before the first step: edits against the prompts, schedule words and
windows, blend words. The source image equals plain generation of the source prompt with the
same seed.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
from diffusers import DiffusionPipeline

from editors.blend import LocalBlend, blend_latents, user_region
from editors.conventions import XATTN, Conventions
from editors.p2p import BlendTokens, PromptToPrompt
from editors.schedules import Window, token_schedule, window, word_windows
from editors.specs import Refine, Reweight, Swap, auto_edit, pipeline_edit
from pipelines.generate import check_sampling, image_size
from pipelines.inversion import Inversion, redraw_sampling, redraw_scheduler
from pipelines.stepping import Calls, with_callback
from xattn.attach import attach
from xattn.conditioning import image_embeds, pipeline_image_embeds
from xattn.families import check_joint_blocks, cross_resolutions, has_joint_attention, nearest_cross_side, pipeline_latents, spatial_latents
from xattn.store import AttentionStore
from xattn.tokens import pipeline_tokenizer, pipeline_word_tokens, word_tokens
from xattn.trace import Trace

Edit = Swap | Refine | Reweight


@dataclass
class EditResult:
    """The images (source first), the prompts and edits, and with `maps=True` each image's
    cross-attention as the edit used it: `result.maps.word_maps(image=1)`."""

    images: list
    prompts: list[str]
    edits: list[Edit]
    maps: Trace | None = None


def _blend_tokens(pipe, prompts: list[str], spec: LocalBlend, latent: tuple[int, int]) -> BlendTokens:
    def tokens(prompt: str, words: Sequence[str]) -> tuple[int, ...]:
        return tuple(sorted({t for w in words for t in pipeline_word_tokens(pipe, prompt, w)}))

    side = nearest_cross_side(pipe, latent, spec.resolution)
    return BlendTokens(
        tokens(prompts[0], spec.source_words),
        tuple(tokens(p, spec.target_words) for p in prompts[1:]),
        tuple(tokens(p, spec.subtract) for p in prompts[1:]),
        side,
    )


def output_size(pipe: DiffusionPipeline, height: int | None, width: int | None, call_options: dict) -> tuple[int, int]:
    """(height, width) of the images a pipeline call makes: asked for, or, for an img2img pipeline, its input image's."""
    params = inspect.signature(pipe.__call__).parameters
    if "height" in params:
        return image_size(pipe, height, width)
    if height is not None or width is not None:
        raise ValueError(f"{type(pipe).__name__} makes images the size of its input image; leave out height and width")
    if call_options.get("image") is None:
        raise ValueError(f"{type(pipe).__name__} edits an image: pass image=... (and strength=...) as for the pipeline itself")
    return tuple(pipe.image_processor.get_default_height_width(call_options["image"]))


def prompt_to_prompt(
    pipe: DiffusionPipeline,
    prompts: Sequence[str],
    edit: Edit | Sequence[Edit] | None = None,
    *,
    cross_steps: Window | Mapping[str, Window] = 0.8,
    self_steps: Window = 0.4,
    self_resolution: int | None = None,
    blend: LocalBlend | None = None,
    steps: int = 25,
    guidance: float = 5.0,
    seed: int = 0,
    num_images_per_prompt: int = 1,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    output_type: str = "pil",
    explicit: bool = False,
    inversion: Inversion | None = None,
    maps: bool = False,
    conventions: Conventions = XATTN,
    joint_edit: str = "p2p",
    joint_blocks: Mapping[str, Sequence[int]] | None = None,
    **call_options,
) -> EditResult:
    """Generate prompts[0] (the source) and edit it into prompts[1:] (the targets).

    edit: one edit for all targets or one per target; None picks per target (swap when the word
    counts match, refinement when the target adds words). cross_steps: the window of steps (or
    {word: window, "default": window}) in which targets take the source's cross-attention.
    self_steps: the window in which they take its self-attention, at query grids up to
    self_resolution (default: the conventions', a quarter of the latent side: the paper's 16 at 512 px; a DiT's patch grid).
    Every prompt starts from the same noise (seed), and a stochastic sampler draws the same noise
    for every prompt, so the source is plain generation of prompts[0] with that seed. With
    num_images_per_prompt=k, image j of every prompt starts from seed + j: k edits at once, the
    images in order [source 0..k-1, target 1's 0..k-1, ...], each as its own call would make it.
    inversion: edit a real image (`pipelines.inversion.invert`) instead of generating the source;
    prompts[0] must be its caption, and sampling is DDIM (a flow's Euler) from its inverted latent (seed unused).
    maps: also record every image's cross-attention maps, a target's as the edit made them (its
    injected map P', not the one it would have drawn alone); this costs explicit probabilities
    in the cross-attention layers, as `xattn.trace` does.
    conventions: `editors.conventions.GOOGLE` reproduces google/prompt-to-prompt's code.
    joint_edit: on MM-DiT joint attention (SD3, Flux), "p2p" edits the image x text block as above; "projection" is
    Shin et al.'s edit (targets take the source's image queries and keys in the self_steps window, their own prompt
    doing the rest), which takes no re-weighting. joint_blocks: the blocks either edits, per stream ({"double": [0, 1],
    "single": range(10)} on Flux; SD3 has "double" only); default: all.
    Other keyword arguments go to the pipeline call (an img2img pipeline's image and strength, an
    IP-Adapter's ip_adapter_image(_embeds), which then conditions every prompt alike, ...).
    """
    prompts = list(prompts)
    if len(prompts) < 2:
        raise ValueError("Prompt-to-Prompt needs a source prompt and at least one target prompt")
    images = num_images_per_prompt
    if images < 1:
        raise ValueError(f"num_images_per_prompt must be at least 1, got {images}")
    check_sampling(pipe, steps, guidance, seed, images)
    if inversion is not None and images != 1:
        raise ValueError("an inversion redraws one image: leave num_images_per_prompt at 1")
    if inversion is not None:
        if height is not None or width is not None:
            raise ValueError(f"the image was inverted at {inversion.size[0]}x{inversion.size[1]}; leave out height and width")
        size = inversion.size
        inversion.check_prompts(prompts, steps, guidance, negative_prompt)
        if blend is not None and inversion.method == "fireflow":
            raise ValueError("local blending changes each step's latents, which FireFlow's sampler keeps to itself (the pipeline "
                             "holds its midpoints); invert with method='direct' or 'euler' to blend")
    else:
        size = output_size(pipe, height, width, call_options)
    latent = (size[0] // pipe.vae_scale_factor, size[1] // pipe.vae_scale_factor)
    tokenizer = pipeline_tokenizer(pipe)
    targets = prompts[1:]
    if edit is None:
        edits = [auto_edit(tokenizer, prompts[0], t) for t in targets]
    elif isinstance(edit, (Swap, Refine, Reweight)):
        edits = [edit] * len(targets)
    else:
        edits = list(edit)
        if len(edits) != len(targets):
            raise ValueError(f"{len(edits)} edits for {len(targets)} target prompts; give one edit, or one per target")
    if joint_edit == "projection":
        if not has_joint_attention(pipe):
            raise ValueError(f"joint_edit='projection' edits MM-DiT joint attention (SD3, Flux); {type(pipe).__name__}'s denoiser has none")
        if any(isinstance(e, Reweight) for e in edits):
            raise ValueError("re-weighting scales the attention map, which joint_edit='projection' does not edit; use joint_edit='p2p'")
    if joint_blocks is not None:
        check_joint_blocks(pipe, joint_blocks)
    cross = [pipeline_edit(pipe, e, prompts[0], t, conventions) for e, t in zip(edits, targets)]
    calls = Calls.planned(redraw_scheduler(pipe.scheduler, inversion.method), steps) if inversion is not None else Calls.of_pipeline(pipe, steps, call_options)
    count = calls.count
    default, words = word_windows(cross_steps, count, span=conventions.window_span(count))
    schedules = torch.stack(
        [
            token_schedule(default, {tuple(pipeline_word_tokens(pipe, t, w)): span for w, span in words.items()}, count, len(cross[0].own))
            for t in targets
        ]
    )
    self_window = window(self_steps, count, "self-attention schedule")
    tokens = _blend_tokens(pipe, prompts, blend, latent) if blend is not None and blend.mask is None else None
    blend_start = window(blend.start, count, "blend start")[1] if blend is not None else count
    store = AttentionStore() if maps else None
    self_side = self_resolution or conventions.self_side(latent, min(cross_resolutions(pipe, latent)))
    controller = PromptToPrompt(cross, schedules, self_window, self_side, tokens, explicit, store, images, joint_edit, joint_blocks)

    fixed_region = user_region(blend.mask, latent) if blend is not None and blend.mask is not None else None
    pictures = image_embeds(pipe, call_options.pop("ip_adapter_image", None), call_options.pop("ip_adapter_image_embeds", None))
    if pictures is not None:
        call_options["ip_adapter_image_embeds"] = pipeline_image_embeds(pictures, len(prompts), guidance > 1)

    sampling = inversion.sampling(pipe, prompts) if inversion is not None else None

    def on_step_end(pipeline, call: int, timestep, tensors):
        changed = sampling.on_step_end(call, tensors) if sampling is not None else {}
        if blend is not None and calls.steps[call] >= blend_start and calls.settles(call):
            latents = changed.get("latents", tensors["latents"])
            region = fixed_region if fixed_region is not None else controller.blend_region(latent, blend.threshold, blend.subtract_threshold)
            spatial = blend_latents(spatial_latents(pipe, latents, latent), region.to(latents.device), images)
            changed["latents"] = pipeline_latents(pipe, spatial)
        return changed

    if sampling is not None:
        call_options |= sampling.options
    else:
        call_options.setdefault("generator", [torch.Generator(device="cpu").manual_seed(seed + j) for _ in prompts for j in range(images)])
        if "height" in inspect.signature(pipe.__call__).parameters:
            call_options |= {"height": size[0], "width": size[1]}
    if negative_prompt is not None and "negative_prompt_embeds" not in call_options:  # PixArt's default is "", not None
        call_options["negative_prompt"] = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
    call_options = with_callback(pipe, call_options, on_step_end if blend is not None or inversion is not None else None, ["latents", "prompt_embeds"])
    with attach(pipe, controller) as state, redraw_sampling(pipe, inversion.method) if inversion is not None else nullcontext():
        made = pipe(None if "prompt_embeds" in call_options else prompts, num_inference_steps=steps, guidance_scale=guidance,
                    num_images_per_prompt=images, output_type=output_type, **call_options).images
    if "prompt_embeds" in call_options:  # dpl's learnt embeddings: the pipeline saw no text, but the maps are the prompts' words
        state.layout = replace(state.layout, prompts=tuple(prompts))
    return EditResult(list(made), prompts, edits, Trace(pipe, store, state) if store is not None else None)


def parse_window(text: str) -> Window:
    """A window from the command line: "0.8" (fraction), "10" (steps), "0.2,0.8" or "5,20" (start, end)."""

    def bound(part: str) -> int | float:
        part = part.strip()
        try:
            return int(part)
        except ValueError:
            try:
                return float(part)
            except ValueError:
                raise ValueError(f"{text!r} is not a schedule: give a fraction (0.8), a step count (10) or start,end (0.2,0.8)") from None

    parts = text.split(",")
    if len(parts) > 2:
        raise ValueError(f"{text!r} is not a schedule: give a fraction (0.8), a step count (10) or start,end (0.2,0.8)")
    return (bound(parts[0]), bound(parts[1])) if len(parts) == 2 else bound(parts[0])


def choose_edit(tokenizer, source: str, target: str, mode: str, weights: Mapping[str, float]) -> Edit:
    """The edit a mode names: auto/replace/refine, each with re-weighting on top when weights are given; reweight alone."""
    if mode == "reweight":
        if not weights:
            raise ValueError("mode 'reweight' needs at least one --reweight WORD=SCALE")
        return Reweight(dict(weights))
    modes = {"auto": lambda: auto_edit(tokenizer, source, target), "replace": Swap, "refine": Refine}
    if mode not in modes:
        raise ValueError(f"unknown mode {mode!r}; choose auto, replace, refine or reweight")
    base = modes[mode]()
    return Reweight(dict(weights), base=base) if weights else base


def blend_for(tokenizer, source: str, target: str, words: Sequence[str]) -> LocalBlend:
    """Blend words from the command line: each is used in the prompt(s) that contain it."""

    def has(prompt: str, word: str) -> bool:
        try:
            word_tokens(tokenizer, prompt, word)
        except ValueError:
            return False
        return True

    for word in words:
        if not has(source, word) and not has(target, word):
            raise ValueError(f"blend word {word!r} is in neither {source!r} nor {target!r}")
    return LocalBlend([w for w in words if has(source, w)], [w for w in words if has(target, w)])


def describe(edit: Edit) -> str:
    if isinstance(edit, Reweight):
        weights = ", ".join(f"{w}={s:g}" for w, s in edit.weights.items())
        return f"reweight ({weights})" + (f" on {describe(edit.base)}" if edit.base is not None else "")
    return {Swap: "replace (word swap)", Refine: "refine (added words)"}[type(edit)]
