"""Null-text inversion against the reference algorithm, on the embedded model: reconstruction PSNR at 25 and 50 steps.

    python -m benchmarks.null_text_reference [--images 10] [--out benchmarks/results/null_text_reference.json]

The reference is google/prompt-to-prompt's `null_optimization` (which the diffusers community
NullTextPipeline copies), written here from its algorithm: at denoising step i, a fresh Adam on
the previous step's unconditional embedding at learning rate 1e-2 (1 - i / 100), at most 10
updates of the guided DDIM step's squared error to the inverted latent, each followed by the test
loss < 1e-5 + 2e-5 i; then the guided step with the embedding it reached. Its DDIM step is the
scheduler's own (the notebook's is written for epsilon prediction; the embedded model predicts v).
Every row starts from the same DDIM inversion of the caption, so they differ only in the
optimisation. Rows: xattn (`pipelines.inversion`), the reference, and the schedule xattn had
before (learning rate decaying to half over the run, bound growing by 1e-3 over it). Images: the
model's own (25 DDIM steps, guidance 5; "a green triangle on the left" at seed 1 first, then
benchmarks.shapes_quality's two-object prompts), which its VAE redraws to about 47 dB, so the
inversion's own error shows; and rendered scenes of the inversion benchmark, where the VAE's
round trip (about 37 dB) caps every method.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from benchmarks.inversion_quality import scenes
from benchmarks.shapes_quality import prompt_sets
from pipelines.ddim import ddim_from, ddim_levels
from pipelines.images import image_to_latent, latent_to_image, psnr
from pipelines.inversion import ddim_invert, invert, reconstruct
from pipelines.loading import load_pipeline
from xattn.conditioning import denoiser_output, encode_text

GUIDANCE = 5.0
Schedule = tuple[Callable[[int, int], float], Callable[[int, int], float]]  # (learning rate, early-stop bound) of step i of n
SCHEDULES: dict[str, Schedule] = {
    "reference": (lambda i, n: 1e-2 * (1 - i / 100), lambda i, n: 1e-5 + 2e-5 * i),
    "xattn before": (lambda i, n: 1e-2 * (1 - 0.5 * i / n), lambda i, n: 1e-5 + 1e-3 * i / n),
}


def guided(pipe, x, t, cond, null) -> torch.Tensor:
    out_cond = denoiser_output(pipe, x, t, cond)
    out_null = denoiser_output(pipe, x, t, cond.with_embeds(null))
    return out_null + GUIDANCE * (out_cond - out_null)


def reference_inversion(pipe, image, caption: str, steps: int, schedule: Schedule) -> float:
    """PSNR of the image redrawn from the reference loop's per-step null embeddings."""
    rate, bound = schedule
    scheduler = ddim_from(pipe.scheduler)
    levels = ddim_levels(scheduler, steps)
    cond, uncond = encode_text(pipe, [caption], (64, 64))
    latents = ddim_invert(pipe, image_to_latent(pipe, image), cond, levels, scheduler.config.prediction_type)
    null, nulls, x = uncond.embeds.detach(), [], latents[-1:]
    for i, t in enumerate(scheduler.timesteps):
        null = null.clone().detach().requires_grad_(True)
        optimiser = torch.optim.Adam([null], lr=rate(i, steps))
        target = latents[steps - 1 - i : steps - i]
        with torch.no_grad():
            out_cond = denoiser_output(pipe, x, t, cond)
        for _ in range(10):
            out_null = denoiser_output(pipe, x, t, uncond.with_embeds(null))
            step = scheduler.step(out_null + GUIDANCE * (out_cond - out_null), t, x).prev_sample
            loss = F.mse_loss(step, target)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if loss.item() < bound(i, steps):
                break
        nulls.append(null.detach())
        with torch.no_grad():
            x = scheduler.step(guided(pipe, x, t, cond, null.detach()), t, x).prev_sample
    with torch.no_grad():
        x = latents[-1:]
        for t, n in zip(scheduler.timesteps, nulls):
            x = scheduler.step(guided(pipe, x, t, cond, n), t, x).prev_sample
    return psnr(latent_to_image(pipe, x), image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5, help="of each kind, generated and rendered")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/null_text_reference.json"))
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    captions = ["a green triangle on the left", *prompt_sets(args.images)["two objects"][: args.images - 1]]
    generated = [(c, pipe(c, num_inference_steps=25, guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(1 if i == 0 else i)).images[0])
                 for i, c in enumerate(captions)]
    rendered = [(s.caption, Image.fromarray(s.image)) for s in scenes(args.images)]
    results = {"images": {"generated": len(generated), "rendered": len(rendered)}, "guidance": GUIDANCE,
               "vae_round_trip_psnr_db": {kind: [psnr(latent_to_image(pipe, image_to_latent(pipe, i)), i) for _, i in images]
                                          for kind, images in (("generated", generated), ("rendered", rendered))},
               "started": time.strftime("%Y-%m-%d %H:%M")}
    for steps, kind in ((25, "generated"), (25, "rendered"), (50, "generated"), (50, "rendered")):
        images = generated if kind == "generated" else rendered
        rows: dict[str, list[float]] = {"xattn": [], **{name: [] for name in SCHEDULES}}
        seconds: dict[str, float] = {name: 0.0 for name in rows}
        for caption, image in images:
            began = time.perf_counter()
            inversion = invert(pipe, image, caption, method="null-text", steps=steps, guidance=GUIDANCE, cache_dir=None)
            rows["xattn"].append(psnr(reconstruct(pipe, inversion), image))
            seconds["xattn"] += time.perf_counter() - began
            for name, schedule in SCHEDULES.items():
                began = time.perf_counter()
                rows[name].append(reference_inversion(pipe, image, caption, steps, schedule))
                seconds[name] += time.perf_counter() - began
            print(steps, caption, {k: round(v[-1], 2) for k, v in rows.items()}, flush=True)
        results[f"{steps} steps, {kind}"] = {name: {"psnr_db": values, "median_psnr_db": float(np.median(values)),
                                                    "seconds_per_image": seconds[name] / len(images)} for name, values in rows.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
