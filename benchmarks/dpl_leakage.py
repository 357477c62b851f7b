"""Leakage of real-image edits: does editing one object's word change the others? Per inversion method, on the
embedded model.

    python -m benchmarks.dpl_leakage [--images 100] [--methods ddim,null-text,direct,dpl,dpl-direct] [--same-shape]
        [--dpl-learning-rate 1e-4] [--dpl-inner-steps 21] [--out ...json]

"Real" images are rendered scenes of two and three objects at seeds the model never trained on (7,000,000 on; with
--same-shape, every object takes the first one's shape: one word, several objects, DPL's case), each
inverted under its own caption (25 DDIM steps, guidance 5; dpl learns every object's shape word). Each is edited twice
by a Prompt-to-Prompt word swap of its first object (cross injection 0.8, self 0.4, no blending, which would hide
leakage): its shape, and separately its colour (to one the scene does not use). Per method and edit:
- target exact: the judge reads the target caption exactly;
- leakage: another object changed (the judge does not find it with its colour and shape, or its box moved: IoU < 0.7);
- background PSNR against the input outside every object, old and new (dilated 2 px);
and per method the time to invert one image, paired with null-text's on the same images. Every method runs on an image
before the next image, and the JSON is rewritten after each: an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks.harness import write_json
from benchmarks.p2p_quality import _box_iou, find_object, psnr_outside
from editors import Swap
from pipelines.dpl import DPLSettings
from pipelines.edit import prompt_to_prompt
from pipelines.inversion import invert
from pipelines.loading import load_pipeline
from shapes import match_caption, read_objects
from shapes.scenes import COLOURS, caption_of, make_scene, swap_first_shape

FIRST_SEED = 7_000_000
METHODS = ("ddim", "null-text", "direct", "dpl", "dpl-direct")


def scenes(count: int, same_shape: bool = False) -> list:
    """The first `count` scenes of two or three objects from FIRST_SEED on; with `same_shape`, every object of a scene
    takes its first object's shape (where one word names several objects: DPL's case)."""
    found, seed = [], FIRST_SEED
    while len(found) < count:
        scene = make_scene(seed)
        if len(scene.objects) in (2, 3):
            if same_shape:
                shape = scene.layout.things[0].shape
                layout = replace(scene.layout, things=tuple(replace(t, shape=shape) for t in scene.layout.things))
                scene = make_scene(seed, layout)
            found.append(scene)
        seed += 1
    return found


def swap_first_colour(layout):
    """The layout with the first object in the first colour no object of the scene has."""
    used = {thing.colour for thing in layout.things}
    colour = next(c for c in COLOURS if c not in used)
    return replace(layout, things=(replace(layout.things[0], colour=colour), *layout.things[1:]))


def measure(pipe, scene, inversion, layout) -> tuple[bool, bool, float]:
    """(target exact, another object changed, background PSNR) of the swap into `layout`."""
    target = caption_of(layout)
    edited = np.asarray(prompt_to_prompt(pipe, [scene.caption, target], Swap(), inversion=inversion).images[1])
    read = read_objects(edited)
    leaked = not all(any((r.colour, r.shape) == (o.colour, o.shape) and _box_iou(r.box, o.box) >= 0.7 for r in read)
                     for o in scene.objects[1:])
    new = layout.things[0]
    drawn = find_object(edited, (new.colour, new.shape))
    masks = [o.mask for o in scene.objects] + ([drawn.mask] if drawn is not None else [])
    return match_caption(edited, target).exact, leaked, psnr_outside(edited, scene.image, masks)


def invert_and_edit(pipe, method: str, scene, dpl: DPLSettings) -> dict:
    """One image under one method: its inversion time and each edit's (target exact, leaked, background PSNR)."""
    nouns = [thing.shape for thing in scene.layout.things] if method.startswith("dpl") else ()
    inversion = invert(pipe, scene.image, scene.caption, method=method, nouns=nouns, dpl=dpl, cache_dir=None)
    edits = {"shape swap": swap_first_shape(scene.layout), "colour swap": swap_first_colour(scene.layout)}
    measured = {edit: measure(pipe, scene, inversion, layout) for edit, layout in edits.items()}
    return {"seconds": inversion.seconds, **{edit: [bool(e), bool(l), float(b)] for edit, (e, l, b) in measured.items()}}


def summary(rows: list[dict], method: str) -> dict:
    """A method's rates and medians over the images measured so far; its time paired per image with null-text's."""
    mine = [row[method] for row in rows]
    seconds = [m["seconds"] for m in mine]
    result = {"seconds_to_invert": seconds, "median_seconds_to_invert": float(np.median(seconds))}
    for edit in ("shape swap", "colour swap"):
        exact, leaked, background = zip(*(m[edit] for m in mine))
        three = [l for l, row in zip(leaked, rows) if row["objects"] == 3]
        result[edit] = {"target_exact": float(np.mean(exact)), "leakage": float(np.mean(leaked)),
                        "median_background_psnr_db": float(np.median(background)),
                        "three_objects_leakage": float(np.mean(three)) if three else None}
    if all("null-text" in row for row in rows):
        result["median_time_vs_null_text"] = float(np.median([row[method]["seconds"] / row["null-text"]["seconds"] for row in rows]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--dpl-inner-steps", type=int, default=DPLSettings.inner_steps, help="dpl's updates per step at most")
    parser.add_argument("--dpl-learning-rate", type=float, default=DPLSettings.learning_rate)
    parser.add_argument("--same-shape", action="store_true", help="every object of a scene has its first object's shape")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/dpl_leakage.json"))
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"no inversion method {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    pipe = load_pipeline(None)
    pipe.set_progress_bar_config(disable=True)
    images = scenes(args.images, args.same_shape)
    settings = {"images": len(images), "three_objects": sum(len(s.objects) == 3 for s in images), "same_shape": args.same_shape,
                "methods": methods, "dpl_inner_steps": args.dpl_inner_steps, "dpl_learning_rate": args.dpl_learning_rate}
    results = {**settings, "started": time.strftime("%Y-%m-%d %H:%M"), "per_image": []}
    if args.out.exists():  # an interrupted run of the same settings resumes after the last image it finished
        earlier = json.loads(args.out.read_text())
        if all(earlier.get(k) == v for k, v in settings.items()) and "per_image" in earlier:
            results = earlier
    dpl = DPLSettings(inner_steps=args.dpl_inner_steps, learning_rate=args.dpl_learning_rate)
    for scene in images[len(results["per_image"]):]:
        # every method on one image before the next: a slow stretch of the machine falls on all of them alike
        row = {"caption": scene.caption, "objects": len(scene.objects)}
        row.update({method: invert_and_edit(pipe, method, scene, dpl) for method in methods})
        results["per_image"].append(row)
        results.update({method: summary(results["per_image"], method) for method in methods})
        results["measured"] = len(results["per_image"])
        write_json(args.out, results)
        print(f"{len(results['per_image'])}/{len(images)}", {m: round(row[m]["seconds"], 1) for m in methods}, flush=True)


if __name__ == "__main__":
    main()
