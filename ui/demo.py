"""`xattn demo`: the main job on the embedded model, written as PNGs and an index page.

Each capability adds a section: plain generation (each image with the judge's reading),
per-word attention maps, Prompt-to-Prompt edits, editing a real image through inversion,
composition with attention-loss guidance, concept unlearning.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from editors import Swap, auto_edit
from pipelines.edit import describe, prompt_to_prompt
from pipelines.erasure import apply_erasure
from pipelines.generate import GenerationSettings, generate_to_files, save_png, slug
from pipelines.guidance import compose
from pipelines.images import psnr
from pipelines.inversion import invert
from pipelines.loading import load_pipeline
from pipelines.maps import generate_with_maps, write_maps
from pipelines.unlearn import UnlearnSettings, unlearn
from shapes import match_caption
from shapes.scenes import caption_of, make_scene, swap_first_shape
from xattn.heatmap import grid, overlay
from xattn.tokens import pipeline_tokenizer

DEMO_PROMPTS = (
    "a red circle and a blue square",
    "a green triangle on the left",
    "a yellow square above a purple circle",
    "a blue circle, a red triangle and a green square",
)


@dataclass
class Entry:
    title: str
    image: Path
    note: str


def judged(image, prompt: str) -> str:
    """The judge's reading of an image against its prompt, for a caption."""
    verdict = match_caption(np.asarray(image.convert("RGB")), prompt)
    found = ", ".join(f"{o.colour} {o.shape or 'blob'}" for o in verdict.found) or "nothing"
    return f"judge: {'match' if verdict.ok else 'no match'} (found {found})"


def generation_section(pipe, out: Path, seed: int) -> list[Entry]:
    entries = []
    for prompt in DEMO_PROMPTS:
        settings = GenerationSettings(prompt, seed=seed)
        (path,) = generate_to_files(pipe, settings, out, model="embedded")
        entries.append(Entry(prompt, path, judged(Image.open(path), prompt)))
    return entries


def maps_section(pipe, out: Path, seed: int) -> list[Entry]:
    settings = GenerationSettings(DEMO_PROMPTS[0], seed=seed)
    image, maps = generate_with_maps(pipe, settings)
    paths = write_maps(out, image, maps, settings.metadata("embedded"))
    grid = next(p for p in paths if p.name == "grid.png")
    return [Entry(settings.prompt, grid, "cross-attention of each word, mean over layers, heads and steps")]


DEMO_EDITS = (
    ("a red circle", "a red square"),
    ("a green triangle", "a blue triangle"),
    ("a yellow circle", "a yellow circle and a purple square"),
)


def edit_section(pipe, out: Path, seed: int) -> list[Entry]:
    entries = []
    for source, target in DEMO_EDITS:
        edit = auto_edit(pipeline_tokenizer(pipe), source, target)
        result = prompt_to_prompt(pipe, [source, target], edit, seed=seed)
        sheet = grid(result.images, ["source", "target"], columns=2, scale=2)
        path = save_png(sheet, out / f"{slug(target)}.png", {"source": source, "target": target, "edit": describe(edit), "seed": seed})
        verdict = match_caption(np.asarray(result.images[1].convert("RGB")), target)
        entries.append(Entry(f"{source} -> {target}", path, f"{describe(edit)}; judge on the edit: {'match' if verdict.ok else 'no match'}"))
    return entries


COMPOSITION = ("a blue circle, a red triangle and a green square", ["circle", "triangle", "square"])


def composition_section(pipe, out: Path, seed: int) -> list[Entry]:
    """One three-object prompt (where the unguided model fails most) from the same noise, per method."""
    prompt, concepts = COMPOSITION
    entries = []
    for method in ("none", "attend-excite", "astar"):
        result = compose(pipe, prompt, concepts, method=method, seed=seed)
        image = result.images[0]
        maps = result.maps(0, size=image.size[::-1])
        sheet = grid([image, *(overlay(image, m) for m in maps.values())], [method, *maps], columns=4, scale=2)
        path = save_png(sheet, out / f"{method}.png", {"prompt": prompt, "concepts": ",".join(concepts), "method": method, "seed": seed})
        entries.append(Entry(f"{method}: {prompt}", path, f"{judged(image, prompt)}; maps of each concept"))
    return entries


REAL_IMAGE_SEED = 7_000_002  # a rendered scene the model never trained on: "a blue circle above a yellow circle"


def real_image_section(pipe, out: Path) -> list[Entry]:
    """A rendered scene treated as a photo: inverted (direct), redrawn, and its first shape swapped."""
    scene = make_scene(REAL_IMAGE_SEED)
    target = caption_of(swap_first_shape(scene.layout))
    inversion = invert(pipe, scene.image, scene.caption, cache_dir=None)
    source, edited = prompt_to_prompt(pipe, [scene.caption, target], Swap(), inversion=inversion).images
    sheet = grid([inversion.image, source, edited], ["input", "redrawn", "edited"], columns=3, scale=2)
    path = save_png(sheet, out / f"{slug(target)}.png", {"caption": scene.caption, "target": target, "inversion": inversion.method})
    verdict = match_caption(np.asarray(edited.convert("RGB")), target)
    note = (f"inverted with {inversion.method}, redrawn at {psnr(source, inversion.image):.1f} dB; "
            f"judge on the edit: {'match' if verdict.ok else 'no match'}")
    return [Entry(f"{scene.caption} -> {target}", path, note)]


ERASE = UnlearnSettings(
    method="uce", concept="circle", guide="square",
    contexts=("a circle", "a red circle", "a yellow circle", "a green circle", "a blue circle", "a purple circle"),
    preserve=("a square", "a triangle", "a red square", "a blue triangle", "a green square", "a yellow triangle", "a purple square"),
)


def unlearning_section(pipe, out: Path, seed: int) -> list[Entry]:
    """UCE erases "circle" (towards "square") in closed form; the same seeds before and after, one named prompt and
    one other, and the weights put back afterwards."""
    prompts = ["a red circle", "a blue triangle"]
    before = [generate_to_files(pipe, GenerationSettings(p, seed=seed), out / "before", model="embedded")[0] for p in prompts]
    with apply_erasure(pipe, unlearn(pipe, ERASE).tensors):
        after = [generate_to_files(pipe, GenerationSettings(p, seed=seed), out / "after", model="embedded")[0] for p in prompts]
    entries = []
    for prompt, old, new in zip(prompts, before, after):
        sheet = grid([Image.open(old), Image.open(new)], ["base", "circle erased"], columns=2, scale=2)
        path = save_png(sheet, out / f"{slug(prompt)}.png", {"prompt": prompt, "erased": "circle", "method": "uce", "seed": seed})
        named = "circle" in prompt
        expected = "the erased concept should be gone, so no match is a success" if named else "kept prompts should still match"
        entries.append(Entry(f"UCE, circle erased: {prompt}", path, f"after: {judged(Image.open(new), prompt)}; {expected}"))
    return entries


def write_index(out: Path, sections: dict[str, list[Entry]]) -> Path:
    parts = ["<!doctype html><meta charset='utf-8'><title>xattn demo</title>",
             "<style>body{font-family:sans-serif} figure{display:inline-block;margin:8px} img{height:192px;image-rendering:pixelated}</style>",
             "<h1>xattn demo on the embedded shapes model</h1>"]
    for name, entries in sections.items():
        parts.append(f"<h2>{html.escape(name)}</h2>")
        for e in entries:
            parts.append(
                f"<figure><a href='{html.escape(e.image.relative_to(out).as_posix())}'>"
                f"<img src='{html.escape(e.image.relative_to(out).as_posix())}' alt='{html.escape(e.title)}'></a>"
                f"<figcaption><b>{html.escape(e.title)}</b><br>{html.escape(e.note)}</figcaption></figure>"
            )
    index = out / "index.html"
    tmp = out / ".index.html.tmp"
    tmp.write_text("\n".join(parts))
    os.replace(tmp, index)
    return index


def run_demo(out: Path, seed: int = 0) -> Path:
    pipe = load_pipeline()
    sections = {
        "Generation": generation_section(pipe, out / "generate", seed),
        "Attention maps": maps_section(pipe, out / "maps", seed),
        "Prompt-to-Prompt": edit_section(pipe, out / "edit", seed),
        "Real image": real_image_section(pipe, out / "real"),
        "Composition (A-STAR, Attend-and-Excite)": composition_section(pipe, out / "compose", seed),
        "Concept unlearning (UCE)": unlearning_section(pipe, out / "unlearn", seed),
    }
    return write_index(out, sections)
