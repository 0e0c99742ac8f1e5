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


def prefix_cache_bytes(variant: Variant, pictures=(), cfg: bool = False, dtype: str = "bfloat16",
                       text_tokens: int = 64) -> float:
    """The prefix K/V cache of a 2.1 run: per CFG row, the text and every picture's tokens (its latents at
    16 px and its vision tokens at 32 px, at the size the run resizes it to) in every block. ``pictures``: the
    (width, height) of each edit picture as given."""
    if not variant.kv_bytes_per_token:
        return 0.0
    from .image import fit_area

    tokens = text_tokens
    for w, h in pictures:
        w, h = fit_area(w, h, variant.reference_area)
        tokens += (w // 16) * (h // 16) + (w // 32) * (h // 32)
    return (2 if cfg else 1) * tokens * variant.kv_bytes_per_token * bytes_per_param(None, dtype) / 2


def estimate_bytes(model, quantize: int | None, width: int, height: int, cfg: bool, low_memory: bool,
                   dtype: str = "bfloat16", text_encoder_bits: int | None = None,
                   variant: Variant = DEFAULT_TEXT_TO_IMAGE, gguf=None, ranks: int = 1, pictures=()) -> float:
    """Peak bytes of a run: the weights resident at once plus activation headroom. With ``low_memory`` the text
    encoder and the transformer are never resident together. ``variant`` gives the parameter counts of a
    checkpoint that is not on disk yet; with ``gguf``, the transformer is that file's size. ``ranks``: the
    transformer split that many ways (tensor parallelism; rank 0, with the text encoder, is the fullest).
    ``pictures``: the (width, height) of the edit pictures, whose prefix K/V cache (2.1) lives with the
    transformer."""
    folder = Path(str(model)).expanduser()
    transformer = text = None
    if gguf is not None and Path(gguf).is_file():
        transformer = Path(gguf).stat().st_size
    if folder.is_dir():
        transformer = transformer or component_bytes(folder / "transformer", quantize, dtype)
        text = component_bytes(folder / "text_encoder", text_encoder_bits, dtype)
    if transformer is None:
        transformer = variant.transformer_params * bytes_per_param(quantize, dtype)
    if text is None:
        text = variant.text_encoder_params * bytes_per_param(text_encoder_bits, dtype)
    transformer = transformer / ranks + prefix_cache_bytes(variant, pictures, cfg, dtype)
    activations = activation_bytes(width, height, cfg, variant.stream_width, variant.attention_heads)
    return (max(transformer, text) if low_memory else transformer + text) + activations


def activation_bytes(width: int, height: int, cfg: bool, dim: int = 3072, heads: int = 24,
                     text_tokens: int = 64) -> float:
    """Activation headroom of a run: the transformer's widest intermediates (x12 the stream width, bf16, twice for
    the residual), the VAE decoder's, and on the CPU the attention scores (its attention is not fused)."""
    rows = 2 if cfg else 1
    tokens = (width // 16) * (height // 16)
    total = rows * tokens * dim * 4 * 2 * 12 + width * height * 96 * 2 * 4
    if _on_cpu():
        total += rows * heads * (tokens + text_tokens) ** 2 * 4
    return float(total)


def _on_cpu() -> bool:
    import mlx.core as mx

    return mx.default_device().type == mx.cpu


def refuse_size(width: int, height: int, cfg: bool, dim: int = 3072, heads: int = 24) -> str | None:
    """A one-line refusal when a run's activations alone cannot fit in this machine's memory (with the largest
    size of the same aspect that would), else None."""
    have = total_memory()
    need = activation_bytes(width, height, cfg, dim, heads)
    if not have or need <= have:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(40):  # the largest scale of the request whose activations fit
        mid = (lo + hi) / 2
        w, h = max(16, int(width * mid) // 16 * 16), max(16, int(height * mid) // 16 * 16)
        lo, hi = (mid, hi) if activation_bytes(w, h, cfg, dim, heads) <= have else (lo, mid)
    w, h = max(16, int(width * lo) // 16 * 16), max(16, int(height * lo) // 16 * 16)
    fits = activation_bytes(w, h, cfg, dim, heads) <= have
    return (f"{width}x{height} needs about {need / 1e9:,.0f} GB for the run's activations alone and this machine has "
            f"{have / 1e9:.0f} GB; " + (f"the largest size of this aspect that fits is {w}x{h}" if fits else
                                        "no size of this aspect fits"))


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
              variant: Variant = DEFAULT_TEXT_TO_IMAGE, gguf=None, ranks: int = 1, pictures=()) -> str | None:
    """A one-line warning when a run's estimated peak exceeds 90% of this machine's memory, else None."""
    need = estimate_bytes(model, quantize, width, height, cfg, low_memory, dtype, text_encoder_bits, variant, gguf,
                          ranks, pictures)
    have = total_memory()
    if not have or need <= 0.9 * have:
        return None
    kv = prefix_cache_bytes(variant, pictures, cfg, dtype)
    hints = [h for h, ok in (("--quantize 4", quantize != 4), ("--low-memory", not low_memory),
                             ("--text-encoder-bits 8", not text_encoder_bits),
                             ("fewer pictures", kv > 0.1 * need)) if ok]
    held = f" ({kv / 1e9:.1f} GB of it the pictures' K/V cache)" if kv else ""
    return (f"warning: {model} at {width}x{height} needs about {need / 1e9:.0f} GB{held} and this machine has "
            f"{have / 1e9:.0f} GB" + (f"; try {' or '.join(hints)}" if hints else ""))
