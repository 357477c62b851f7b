"""Where xattn's Prompt-to-Prompt departs from google/prompt-to-prompt's code, each departure measured on its own.

    python -m benchmarks.p2p_conventions [--seeds 100] [--out benchmarks/results/p2p_conventions.json]

`editors.conventions` names the three departures. Each row runs benchmarks.p2p_quality's shape
swap, colour swap (cross injection 0.8, self 0.4) and refinement on the same pairs and seeds,
under xattn's conventions, with one of them switched to google's, and under google's all
three; a departure stays xattn's default only where its row measures it better.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, replace
from pathlib import Path

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
    variants = {
        "xattn": XATTN,
        "google self limit (16)": replace(XATTN, self_limit=GOOGLE.self_limit),
        "google windows (steps + 1)": replace(XATTN, window_rows=GOOGLE.window_rows),
        "google refine tail (by position)": replace(XATTN, refine_tail=GOOGLE.refine_tail),
        "google": GOOGLE,
    }
    results = {"seeds": args.seeds, "conventions": {name: asdict(c) for name, c in variants.items()}}
    for name, conventions in variants.items():
        results[name] = {
            "shape swap": run_swaps(pipe, "shape", args.seeds, {"injection": {}}, conventions)["injection"],
            "colour swap": run_swaps(pipe, "colour", args.seeds, {"injection": {}}, conventions)["injection"],
            "refine": run_refine(pipe, args.seeds, conventions),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
