"""Qwen2.5-VL's vision tower: what the editing models see of their input pictures.

An image arrives as the image processor's patches: ``(grid_t * grid_h * grid_w, 3 * 2 * 14 * 14)`` rows in
merge-block order (each 2x2 block of 14 px patches is 4 consecutive rows), one ``(t, h, w)`` grid per image.
The tower embeds each patch (the checkpoint's Conv3d with stride = kernel is a matmul on the flattened
patch), runs 32 pre-norm blocks with 2-D rotary attention, and merges every 2x2 block into one 3584-wide
feature, the width of the language model's embeddings.

Attention never crosses images. Most blocks attend only within windows of 112 px (4x4 merge blocks); the
blocks in ``fullatt_block_indexes`` attend over the whole image. transformers reorders the tokens window by
window and back; attention ignores token order within a window, so we keep the processor's order and gather
each window (or image) into a padded batch row instead, with the padded keys masked: exact, and the cost is
that of the windows, not of a block-diagonal mask over all tokens.

Parameter names equal the checkpoint names under ``visual.`` (``blocks.0.attn.qkv``, ``merger.mlp.0``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import VisionConfig


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps)


@dataclass
class Segments:
    """Tokens grouped into attention segments (windows or whole images), padded to one length.

    ``gather`` (S, Lmax) picks each segment's tokens from the sequence (padding repeats a valid token),
    ``scatter`` (N,) finds each token again in the flattened (S * Lmax) result, ``mask`` (S, 1, 1, Lmax)
    hides the padded keys, None when every segment has the same length.
    """

    gather: mx.array
    scatter: mx.array
    mask: mx.array | None

    @classmethod
    def from_groups(cls, groups: list[np.ndarray], num_tokens: int) -> "Segments":
        longest = max(len(g) for g in groups)
        gather = np.empty((len(groups), longest), dtype=np.int32)
        scatter = np.empty(num_tokens, dtype=np.int32)
        for s, g in enumerate(groups):
            gather[s, : len(g)] = g
            gather[s, len(g) :] = g[0]
            scatter[g] = s * longest + np.arange(len(g))
        lengths = np.array([len(g) for g in groups])
        mask = None
        if (lengths != longest).any():
            mask = mx.array(np.arange(longest)[None, :] < lengths[:, None])[:, None, None, :]
        return cls(mx.array(gather), mx.array(scatter), mask)


@dataclass
class Layout:
    """Everything the tower needs to know about a set of image grids, computed once per call."""

    cos: mx.array  # (N, 1, head_dim) float32, in the processor's token order
    sin: mx.array
    windows: Segments
    images: Segments


def image_layout(grid_thw: Sequence[Sequence[int]], config: VisionConfig) -> Layout:
    """Rotary tables and attention segments for the images of ``grid_thw`` (patch grids, in pixel_values order)."""
    merge = config.spatial_merge_size
    window = config.window_size // merge // config.patch_size  # window side in merge blocks (4)
    heights, widths, windows, images = [], [], [], []
    start = 0
    for t, h, w in grid_thw:
        t, h, w = int(t), int(h), int(w)
        if h % merge or w % merge:
            raise ValueError(f"image grid {h}x{w} is not a multiple of the merge size {merge}")
        bh, bw = h // merge, w // merge
        # Token k of a frame: merge block k // merge**2 (row-major over bh x bw), then its row and column.
        block_row, block_col, sub_row, sub_col = np.meshgrid(
            np.arange(bh), np.arange(bw), np.arange(merge), np.arange(merge), indexing="ij"
        )
        heights.append(np.tile((block_row * merge + sub_row).reshape(-1), t))
        widths.append(np.tile((block_col * merge + sub_col).reshape(-1), t))
        window_id = ((block_row // window) * -(-bw // window) + block_col // window).reshape(-1)
        for f in range(t):
            frame = start + f * h * w + np.arange(h * w)
            images.append(frame)
            order = np.argsort(window_id, kind="stable")
            bounds = np.flatnonzero(np.diff(window_id[order])) + 1
            windows.extend(np.split(frame[order], bounds))
        start += t * h * w

    quarter = config.head_dim // 4
    inv_freq = 1.0 / (config.rope_theta ** (mx.arange(0, 2 * quarter, 2, dtype=mx.float32) / (2 * quarter)))
    rows = mx.array(np.concatenate(heights)).astype(mx.float32)[:, None] * inv_freq
    cols = mx.array(np.concatenate(widths)).astype(mx.float32)[:, None] * inv_freq
    # Rotate-half layout: height frequencies, then width frequencies, the whole repeated for both halves.
    angles = mx.concatenate([rows, cols, rows, cols], axis=-1)[:, None, :]
    return Layout(mx.cos(angles), mx.sin(angles), Segments.from_groups(windows, start),
                  Segments.from_groups(images, start))


def rotate_half(x: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    return mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope_float32(t: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate-half RoPE computed in float32 and rounded back, as transformers rotates q and k of its towers."""
    t32 = t.astype(mx.float32)
    return (t32 * cos + rotate_half(t32) * sin).astype(t.dtype)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def __call__(self, x: mx.array, layout: Layout, segments: Segments) -> mx.array:
        n, dims = x.shape
        qkv = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        q, k = (rope_float32(t, layout.cos, layout.sin) for t in (q, k))
        # (S, heads, Lmax, head_dim): one batch row per window or image.
        q, k, v = (t[segments.gather].transpose(0, 2, 1, 3) for t in (q, k, v))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, mask=segments.mask)
        out = out.transpose(0, 2, 1, 3).reshape(-1, dims)[segments.scatter]
        return self.proj(out)


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size)
        self.norm2 = RMSNorm(config.hidden_size)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def __call__(self, x: mx.array, layout: Layout, segments: Segments) -> mx.array:
        x = x + self.attn(self.norm1(x), layout, segments)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        patch_dims = config.in_channels * config.temporal_patch_size * config.patch_size**2
        self.proj = nn.Linear(patch_dims, config.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.proj(x)


class PatchMerger(nn.Module):
    """RMSNorm, then each 2x2 block's 4 tokens concatenated and mapped to the language model's width."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        merged = config.hidden_size * config.spatial_merge_size**2
        self.ln_q = RMSNorm(config.hidden_size)
        self.mlp = [nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, config.out_hidden_size)]

    def __call__(self, x: mx.array) -> mx.array:
        x = self.ln_q(x).reshape(-1, self.mlp[0].weight.shape[1])
        for layer in self.mlp:
            x = layer(x)
        return x


class VisionModel(nn.Module):
    """``visual`` of the text encoder: patches ``(N, 1176)`` + grids -> features ``(N / 4, out_hidden_size)``."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.blocks = [VisionBlock(config) for _ in range(config.depth)]
        self.merger = PatchMerger(config)

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Names relative to ``visual.``; the Conv3d kernel (out, C, T, P, P) becomes the (out, C*T*P*P) matrix."""
        out = dict(weights)
        kernel = out.get("patch_embed.proj.weight")
        if kernel is not None and kernel.ndim == 5:
            out["patch_embed.proj.weight"] = kernel.reshape(kernel.shape[0], -1)
        return out

    def __call__(self, pixel_values: mx.array, grid_thw) -> mx.array:
        """Features of every image, concatenated in ``grid_thw`` order (one row per ``<|image_pad|>`` token)."""
        grid_thw = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3).tolist()
        layout = image_layout(grid_thw, self.config)
        if pixel_values.shape[0] != sum(t * h * w for t, h, w in grid_thw):
            raise ValueError(f"{pixel_values.shape[0]} patches do not match the image grids {grid_thw}")
        # The norms' dtype is the model's (a quantized linear's weight would be uint32).
        x = self.patch_embed(pixel_values.astype(self.merger.ln_q.weight.dtype))
        full = set(self.config.fullatt_block_indexes)
        for i, block in enumerate(self.blocks):
            x = block(x, layout, layout.images if i in full else layout.windows)
        return self.merger(x)
