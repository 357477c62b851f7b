"""Attention-loss guidance (A-STAR, Attend-and-Excite) on any diffusers SD 1.x/2.x/XL pipeline.

    result = compose(pipe, "a red circle and a blue square", ["circle", "square"], method="astar")
    result.images[0]; result.maps()        # the image and each concept's attention map

Before denoising step i the latents z_t move against the gradient of a loss on the concepts'
cross-attention maps, z_t <- z_t - alpha_i grad L, computed from one extra UNet pass on the
conditional prompt (A&E and A-STAR Eq. 4); the step itself is the pipeline's own, with
classifier-free guidance, so method "none" is plain generation. The update runs in the
pipeline's `callback_on_step_end` (for step 0, on the starting noise), and every image of a batch
is optimised on its own maps in one batched pass.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

from pipelines.flow import is_flow_matching
from pipelines.generate import check_sampling, image_size
from pipelines.stepping import Calls, with_callback
from xattn import losses
from xattn.attach import CallState, attach
from xattn.capture import MapCapture
from xattn.conditioning import TextConditioning, denoiser_output, encode_text, image_embeds, pipeline_image_embeds, with_images
from xattn.denoiser import denoiser, frozen
from xattn.families import check_joint_blocks, cross_grids, latent_channels, layout_side, nearest_cross_side, pipeline_latents, spatial_latents
from xattn.tokens import pipeline_tokenizer, pipeline_word_tokens

METHODS = ("astar", "attend-excite", "none")


@dataclass(frozen=True)
class GuidanceSettings:
    """Every choice the papers leave open, with its default.

    Loss weights: L = attend_excite * L_A&E + segregation * L_seg (A-STAR Eq. 2) + retention *
    L_ret (Eq. 3) + placement * L_layout; A-STAR's Eq. 4 is the unweighted sum of the second and
    third. L_layout acts only with user masks (`compose(..., layout=...)`): the share of each
    concept's attention inside its mask (xattn.losses.layout_loss, Chen et al. 2024). User masks
    as retention's targets instead (A-STAR Sec. 5) placed two objects in their halves no more
    often than no masks did, and cost exactness (benchmarks/RESULTS.md), so retention keeps its
    own masks from the previous step's maps.
    step_size, step_size_end: alpha_i = step_size * sqrt(linspace(1, step_size_end, steps)[i]), A&E's schedule.
    guided_steps: the fraction of steps, from the first, whose latents are updated (A&E: 25 of 50;
    A-STAR: every step, its Fig. 11e shows that fewer lose concepts).
    refinement: {fraction of the steps: threshold}; at those steps the update repeats (at most
    max_refinements times) while an image's weakest concept's smoothed token-share map peaks
    below the threshold (A&E's iterative refinement, at its iterations 0, 10 and 20 of 50; for
    any loss, A-STAR's included: the paper mentions none). As in the authors' code and diffusers',
    whether an update repeats is decided by the loss before the update just made, so an image
    takes one more update after it meets the threshold (stopping there instead was measured no
    better: benchmarks/RESULTS.md).
    resolution: side of the attention maps the losses read (the UNet's nearest cross-attention side
    is used); None reads the level the papers' 16x16 maps stand for on SD 1.x at 512 px, the
    deepest one outside the mid block (xattn.families.layout_side: 16 there, 32 for SDXL at 1024 px,
    8 on the embedded model). The A&E preset reads there: on the embedded model's 16x16 maps, the
    level SD has at 64x64, it found all objects less often than no guidance. A-STAR keeps 16, the
    side it was tuned and measured at, where it does as well as at 8 (benchmarks/RESULTS.md).
    temperature, sigma, kernel: the concept maps' token softmax and Gaussian smoothing (xattn.losses).
    mask_threshold: retention's binary mask B is where the previous step's map reaches this
    fraction of its maximum (the paper says only "high activations").
    maps: what the losses read. "tokens" is A&E's: per pixel a softmax over the text tokens at
    `temperature`, then smoothed. "peak": the attention each pixel pays the concept, smoothed and
    divided by its maximum. A-STAR's paper does not say; its Eq. 2 and 3 need maps in [0, 1] that
    are low where a concept is absent, which token shares are not: where a pixel attends to no
    word they are uniform (1/number of tokens), and on the embedded model A-STAR on them lost
    objects (45 % of two-object prompts exact against 67.5 % unguided, 40 seeds) where on
    "peak" maps it found them (95 %).
    text_tokens: "all" runs the token softmax over every position but the first and last, as
    the authors' code does for SD 1.x and diffusers' A&E pipeline always does; "prompt" over the
    prompt's own tokens (the authors' SD 2.1 setting, which their issue #14 found converges better).
    On SD3 "all" spans CLIP's 77 positions and T5's (zeros without T5); on T5 alone (Flux, PixArt), which has
    no start-of-text, the softmax starts at the first token.
    blocks: on MM-DiT joint attention (SD3, Flux), the blocks whose image x text block the losses read, per stream
    ({"double": (10, 11)}; Flux's "single" too); None reads every joint block. Each read block computes explicit
    probabilities over the joint sequence, in the autograd graph.
    """

    attend_excite: float = 0.0
    segregation: float = 1.0
    retention: float = 1.0
    placement: float = 1.0
    step_size: float = 20.0
    step_size_end: float = 0.5
    guided_steps: float = 1.0
    refinement: Mapping[float, float] = field(default_factory=dict)
    max_refinements: int = 20
    resolution: int | None = 16
    temperature: float = 100.0
    sigma: float = losses.AE_SIGMA
    kernel: int = 3
    mask_threshold: float = 0.5
    text_tokens: str = "all"
    maps: str = "peak"
    blocks: Mapping[str, tuple[int, ...]] | None = None

    def __post_init__(self) -> None:
        if min(self.attend_excite, self.segregation, self.retention, self.placement) < 0:
            raise ValueError("loss weights must be non-negative")
        if not 0.0 <= self.guided_steps <= 1.0:
            raise ValueError(f"guided_steps is a fraction of the steps, in [0, 1]; got {self.guided_steps}")
        if any(not 0.0 <= f < 1.0 for f in self.refinement):
            raise ValueError(f"refinement keys are fractions of the steps, in [0, 1); got {sorted(self.refinement)}")
        if not 0.0 < self.mask_threshold <= 1.0:
            raise ValueError(f"mask_threshold is a fraction of the map's maximum, in (0, 1]; got {self.mask_threshold}")
        if self.text_tokens not in ("prompt", "all"):
            raise ValueError(f"text_tokens is 'prompt' or 'all'; got {self.text_tokens!r}")
        if self.maps not in ("tokens", "peak"):
            raise ValueError(f"maps is 'tokens' or 'peak'; got {self.maps!r}")
        if self.maps == "peak" and self.attend_excite:
            raise ValueError("the A&E loss reads each concept's peak, which 'peak' maps pin at 1; use maps='tokens'")

    @property
    def guides(self) -> bool:
        return self.attend_excite + self.segregation + self.retention > 0 and self.guided_steps > 0


def method_settings(method: str, **overrides) -> GuidanceSettings:
    """The settings of a named method, with any field overridden (e.g. segregation=0 for an ablation)."""
    presets = {
        "astar": GuidanceSettings(),
        "attend-excite": GuidanceSettings(
            attend_excite=1.0, segregation=0.0, retention=0.0, guided_steps=0.5, refinement={0.0: 0.05, 0.2: 0.5, 0.4: 0.8},
            maps="tokens", resolution=None,
        ),
        "none": GuidanceSettings(segregation=0.0, retention=0.0, guided_steps=0.0),
    }
    if method not in presets:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return replace(presets[method], **overrides)


@dataclass
class Composition:
    """Images, their prompts and concept words, and per step the concept maps of the pipeline's own pass.

    step_maps: (steps, images, concepts, h, w), each concept's attention (mean over its tokens, the
    layers at the guided resolution and the heads), smoothed and scaled to a peak of 1, whatever
    maps the losses read, so that methods compare on one footing;
    losses: (steps, images), each step's loss before its update (nan where nothing was guided).
    """

    images: list
    prompts: list[str]
    concepts: list[list[str]]
    step_maps: torch.Tensor
    losses: torch.Tensor

    def maps(self, image: int = 0, size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        """Each concept's map averaged over the steps, scaled to a maximum of 1, at `size` (default: the map's own)."""
        mean = self.step_maps[:, image].mean(0)
        if size is not None:
            mean = F.interpolate(mean[None], size=size, mode="bilinear", align_corners=False)[0]
        mean = mean / mean.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
        return {word: m.numpy() for word, m in zip(self.concepts[image], mean)}

    def overlap(self, last: float = 0.2) -> torch.Tensor:
        """Per image, the mean over the last `last` of the steps of the concept pairs' soft IoU (0 apart, 1 same)."""
        tail = self.step_maps[-max(1, round(last * len(self.step_maps))) :]
        return torch.stack([losses.mean_overlap(m) for m in tail]).mean(0)


def model_input_scale(scheduler, timestep, like: torch.Tensor) -> torch.Tensor:
    """What the scheduler scales its latents by for the denoiser (1 / sqrt(sigma^2 + 1) for Euler-type samplers; 1 for
    DDIM's and for a rectified flow's, whose latents are the denoiser's input)."""
    one = torch.ones((), device=like.device, dtype=like.dtype)
    return scheduler.scale_model_input(one, timestep) if hasattr(scheduler, "scale_model_input") else one


class _Guide:
    """The per-step latent update; holds the previous step's maps for retention."""

    def __init__(self, pipe, capture: MapCapture, state: CallState, settings: GuidanceSettings, text: TextConditioning,
                 tokens: list[list[tuple[int, ...]]], spans: list[tuple[int, int]], layout: torch.Tensor | None, steps: int,
                 guidance: float) -> None:
        self.pipe, self.capture, self.state, self.settings, self.text = pipe, capture, state, settings, text
        self.guidance = guidance  # the scale a guidance-distilled denoiser (Flux-dev) takes in its passes too
        self.tokens, self.spans, self.layout = tokens, spans, layout
        self.kernel = losses.gaussian_kernel(settings.kernel, settings.sigma)
        self.alphas = losses.step_sizes(settings.step_size, steps, settings.step_size_end)
        guides = settings.guides or (layout is not None and settings.placement > 0 and settings.guided_steps > 0)
        self.guided = round(settings.guided_steps * steps) if guides else 0
        self.refine = {round(f * steps): t for f, t in settings.refinement.items()} if guides else {}
        self.masks: torch.Tensor | None = None
        self.step_maps: list[torch.Tensor] = []
        self.losses = torch.full((steps, len(tokens)), float("nan"))

    def loss_maps(self, probs: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """The maps the losses read: A&E's token shares, or each concept's attention scaled to a peak of 1."""
        if self.settings.maps == "tokens":
            return self.share_maps(probs, rows)
        return self.attention_maps(probs, [self.tokens[r] for r in rows])

    def share_maps(self, probs: torch.Tensor, rows: list[int]) -> torch.Tensor:
        tokens, spans = [self.tokens[r] for r in rows], [self.spans[r] for r in rows]
        maps = losses.token_shares(probs, tokens, spans, self.settings.temperature)
        return losses.smooth(maps, self.kernel.to(maps))

    def attention_maps(self, probs: torch.Tensor, tokens: list[list[tuple[int, ...]]]) -> torch.Tensor:
        maps = losses.token_attention(probs, tokens)
        return losses.peak_normalised(losses.smooth(maps, self.kernel.to(maps)))

    def loss(self, maps: torch.Tensor, rows: list[int]) -> torch.Tensor:
        s = self.settings
        total = maps.new_zeros(maps.shape[0])
        if s.attend_excite:
            total = total + s.attend_excite * losses.attend_excite_loss(maps)
        if s.segregation:
            total = total + s.segregation * losses.segregation_loss(maps)
        if s.retention and self.masks is not None:
            total = total + s.retention * losses.retention_loss(maps, self.masks[rows])
        if s.placement and self.layout is not None:
            total = total + s.placement * losses.layout_loss(maps, self.layout[rows])
        return total

    def after_pass(self, begins_step: bool) -> None:
        """Take the maps of the pipeline's pass: the output's and the next step's retention masks when the pass began
        its step (after the step's update), else none (a pass at a point the scheduler predicted and discards)."""
        probs = self.capture.take()
        if not begins_step:
            return
        shown = self.attention_maps(probs, self.tokens)
        self.step_maps.append(shown.float().cpu())
        if not self.settings.retention:
            return
        maps = shown if self.settings.maps == "peak" else self.share_maps(probs, list(range(len(self.tokens))))
        self.masks = losses.binary_masks(maps, self.settings.mask_threshold)

    def evaluate(self, x: torch.Tensor, rows: list[int], timestep, attendance: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One guidance pass on these rows of the batch, whose latents x are the UNet's input (variance-preserving, as the
        papers' z_t): (per-row loss in the autograd graph of x, and when asked the
        per-row attendance: the weakest concept's smoothed token-share peak, A&E's refinement test)."""
        text = self.text.take(rows)
        with self.state.conditional_calls():
            probs = self.capture.run(lambda: denoiser_output(self.pipe, x, timestep, text, guidance=self.guidance))
        maps = self.loss_maps(probs, rows)
        if not attendance:
            return self.loss(maps, rows), None
        shares = maps if self.settings.maps == "tokens" else self.share_maps(probs.detach(), rows)
        return self.loss(maps, rows), losses.peaks(shares.detach()).amin(-1)

    def __call__(self, latents: torch.Tensor, step: int, timestep) -> torch.Tensor:
        """The latents for `step` after its update (unchanged at steps that are not guided).

        At a refinement step, the images whose weakest concept peaks below the threshold are
        updated and passed again, alone, until the refinement stops (`GuidanceSettings.refinement`)
        or the tries run out; then every image takes the step's regular update.
        """
        threshold = self.refine.get(step)
        if step >= self.guided and threshold is None:
            return latents
        alpha = float(self.alphas[step])
        every = list(range(len(latents)))
        # The update acts on z_t as the papers define it, the UNet's input: for a sampler whose latents carry the noise
        # at scale sigma (Euler, Heun, LMS) that is the latents times 1 / sqrt(sigma^2 + 1), so the step means the same
        # whatever the sampler. (A step taken on the sampler's own latents would shrink by sigma^2 + 1.)
        scale = model_input_scale(self.pipe.scheduler, timestep, latents)
        with torch.enable_grad():
            x = (latents * scale).detach().requires_grad_(True)
            loss, attendance = self.evaluate(x, every, timestep, threshold is not None)
            self.losses[step] = loss.detach().cpu()
            if threshold is not None and (attendance < threshold).any():
                x = self._refine(x, loss, attendance < threshold, alpha, threshold, timestep)
                if step < self.guided:
                    x = x.detach().requires_grad_(True)
                    loss, _ = self.evaluate(x, every, timestep, False)
            if step < self.guided:
                x = self._descend(x, loss, torch.full((len(x),), alpha, dtype=x.dtype))
        return x.detach() / scale

    def _refine(self, x: torch.Tensor, loss: torch.Tensor, weak: torch.Tensor, alpha: float, threshold: float, timestep) -> torch.Tensor:
        """A&E's iterative refinement of the `weak` rows of x, whose losses `loss` are in the graph of x.

        Each try updates the rows still refining, then evaluates them again. A row goes on while
        the loss it had before the update just made was above the target (the authors' loop,
        which makes one update more than needed).
        """
        rows = list(range(len(x)))
        sub, sub_loss, going, before = x, loss, weak, weak
        for _ in range(self.settings.max_refinements):
            moved = self._descend(sub, sub_loss, alpha * going.to(x.dtype))
            x = x.detach().index_copy(0, torch.tensor(rows, device=x.device), moved)
            kept = [i for i, g in enumerate(going.tolist()) if g]
            rows = [rows[i] for i in kept]
            if not rows:
                break
            sub = x[rows].detach().requires_grad_(True)
            sub_loss, attendance = self.evaluate(sub, rows, timestep, True)
            after = attendance < threshold
            going, before = before[kept], after
            if not going.any():
                break
        return x.detach()

    @staticmethod
    def _descend(x: torch.Tensor, loss: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """x - alpha * d(sum of the rows' losses)/dx: each row moves by its own loss's gradient only."""
        if not loss.requires_grad:
            return x.detach()
        (grad,) = torch.autograd.grad(loss.sum(), x)
        return (x - alpha.reshape(-1, *[1] * (x.ndim - 1)) * grad).detach()


def _layout_masks(layout: Mapping[str, np.ndarray | torch.Tensor], concepts: list[list[str]], grid: tuple[int, int]) -> torch.Tensor:
    """User masks as (rows, concepts, h, w) 0/1 at the map grid; nan for concepts without one."""
    unknown = set(layout) - {w for words in concepts for w in words}
    if unknown:
        raise ValueError(f"layout masks for {sorted(unknown)}, which are not concepts; the concepts are {concepts[0]}")
    planes = {}
    for word, mask in layout.items():
        m = torch.as_tensor(np.asarray(mask, dtype=np.float32))
        if m.ndim != 2 or not (m > 0).any():
            raise ValueError(f"the layout mask of {word!r} must be a 2-D array with some nonzero pixels; got shape {tuple(m.shape)}")
        planes[word] = (F.interpolate((m > 0).float()[None, None], size=grid, mode="area")[0, 0] >= 0.5).float()
    empty = torch.full(grid, float("nan"))
    return torch.stack([torch.stack([planes.get(w, empty) for w in words]) for words in concepts])


def _concepts_per_prompt(prompts: list[str], concepts: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    """One list of concept words per prompt: the same words for all, or one list per prompt, all of one length."""
    if isinstance(concepts, str) or not concepts:
        raise ValueError(f"concepts are a list of words of the prompt, e.g. ['circle', 'square']; got {concepts!r}")
    if all(isinstance(c, str) for c in concepts):
        return [list(concepts)] * len(prompts)
    lists = [list(c) for c in concepts]
    if len(lists) != len(prompts):
        raise ValueError(f"{len(lists)} concept lists for {len(prompts)} prompts; give one list per prompt, or one list for all")
    if len({len(c) for c in lists}) != 1 or not lists[0]:
        raise ValueError(f"every prompt needs the same number of concepts (at least one); got {[len(c) for c in lists]}")
    return lists


def compose(
    pipe: DiffusionPipeline,
    prompt: str | Sequence[str],
    concepts: Sequence[str] | Sequence[Sequence[str]],
    *,
    method: str = "astar",
    settings: GuidanceSettings | None = None,
    layout: Mapping[str, np.ndarray | torch.Tensor] | None = None,
    num_images_per_prompt: int = 1,
    seed: int = 0,
    steps: int = 25,
    guidance: float = 5.0,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    output_type: str = "pil",
    **call_options,
) -> Composition:
    """Generate with attention-loss guidance so that every concept appears, apart from the others.

    prompt: one prompt, or several; concepts: words (or phrases) of every prompt, or one list per
    prompt, all of one length. Image r (prompt r // num_images_per_prompt) starts from the noise of seed + r, and a
    stochastic sampler draws its noise from the same generator, as the pipeline does with
    `generator=`. method picks the loss preset; settings replaces it entirely. layout: {concept:
    2-D mask, any size} pulls that concept's attention into the user's region (the placement
    loss). Any diffusers scheduler works: the update acts on the latents each denoising step
    starts from. Other keyword arguments go to the pipeline call; an IP-Adapter's
    `ip_adapter_image(_embeds)` conditions every image and the guidance passes alike.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("give at least one prompt")
    words = _concepts_per_prompt(prompts, concepts)
    num = num_images_per_prompt
    if num < 1:
        raise ValueError(f"num_images_per_prompt must be at least 1, got {num}")
    check_sampling(pipe, steps, guidance, seed, num)
    if "image" in inspect.signature(pipe.__call__).parameters:
        raise ValueError(f"compose generates from noise, and {type(pipe).__name__} starts from an image; use the model's "
                         "text-to-image pipeline (e.g. StableDiffusionPipeline.from_pipe(pipe))")
    settings = settings or method_settings(method)
    size = image_size(pipe, height, width)
    latent = (size[0] // pipe.vae_scale_factor, size[1] // pipe.vae_scale_factor)
    tokens = [[tuple(pipeline_word_tokens(pipe, p, w)) for w in ws] for p, ws in zip(prompts, words)]
    rows = [p for p in prompts for _ in range(num)]
    row_words = [w for w in words for _ in range(num)]
    row_tokens = [t for t in tokens for _ in range(num)]
    tokenizer = pipeline_tokenizer(pipe)
    limit = tokenizer.model_max_length
    start = len(tokenizer("").input_ids) - 1  # the tokens before the prompt's: CLIP's start-of-text, none on T5
    if settings.text_tokens == "prompt":
        spans = [(start, len(tokenizer(p, truncation=True, max_length=limit).input_ids) - 1) for p in rows]
    else:
        spans = [(start, -1)] * len(rows)
    if settings.blocks is not None:
        check_joint_blocks(pipe, settings.blocks)
    map_side = layout_side(pipe, latent) if settings.resolution is None else nearest_cross_side(pipe, latent, settings.resolution)
    masks = None
    if layout:
        if not settings.guided_steps:
            raise ValueError("these settings guide no step (guided_steps=0, as method 'none' does), so layout masks would do "
                             "nothing; use method astar or attend-excite")
        if not settings.placement:
            raise ValueError("layout masks act through the placement loss; use settings with placement > 0")
        grid = next(g for g in cross_grids(pipe, latent) if max(g) == map_side)
        masks = _layout_masks(layout, row_words, grid)

    images = image_embeds(pipe, call_options.pop("ip_adapter_image", None), call_options.pop("ip_adapter_image_embeds", None))
    text, _ = with_images(*encode_text(pipe, rows, size, negative_prompt), images)
    if images is not None:
        call_options["ip_adapter_image_embeds"] = pipeline_image_embeds(images, len(rows), guidance > 1)
    generators = [torch.Generator(device="cpu").manual_seed(seed + r) for r in range(len(rows))]
    model = denoiser(pipe)
    noise = torch.cat([randn_tensor((1, latent_channels(pipe), *latent), generator=g, dtype=model.dtype) for g in generators])
    noise = noise.to(model.device)
    capture = MapCapture(map_side, settings.blocks)
    calls = Calls.planned(pipe.scheduler, steps)  # the first timestep is the pipeline's; later ones are read from its scheduler
    if not is_flow_matching(pipe.scheduler):
        pipe.scheduler.set_timesteps(steps, device=model.device)  # its levels scale the starting noise and step 0's update
    sigma = getattr(pipe.scheduler, "init_noise_sigma", 1.0)  # a flow starts from plain noise

    def on_step_end(pipeline, call: int, timestep, tensors):
        guide.after_pass(calls.begins(call))
        following = call + 1
        if following == len(calls.steps) or not calls.begins(following):
            return {}
        latents = guide(spatial_latents(pipe, tensors["latents"], latent), calls.steps[following], pipeline.scheduler.timesteps[following])
        return {"latents": pipeline_latents(pipe, latents)}

    with attach(pipe, capture) as state, frozen(model):
        guide = _Guide(pipe, capture, state, settings, text, row_tokens, spans, masks, calls.count, guidance)
        start = pipeline_latents(pipe, guide(noise * sigma, 0, calls.timesteps[0]) / sigma)
        if negative_prompt is not None:  # PixArt's default is "", not None
            call_options["negative_prompt"] = [negative_prompt] * len(rows) if isinstance(negative_prompt, str) else negative_prompt
        result = pipe(rows, num_inference_steps=steps, guidance_scale=guidance, height=size[0], width=size[1], latents=start, generator=generators, output_type=output_type, **with_callback(pipe, call_options, on_step_end, ["latents"]))
    return Composition(list(result.images), rows, row_words, torch.stack(guide.step_maps), guide.losses)
