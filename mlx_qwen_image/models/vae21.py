"""Qwen-Image 2.1's autoencoder (diffusers' ``AutoencoderKLQwenImage21``), run as its exact 2-D form on single images.

A Wan-2.2-style residual VAE: RGBA images (B, H, W, 4) in [-1, 1] <-> 64-channel latents (B, H/16, W/16, 64), an
encoder 96 wide (``base_dim``) and a decoder 144 wide (``decoder_base_dim``), both channels-last here.

Why 2-D is exact for one frame: a Wan causal Conv3d pads time with zero frames in front only, so a lone frame
meets just the last temporal slice of its kernel. diffusers' 2.1 class already ships that image specialisation
(its "causal" convs are Conv2d on the squeezed frame and refuse a feature cache); ``sanitize`` still takes
``weight[:, :, -1]`` should a Conv3d-shaped weight come in. The resamples' ``time_conv`` runs only from a video's
second chunk on, so it is dropped.

The blocks add parameter-free shortcuts. On one frame:

- down (``avg_shortcut``): with temporal downsampling a zero frame is padded in front of the real one; the
  input is folded space-to-depth into channels ordered (channel, frame, dy, dx) and consecutive groups of
  ``C * ft * fs^2 / C_out`` are averaged. As released (groups of 4) the temporal blocks give output channel
  2c = 0 (the pad frame) and 2c + 1 = the 2x2 average of channel c; the first block is a 2x2 average pool and
  the last (no downsample) the identity.
- up (``avg_shortcut``, a duplication): each channel is repeated ``C_out * ft * fs^2 / C`` times and unfolded
  depth-to-space in the order (channel, frame, dy, dx); the first chunk keeps only the LAST frame slot. As
  released: 2x nearest upsampling in the first two blocks, of the odd channels 2o + 1 in the third, and in the
  fourth (no temporal slot) output rows of parity dy copy channel 2o + dy; the last block has none.

Parameter names equal the checkpoint names (``decoder.up_blocks.0.upsampler.resample.1.weight``); 1x1
convolutions are ``nn.Linear``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..config import _known_fields, _require, validate
from . import vae
from .vae import ChannelNorm, MidBlock, QwenImageVAE, ResidualBlock, Resample


@dataclasses.dataclass
class VAE21Config:
    base_dim: int = 96
    # diffusers' None means "as base_dim"; from_dict resolves it.
    decoder_base_dim: int = 144
    z_dim: int = 64
    dim_mult: tuple[int, ...] = (1, 2, 4, 8, 8)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()  # unused by the residual blocks (as in the reference)
    temperal_downsample: tuple[bool, ...] = (False, True, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = (
        0.5126, 0.7721, -0.0631, 1.3506, -0.7855, -2.1025, -0.3458, 1.3722,
        1.8873, -1.7177, -0.6510, 0.2732, 0.7562, -0.6163, -1.0277, 3.8363,
        2.0210, 0.0472, 0.9320, 2.0087, 2.4954, -0.1391, -1.4249, 1.8464,
        -0.5236, 1.2826, 3.7046, -1.3035, 2.7286, -1.4518, -1.9036, -1.9955,
        -0.0342, -1.0265, -0.7636, 3.0555, 0.0746, -3.0751, -0.1076, 1.7376,
        -1.0914, -1.9435, -0.2784, -1.3680, 0.4809, -0.4433, 0.3764, 0.5729,
        -2.0595, 1.0960, -1.3260, -2.0211, -5.0179, 0.5275, 4.0162, 1.8505,
        0.3026, 1.9373, 1.4937, 0.2632, 0.5547, -1.7121, -0.1562, 0.0304,
    )  # fmt: skip
    latents_std: tuple[float, ...] = (
        3.2001, 3.2936, 3.4321, 3.0091, 3.1061, 4.0379, 4.0705, 3.7910,
        3.0785, 3.6500, 3.9308, 3.0904, 2.8778, 3.7675, 3.7320, 5.0756,
        3.2864, 4.0397, 3.1317, 4.0443, 2.9249, 3.9454, 3.0988, 4.2489,
        3.4896, 3.8513, 3.9323, 3.4719, 3.7498, 4.2830, 3.5694, 4.2467,
        3.9037, 3.2947, 5.0770, 3.5075, 3.2700, 3.4767, 2.8063, 5.1125,
        3.5327, 4.7833, 3.1286, 4.1819, 3.8527, 3.8312, 3.5605, 4.3875,
        3.9624, 4.0168, 3.5643, 4.0550, 5.5614, 4.2963, 4.4080, 3.4959,
        3.8747, 3.7608, 3.5735, 3.1490, 3.7662, 3.6746, 3.4563, 3.8161,
    )  # fmt: skip
    is_residual: bool = True
    in_channels: int = 4
    out_channels: int = 4
    patch_size: int | None = None
    scale_factor_temporal: int | None = 8
    scale_factor_spatial: int | None = 16

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "VAE21Config":
        fields = _known_fields(cls, config)
        if "decoder_base_dim" in config and config["decoder_base_dim"] is None:
            fields["decoder_base_dim"] = fields.get("base_dim", cls.base_dim)
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            if isinstance(fields.get(name), list):
                fields[name] = tuple(fields[name])
        config = cls(**fields)
        validate(config)
        return config

    _MIN = {"dropout": 0, "latents_mean": None, "latents_std": 1e-12, "attn_scales": 0}

    def _check(self):
        for name in ("latents_mean", "latents_std"):
            _require(len(getattr(self, name)) == self.z_dim,
                     f"{name} has {len(getattr(self, name))} values for z_dim {self.z_dim}")
        n = len(self.dim_mult)
        _require(n >= 1, "dim_mult must not be empty")
        _require(len(self.temperal_downsample) == n - 1,
                 f"temperal_downsample needs {n - 1} flags (one per downsample), got {len(self.temperal_downsample)}")
        _require(self.is_residual, "is_residual false (the plain Wan-2.1 block layout) is not supported")
        _require(self.patch_size is None, f"patch_size {self.patch_size} is not supported (only unpatched latents)")
        _require(self.scale_factor_spatial in (None, self.scale_factor),
                 f"scale_factor_spatial {self.scale_factor_spatial} does not match the {n - 1} downsamples of "
                 f"dim_mult (scale {self.scale_factor})")
        # The shortcuts regroup channels: the channel counts must divide as the reference requires.
        enc, dec = self.encoder_dims, self.decoder_dims
        for i in range(n):
            f = _factor(self.temperal_downsample[i], 2) if i < n - 1 else 1
            _require(enc[i] * f % enc[i + 1] == 0, f"encoder block {i}: {enc[i]} x {f} channels do not average "
                     f"into {enc[i + 1]}")
            if i < n - 1:
                f = _factor(self.temperal_downsample[::-1][i], 2)
                _require(dec[i + 1] * f % dec[i] == 0, f"decoder block {i}: {dec[i]} channels do not duplicate "
                         f"into {dec[i + 1]} x {f}")

    @property
    def encoder_dims(self) -> list[int]:
        return [self.base_dim * m for m in (1, *self.dim_mult)]

    @property
    def decoder_dims(self) -> list[int]:
        return [self.decoder_base_dim * m for m in (self.dim_mult[-1], *reversed(self.dim_mult))]

    @property
    def scale_factor(self) -> int:
        """Image pixels per latent pixel along each side (16 for the released model)."""
        return 2 ** (len(self.dim_mult) - 1)


def _factor(temporal: bool, spatial: int) -> int:
    return (2 if temporal else 1) * spatial * spatial


def _avg_down(x: mx.array, out_dim: int, temporal: bool, fs: int) -> mx.array:
    """The down blocks' shortcut on one frame (module docstring); x (B, H, W, C) with H, W divisible by fs."""
    b, h, w, c = x.shape
    if fs == 1 and not temporal and c == out_dim:
        return x
    h, w = h // fs, w // fs
    x = x.reshape(b, h, fs, w, fs, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, h, w, c, 1, fs * fs)
    if temporal:  # the zero frame padded in front: it takes frame slot 0
        x = mx.concatenate([mx.zeros_like(x), x], axis=4)
    return x.reshape(b, h, w, out_dim, -1).mean(axis=-1)


class UpSampler(nn.Module):
    """2x nearest upsample, then a 3x3 conv keeping the channels (2.1's residual blocks do not halve them)."""

    def __init__(self, dim: int):
        super().__init__()
        # Index 1 mirrors the checkpoint's Sequential(upsample, conv).
        self.resample = [None, nn.Conv2d(dim, dim, 3, padding=1)]

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return self.resample[1](x)


class DownBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, down: bool):
        super().__init__()
        self.resnets = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res_blocks)]
        if down:
            self.downsampler = Resample(out_dim, "down")
        self.out_dim, self.temporal, self.fs = out_dim, temporal, 2 if down else 1

    def __call__(self, x: mx.array) -> mx.array:
        shortcut = _avg_down(x, self.out_dim, self.temporal, self.fs)
        for resnet in self.resnets:
            x = resnet(x)
        if "downsampler" in self:
            x = self.downsampler(x)
        return x + shortcut


class UpBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, up: bool):
        super().__init__()
        self.resnets = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res_blocks + 1)]
        if up:
            self.upsampler = UpSampler(out_dim)
            # The duplicating shortcut as a gather: output (o, dy, dx) reads the repeated channel at
            # o * F + (last frame slot) * 4 + dy * 2 + dx, i.e. input channel (that index) // repeats.
            f = _factor(temporal, 2)
            repeats, last = out_dim * f // in_dim, f - 4
            self._source = mx.array([(o * f + last + s) // repeats for o in range(out_dim) for s in range(4)])
        self.out_dim = out_dim

    def __call__(self, x: mx.array) -> mx.array:
        shortcut = x
        for resnet in self.resnets:
            x = resnet(x)
        if "upsampler" not in self:
            return x
        b, h, w, _ = shortcut.shape
        shortcut = mx.take(shortcut, self._source, axis=-1).reshape(b, h, w, self.out_dim, 2, 2)
        shortcut = shortcut.transpose(0, 1, 4, 2, 5, 3).reshape(b, 2 * h, 2 * w, self.out_dim)
        return self.upsampler(x) + shortcut


class Encoder(vae.Encoder):
    """Qwen-Image's encoder passes (`local`, `head`) over 2.1's residual down blocks."""

    def __init__(self, cfg: VAE21Config):
        nn.Module.__init__(self)
        dims, n = cfg.encoder_dims, len(cfg.dim_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, dims[0], 3, padding=1)
        self.down_blocks = [
            DownBlock(dims[i], dims[i + 1], cfg.num_res_blocks, i < n - 1 and cfg.temperal_downsample[i], i < n - 1)
            for i in range(n)
        ]
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = ChannelNorm(dims[-1])
        self.conv_out = nn.Conv2d(dims[-1], 2 * cfg.z_dim, 3, padding=1)


class Decoder(vae.Decoder):
    """Qwen-Image's decoder passes (`trunk`, `local`) over 2.1's residual up blocks."""

    def __init__(self, cfg: VAE21Config):
        nn.Module.__init__(self)
        dims, n = cfg.decoder_dims, len(cfg.dim_mult)
        temporal = cfg.temperal_downsample[::-1]
        self.conv_in = nn.Conv2d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        self.up_blocks = [
            UpBlock(dims[i], dims[i + 1], cfg.num_res_blocks, i < n - 1 and temporal[i], i < n - 1) for i in range(n)
        ]
        self.norm_out = ChannelNorm(dims[-1])
        self.conv_out = nn.Conv2d(dims[-1], cfg.out_channels, 3, padding=1)


class QwenImage21VAE(nn.Module):
    # Tiling as QwenImageVAE's, in latent pixels (x16 for image pixels). The receptive fields in latent pixels
    # are about those of Qwen-Image's VAE: 12.6 for the decoder's upsampling path (the extra level works at 1/16
    # pixel), 7.8 left and 9.7 right for the encoder's downsampling path. So the overlaps stay: 16 (approximate,
    # zero weight within 7 of a cut edge, a ramp of 2 between) for decoding, 24 (margin 11, exact) for encoding.
    # A tile of 32 is 512 image pixels, the pixel size of QwenImageVAE's tiles and of the CPU threshold below
    # (on the CPU an untiled decode takes 46 KB per pixel, Qwen-Image's 26 KB: 12 GB per 512x512 tile).
    tile_size: int = 32
    tile_overlap: int = 16
    tile_blend: int = 2
    encode_tile_overlap: int = 24
    # ``tiled=None`` tiles above this many image pixels; None: by device, as QwenImageVAE (CPU above 512x512,
    # GPU above 2048x2048).
    tile_min_pixels: int | None = None
    image_mode = "RGBA"  # the pictures it encodes and decodes

    def __init__(self, config: VAE21Config):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Linear(2 * config.z_dim, 2 * config.z_dim)
        self.post_quant_conv = nn.Linear(config.z_dim, config.z_dim)
        self.decoder = Decoder(config)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "QwenImage21VAE":
        return cls(VAE21Config.from_dict(config))

    @property
    def dtype(self) -> mx.Dtype:
        return self.decoder.conv_in.weight.dtype

    # Checkpoint layouts, latent normalisation and the tiling machinery are QwenImageVAE's (they read only the
    # config's latents_mean / latents_std and the tile attributes above).
    sanitize = QwenImageVAE.sanitize
    normalize_latents = QwenImageVAE.normalize_latents
    denormalize_latents = QwenImageVAE.denormalize_latents
    _use_tiles = QwenImageVAE._use_tiles
    _tiled = QwenImageVAE._tiled

    def decode(self, z: mx.array, tiled: bool | None = None) -> mx.array:
        """Latents (B, h, w, z_dim), already de-normalised -> images (B, 16h, 16w, 4) clamped to [-1, 1]."""
        s = self.config.scale_factor
        x = self.decoder.trunk(self.post_quant_conv(z.astype(self.dtype)))
        if self._use_tiles(tiled, z.shape[1] * s, z.shape[2] * s):
            x = self._tiled(self.decoder.local, x, 1, s, self.tile_overlap)
        else:
            x = self.decoder.local(x)
        return mx.clip(x, -1.0, 1.0)

    def encode(self, x: mx.array, tiled: bool | None = None) -> mx.array:
        """Images (B, H, W, 4) in [-1, 1], sides multiples of 16 -> latent mean (B, H/16, W/16, z_dim), before
        normalisation (the distribution's mode)."""
        s = self.config.scale_factor
        if x.shape[1] % s or x.shape[2] % s:
            # The averaging shortcuts fold 2x2 blocks at every level (the reference fails on other sizes too).
            raise ValueError(f"encoding needs height and width divisible by {s}, got {tuple(x.shape[1:3])}")
        x = x.astype(self.dtype)
        if self._use_tiles(tiled, x.shape[1], x.shape[2]):
            h = self._tiled(self.encoder.local, x, s, 1, self.encode_tile_overlap)
        else:
            h = self.encoder.local(x)
        return self.quant_conv(self.encoder.head(h))[..., : self.config.z_dim]

    def pack(self, z: mx.array) -> mx.array:
        """(B, h, w, C) latents -> the transformer's (B, h * w, C) tokens: a row-major flatten, no 2x2 patches."""
        b, h, w, c = z.shape
        return z.reshape(b, h * w, c)

    def unpack(self, x: mx.array, height: int, width: int) -> mx.array:
        """(B, h * w, C) tokens of a ``height`` x ``width`` image -> (B, height / 16, width / 16, C) latents."""
        s = self.config.scale_factor
        h, w = height // s, width // s
        if x.shape[1] != h * w:
            raise ValueError(f"{x.shape[1]} tokens do not make a {h}x{w} latent ({height}x{width} pixels)")
        return x.reshape(x.shape[0], h, w, x.shape[2])
