"""The Qwen-VL image processor in numpy/PIL: pictures -> the vision tower's patches and grids.

One class serves every Qwen vision tower by configuration: Qwen2-VL/2.5-VL (the edit models: patch 14, CLIP
mean/std, the defaults here) and Qwen3-VL (Qwen-Image 2.1: patch 16, mean/std 0.5), both of which transformers
runs through its ``Qwen2VLImageProcessor``. Each image is converted to RGB (transparency composited onto white),
resized with PIL's bicubic filter so both sides are multiples of patch_size x merge_size (28 or 32) and the area
lies within [min_pixels, max_pixels], scaled to [0, 1], normalised with the configured mean/std, and cut into
patch_size-square patches. A still image is repeated over the frames of a temporal patch, so each row of
``pixel_values`` holds 3 x temporal_patch_size x patch_size**2 values; rows are ordered by merge block, the order
the vision tower's merger expects. This follows transformers' PIL ``Qwen2VLImageProcessor`` step by step (same
uint8 resize, same float64 rescale then float32), so the outputs are equal, not merely close.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .config import ConfigError, _known_fields, naming, read_json, validate

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_PAD = "<|image_pad|>"


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """The size Qwen2-VL resizes an image to: sides multiples of ``factor``, area within the bounds."""
    if height < 1 or width < 1:
        raise ValueError(f"image {width}x{height} (width x height) has no pixels; pass a picture at least 1x1")
    ratio = max(height, width) / min(height, width)
    if ratio > 200:  # transformers refuses these too
        raise ValueError(f"image {width}x{height} (width x height) has an aspect ratio of {ratio:.4g}:1, above the "
                         "200:1 the vision tower takes; crop or pad it closer to square")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """A PIL RGB image; transparency is composited onto white, as transformers does."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8 HxWxC, got {image.dtype}")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
            raise ValueError(f"image arrays must be HxW, HxWx3 (RGB) or HxWx4 (RGBA), got shape {image.shape}")
        image = Image.fromarray(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


@dataclasses.dataclass
class QwenImageProcessor:
    """Defaults are the released edit models' ``processor/preprocessor_config.json`` values (Qwen2.5-VL-7B's);
    Qwen3-VL's file sets patch_size 16, mean/std 0.5 and size={shortest_edge: 65536, longest_edge: 16777216}."""

    min_pixels: int = 56 * 56
    max_pixels: int = 12845056
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "QwenImageProcessor":
        """Reads min_pixels, max_pixels (or size), patch_size, temporal_patch_size, merge_size, image_mean,
        image_std, rescale_factor and resample; other keys (processor_class, do_resize, ...) are ignored."""
        fields = _known_fields(cls, config)
        # Newer transformers (and Qwen3-VL's files) write the bounds as size={shortest_edge, longest_edge} only;
        # a top-level min_pixels/max_pixels wins key by key, as in transformers' constructor.
        size = config.get("size") or {}
        if not isinstance(size, dict):
            raise ConfigError(f"size must be an object, got {size!r}")
        fields.setdefault("min_pixels", size.get("shortest_edge", cls.min_pixels))
        fields.setdefault("max_pixels", size.get("longest_edge", cls.max_pixels))
        for name in ("image_mean", "image_std"):
            if isinstance(fields.get(name), list):
                fields[name] = tuple(fields[name])
        processor = cls(**fields)
        validate(processor)
        return processor

    _MIN = {"resample": 0, "image_mean": None, "image_std": 1e-12, "rescale_factor": 1e-12}

    def _check(self):
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ConfigError("image_mean and image_std need three values (R, G, B)")
        if self.min_pixels > self.max_pixels:
            raise ConfigError(f"min_pixels {self.min_pixels} is above max_pixels {self.max_pixels}")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "QwenImageProcessor":
        """From a checkpoint's ``processor/preprocessor_config.json``."""
        path = Path(folder) / "preprocessor_config.json"
        with naming(path):
            return cls.from_dict(read_json(path))

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) an image of this size is resized to."""
        h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        if h < self.factor or w < self.factor:
            # Only a min_pixels below 1 (never from a validated config) lets a side round down to nothing.
            raise ValueError(f"image {width}x{height} (width x height) resizes to {w}x{h}, under one "
                             f"{self.factor}x{self.factor} merged token; set min_pixels (now {self.min_pixels}) to "
                             f"at least {self.factor**2}, or pass a larger picture")
        return w, h

    def num_image_tokens(self, grid_thw: Sequence[int]) -> int:
        """How many ``<|image_pad|>`` tokens stand for an image with this patch grid."""
        t, h, w = grid_thw
        return int(t) * int(h) * int(w) // self.merge_size**2

    def preprocess_one(self, image: Image.Image | np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        image = to_rgb(image)
        width, height = self.resized_size(*image.size)
        pixels = np.asarray(image.resize((width, height), resample=self.resample))
        pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        pixels = ((pixels - mean) / std).transpose(2, 0, 1)  # (C, H, W)

        p, m, channels = self.patch_size, self.merge_size, pixels.shape[0]
        grid_h, grid_w = height // p, width // p
        patches = pixels.reshape(channels, grid_h // m, m, p, grid_w // m, m, p)
        # -> (block row, block col, row in block, col in block, C, P, P), then the frame axis before C's P, P.
        patches = patches.transpose(1, 4, 2, 5, 0, 3, 6)
        patches = np.broadcast_to(
            patches[:, :, :, :, :, None], (*patches.shape[:5], self.temporal_patch_size, p, p)
        )
        return patches.reshape(grid_h * grid_w, -1), (1, grid_h, grid_w)

    def __call__(self, images: Sequence[Image.Image | np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """``pixel_values`` (sum of patches, 3*temporal*patch**2) float32 and ``image_grid_thw`` (images, 3) int64."""
        if isinstance(images, (Image.Image, np.ndarray)):
            images = [images]
        images = list(images)
        if not images:
            raise ValueError("no images were given; pass at least one picture")
        results = [self.preprocess_one(image) for image in images]
        pixel_values = np.concatenate([r[0] for r in results], axis=0)
        return pixel_values, np.array([r[1] for r in results], dtype=np.int64)

    def grids(self, images: Sequence[Image.Image]) -> np.ndarray:
        """The ``image_grid_thw`` that `__call__` gives these pictures, without preparing their pixels."""
        sizes = [self.resized_size(*image.size) for image in images]
        return np.array([(1, h // self.patch_size, w // self.patch_size) for w, h in sizes], dtype=np.int64)

    def expand_image_tokens(self, text: str, image_grid_thw: Sequence[Sequence[int]]) -> str:
        """Repeat each ``<|image_pad|>`` of ``text`` to its image's token count, images taken in order."""
        parts = text.split(IMAGE_PAD)
        if len(parts) - 1 != len(image_grid_thw):
            raise ValueError(f"the text has {len(parts) - 1} image placeholders for {len(image_grid_thw)} images")
        out = [parts[0]]
        for grid, part in zip(image_grid_thw, parts[1:]):
            out.append(IMAGE_PAD * self.num_image_tokens(grid) + part)
        return "".join(out)
