"""The `xattn` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipelines.generate import GenerationSettings


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="diffusers folder or hub id (SD 1.x/2.x/XL); default: the embedded shapes model")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image (image i uses seed+i)")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (1 turns it off)")


def cmd_generate(args: argparse.Namespace) -> None:
    from pipelines.generate import generate_to_files
    from pipelines.loading import load_pipeline, model_label

    pipe = load_pipeline(args.model)
    settings = GenerationSettings(args.prompt, seed=args.seed, steps=args.steps, guidance=args.guidance, size=args.size)
    for path in generate_to_files(pipe, settings, Path(args.out), model_label(args.model), num=args.num):
        print(path)


def cmd_maps(args: argparse.Namespace) -> None:
    from pipelines.loading import load_pipeline, model_label
    from pipelines.maps import generate_with_maps, write_maps

    pipe = load_pipeline(args.model)
    settings = GenerationSettings(args.prompt, seed=args.seed, steps=args.steps, guidance=args.guidance)
    words = [w.strip() for w in args.words.split(",") if w.strip()] if args.words else None
    image, maps = generate_with_maps(pipe, settings, words)
    for path in write_maps(Path(args.out), image, maps, settings.metadata(model_label(args.model))):
        print(path)


def cmd_demo(args: argparse.Namespace) -> None:
    from ui.demo import run_demo

    index = run_demo(Path(args.out), seed=args.seed)
    print(f"demo written: {index}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xattn", description="Record, visualise and rewrite cross-attention in diffusion models.")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate images from a prompt")
    generate.add_argument("prompt")
    _add_generation_options(generate)
    generate.add_argument("--num", type=int, default=1, help="how many images")
    generate.add_argument("--size", type=int, help="image side in pixels (default: the model's own)")
    generate.add_argument("--out", default="outputs/generate", help="folder for the PNGs")
    generate.set_defaults(run=cmd_generate)

    maps = commands.add_parser("maps", help="generate an image and write per-word cross-attention heat maps")
    maps.add_argument("prompt")
    maps.add_argument("--words", help="comma-separated words or phrases (default: every word of the prompt)")
    _add_generation_options(maps)
    maps.add_argument("--out", default="outputs/maps", help="folder for image.png, the overlays, grid.png and maps.npz")
    maps.set_defaults(run=cmd_maps)

    demo = commands.add_parser("demo", help="the main job on the embedded model: PNGs and an index page")
    demo.add_argument("--out", default="outputs/demo")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"xattn {args.command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
