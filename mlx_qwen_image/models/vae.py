"""Qwen-Image's autoencoder: the Wan-2.1 causal 3-D VAE, run as its exact 2-D equivalent on single images.

Why 2-D is exact for one frame: every causal Conv3d pads time with 2 * pad zero frames in front and none
behind, so a lone frame convolved with a kernel of temporal size 3 meets only the kernel's last temporal slice
(the other two slices multiply the zero padding); 1x1x1 kernels are plain matmuls. The resample layers'
``time_conv`` only runs from a video's second chunk on (the first chunk merely primes diffusers' feature cache),
so for one frame it never runs. ``sanitize`` therefore keeps ``weight[:, :, -1]`` and drops ``time_conv``.

Everything is channels-last: images (B, H, W, 3) in [-1, 1], latents (B, H/8, W/8, 16). Parameter names equal
the checkpoint names (``decoder.up_blocks.0.resnets.0.conv1.weight``); 1x1 convolutions are ``nn.Linear``.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..config import ConfigError, VAEConfig

# Queries per attention chunk: bounds the (chunk x tokens) score matrix of the single-head mid-block
# attention (a 1328x1328 image has 27556 latent tokens: unchunked scores would take 3 GB in float32).
_ATTN_CHUNK = 2048


class ChannelNorm(nn.Module):
    """L2-normalise over channels, times sqrt(C) and a per-channel gamma (the reference has no bias here)."""

    def __init__(self, dims: int):
        super().__init__()
        self.gamma = mx.ones((dims,))
        # rms_norm gives sqrt(C) * x / sqrt(sum(x^2) + C * eps): with C * eps = 1e-24 this is F.normalize's
        # sqrt(C) * x / max(||x||, 1e-12) except for ||x|| within rounding of 1e-12.
        self.eps = 1e-24 / dims

    def __call__(self, x: mx.array) -> mx.array:
        # One fused kernel; it accumulates in float32 for bf16 inputs, as the reference upcasts.
        return mx.fast.rms_norm(x, self.gamma, self.eps)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm1 = ChannelNorm(in_dim)
        self.conv1 = nn.Conv2d(in_dim, out_dim, 3, padding=1)
        self.norm2 = ChannelNorm(out_dim)
        self.conv2 = nn.Conv2d(out_dim, out_dim, 3, padding=1)
        if in_dim != out_dim:
            self.conv_shortcut = nn.Linear(in_dim, out_dim)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv_shortcut(x) if "conv_shortcut" in self else x
        x = self.conv1(nn.silu(self.norm1(x)))
        x = self.conv2(nn.silu(self.norm2(x)))
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all pixels (the only non-local layer of the VAE)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = ChannelNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b, 1, h * w, 3 * c)
        q, k, v = mx.split(qkv, 3, axis=-1)
        scale = 1.0 / math.sqrt(c)
        if h * w <= _ATTN_CHUNK:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
        else:
            # Softmax runs over keys only, so splitting the queries is exact and keeps the scores small.
            chunks = [
                mx.fast.scaled_dot_product_attention(q[:, :, i : i + _ATTN_CHUNK], k, v, scale=scale)
                for i in range(0, h * w, _ATTN_CHUNK)
            ]
            out = mx.concatenate(chunks, axis=2)
        return x + self.proj(out.reshape(b, h, w, c))


class Resample(nn.Module):
    """2x nearest upsample then a 3x3 conv halving the channels, or a stride-2 3x3 conv padded right/bottom."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        out_dim = dim // 2 if mode == "up" else dim
        # Index 1 mirrors the checkpoint's Sequential(upsample-or-pad, conv).
        self.resample = [None, nn.Conv2d(dim, out_dim, 3, padding=1 if mode == "up" else 0)]

    def __call__(self, x: mx.array) -> mx.array:
        conv = self.resample[1]
        if self.mode == "up":
            b, h, w, c = x.shape
            x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
            return conv(x)
        # ZeroPad2d((0, 1, 0, 1)) folded into the convolution's padding: no padded copy of the input.
        return mx.conv_general(x, conv.weight, stride=2, padding=([0, 0], [1, 1])) + conv.bias


class MidBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.resnets = [ResidualBlock(dim, dim), ResidualBlock(dim, dim)]
        self.attentions = [AttentionBlock(dim)]

    def __call__(self, x: mx.array) -> mx.array:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = nn.Conv2d(cfg.input_channels, dims[0], 3, padding=1)
        # A flat list, as in the checkpoint: res blocks of each level, then its downsample.
        self.down_blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                self.down_blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(cfg.dim_mult) - 1:
                self.down_blocks.append(Resample(out_dim, "down"))
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = ChannelNorm(dims[-1])
        self.conv_out = nn.Conv2d(dims[-1], 2 * cfg.z_dim, 3, padding=1)

    def local(self, x: mx.array) -> mx.array:
        """Image -> features at latent resolution; convolutions only, so it can run tile by tile."""
        x = self.conv_in(x)
        for layer in self.down_blocks:
            x = layer(x)
        return x

    def head(self, x: mx.array) -> mx.array:
        return self.conv_out(nn.silu(self.norm_out(self.mid_block(x))))


class UpBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, upsample: bool):
        super().__init__()
        self.resnets = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res_blocks + 1)]
        if upsample:
            self.upsamplers = [Resample(out_dim, "up")]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if "upsamplers" in self else x


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        mults = cfg.dim_mult
        dims = [cfg.base_dim * m for m in (mults[-1], *reversed(mults))]
        self.conv_in = nn.Conv2d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        # Each upsample halves the channels, so every block after the first starts from half its input dim.
        self.up_blocks = [
            UpBlock(dims[i] // (2 if i else 1), dims[i + 1], cfg.num_res_blocks, i < len(mults) - 1)
            for i in range(len(mults))
        ]
        self.norm_out = ChannelNorm(dims[-1])
        self.conv_out = nn.Conv2d(dims[-1], cfg.input_channels, 3, padding=1)

    def trunk(self, z: mx.array) -> mx.array:
        """Latent-resolution part, including the global attention: always run on the whole latent."""
        return self.mid_block(self.conv_in(z))

    def local(self, x: mx.array) -> mx.array:
        """Upsampling part: convolutions and per-pixel norms only, so it can run tile by tile."""
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nn.silu(self.norm_out(x)))


def _tile_spans(n: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """The fewest equal tiles of at most ``tile`` covering [0, n), neighbours overlapping by at least ``overlap``."""
    if n <= tile:
        return [(0, n)]
    count = 1 + math.ceil((n - tile) / (tile - overlap))
    tile = math.ceil((n + (count - 1) * overlap) / count)  # shrink to the size that just covers n
    starts = [round(k * (n - tile) / (count - 1)) for k in range(count)]
    return [(a, a + tile) for a in starts]


def _blend_weights(spans: list[tuple[int, int]], scale: int, margin: int) -> list[mx.array]:
    """Per-tile 1-D weights at output resolution, summing to 1: zero within ``margin`` of a tile's cut edges,
    then a linear ramp across the rest of the overlap with its neighbour (a step if nothing is left)."""
    pos = mx.arange(spans[-1][1] * scale, dtype=mx.float32) + 0.5
    m = margin * scale

    def ramp(lo, hi):  # 0 before lo, 1 after hi
        return mx.clip((pos - lo) / (hi - lo), 0.0, 1.0) if hi > lo else (pos >= lo).astype(mx.float32)

    weights = []
    for k, (a, b) in enumerate(spans):
        a, b = a * scale, b * scale
        w = ((pos >= a) & (pos < b)).astype(mx.float32)
        if k > 0:
            w = w * ramp(a + m, spans[k - 1][1] * scale - m)
        if k + 1 < len(spans):
            w = w * (1.0 - ramp(spans[k + 1][0] * scale + m, b - m))
        weights.append(w)
    total = sum(weights)
    return [(w / total)[a * scale : b * scale] for w, (a, b) in zip(weights, spans)]


class QwenImageVAE(nn.Module):
    # Tiling, in latent pixels (x8 for image pixels). Near its cut edges a tile is wrong (zero padding stands in
    # for the neighbours), less so with distance, and exact past the receptive field: 13 latent pixels for the
    # decoder's upsampling path, 11 for the encoder's downsampling path. So each tile gets zero weight within
    # (overlap - blend) / 2 of a cut edge and neighbours meet with a linear ramp of ``tile_blend`` in the
    # middle of their overlap (diffusers ramps across the whole overlap, trusting tiles up to their edges).
    tile_size: int = 64
    tile_overlap: int = 16
    tile_blend: int = 2
    # The encoder's tiles feed the global attention, which would spread a seam error over the whole latent:
    # this overlap keeps each tile's used part beyond the receptive field, so tiled encoding is exact.
    encode_tile_overlap: int = 24
    # ``tiled=None`` tiles above this many image pixels. None: by device. MLX's CPU convolutions unfold their
    # input 9x (untiled decode: 26 KB per pixel, 6.7 GB at 512x512); Metal's do not, so GPUs tile only beyond
    # 2048x2048, keeping the official sizes untiled.
    tile_min_pixels: int | None = None

    def __init__(self, config: VAEConfig):
        super().__init__()
        if config.attn_scales:
            raise ConfigError("VAE attn_scales is not supported (the reference ignores it in the decoder too)")
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Linear(2 * config.z_dim, 2 * config.z_dim)
        self.post_quant_conv = nn.Linear(config.z_dim, config.z_dim)
        self.decoder = Decoder(config)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "QwenImageVAE":
        return cls(VAEConfig.from_dict(config))

    @property
    def dtype(self) -> mx.Dtype:
        return self.decoder.conv_in.weight.dtype

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Checkpoint (PyTorch Conv3d/Conv2d layouts, or ours) -> our names and layouts; lazy, nothing evaluated.
        Qwen-Image 2.1's VAE has the same layouts and uses this too."""
        out = {}
        for key, w in weights.items():
            if ".time_conv." in key:
                continue  # only runs on a video's later frames (see the module docstring)
            if key.endswith(".gamma"):
                w = w.reshape(-1)
            else:
                # Ours are (O, kh, kw, I) with kh == kw and never 1x1 (those are Linear); torch's are (O, I, kh, kw).
                torch_layout = w.ndim == 5 or (w.ndim == 4 and (w.shape[1] != w.shape[2] or w.shape[2] == 1))
                if w.ndim == 5:  # a causal Conv3d (O, I, T, kh, kw): a single frame meets only the last time slice
                    w = w[:, :, -1]
                if torch_layout:
                    w = w.reshape(w.shape[:2]) if w.shape[2] == 1 else w.transpose(0, 2, 3, 1)
            out[key] = w
        return out

    image_mode = "RGB"  # the pictures it encodes and decodes

    @staticmethod
    def pack(z: mx.array) -> mx.array:
        """(B, H/8, W/8, C) channels-last latents -> the transformer's (B, (H/16)(W/16), 4C): 2x2 patches,
        channel-major, as diffusers packs them."""
        B, h, w, C = z.shape
        z = z.reshape(B, h // 2, 2, w // 2, 2, C).transpose(0, 1, 3, 5, 2, 4)
        return z.reshape(B, (h // 2) * (w // 2), C * 4)

    @staticmethod
    def unpack(x: mx.array, height: int, width: int) -> mx.array:
        """Packed (B, N, 4C) -> channels-last (B, H/8, W/8, C) for a ``width`` x ``height`` image."""
        B, _, D = x.shape
        h, w, C = height // 16, width // 16, D // 4
        x = x.reshape(B, h, w, C, 2, 2).transpose(0, 1, 4, 2, 5, 3)
        return x.reshape(B, h * 2, w * 2, C)

    # Latent normalisation: the transformer works on (z - mean) / std.
    def normalize_latents(self, z: mx.array) -> mx.array:
        mean = mx.array(self.config.latents_mean, dtype=z.dtype)
        return (z - mean) * mx.array([1.0 / s for s in self.config.latents_std], dtype=z.dtype)

    def denormalize_latents(self, z: mx.array) -> mx.array:
        std = mx.array(self.config.latents_std, dtype=z.dtype)
        return z * std + mx.array(self.config.latents_mean, dtype=z.dtype)

    def _use_tiles(self, tiled: bool | None, height: int, width: int) -> bool:
        if tiled is not None:
            return tiled
        limit = self.tile_min_pixels
        if limit is None:
            limit = 512 * 512 if mx.default_device().type == mx.cpu else 2048 * 2048
        return height * width > limit

    def decode(self, z: mx.array, tiled: bool | None = None) -> mx.array:
        """Latents (B, h, w, z_dim), already un-normalised -> images (B, 8h, 8w, 3) clamped to [-1, 1]."""
        s = self.config.scale_factor
        x = self.decoder.trunk(self.post_quant_conv(z.astype(self.dtype)))
        if self._use_tiles(tiled, z.shape[1] * s, z.shape[2] * s):
            x = self._tiled(self.decoder.local, x, 1, s, self.tile_overlap)
        else:
            x = self.decoder.local(x)
        return mx.clip(x, -1.0, 1.0)

    def encode(self, x: mx.array, tiled: bool | None = None) -> mx.array:
        """Images (B, H, W, 3) in [-1, 1] -> latent mean (B, H/8, W/8, z_dim), before normalisation."""
        s = self.config.scale_factor
        x = x.astype(self.dtype)
        use_tiles = self._use_tiles(tiled, x.shape[1], x.shape[2])
        if use_tiles and (x.shape[1] % s or x.shape[2] % s):
            # Tiles must start on the stride grid of every downsample.
            if tiled:
                raise ValueError(f"tiled encoding needs height and width divisible by {s}, got {x.shape[1:3]}")
            use_tiles = False
        if use_tiles:
            h = self._tiled(self.encoder.local, x, s, 1, self.encode_tile_overlap)
        else:
            h = self.encoder.local(x)
        return self.quant_conv(self.encoder.head(h))[..., : self.config.z_dim]

    def _tiled(self, fn, x: mx.array, in_scale: int, out_scale: int, overlap: int) -> mx.array:
        """Run ``fn`` over overlapping tiles of ``x`` and blend the outputs.

        Spans are in latent pixels: a tile covers ``in_scale`` input and ``out_scale`` output pixels per latent
        pixel. Each tile is evaluated before the next so that only one tile's activations are alive; the blend
        accumulates in float32 so that the weights still sum to 1 with bf16 tiles.
        """
        if not 0 <= overlap < self.tile_size:
            raise ValueError(f"tiles of {self.tile_size} cannot overlap by {overlap} latent pixels")
        margin = max(overlap - self.tile_blend, 0) // 2
        mx.eval(x)
        rows = _tile_spans(x.shape[1] // in_scale, self.tile_size, overlap)
        cols = _tile_spans(x.shape[2] // in_scale, self.tile_size, overlap)
        row_w, col_w = _blend_weights(rows, out_scale, margin), _blend_weights(cols, out_scale, margin)
        out = None
        for (r0, r1), wr in zip(rows, row_w):
            for (c0, c1), wc in zip(cols, col_w):
                y = fn(x[:, r0 * in_scale : r1 * in_scale, c0 * in_scale : c1 * in_scale])
                if out is None:
                    shape = (y.shape[0], rows[-1][1] * out_scale, cols[-1][1] * out_scale, y.shape[-1])
                    out = mx.zeros(shape, mx.float32)
                w = wr[:, None, None] * wc[None, :, None]
                out[:, r0 * out_scale : r1 * out_scale, c0 * out_scale : c1 * out_scale] += w * y
                mx.eval(out)
        return out.astype(y.dtype)
