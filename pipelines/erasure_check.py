"""How an erasure did on the embedded model, read by the shapes judge: how often the erased model still draws the
concept for prompts that name it, and how often it draws the world's other prompts exactly."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline

from shapes import erasure_prompts, match_caption, read_objects


@dataclass(frozen=True)
class Judged:
    """Images drawn per prompt, those showing the concept, and those the judge reads as their prompt exactly."""

    prompts: list[str]
    shows: list[bool]
    exact: list[bool]

    def count(self, flags: list[bool]) -> str:
        return f"{sum(flags)}/{len(flags)}"


def shows(pixels: np.ndarray, concept: str) -> bool:
    """Whether the judge reads an object with every word of `concept` (a colour, a shape or both) in the image."""
    words = set(concept.split())
    return any(words <= {o.colour, o.shape} for o in read_objects(pixels))


def judge_prompts(pipe: DiffusionPipeline, concept: str, prompts: list[str], first_seed: int = 0, batch: int = 50,
                  steps: int = 25, guidance: float = 5.0) -> Judged:
    """Draw each prompt once (seeds first_seed, first_seed + 1, ...) and judge it."""
    seen, exact = [], []
    for begin in range(0, len(prompts), batch):
        chunk = prompts[begin : begin + batch]
        generators = [torch.Generator().manual_seed(first_seed + begin + i) for i in range(len(chunk))]
        images = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators, output_type="np").images
        for prompt, image in zip(chunk, images):
            pixels = np.rint(image * 255)
            seen.append(shows(pixels, concept))
            exact.append(match_caption(pixels, prompt).exact)
    return Judged(prompts, seen, exact)


def erasure_report(pipe: DiffusionPipeline, concept: str, images: int = 6) -> str:
    """A few lines on an erased embedded model: the concept in `images` images of prompts naming it (cycling over the
    world's captions of it), and `images` images each of three other one-object captions."""
    named, kept = erasure_prompts(concept)
    others = [kept[i * len(kept) // 3] for i in range(3)] if len(kept) >= 3 else list(kept)
    erased = judge_prompts(pipe, concept, [named[i % len(named)] for i in range(images)])
    lines = [f"{concept!r} still drawn in {erased.count(erased.shows)} images of {', '.join(map(repr, dict.fromkeys(erased.prompts)))}"]
    for prompt in others:
        result = judge_prompts(pipe, concept, [prompt] * images)
        lines.append(f"{prompt!r} drawn exactly in {result.count(result.exact)}")
    return "\n".join(lines)
