"""The DDIM that inversion builds from a pipeline's scheduler: as google's code builds it, against DDIM's own defaults.

    python -m benchmarks.inversion_ddim [--images 5] [--out benchmarks/results/inversion_ddim.json]

A pipeline whose scheduler was built in code (an Euler scheduler made from Euler's own
arguments, as tiny test configs and hand-made pipelines are) hands inversion a config without
DDIM's `clip_sample` and `set_alpha_to_one`; `DDIMScheduler.from_config` then takes DDIM's
defaults (clipping the predicted sample, a last step to alpha 1), where google's code sets both
off. (Configs loaded from a checkpoint usually carry both keys, off, whatever the class.) Per image (the null-text benchmark's generated and rendered ones), 25 steps: DDIM inversion
of the caption, then DDIM sampling back (guidance 1, the inversion's own path, and guidance 5, the
edits' scale); PSNR of the redrawn image against the input, for each way of building DDIM.
"""

from __future__ import annotations

import argparse
import inspect
import os
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from PIL import Image

from benchmarks.harness import write_json
from benchmarks.inversion_quality import scenes
from benchmarks.shapes_quality import prompt_sets
from pipelines.ddim import ddim_from, ddim_levels, guided_output
from pipelines.images import image_to_latent, latent_to_image, psnr
from pipelines.inversion import ddim_invert
from pipelines.loading import load_pipeline
from xattn.conditioning import encode_text

STEPS = 25


def redrawn(pipe, scheduler: DDIMScheduler, image, caption: str, guidance: float) -> float:
    levels = ddim_levels(scheduler, STEPS)
    cond, uncond = encode_text(pipe, [caption], (64, 64))
    x = ddim_invert(pipe, image_to_latent(pipe, image), cond, levels, scheduler.config.prediction_type)[-1:]
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(guided_output(pipe, x, t, cond, uncond, guidance), t, x).prev_sample
    return psnr(latent_to_image(pipe, x), image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/inversion_ddim.json"))
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    own = inspect.signature(EulerDiscreteScheduler.__init__).parameters
    euler = EulerDiscreteScheduler(**{k: v for k, v in pipe.scheduler.config.items() if k in own})
    builds = {"DDIM's defaults (DDIMScheduler.from_config)": DDIMScheduler.from_config(euler.config), "as google builds it (ddim_from)": ddim_from(euler)}
    captions = ["a green triangle on the left", *prompt_sets(args.images)["two objects"][: args.images - 1]]
    images = [(c, pipe(c, num_inference_steps=25, guidance_scale=5.0, generator=torch.Generator().manual_seed(1 if i == 0 else i)).images[0])
              for i, c in enumerate(captions)] + [(s.caption, Image.fromarray(s.image)) for s in scenes(args.images)]
    results = {"images": len(images), "steps": STEPS,
               "configs": {name: {"clip_sample": s.config.clip_sample, "set_alpha_to_one": s.config.set_alpha_to_one} for name, s in builds.items()}}
    for guidance in (1.0, 5.0):
        rows = {name: [redrawn(pipe, scheduler, image, caption, guidance) for caption, image in images] for name, scheduler in builds.items()}
        results[f"guidance {guidance:g}"] = {name: {"psnr_db": values, "median_psnr_db": float(np.median(values))} for name, values in rows.items()}
        print(guidance, {name: round(float(np.median(v)), 2) for name, v in rows.items()}, flush=True)
    write_json(args.out, results)


if __name__ == "__main__":
    main()
