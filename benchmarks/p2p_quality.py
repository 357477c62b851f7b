"""Prompt-to-Prompt quality on the embedded model, read by the judge.

    python -m benchmarks.p2p_quality [--seeds 100] [--out benchmarks/results/p2p_quality.json]

Rows (one-object prompts, 25 DDIM steps, guidance 5, seed i for pair i):
- shape swap ("a red circle" -> "a red square") and colour swap ("a red circle" -> "a blue circle"),
  each with injection (cross 0.8, self 0.4), with injection and local blending (the shape words),
  and without injection (same starting latent, no edit);
- refinement ("a red circle" -> "a red circle and a blue square");
- re-weighting the colour word of "a red circle" at several scales.
Measured over the pairs whose source the judge reads as exactly the source prompt: how often the
edit shows the asked object, how often it is exactly the target prompt, the PSNR outside both
objects (dilated 2 px), and whether the object stayed where it was: medians of the mask IoU
between the source object and the edited one, of their bounding-box IoU and of the distance
between their box centres. A shape swap cannot reach a mask IoU of 1 even in place (a circle
and a square in the same box overlap at 0.785), so its rows also give the IoU of the two shapes
drawn in the source's box, the ceiling of an edit that keeps the object exactly in place; the
world draws every shape in a 2 x half-size box, so the box IoU is the like-for-like measure.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from editors import LocalBlend, Refine, Reweight, Swap
from editors.conventions import XATTN, Conventions
from pipelines.edit import prompt_to_prompt
from pipelines.images import psnr
from pipelines.loading import load_pipeline
from shapes import COLOURS, SHAPES, match_caption, read_objects
from shapes.scenes import IMAGE_SIZE, shape_mask

SCALES = (-1.0, 0.0, 0.5, 1.0, 2.0, 4.0)


def pairs(kind: str, count: int) -> list[tuple[str, str, tuple[str, str], tuple[str, str]]]:
    """(source, target, source object, target object) for pair i of a row."""
    colours, out = list(COLOURS), []
    for i in range(count):
        c, s = colours[i % len(colours)], SHAPES[(i // len(colours)) % len(SHAPES)]
        if kind == "shape":
            s2 = SHAPES[(SHAPES.index(s) + 1 + i // 15 % 2) % len(SHAPES)]
            out.append((f"a {c} {s}", f"a {c} {s2}", (c, s), (c, s2)))
        else:
            c2 = colours[(colours.index(c) + 1 + i // 15 % 4) % len(colours)]
            out.append((f"a {c} {s}", f"a {c2} {s}", (c, s), (c2, s)))
    return out


def find_object(image: np.ndarray, thing: tuple[str, str]):
    """The first object the judge reads in `image` with this (colour, shape), or None."""
    return next((o for o in read_objects(image) if (o.colour, o.shape) == thing), None)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """IoU of two inclusive pixel boxes (x0, y0, x1, y1)."""
    w = min(a[2], b[2]) - max(a[0], b[0]) + 1
    h = min(a[3], b[3]) - max(a[1], b[1]) + 1
    inter = max(w, 0) * max(h, 0)
    area = lambda box: (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
    return inter / (area(a) + area(b) - inter)


def _centre_shift(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    return float(np.hypot((a[0] + a[2] - b[0] - b[2]) / 2, (a[1] + a[3] - b[1] - b[3]) / 2))


def _in_place_ceiling(obj, shape: str) -> float:
    """Mask IoU between the object and `shape` drawn in the object's box: a perfect in-place swap's IoU."""
    x0, y0, x1, y1 = obj.box
    half = (x1 - x0 + y1 - y0 + 2) / 4
    drawn = shape_mask(shape, (x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2, half, IMAGE_SIZE, 4) >= 0.5
    return _iou(obj.mask, drawn)


def _place_row(moved: list[tuple], with_ceiling: bool = False) -> dict:
    """Medians of how far each edited object moved from its source object; `moved` holds (before, after, asked shape)."""
    measures = {"median_iou": lambda a, b, _: _iou(a.mask, b.mask), "median_box_iou": lambda a, b, _: _box_iou(a.box, b.box),
                "median_centre_shift_px": lambda a, b, _: _centre_shift(a.box, b.box)}
    if with_ceiling:
        measures["median_in_place_iou_ceiling"] = lambda a, _, shape: _in_place_ceiling(a, shape)
    return {name: float(np.median([f(*m) for m in moved])) if moved else None for name, f in measures.items()}


def psnr_outside(a: np.ndarray, b: np.ndarray, masks: list[np.ndarray]) -> float:
    """PSNR of two images outside the union of `masks`, dilated 2 px."""
    return psnr(a, b, ~ndimage.binary_dilation(np.any(masks, axis=0), iterations=2))


SWAP_VARIANTS = {
    "injection": dict(),
    "injection + local blend": "blend",
    "no injection": dict(cross_steps=0, self_steps=0),
}


def run_swaps(pipe, kind: str, seeds: int, variants: dict = SWAP_VARIANTS, conventions: Conventions = XATTN) -> dict:
    rows = {}
    for name, options in variants.items():
        present, exact, moved, psnrs, valid, began = [], [], [], [], 0, time.time()
        for i, (source, target, thing, wanted) in enumerate(pairs(kind, seeds)):
            extra = options if isinstance(options, dict) else dict(blend=LocalBlend([thing[1]], [wanted[1]]))
            src_img, tgt_img = (np.rint(x * 255).astype(np.uint8) for x in prompt_to_prompt(pipe, [source, target], Swap(), seed=i, output_type="np",
                                                                                             conventions=conventions, **extra).images)
            if not match_caption(src_img, source).exact:
                continue
            valid += 1
            before, after = find_object(src_img, thing), find_object(tgt_img, wanted)
            present.append(after is not None)
            exact.append(match_caption(tgt_img, target).exact)
            if after is not None:
                moved.append((before, after, wanted[1]))
                psnrs.append(psnr_outside(src_img, tgt_img, [before.mask, after.mask]))
        rows[name] = {
            "pairs": seeds,
            "valid_sources": valid,
            "asked_object_present": float(np.mean(present)) if present else None,
            "target_exact": float(np.mean(exact)) if exact else None,
            **_place_row(moved, with_ceiling=kind == "shape"),
            "median_background_psnr_db": float(np.median(psnrs)) if psnrs else None,
            "seconds": time.time() - began,
        }
        print(kind, name, rows[name], flush=True)
    return rows


def run_refine(pipe, seeds: int, conventions: Conventions = XATTN) -> dict:
    both, moved, valid = [], [], 0
    colours = list(COLOURS)
    for i in range(seeds):
        c, s = colours[i % 5], SHAPES[(i // 5) % 3]
        c2, s2 = colours[(i + 2) % 5], SHAPES[(i // 5 + 1) % 3]
        source, target = f"a {c} {s}", f"a {c} {s} and a {c2} {s2}"
        src_img, tgt_img = (np.rint(x * 255).astype(np.uint8) for x in prompt_to_prompt(pipe, [source, target], Refine(), seed=i, output_type="np",
                                                                                         conventions=conventions).images)
        if not match_caption(src_img, source).exact:
            continue
        valid += 1
        both.append(match_caption(tgt_img, target).exact)
        kept = find_object(tgt_img, (c, s))
        if kept is not None:
            moved.append((find_object(src_img, (c, s)), kept, s))
    row = {"pairs": seeds, "valid_sources": valid, "target_exact": float(np.mean(both)) if both else None,
           **{f"kept_object_{k}": v for k, v in _place_row(moved).items()}}
    print("refine", row, flush=True)
    return row


def run_reweight(pipe, seeds: int) -> dict:
    """Mean saturation of the object's pixels and its area, per scale of the colour word's attention."""
    colours = list(COLOURS)
    per_scale = {scale: {"area": [], "chroma": []} for scale in SCALES}
    monotone = []
    for i in range(seeds):
        c, s = colours[i % 5], SHAPES[(i // 5) % 3]
        prompt = f"a {c} {s}"
        images = prompt_to_prompt(pipe, [prompt] * (len(SCALES) + 1), [Reweight({c: x}) for x in SCALES], seed=i, output_type="np").images
        chroma = []
        for scale, image in zip(SCALES, (np.rint(x * 255).astype(np.uint8) for x in images[1:])):
            rgb = image.astype(np.float64)
            sat = rgb.max(-1) - rgb.min(-1)
            chroma.append(float(sat[sat > 40].sum()))
            per_scale[scale]["chroma"].append(chroma[-1])
            per_scale[scale]["area"].append(int((sat > 40).sum()))
        monotone.append(all(a <= b for a, b in zip(chroma[1:], chroma[2:])))
    row = {
        "scales": list(SCALES),
        "mean_coloured_area_px": [float(np.mean(per_scale[x]["area"])) for x in SCALES],
        "mean_colour_mass": [float(np.mean(per_scale[x]["chroma"])) for x in SCALES],
        "seeds_monotone_from_0": float(np.mean(monotone)),
    }
    print("reweight", row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--model")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/p2p_quality.json"))
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    results = {
        "shape swap": run_swaps(pipe, "shape", args.seeds),
        "colour swap": run_swaps(pipe, "colour", args.seeds),
        "refine": run_refine(pipe, args.seeds),
        "reweight colour word": run_reweight(pipe, args.seeds // 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
