"""Cost of a Prompt-to-Prompt edit against the stock pipeline called with the same prompts.

    python -m benchmarks.p2p_speed [--reps 9] [--model sd1-64|embedded]

Two prompts ("a red circle and a blue square" -> "... a green square"), 25 DDIM steps, guidance 5.
Modes, timed round-robin in one process: stock (the pipeline, both prompts, one shared latent),
swap (cross 0.8, self 0.4: every edit runs fused), swap + local blend (which records the blend
words' maps at one resolution), and the explicit reference. Peak memory: RSS high-water mark above
the loaded model, each mode in a fresh process. On the embedded model a UNet call is ~20 ms, so
per-layer Python work weighs more than on a real model; `--model sd1-64` runs a narrow UNet with
SD 1.x's four levels at a 64x64 latent (random weights: speed only).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.harness import fresh_process_peaks, print_peak, speed_pipe, time_interleaved
from editors import LocalBlend, Swap
from pipelines.edit import prompt_to_prompt

PROMPTS = ["a red circle and a blue square", "a red circle and a green square"]
MODES = ("stock", "swap", "swap+blend", "explicit")


def _modes(model: str) -> dict:
    pipe = speed_pipe(model)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    latent = torch.randn((1, pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size), generator=torch.Generator().manual_seed(0))
    common = dict(steps=25, guidance=5.0, output_type="np")

    def stock():
        pipe(PROMPTS, num_inference_steps=25, guidance_scale=5.0, latents=latent.expand(2, -1, -1, -1).clone(), height=size, width=size, output_type="np")

    return {
        "stock": stock,
        "swap": lambda: prompt_to_prompt(pipe, PROMPTS, Swap(), **common),
        "swap+blend": lambda: prompt_to_prompt(pipe, PROMPTS, Swap(), blend=LocalBlend(["blue"], ["green"]), **common),
        "explicit": lambda: prompt_to_prompt(pipe, PROMPTS, Swap(), explicit=True, **common),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--model", default="embedded", choices=["embedded", "sd1-64"])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--peak-of", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_of:
        print_peak(_modes(args.model)[args.peak_of])
        return
    results = {"model": args.model, "timing": time_interleaved(_modes(args.model), args.reps)}
    print(json.dumps(results["timing"]), flush=True)
    results["peak_mib"] = fresh_process_peaks("benchmarks.p2p_speed", list(MODES), ["--model", args.model])
    print(json.dumps(results["peak_mib"]), flush=True)
    out = args.out or Path(f"benchmarks/results/p2p_speed_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
