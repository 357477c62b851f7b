"""The embedded shapes world: scenes, captions, a judge that reads images exactly, and the shipped model."""

from pathlib import Path

from shapes.judge import JudgedObject, Verdict, match_caption, read_objects
from shapes.scenes import BACKGROUND, COLOURS, SHAPES, Layout, Scene, Thing, caption_of, erasure_prompts, make_scene, parse_caption

MODEL_PATH = Path(__file__).parent / "model"
MMDIT_PATH = Path(__file__).parent / "mmdit"  # the embedded MM-DiT (SD3 format), `--model embedded-mmdit`

__all__ = [
    "BACKGROUND",
    "COLOURS",
    "MMDIT_PATH",
    "MODEL_PATH",
    "SHAPES",
    "JudgedObject",
    "Layout",
    "Scene",
    "Thing",
    "Verdict",
    "caption_of",
    "erasure_prompts",
    "match_caption",
    "make_scene",
    "parse_caption",
    "read_objects",
]
