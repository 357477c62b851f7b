"""Prompt-to-Prompt as the diffusers community pipeline computes it (google/prompt-to-prompt's semantics), on
the embedded model: the numbers `tests/test_p2p.py` holds xattn's `GOOGLE` conventions to.

    python -m benchmarks.p2p_reference --community path/to/pipeline_prompt2prompt.py [--out tests/fixtures/p2p_google.npz]

The community file is diffusers' `examples/community/pipeline_prompt2prompt.py` (fetch it; it is not
part of xattn). Each case runs both prompts from one shared starting latent, as google does (the
community pipeline draws independent noise per prompt unless given latents), with DDIM (the
embedded model's scheduler), 25 steps and guidance 5, and stores the 8-bit images.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

from pipelines.loading import load_pipeline

STEPS, GUIDANCE = 25, 5.0
# name: (source, target, the community pipeline's cross_attention_kwargs, seed)
CASES = {
    "colour swap": ("a red circle", "a blue circle", {"edit_type": "replace", "n_cross_replace": 0.8, "n_self_replace": 0.4}, 3),
    "shape swap": ("a red circle and a blue square", "a red circle and a blue triangle",
                   {"edit_type": "replace", "n_cross_replace": 0.8, "n_self_replace": 0.4}, 5),
    "short windows": ("a green square", "a green circle", {"edit_type": "replace", "n_cross_replace": 0.5, "n_self_replace": 0.2}, 6),
    "refine": ("a red circle", "a red circle and a blue square", {"edit_type": "refine", "n_cross_replace": 0.8, "n_self_replace": 0.4}, 7),
    "reweight": ("a red circle and a blue square", "a red circle and a blue square",
                 {"edit_type": "reweight", "n_cross_replace": 0.8, "n_self_replace": 0.4, "equalizer_words": ["blue"],
                  "equalizer_strengths": [3.0]}, 9),
}


def shared_latent(pipe, seed: int) -> torch.Tensor:
    """The starting latent xattn draws for every prompt of an edit with this seed."""
    side = pipe.unet.config.sample_size
    return torch.randn(1, pipe.unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(seed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--community", type=Path, required=True, help="diffusers' examples/community/pipeline_prompt2prompt.py")
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/p2p_google.npz"))
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    spec = importlib.util.spec_from_file_location("community_p2p", args.community)
    community = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(community)
    pipe = load_pipeline(None)
    reference = community.Prompt2PromptPipeline(**{k: v for k, v in pipe.components.items() if k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
                                                safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    images = {}
    for name, (source, target, options, seed) in CASES.items():
        latents = shared_latent(pipe, seed).expand(2, -1, -1, -1).clone()
        out = reference([source, target], num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=latents, output_type="np",
                        cross_attention_kwargs=dict(options)).images
        images[name] = np.rint(np.asarray(out) * 255).astype(np.uint8)
        print(name, images[name].shape, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    with open(tmp, "wb") as handle:
        np.savez_compressed(handle, **images)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
