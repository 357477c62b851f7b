"""Attention-loss guidance on the embedded model: does every object appear?

    python -m benchmarks.composition_quality [--seeds 200] [--out benchmarks/results/composition_quality.json]

Two- and three-object prompts (benchmarks.shapes_quality's, seed r for prompt r, the same noise
for every method), 25 DDIM steps, guidance 5. Methods: none, Attend-and-Excite, A-STAR, and
A-STAR without each of its losses. Concepts are the shape words, or the colour-and-shape phrases
when a prompt repeats a shape. Per method: how often the judge finds every object (found_all) and
exactly the prompt's objects (exact, nothing extra); the mean soft IoU of the concepts' maps over
the last 20 % of the steps, on the same maps for every method (each concept's attention, peak 1);
seconds per image, and its ratio to none, in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.shapes_quality import prompt_sets
from pipelines.guidance import compose, method_settings
from pipelines.loading import load_pipeline
from shapes.judge import match_caption
from shapes.scenes import parse_caption

METHODS = {
    "none": method_settings("none"),
    "attend-excite": method_settings("attend-excite"),
    "astar": method_settings("astar"),
    "astar without segregation": method_settings("astar", segregation=0.0),
    "astar without retention": method_settings("astar", retention=0.0),
}


def concepts_of(prompt: str) -> list[str]:
    """The shape words, or colour-and-shape phrases when a shape repeats (a word must name one object)."""
    things = parse_caption(prompt).things
    shapes = [t.shape for t in things]
    return shapes if len(set(shapes)) == len(shapes) else [f"{t.colour} {t.shape}" for t in things]


def run(pipe, prompts: list[str], settings, batch: int) -> dict:
    found, exact, overlap, began = [], [], [], time.perf_counter()
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        result = compose(pipe, chunk, [concepts_of(p) for p in chunk], settings=settings, seed=start, output_type="np")
        for prompt, image in zip(chunk, result.images):
            verdict = match_caption(np.rint(image * 255), prompt)
            found.append(not verdict.missing)
            exact.append(verdict.exact)
        overlap.extend(result.overlap().tolist())
    return {
        "prompts": len(prompts),
        "found_all": float(np.mean(found)),
        "exact": float(np.mean(exact)),
        "overlap_last_steps": float(np.mean(overlap)),
        "seconds_per_image": (time.perf_counter() - began) / len(prompts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/composition_quality.json"))
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    sets = prompt_sets(args.seeds)
    results = {}
    for name in ("two objects", "three objects"):
        rows = {method: run(pipe, sets[name], settings, args.batch) for method, settings in METHODS.items()}
        for method, row in rows.items():
            row["time_vs_none"] = row["seconds_per_image"] / rows["none"]["seconds_per_image"]
            print(name, method, row, flush=True)
        results[name] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
