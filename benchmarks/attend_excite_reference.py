"""Attend-and-Excite: xattn's preset against diffusers' pipeline (the authors' algorithm), no guidance and A-STAR.

    python -m benchmarks.attend_excite_reference [--prompts 3] [--seeds 30] [--methods NAME ...]
        [--out benchmarks/results/attend_excite_reference.json]

Three-object prompts of three different shapes (benchmarks.shapes_quality's, the first `--prompts`
of them), `--seeds` seeds each; image s of a prompt starts from the noise of seed s for every
method. Methods: no guidance; the `attend-excite` preset (the authors' loop, every token but the
first and last, maps at xattn.families.layout_side: 8 on this model); diffusers'
StableDiffusionAttendAndExcitePipeline at the same settings, with its maps at that side and at its
default 16x16 (on this model the highest level, the one SD has at 64x64); A-STAR. Two regimes: the
authors' own defaults (50 steps, guidance 7.5, refinement at iterations 0, 10 and 20, updates
while i < 25) and xattn's (25 steps, guidance 5, the same schedule as fractions: 0, 5, 10 and 12).
Per method: how often the judge finds every object, how often the image is exactly the prompt,
seconds per image. `--methods` runs only those and keeps the other rows of `--out`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionAttendAndExcitePipeline
from diffusers.utils.torch_utils import randn_tensor

from benchmarks.harness import write_json
from benchmarks.shapes_quality import prompt_sets
from pipelines.guidance import compose, method_settings
from pipelines.loading import load_pipeline
from shapes.judge import match_caption
from shapes.scenes import parse_caption
from xattn.families import layout_side
from xattn.tokens import word_tokens

REGIMES = {"authors' defaults (50 steps, guidance 7.5)": (50, 7.5), "xattn's defaults (25 steps, guidance 5)": (25, 5.0)}


def three_shape_prompts(count: int) -> list[str]:
    return [p for p in prompt_sets(400)["three objects"] if len({t.shape for t in parse_caption(p).things}) == 3][:count]


def judged(images, prompt: str) -> tuple[list[bool], list[bool]]:
    verdicts = [match_caption(np.rint(np.asarray(i, dtype=np.float64) * 255), prompt) for i in images]
    return [not v.missing for v in verdicts], [v.exact for v in verdicts]


def diffusers_run(reference, prompt: str, shapes: list[str], seeds: int, steps: int, guidance: float, side: int) -> list:
    """diffusers' pipeline with the preset's schedule at this length, from the noise compose draws for seeds 0.."""
    noise = torch.cat([randn_tensor((1, 4, 16, 16), generator=torch.Generator().manual_seed(s)) for s in range(seeds)])
    tokens = [word_tokens(reference.tokenizer, prompt, s)[0] for s in shapes]
    thresholds = {round(f * steps): t for f, t in ((0.0, 0.05), (0.2, 0.5), (0.4, 0.8))}
    return reference([prompt] * seeds, token_indices=[tokens] * seeds, num_inference_steps=steps, guidance_scale=guidance,
                     max_iter_to_alter=round(0.5 * steps), thresholds=thresholds, attn_res=(side, side), latents=noise,
                     output_type="np").images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--methods", nargs="+", help="run only these methods, keeping the other rows of --out")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/attend_excite_reference.json"))
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    reference = StableDiffusionAttendAndExcitePipeline(**{k: v for k, v in pipe.components.items() if k != "image_encoder"},
                                                       requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    prompts = three_shape_prompts(args.prompts)
    side = layout_side(pipe.unet, (16, 16))
    results = json.loads(args.out.read_text()) if args.methods and args.out.exists() else {}
    if results and (results["prompts"], results["seeds"]) != (prompts, args.seeds):
        raise SystemExit(f"{args.out} holds another run (prompts or seeds differ); run every method or choose another --out")
    results.update({"prompts": prompts, "seeds": args.seeds, "started": time.strftime("%Y-%m-%d %H:%M")})
    for regime, (steps, guidance) in REGIMES.items():
        methods = {
            "none": lambda p, s: compose(pipe, p, s, method="none", num_images_per_prompt=args.seeds, steps=steps, guidance=guidance,
                                         output_type="np").images,
            "attend-excite preset": lambda p, s: compose(pipe, p, s, method="attend-excite", num_images_per_prompt=args.seeds, steps=steps,
                                                         guidance=guidance, output_type="np").images,
            f"diffusers' pipeline, maps at {side}x{side}": lambda p, s: diffusers_run(reference, p, s, args.seeds, steps, guidance, side),
            "diffusers' pipeline, its default 16x16 maps": lambda p, s: diffusers_run(reference, p, s, args.seeds, steps, guidance, 16),
            "astar": lambda p, s: compose(pipe, p, s, method="astar", num_images_per_prompt=args.seeds, steps=steps, guidance=guidance,
                                          output_type="np").images,
        }
        unknown = set(args.methods or ()) - set(methods)
        if unknown:
            raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {sorted(methods)}")
        rows = results.get(regime, {})
        for name, run in methods.items():
            if args.methods and name not in args.methods:
                continue
            found, exact, began = [], [], time.perf_counter()
            for prompt in prompts:
                shapes = [t.shape for t in parse_caption(prompt).things]
                f, e = judged(run(prompt, shapes), prompt)
                found += f
                exact += e
            rows[name] = {"images": len(found), "found_all": float(np.mean(found)), "exact": float(np.mean(exact)),
                          "seconds_per_image": (time.perf_counter() - began) / len(found)}
            print(regime, name, rows[name], flush=True)
            results[regime] = rows
            write_json(args.out, results)


if __name__ == "__main__":
    main()
