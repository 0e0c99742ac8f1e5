"""Qwen-Image's text encoder: the language model of Qwen2.5-VL-7B, run once per prompt.

Qwen-Image uses the final hidden states (after the last RMSNorm) as text features, so there is no LM head.
For text-only input Qwen2.5-VL's multimodal RoPE gives all three position axes the same positions, which is
plain 1-D rotate-half RoPE (``mx.fast.rope``). With pictures (the editing models), the vision tower's features
replace the ``<|image_pad|>`` embeddings and those tokens get 3-D (frame, row, column) positions, as
transformers' ``get_rope_index`` assigns them; each section of ``mrope_section`` rotates with one axis.

The vision tower lives under ``visual`` next to ``model``, the way the checkpoints name it. It is built only
when asked for (``from_config(config, vision=True)``): text-to-image checkpoints ship it too, but never use it.

Parameter names equal the transformers 4.x checkpoint names (``model.layers.0.self_attn.q_proj.weight``);
``sanitize`` also accepts the 5.x names (``model.language_model.*``, ``model.visual.*``).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import TextEncoderConfig
from .vision import VisionModel, rotate_half


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        # mx.fast.rms_norm normalises in float32 and rounds before the gain, as transformers does.
        return mx.fast.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Grouped-query self-attention with biased q/k/v projections and rotate-half RoPE."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        self.scale = self.head_dim**-0.5
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Queries, keys and values (B, heads, L, head_dim) before RoPE."""
        batch, length, _ = x.shape
        q = self.q_proj(x).reshape(batch, length, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        return q, k, v

    def __call__(self, x: mx.array, mask: mx.array | str | None, rope: tuple[mx.array, mx.array] | None,
                 cache: "KVCache | None" = None) -> mx.array:
        batch, length, _ = x.shape
        q, k, v = self.project(x)
        if rope is None:
            # Text only, right-padded: every sequence starts at position 0 (or the cached length), so one
            # offset serves the batch.
            offset = 0 if cache is None else cache.length
            q = mx.fast.rope(q, self.head_dim, traditional=False, base=self.rope_theta, scale=1.0, offset=offset)
            k = mx.fast.rope(k, self.head_dim, traditional=False, base=self.rope_theta, scale=1.0, offset=offset)
        else:
            cos, sin = rope  # (B, 1, L, head_dim), in x's dtype as transformers rounds them
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class KVCache:
    """A layer's keys and values of the tokens seen so far, for decoding one token at a time."""

    def __init__(self):
        self.keys = self.values = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.keys is not None:
            keys, values = mx.concatenate([self.keys, keys], axis=2), mx.concatenate([self.values, values], axis=2)
        self.keys, self.values = keys, values
        return keys, values


class MLP(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextEncoderConfig, attention=None):
        super().__init__()
        self.self_attn = (attention or Attention)(config)  # Qwen3-VL (text_encoder21) brings its own
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def __call__(self, x: mx.array, mask, rope, cache: KVCache | None = None) -> mx.array:
        x = x + self.self_attn(self.input_layernorm(x), mask, rope, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LanguageModel(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config) for _ in range(config.num_hidden_layers)]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def __call__(self, x: mx.array, mask, rope, caches: list[KVCache] | None = None) -> mx.array:
        """Final normed hidden states of the input embeddings ``x``; ``rope`` None means 1-D positions (after
        the cached tokens, with ``caches``)."""
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, rope, None if caches is None else caches[i])
        return self.norm(x)


def mrope_positions(input_ids: np.ndarray, attention_mask: np.ndarray | None, image_grid_thw: np.ndarray,
                    image_token_id: int, merge_size: int) -> np.ndarray:
    """transformers' 3-D RoPE positions ``(3, B, L)`` (frame, row, column) for text with images.

    Text tokens count up on all three axes. An image's tokens, at the current position ``p``, get
    ``p + (frame, row, col)`` over its merged grid, and the text after it resumes at ``p + max(rows, cols)``.
    Padding gets position 0. Images are taken from ``image_grid_thw`` in order, row after row of the batch.
    """
    batch, length = input_ids.shape
    positions = np.zeros((3, batch, length), dtype=np.int64)
    grids = iter(np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3).tolist())
    for b in range(batch):
        valid = np.ones(length, bool) if attention_mask is None else attention_mask[b].astype(bool)
        is_image = input_ids[b][valid] == image_token_id
        out = np.empty((3, len(is_image)), dtype=np.int64)
        cursor, i = 0, 0
        while i < len(is_image):
            if not is_image[i]:
                run = np.argmax(is_image[i:]) if is_image[i:].any() else len(is_image) - i
                out[:, i : i + run] = cursor + np.arange(run)
                cursor, i = cursor + run, i + run
                continue
            t, h, w = next(grids, (0, 0, 0))
            t, h, w = t, h // merge_size, w // merge_size
            if t * h * w == 0 or not is_image[i : i + t * h * w].all():
                raise ValueError("the <|image_pad|> tokens do not match image_grid_thw")
            grid = np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")).reshape(3, -1)
            out[:, i : i + t * h * w] = cursor + grid
            cursor, i = cursor + max(h, w), i + t * h * w
        positions[:, b, valid] = out
    if next(grids, None) is not None:
        raise ValueError("image_grid_thw has more images than the text has <|image_pad|> runs")
    return positions


class QwenTextEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig, vision: bool = False, lm_head: bool = False):
        super().__init__()
        self.config = config
        self.model = LanguageModel(config)
        if vision:
            self.visual = VisionModel(config.vision_config)
        if lm_head and not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.generates = lm_head

    @classmethod
    def from_config(cls, config: dict[str, Any], vision: bool = False, lm_head: bool = False) -> "QwenTextEncoder":
        """``vision=True`` builds the vision tower too (the editing models); text-to-image leaves it out.
        ``lm_head=True`` builds the language-model head, to generate text (the prompt enhancer)."""
        return cls(TextEncoderConfig.from_dict(config), vision=vision, lm_head=lm_head)

    @property
    def has_vision(self) -> bool:
        return "visual" in self

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map transformers 4.x and 5.x checkpoint names to ours, lazily; drops the LM head unless the model was
        built with it, and, for a model built without it, the vision tower."""
        out, visual = {}, {}
        for name, value in weights.items():
            if name.startswith("model.language_model."):
                name = "model." + name[len("model.language_model.") :]
            elif name.startswith("model.visual."):
                name = name[len("model.") :]
            if name.startswith("visual."):
                visual[name[len("visual.") :]] = value
            elif not name.startswith("lm_head.") or "lm_head" in self:
                out[name] = value
        if self.has_vision:
            out.update({"visual." + k: v for k, v in self.visual.sanitize(visual).items()})
        return out

    def see(self, pixel_values, grids, copies: int = 1) -> dict:
        """The keyword arguments of ``__call__`` for pictures (the processor's ``pixel_values`` and ``grids``) that
        each of ``copies`` rows holds: the tower runs once."""
        if not self.has_vision:
            raise ValueError("this text encoder has no vision tower: build it with from_config(..., vision=True)")
        features = self.visual(mx.array(pixel_values), grids)
        return {"image_grid_thw": np.concatenate([np.asarray(grids)] * copies),
                "image_embeds": mx.concatenate([features] * copies)}

    def __call__(
        self,
        input_ids: mx.array,
        attention_mask: mx.array | None = None,
        pixel_values: mx.array | None = None,
        image_grid_thw=None,
        image_embeds: mx.array | None = None,
    ) -> mx.array:
        """Final normed hidden states ``(B, L, hidden)`` of a right-padded batch.

        ``attention_mask`` is ``(B, L)`` with 1 for tokens and 0 for padding; ``None`` means no padding.
        Features at padded positions are finite but meaningless. With pictures, ``input_ids`` hold one run
        of ``<|image_pad|>`` per image (its length from the image processor) and ``image_grid_thw`` (images, 3)
        lists the images in token order, row after row; pass either the processor's ``pixel_values`` or
        ``image_embeds``, the tower's output ``self.visual(pixel_values, image_grid_thw)`` computed earlier
        (to encode a positive and a negative prompt against the same pictures once).
        """
        x, mask, rope, _ = self._inputs(input_ids, attention_mask, pixel_values, image_grid_thw, image_embeds)
        return self.model(x, mask, rope)

    def _inputs(self, input_ids, attention_mask, pixel_values, image_grid_thw, image_embeds):
        """(input embeddings, mask, RoPE tables or None for 1-D positions, 3-D positions or None)."""
        length = input_ids.shape[1]
        if attention_mask is None:
            mask = "causal"
        else:
            positions = mx.arange(length)
            causal = positions[:, None] >= positions[None, :]
            # (B, 1, L, L): causal, and padded keys hidden from every query.
            mask = causal[None, None] & attention_mask.astype(mx.bool_)[:, None, None, :]
        x = self.model.embed_tokens(input_ids)
        if pixel_values is None and image_embeds is None:
            return x, mask, None, None

        if image_embeds is None:
            if not self.has_vision:
                raise ValueError("this text encoder has no vision tower: build it with from_config(..., vision=True)")
            image_embeds = self.visual(pixel_values, image_grid_thw)
        ids = np.array(input_ids)
        slots = np.flatnonzero(ids.reshape(-1) == self.config.image_token_id)
        if len(slots) != image_embeds.shape[0]:
            raise ValueError(f"{len(slots)} <|image_pad|> tokens for {image_embeds.shape[0]} image features")
        # Image features replace the placeholders' embeddings: one gather over [embeddings; features].
        source = np.arange(ids.size, dtype=np.int32)
        source[slots] = ids.size + np.arange(len(slots), dtype=np.int32)
        flat = mx.concatenate([x.reshape(ids.size, -1), image_embeds.astype(x.dtype)], axis=0)
        x = flat[mx.array(source)].reshape(*ids.shape, -1)

        merge = self.config.vision_config.spatial_merge_size
        mask_np = None if attention_mask is None else np.array(attention_mask)
        positions = mrope_positions(ids, mask_np, image_grid_thw, self.config.image_token_id, merge)
        return x, mask, self.mrope_tables(positions, x.dtype), positions

    # -- generating text (the prompt enhancer) -------------------------------------------------------------------

    def logits(self, hidden: mx.array) -> mx.array:
        if not self.generates:
            raise ValueError("this text encoder was built without its language-model head (from_config(..., "
                             "lm_head=True))")
        return self.lm_head(hidden) if "lm_head" in self else self.model.embed_tokens.as_linear(hidden)

    def start(self, input_ids: mx.array, pixel_values=None, image_grid_thw=None):
        """Read a prompt (batch 1, with its pictures): the logits of its last position, and the state `step` goes
        on from (a KV cache per layer, and the next 3-D position when there are pictures)."""
        x, mask, rope, positions = self._inputs(input_ids, None, pixel_values, image_grid_thw, None)
        caches = [KVCache() for _ in self.model.layers]
        hidden = self.model(x, mask, rope, caches)
        return self.logits(hidden[:, -1]), [caches, None if positions is None else int(positions.max()) + 1]

    def step(self, token: int, state) -> mx.array:
        """The logits after one more token; ``state`` (from `start`) advances."""
        caches, position = state
        x = self.model.embed_tokens(mx.array([[token]], dtype=mx.int32))
        rope = None
        if position is not None:  # after pictures every axis goes on from the largest position, together
            rope = self.mrope_tables(np.full((3, 1, 1), position, dtype=np.int64), x.dtype)
            state[1] = position + 1
        return self.logits(self.model(x, None, rope, caches)[:, -1])

    def mrope_tables(self, positions: np.ndarray, dtype) -> tuple[mx.array, mx.array]:
        """cos/sin ``(B, 1, L, head_dim)`` for 3-D positions ``(3, B, L)``: frequency k turns with the axis
        of the ``mrope_section`` it falls in (temporal, height, width, in that order)."""
        head_dim = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_theta ** (mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim))
        axis = np.repeat(np.arange(len(self.config.mrope_section)) % 3, self.config.mrope_section)
        if len(axis) != head_dim // 2:
            raise ValueError(f"mrope_section {self.config.mrope_section} must sum to head_dim / 2 = {head_dim // 2}")
        chosen = positions[axis].transpose(1, 2, 0)  # (B, L, head_dim/2): each frequency's own axis
        angles = mx.array(chosen.astype(np.float32)) * inv_freq
        angles = mx.concatenate([angles, angles], axis=-1)[:, None]
        return mx.cos(angles).astype(dtype), mx.sin(angles).astype(dtype)
