"""Batch runs: jobs per minute with and without batching compatible generate jobs into one pipeline call.

    python -m benchmarks.batch_speed [--jobs 64] [--reps 2] [--out benchmarks/results/batch_speed.json]

The jobs are one-object generate jobs (25 steps, guidance 5, each its own seed); each timed run
starts from an empty output folder, so every job runs and writes its image and record.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from benchmarks.harness import speed_pipe, time_interleaved
from pipelines.batch import run_batch
from pipelines.jobs import Job

COLOURS = ("red", "yellow", "green", "blue", "purple")
SHAPES = ("circle", "square", "triangle")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/batch_speed.json"))
    args = parser.parse_args()
    pipe = speed_pipe("embedded")
    jobs = [Job(i + 1, "generate", {"prompt": f"a {COLOURS[i % 5]} {SHAPES[i % 3]}", "seed": i}) for i in range(args.jobs)]
    scratch = Path(tempfile.mkdtemp())

    def mode(batch_size: int):
        def run() -> None:
            out = scratch / f"b{batch_size}"
            shutil.rmtree(out, ignore_errors=True)
            summary = run_batch(pipe, jobs, out, "embedded", batch_size=batch_size, progress=False)
            assert len(summary.done) == len(jobs)
        return run

    timing = time_interleaved({"one per call": mode(1), "batched 8": mode(8), "batched 16": mode(16)}, args.reps)
    timing["jobs"] = args.jobs
    timing["jobs_per_minute"] = {k: 60 * args.jobs / v for k, v in timing["median_s"].items()}
    print(json.dumps(timing, indent=2))
    args.out.write_text(json.dumps(timing, indent=2))
    shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
