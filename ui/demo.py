"""`xattn demo`: the main job on the embedded model, written as PNGs and an index page.

Each capability adds a section: plain generation (each image with the judge's reading),
per-word attention maps, Prompt-to-Prompt edits, editing a real image through inversion,
composition with attention-loss guidance, concept unlearning by each of the four methods.
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
from pipelines.files import save_png, slug
from pipelines.generate import GenerationSettings, generate_to_files
from pipelines.guidance import compose
from pipelines.images import psnr
from pipelines.inversion import invert
from pipelines.loading import EMBEDDED, load_pipeline
from pipelines.maps import generate_with_maps, write_maps
from pipelines.unlearn import UnlearnSettings, unlearn, with_defaults
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


UNLEARNING = ("uce", "esd-x", "fmn", "salun")
UNLEARNING_PROMPTS = ("a red circle", "a blue triangle")


def unlearning_section(pipe, out: Path, seed: int) -> list[Entry]:
    """Each of the four methods erases "circle" (toward "square") with the embedded model's defaults; the same seeds
    before and after for a prompt that names it and one that does not, and the weights put back after each."""
    before = [Image.open(generate_to_files(pipe, GenerationSettings(p, seed=seed), out / "before", model="embedded")[0])
              for p in UNLEARNING_PROMPTS]
    entries = []
    for method in UNLEARNING:
        settings = with_defaults(UnlearnSettings(method=method, concept="circle", guide="square"), EMBEDDED)
        with apply_erasure(pipe, unlearn(pipe, settings).tensors):
            after = [Image.open(generate_to_files(pipe, GenerationSettings(p, seed=seed), out / method, model="embedded")[0])
                     for p in UNLEARNING_PROMPTS]
        sheet = grid([*before, *after], [f"base: {p}" for p in UNLEARNING_PROMPTS] + [f"{method}: {p}" for p in UNLEARNING_PROMPTS],
                     columns=2, scale=3)
        path = save_png(sheet, out / f"{method}.png", {"erased": "circle", "guide": "square", "method": method, "seed": seed})
        named, kept = (judged(image, prompt) for image, prompt in zip(after, UNLEARNING_PROMPTS))
        note = (f"after erasing, {UNLEARNING_PROMPTS[0]}: {named}, where no match is the success (the circle should be gone); "
                f"{UNLEARNING_PROMPTS[1]}: {kept}, which should still match")
        entries.append(Entry(f"{method}, circle erased", path, note))
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
        "Concept unlearning (UCE, ESD-x, Forget-Me-Not, SalUn)": unlearning_section(pipe, out / "unlearn", seed),
    }
    return write_index(out, sections)
