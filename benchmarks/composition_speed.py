"""Attend-and-Excite in xattn against diffusers' deprecated StableDiffusionAttendAndExcitePipeline.

    python -m benchmarks.composition_speed [--model embedded|sd1-64] [--num 1] [--reps 7]

Same model, prompt, noise and settings in one process, timed round-robin: 25 steps, guidance 5,
the latents updated at the first 12 steps with A&E's step sizes (20 sqrt(linspace(1, 0.5))),
refinement at steps 0, 5 and 10 (thresholds 0.05, 0.5, 0.8, at most 20 tries), 16x16 maps, the
token softmax over every token but the first and last as diffusers does. `--num` images per
prompt: diffusers optimises them one by one, xattn in one batched pass. The plain pipeline
(no guidance) is timed alongside for scale. `--model sd1-64` is a narrow UNet with SD 1.x's four
levels at a 64x64 latent (512 px; random weights: speed only).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from diffusers import StableDiffusionAttendAndExcitePipeline
from diffusers.utils import logging as diffusers_logging

from benchmarks.harness import speed_pipe, time_interleaved
from pipelines.guidance import compose, method_settings
from xattn.tokens import word_tokens

PROMPT = "a red circle and a blue square"
CONCEPTS = ["circle", "square"]
STEPS = 25


def modes(model: str, num: int) -> dict:
    pipe = speed_pipe(model)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    reference = StableDiffusionAttendAndExcitePipeline(**{k: v for k, v in pipe.components.items() if k != "image_encoder"},
                                                       requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    settings = method_settings("attend-excite", text_tokens="all")
    thresholds = {round(f * STEPS): t for f, t in settings.refinement.items()}
    tokens = [word_tokens(pipe.tokenizer, PROMPT, w)[0] for w in CONCEPTS]
    generators = lambda: [torch.Generator().manual_seed(i) for i in range(num)]  # noqa: E731
    common = dict(num_inference_steps=STEPS, guidance_scale=5.0, height=side, width=side, output_type="np")

    return {
        "diffusers A&E": lambda: reference(PROMPT, token_indices=tokens, num_images_per_prompt=num, generator=generators(),
                                           max_iter_to_alter=round(settings.guided_steps * STEPS), thresholds=thresholds,
                                           scale_factor=settings.step_size, attn_res=(16, 16), **common),
        "xattn A&E": lambda: compose(pipe, PROMPT, CONCEPTS, settings=settings, num_images_per_prompt=num, steps=STEPS, height=side, width=side, output_type="np"),
        "plain": lambda: pipe(PROMPT, num_images_per_prompt=num, generator=generators(), **common),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", choices=["embedded", "sd1-64"])
    parser.add_argument("--num", type=int, default=1)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    diffusers_logging.set_verbosity_error()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    result = {"model": args.model, "num": args.num, **time_interleaved(modes(args.model, args.num), args.reps)}
    print(json.dumps(result, indent=2))
    out = args.out or Path(f"benchmarks/results/composition_speed_{args.model}_num{args.num}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
