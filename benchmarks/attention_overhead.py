"""Cost of recording every cross-attention map, and the store's size on an SD1.5-shaped UNet.

    python -m benchmarks.attention_overhead [--reps 7] [--batch 8] [--model embedded|sd1-64]

Time: the model generates the same batch (25 DDIM steps, guidance 5) stock and inside
`xattn.trace` (all cross-attention layers recorded), interleaved round-robin in one process;
the ratios of medians, of minima and the paired ratio are reported. On the embedded model a UNet
call takes ~20 ms and per-layer Python work weighs more than on a real model; `--model sd1-64`
runs a narrow UNet with SD 1.x's four levels at a 64x64 latent (random weights: speed only). Peak memory: the RSS high-water mark above the
loaded model during one generation, each mode in a fresh process (Linux /proc).
Store size: one UNet step of a narrow UNet with SD1.5's layer layout (4 levels, 2 layers per
block, 16 cross-attention layers, 8 heads, 77 tokens) at SD1.5's 64x64 latent, per prompt.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

import xattn
from benchmarks.harness import fresh_process_peaks, print_peak, speed_pipe, time_interleaved


def _stock_and_traced(model: str, batch: int):
    pipe = speed_pipe(model)
    prompts = ["a red circle and a blue square", "a green triangle on the left", "a yellow square above a purple circle", "a blue circle"]
    prompts = (prompts * batch)[:batch]

    def stock():
        pipe(prompts, num_inference_steps=25, guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="np")

    def traced():
        with xattn.trace(pipe):
            stock()

    return stock, traced


def timing(model: str, reps: int, batch: int) -> dict:
    stock, traced = _stock_and_traced(model, batch)
    return {"model": model, "batch": batch} | time_interleaved({"stock": stock, "traced": traced}, reps)


def sd15_store_bytes() -> dict:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, block_out_channels=(32, 32, 64, 64), layers_per_block=2, cross_attention_dim=64, attention_head_dim=8,
        norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    cross = [k for k in unet.attn_processors if "attn2" in k]
    latents, text = torch.randn(2, 4, 64, 64), torch.randn(2, 77, 64)
    result = {"cross_attention_layers": len(cross)}
    for label, options in (("default", {}), ("per_layer", {"per_layer": True}), ("per_layer_and_heads", {"per_layer": True, "heads": True})):
        store = xattn.AttentionStore(**options)
        with torch.no_grad(), xattn.attach(unet, store) as state:
            state.restart(xattn.BatchLayout(("p",), guidance=True))
            unet(latents, 500, text)
        result[f"{label}_bytes_per_prompt"] = store.nbytes()
        result["resolutions"] = sorted({max(k.resolution) for k in store.sums}, reverse=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--model", default="embedded", choices=["embedded", "sd1-64"])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--peak-of", choices=["stock", "traced"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_of:
        stock, traced = _stock_and_traced(args.model, args.batch)
        print_peak(stock if args.peak_of == "stock" else traced)
        return
    results = {"store": sd15_store_bytes()}
    print(json.dumps(results["store"]), flush=True)
    results["timing"] = timing(args.model, args.reps, args.batch)
    print(json.dumps(results["timing"]), flush=True)
    results["peak_mib"] = fresh_process_peaks("benchmarks.attention_overhead", ["stock", "traced"], ["--batch", str(args.batch), "--model", args.model])
    print(json.dumps(results["peak_mib"]), flush=True)
    out = args.out or Path("benchmarks/results/attention_overhead.json" if args.model == "embedded" else f"benchmarks/results/attention_overhead_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
