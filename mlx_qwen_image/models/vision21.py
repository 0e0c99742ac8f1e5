"""Qwen3-VL's vision tower: what Qwen-Image 2.1's text encoder sees of its input pictures.

An image arrives as the image processor's patches: ``(grid_t * grid_h * grid_w, 3 * 2 * 16 * 16)`` rows in
merge-block order (each 2x2 block of 16 px patches is 4 consecutive rows), one ``(t, h, w)`` grid per image. The
tower embeds each patch (the checkpoint's Conv3d with stride = kernel, bias included, is a matmul on the flattened
patch), adds a learned position embedding, runs 27 pre-LayerNorm blocks with 2-D rotary attention, and merges every
2x2 block into one feature as wide as the language model's embeddings.

Differences from the Qwen2.5-VL tower of `vision`: every block attends over the whole frame (no windows), the norms
are LayerNorms and every linear has a bias, the MLP is a plain GELU-tanh one (the mergers' GELU is the exact erf
one), and two more things:

- Learned positions. ``pos_embed`` holds a square ``side x side`` grid (48 x 48) of embeddings; each image's
  ``h x w`` patch grid samples it bilinearly with aligned corners (patch row ``r`` sits at ``r * (side - 1) /
  (h - 1)`` on the table), i.e. four table rows and weights per patch. We compute the taps and weights in numpy in
  float32 with the same operations as transformers, in the processor's merge-block token order.
- Deepstack. After each block in ``deepstack_visual_indexes`` the hidden states also go through a merger of their
  own (``deepstack_merger_list``, in list order); the text encoder adds those features to the image tokens' hidden
  states after its first decoder layers. These mergers normalise *after* the 2x2 shuffle (a LayerNorm over the
  4 * hidden concatenation); the final merger normalises each token before it.

Attention never crosses frames: each frame of each image is one contiguous run of tokens, attended on its own.

Parameter names equal the checkpoint names under ``model.visual.`` (``blocks.0.attn.qkv``, ``merger.linear_fc1``,
``deepstack_merger_list.0.norm``); `Qwen3VisionTower.sanitize` strips that prefix (or the older ``visual.``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import ConfigError, _known_fields, _require, validate
from .vision import rope_float32

# transformers' activation names for the blocks' MLP; the mergers always use the exact (erf) GELU.
ACTIVATIONS = {"gelu_pytorch_tanh": nn.gelu_approx, "gelu_new": nn.gelu_approx, "gelu": nn.gelu}


@dataclass
class Vision21Config:
    """Qwen3-VL's vision tower (the ``vision_config`` of the text encoder's config); defaults as transformers'."""

    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    # transformers' default; Qwen3-VL-8B's checkpoint says 4096, its language model's width.
    out_hidden_size: int = 3584
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    rope_theta: float = 10000.0
    hidden_act: str = "gelu_pytorch_tanh"

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "Vision21Config":
        fields = _known_fields(cls, config)
        if isinstance(fields.get("deepstack_visual_indexes"), list):
            fields["deepstack_visual_indexes"] = tuple(fields["deepstack_visual_indexes"])
        rope = config.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"rope_parameters must be an object, got {rope!r}")
        _require(rope.get("rope_type", "axial") in ("axial", "default"),
                 f"vision rope type {rope.get('rope_type')!r} is not supported (only the axial 2-D RoPE)")
        if "rope_theta" in rope:
            fields["rope_theta"] = rope["rope_theta"]
        config = cls(**fields)
        validate(config)
        return config

    _MIN = {"deepstack_visual_indexes": 0, "rope_theta": 1e-9}

    def _check(self):
        _require(self.hidden_act in ACTIVATIONS,
                 f"vision tower activation {self.hidden_act!r} is not supported (only {', '.join(ACTIVATIONS)})")
        _require(self.hidden_size % self.num_heads == 0,
                 f"hidden_size {self.hidden_size} must be a multiple of num_heads {self.num_heads}")
        # Height and width frequencies each fill a quarter of the head, twice over.
        _require(self.head_dim % 4 == 0, f"the vision head size {self.head_dim} must be a multiple of 4")
        indexes = self.deepstack_visual_indexes
        _require(len(set(indexes)) == len(indexes) and all(i < self.depth for i in indexes),
                 f"deepstack_visual_indexes {list(indexes)} must be distinct block numbers below depth {self.depth}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dims(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def grid_side(self) -> int:
        # transformers takes int(sqrt(n)): a non-square table just leaves its last rows unused.
        return math.isqrt(self.num_position_embeddings)


@dataclass
class Layout:
    """Everything the tower needs to know about a set of image grids, computed once per call."""

    cos: mx.array  # (N, 1, head_dim) float32, in the processor's token order
    sin: mx.array
    pos_index: mx.array  # (N, 4) int32: the pos_embed rows each patch interpolates ...
    pos_weight: mx.array  # (N, 4) float32: ... and their bilinear weights
    frames: list[tuple[int, int]]  # [start, end) of each frame's tokens: the attention segments

    @property
    def num_tokens(self) -> int:
        return self.frames[-1][1] if self.frames else 0


def bilinear_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """The two table positions (clamped to the table) and weights of each of ``index`` (0 .. size-1) along an axis
    of ``size`` patches resampled from ``side`` table entries, corners aligned; float32 as in transformers."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    weights = np.maximum(np.float32(1) - np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32)), 0)
    return taps, weights.astype(np.float32)


def grid_layout(grid_thw: Sequence[Sequence[int]], config: Vision21Config) -> Layout:
    """Rotary tables, position-embedding taps and attention segments for the images of ``grid_thw``."""
    merge, side = config.spatial_merge_size, config.grid_side
    rows, cols, taps, weights, frames = [], [], [], [], []
    start = 0
    for t, h, w in grid_thw:
        t, h, w = int(t), int(h), int(w)
        if min(t, h, w) < 1 or h % merge or w % merge:
            raise ValueError(f"image grid {[t, h, w]} is empty or not a multiple of the merge size {merge}")
        # Token k of a frame: merge block k // merge**2 (row-major over the blocks), then its row and column.
        block_row, block_col, sub_row, sub_col = np.meshgrid(
            np.arange(h // merge), np.arange(w // merge), np.arange(merge), np.arange(merge), indexing="ij"
        )
        row, col = (block_row * merge + sub_row).reshape(-1), (block_col * merge + sub_col).reshape(-1)
        row_taps, row_weights = bilinear_taps(row, h, side)
        col_taps, col_weights = bilinear_taps(col, w, side)
        # Separable: the 2 x 2 products, (top, left), (top, right), (bottom, left), (bottom, right).
        taps.append(np.tile((row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 4), (t, 1)))
        weights.append(np.tile((row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 4), (t, 1)))
        rows.append(np.tile(row, t))
        cols.append(np.tile(col, t))
        frames.extend((start + f * h * w, start + (f + 1) * h * w) for f in range(t))
        start += t * h * w
    if not frames:
        raise ValueError("no image grids")

    half = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_theta ** (mx.arange(0, half, 2, dtype=mx.float32) / half))
    row_angles = mx.array(np.concatenate(rows)).astype(mx.float32)[:, None] * inv_freq
    col_angles = mx.array(np.concatenate(cols)).astype(mx.float32)[:, None] * inv_freq
    # Rotate-half layout: height frequencies, then width frequencies, the whole repeated for both halves.
    angles = mx.concatenate([row_angles, col_angles, row_angles, col_angles], axis=-1)[:, None, :]
    return Layout(mx.cos(angles), mx.sin(angles), mx.array(np.concatenate(taps).astype(np.int32)),
                  mx.array(np.concatenate(weights)), frames)


class VisionAttention(nn.Module):
    def __init__(self, config: Vision21Config):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def __call__(self, x: mx.array, layout: Layout) -> mx.array:
        n, dims = x.shape
        qkv = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        q, k = (rope_float32(t, layout.cos, layout.sin) for t in (q, k))
        q, k, v = (t.transpose(1, 0, 2)[None] for t in (q, k, v))  # (1, heads, N, head_dim)
        # One attention per frame: frames are contiguous, and few (the edit inputs), so a loop is cheap and exact.
        outs = [mx.fast.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e],
                                                     scale=self.head_dim**-0.5) for s, e in layout.frames]
        out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)
        return self.proj(out[0].transpose(1, 0, 2).reshape(n, dims))


class VisionMLP(nn.Module):
    def __init__(self, config: Vision21Config):
        super().__init__()
        self.linear_fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)
        self.act = ACTIVATIONS[config.hidden_act]

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, config: Vision21Config):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def __call__(self, x: mx.array, layout: Layout) -> mx.array:
        x = x + self.attn(self.norm1(x), layout)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, config: Vision21Config):
        super().__init__()
        self.proj = nn.Linear(config.patch_dims, config.hidden_size, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return self.proj(x)


class PatchMerger(nn.Module):
    """Each 2x2 block's 4 tokens concatenated and mapped to the language model's width, with a LayerNorm before
    the concatenation (per token, the final merger) or after it (``postshuffle``, the deepstack mergers)."""

    def __init__(self, config: Vision21Config, postshuffle: bool):
        super().__init__()
        merged = config.hidden_size * config.spatial_merge_size**2
        self.merged, self.postshuffle = merged, postshuffle
        self.norm = nn.LayerNorm(merged if postshuffle else config.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(merged, merged, bias=True)
        self.linear_fc2 = nn.Linear(merged, config.out_hidden_size, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        if self.postshuffle:
            x = self.norm(x.reshape(-1, self.merged))
        else:
            x = self.norm(x).reshape(-1, self.merged)
        return self.linear_fc2(nn.gelu(self.linear_fc1(x)))


class Qwen3VisionTower(nn.Module):
    """``model.visual`` of Qwen3-VL: patches ``(N, C*T*P*P)`` + grids -> ``(image_embeds, deepstack)``."""

    def __init__(self, config: Vision21Config):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)
        self.blocks = [VisionBlock(config) for _ in range(config.depth)]
        self.merger = PatchMerger(config, postshuffle=False)
        self.deepstack_merger_list = [PatchMerger(config, postshuffle=True) for _ in config.deepstack_visual_indexes]

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """The tower's weights of a checkpoint, lazily, named relative to ``model.visual.`` (transformers 5) or
        ``visual.`` (older spelling), everything else dropped; the Conv3d kernel (out, C, T, P, P) becomes the
        (out, C*T*P*P) matrix."""
        out = {}
        for name, value in weights.items():
            for prefix in ("model.visual.", "visual."):
                if name.startswith(prefix):
                    out[name[len(prefix):]] = value
                    break
        kernel = out.get("patch_embed.proj.weight")
        if kernel is not None and kernel.ndim == 5:
            out["patch_embed.proj.weight"] = kernel.reshape(kernel.shape[0], -1)
        return out

    def __call__(self, pixel_values: mx.array, grid_thw) -> tuple[mx.array, list[mx.array]]:
        """``image_embeds (N / merge**2, out_hidden_size)``, one row per ``<|image_pad|>`` token in ``grid_thw``
        order, and the deepstack features (one array shaped like it per deepstack block, in block order)."""
        grid_thw = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3).tolist()
        layout = grid_layout(grid_thw, self.config)
        if pixel_values.ndim != 2 or pixel_values.shape[0] != layout.num_tokens:
            raise ValueError(f"patches of shape {tuple(pixel_values.shape)} do not match the image grids {grid_thw}")
        # The norms' dtype is the model's (a quantized linear's weight would be uint32).
        x = self.patch_embed(pixel_values.astype(self.merger.norm.weight.dtype))
        # Summed in float32 (the weights' dtype), as transformers does, then rounded to the model's dtype.
        pos = (self.pos_embed(layout.pos_index) * layout.pos_weight[..., None]).sum(axis=1)
        x = x + pos.astype(x.dtype)
        indexes = list(self.config.deepstack_visual_indexes)
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, layout)
            if i in indexes:
                # The merger belongs to the index's place in the list; the features come out in block order.
                deepstack.append(self.deepstack_merger_list[indexes.index(i)](x))
        return self.merger(x), deepstack
