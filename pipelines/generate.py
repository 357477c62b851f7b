"""Plain generation with reproducible seeds, saved as PNGs that carry their own settings."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from pipelines.files import save_png, slug
from pipelines.limits import LARGEST_SIDE, MAX_GUIDANCE, MAX_NUM, MAX_SEED
from xattn.families import native_side, side_multiple


@dataclass(frozen=True)
class GenerationSettings:
    prompt: str
    seed: int = 0
    steps: int = 25
    guidance: float = 5.0
    size: int | None = None

    def metadata(self, model: str, seed: int | None = None) -> dict[str, str]:
        """What a saved image records about how it was made (seed: the image's own, if not the first)."""
        seed = self.seed if seed is None else seed
        return {"prompt": self.prompt, "seed": seed, "steps": self.steps, "guidance": self.guidance, "model": model}


def _check_side(pipe: DiffusionPipeline, value: int | None, option: str) -> int:
    native = native_side(pipe)
    if value is None:
        return native
    multiple, largest = side_multiple(pipe), LARGEST_SIDE * native
    if value > largest:
        raise ValueError(f"{option} {value} is larger than this model draws: at most {largest} ({LARGEST_SIDE}x its native {native})")
    if value <= 0 or value % multiple:
        lower = max(multiple, value // multiple * multiple)
        raise ValueError(f"{option} {value} does not fit this model: use a multiple of {multiple} (e.g. {lower} or {lower + multiple}); its native size is {native}")
    return value


def check_sampling(pipe: DiffusionPipeline, steps: int, guidance: float, seed: int, num: int = 1) -> None:
    """Steps, guidance, seed and image count the pipeline can run; a ValueError naming the option otherwise, never a
    traceback or an image of noise."""
    limit = pipe.scheduler.config.num_train_timesteps
    if not 1 <= steps <= limit:
        raise ValueError(f"--steps must be between 1 and {limit} (the scheduler's training steps); got {steps}")
    if not (math.isfinite(guidance) and abs(guidance) <= MAX_GUIDANCE):
        raise ValueError(f"--guidance must be a number between -{MAX_GUIDANCE:g} and {MAX_GUIDANCE:g} (1 turns guidance off); got {guidance}")
    if not 1 <= num <= MAX_NUM:
        raise ValueError(f"--num must be between 1 and {MAX_NUM}; got {num}")
    if not 0 <= seed <= MAX_SEED - (num - 1):
        raise ValueError(f"--seed must be between 0 and {MAX_SEED - (num - 1)} (image i uses seed + i); got {seed}")


def finite_images(images) -> list[Image.Image]:
    """PIL images from a pipeline's float output (`output_type="np"`), refusing non-finite pixels rather than saving them
    as black."""
    array = np.asarray(images)
    if not np.isfinite(array).all():
        raise ValueError("the model produced non-finite pixels (NaN or inf); nothing was saved. In float16 try float32, "
                         "or a lower --guidance")
    return DiffusionPipeline.numpy_to_pil(array)


def check_size(pipe: DiffusionPipeline, size: int | None) -> int:
    """The image side to use (the model's own when None); a wrong size is a ValueError naming the nearest good ones."""
    return _check_side(pipe, size, "--size")


def image_size(pipe: DiffusionPipeline, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """(height, width) to use, each the model's own when None; a side that does not fit is a ValueError naming good ones."""
    return _check_side(pipe, height, "height"), _check_side(pipe, width, "width")


def generate(pipe: DiffusionPipeline, settings: GenerationSettings, num: int = 1) -> list[Image.Image]:
    """`num` images; image i uses seed `settings.seed + i`, so each is reproducible on its own."""
    check_sampling(pipe, settings.steps, settings.guidance, settings.seed, num)
    size = check_size(pipe, settings.size)
    generators = [torch.Generator(device="cpu").manual_seed(settings.seed + i) for i in range(num)]
    return finite_images(pipe(
        [settings.prompt] * num,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance,
        height=size,
        width=size,
        generator=generators,
        output_type="np",
    ).images)


def generate_to_files(pipe: DiffusionPipeline, settings: GenerationSettings, out: Path, model: str, num: int = 1) -> list[Path]:
    """Generate and save; file names are the prompt's slug and the image's seed."""
    paths = []
    for i, image in enumerate(generate(pipe, settings, num)):
        seed = settings.seed + i
        paths.append(save_png(image, out / f"{slug(settings.prompt)}-seed{seed}.png", settings.metadata(model, seed)))
    return paths
