"""Output files: names made from prompts, and PNGs written atomically with the settings that made them.

Kept free of torch and diffusers, so that commands which only write files (`xattn scene`) start at once.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from PIL import Image, PngImagePlugin


def slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "image"


def save_png(image: Image.Image, path: Path, metadata: dict[str, str]) -> Path:
    """Write atomically (a temporary file renamed into place) with metadata in PNG text chunks."""
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, str(value))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)
    return path
