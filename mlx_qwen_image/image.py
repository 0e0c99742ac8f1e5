"""Images <-> arrays: PIL images and uint8 pixels on one side, channels-last arrays in [-1, 1] on the other.

The conversions are diffusers' ``VaeImageProcessor`` ones: in, ``x / 255 * 2 - 1``; out, ``clip(x / 2 + 0.5, 0,
1)``, then ``round(255 * .)`` for uint8. Batches are (B, H, W, 3); a single (H, W, 3) image is accepted too.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np
from PIL import Image


def open_image(image) -> Image.Image:
    """A picture (a path or a PIL image) as an RGB PIL image; an unreadable one is a one-line ``ValueError``."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as f:
            return f.convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {image}: {e}") from None


def resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """Lanczos, as diffusers' image processor resizes; the picture itself when it already has that size."""
    return image if image.size == (width, height) else image.resize((width, height), resample=Image.LANCZOS)


def fit_area(width: int, height: int, area: int = 1024 * 1024, multiple: int = 32) -> tuple[int, int]:
    """The size with the aspect of ``width`` x ``height`` and about ``area`` pixels, sides multiples of 32."""
    import math

    w = math.sqrt(area * width / height)
    return round(w / multiple) * multiple, round(w / (width / height) / multiple) * multiple


def pil_to_array(images: Image.Image | Sequence[Image.Image], dtype: mx.Dtype = mx.float32) -> mx.array:
    """One image or a list of equally sized images -> (B, H, W, 3) in [-1, 1]."""
    if isinstance(images, Image.Image):
        images = [images]
    pixels = np.stack([np.asarray(img.convert("RGB")) for img in images])
    return uint8_to_array(pixels, dtype)


def uint8_to_array(pixels: np.ndarray, dtype: mx.Dtype = mx.float32) -> mx.array:
    """uint8 pixels (B, H, W, 3) or (H, W, 3) -> float array of the same shape in [-1, 1]."""
    x = np.asarray(pixels).astype(np.float32) / 255.0
    return mx.array(x * 2.0 - 1.0).astype(dtype)


def array_to_numpy(x: mx.array | np.ndarray) -> np.ndarray:
    """Decoded images in [-1, 1] (any float dtype) -> float32 numpy in [0, 1], the pipeline's ``output="np"``."""
    x = x.astype(mx.float32) if isinstance(x, mx.array) else np.asarray(x, dtype=np.float32)
    return np.clip(np.asarray(x) / 2.0 + 0.5, 0.0, 1.0)


def array_to_uint8(x: mx.array | np.ndarray) -> np.ndarray:
    """Decoded images in [-1, 1] -> uint8 pixels, rounded to nearest."""
    return np.round(array_to_numpy(x) * 255.0).astype(np.uint8)


def array_to_pil(x: mx.array | np.ndarray) -> list[Image.Image]:
    """Decoded images (B, H, W, 3) or (H, W, 3) in [-1, 1] -> a list of RGB PIL images."""
    pixels = array_to_uint8(x)
    if pixels.ndim == 3:
        pixels = pixels[None]
    return [Image.fromarray(p) for p in pixels]


def save_png(image: Image.Image, path, metadata: dict | None = None):
    """Write a PNG with ``metadata`` as text chunks, atomically: a temporary file beside it, then a rename."""
    import os
    import tempfile
    from pathlib import Path

    from PIL import PngImagePlugin

    path = Path(path)
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_itxt(key, str(value))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
