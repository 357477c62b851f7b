"""Generate an image while tracing attention, and write its per-word heat maps."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from diffusers import DiffusionPipeline
from PIL import Image

from pipelines.files import save_png, slug
from pipelines.generate import GenerationSettings, generate
from xattn import heatmap, pipeline_word_tokens, trace


def generate_with_maps(pipe: DiffusionPipeline, settings: GenerationSettings, words: list[str] | None = None) -> tuple[Image.Image, dict[str, np.ndarray]]:
    """One image and a [0, 1] map at image size for each named word (all words when None).

    Words are checked against the prompt before anything is generated.
    """
    for word in words or []:
        pipeline_word_tokens(pipe, settings.prompt, word)
    with trace(pipe) as tc:
        (image,) = generate(pipe, settings)
    return image, tc.word_maps(words)


def write_maps(out: Path, image: Image.Image, maps: dict[str, np.ndarray], metadata: dict[str, str]) -> list[Path]:
    """image.png, one overlay per word (NN-word.png), grid.png and maps.npz (word -> float32 array). Overlays an earlier
    run left in `out` (NN-*.png of other words) are removed, so the folder shows this run's words only."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [save_png(image, out / "image.png", metadata)]
    overlays = []
    for i, (word, heat) in enumerate(maps.items()):
        overlays.append(heatmap.overlay(image, heat))
        paths.append(save_png(overlays[-1], out / f"{i:02d}-{slug(word)}.png", metadata | {"word": word}))
    scale = max(1, 128 // image.size[0])
    sheet = heatmap.grid([image, *overlays], ["image", *maps], columns=6, scale=scale)
    sheet = heatmap.with_colour_scale(sheet, "min", "max", "each word")
    paths.append(save_png(sheet, out / "grid.png", metadata))
    tmp = out / ".maps.npz.tmp"
    with open(tmp, "wb") as handle:
        np.savez(handle, **{word: heat.astype(np.float32) for word, heat in maps.items()})
    os.replace(tmp, out / "maps.npz")
    for stale in set(out.glob("[0-9][0-9]-*.png")) - set(paths):
        stale.unlink()
    return [*paths, out / "maps.npz"]
