"""Layout masks: does `compose(..., layout=...)` put each concept where its mask says?

    python -m benchmarks.layout_placement [--seeds 50] [--out benchmarks/results/layout_placement.json]

"a red circle and a blue square" with the circle's mask the image's left half and the square's the
right half (the README's example), seeds 0.. per row. Per row: how often the judge reads the
prompt exactly, and how often exactly with the circle's centre left of the middle and the
square's right of it. Without masks, a placement is a coin toss per object (25 % for both).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import write_json
from pipelines.guidance import compose
from pipelines.loading import load_pipeline
from shapes import match_caption

PROMPT = "a red circle and a blue square"
LEFT = np.zeros((64, 64), bool)
LEFT[:, :32] = True
ROWS = {  # name: (method, layout)
    "astar, no masks": ("astar", None),
    "astar, masks": ("astar", {"circle": LEFT, "square": ~LEFT}),
    "attend-excite, masks": ("attend-excite", {"circle": LEFT, "square": ~LEFT}),
}


def run_row(pipe, method: str, layout, seeds: int) -> dict:
    exact, placed, began = [], [], time.perf_counter()
    for seed in range(seeds):
        image = np.asarray(compose(pipe, PROMPT, ["circle", "square"], method=method, layout=layout, seed=seed).images[0])
        verdict = match_caption(image, PROMPT)
        centres = {o.shape: o.centre[0] for o in verdict.found}
        exact.append(verdict.exact)
        placed.append(verdict.exact and centres["circle"] < 32 < centres["square"])
    return {"seeds": seeds, "exact": float(np.mean(exact)), "placed": float(np.mean(placed)),
            "seconds_per_image": (time.perf_counter() - began) / seeds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/layout_placement.json"))
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    results = {}
    for name, (method, layout) in ROWS.items():
        results[name] = run_row(pipe, method, layout, args.seeds)
        print(name, results[name], flush=True)
        write_json(args.out, results)


if __name__ == "__main__":
    main()
