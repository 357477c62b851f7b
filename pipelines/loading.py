"""Load a text-to-image pipeline: the embedded shapes model by default, or any SD 1.x/2.x/XL diffusers model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from shapes import MMDIT_PATH, MODEL_PATH

EMBEDDED = "embedded"
EMBEDDED_MMDIT = "embedded-mmdit"
EMBEDDED_MODELS = {EMBEDDED: MODEL_PATH, EMBEDDED_MMDIT: MMDIT_PATH}  # the shipped models of the shapes world


def resolve_model(model: str | Path | None) -> str:
    """The folder or hub id to load; None or "embedded" means the shipped shapes model (a UNet), "embedded-mmdit" its
    SD3-format MM-DiT sibling.

    A name that looks like a path (absolute, relative with ./ or ../, or with more than one /)
    must exist and hold a diffusers pipeline, else a FileNotFoundError says what to pass instead.
    """
    if model is None or str(model) in EMBEDDED_MODELS:
        return str(EMBEDDED_MODELS[str(model or EMBEDDED)])
    text = str(model)
    path = Path(text).expanduser()
    looks_like_path = path.is_absolute() or text.startswith((".", "~")) or text.count("/") != 1
    if path.exists():
        if not (path / "model_index.json").exists():
            raise FileNotFoundError(
                f"{text} exists but is not a diffusers pipeline folder (no model_index.json); "
                "pass the folder that holds model_index.json, or a hub id like stable-diffusion-v1-5/stable-diffusion-v1-5"
            )
        return str(path)
    if looks_like_path:
        raise FileNotFoundError(
            f"no model folder at {text}; pass a diffusers pipeline folder, a hub id (owner/name), "
            "or leave --model out for the embedded shapes model"
        )
    return text


def absent_components(source: str) -> dict[str, None]:
    """The components a local folder's model_index.json lists as null (SD3 saved without T5: `text_encoder_3`,
    `tokenizer_3`), to pass as None: diffusers refuses to load such a folder without them named."""
    index = Path(source) / "model_index.json"
    if not index.exists():
        return {}
    listed = json.loads(index.read_text())
    return {name: None for name, value in listed.items() if isinstance(value, list) and value == [None, None]}


def load_pipeline(model: str | Path | None = None, *, dtype: torch.dtype = torch.float32, device: str | None = None) -> DiffusionPipeline:
    """A ready pipeline with its progress bar on stderr; the right class (SD or SDXL) comes from the folder."""
    source = resolve_model(model)
    try:
        pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype, **absent_components(source))
    except OSError as error:
        raise OSError(f"could not load model {source!r}: {error}. Without network only local folders load.") from error
    if device:
        pipe.to(device)
    return pipe


def model_label(model: str | Path | None) -> str:
    """How a model is named in file metadata: 'embedded' for the shipped model, else what was given."""
    return EMBEDDED if model is None else str(model)
