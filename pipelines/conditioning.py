"""Text conditioning and one UNet call for SD 1.x/2.x and SDXL pipelines, outside their `__call__`.

Inversion and null-text optimisation run their own loops, so they need what the pipelines build
inside `__call__`: the prompt's embeddings and, for SDXL, the pooled embedding and size ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline


@dataclass
class TextConditioning:
    """Per row: token embeddings (B, T, D); SDXL's pooled embedding (B, P) and size ids (B, 6)."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def rows(self, count: int) -> TextConditioning:
        """The first row repeated `count` times."""
        return TextConditioning(*(None if x is None else x[:1].expand(count, *x.shape[1:]) for x in (self.embeds, self.pooled, self.time_ids)))

    def take(self, rows: list[int]) -> TextConditioning:
        """These rows only."""
        return TextConditioning(*(None if x is None else x[rows] for x in (self.embeds, self.pooled, self.time_ids)))

    def with_embeds(self, embeds: torch.Tensor) -> TextConditioning:
        return TextConditioning(embeds, self.pooled, self.time_ids)


def is_sdxl(pipe: DiffusionPipeline) -> bool:
    """SDXL-style UNets take a pooled text embedding and size ids besides the token embeddings."""
    return pipe.unet.config.addition_embed_type == "text_time"


def encode_text(pipe: DiffusionPipeline, prompts: list[str], side: int) -> tuple[TextConditioning, TextConditioning]:
    """(conditional, unconditional) conditioning of `prompts` at an image side of `side` pixels."""
    device = pipe.unet.device
    if not is_sdxl(pipe):
        cond, uncond = pipe.encode_prompt(prompts, device, 1, True)
        return TextConditioning(cond), TextConditioning(uncond)
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True)
    # SDXL's micro-conditioning for an uncropped image at its own size: (original, crop corner, target).
    time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=cond.dtype, device=device).expand(len(prompts), -1)
    return TextConditioning(cond, pooled, time_ids), TextConditioning(uncond, uncond_pooled, time_ids)


def unet_output(pipe: DiffusionPipeline, latents: torch.Tensor, timestep, text: TextConditioning, unet=None) -> torch.Tensor:
    """The raw prediction (epsilon, v or sample, as the scheduler is configured) of the pipeline's UNet, or of
    `unet` (a copy being trained), for these rows."""
    added = None if text.pooled is None else {"text_embeds": text.pooled, "time_ids": text.time_ids}
    return (unet or pipe.unet)(latents, timestep, encoder_hidden_states=text.embeds, added_cond_kwargs=added).sample
