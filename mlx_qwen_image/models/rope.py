"""Three-axis rotary position embeddings of the Qwen-Image MMDiT.

Each head's 128 channels are 64 complex pairs (2k, 2k+1): 8 pairs rotate with the frame index, 28 with the
row and 28 with the column. Image token (f, h, w) of segment ``idx`` (0 = the generated image, 1, 2, ... =
Edit reference images) sits at frame ``idx + f`` and at centred row/column positions; text token ``j`` sits
at ``max_vid + j`` on all three axes. Tables are float32 (as the reference computes them) and built once per
(img_shapes, text length): `RopeCache` keeps the few recently used ones.
"""

from __future__ import annotations

from collections import OrderedDict

import mlx.core as mx


def _inv_freqs(axes_dims, theta: float) -> list[mx.array]:
    return [1.0 / mx.power(theta, mx.arange(0, d, 2, dtype=mx.float32) / d) for d in axes_dims]


def _segment_positions(frames: int, height: int, width: int, idx: int):
    """Frame, row and column position of each token of one image segment, in raster order."""
    f = mx.arange(idx, idx + frames, dtype=mx.float32)
    h = mx.arange(-(height - height // 2), height // 2, dtype=mx.float32)
    w = mx.arange(-(width - width // 2), width // 2, dtype=mx.float32)
    shape = (frames, height, width)
    f = mx.broadcast_to(f[:, None, None], shape).reshape(-1)
    h = mx.broadcast_to(h[None, :, None], shape).reshape(-1)
    w = mx.broadcast_to(w[None, None, :], shape).reshape(-1)
    return f, h, w


def rope_angles(img_shapes, text_len: int, axes_dims=(16, 56, 56), theta: float = 10000.0) -> mx.array:
    """Rotation angles (text_len + image tokens, head_dim / 2) in float32, text first as in attention.

    ``img_shapes``: the segments of one batch item, a list of (frames, height, width) in latent patches.
    """
    inv = _inv_freqs(axes_dims, theta)
    per_axis = [[], [], []]
    max_vid = 0
    for idx, (frames, height, width) in enumerate(img_shapes):
        for axis, pos in enumerate(_segment_positions(frames, height, width, idx)):
            per_axis[axis].append(pos)
        max_vid = max(max_vid, height // 2, width // 2)
    img = mx.concatenate(
        [mx.concatenate(p)[:, None] * f[None, :] for p, f in zip(per_axis, inv)], axis=-1
    )
    txt_pos = mx.arange(max_vid, max_vid + text_len, dtype=mx.float32)
    txt = txt_pos[:, None] * mx.concatenate(inv)[None, :]
    return mx.concatenate([txt, img], axis=0)


def rope_table(img_shapes, text_len: int, axes_dims=(16, 56, 56), theta: float = 10000.0):
    """(cos, sin), each (1, 1, S, head_dim / 2) float32, for queries/keys laid out (B, heads, S, head_dim)."""
    angles = rope_angles(img_shapes, text_len, axes_dims, theta)
    return mx.cos(angles)[None, None], mx.sin(angles)[None, None]


@mx.compile
def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate interleaved pairs (2k, 2k+1) of ``x`` (..., S, D) as complex numbers, in float32."""
    shape = x.shape
    pairs = x.astype(mx.float32).reshape(*shape[:-1], shape[-1] // 2, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    out = mx.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
    return out.reshape(shape).astype(x.dtype)


class RopeCache:
    """A small LRU of RoPE tables keyed by (img_shapes, text length); owned by one transformer."""

    def __init__(self, axes_dims=(16, 56, 56), theta: float = 10000.0, size: int = 4):
        self.axes_dims, self.theta, self.size = tuple(axes_dims), theta, size
        self._tables: OrderedDict = OrderedDict()

    def __call__(self, img_shapes, text_len: int):
        key = (tuple(tuple(int(v) for v in s) for s in img_shapes), int(text_len))
        if key in self._tables:
            self._tables.move_to_end(key)
            return self._tables[key]
        table = rope_table(key[0], key[1], self.axes_dims, self.theta)
        mx.eval(table)
        self._tables[key] = table
        if len(self._tables) > self.size:
            self._tables.popitem(last=False)
        return table

    def clear(self):
        self._tables.clear()
