"""The Qwen-Image MMDiT: 60 double-stream blocks over [text, image] tokens with joint attention.

Attribute names follow the diffusers checkpoint keys (``transformer_blocks.0.attn.to_q``, ``img_mod.1``,
``img_mlp.net.0.proj`` ...), so loading is a strict ``load_weights`` after a near-trivial ``sanitize``.

The timestep path (time embedder, every block's ``img_mod``/``txt_mod``, ``norm_out.linear``: 6.8B of the
20.4B parameters) depends on the timestep alone: `modulation_table` computes it for a whole schedule in one
matmul per layer and can free those weights for the loop (`restore_modulation_weights` brings them back).
"""

from __future__ import annotations

import math
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from ..config import ConfigError, TransformerConfig
from .modulation import DroppedLinear, ModulationTable, TimestepPath, get_module
from .rope import RopeCache, apply_rope

EPS = 1e-6


def timestep_sinusoid(sigma: mx.array, channels: int = 256, scale: float = 1000.0) -> mx.array:
    """cos-first sinusoidal embedding of ``scale * sigma`` in float32, as the reference computes it."""
    half = channels // 2
    freqs = mx.exp(-math.log(10000.0) * mx.arange(half, dtype=mx.float32) / half)
    args = (sigma.astype(mx.float32)[:, None] * freqs[None]) * scale
    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def __call__(self, x):
        return self.linear_2(nn.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)

    def __call__(self, sigma: mx.array, dtype) -> mx.array:
        return self.timestep_embedder(timestep_sinusoid(sigma).astype(dtype))


class GELUProj(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def __call__(self, x):
        return nn.gelu_approx(self.proj(x))


class FeedForward(nn.Module):
    """``net.0.proj`` (GELU-tanh) and ``net.2``; ``net.1`` is the reference's parameterless dropout."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = [GELUProj(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)]

    def __call__(self, x):
        return self.net[2](self.net[0](x))


class JointAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.add_q_proj = nn.Linear(dim, inner)
        self.add_k_proj = nn.Linear(dim, inner)
        self.add_v_proj = nn.Linear(dim, inner)
        self.norm_q = nn.RMSNorm(head_dim, eps=EPS)
        self.norm_k = nn.RMSNorm(head_dim, eps=EPS)
        self.norm_added_q = nn.RMSNorm(head_dim, eps=EPS)
        self.norm_added_k = nn.RMSNorm(head_dim, eps=EPS)
        self.to_out = [nn.Linear(inner, dim)]
        self.to_add_out = nn.Linear(inner, dim)

    def _heads(self, x):
        B, S, _ = x.shape
        return x.reshape(B, S, self.heads, self.head_dim).transpose(0, 2, 1, 3)

    def __call__(self, img, txt, rope, mask=None):
        """img (B, N, D), txt (B, L, D); rope = (cos, sin) over [text, image]; mask (B, 1, 1, L + N) bool."""
        L = txt.shape[1]
        q = mx.concatenate(
            [self.norm_added_q(self._heads(self.add_q_proj(txt))), self.norm_q(self._heads(self.to_q(img)))],
            axis=2,
        )
        k = mx.concatenate(
            [self.norm_added_k(self._heads(self.add_k_proj(txt))), self.norm_k(self._heads(self.to_k(img)))],
            axis=2,
        )
        v = mx.concatenate([self._heads(self.add_v_proj(txt)), self._heads(self.to_v(img))], axis=2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, mask=mask)
        B, _, S, _ = out.shape
        out = out.transpose(0, 2, 1, 3).reshape(B, S, -1)
        return self.to_out[0](out[:, L:]), self.to_add_out(out[:, :L])


# Elementwise tails fused by mx.compile: one pass over the activations instead of two. A module switch so
# that the benchmark can measure both ways (benchmarks/bench.py --no-compile).
COMPILE = True


def _affine(x, shift, scale):
    return x * (1 + scale) + shift


def _gated(x, gate, y):
    return x + gate * y


_affine_compiled = mx.compile(_affine)
_gated_compiled = mx.compile(_gated)


def _modulate(x, shift, scale):
    # Fused on the GPU only: on the CPU backend the fused modulate measured slower than eager, while the
    # fused residual measured faster (benchmarks/results/cpu-elementwise.md).
    fuse = COMPILE and mx.default_device().type == mx.gpu
    return (_affine_compiled if fuse else _affine)(mx.fast.layer_norm(x, None, None, EPS), shift, scale)


def _residual(x, gate, y):
    return (_gated_compiled if COMPILE else _gated)(x, gate, y)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.img_mod = [nn.SiLU(), nn.Linear(dim, 6 * dim)]
        self.txt_mod = [nn.SiLU(), nn.Linear(dim, 6 * dim)]
        self.attn = JointAttention(dim, heads, head_dim)
        self.img_mlp = FeedForward(dim)
        self.txt_mlp = FeedForward(dim)

    def modulation(self, img_temb: mx.array, txt_temb: mx.array):
        """Per-stream modulation vectors (B, 1, 6 * dim): a function of the timestep alone."""
        return self.img_mod[1](nn.silu(img_temb))[:, None], self.txt_mod[1](nn.silu(txt_temb))[:, None]

    def __call__(self, img, txt, img_mod, txt_mod, rope, mask=None, cond_index=None, attention=None):
        """``img_mod``/``txt_mod`` come from `modulation` (one row per item, or one row for the whole batch).
        With ``cond_index`` (Edit-2511), ``img_mod`` holds [t rows; t = 0 rows] and image tokens where
        ``cond_index`` is True take the t = 0 rows. ``attention(compute)`` (a step cache) may return the joint
        attention's (image, text) outputs instead of ``compute()``."""
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = mx.split(img_mod, 6, axis=-1)
        if cond_index is not None:
            half = img_mod.shape[0] // 2
            pick = lambda m: mx.where(cond_index, m[half:], m[:half])  # noqa: E731
            i_shift1, i_scale1, i_gate1 = pick(i_shift1), pick(i_scale1), pick(i_gate1)
            i_shift2, i_scale2, i_gate2 = pick(i_shift2), pick(i_scale2), pick(i_gate2)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = mx.split(txt_mod, 6, axis=-1)

        def joint():
            return self.attn(_modulate(img, i_shift1, i_scale1), _modulate(txt, t_shift1, t_scale1), rope, mask)

        img_attn, txt_attn = joint() if attention is None else attention(joint)
        img = _residual(img, i_gate1, img_attn)
        txt = _residual(txt, t_gate1, txt_attn)
        img = _residual(img, i_gate2, self.img_mlp(_modulate(img, i_shift2, i_scale2)))
        txt = _residual(txt, t_gate2, self.txt_mlp(_modulate(txt, t_shift2, t_scale2)))
        return img, txt


class AdaNormOut(nn.Module):
    """Final LayerNorm modulated as [scale, shift] (the reverse of the blocks' order)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def modulation(self, temb):
        return self.linear(nn.silu(temb))[:, None]

    def __call__(self, x, mod):
        scale, shift = mx.split(mod, 2, axis=-1)
        return _modulate(x, shift, scale)


class QwenImageTransformer(TimestepPath, nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        if config.use_additional_t_cond or config.use_layer3d_rope or config.guidance_embeds:
            raise ConfigError(
                "this transformer config uses guidance embeddings or the Qwen-Image-Layered variant, "
                "which mlx-qwen-image does not support"
            )
        self.config = config
        dim = config.inner_dim
        self.img_in = nn.Linear(config.in_channels, dim)
        self.txt_norm = nn.RMSNorm(config.joint_attention_dim, eps=EPS)
        self.txt_in = nn.Linear(config.joint_attention_dim, dim)
        self.time_text_embed = TimeTextEmbed(dim)
        self.transformer_blocks = [
            TransformerBlock(dim, config.num_attention_heads, config.attention_head_dim)
            for _ in range(config.num_layers)
        ]
        self.norm_out = AdaNormOut(dim)
        self.proj_out = nn.Linear(dim, config.patch_size**2 * config.out_channels)
        self.rope_cache = RopeCache(config.axes_dims_rope, config.rope_theta)
        self._masks = _MaskMemo()
        self._timestep_marks = None

    @classmethod
    def from_config(cls, config: dict) -> "QwenImageTransformer":
        return cls(TransformerConfig.from_dict(config))

    @staticmethod
    def sanitize(weights: dict) -> dict:
        """Checkpoint names are our names; only a ``transformer.`` prefix (single-file exports) is removed."""
        prefix = "transformer."
        return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in weights.items()}

    @property
    def dtype(self):
        # A norm gain: never quantized, unlike a linear weight (which would then read as uint32).
        return self.txt_norm.weight.dtype

    def time_embedding(self, sigma: mx.array) -> mx.array:
        """temb for a batch of sigmas; with ``zero_cond_t`` the t = 0 rows are appended."""
        # The reference rounds sigma to the activation dtype before the float32 sinusoid.
        sigma = mx.array(sigma).reshape(-1).astype(self.dtype)
        if self.config.zero_cond_t:
            sigma = mx.concatenate([sigma, mx.zeros_like(sigma)])
        return self.time_text_embed(sigma, self.dtype)

    def modulations(self, temb: mx.array):
        """Every block's (img_mod, txt_mod) and the output norm's modulation for one timestep embedding."""
        txt_temb = temb[: temb.shape[0] // 2] if self.config.zero_cond_t else temb
        mods = [blk.modulation(temb, txt_temb) for blk in self.transformer_blocks]
        return mods, self.norm_out.modulation(txt_temb)

    def modulation_table(self, timesteps, drop_weights: bool = False) -> "ModulationTable":
        """The modulations of every step of a schedule: ``table[i]`` is step ``i``'s ``modulations=``.

        ``timesteps``: the (steps,) values `__call__` would get as ``timestep``. One matmul per layer over all
        steps, evaluated layer by layer; with ``drop_weights`` each layer is freed once used, so the timestep
        path never sits in memory beside the rest (see `restore_modulation_weights`).
        """
        paths = self.modulation_layer_paths()
        for path in paths if drop_weights else ():  # refuse before anything is dropped
            DroppedLinear.check(get_module(self, path), path)
        drop = self._drop if drop_weights else (lambda *_: None)
        t = mx.array(timesteps).reshape(-1)
        sigma = t.astype(self.dtype)
        if self.config.zero_cond_t:
            sigma = mx.concatenate([sigma, mx.zeros((1,), sigma.dtype)])  # one shared t = 0 row
        act = nn.silu(self.time_text_embed(sigma, self.dtype))
        act_txt = act[: t.shape[0]]
        mx.eval(act)
        drop(*paths[:2])
        blocks = []
        for i, blk in enumerate(self.transformer_blocks):
            blocks.append((blk.img_mod[1](act), blk.txt_mod[1](act_txt)))
            mx.eval(blocks[-1])
            drop(*paths[2 + 2 * i : 4 + 2 * i])
        out = self.norm_out.linear(act_txt)
        mx.eval(out)
        drop(paths[-1])
        return ModulationTable(blocks, out, self.config.zero_cond_t)

    def modulation_layer_paths(self) -> list[str]:
        """The layers `modulation_table` can drop: the time embedder, every ``*_mod.1``, ``norm_out.linear``."""
        paths = ["time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2"]
        for i in range(len(self.transformer_blocks)):
            paths += [f"transformer_blocks.{i}.img_mod.1", f"transformer_blocks.{i}.txt_mod.1"]
        return paths + ["norm_out.linear"]

    def __call__(
        self,
        hidden_states: mx.array,
        encoder_hidden_states: mx.array,
        encoder_hidden_states_mask: mx.array | None,
        timestep: mx.array,
        img_shapes,
        modulations=None,
        cache=None,
        controlnet_block_samples=None,
    ) -> mx.array:
        """Velocity for packed latents (B, N, 64) given text features (B, L, 3584), the text mask (B, L) or
        None, sigma (B,), and per item the (frames, H/16, W/16) of each image segment.

        ``modulations`` (from `modulations`, or a `modulation_table` row) skips the timestep path. A mask of all
        ones means no mask; that check syncs with the device once per mask object, so pass the same (unchanged)
        mask at every step. ``cache`` (a step cache's run, `mlx_qwen_image.cache`) takes over the block loop:
        ``cache.blocks(run, img, txt)`` gets ``run(img, txt, start, stop, rows)``, which runs blocks
        ``[start, stop)`` on those batch rows, and ``cache.attention(index, compute)`` sees every block's attention.
        ``controlnet_block_samples`` (a ControlNet's residuals, (B or 1, N, dim) each): as diffusers, sample
        ``i // ceil(blocks / samples)`` is added to the image stream after block ``i``.
        """
        dtype = self.dtype
        B, N, _ = hidden_states.shape
        L = encoder_hidden_states.shape[1]
        img = self.img_in(hidden_states.astype(dtype))
        txt = self.txt_in(self.txt_norm(encoder_hidden_states.astype(dtype)))

        if modulations is None:
            modulations = self.modulations(self.time_embedding(timestep))
        block_mods, out_mod = modulations

        # RoPE follows the first item's segments; every item of a batch has the same image layout.
        rope = self.rope_cache(img_shapes[0], L)
        mask = self._masks(encoder_hidden_states_mask, N)
        cond_index = _reference_tokens(img_shapes, N) if self.config.zero_cond_t else None
        control = controlnet_block_samples
        interval = -(-len(self.transformer_blocks) // len(control)) if control else 0

        def run(img, txt, start=0, stop=None, rows=None):
            keys = mask if mask is None or rows is None else mask[rows]
            cond = cond_index if cond_index is None or rows is None else cond_index[rows]
            attention = getattr(cache, "attention", None)
            for i in range(start, len(self.transformer_blocks) if stop is None else stop):
                img_mod, txt_mod = block_mods[i]
                hook = None if attention is None else partial(attention, i)
                img, txt = self.transformer_blocks[i](img, txt, img_mod, txt_mod, rope, keys, cond, hook)
                if control:
                    res = control[i // interval]
                    img = img + (res if rows is None or res.shape[0] == 1 else res[rows]).astype(img.dtype)
            return img, txt

        img, txt = run(img, txt) if cache is None else cache.blocks(run, img, txt)
        return self.proj_out(self.norm_out(img, out_mod))


class _MaskMemo:
    """The key mask of the last text mask seen. The pipeline passes one mask object to every step, so the
    all-ones check (a host synchronisation) runs once per run instead of once per step."""

    def __init__(self):
        self.source = self.n_img = self.mask = None

    def __call__(self, text_mask, n_img: int):
        if text_mask is None:
            return None
        if text_mask is self.source and n_img == self.n_img:
            return self.mask
        mask = _key_mask(text_mask, n_img)
        if isinstance(text_mask, mx.array):  # numpy masks are often reused buffers: not memoised
            self.source, self.n_img, self.mask = text_mask, n_img, mask
        return mask


def _key_mask(text_mask, n_img: int):
    """Boolean key mask (B, 1, 1, L + N) over [text, image], or None when no text token is padded."""
    if text_mask is None:
        return None
    text_mask = mx.array(text_mask).astype(mx.bool_)
    if mx.all(text_mask).item():
        return None
    B = text_mask.shape[0]
    keys = mx.concatenate([text_mask, mx.ones((B, n_img), dtype=mx.bool_)], axis=1)
    return keys[:, None, None, :]


def _reference_tokens(img_shapes, n_img: int):
    """(B, N, 1) bool: True for tokens of reference segments (index >= 1), which take the t = 0 modulation."""
    rows = []
    for segments in img_shapes:
        first = math.prod(segments[0])
        rows.append(mx.arange(n_img) >= first)
    return mx.stack(rows)[:, :, None]
