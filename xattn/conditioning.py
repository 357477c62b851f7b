"""Text (and IP-Adapter image) conditioning and one denoiser call, outside a pipeline's `__call__`.

Inversion, guidance and unlearning run their own denoiser calls, so they need what the pipelines
build inside `__call__`: the prompt's embeddings; for SDXL the pooled embedding and the size ids
(with the aesthetic score where the pipeline takes one, as SDXL's refiner does); for SD3 and Flux
the pooled embedding, and for Flux the token ids and the distilled guidance; and an IP-Adapter's
image embeddings when one is loaded. Latents are spatial, (B, C, h, w), on every family: a Flux
call packs them into tokens and unpacks its prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline

from xattn.denoiser import called_denoiser, denoiser, has_ip_adapter
from xattn.families import family_of, pipeline_latents, spatial_latents

# diffusers' SDXL img2img and inpaint pipelines' defaults for the refiner's aesthetic-score ids.
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5


@dataclass
class TextConditioning:
    """Per row: token embeddings (B, T, D); SDXL's, SD3's and Flux's pooled embedding (B, P) and SDXL's size ids
    (B, 5 or 6); an IP-Adapter's image embeddings, one (B, images, E) tensor per loaded adapter; PixArt's mask of the
    tokens that count (B, T)."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    image_embeds: tuple[torch.Tensor, ...] | None = None
    mask: torch.Tensor | None = None

    def _map(self, fn) -> TextConditioning:
        images = None if self.image_embeds is None else tuple(fn(x) for x in self.image_embeds)
        embeds, pooled, time_ids, mask = (None if x is None else fn(x) for x in (self.embeds, self.pooled, self.time_ids, self.mask))
        return TextConditioning(embeds, pooled, time_ids, images, mask)

    def rows(self, count: int) -> TextConditioning:
        """The first row repeated `count` times."""
        return self._map(lambda x: x[:1].expand(count, *x.shape[1:]))

    def take(self, rows: list[int]) -> TextConditioning:
        """These rows only."""
        return self._map(lambda x: x[rows])

    def with_embeds(self, embeds: torch.Tensor) -> TextConditioning:
        return TextConditioning(embeds, self.pooled, self.time_ids, self.image_embeds, self.mask)

    def to(self, dtype: torch.dtype) -> TextConditioning:
        """Floating-point tensors in `dtype` (a mask keeps its own)."""
        return self._map(lambda x: x.to(dtype) if x.is_floating_point() else x)

    @staticmethod
    def stack(first: TextConditioning, second: TextConditioning) -> TextConditioning:
        """The rows of `first`, then those of `second` (a guided call's [unconditional, conditional] batch)."""
        images = None if first.image_embeds is None else tuple(torch.cat(pair) for pair in zip(first.image_embeds, second.image_embeds))
        parts = [None if a is None else torch.cat([a, b]) for a, b in zip((first.embeds, first.pooled, first.time_ids, first.mask),
                                                                          (second.embeds, second.pooled, second.time_ids, second.mask))]
        return TextConditioning(*parts[:3], images, parts[3])


def is_sdxl(pipe: DiffusionPipeline) -> bool:
    """SDXL-style UNets take a pooled text embedding and size ids besides the token embeddings."""
    return getattr(denoiser(pipe).config, "addition_embed_type", None) == "text_time"


def distilled_guidance(pipe: DiffusionPipeline) -> bool:
    """Whether the denoiser takes the guidance scale as an input (guidance-distilled Flux-dev) rather than being
    guided classifier-free."""
    return bool(getattr(denoiser(pipe).config, "guidance_embeds", False))


def _family(pipe: DiffusionPipeline) -> str:
    """Which denoiser call this module makes: "unet", "dit" (PixArt), "sd3" or "flux"."""
    return family_of(pipe).__name__.lower()


def _time_ids(pipe: DiffusionPipeline, size: tuple[int, int], negative: bool) -> list[float]:
    """SDXL's micro-conditioning for an uncropped image at its own size: (original, crop corner, target),
    or (original, crop corner, aesthetic score) for pipelines that take one (the refiner)."""
    if getattr(pipe.config, "requires_aesthetics_score", False):
        return [*size, 0, 0, NEGATIVE_AESTHETIC_SCORE if negative else AESTHETIC_SCORE]
    return [*size, 0, 0, *size]


def encode_text(
    pipe: DiffusionPipeline, prompts: list[str], size: tuple[int, int], negative_prompt: str | list[str] | None = None
) -> tuple[TextConditioning, TextConditioning]:
    """(conditional, unconditional) conditioning of `prompts` for (height, width) images; one negative prompt serves all."""
    device = denoiser(pipe).device
    if isinstance(negative_prompt, str):
        negative_prompt = [negative_prompt] * len(prompts)
    family = _family(pipe)
    if family == "dit":
        cond, mask, uncond, uncond_mask = pipe.encode_prompt(prompts, True, negative_prompt=negative_prompt or "", device=device)
        return TextConditioning(cond, mask=mask), TextConditioning(uncond, mask=uncond_mask)
    if family == "sd3":
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(prompts, None, None, device=device, negative_prompt=negative_prompt)
        return TextConditioning(cond, pooled), TextConditioning(uncond, uncond_pooled)
    if family == "flux":
        (cond, pooled, _), (uncond, uncond_pooled, _) = (pipe.encode_prompt(p, None, device=device)
                                                         for p in (prompts, negative_prompt or [""] * len(prompts)))
        return TextConditioning(cond, pooled), TextConditioning(uncond, uncond_pooled)
    if not is_sdxl(pipe):
        cond, uncond = pipe.encode_prompt(prompts, device, 1, True, negative_prompt=negative_prompt)
        return TextConditioning(cond), TextConditioning(uncond)
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                             do_classifier_free_guidance=True, negative_prompt=negative_prompt)

    def ids(negative: bool) -> torch.Tensor:
        return torch.tensor([_time_ids(pipe, size, negative)], dtype=cond.dtype, device=device).expand(len(prompts), -1)

    return TextConditioning(cond, pooled, ids(False)), TextConditioning(uncond, uncond_pooled, ids(True))


def image_embeds(pipe: DiffusionPipeline, image=None, embeds=None) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None:
    """(negative, positive) IP-Adapter embeddings for one row, one tensor per adapter; None when no adapter is loaded.

    image / embeds: the pipeline's `ip_adapter_image` / `ip_adapter_image_embeds` (embeds with their
    negative half first, as diffusers takes them under classifier-free guidance).
    """
    if not has_ip_adapter(pipe):
        if image is not None or embeds is not None:
            raise ValueError("ip_adapter_image(_embeds) given, but this pipeline has no IP-Adapter loaded: pipe.load_ip_adapter(...) first")
        return None
    if image is None and embeds is None:
        raise ValueError("this pipeline has an IP-Adapter loaded: pass ip_adapter_image or ip_adapter_image_embeds "
                         "(or pipe.unload_ip_adapter())")
    both = pipe.prepare_ip_adapter_image_embeds(image, embeds, denoiser(pipe).device, 1, True)
    halves = [e.chunk(2) for e in both]
    return tuple(h[0] for h in halves), tuple(h[1] for h in halves)


def with_images(cond: TextConditioning, uncond: TextConditioning, images) -> tuple[TextConditioning, TextConditioning]:
    """Both conditionings with one row's IP-Adapter embeddings (from `image_embeds`) on each of their rows."""
    if images is None:
        return cond, uncond
    negative, positive = images
    count = cond.embeds.shape[0]
    cond = TextConditioning(cond.embeds, cond.pooled, cond.time_ids, tuple(p.expand(count, *p.shape[1:]) for p in positive), cond.mask)
    uncond = TextConditioning(uncond.embeds, uncond.pooled, uncond.time_ids, tuple(n.expand(count, *n.shape[1:]) for n in negative),
                              uncond.mask)
    return cond, uncond


def pipeline_image_embeds(images, rows: int, guidance: bool) -> list[torch.Tensor]:
    """`ip_adapter_image_embeds` for a pipeline call of `rows` prompts that all use one row's images:
    diffusers repeats the embeddings it is given per image, not per prompt."""
    negative, positive = images
    return [torch.cat([n.expand(rows, *n.shape[1:]), p.expand(rows, *p.shape[1:])]) if guidance else p.expand(rows, *p.shape[1:])
            for n, p in zip(negative, positive)]


def text_context(pipe: DiffusionPipeline, embeds: torch.Tensor) -> torch.Tensor:
    """What the denoiser's cross-attention keys and values are computed from, for these text embeddings: the
    embeddings themselves in a UNet, their caption projection in PixArt's DiT. MM-DiT joint attention has none such:
    its text stream changes from block to block."""
    model = denoiser(pipe)
    if family_of(pipe).joint:
        raise ValueError(f"{type(model).__name__} attends jointly over text and image tokens, whose text stream changes from "
                         "block to block: it has no fixed cross-attention input (this works on UNets and PixArt)")
    projection = getattr(model, "caption_projection", None)
    return embeds if projection is None else projection(embeds)


def denoiser_output(pipe: DiffusionPipeline, latents: torch.Tensor, timestep, text: TextConditioning, unet=None,
                    guidance: float = 1.0) -> torch.Tensor:
    """The raw prediction (epsilon, v, sample or a flow's velocity, as the scheduler is configured) of the pipeline's
    denoiser, or of `unet` (a copy being trained), for these rows of spatial latents at a scheduler timestep.
    guidance: the scale a guidance-distilled denoiser (Flux-dev) takes as an input; other denoisers are guided
    classifier-free by their caller, and take none."""
    model = unet or called_denoiser(pipe)
    family = _family(pipe)
    rows = latents.shape[0]
    if family == "sd3":
        t = torch.as_tensor(timestep, device=latents.device).expand(rows)
        return model(hidden_states=latents, timestep=t, encoder_hidden_states=text.embeds, pooled_projections=text.pooled).sample
    if family == "dit":
        t = torch.as_tensor(timestep, device=latents.device).expand(rows)
        added = {"resolution": None, "aspect_ratio": None}
        if model.config.sample_size == 128:  # PixArt-alpha 1024's micro-conditions, as its pipeline builds them
            h, w = (side * pipe.vae_scale_factor for side in latents.shape[-2:])
            added = {"resolution": torch.tensor([[h, w]] * rows).to(latents), "aspect_ratio": torch.tensor([[h / w]] * rows).to(latents)}
        out = model(latents, encoder_hidden_states=text.embeds, encoder_attention_mask=text.mask, timestep=t, added_cond_kwargs=added).sample
        return out.chunk(2, dim=1)[0] if out.shape[1] == 2 * latents.shape[1] else out  # a learnt variance's half dropped
    if family == "flux":
        h, w = latents.shape[-2:]
        t = torch.as_tensor(timestep, device=latents.device, dtype=latents.dtype).expand(rows) / 1000
        scale = torch.full((rows,), guidance, device=latents.device, dtype=torch.float32) if distilled_guidance(pipe) else None
        out = model(hidden_states=pipeline_latents(pipe, latents), timestep=t, guidance=scale, pooled_projections=text.pooled,
                    encoder_hidden_states=text.embeds, txt_ids=torch.zeros(text.embeds.shape[1], 3).to(latents),
                    img_ids=pipe._prepare_latent_image_ids(rows, h // 2, w // 2, latents.device, latents.dtype)).sample
        return spatial_latents(pipe, out, (h, w))
    added = {} if text.pooled is None else {"text_embeds": text.pooled, "time_ids": text.time_ids}
    if text.image_embeds is not None:
        added["image_embeds"] = list(text.image_embeds)
    return model(latents, timestep, encoder_hidden_states=text.embeds, added_cond_kwargs=added or None).sample
