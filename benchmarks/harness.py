"""Shared measuring: modes timed round-robin in one process, and peak memory of each mode in a fresh one."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def time_interleaved(modes: dict[str, Callable[[], object]], reps: int) -> dict:
    """Each mode once to warm up, then `reps` rounds of every mode in turn; medians, minima and their ratios to the first mode."""
    for fn in modes.values():
        fn()
    times = {name: [] for name in modes}
    for _ in range(reps):
        for name, fn in modes.items():
            began = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - began)
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    base = next(iter(modes))
    return {
        "reps": reps, "median_s": med, "min_s": low,
        "ratio_median": {k: med[k] / med[base] for k in modes if k != base},
        "ratio_min": {k: low[k] / low[base] for k in modes if k != base},
        "threads": torch.get_num_threads(),
    }


def _status_kib(field: str) -> int:
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))
    return int(line.split()[1])


def print_peak(run: Callable[[], object]) -> None:
    """Run once and print the RSS high-water mark above what was resident before, in MiB (Linux)."""
    before = _status_kib("VmRSS")
    run()
    print(json.dumps({"peak_mib": (_status_kib("VmHWM") - before) / 1024}))


def fresh_process_peaks(module: str, modes: list[str], args: list[str]) -> dict[str, float]:
    """`python -m module --peak-of MODE *args` for each mode; each prints its peak with `print_peak`."""
    result = {}
    for mode in modes:
        out = subprocess.run([sys.executable, "-m", module, "--peak-of", mode, *args], capture_output=True, text=True, check=True)
        result[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
    return result
