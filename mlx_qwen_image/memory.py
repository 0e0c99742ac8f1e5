"""Rough memory estimates, so that a run that cannot fit is flagged before minutes of loading.

The figures are the weights' sizes from the checkpoint's safetensors headers when it is on disk, else the
registry's parameter counts times bytes per parameter (group-wise affine quantization stores a bf16 scale and
bias per group of 64: 0.5 extra bits per weight), plus a margin for activations that grows with the image.
Nothing here prints: the caller decides what to do with the estimate.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from .variants import DEFAULT_TEXT_TO_IMAGE, Variant

def bytes_per_param(bits: int | None, dtype: str = "bfloat16") -> float:
    if bits:
        return (bits + 0.5) / 8
    return 4.0 if dtype == "float32" else 2.0


def _header(file: Path) -> dict:
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def component_bytes(folder: Path, quantize: int | None, dtype: str, skip=("visual.", "lm_head")) -> float | None:
    """Bytes a component will take once loaded, from its safetensors headers (no tensor is read)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    params, stored, prequantized = 0, 0, False
    for file in files:
        for name, info in _header(file).items():
            if name == "__metadata__" or any(s in name for s in skip):
                continue
            prequantized |= name.endswith(".scales")
            params += math.prod(info["shape"])
            stored += info["data_offsets"][1] - info["data_offsets"][0]
    return stored if prequantized else params * bytes_per_param(quantize, dtype)


def estimate_bytes(model, quantize: int | None, width: int, height: int, cfg: bool, low_memory: bool,
                   dtype: str = "bfloat16", text_encoder_bits: int | None = None,
                   variant: Variant = DEFAULT_TEXT_TO_IMAGE) -> float:
    """Peak bytes of a run: the weights resident at once plus activation headroom. With ``low_memory`` the text
    encoder and the transformer are never resident together. ``variant`` gives the parameter counts of a
    checkpoint that is not on disk yet."""
    folder = Path(str(model)).expanduser()
    transformer = text = None
    if folder.is_dir():
        transformer = component_bytes(folder / "transformer", quantize, dtype)
        text = component_bytes(folder / "text_encoder", text_encoder_bits, dtype)
    if transformer is None:
        transformer = variant.transformer_params * bytes_per_param(quantize, dtype)
    if text is None:
        text = variant.text_encoder_params * bytes_per_param(text_encoder_bits, dtype)
    tokens = (width // 16) * (height // 16) * (2 if cfg else 1)
    activations = tokens * 3072 * 4 * 2 * 12 + width * height * 96 * 2 * 4
    return (max(transformer, text) if low_memory else transformer + text) + activations


def total_memory() -> int | None:
    try:
        import mlx.core as mx

        size = mx.device_info().get("memory_size")
        if size:
            return int(size)
    except Exception:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def too_large(model, quantize, width, height, cfg, low_memory, dtype="bfloat16", text_encoder_bits=None,
              variant: Variant = DEFAULT_TEXT_TO_IMAGE) -> str | None:
    """A one-line warning when a run's estimated peak exceeds 90% of this machine's memory, else None."""
    need = estimate_bytes(model, quantize, width, height, cfg, low_memory, dtype, text_encoder_bits, variant)
    have = total_memory()
    if not have or need <= 0.9 * have:
        return None
    hints = [h for h, ok in (("--quantize 4", quantize != 4), ("--low-memory", not low_memory),
                             ("--text-encoder-bits 8", not text_encoder_bits)) if ok]
    return (f"warning: {model} at {width}x{height} needs about {need / 1e9:.0f} GB and this machine has "
            f"{have / 1e9:.0f} GB" + (f"; try {' or '.join(hints)}" if hints else ""))
