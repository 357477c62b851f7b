"""Where xattn's Prompt-to-Prompt departs from google/prompt-to-prompt's code, each departure measured on its own.

    python -m benchmarks.p2p_conventions [--seeds 100] [--out benchmarks/results/p2p_conventions.json]

`editors.conventions` names the three departures. Each row runs benchmarks.p2p_quality's shape
swap, colour swap (cross injection 0.8, self 0.4) and refinement on the same pairs and seeds,
under xattn's conventions, with one of them switched to google's (the refinement tail only on
refinement, the one edit it changes), and under google's all three; a departure stays xattn's
default only where its row measures it better.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, replace
from pathlib import Path

from benchmarks.harness import write_json
from benchmarks.p2p_quality import run_refine, run_swaps
from editors.conventions import GOOGLE, XATTN
from pipelines.loading import load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/p2p_conventions.json"))
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    tasks = {
        "shape swap": lambda c: run_swaps(pipe, "shape", args.seeds, {"injection": {}}, c)["injection"],
        "colour swap": lambda c: run_swaps(pipe, "colour", args.seeds, {"injection": {}}, c)["injection"],
        "refine": lambda c: run_refine(pipe, args.seeds, c),
    }
    variants = {  # the refinement tail changes nothing in a swap
        "xattn": (XATTN, list(tasks)),
        "google self limit (16)": (replace(XATTN, self_limit=GOOGLE.self_limit), list(tasks)),
        "google windows (steps + 1)": (replace(XATTN, window_rows=GOOGLE.window_rows), list(tasks)),
        "google refine tail (by position)": (replace(XATTN, refine_tail=GOOGLE.refine_tail), ["refine"]),
        "google": (GOOGLE, list(tasks)),
    }
    results = {"seeds": args.seeds, "conventions": {name: asdict(c) for name, (c, _) in variants.items()}}
    for name, (conventions, measured) in variants.items():
        results[name] = {task: tasks[task](conventions) for task in measured}
        write_json(args.out, results)

if __name__ == "__main__":
    main()
