"""Concept unlearning on the embedded model: does the erased concept still appear, do the others survive?

    python -m benchmarks.unlearning_quality [--seeds 100] [--methods uce,esd-x,...] [--model embedded-mmdit]
        [--out benchmarks/results/unlearning_quality.json]

Erases a shape ("circle", guided to "square") and, separately, a colour ("red", guided to "blue").
Each method runs in a fresh process (its training time and peak resident memory above the loaded
pipeline are its own), then the judge reads `--seeds` images of prompts that name the concept
(appearance: any object of that shape or colour) and `--seeds` of prompts of the other shapes or
colours (fidelity: the whole prompt drawn exactly), the same seeds before and after.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import _status_kib
from pipelines.erasure import apply_erasure
from pipelines.erasure_check import judge_prompts
from pipelines.loading import load_pipeline
from shapes.scenes import COLOURS, SHAPES, erasure_prompts

ERASE = {"circle": "square", "red": "blue"}
# Each row: a method with its defaults, or a named variant with other settings.
METHODS = ("uce", "esd-x", "esd-u", "fmn", "salun", "salun-kv")
COLOUR_NAMES = list(COLOURS)


def prompt_sets(concept: str, count: int, objects: int = 1) -> tuple[list[str], list[str]]:
    """(prompts naming the concept, prompts of the other shapes or colours), `count` each; with objects=2, captions
    of two objects that training never saw ("a red circle and a blue square", the concept in either place)."""
    if objects == 2:
        one, others = prompt_sets(concept, count + 1)
        named = [f"{one[i]} and {others[i + 1]}" if i % 2 else f"{others[i + 1]} and {one[i]}" for i in range(count)]
        rest = [f"{others[i]} and {others[i + 1]}" for i in range(count)]
        return named, rest
    if concept in SHAPES:
        others = [s for s in SHAPES if s != concept]
        named = [f"a {COLOUR_NAMES[i % 5]} {concept}" for i in range(count)]
        rest = [f"a {COLOUR_NAMES[i % 5]} {others[i % len(others)]}" for i in range(count)]
    else:
        others = [c for c in COLOUR_NAMES if c != concept]
        named = [f"a {concept} {SHAPES[i % 3]}" for i in range(count)]
        rest = [f"a {others[i % len(others)]} {SHAPES[i % 3]}" for i in range(count)]
    return named, rest


def judge(pipe, concept: str, prompts: list[str]) -> dict:
    judged = judge_prompts(pipe, concept, prompts)
    return {"appears": float(np.mean(judged.shows)), "exact": float(np.mean(judged.exact))}


def one(method: str, concept: str, seeds: int, objects: int = 1, model: str | None = None) -> dict:
    """Erase `concept` with `method` ("none": the base model) and judge; run in its own process."""
    from pipelines.unlearn import UnlearnSettings, unlearn

    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    named, rest = prompt_sets(concept, seeds, objects)
    result = {"method": method, "concept": concept, "objects": objects}
    if method != "none":
        contexts, preserve = erasure_prompts(concept)
        kept = preserve if method in ("uce", "salun", "salun-kv") else ()  # the others keep nothing by design
        settings = UnlearnSettings(method=method, concept=concept, guide=ERASE[concept], contexts=contexts, preserve=kept)
        resident = _status_kib("VmRSS")
        began = time.perf_counter()
        erased = unlearn(pipe, settings, progress=False)
        result["seconds"] = time.perf_counter() - began
        result["peak_mib"] = (_status_kib("VmHWM") - resident) / 1024
        result["settings"] = {k: v for k, v in erased.record["settings"].items() if k not in ("contexts", "preserve")}
        result["changed_tensors"] = len(erased.tensors)
        apply_erasure(pipe, erased.tensors)
    result["named"] = judge(pipe, concept, named)
    result["others"] = judge(pipe, concept, rest)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--concepts", default=",".join(ERASE))
    parser.add_argument("--objects", type=int, default=1, choices=[1, 2], help="objects per judged caption (2: unseen templates)")
    parser.add_argument("--model", help="a model of the shapes world (default: the embedded UNet model; embedded-mmdit)")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "CONCEPT"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/unlearning_quality.json"))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.seeds, args.objects, args.model)))
        return
    # Rows already in --out (of the same seed count) are kept; the asked-for ones are (re)measured.
    kept = json.loads(args.out.read_text()) if args.out.exists() else []
    rows = {(r["method"], r["concept"]): r for r in kept if r.get("seeds") == args.seeds}
    for concept in args.concepts.split(","):
        for method in ["none", *args.methods.split(",")]:
            if method == "none" and (method, concept) in rows:
                continue
            command = [sys.executable, "-m", "benchmarks.unlearning_quality", "--one", method, concept, "--seeds", str(args.seeds),
                       "--objects", str(args.objects), *(["--model", args.model] if args.model else [])]
            out = subprocess.run(command, capture_output=True, text=True, check=True)
            row = {**json.loads(out.stdout.strip().splitlines()[-1]), "seeds": args.seeds}
            if method != "none":
                row["fidelity_kept"] = row["others"]["exact"] / rows[("none", concept)]["others"]["exact"]
            rows[(method, concept)] = row
            print(json.dumps({k: v for k, v in row.items() if k != "settings"}), flush=True)
            args.out.write_text(json.dumps(list(rows.values()), indent=2))


if __name__ == "__main__":
    main()
