"""Qwen-Image 2.1's text encoder: the language model of Qwen3-VL-8B (36 layers, 4096 wide, 32 query and 8 KV heads).

Qwen3 differs from the Qwen2.5 model of `text_encoder` in its attention: no q/k/v biases, an RMSNorm over each
head's queries and keys before RoPE, and a head size (128) that need not be ``hidden / heads``. Its multimodal RoPE
interleaves the three position axes over the frequencies (frequency ``j`` turns with height when ``j % 3 == 1``,
width when ``j % 3 == 2``, within their ``mrope_section`` spans; with time otherwise) instead of giving each axis
one block of frequencies.

The image model reads the last decoder layer's output *before* the final RMSNorm: ``__call__`` returns that, and
`logits` applies the norm and the LM head (the prompt enhancer's decoding, `start` / `step`).

Positions. For text only, transformers (5.x) gives every row positions ``0 .. L-1`` on all three axes whatever
the padding, so a left-padded row's first real token sits at the number of pads (its own ``get_rope_index``, which
would start it at 0, runs only when there are images). Equal positions on the three axes are plain rotate-half
RoPE (``mx.fast.rope``); and since RoPE scores depend only on position differences and padded keys are masked, a
row run alone without padding gives the same features up to rounding.

Pictures. Built with ``vision=True`` the encoder holds Qwen3-VL's vision tower (`vision21`, as ``model.visual``):
`see` turns the image processor's patches into the keyword arguments of ``__call__`` (the tower's features, which
replace the ``<|image_pad|>`` embeddings, its ``deepstack`` features, which are added to the hidden states of the
image tokens after each of the first ``len(deepstack)`` decoder layers, and the grids, from which the 3-D positions
of transformers' ``get_rope_index`` follow: `text_encoder.mrope_positions`).

Parameter names equal the checkpoint names (``model.language_model.layers.0.self_attn.q_norm.weight``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import ConfigError, _known_fields, _require, validate
from .text_encoder import Attention as Qwen2Attention
from .text_encoder import DecoderLayer, KVCache, RMSNorm, mrope_positions
from .vision21 import Qwen3VisionTower, Vision21Config


@dataclasses.dataclass
class TextEncoder21Config:
    """Qwen3-VL-8B's language model (the ``text_config`` of its config), plus the image token ids."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5000000.0
    # Frequency pairs per position axis (time, height, width), interleaved; they sum to head_dim / 2.
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    attention_bias: bool = False
    hidden_act: str = "silu"
    image_token_id: int = 151655
    video_token_id: int = 151656
    tie_word_embeddings: bool = False  # the LM head is the token embedding (the 8B model has its own)
    # The vision tower's config, as read (`vision21.Vision21Config`).
    vision_config: dict = dataclasses.field(default_factory=dict)
    quantization: dict | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "TextEncoder21Config":
        """From Qwen3-VL's nested config (``text_config`` / ``vision_config``, RoPE settings under ``rope_scaling``
        and ``rope_theta`` as released, or ``rope_parameters`` as transformers 5 writes them) or a flat one."""
        if not isinstance(config, dict) or not isinstance(config.get("text_config") or {}, dict):
            raise ConfigError("the config (or its text_config) is not a JSON object")
        flat = {**config, **(config.get("text_config") or {})}
        if "tie_word_embeddings" in config:  # transformers ties by the top-level flag
            flat["tie_word_embeddings"] = config["tie_word_embeddings"]
        rope = flat.get("rope_parameters") or flat.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"rope_parameters must be an object, got {rope!r}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        _require(rope_type in ("default", "mrope"),
                 f"text encoder rope type {rope_type!r} is not supported (only the default RoPE)")
        _require(rope.get("mrope_interleaved", True) is True, "only the interleaved multimodal RoPE of Qwen3-VL "
                 "is supported (mrope_interleaved must be true)")
        fields = _known_fields(cls, flat)
        for name in ("rope_theta", "mrope_section"):
            if rope.get(name) is not None:
                fields[name] = rope[name]
        if isinstance(fields.get("mrope_section"), list):
            fields["mrope_section"] = tuple(fields["mrope_section"])
        config = cls(**fields)
        validate(config)
        return config

    _MIN = {"image_token_id": 0, "video_token_id": 0, "rms_norm_eps": 1e-30, "rope_theta": 1e-9, "mrope_section": 0}

    def _check(self):
        _require(self.num_attention_heads % self.num_key_value_heads == 0,
                 f"num_attention_heads {self.num_attention_heads} must be a multiple of num_key_value_heads "
                 f"{self.num_key_value_heads}")
        _require(self.head_dim % 2 == 0, f"head_dim must be even, got {self.head_dim}")
        _require(len(self.mrope_section) == 3 and sum(self.mrope_section) == self.head_dim // 2,
                 f"mrope_section {list(self.mrope_section)} must be three numbers adding up to head_dim / 2 = "
                 f"{self.head_dim // 2}")
        _require(self.hidden_act == "silu", f"text encoder activation {self.hidden_act!r} is not supported (only silu)")


def mrope_tables(positions, config: TextEncoder21Config, dtype) -> tuple[mx.array, mx.array]:
    """cos/sin ``(B, 1, L, head_dim)`` of the interleaved multimodal RoPE for positions ``(3, B, L)``."""
    half = config.head_dim // 2
    j = np.arange(half)
    axis = np.zeros(half, dtype=np.int32)
    axis[(j % 3 == 1) & (j < 3 * config.mrope_section[1])] = 1
    axis[(j % 3 == 2) & (j < 3 * config.mrope_section[2])] = 2
    positions = mx.array(np.asarray(positions)) if not isinstance(positions, mx.array) else positions
    chosen = mx.take(positions, mx.array(axis), axis=0).transpose(1, 2, 0)  # (B, L, half): each frequency's axis
    inv_freq = 1.0 / (config.rope_theta ** (mx.arange(0, config.head_dim, 2, dtype=mx.float32) / config.head_dim))
    angles = chosen.astype(mx.float32) * inv_freq
    angles = mx.concatenate([angles, angles], axis=-1)[:, None]
    return mx.cos(angles).astype(dtype), mx.sin(angles).astype(dtype)


class Attention(Qwen2Attention):
    """Qwen2's grouped-query attention without q/k/v biases and with an RMSNorm over each head's queries and keys
    before RoPE; the RoPE, cache and attention are Qwen2's."""

    def __init__(self, config: TextEncoder21Config):
        nn.Module.__init__(self)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        self.scale = self.head_dim**-0.5
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        batch, length, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(batch, length, self.num_heads, -1)).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x).reshape(batch, length, self.num_kv_heads, -1)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(batch, length, self.num_kv_heads, -1).transpose(0, 2, 1, 3)
        return q, k, v


class LanguageModel(nn.Module):
    def __init__(self, config: TextEncoder21Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config, Attention) for _ in range(config.num_hidden_layers)]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def __call__(self, x: mx.array, mask, rope, caches: list[KVCache] | None = None, deepstack=None,
                 slots: mx.array | None = None) -> mx.array:
        """The last decoder layer's output (before ``norm``) for the input embeddings ``x``; ``deepstack[i]`` is
        added at the flat token indices ``slots`` after layer ``i``."""
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, rope, None if caches is None else caches[i])
            if deepstack is not None and i < len(deepstack):
                x = x.reshape(-1, x.shape[-1]).at[slots].add(deepstack[i].astype(x.dtype)).reshape(x.shape)
        return x


class _Model(nn.Module):
    """The checkpoint's ``model.``: ``language_model`` and, for editing, ``visual``."""

    def __init__(self, config: TextEncoder21Config, vision: bool):
        super().__init__()
        self.language_model = LanguageModel(config)
        if vision:
            self.visual = Qwen3VisionTower(Vision21Config.from_dict(config.vision_config))


class Qwen3TextEncoder(nn.Module):
    def __init__(self, config: TextEncoder21Config, lm_head: bool = False, vision: bool = False):
        super().__init__()
        self.config = config
        self.model = _Model(config, vision)
        if lm_head and not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._generates = lm_head

    @classmethod
    def from_config(cls, config: dict[str, Any], lm_head: bool = False, vision: bool = False) -> "Qwen3TextEncoder":
        """``lm_head=True`` builds the language-model head, to generate text (the prompt enhancer); ``vision=True``
        the vision tower, to read pictures (editing)."""
        return cls(TextEncoder21Config.from_dict(config), lm_head=lm_head, vision=vision)

    @property
    def has_vision(self) -> bool:
        return "visual" in self.model

    @property
    def generates(self) -> bool:
        return self._generates

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """The checkpoint's weights we use, lazily: the vision tower (``model.visual.*``) only when built with it,
        ``lm_head.weight`` only when built with its own head."""
        out = {name: value for name, value in weights.items()
               if not name.startswith("model.visual.") and (not name.startswith("lm_head.") or "lm_head" in self)}
        if self.has_vision:
            out.update({"model.visual." + k: v for k, v in Qwen3VisionTower.sanitize(weights).items()})
        return out

    def see(self, pixel_values, grids, copies: int = 1) -> dict:
        """The keyword arguments of ``__call__`` for pictures (the processor's ``pixel_values`` and ``grids``) that
        each of ``copies`` rows holds: the tower runs once."""
        if not self.has_vision:
            raise ValueError("this text encoder has no vision tower: build it with from_config(..., vision=True)")
        embeds, deepstack = self.model.visual(mx.array(pixel_values), grids)
        return {"image_grid_thw": np.concatenate([np.asarray(grids)] * copies),
                "image_embeds": mx.concatenate([embeds] * copies),
                "deepstack": [mx.concatenate([d] * copies) for d in deepstack]}

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None, positions=None,
                 image_embeds: mx.array | None = None, deepstack: list[mx.array] | None = None,
                 image_grid_thw=None) -> mx.array:
        """The last decoder layer's hidden states ``(B, L, hidden)``, before the final norm (what Qwen-Image 2.1
        reads), of a batch padded on either side.

        ``attention_mask`` is ``(B, L)``, 1 for tokens and 0 for padding (``None``: no padding); features at padded
        positions are finite but meaningless. ``positions`` ``(3, B, L)`` are the (time, height, width) RoPE
        positions; ``None`` means ``0 .. L-1`` on every axis, as transformers has for text. With pictures, pass
        the vision tower's ``image_embeds`` (one row per ``<|image_pad|>`` token, in row-major token order), their
        ``positions``, and its ``deepstack`` features (a list of arrays shaped like ``image_embeds``); or, in place
        of ``positions``, the pictures' ``image_grid_thw`` (images, 3), row after row (what `see` returns).
        """
        if positions is None and image_grid_thw is not None:
            positions = self._positions(input_ids, attention_mask, image_grid_thw)
        x, mask, rope, slots = self._inputs(input_ids, attention_mask, positions, image_embeds, deepstack)
        return self.model.language_model(x, mask, rope, deepstack=deepstack, slots=slots)

    def _positions(self, input_ids, attention_mask, grids) -> np.ndarray:
        merge = Vision21Config.from_dict(self.config.vision_config).spatial_merge_size
        mask = None if attention_mask is None else np.array(attention_mask)
        return mrope_positions(np.array(input_ids), mask, grids, self.config.image_token_id, merge)

    def _inputs(self, input_ids, attention_mask, positions, image_embeds, deepstack):
        """(input embeddings, mask, RoPE tables or None for 1-D positions, flat indices of the image tokens)."""
        length = input_ids.shape[1]
        if attention_mask is None:
            mask = "causal"
        else:
            index = mx.arange(length)
            # (B, 1, L, L): causal, padded keys hidden; each query keeps itself, so left-padded rows stay finite.
            keep = attention_mask.astype(mx.bool_)[:, None, None, :] | (index[:, None] == index[None, :])
            mask = (index[:, None] >= index[None, :]) & keep
        x = self.model.language_model.embed_tokens(input_ids)
        slots = None
        if image_embeds is not None or deepstack:
            if positions is None:
                raise ValueError("image features need their 3-D RoPE positions (3, B, L), as get_rope_index gives")
            flat_ids = np.array(input_ids).reshape(-1)
            slots = mx.array(np.flatnonzero(flat_ids == self.config.image_token_id).astype(np.int32))
            for features in ([] if image_embeds is None else [image_embeds]) + list(deepstack or []):
                if features.shape != (slots.size, x.shape[-1]):
                    raise ValueError(f"{slots.size} <|image_pad|> tokens for image features of shape "
                                     f"{tuple(features.shape)}")
        if image_embeds is not None:
            flat = x.reshape(-1, x.shape[-1])
            flat[slots] = image_embeds.astype(x.dtype)
            x = flat.reshape(x.shape)
        rope = None if positions is None else mrope_tables(positions, self.config, x.dtype)
        return x, mask, rope, slots

    # -- generating text (the prompt enhancer) -------------------------------------------------------------------

    def logits(self, hidden: mx.array) -> mx.array:
        """Next-token logits of ``__call__``'s hidden states: the final norm, then the LM head."""
        if not self.generates:
            raise ValueError("this text encoder was built without its language-model head (from_config(..., "
                             "lm_head=True))")
        lm = self.model.language_model
        hidden = lm.norm(hidden)
        return self.lm_head(hidden) if "lm_head" in self else lm.embed_tokens.as_linear(hidden)

    def start(self, input_ids: mx.array, pixel_values=None, image_grid_thw=None, *, positions=None,
              image_embeds=None, deepstack=None):
        """Read a prompt (batch 1): the logits of its last position, and the state `step` goes on from (a KV cache
        per layer, and the next position when there are 3-D positions). Pictures come in as the processor's
        ``pixel_values`` and ``image_grid_thw``, or as the tower's outputs (``positions``, ``image_embeds``,
        ``deepstack``)."""
        if pixel_values is not None:
            seen = self.see(pixel_values, image_grid_thw)
            image_embeds, deepstack = seen["image_embeds"], seen["deepstack"]
        if positions is None and image_grid_thw is not None:
            positions = self._positions(input_ids, None, image_grid_thw)
        x, mask, rope, slots = self._inputs(input_ids, None, positions, image_embeds, deepstack)
        caches = [KVCache() for _ in self.model.language_model.layers]
        hidden = self.model.language_model(x, mask, rope, caches, deepstack, slots)
        nxt = None if positions is None else int(np.asarray(positions).max()) + 1
        return self.logits(hidden[:, -1]), [caches, nxt]

    def step(self, token: int, state) -> mx.array:
        """The logits after one more token; ``state`` (from `start`) advances."""
        caches, position = state
        x = self.model.language_model.embed_tokens(mx.array([[token]], dtype=mx.int32))
        rope = None
        if position is not None:  # after pictures every axis goes on from the largest position, together
            rope = mrope_tables(np.full((3, 1, 1), position, dtype=np.int32), self.config, x.dtype)
            state[1] = position + 1
        return self.logits(self.model.language_model(x, None, rope, caches)[:, -1])
