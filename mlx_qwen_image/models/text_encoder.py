"""Qwen-Image's text encoder: the language model of Qwen2.5-VL-7B, run once per prompt.

Qwen-Image uses the final hidden states (after the last RMSNorm) as text features, so there is no LM head.
For text-only input Qwen2.5-VL's multimodal RoPE gives all three position axes the same positions, which is
plain 1-D rotate-half RoPE. The vision tower (for the editing models) will live under ``visual`` next to
``model``, the way the checkpoints name it.

Parameter names equal the transformers 4.x checkpoint names (``model.layers.0.self_attn.q_proj.weight``);
``sanitize`` also accepts the 5.x names (``model.language_model.*``, ``model.visual.*``).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..config import TextEncoderConfig

# Checkpoint tensors this model deliberately does not load: the LM head (features are taken before it) and,
# until the editing pipeline adds it, the vision tower.
_UNUSED_PREFIXES = ("lm_head.", "visual.")


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

    def __call__(self, x: mx.array, mask: mx.array | str) -> mx.array:
        batch, length, _ = x.shape
        q = self.q_proj(x).reshape(batch, length, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        # Right-padded batches: every sequence starts at position 0, so one offset serves the batch.
        q = mx.fast.rope(q, self.head_dim, traditional=False, base=self.rope_theta, scale=1.0, offset=0)
        k = mx.fast.rope(k, self.head_dim, traditional=False, base=self.rope_theta, scale=1.0, offset=0)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array | str) -> mx.array:
        x = x + self.self_attn(self.input_layernorm(x), mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LanguageModel(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config) for _ in range(config.num_hidden_layers)]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def __call__(self, input_ids: mx.array, mask: mx.array | str) -> mx.array:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x)


class QwenTextEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.model = LanguageModel(config)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "QwenTextEncoder":
        return cls(TextEncoderConfig.from_dict(config))

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map transformers 4.x and 5.x checkpoint names to ours; only renames, never touches the arrays."""
        out = {}
        for name, value in weights.items():
            if name.startswith("model.language_model."):
                name = "model." + name[len("model.language_model.") :]
            elif name.startswith("model.visual."):
                name = name[len("model.") :]
            if not name.startswith(_UNUSED_PREFIXES):
                out[name] = value
        return out

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        """Final normed hidden states ``(B, L, hidden)`` of a right-padded batch.

        ``attention_mask`` is ``(B, L)`` with 1 for tokens and 0 for padding; ``None`` means no padding.
        Features at padded positions are finite but meaningless.
        """
        if attention_mask is None:
            mask = "causal"
        else:
            length = input_ids.shape[1]
            positions = mx.arange(length)
            causal = positions[:, None] >= positions[None, :]
            # (B, 1, L, L): causal, and padded keys hidden from every query.
            mask = causal[None, None] & attention_mask.astype(mx.bool_)[:, None, None, :]
        return self.model(input_ids, mask)
