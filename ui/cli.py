"""The `xattn` command line."""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path

from ui.packages import require_own_packages

require_own_packages()  # before an import below could load another distribution's package of the same name

from pipelines.limits import MAX_NUM, MAX_SEED  # noqa: E402
from pipelines.messages import bounded  # noqa: E402


def _whole(low: int, high: int):
    """An argparse type: a whole number in [low, high], or an error argparse reports under the option's name."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{bounded(text)!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}; got {bounded(str(value))}")
        return value

    return parse


def _finite(text: str) -> float:
    """An argparse type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{bounded(text)!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number; got {bounded(text)}")
    return value


SEED = _whole(0, MAX_SEED)
MODEL_HELP = ("diffusers folder or hub id (SD 1.x/2.x/XL; maps, edit, invert, compose and unlearn also SD3/3.5, Flux, PixArt); "
              "default: the embedded shapes model; embedded-mmdit: its SD3-format MM-DiT")


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help=MODEL_HELP)
    parser.add_argument("--seed", type=SEED, default=0, help="seed of the first image (image i uses seed+i)")
    parser.add_argument("--steps", type=_whole(1, 1000), default=25, help="denoising steps (at most the scheduler's training steps, 1000)")
    parser.add_argument("--guidance", type=_finite, default=5.0, help="classifier-free guidance scale (1 turns it off)")


def _add_inversion_options(parser: argparse.ArgumentParser) -> None:
    from pipelines.inversion import METHODS
    from pipelines.inversion_cache import DEFAULT_CACHE

    parser.add_argument("--inversion", default="direct", choices=METHODS, help="how a real image is inverted (default: direct)")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="folder of cached inversions, keyed by image, caption, model and settings")
    parser.add_argument("--nouns", help="dpl: the caption's object nouns, comma-separated (each occurrence is one object)")
    parser.add_argument("--masks", nargs="+", metavar="NOUN=FILE",
                        help="dpl: a mask image per noun (white: the object), at the model's size; default: found by clustering")


def _words(text: str | None) -> list[str]:
    """The comma-separated words or phrases of an option."""
    return [w.strip() for w in (text or "").split(",") if w.strip()]


def cmd_generate(args: argparse.Namespace) -> None:
    from pipelines.generate import GenerationSettings, generate_to_files
    from pipelines.loading import load_pipeline, model_label

    pipe = load_pipeline(args.model)
    if args.erasure:
        from pipelines.erasure import load_erasure

        erasure = load_erasure(pipe, args.erasure)
        print(bounded(f"erasure applied: {erasure.metadata['method']} of {erasure.metadata['concept']!r}"), file=sys.stderr)
    settings = GenerationSettings(args.prompt, seed=args.seed, steps=args.steps, guidance=args.guidance, size=args.size)
    for path in generate_to_files(pipe, settings, Path(args.out), model_label(args.model), num=args.num):
        print(path)


def cmd_maps(args: argparse.Namespace) -> None:
    from pipelines.generate import GenerationSettings
    from pipelines.loading import load_pipeline, model_label
    from pipelines.maps import generate_with_maps, write_maps

    pipe = load_pipeline(args.model)
    settings = GenerationSettings(args.prompt, seed=args.seed, steps=args.steps, guidance=args.guidance, size=args.size)
    words = _words(args.words) or None
    image, maps = generate_with_maps(pipe, settings, words)
    for path in write_maps(Path(args.out), image, maps, settings.metadata(model_label(args.model))):
        print(path)


def cmd_edit(args: argparse.Namespace) -> None:
    from pipelines.edit import blend_for, choose_edit, describe, parse_window, prompt_to_prompt
    from pipelines.files import save_png
    from pipelines.loading import load_pipeline, model_label
    from pipelines.maps import write_maps
    from xattn.heatmap import grid
    from xattn.tokens import pipeline_tokenizer

    weights = {}
    for item in args.reweight or []:
        word, _, scale = item.partition("=")
        try:
            weights[word.strip()] = float(scale)
        except ValueError:
            raise ValueError(f"--reweight {bounded(item)!r}: write WORD=SCALE, e.g. red=2") from None
    pipe = load_pipeline(args.model)
    tokenizer = pipeline_tokenizer(pipe)
    edit = choose_edit(tokenizer, args.source, args.target, args.mode, weights)
    print(f"edit: {describe(edit)}", file=sys.stderr)
    blend = blend_for(tokenizer, args.source, args.target, args.blend) if args.blend else None
    inversion = _invert(pipe, args, args.source) if args.image else None
    result = prompt_to_prompt(pipe, [args.source, args.target], edit, cross_steps=parse_window(args.cross_steps),
                              self_steps=parse_window(args.self_steps), blend=blend, steps=args.steps,
                              guidance=args.guidance, seed=args.seed, inversion=inversion, maps=args.maps, joint_edit=args.joint_edit)
    meta = {"source": args.source, "target": args.target, "edit": describe(edit), "cross_steps": args.cross_steps,
            "self_steps": args.self_steps, "blend": ",".join(args.blend or []), "seed": args.seed, "steps": args.steps,
            "guidance": args.guidance, "model": model_label(args.model)}
    if inversion is not None:
        meta |= {"image": args.image, "inversion": args.inversion}
    out = Path(args.out)
    source, target = result.images
    if inversion is None:
        shown, labels = [source, target], ["source", "target"]
    else:
        shown, labels = [inversion.image, source, target], ["input", "redrawn", "target"]
    sheet = grid(shown, labels, columns=3, scale=max(1, 256 // source.size[0]))
    for name, image in (("source.png", source), ("target.png", target), ("side-by-side.png", sheet)):
        print(save_png(image, out / name, meta))
    for name in ("maps-source", "maps-target"):  # an earlier run's maps would sit beside this run's images
        shutil.rmtree(out / name, ignore_errors=True)
    if args.maps:
        for index, (name, image) in enumerate((("source", source), ("target", target))):
            for path in write_maps(out / f"maps-{name}", image, result.maps.word_maps(image=index), meta):
                print(path)


def _masks(items: list[str] | None) -> dict | None:
    """{noun: boolean array} from NOUN=FILE items (white where the object is)."""
    if not items:
        return None
    import numpy as np

    from pipelines.images import read_image

    masks = {}
    for item in items:
        noun, _, path = item.partition("=")
        if not noun.strip() or not path:
            raise ValueError(f"--masks {bounded(item)!r}: write NOUN=FILE, e.g. circle=circle-mask.png")
        masks[noun.strip()] = np.asarray(read_image(path).convert("L")) > 127
    return masks


def _invert(pipe, args: argparse.Namespace, caption: str):
    from pipelines.inversion import invert

    inversion = invert(pipe, args.image, caption, method=args.inversion, steps=args.steps, guidance=args.guidance, cache_dir=args.cache,
                       nouns=_words(args.nouns), masks=_masks(args.masks))
    took = f"{inversion.seconds:.1f} s" if inversion.seconds else "from the cache"
    print(f"inverted {args.image} with {args.inversion} ({took})", file=sys.stderr)
    return inversion


def cmd_invert(args: argparse.Namespace) -> None:
    from pipelines.files import save_png
    from pipelines.images import psnr
    from pipelines.inversion import reconstruct
    from pipelines.loading import load_pipeline, model_label

    pipe = load_pipeline(args.model)
    inversion = _invert(pipe, args, args.caption)
    redrawn = reconstruct(pipe, inversion)
    score = psnr(redrawn, inversion.image)
    meta = {"image": args.image, "caption": args.caption, "inversion": args.inversion, "steps": args.steps,
            "guidance": args.guidance, "model": model_label(args.model), "psnr_db": f"{score:.2f}"}
    out = Path(args.out)
    print(save_png(inversion.image, out / "input.png", meta))
    print(save_png(redrawn, out / "reconstruction.png", meta))
    print(f"reconstruction PSNR: {score:.2f} dB")


def cmd_flowedit(args: argparse.Namespace) -> None:
    from pipelines.files import save_png
    from pipelines.flowedit import flow_edit, settings_for
    from pipelines.loading import load_pipeline, model_label
    from xattn.heatmap import grid

    pipe = load_pipeline(args.model)
    settings = settings_for(pipe, steps=args.steps, n_max=args.n_max, source_guidance=args.source_guidance,
                            target_guidance=args.target_guidance)
    result = flow_edit(pipe, args.image, args.source, args.target, settings=settings, seed=args.seed)
    meta = {"image": args.image, "source": args.source, "target": args.target, "seed": args.seed, "steps": settings.steps,
            "n_max": settings.n_max, "source_guidance": settings.source_guidance, "target_guidance": settings.target_guidance,
            "model": model_label(args.model)}
    out = Path(args.out)
    fitted, edited = result.images
    sheet = grid([fitted, edited], ["input", "target"], columns=2, scale=max(1, 256 // fitted.size[0]))
    for name, image in (("input.png", fitted), ("target.png", edited), ("side-by-side.png", sheet)):
        print(save_png(image, out / name, meta))


def cmd_compose(args: argparse.Namespace) -> None:
    from pipelines.files import slug
    from pipelines.guidance import compose
    from pipelines.loading import load_pipeline, model_label
    from pipelines.maps import write_maps

    concepts = _words(args.concepts)
    pipe = load_pipeline(args.model)
    result = compose(pipe, args.prompt, concepts, method=args.method, num_images_per_prompt=args.num, seed=args.seed, steps=args.steps, guidance=args.guidance)
    out = Path(args.out)
    for i, image in enumerate(result.images):
        seed = args.seed + i
        meta = {"prompt": args.prompt, "concepts": ",".join(concepts), "method": args.method, "seed": seed,
                "steps": args.steps, "guidance": args.guidance, "model": model_label(args.model)}
        folder = out if args.num == 1 else out / f"{slug(args.prompt)}-seed{seed}"
        for path in write_maps(folder, image, result.maps(i, size=image.size[::-1]), meta):
            print(path)


def cmd_unlearn(args: argparse.Namespace) -> None:
    from pipelines.loading import EMBEDDED_MODELS, load_pipeline, model_label
    from pipelines.unlearn import UnlearnSettings, erase, template_prompts

    preserve = template_prompts(_words(args.preserve))
    settings = UnlearnSettings(method=args.method, concept=args.concept, guide=args.guide, contexts=tuple(args.contexts or ()),
                               preserve=tuple(args.preserve_prompts or ()) + preserve, group=args.group or "", steps=args.steps,
                               lr=args.lr, seed=args.seed)
    images = None
    if args.images:
        folder = Path(args.images)
        if not folder.is_dir():
            raise FileNotFoundError(f"no folder of images at {folder}")
        images = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        if not images:
            raise ValueError(f"{folder} holds no image files; put pictures of the concept there, or leave out --images")
    pipe, model = load_pipeline(args.model), model_label(args.model)
    path = erase(pipe, settings, args.out, model, images=images)
    print(path)
    if model in EMBEDDED_MODELS:
        from pipelines.erasure import load_erasure
        from pipelines.erasure_check import erasure_report

        load_erasure(pipe, path)
        pipe.set_progress_bar_config(disable=True)
        print(f"after erasing, the judge reads:\n{erasure_report(pipe, args.concept)}")


def cmd_batch(args: argparse.Namespace) -> None:
    from pipelines.batch import process_state, run_batch
    from pipelines.jobs import read_jobs
    from pipelines.loading import load_pipeline, model_label

    listed = read_jobs(args.jobs)
    main = process_state().is_main_process
    if main:
        for problem in listed.problems:
            print(f"{args.jobs}: {problem}", file=sys.stderr)
    pipe = load_pipeline(args.model)
    summary = run_batch(pipe, listed.jobs, args.out, model_label(args.model), invalid=listed.problems,
                        retry_failed=args.retry_failed, batch_size=args.batch_size)
    if main:
        print(summary)
    if not summary.ok:
        raise SystemExit(1)


def cmd_ui(args: argparse.Namespace) -> None:
    from ui.app import launch

    launch(host=args.host, port=args.port, model=args.model)


def cmd_scene(args: argparse.Namespace) -> None:
    from PIL import Image

    from pipelines.files import save_png
    from shapes import make_scene, parse_caption

    scene = make_scene(args.seed, parse_caption(args.caption))
    print(save_png(Image.fromarray(scene.image), Path(args.out), {"caption": scene.caption, "seed": str(args.seed)}))


def cmd_demo(args: argparse.Namespace) -> None:
    from ui.demo import run_demo

    index = run_demo(Path(args.out), seed=args.seed)
    print(f"demo written: {index}")


def build_parser() -> argparse.ArgumentParser:
    from pipelines.guidance import METHODS as GUIDANCE
    from pipelines.unlearn import GROUPS as UNLEARN_GROUPS
    from pipelines.unlearn import METHODS as UNLEARNING

    parser = argparse.ArgumentParser(prog="xattn", description="Record, visualise and rewrite cross-attention in diffusion models.")
    parser.add_argument("--verbose", action="store_true", help="show the libraries' own logs, warnings and loading bars")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate images from a prompt")
    generate.add_argument("prompt")
    _add_generation_options(generate)
    generate.add_argument("--num", type=_whole(1, MAX_NUM), default=1, help="how many images")
    generate.add_argument("--size", type=_whole(1, 2**20), help="image side in pixels (default: the model's own; at most 4x it)")
    generate.add_argument("--out", default="outputs/generate", help="folder for the PNGs")
    generate.add_argument("--erasure", help="an erasure file from `xattn unlearn` to apply to the model first")
    generate.set_defaults(run=cmd_generate)

    maps = commands.add_parser("maps", help="generate an image and write per-word cross-attention heat maps")
    maps.add_argument("prompt")
    maps.add_argument("--words", help="comma-separated words or phrases (default: every word of the prompt)")
    _add_generation_options(maps)
    maps.add_argument("--size", type=_whole(1, 2**20), help="image side in pixels (default: the model's own; at most 4x it)")
    maps.add_argument("--out", default="outputs/maps", help="folder for image.png, the overlays, grid.png and maps.npz")
    maps.set_defaults(run=cmd_maps)

    edit = commands.add_parser("edit", help="Prompt-to-Prompt: generate SOURCE and edit it into TARGET, keeping the picture")
    edit.add_argument("source")
    edit.add_argument("target")
    edit.add_argument("--mode", default="auto", choices=["auto", "replace", "refine", "reweight"],
                      help="auto: replace when the word counts match, refine when the target adds words")
    edit.add_argument("--reweight", nargs="+", metavar="WORD=SCALE", help="scale a target word's attention (on top of the mode)")
    edit.add_argument("--blend", nargs="+", metavar="WORD", help="local blending: change only where these words attend")
    edit.add_argument("--cross-steps", default="0.8", help="cross-attention injection: fraction, step count, or start,end")
    edit.add_argument("--self-steps", default="0.4", help="self-attention injection: fraction, step count, or start,end")
    edit.add_argument("--maps", action="store_true", help="also write both images' word maps as the edit drew them (maps-source/, maps-target/)")
    edit.add_argument("--joint-edit", default="p2p", choices=["p2p", "projection"],
                      help="on SD3/Flux joint attention: p2p edits the image-text block; projection gives the target the "
                           "source's image queries and keys within --self-steps (Shin et al. 2025)")
    _add_generation_options(edit)
    edit.add_argument("--image", help="edit this real image instead of generating SOURCE, which is then its caption")
    _add_inversion_options(edit)
    edit.add_argument("--out", default="outputs/edit", help="folder for source.png, target.png and side-by-side.png")
    edit.set_defaults(run=cmd_edit)

    invert = commands.add_parser("invert", help="invert a real image and redraw it: reconstruction.png and its PSNR")
    invert.add_argument("caption", help="what the image shows, in the model's words")
    invert.add_argument("--image", required=True, help="the image file (any size and mode; fitted to the model's size)")
    _add_generation_options(invert)
    _add_inversion_options(invert)
    invert.add_argument("--out", default="outputs/invert", help="folder for input.png and reconstruction.png")
    invert.set_defaults(run=cmd_invert)

    flowedit = commands.add_parser("flowedit", help="FlowEdit: edit a real image on a flow-matching model (SD3, Flux) with no inversion")
    flowedit.add_argument("source", help="what the image shows")
    flowedit.add_argument("target", help="what it should show")
    flowedit.add_argument("--image", required=True, help="the image file (any size and mode; fitted to the model's size)")
    flowedit.add_argument("--model", help="a diffusers folder or hub id of SD3/3.5 or Flux, or embedded-mmdit")
    flowedit.add_argument("--seed", type=SEED, default=0, help="seed of the noise each step draws")
    flowedit.add_argument("--steps", type=_whole(1, 1000), help="noise levels T (default: the authors', 50 on SD3, 28 on Flux)")
    flowedit.add_argument("--n-max", type=_whole(0, 1000), help="the edit runs over the last N_MAX levels (default: 33 of 50, 24 of 28)")
    flowedit.add_argument("--source-guidance", type=_finite, help="the source prompt's guidance (default: 3.5 on SD3, 1.5 on Flux)")
    flowedit.add_argument("--target-guidance", type=_finite, help="the target prompt's guidance (default: 13.5 on SD3, 5.5 on Flux)")
    flowedit.add_argument("--out", default="outputs/flowedit", help="folder for input.png, target.png and side-by-side.png")
    flowedit.set_defaults(run=cmd_flowedit)

    compose = commands.add_parser("compose", help="generate with attention-loss guidance (A-STAR, Attend-and-Excite) so every concept appears")
    compose.add_argument("prompt")
    compose.add_argument("--concepts", required=True, help="comma-separated words (or phrases) of the prompt, e.g. circle,square")
    compose.add_argument("--method", default="astar", choices=GUIDANCE,
                         help="astar: segregation + retention losses; attend-excite: the neglected concept's peak; none: plain")
    _add_generation_options(compose)
    compose.add_argument("--num", type=_whole(1, MAX_NUM), default=1, help="how many images (one folder each when more than one)")
    compose.add_argument("--out", default="outputs/compose", help="folder for image.png, each concept's overlay, grid.png and maps.npz")
    compose.set_defaults(run=cmd_compose)

    unlearn = commands.add_parser("unlearn", help="erase a concept from the model: writes OUT/erase-<concept>-<method>.safetensors")
    unlearn.add_argument("--concept", required=True, help="the word(s) to erase, e.g. circle")
    unlearn.add_argument("--method", default="uce", choices=UNLEARNING,
                         help="uce: closed form, seconds; esd-*: ESD's parameter groups; fmn: Forget-Me-Not; salun: SalUn; "
                         "salun-kv: SalUn on cross-attention keys and values")
    unlearn.add_argument("--guide", default="", help="what the concept turns into (UCE's guide, ESD's anchor, SalUn's replacement); "
                         "default: nothing (UCE drops the word; ESD asks for one on the embedded model)")
    unlearn.add_argument("--preserve", help="comma-separated words to keep (uce and salun; prompted as UCE's templates: 'a photo of a "
                         "WORD', ...); default: the world's other captions on the embedded model, everyday concepts elsewhere")
    unlearn.add_argument("--preserve-prompts", nargs="+", metavar="PROMPT", help="prompts to keep, as they are")
    unlearn.add_argument("--contexts", nargs="+", metavar="PROMPT", help="prompts that name the concept (default: the world's captions "
                         "of it on the embedded model, 'a photo of a CONCEPT', ... elsewhere)")
    unlearn.add_argument("--group", choices=UNLEARN_GROUPS, help="the weights that train (default: the method's; esd-x-strict: "
                         "cross-attention keys and values only, what SalUn needs to erase a colour into another)")
    unlearn.add_argument("--images", help="folder of your images of the concept for fmn and salun (default: the model draws its own)")
    unlearn.add_argument("--steps", type=_whole(0, 100_000), default=0, help="training steps (default: the method's)")
    unlearn.add_argument("--lr", type=_finite, default=0.0, help="learning rate (default: the method's)")
    unlearn.add_argument("--seed", type=_whole(0, MAX_SEED // 2), default=0)
    unlearn.add_argument("--model", help=MODEL_HELP)
    unlearn.add_argument("--out", required=True, help="folder for the erasure file and the checkpoint a rerun resumes from")
    unlearn.set_defaults(run=cmd_unlearn)

    batch = commands.add_parser("batch", help="run a JOBS file (JSONL or YAML) of generate/maps/edit/compose/invert/flowedit/erase-then-generate jobs")
    batch.add_argument("jobs", help="JSONL (one job per line) or YAML (a list of jobs)")
    batch.add_argument("--out", default="outputs/batch", help="folder for jobs/<id>/ and manifest.json; a rerun resumes it")
    batch.add_argument("--model", help=MODEL_HELP)
    batch.add_argument("--retry-failed", action="store_true", help="redo the jobs that failed in an earlier run")
    batch.add_argument("--batch-size", type=_whole(1, 256), default=8, help="generate jobs with the same settings per pipeline call")
    batch.set_defaults(run=cmd_batch)

    ui = commands.add_parser("ui", help="the Gradio app: inspect, edit, real image, compose, erase")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    ui.add_argument("--port", type=_whole(1, 65535), help="port (default: Gradio's, 7860 or the next free one)")
    ui.add_argument("--model", help=MODEL_HELP)
    ui.set_defaults(run=cmd_ui)

    scene = commands.add_parser("scene", help="draw a scene of the shapes world, a picture the model never drew: a real image to edit")
    scene.add_argument("caption", help="a caption of the world, e.g. 'a blue circle above a yellow circle'")
    scene.add_argument("--seed", type=SEED, default=7_000_000, help="where the objects stand and how big they are")
    scene.add_argument("--out", default="photo.png", help="the PNG to write")
    scene.set_defaults(run=cmd_scene)

    demo = commands.add_parser("demo", help="the main job on the embedded model: PNGs and an index page")
    demo.add_argument("--out", default="outputs/demo")
    demo.add_argument("--seed", type=SEED, default=0)
    demo.set_defaults(run=cmd_demo)
    return parser


def quiet_libraries() -> None:
    """Only errors from transformers and diffusers, and none of their loading bars: a command shows its own progress
    bar and the paths it writes. Our own warnings (an input fitted, a region not found) still show."""
    import transformers

    transformers.utils.logging.set_verbosity_error()  # before diffusers imports, which is when transformers warns
    transformers.utils.logging.disable_progress_bar()
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> None:
    early = argparse.ArgumentParser(add_help=False)  # --verbose decides before the parser's own imports load the libraries
    early.add_argument("--verbose", action="store_true")
    if not early.parse_known_args(argv)[0].verbose:
        quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError) as error:
        from pipelines.messages import bounded

        print(f"xattn {args.command}: error: {bounded(str(error))}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
