"""Cost of a Prompt-to-Prompt word swap on Flux- and SD3-shaped transformers at their real widths (issue 31).

    python -m benchmarks.transformer_edit_cost [--reps 5] [--side 512]

The models of `benchmarks.transformer_trace_overhead` (random weights at the published widths, a few blocks). One
denoiser call on 2 prompts (SD3: with classifier-free guidance, 4 rows; Flux: guidance-distilled, 2 rows), stock
and as a swap edit of the second prompt from the first (a one-token swap mapper over every text token, injected at
this step, self-attention not injected), timed round-robin in one process; peak memory of each in a fresh process.
Goal: <= 1.10x time, <= 1.15x peak memory.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import xattn
from benchmarks.harness import fresh_process_peaks, print_peak, time_interleaved, write_json
from benchmarks.transformer_trace_overhead import flux_call, sd3_call
from editors.edits import swap
from editors.p2p import PromptToPrompt
from xattn.sites import BatchLayout


def two_prompts(name: str, side: int):
    """The model and a call on 2 prompts, with its text length."""
    model, inputs, layout = flux_call(1, 1, side) if name == "flux" else sd3_call(2, side)
    rows = 2 if name == "flux" else 4
    for key in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance"):
        if key in inputs:
            inputs[key] = inputs[key][:1].expand(rows, *inputs[key].shape[1:]).clone()
    return model, inputs, BatchLayout(("source", "target"), guidance=layout.guidance), inputs["encoder_hidden_states"].shape[1]


def modes(name: str, side: int) -> dict:
    model, inputs, layout, tokens = two_prompts(name, side)
    mapper = torch.eye(tokens)
    mapper[[3, 4]] = mapper[[4, 3]]  # one swapped word's tokens change place: the mapper is not the identity

    def stock():
        with torch.no_grad():
            model(**inputs)

    def edited():
        controller = PromptToPrompt([swap(mapper)], torch.ones(1, 1, tokens), (0, 0), 0)
        with torch.no_grad(), xattn.attach(model, controller) as state:
            state.restart(layout)
            model(**inputs)

    return {"stock": stock, "edited": edited}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--side", type=int, default=512, help="image side in pixels")
    parser.add_argument("--peak-of", help="(internal) run one mode once in this process and print its peak memory")
    parser.add_argument("--model", default="flux", choices=["flux", "sd3"], help="(with --peak-of) which model")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/transformer_edit_cost.json"))
    args = parser.parse_args()
    if args.peak_of:
        print_peak(modes(args.model, args.side)[args.peak_of])
        return
    results = {"side": args.side}
    for name in ("flux", "sd3"):
        results[name] = time_interleaved(modes(name, args.side), args.reps)
        results[name]["peak_mib"] = fresh_process_peaks("benchmarks.transformer_edit_cost", ["stock", "edited"],
                                                        ["--model", name, "--side", str(args.side)])
        peaks = results[name]["peak_mib"]
        results[name]["peak_ratio"] = peaks["edited"]["process_mib"] / peaks["stock"]["process_mib"]
        print(name, results[name]["ratio_paired"], results[name]["peak_ratio"], flush=True)
    write_json(args.out, results)


if __name__ == "__main__":
    main()
