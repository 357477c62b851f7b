"""Text (and IP-Adapter image) conditioning and one UNet call for SD 1.x/2.x and SDXL pipelines, outside their `__call__`.

Inversion, guidance and unlearning run their own UNet calls, so they need what the pipelines build
inside `__call__`: the prompt's embeddings; for SDXL the pooled embedding and the size ids (with
the aesthetic score where the pipeline takes one, as SDXL's refiner does); and an IP-Adapter's
image embeddings when one is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline

from xattn.denoiser import has_ip_adapter

# diffusers' SDXL img2img and inpaint pipelines' defaults for the refiner's aesthetic-score ids.
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5


@dataclass
class TextConditioning:
    """Per row: token embeddings (B, T, D); SDXL's pooled embedding (B, P) and size ids (B, 5 or 6);
    an IP-Adapter's image embeddings, one (B, images, E) tensor per loaded adapter."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    image_embeds: tuple[torch.Tensor, ...] | None = None

    def _map(self, fn) -> TextConditioning:
        images = None if self.image_embeds is None else tuple(fn(x) for x in self.image_embeds)
        return TextConditioning(*(None if x is None else fn(x) for x in (self.embeds, self.pooled, self.time_ids)), images)

    def rows(self, count: int) -> TextConditioning:
        """The first row repeated `count` times."""
        return self._map(lambda x: x[:1].expand(count, *x.shape[1:]))

    def take(self, rows: list[int]) -> TextConditioning:
        """These rows only."""
        return self._map(lambda x: x[rows])

    def with_embeds(self, embeds: torch.Tensor) -> TextConditioning:
        return TextConditioning(embeds, self.pooled, self.time_ids, self.image_embeds)

    def to(self, dtype: torch.dtype) -> TextConditioning:
        return self._map(lambda x: x.to(dtype))

    @staticmethod
    def stack(first: TextConditioning, second: TextConditioning) -> TextConditioning:
        """The rows of `first`, then those of `second` (a guided call's [unconditional, conditional] batch)."""
        images = None if first.image_embeds is None else tuple(torch.cat(pair) for pair in zip(first.image_embeds, second.image_embeds))
        parts = [None if a is None else torch.cat([a, b]) for a, b in zip((first.embeds, first.pooled, first.time_ids),
                                                                          (second.embeds, second.pooled, second.time_ids))]
        return TextConditioning(*parts, images)


def is_sdxl(pipe: DiffusionPipeline) -> bool:
    """SDXL-style UNets take a pooled text embedding and size ids besides the token embeddings."""
    return pipe.unet.config.addition_embed_type == "text_time"


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
    device = pipe.unet.device
    if isinstance(negative_prompt, str):
        negative_prompt = [negative_prompt] * len(prompts)
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
    both = pipe.prepare_ip_adapter_image_embeds(image, embeds, pipe.unet.device, 1, True)
    halves = [e.chunk(2) for e in both]
    return tuple(h[0] for h in halves), tuple(h[1] for h in halves)


def with_images(cond: TextConditioning, uncond: TextConditioning, images) -> tuple[TextConditioning, TextConditioning]:
    """Both conditionings with one row's IP-Adapter embeddings (from `image_embeds`) on each of their rows."""
    if images is None:
        return cond, uncond
    negative, positive = images
    count = cond.embeds.shape[0]
    cond = TextConditioning(cond.embeds, cond.pooled, cond.time_ids, tuple(p.expand(count, *p.shape[1:]) for p in positive))
    uncond = TextConditioning(uncond.embeds, uncond.pooled, uncond.time_ids, tuple(n.expand(count, *n.shape[1:]) for n in negative))
    return cond, uncond


def pipeline_image_embeds(images, rows: int, guidance: bool) -> list[torch.Tensor]:
    """`ip_adapter_image_embeds` for a pipeline call of `rows` prompts that all use one row's images:
    diffusers repeats the embeddings it is given per image, not per prompt."""
    negative, positive = images
    return [torch.cat([n.expand(rows, *n.shape[1:]), p.expand(rows, *p.shape[1:])]) if guidance else p.expand(rows, *p.shape[1:])
            for n, p in zip(negative, positive)]


def unet_output(pipe: DiffusionPipeline, latents: torch.Tensor, timestep, text: TextConditioning, unet=None) -> torch.Tensor:
    """The raw prediction (epsilon, v or sample, as the scheduler is configured) of the pipeline's UNet, or of
    `unet` (a copy being trained), for these rows."""
    added = {} if text.pooled is None else {"text_embeds": text.pooled, "time_ids": text.time_ids}
    if text.image_embeds is not None:
        added["image_embeds"] = list(text.image_embeds)
    return (unet or pipe.unet)(latents, timestep, encoder_hidden_states=text.embeds, added_cond_kwargs=added or None).sample
