"""Where an attention call happens: the layer, its query resolution and the denoising step; and the batch layout.

The step and the latent size come from the denoiser's call itself (a forward pre-hook sees the latents
and the timestep), never from counting attention calls, so extra denoiser calls (guidance losses,
split classifier-free guidance) or skipped layers cannot desynchronise them. What each family of
denoiser says about its layers and calls is in `xattn.families`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layer:
    """An attention layer: its name (without `.processor`), kind (self, cross, or joint: one softmax over image and text
    tokens), place (a UNet's down/mid/up; a transformer's "transformer" or Flux's "single" blocks), the block's index
    there, and for joint attention its stream: "double" (text and image each in their own stream) or "single"."""

    name: str
    kind: str
    place: str
    block: int = 0
    stream: str | None = None


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
    """One attention call: the layer, its query grid, the denoising step and the softmax scale; in joint attention,
    where the image and the text tokens lie in its sequence (of queries and of keys alike)."""

    layer: Layer
    resolution: tuple[int, int]
    step: int
    scale: float
    image: slice | None = None
    text: slice | None = None

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def kind(self) -> str:
        return self.layer.kind

    @property
    def place(self) -> str:
        return self.layer.place

    @property
    def block(self) -> int:
        return self.layer.block

    @property
    def stream(self) -> str | None:
        return self.layer.stream
