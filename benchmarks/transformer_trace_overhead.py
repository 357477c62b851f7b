"""Cost of recording every joint-attention map on Flux- and SD3-shaped transformers at their real widths.

    python -m benchmarks.transformer_trace_overhead [--reps 5] [--double 1] [--single 1] [--sd3-blocks 2] [--side 512]

Random weights at the published widths (Flux-dev: 24 heads of 128, T5 512 tokens, latents packed 2x2; SD3-medium:
24 heads of 64, CLIP 77 + T5 256 tokens, patch 2, the last block's context pre-only), a few blocks each, so that a
CPU runs them: a block's cost, and the share of it that recording adds, do not depend on how many there are. One
denoiser call at `--side` px, stock and inside `xattn.trace` (the image-text block of every joint layer recorded),
interleaved round-robin in one process; the paired ratio is what to read.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

import xattn
from benchmarks.harness import time_interleaved, write_json
from xattn.sites import BatchLayout


def flux_call(double: int, single: int, side: int):
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=128,
                                   num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                                   axes_dims_rope=(16, 56, 56)).eval()
    grid = side // 16  # VAE 8x, then 2x2 packing
    ids = torch.zeros(grid, grid, 3)
    ids[..., 1], ids[..., 2] = torch.arange(grid)[:, None], torch.arange(grid)[None, :]
    inputs = dict(hidden_states=torch.randn(1, grid * grid, 64), encoder_hidden_states=torch.randn(1, 512, 4096),
                  pooled_projections=torch.randn(1, 768), timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                  img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(512, 3), return_dict=False)
    return model, inputs, BatchLayout(("p",), guidance=False)


def sd3_call(blocks: int, side: int):
    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=blocks, attention_head_dim=64,
                                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192).eval()
    latent = side // 8
    inputs = dict(hidden_states=torch.randn(2, 16, latent, latent), encoder_hidden_states=torch.randn(2, 77 + 256, 4096),
                  pooled_projections=torch.randn(2, 2048), timestep=torch.tensor([500.0, 500.0]), return_dict=False)
    return model, inputs, BatchLayout(("p",), guidance=True)


def measure(model, inputs: dict, layout: BatchLayout, reps: int) -> dict:
    def stock():
        with torch.no_grad():
            model(**inputs)

    def traced():
        with torch.no_grad(), xattn.attach(model, xattn.AttentionStore()) as state:
            state.restart(layout)
            model(**inputs)

    return time_interleaved({"stock": stock, "traced": traced}, reps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--double", type=int, default=1, help="Flux double-stream blocks")
    parser.add_argument("--single", type=int, default=1, help="Flux single-stream blocks")
    parser.add_argument("--sd3-blocks", type=int, default=2)
    parser.add_argument("--side", type=int, default=512, help="image side in pixels")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/transformer_trace_overhead.json"))
    args = parser.parse_args()
    results = {"side": args.side}
    for name, (model, inputs, layout) in (("flux", flux_call(args.double, args.single, args.side)),
                                          ("sd3", sd3_call(args.sd3_blocks, args.side))):
        results[name] = {"blocks": (args.double, args.single) if name == "flux" else args.sd3_blocks} | measure(model, inputs, layout, args.reps)
        print(name, results[name]["median_s"], results[name]["ratio_paired"], flush=True)
        del model
    write_json(args.out, results)


if __name__ == "__main__":
    main()
