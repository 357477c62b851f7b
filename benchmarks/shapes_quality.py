"""Quality of the embedded shapes model and of its judge.

    python -m benchmarks.shapes_quality [--seeds 200] [--model PATH] [--out benchmarks/results/shapes_quality.json]

Judge: exactness on rendered scenes, clean and with blur and colour noise like a generated image's.
Model (25 DDIM steps, guidance 5): how often the judge finds exactly the prompt's objects for one-,
two- and three-object prompts, how often place words are honoured, and how often the
cross-attention map of each shape word (xattn.trace: mean over layers, heads and steps of the
conditional half, at image size) peaks inside the judged mask of its object. On a model with joint
attention (an SD3-format model of the world: `--model runs/mmdit`) also how often the ConceptAttention map of
each shape (concepts: the three shapes and "background") peaks inside an object of that shape.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

import xattn
from pipelines.loading import load_pipeline
from shapes.judge import match_caption
from shapes.scenes import COLOURS, RELATIONS, SHAPES, Layout, Thing, caption_of, make_scene, parse_caption
from xattn.families import family_of
from xattn.tokens import pipeline_word_tokens

CONCEPTS = [*SHAPES, "background"]


def prompt_sets(seeds: int) -> dict[str, list[str]]:
    """Prompts per row; the layouts come from seeds the training set never drew captions from."""
    rng = np.random.default_rng(12345)
    singles = [f"a {c} {s}" for c in COLOURS for s in SHAPES]

    def things(count: int) -> tuple[Thing, ...]:
        colours = rng.choice(list(COLOURS), size=count, replace=False)
        return tuple(Thing(str(c), str(rng.choice(SHAPES))) for c in colours)

    placed = []
    for i in range(seeds):
        kind = i % 3
        if kind == 0:
            placed.append(caption_of(Layout(things(1), (str(rng.choice(["left", "right", "top", "bottom"])),))))
        elif kind == 1:
            placed.append(caption_of(Layout(things(2), (None, None), (0, str(rng.choice(RELATIONS)), 1))))
        else:
            places = ("left", "right") if rng.random() < 0.5 else ("right", "left")
            placed.append(caption_of(Layout(things(2), places, (0, places[0], 1))))
    return {
        "one object": [singles[i % len(singles)] for i in range(seeds)],
        "two objects": [caption_of(Layout(things(2), (None, None))) for _ in range(seeds)],
        "three objects": [caption_of(Layout(things(3), (None,) * 3)) for _ in range(seeds)],
        "placement": placed,
    }


def run_model(model: str | None, seeds: int, batch: int, rows_wanted: list[str] | None = None) -> dict:
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    joint = family_of(pipe).joint
    rows = {}
    for name, prompts in prompt_sets(seeds).items():
        if rows_wanted and name not in rows_wanted:
            continue
        exact, placement, peaks, concept_peaks, began = [], [], [], [], time.time()
        for start in range(0, len(prompts), batch):
            chunk = prompts[start : start + batch]
            generators = [torch.Generator().manual_seed(start + i) for i in range(len(chunk))]
            with xattn.trace(pipe, concepts=CONCEPTS if joint else None) as tc:
                images = pipe(chunk, num_inference_steps=25, guidance_scale=5.0, generator=generators, output_type="np").images
            for i, (prompt, image) in enumerate(zip(chunk, images)):
                verdict = match_caption(np.rint(image * 255), prompt)
                exact.append(verdict.exact)
                if verdict.placement is not None:
                    placement.append(verdict.placement)
                peaks.extend(shape_word_peaks(pipe, prompt, tc.token_maps(image=i), verdict))
                if joint:
                    concept_peaks.extend(_concept_peaks(tc.concept_maps(image=i, normalise="none"), prompt, verdict))
        rows[name] = {
            "prompts": len(prompts),
            "exact": float(np.mean(exact)),
            "placement": float(np.mean(placement)) if placement else None,
            "placement_n": len(placement),
            "shape_word_peak_in_object": float(np.mean(peaks)) if peaks else None,
            "objects_probed": len(peaks),
            **({"concept_peak_in_object": float(np.mean(concept_peaks)), "concepts_probed": len(concept_peaks)} if concept_peaks else {}),
            "seconds_per_image": (time.time() - began) / len(prompts),
        }
        print(name, rows[name], flush=True)
    return rows


def shape_word_peaks(pipe, prompt: str, maps: torch.Tensor, verdict) -> list[bool]:
    """For each prompt object the judge found, does its shape word's map peak inside it?"""
    found = {f"{o.colour} {o.shape}": o for o in verdict.found if o.shape}
    results, occurrences = [], {}
    for thing in parse_caption(prompt).things:
        occurrence = occurrences[thing.shape] = occurrences.get(thing.shape, -1) + 1
        obj = found.get(str(thing))
        if obj is None:
            continue
        heat = maps[pipeline_word_tokens(pipe, prompt, thing.shape, occurrence)].mean(0)
        results.append(bool(obj.mask[np.unravel_index(int(heat.argmax()), heat.shape)]))
    return results


def _concept_peaks(maps: dict[str, np.ndarray], prompt: str, verdict) -> list[bool]:
    """For each shape of the prompt the judge found, does its concept map peak inside an object of that shape?"""
    found = {f"{o.colour} {o.shape}": o for o in verdict.found if o.shape}
    results = []
    for shape in dict.fromkeys(thing.shape for thing in parse_caption(prompt).things):
        masks = [found[str(t)].mask for t in parse_caption(prompt).things if t.shape == shape and str(t) in found]
        if masks:
            heat = maps[shape]
            results.append(bool(np.logical_or.reduce(masks)[np.unravel_index(int(heat.argmax()), heat.shape)]))
    return results


def run_judge(scenes: int) -> dict:
    rng = np.random.default_rng(0)
    clean, degraded = [], []
    for seed in range(5_000_000, 5_000_000 + scenes):
        scene = make_scene(seed)
        clean.append(match_caption(scene.image, scene.caption).ok)
        x = ndimage.gaussian_filter(scene.image.astype(np.float32), (1.0, 1.0, 0))
        x += rng.normal(0, 10, x.shape) + rng.normal(0, 12, (1, 1, 3))
        degraded.append(match_caption(np.clip(x, 0, 255), scene.caption).ok)
    return {"scenes": scenes, "exact_clean": float(np.mean(clean)), "exact_blur1_noise10": float(np.mean(degraded))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--model")
    parser.add_argument("--rows", help="comma-separated rows to measure (default: one object, two objects, three objects, placement)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/shapes_quality.json"))
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    results = {"judge": run_judge(1000)}
    print("judge", results["judge"], flush=True)
    results["model"] = run_model(args.model, args.seeds, args.batch, args.rows.split(",") if args.rows else None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
