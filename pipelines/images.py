"""Real images in and out of a pipeline's latent space: any file or array, made the model's size.

What was done to an image to fit it (mode conversion, cropping, resizing) comes back as notes
for the caller to show, never silently.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image, UnidentifiedImageError

from xattn.denoiser import denoiser


@dataclass
class PreparedImage:
    image: Image.Image
    notes: list[str] = field(default_factory=list)


MAX_PIXELS = 50_000_000  # larger files are refused before decoding: a few KB of PNG can unpack to gigabytes


def _too_big(name: str, size: str) -> ValueError:
    return ValueError(f"{name} is {size}, more than the {MAX_PIXELS / 1e6:.0f} megapixels xattn reads; it was not decoded. "
                      "Shrink it first (the model works at its own size anyway)")


def _read(source: str | Path | bytes | Image.Image | np.ndarray) -> tuple[Image.Image, list[str]]:
    """The image and what reading it dropped (all frames but the first of an animation)."""
    if isinstance(source, Image.Image):
        return source, []
    if isinstance(source, np.ndarray):
        array = source
        if array.dtype != np.uint8:
            if array.min() < 0 or array.max() > 1:
                raise ValueError(f"a float image array must lie in [0, 1]; this one spans [{array.min():.3g}, {array.max():.3g}]")
            array = np.rint(array * 255).astype(np.uint8)
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
            raise ValueError(f"an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got shape {array.shape}")
        return Image.fromarray(array.squeeze(2) if array.ndim == 3 and array.shape[2] == 1 else array), []
    if isinstance(source, bytes):
        name, opener = "the image", io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no image file at {path}")
        name, opener = str(path), path
    try:
        with Image.open(opener) as opened:
            width, height = opened.size
            if width * height > MAX_PIXELS:
                raise _too_big(name, f"{width}x{height} pixels")
            frames = getattr(opened, "n_frames", 1)
            opened.load()
            notes = [f"first frame only, of the {frames} of an animation"] if frames > 1 else []
            return opened.copy(), notes
    except Image.DecompressionBombError as error:
        raise _too_big(name, f"a decompression bomb ({error})") from None
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"could not read {name} as an image ({error}); give a PNG, JPEG or other file PIL reads") from None


def read_image(source: str | Path | bytes | Image.Image | np.ndarray) -> Image.Image:
    """A PIL image from a path, encoded bytes, a PIL image, or an (H, W[, C]) array (uint8, or float in [0, 1]).
    Files of more than MAX_PIXELS are refused before they are decoded; an animation gives its first frame."""
    return _read(source)[0]


def prepare_image(source: str | Path | bytes | Image.Image | np.ndarray, size: tuple[int, int]) -> PreparedImage:
    """An RGB image of `size` (height, width): transparency flattened on white, centre-cropped to that shape, resized."""
    image, notes = _read(source)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        notes.append("transparent pixels composited on white")
    elif image.mode != "RGB":
        notes.append(f"converted from mode {image.mode} to RGB")
        image = image.convert("RGB")
    height, width = size
    have_w, have_h = image.size
    crop_w, crop_h = min(have_w, round(have_h * width / height)), min(have_h, round(have_w * height / width))
    if (crop_w, crop_h) != (have_w, have_h):
        left, top = (have_w - crop_w) // 2, (have_h - crop_h) // 2
        image = image.crop((left, top, left + crop_w, top + crop_h))
        notes.append(f"centre-cropped {have_w}x{have_h} to {crop_w}x{crop_h}")
    if image.size != (width, height):
        notes.append(f"resized {image.size[0]}x{image.size[1]} to the model's {width}x{height}")
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return PreparedImage(image, notes)


def image_to_latent(pipe: DiffusionPipeline, image: Image.Image) -> torch.Tensor:
    """(1, C, h, w) latent of an RGB image: the VAE posterior's mean, scaled as the denoiser expects."""
    vae = pipe.vae
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        latent = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latent - shift) * vae.config.scaling_factor).to(denoiser(pipe).dtype)


def latent_to_image(pipe: DiffusionPipeline, latent: torch.Tensor) -> Image.Image:
    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    with torch.no_grad():
        x = vae.decode(latent.to(vae.device, vae.dtype) / vae.config.scaling_factor + shift).sample
    if not torch.isfinite(x).all():
        raise ValueError("the model produced non-finite pixels (NaN or inf); nothing was saved. In float16 try float32")
    array = ((x[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def psnr(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray, mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB between two 8-bit RGB images, over the pixels of `mask` if given."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"images of different shapes {x.shape} and {y.shape}")
    err = (x - y) ** 2
    if mask is not None:
        err = err[mask]
    mse = float(err.mean()) if err.size else 0.0
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
