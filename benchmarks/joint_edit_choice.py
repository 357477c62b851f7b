"""The P2P-style edit against Shin et al.'s input-projection edit on an MM-DiT of the shapes world, read by the judge.

    python -m benchmarks.joint_edit_choice --model runs/mmdit [--seeds 100] [--out benchmarks/results/joint_edit_choice.json]

Shape swaps and colour swaps of one-object prompts (`benchmarks.p2p_quality`'s pairs and measures: the asked object
present, the target exact, the object kept in place, the background's PSNR), each pair edited both ways from the same
starting latent: `joint_edit="p2p"` (the image x text block through the mapper) and `joint_edit="projection"` (the
source's image queries and keys inside the self-attention window). 25 steps, guidance 5, the default windows.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from benchmarks.harness import write_json
from benchmarks.p2p_quality import run_swaps
from pipelines.loading import load_pipeline

EDITS = {"p2p": {"joint_edit": "p2p"}, "projection": {"joint_edit": "projection"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a diffusers folder of an MM-DiT (SD3 format) of the shapes world")
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/joint_edit_choice.json"))
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    results = {kind: run_swaps(pipe, kind, args.seeds, EDITS) for kind in ("shape", "colour")}
    write_json(args.out, {"model": args.model, "seeds": args.seeds, "rows": results})


if __name__ == "__main__":
    main()
