"""The Qwen-Image 2.1 transformer: 32 single-stream blocks over one joint sequence [text with the condition images
in its image slots; target image], block-causal attention.

Attribute names are the diffusers checkpoint keys. One modulation layer serves every block (scale and tanh gate for
attention and MLP, no shift); with ``causal_condition`` text and condition tokens are modulated from t = 0, so their
keys and values do not change with the step: `PrefixCache` keeps them from the first step and later steps run only
the target's tokens. The timestep path (time embedder, ``modulation.1``, ``norm_out.linear``) is precomputed for a
schedule by `modulation_table`, which can free those weights for the loop, as in `QwenImageTransformer`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import _known_fields, _require_rope_axes, validate
from .modulation import DroppedLinear, TimestepPath, get_module
from .rope21 import Layout, apply_rope, build_layout


@dataclasses.dataclass
class Transformer21Config:
    patch_size: int = 1
    in_channels: int = 64
    out_channels: int = 64
    num_layers: int = 32
    attention_head_dim: int = 128
    num_attention_heads: int = 32
    context_in_dim: int = 4096
    mlp_ratio: int = 3
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    eps: float = 1e-6
    causal_condition: bool = True
    quantization: dict | None = None  # ours: set by convert for quantized checkpoints

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "Transformer21Config":
        fields = _known_fields(cls, config)
        if "out_channels" in config and config["out_channels"] is None:
            fields["out_channels"] = fields.get("in_channels", cls.in_channels)  # diffusers: same as input
        if isinstance(fields.get("axes_dims_rope"), list):
            fields["axes_dims_rope"] = tuple(fields["axes_dims_rope"])
        config = cls(**fields)
        validate(config)
        return config

    _MIN = {"axes_dims_rope": 0, "eps": 1e-30}

    def _check(self):
        _require_rope_axes(self.axes_dims_rope, self.attention_head_dim)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


def timestep_sinusoid(t: mx.array, channels: int = 256) -> mx.array:
    """cos-first embedding of 1000 t in float32, scaled before the product as the reference does."""
    half = channels // 2
    freqs = mx.exp(-math.log(10000.0) * mx.arange(half, dtype=mx.float32) / half)
    args = (1000.0 * t.astype(mx.float32))[:, None] * freqs[None]
    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(256, dim, bias=False)
        self.linear_2 = nn.Linear(dim, dim, bias=False)

    def __call__(self, x):
        return self.linear_2(nn.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(dim)

    def __call__(self, t: mx.array, dtype) -> mx.array:
        return self.timestep_embedder(timestep_sinusoid(t).astype(dtype))


class ZeroCenteredRMSNorm(nn.Module):
    """RMSNorm whose stored weight is scale - 1, applied in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = mx.zeros((dim,))
        self.eps = eps

    def __call__(self, x):
        scale = self.weight.astype(mx.float32) + 1.0
        return mx.fast.rms_norm(x.astype(mx.float32), scale, self.eps).astype(x.dtype)


class TextProjection(nn.Module):
    def __init__(self, in_dim: int, dim: int, eps: float):
        super().__init__()
        self.text_norm = ZeroCenteredRMSNorm(in_dim, eps)
        self.in_layer = nn.Linear(in_dim, dim, bias=False)
        self.out_layer = nn.Linear(dim, dim, bias=False)

    def __call__(self, x):
        return self.out_layer(nn.gelu_approx(self.in_layer(self.text_norm(x))))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden, bias=False)
        self.gate_layer = nn.Linear(dim, hidden, bias=False)
        self.out = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x):
        return self.out(nn.silu(self.gate_layer(x)) * self.proj(x))


class Attention21(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, eps: float):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = [nn.Linear(inner, dim, bias=False)]
        self.norm_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_k = nn.RMSNorm(head_dim, eps=eps)

    def _qkv(self, x, rope):
        B, S, _ = x.shape
        heads = lambda y: y.reshape(B, S, self.heads, self.head_dim).transpose(0, 2, 1, 3)  # noqa: E731
        q = apply_rope(self.norm_q(heads(self.to_q(x))), *rope)
        k = apply_rope(self.norm_k(heads(self.to_k(x))), *rope)
        return q, k, heads(self.to_v(x))

    def _out(self, o):
        B, _, S, _ = o.shape
        return self.to_out[0](o.transpose(0, 2, 1, 3).reshape(B, S, -1))

    def __call__(self, x_p, x_t, lay: Layout, past=None):
        """Outputs for the prefix (None when ``x_p`` is, its keys/values then come from ``past``) and the target,
        and the prefix's (keys, values) after norm and RoPE."""
        attend = lambda q, k, v, mask: mx.fast.scaled_dot_product_attention(  # noqa: E731
            q, k, v, scale=self.head_dim**-0.5, mask=mask)
        q_t, k_t, v_t = self._qkv(x_t, lay.rope_target)
        out_p = None
        if x_p is None:
            k_p, v_p = past
        else:
            # One call per prefix segment over the keys before its end (the reference's default processor): on
            # the CPU (2 x 8 heads of 64, 814 tokens) 0.63 s against 1.1 s for one S x S bool or additive mask.
            q_p, k_p, v_p = self._qkv(x_p, lay.rope_prefix)
            outs = [attend(q_p[:, :, s:e], k_p[:, :, :e], v_p[:, :, :e], mask) for s, e, mask in lay.segments]
            out_p = self._out(outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2))
        k = mx.concatenate([k_p, k_t], axis=2)
        v = mx.concatenate([v_p, v_t], axis=2)
        return out_p, self._out(attend(q_t, k, v, lay.keys)), (k_p, v_p)


class TransformerBlock21(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: int, eps: float):
        super().__init__()
        self.eps = eps
        self.attn = Attention21(dim, heads, head_dim, eps)
        self.img_mlp = SwiGLU(dim, dim * mlp_ratio)

    def __call__(self, x_p, x_t, mods, lay: Layout, past=None):
        """``mods``: per stream (prefix, target) the (1 + scale1, tanh gate1, 1 + scale2, tanh gate2) rows."""
        norm = lambda x: mx.fast.layer_norm(x, None, None, self.eps)  # noqa: E731
        (s1p, g1p, s2p, g2p), (s1t, g1t, s2t, g2t) = mods
        out_p, out_t, kv = self.attn(None if x_p is None else norm(x_p) * s1p, norm(x_t) * s1t, lay, past)
        x_t = x_t + g1t * out_t
        x_t = x_t + g2t * self.img_mlp(norm(x_t) * s2t)
        if x_p is not None:
            x_p = x_p + g1p * out_p
            x_p = x_p + g2p * self.img_mlp(norm(x_p) * s2p)
        if x_t.dtype == mx.float16:  # as the reference: keep float16 activations finite
            x_t = mx.clip(x_t, -65504, 65504)
            x_p = None if x_p is None else mx.clip(x_p, -65504, 65504)
        return x_p, x_t, kv


class AdaNormOut21(nn.Module):
    """Final LayerNorm times (1 + scale): this variant has no shift."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim, bias=False)


class PrefixCache:
    """Every block's prefix (text + condition) keys and values for one run of one batch (a CFG branch, or both
    branches batched together); create one per run. Empty, a call fills it from the whole sequence; filled, a
    call runs only the target's tokens against it. Needs ``causal_condition``, which makes the prefix
    step-independent, so the cached result is the uncached one."""

    def __init__(self):
        self.kv: list = []
        self.shape: tuple | None = None

    @property
    def filled(self) -> bool:
        return bool(self.kv)

    def clear(self):
        self.kv, self.shape = [], None

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv)


class ModulationTable21:
    """The shared modulation and the output scale for every step of a schedule; ``table[i]`` is step ``i``'s
    ``modulations=``: (modulation (rows, 4 dim), output scale (rows, dim)), with the t = 0 row last under
    ``causal_condition``."""

    def __init__(self, mod: mx.array, out: mx.array, zero_row: bool):
        self.mod, self.out, self.zero_row = mod, out, zero_row

    def __len__(self) -> int:
        return self.out.shape[0] - self.zero_row

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(f"step {i} of a {len(self)}-step modulation table")
        i %= len(self)
        rows = lambda a: mx.concatenate([a[i: i + 1], a[-1:]]) if self.zero_row else a[i: i + 1]  # noqa: E731
        return rows(self.mod), rows(self.out)

    @property
    def nbytes(self) -> int:
        return self.mod.nbytes + self.out.nbytes


class QwenImage21Transformer(TimestepPath, nn.Module):
    def __init__(self, config: Transformer21Config):
        super().__init__()
        self.config = config
        dim, p = config.inner_dim, config.patch_size
        self.time_text_embed = TimeTextEmbed(dim)
        self.txt_in = TextProjection(config.context_in_dim, dim, config.eps)
        self.img_in = nn.Linear(config.in_channels * p * p, dim, bias=False)
        self.modulation = [nn.SiLU(), nn.Linear(dim, 4 * dim, bias=False)]
        self.transformer_blocks = [
            TransformerBlock21(dim, config.num_attention_heads, config.attention_head_dim, config.mlp_ratio,
                               config.eps)
            for _ in range(config.num_layers)
        ]
        self.norm_out = AdaNormOut21(dim)
        self.proj_out = nn.Linear(dim, p * p * config.out_channels, bias=False)
        self._layout_memo: tuple | None = None
        self._timestep_marks = None

    @classmethod
    def from_config(cls, config: dict) -> "QwenImage21Transformer":
        return cls(Transformer21Config.from_dict(config))

    @staticmethod
    def sanitize(weights: dict) -> dict:
        """diffusers names are ours; ComfyUI single files add ``model.diffusion_model.`` and store each SwiGLU's
        gate and up projections as one ``img_mlp.gate_up`` ([gate; up] along the output rows): split here."""
        out = {}
        for key, value in weights.items():
            for prefix in ("model.diffusion_model.", "diffusion_model.", "transformer."):
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    break
            base, fused, leaf = key.partition(".img_mlp.gate_up.")
            if fused:
                gate, up = mx.split(value, 2, axis=0)  # weight, and a quantized layer's scales/biases alike
                out[f"{base}.img_mlp.gate_layer.{leaf}"], out[f"{base}.img_mlp.proj.{leaf}"] = gate, up
            else:
                out[key] = value
        return out

    @property
    def dtype(self):
        return self.txt_in.text_norm.weight.dtype  # a norm: never quantized

    # The timestep path ----------------------------------------------------------------------------------------

    def time_embedding(self, sigma: mx.array) -> mx.array:
        """temb (B, dim) for sigmas (B,); under ``causal_condition`` one t = 0 row is appended."""
        sigma = mx.array(sigma).reshape(-1).astype(self.dtype)  # the reference rounds to the activation dtype
        if self.config.causal_condition:
            sigma = mx.concatenate([sigma, mx.zeros((1,), sigma.dtype)])
        return self.time_text_embed(sigma, self.dtype)

    def modulations(self, temb: mx.array):
        """(shared modulation, output scale) for `time_embedding`'s rows: `__call__`'s ``modulations=``."""
        act = nn.silu(temb)
        return self.modulation[1](act), self.norm_out.linear(act)

    def modulation_table(self, timesteps, drop_weights: bool = False) -> ModulationTable21:
        """Every step's ``modulations=`` for a schedule (``timesteps``: the values `__call__` gets); with
        ``drop_weights`` each timestep-path layer is freed once used (see `restore_modulation_weights`)."""
        paths = self.modulation_layer_paths()
        for path in paths if drop_weights else ():  # refuse before anything is dropped
            DroppedLinear.check(get_module(self, path), path)
        drop = self._drop if drop_weights else (lambda *_: None)
        act = nn.silu(self.time_embedding(mx.array(timesteps).reshape(-1)))
        mx.eval(act)
        drop(*paths[:2])
        mod = self.modulation[1](act)
        mx.eval(mod)
        drop(paths[2])
        out = self.norm_out.linear(act)
        mx.eval(out)
        drop(paths[3])
        return ModulationTable21(mod, out, self.config.causal_condition)

    def modulation_layer_paths(self) -> list[str]:
        return ["time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
                "modulation.1", "norm_out.linear"]

    # The forward pass -------------------------------------------------------------------------------------------

    @staticmethod
    def prefix_cache() -> PrefixCache:
        """A run's empty prefix K/V cache (``kv_cache=``): filled by its first call, read by the others."""
        return PrefixCache()

    def _layout(self, img_mask, img_shapes, text_mask, text_len: int, n_latents: int) -> Layout:
        text_mask = None if text_mask is None else np.asarray(text_mask).astype(bool)
        img_mask = np.asarray(img_mask).astype(bool)
        key = (tuple(tuple(int(v) for v in s) for s in img_shapes[0]), text_len, n_latents, img_mask.tobytes(),
               None if text_mask is None else (text_mask.shape, text_mask.tobytes()))
        if self._layout_memo is None or self._layout_memo[0] != key:
            layout = build_layout(img_mask, img_shapes[0], text_mask, text_len, n_latents,
                                  self.config.axes_dims_rope)
            self._layout_memo = (key, layout)
        return self._layout_memo[1]

    def __call__(
        self,
        hidden_states: mx.array,
        encoder_hidden_states: mx.array,
        encoder_hidden_states_mask,
        timestep: mx.array,
        img_shapes,
        img_mask,
        modulations=None,
        kv_cache: PrefixCache | None = None,
        cache=None,
    ) -> mx.array:
        """Velocity (B, N_target, out) of the target's tokens.

        hidden_states (B, N, in): packed latents, condition images first, the target last; encoder_hidden_states
        (B, L, context_in_dim) with its mask (B, L) 1/0 (right padding) or None; timestep (B,) sigma in [0, 1];
        img_shapes: per sample the (frames, h, w) of each image in latent tokens (all samples alike); img_mask
        (L + N_target / 4,) bool, True at image slots. ``modulations``: from `modulations` or a
        `modulation_table` row. ``kv_cache``: a `PrefixCache` for this run.
        """
        if cache is not None:
            raise ValueError("Qwen-Image 2.1 does not support step caches")
        if kv_cache is not None and not self.config.causal_condition:
            raise ValueError("a prefix K/V cache needs causal_condition (step-independent text and condition tokens)")
        dtype = self.dtype
        B, N, _ = hidden_states.shape
        L = encoder_hidden_states.shape[1]
        lay = self._layout(img_mask, img_shapes, encoder_hidden_states_mask, L, N)
        if lay.keys is not None and lay.keys.shape[0] != B:
            raise ValueError(f"encoder_hidden_states_mask has {lay.keys.shape[0]} rows for a batch of {B}")

        if modulations is None:
            modulations = self.modulations(self.time_embedding(timestep))
        mod, out_scale = modulations
        if self.config.causal_condition:
            mod_p, mod_t, out_scale = mod[-1:], mod[:-1], out_scale[:-1]
        else:
            mod_p = mod_t = mod

        def rows(m):
            scale1, gate1, scale2, gate2 = mx.split(m[:, None], 4, axis=-1)
            return 1 + scale1, mx.tanh(gate1), 1 + scale2, mx.tanh(gate2)

        mods = (rows(mod_p), rows(mod_t))

        n_target = lay.target_len
        x_t = self.img_in(hidden_states[:, N - n_target:].astype(dtype))
        filled = kv_cache is not None and kv_cache.filled
        if filled:
            if kv_cache.shape != (B, lay.prefix_len):
                raise ValueError(f"the prefix cache holds {kv_cache.shape} (batch, prefix tokens), this call has "
                                 f"{(B, lay.prefix_len)}: use one cache per run")
            x_p = None
        else:
            prefix = [self.txt_in(encoder_hidden_states.astype(dtype))]
            if N > n_target:  # MLX 0.32's quantized matmul aborts the process (SIGFPE) on zero rows
                prefix.append(self.img_in(hidden_states[:, : N - n_target].astype(dtype)))
            x_p = mx.take(mx.concatenate(prefix, axis=1), lay.gather, axis=1)

        stored = []
        for i, block in enumerate(self.transformer_blocks):
            x_p, x_t, kv = block(x_p, x_t, mods, lay, kv_cache.kv[i] if filled else None)
            if kv_cache is not None and not filled:
                stored.append(kv)
        if stored:  # filled only once every block ran
            kv_cache.kv, kv_cache.shape = stored, (B, lay.prefix_len)

        x_t = mx.fast.layer_norm(x_t, None, None, self.config.eps) * (1 + out_scale[:, None])
        return self.proj_out(x_t)
