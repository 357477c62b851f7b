"""Shared measuring: modes timed round-robin in one process, peak memory of each mode in a fresh one, results written atomically."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipelines.loading import load_pipeline


def time_interleaved(modes: dict[str, Callable[[], object]], reps: int) -> dict:
    """Each mode once to warm up, then `reps` rounds of every mode; medians, minima and ratios to the first mode.

    Rounds alternate the order of the modes (forward, then backward), so no mode always runs
    right after the same one. `ratio_paired` is the median over rounds of each round's own
    ratio: a slow stretch of the machine lands on both sides of a round's ratio and cancels,
    where the ratio of medians across rounds does not.
    """
    for fn in modes.values():
        fn()
    names = list(modes)
    times = {name: [] for name in modes}
    for round_ in range(reps):
        for name in names if round_ % 2 == 0 else reversed(names):
            began = time.perf_counter()
            modes[name]()
            times[name].append(time.perf_counter() - began)
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    base = names[0]
    return {
        "reps": reps, "median_s": med, "min_s": low,
        "ratio_median": {k: med[k] / med[base] for k in names[1:]},
        "ratio_min": {k: low[k] / low[base] for k in names[1:]},
        "ratio_paired": {k: statistics.median(a / b for a, b in zip(times[k], times[base])) for k in names[1:]},
        "threads": torch.get_num_threads(),
    }


def _status_kib(field: str) -> int:
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))
    return int(line.split()[1])


def print_peak(run: Callable[[], object]) -> None:
    """Run once and print the RSS high-water mark, above what was resident before and of the whole process, in MiB (Linux).

    The part above the loaded model is a few tens of MiB on small models and moves by as much
    from run to run (the allocator, thread pools); the whole process's peak is what a ratio of
    peak memory compares.
    """
    before = _status_kib("VmRSS")
    run()
    peak = _status_kib("VmHWM")
    print(json.dumps({"above_model_mib": (peak - before) / 1024, "process_mib": peak / 1024}))


def fresh_process_peaks(module: str, modes: list[str], args: list[str]) -> dict[str, dict[str, float]]:
    """`python -m module --peak-of MODE *args` for each mode; each prints its peaks with `print_peak`."""
    result = {}
    for mode in modes:
        out = subprocess.run([sys.executable, "-m", module, "--peak-of", mode, *args], capture_output=True, text=True, check=True)
        result[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def speed_pipe(model: str):
    """The pipeline a speed benchmark runs: the embedded model, or a test architecture by name (random weights)."""
    if model == "embedded":
        pipe = load_pipeline()
    else:
        from tests.architectures import ARCHITECTURES

        pipe = ARCHITECTURES[model]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_json(path: Path, value: dict) -> None:
    """Written whole or not at all: a benchmark that writes after each row keeps, when interrupted, the rows it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)
