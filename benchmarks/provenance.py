"""Fingerprints of what a quality figure depends on: the shipped model's files and the judge's readings.

The judge's fingerprint hashes what it reads from a fixed set of blurred, noisy renders (colour,
shape, box, template IoU and convexity), so it moves when the judge's behaviour does and not
when its source is only reworded.
"""

from __future__ import annotations

import hashlib

import numpy as np
from scipy import ndimage

from shapes import MODEL_PATH
from shapes.judge import read_objects
from shapes.scenes import make_scene

PROBE_SCENES = range(7_000_000, 7_000_100)


def model_digest() -> str:
    """SHA-256 over the shipped model folder's files (relative path and bytes, in path order)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in MODEL_PATH.rglob("*") if p.is_file()):
        digest.update(path.relative_to(MODEL_PATH).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def judge_digest() -> str:
    """SHA-256 of the judge's readings of 100 rendered scenes, blurred and noised with a fixed seed."""
    rng = np.random.default_rng(0)
    digest = hashlib.sha256()
    for seed in PROBE_SCENES:
        image = ndimage.gaussian_filter(make_scene(seed).image.astype(np.float32), (1.0, 1.0, 0))
        image = np.clip(image + rng.normal(0, 10, image.shape), 0, 255)
        for obj in read_objects(image):
            digest.update(f"{obj.colour} {obj.shape} {obj.box} {obj.shape_iou:.3f} {obj.convexity:.3f} {obj.clipped}".encode())
    return digest.hexdigest()


def current() -> dict[str, str]:
    return {"model": model_digest(), "judge": judge_digest()}

