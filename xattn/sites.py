"""Where an attention call happens: the layer, its query resolution and the denoising step; and the batch layout.

The step and the latent size come from the UNet call itself (a forward pre-hook sees the latents
and the timestep), never from counting attention calls, so extra UNet calls (guidance losses,
split classifier-free guidance) or skipped layers cannot desynchronise them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layer:
    """A UNet attention layer: its name (without `.processor`), self or cross, and place (down/mid/up)."""

    name: str
    kind: str
    place: str


def layer_of(processor_key: str) -> Layer:
    """The Layer for a key of `unet.attn_processors`, e.g. `down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor`."""
    name = processor_key.removesuffix(".processor")
    kind = "cross" if name.endswith("attn2") else "self"
    place = "mid" if name.startswith("mid_block") else "down" if name.startswith("down_blocks") else "up"
    return Layer(name, kind, place)


def query_resolution(latent: tuple[int, int], queries: int) -> tuple[int, int]:
    """The (h, w) grid of `queries` tokens in a UNet whose input latent is `latent`.

    Each UNet level halves the grid with a stride-2 convolution (rounding up), so the grid is the
    first level whose size matches the number of queries.
    """
    h, w = latent
    while h * w > queries and (h > 1 or w > 1):
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != queries:
        raise ValueError(f"{queries} attention queries match no level of a UNet with a {latent[0]}x{latent[1]} latent")
    return h, w


def cross_resolutions(unet, latent: tuple[int, int]) -> list[int]:
    """Sides of the query grids of the UNet's cross-attention layers at this latent size."""
    sides, side = set(), max(latent)
    for i, block in enumerate(unet.config.down_block_types):
        if "CrossAttn" in block:
            sides.add(side)
        if i < len(unet.config.down_block_types) - 1:
            side = (side + 1) // 2
    if "CrossAttn" in (unet.config.mid_block_type or ""):
        sides.add(side)
    return sorted(sides)


def nearest_cross_side(unet, latent: tuple[int, int], wanted: int) -> int:
    """The cross-attention side nearest `wanted` (ties to the larger): 16 is the papers' at 512 px, and other
    sizes and UNets have their own sides."""
    return min(cross_resolutions(unet, latent), key=lambda s: (abs(s - wanted), -s))


@dataclass(frozen=True)
class BatchLayout:
    """Rows of a UNet batch: [uncond p0..pB-1, cond p0..pB-1] with guidance, [cond ...] without.

    Each prompt's images are consecutive rows (diffusers repeats each prompt num_images_per_prompt times).
    """

    prompts: tuple[str, ...]
    images_per_prompt: int = 1
    guidance: bool = True

    @property
    def conditional_rows(self) -> int:
        return len(self.prompts) * self.images_per_prompt

    def cond(self, rows: int) -> slice:
        """The conditional rows of a batch of `rows`: the last half with guidance, else all.

        A guided pipeline that runs the conditional rows alone (rows == prompts x images) has all
        rows conditional; its unconditional-only call cannot be told apart and counts as one too.
        """
        if self.guidance and rows != self.conditional_rows:
            return slice(rows // 2, rows)
        return slice(0, rows)

    def prompt_of_row(self, row: int) -> str:
        return self.prompts[row // self.images_per_prompt]


@dataclass(frozen=True)
class Site:
    """One attention call: the layer, its query grid, the denoising step and the softmax scale."""

    layer: Layer
    resolution: tuple[int, int]
    step: int
    scale: float

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def kind(self) -> str:
        return self.layer.kind

    @property
    def place(self) -> str:
        return self.layer.place
