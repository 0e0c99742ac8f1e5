"""Images <-> arrays: PIL images and uint8 pixels on one side, channels-last arrays in [-1, 1] on the other.

The conversions are diffusers' ``VaeImageProcessor`` ones: in, ``x / 255 * 2 - 1``; out, ``clip(x / 2 + 0.5, 0,
1)``, then ``round(255 * .)`` for uint8. Batches are (B, H, W, 3); a single (H, W, 3) image is accepted too.
"""

from __future__ import annotations

from collections.abc import Sequence

import warnings

import mlx.core as mx
import numpy as np
from PIL import Image, ImageOps


MAX_PICTURE_PIXELS = 100_000_000  # a 48-50 Mpx phone photo fits; every run resizes pictures to about 1 Mpx
MAX_PICTURE_ASPECT = 16  # the models' official sizes stay within 16:9; a strip beyond 16:1 has no usable size


def open_image(image, name: str | None = None) -> Image.Image:
    """A picture (a path or a PIL image) as an RGB PIL image, or RGBA when it has transparency, as diffusers'
    loader gives it (EXIF rotation applied), with 16-bit and 32-bit grey pictures scaled to 8 bits instead of
    clipped to white. Anything unusable
    (missing, not a picture, truncated, a decompression bomb, a strip) is a one-line ``ValueError``."""
    label = name or (str(image) if not isinstance(image, Image.Image) else "the picture")
    if isinstance(image, Image.Image):
        picture = image
    else:
        try:
            with warnings.catch_warnings():  # the size check below is ours, with a clearer message
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                picture = Image.open(image)
        except Image.DecompressionBombError:
            raise ValueError(f"picture {label} is larger than {MAX_PICTURE_PIXELS // 10**6} megapixels "
                             "(a decompression bomb?); scale it down first") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise ValueError(f"cannot read image {label}: {e}") from None
        _check_size(picture.size, label)  # from the header, before anything is decoded
        try:
            picture.load()
        except (OSError, ValueError, SyntaxError) as e:  # a truncated or corrupt file
            raise ValueError(f"cannot read image {label}: {e}") from None
    _check_size(picture.size, label)
    picture = ImageOps.exif_transpose(picture)
    if picture.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(picture, dtype=np.float64)
        top = 1.0 if picture.mode == "F" and values.max(initial=0) <= 1 else 65535.0
        picture = Image.fromarray(np.round(np.clip(values / top, 0, 1) * 255).astype(np.uint8), "L")
    alpha = "A" in picture.getbands() or picture.info.get("transparency") is not None
    return picture.convert("RGBA" if alpha else "RGB")


def on_white(image: Image.Image) -> Image.Image:
    """An RGBA picture composited onto white (what Qwen-Image 2.1's vision tower was trained to see), as diffusers
    pastes it; any other picture as RGB."""
    if image.mode != "RGBA":
        return image.convert("RGB")
    white = Image.new("RGB", image.size, (255, 255, 255))
    white.paste(image, mask=image.getchannel("A"))
    return white


def _check_size(size: tuple[int, int], label: str):
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"picture {label} is empty ({width}x{height})")
    if width * height > MAX_PICTURE_PIXELS:
        raise ValueError(f"picture {label} is {width}x{height}, more than {MAX_PICTURE_PIXELS // 10**6} megapixels; "
                         "scale it down first")
    if max(width, height) > MAX_PICTURE_ASPECT * min(width, height):
        raise ValueError(f"picture {label} is {width}x{height}: an aspect ratio beyond {MAX_PICTURE_ASPECT}:1 "
                         "leaves no usable size; crop it")


def resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """Lanczos, as diffusers' image processor resizes; the picture itself when it already has that size."""
    return image if image.size == (width, height) else image.resize((width, height), resample=Image.LANCZOS)


def fit_area(width: int, height: int, area: int = 1024 * 1024, multiple: int = 32) -> tuple[int, int]:
    """The size with the aspect of ``width`` x ``height`` and about ``area`` pixels, sides multiples of 32."""
    import math

    w = math.sqrt(area * width / height)
    return round(w / multiple) * multiple, round(w / (width / height) / multiple) * multiple


def pil_to_array(images: Image.Image | Sequence[Image.Image], dtype: mx.Dtype = mx.float32,
                 mode: str = "RGB") -> mx.array:
    """One image or a list of equally sized images -> (B, H, W, 3) in [-1, 1] (``mode="RGBA"``: 4 channels,
    opaque where the picture has no alpha)."""
    if isinstance(images, Image.Image):
        images = [images]
    pixels = np.stack([np.asarray(img.convert(mode)) for img in images])
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
    """Decoded images (B, H, W, 3 or 4) or (H, W, 3 or 4) in [-1, 1] -> a list of RGB (or RGBA) PIL images."""
    pixels = array_to_uint8(x)
    if pixels.ndim == 3:
        pixels = pixels[None]
    return [Image.fromarray(p) for p in pixels]


def save_png(image: Image.Image, path, metadata: dict | None = None, overwrite: bool = False):
    """Write a PNG with ``metadata`` as text chunks, atomically: a temporary file beside it, then a hard link (which
    fails if ``path`` appeared meanwhile, e.g. another run writing the same name) or, with ``overwrite``, a rename.
    The file gets the permissions the umask gives a new file."""
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
        os.chmod(tmp, 0o666 & ~_umask())
        if overwrite:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise FileExistsError(f"{path} appeared while this run was working (another run writing the same "
                                  "name?); it was left as it is: choose another name or pass --overwrite") from None
        except OSError:  # a file system without hard links: reserve the name exclusively, then rename onto it
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            os.replace(tmp, path)
            return
        os.unlink(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask
