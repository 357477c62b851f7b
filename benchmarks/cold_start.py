"""Time to first image: `xattn generate` from a cold process (import, load the embedded model, 25 steps, write the PNG).

    python -m benchmarks.cold_start [--runs 5] [--out benchmarks/results/cold_start.json]

Each run is a fresh `python -m ui.cli generate "a red circle" --seed 0`; the median wall time is the figure. Then,
in-process: the import of the command line, of torch and diffusers, the model's load and the 25 steps, each timed
once after the runs (the file cache is warm, as it is for a user's second command).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import write_json

STAGES = """
import time, json
t0 = time.perf_counter()
import ui.cli
t1 = time.perf_counter()
ui.cli.quiet_libraries()
import torch, diffusers
t2 = time.perf_counter()
from pipelines.loading import load_pipeline
pipe = load_pipeline()
pipe.set_progress_bar_config(disable=True)
t3 = time.perf_counter()
pipe("a red circle", num_inference_steps=25, guidance_scale=5.0)
t4 = time.perf_counter()
print(json.dumps({"import_cli_s": t1 - t0, "import_torch_diffusers_s": t2 - t1, "load_s": t3 - t2, "steps_25_s": t4 - t3}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cold_start.json"))
    args = parser.parse_args()
    walls = []
    with tempfile.TemporaryDirectory() as out:
        for _ in range(args.runs):
            began = time.perf_counter()
            subprocess.run([sys.executable, "-m", "ui.cli", "generate", "a red circle", "--seed", "0", "--out", out],
                           check=True, capture_output=True)
            walls.append(time.perf_counter() - began)
    stages = subprocess.run([sys.executable, "-c", STAGES], check=True, capture_output=True, text=True).stdout.splitlines()[-1]
    result = {"runs": args.runs, "wall_s": walls, "median_wall_s": statistics.median(walls), "stages": json.loads(stages)}
    print(result)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
