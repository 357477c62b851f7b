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


def denoising_steps(timesteps) -> list[int]:
    """The denoising step of each UNet call of a sampling loop: a step begins where the timestep changes.

    Schedulers that call the UNet twice at one timestep (Heun; PNDM's first step) evaluate a point
    predicted by the step before and then start the next step from there; both calls are one step,
    as `CallState` counts them, so a run has as many steps as noise levels.
    """
    values = [float(t) for t in timesteps]
    steps = [0] * len(values)
    for call in range(1, len(values)):
        steps[call] = steps[call - 1] + (values[call] != values[call - 1])
    return steps


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


def _down_levels(unet, latent: tuple[int, int]) -> list[tuple[str, tuple[int, int]]]:
    """Each down block's type and query grid at this latent size (a stride-2 convolution between levels rounds up)."""
    levels, grid = [], tuple(latent)
    for block in unet.config.down_block_types:
        levels.append((block, grid))
        grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
    return levels


def cross_grids(unet, latent: tuple[int, int]) -> list[tuple[int, int]]:
    """The (h, w) query grids of the UNet's cross-attention layers at this latent size, smallest first."""
    levels = _down_levels(unet, latent)
    grids = {grid for block, grid in levels if "CrossAttn" in block}
    if "CrossAttn" in (unet.config.mid_block_type or ""):
        grids.add(levels[-1][1])  # the mid block works at the last level's grid
    return sorted(grids)


def cross_resolutions(unet, latent: tuple[int, int]) -> list[int]:
    """Sides (the longer one) of the query grids of the UNet's cross-attention layers at this latent size."""
    return sorted({max(grid) for grid in cross_grids(unet, latent)})


def layout_side(unet, latent: tuple[int, int]) -> int:
    """The cross-attention side of the UNet's deepest level outside the mid block: where the papers read
    their 16x16 maps on SD 1.x at 512 px (64, 32, 16, then the 8x8 mid block). It follows the UNet
    and the image: 24 for SD 2.x at 768 px, 32 for SDXL at 1024 px, 8 for the embedded model at
    64 px. A UNet with cross-attention only in its mid block has that side."""
    sides = [max(grid) for block, grid in _down_levels(unet, latent) if "CrossAttn" in block]
    return min(sides) if sides else min(cross_resolutions(unet, latent))


def nearest_cross_side(unet, latent: tuple[int, int], wanted: int) -> int:
    """The cross-attention side nearest `wanted` (ties to the larger): 16 is the papers' at 512 px, and other
    sizes and UNets have their own sides."""
    return min(cross_resolutions(unet, latent), key=lambda s: (abs(s - wanted), -s))


@dataclass(frozen=True)
class BatchLayout:
    """Rows of a UNet batch: [uncond p0..pB-1, cond p0..pB-1] with guidance, [cond ...] without.

    Each prompt's images are consecutive rows (diffusers repeats each prompt num_images_per_prompt times).
    A prompt is None where the pipeline was given embeddings instead of text.
    """

    prompts: tuple[str | None, ...]
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

    def prompt_of_row(self, row: int) -> str | None:
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
