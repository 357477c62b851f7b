"""Are the embedded model's training gradients right under torch.compile? Against float64, per UNet block.

    python -m benchmarks.compiled_gradients [--batch 8] [--out benchmarks/results/compiled_gradients.json]

The embedded model's UNet (fresh weights, seed 0) and the v-prediction MSE of one random batch:
the gradient of every parameter in float32 eager, under torch.compile with Inductor and with
`aot_eager`, each against the same step in float64 eager. Reported: the relative error of all
gradients together, and the largest relative error within each block. The trainer runs eagerly
because Inductor's is wrong here (shapes/train.py); rerun this after a torch upgrade before
compiling it again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from shapes import architecture


def block_of(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:3] if parts[0] in ("down_blocks", "up_blocks") else parts[:2] if parts[0] == "mid_block" else parts[:1])


def relative_errors(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict:
    total = sum(((grads[n] - reference[n]) ** 2).sum() for n in reference).sqrt() / sum((reference[n] ** 2).sum() for n in reference).sqrt()
    blocks: dict[str, float] = {}
    for name, ref in reference.items():
        error = ((grads[name] - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        blocks[block_of(name)] = max(blocks.get(block_of(name), 0.0), error)
    return {"all": total.item(), "blocks": blocks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compiled_gradients.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    unet = architecture.build_unet()
    side = architecture.LATENT_SIZE
    inputs = (torch.randn(args.batch, 4, side, side), torch.randint(0, 1000, (args.batch,)), torch.randn(args.batch, 77, architecture.TEXT_WIDTH))
    target = torch.randn(args.batch, 4, side, side)

    def gradients(forward, dtype=torch.float32) -> dict[str, torch.Tensor]:
        unet.to(dtype).zero_grad(set_to_none=True)
        sample, t, states = inputs
        F.mse_loss(forward(sample.to(dtype), t, states.to(dtype)).sample, target.to(dtype)).backward()
        grads = {n: p.grad.double().clone() for n, p in unet.named_parameters()}
        unet.float()
        return grads

    reference = gradients(unet.forward, torch.float64)
    results = {"torch": torch.__version__, "batch": args.batch, "eager": relative_errors(gradients(unet.forward), reference)}
    for backend in ("inductor", "aot_eager"):
        results[backend] = relative_errors(gradients(torch.compile(unet.forward, backend=backend)), reference)
        torch._dynamo.reset()
    for mode in ("eager", "inductor", "aot_eager"):
        worst = max(results[mode]["blocks"].items(), key=lambda kv: kv[1])
        print(f"{mode:9s} all gradients {results[mode]['all']:.2e}; worst block {worst[0]} {worst[1]:.2e}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
