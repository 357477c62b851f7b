"""Re-run every quality benchmark on the shipped model, then regenerate RESULTS.md's tables from the JSON.

    python -m benchmarks.rerun [--quick] [--only shapes_quality,p2p_quality,...]

Each benchmark runs in its own process and writes its JSON into benchmarks/results/current/
(--quick: benchmarks/results/quick/, a few seeds per row, about 50 minutes on two cores, against
many hours for the full run). `provenance.json` there records the fingerprints of the shipped model and
of the judge (benchmarks/provenance.py), the mode, each benchmark's arguments and time. A
benchmark already measured there for the same fingerprints and arguments is not run again, so an
interrupted rerun resumes; a changed model or judge starts the folder afresh. The tables then go
into RESULTS.md's generated section (benchmarks/tables.py), and tests/test_results.py fails when
the shipped model or the judge no longer match them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import provenance
from benchmarks.harness import write_json
from benchmarks.tables import CURRENT, RESULTS, write_section

FOLDERS = {"full": CURRENT, "quick": RESULTS.parent / "results" / "quick"}
# name: (full arguments, quick arguments)
BENCHMARKS = {
    "shapes_quality": (["--seeds", "200"], ["--seeds", "20", "--batch", "20"]),
    "p2p_quality": (["--seeds", "100"], ["--seeds", "10"]),
    "inversion_quality": (["--images", "50"], ["--images", "5"]),
    "composition_quality": (["--seeds", "200"], ["--seeds", "20", "--batch", "20"]),
    "layout_placement": (["--seeds", "50"], ["--seeds", "8"]),
    "unlearning_quality": (["--seeds", "100"], ["--seeds", "10"]),
    "dpl_leakage": (["--images", "100", "--methods", "ddim,null-text,direct,dpl"], ["--images", "4", "--methods", "null-text,dpl"]),
}


def rerun(mode: str, only: list[str]) -> Path:
    folder = FOLDERS[mode]
    folder.mkdir(parents=True, exist_ok=True)
    record_path = folder / "provenance.json"
    fingerprints = provenance.current()
    record = {"mode": mode, **fingerprints, "arguments": {}, "seconds": {}, "finished": None}
    earlier = json.loads(record_path.read_text()) if record_path.exists() else None
    if earlier is not None and all(earlier[k] == record[k] for k in ("mode", "model", "judge")):
        record = earlier
    else:  # another model or judge: nothing measured here stands
        for stale in folder.glob("*.json"):
            stale.unlink()
    for name in only:
        arguments = BENCHMARKS[name][mode == "quick"]
        out = folder / f"{name}.json"
        if record["arguments"].get(name) == arguments and name in record["seconds"]:
            print(f"{name}: measured already ({out})", flush=True)
            continue
        if record["arguments"].get(name) != arguments:
            out.unlink(missing_ok=True)  # a run cut short with the same arguments resumes from its rows instead
        record["arguments"][name] = arguments
        record["seconds"].pop(name, None)
        write_json(record_path, record)
        print(f"{name}: python -m benchmarks.{name} {' '.join(arguments)}", flush=True)
        began = time.perf_counter()
        subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *arguments, "--out", str(out)], check=True)
        record["seconds"][name] = time.perf_counter() - began
        record["finished"] = time.strftime("%Y-%m-%d %H:%M")
        write_json(record_path, record)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few seeds per row, into benchmarks/results/quick/")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated benchmark names (default: all)")
    args = parser.parse_args()
    unknown = sorted(set(args.only.split(",")) - set(BENCHMARKS))
    if unknown:
        parser.error(f"no benchmark named {', '.join(unknown)}; the benchmarks are {', '.join(BENCHMARKS)}")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    folder = rerun("quick" if args.quick else "full", args.only.split(","))
    write_section(folder)
    print(f"wrote {RESULTS} from {folder}")


if __name__ == "__main__":
    main()
