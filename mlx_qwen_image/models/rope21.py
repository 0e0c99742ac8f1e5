"""The joint sequence of the Qwen-Image 2.1 transformer: where text, condition and target tokens sit, their 3-axis
RoPE walk, and the block-causal attention structure over it.

The text encoder's sequence holds one ``<|image_pad|>`` slot per 2x2 latent tokens of each condition image; the
transformer expands every slot four-fold, drops the condition latents into them in order, and appends the target's
slots. The walk runs over that joint sequence: a text token advances one position on all three axes; an image
block sits at the frame position reached so far, its rows and columns centred on zero, then advances the position by
max(h, w). Attention is causal over text, bidirectional inside each image block, and the target sees everything.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .rope import _inv_freqs, apply_rope

SLOT_TOKENS = 4  # latent tokens per vision-encoder image slot

__all__ = ["SLOT_TOKENS", "Layout", "apply_rope", "block_ranges", "build_layout", "rope_walk"]


def block_ranges(is_image: np.ndarray, img_shapes) -> list[tuple[int, int]]:
    """[start, end) of every image block, from the blocks' token counts: two condition images next to each other
    form one run of image tokens but stay two blocks."""
    ranges, cursor = [], 0
    for i, (frames, h, w) in enumerate(img_shapes):
        if frames != 1:
            raise ValueError(f"image {i} has {frames} frames: Qwen-Image 2.1 takes single images")
        rest = np.flatnonzero(is_image[cursor:])
        if rest.size == 0 or not is_image[cursor + rest[0]: cursor + rest[0] + h * w].all():
            raise ValueError(f"image {i} ({h}x{w} tokens) does not fit the image slots of img_mask")
        start = cursor + int(rest[0])
        ranges.append((start, start + h * w))
        cursor = start + h * w
    if is_image[cursor:].any():
        raise ValueError("img_mask marks more image slots than img_shapes accounts for")
    return ranges


def rope_walk(is_image: np.ndarray, img_shapes) -> np.ndarray:
    """(S, 3) int (frame, row, column) positions of an unpadded joint sequence."""
    pos = np.empty((len(is_image), 3), np.int64)
    cursor = position = 0
    for (start, end), (_, h, w) in zip(block_ranges(is_image, img_shapes), img_shapes):
        pos[cursor:start] = np.arange(position, position + start - cursor)[:, None]
        position += start - cursor
        pos[start:end, 0] = position
        pos[start:end, 1] = np.repeat(np.arange(-(h - h // 2), h // 2), w)
        pos[start:end, 2] = np.tile(np.arange(-(w - w // 2), w // 2), h)
        position += max(h, w)
        cursor = end
    pos[cursor:] = np.arange(position, position + len(is_image) - cursor)[:, None]
    return pos


@dataclass
class Layout:
    """Everything about one call's sequence that does not depend on the activations (memoised across steps)."""

    prefix_len: int  # text + condition tokens; the target's tokens follow them
    target_len: int
    gather: mx.array  # (prefix_len,) indices into [text features; condition latents]
    segments: list  # (start, end, mask) over the prefix: one attention call each
    keys: mx.array | None  # (B, 1, 1, S) bool key mask over the whole sequence, None without padding
    rope_prefix: tuple  # (cos, sin), each (1 or B, 1, prefix_len, head_dim / 2)
    rope_target: tuple


def _angles(pos: np.ndarray, inv: list[mx.array]) -> mx.array:
    p = mx.array(pos.astype(np.float32))
    return mx.concatenate([p[:, a, None] * inv[a][None] for a in range(3)], axis=-1)


def build_layout(img_mask, img_shapes, text_mask, text_len: int, n_latents: int, axes_dims,
                 theta: float = 10000.0) -> Layout:
    """The layout for text of ``text_len`` tokens (``text_mask``: (B, L) numpy 1/0 or None) and ``n_latents``
    packed latents; ``img_mask`` (L + target / 4,) bool marks the image slots, ``img_shapes`` one sample's
    (frames, h, w) per image, conditions first, the target last."""
    img_mask = np.asarray(img_mask).astype(bool)
    img_mask = img_mask[0] if img_mask.ndim == 2 else img_mask
    blocks = [h * w for _, h, w in img_shapes]
    n_target = blocks[-1]
    if sum(blocks) != n_latents:
        raise ValueError(f"img_shapes accounts for {sum(blocks)} latent tokens but hidden_states has {n_latents}")
    if n_target % SLOT_TOKENS or img_mask.shape[0] != text_len + n_target // SLOT_TOKENS:
        raise ValueError(f"img_mask must span the text ({text_len}) and the target's {n_target // SLOT_TOKENS} "
                         f"slots, got length {img_mask.shape[0]}")
    if not img_mask[text_len:].all():
        raise ValueError("img_mask must end with the target's image slots")
    repeats = np.where(img_mask, SLOT_TOKENS, 1)
    is_image = np.repeat(img_mask, repeats)
    ranges = block_ranges(is_image, img_shapes)
    S = is_image.shape[0]
    prefix_len = S - n_target
    if ranges[-1] != (prefix_len, S):
        raise ValueError("the target image must come last in img_mask")

    source = np.repeat(np.arange(img_mask.shape[0]), repeats)  # text token j -> its text-feature row
    source = np.where(is_image, text_len + np.cumsum(is_image) - 1, source)
    gather = mx.array(source[:prefix_len].astype(np.int32))

    valid = None
    if text_mask is not None:
        text_valid = np.asarray(text_mask).astype(bool).reshape(-1, text_len) | img_mask[:text_len]
        if not text_valid.all():
            valid = np.repeat(np.pad(text_valid, ((0, 0), (0, n_target // SLOT_TOKENS)), constant_values=True),
                              repeats, axis=1)
    keys = None if valid is None else mx.array(valid)[:, None, None, :]

    # Each padded row walks over its own valid tokens, as if it were alone and unpadded; padded tokens are
    # never attended, so their positions do not matter.
    inv = _inv_freqs(axes_dims, theta)
    rows = []
    for row in [None] if valid is None else valid:
        idx = np.arange(S) if row is None else np.flatnonzero(row)
        pos = np.zeros((S, 3), np.int64)
        pos[idx] = rope_walk(is_image[idx], img_shapes)
        rows.append(_angles(pos, inv))
    angles = mx.stack(rows)[:, None]
    cos, sin = mx.cos(angles), mx.sin(angles)
    rope_prefix = (cos[:, :, :prefix_len], sin[:, :, :prefix_len])
    rope_target = (cos[:, :, prefix_len:], sin[:, :, prefix_len:])

    # Prefix segments: each text run is causal (queries see everything before them plus a triangle), each
    # condition block sees everything before its end. Masks only where padding makes them necessary.
    segments, cursor = [], 0
    for start, end in ranges[:-1] + [(prefix_len, prefix_len)]:
        if start > cursor:
            mask = "causal"
            if valid is not None:
                tri = np.arange(start)[None, :] <= np.arange(cursor, start)[:, None]
                mask = mx.array(tri[None] & valid[:, None, :start])[:, None]
            segments.append((cursor, start, mask))
        if end > start:
            segments.append((start, end, None if keys is None else keys[..., :end]))
        cursor = end
    return Layout(prefix_len, n_target, gather, segments, keys, rope_prefix, rope_target)
