"""Component configurations, read from each component's ``config.json``.

Every dataclass takes the released Qwen-Image values as defaults, so a missing key means "as released",
and ``from_dict`` ignores keys it does not know (diffusers and transformers add bookkeeping keys freely).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


def _known_fields(cls, config: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in config.items() if k in names and v is not None}


def read_json(path: str | Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@dataclasses.dataclass
class TransformerConfig:
    patch_size: int = 2
    in_channels: int = 64
    out_channels: int = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    rope_theta: float = 10000.0
    guidance_embeds: bool = False
    # Edit-2511: reference-image tokens are modulated with the embedding of t = 0.
    zero_cond_t: bool = False
    # Qwen-Image-Layered only; not supported here (refused in the model).
    use_additional_t_cond: bool = False
    use_layer3d_rope: bool = False
    quantization: dict | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "TransformerConfig":
        fields = _known_fields(cls, config)
        if "out_channels" in config and config["out_channels"] is None:
            # diffusers reads a null out_channels as "same as in_channels".
            fields["out_channels"] = fields.get("in_channels", cls.in_channels)
        fields["axes_dims_rope"] = tuple(fields.get("axes_dims_rope", cls.axes_dims_rope))
        return cls(**fields)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


@dataclasses.dataclass
class SchedulerConfig:
    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = True
    base_shift: float = 0.5
    max_shift: float = 0.9
    base_image_seq_len: int = 256
    max_image_seq_len: int = 8192
    shift_terminal: float | None = 0.02
    time_shift_type: str = "exponential"
    invert_sigmas: bool = False
    stochastic_sampling: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    # A fixed noise-level grid (distilled checkpoints): used as it is, unshifted, whatever the image size.
    sigmas: tuple[float, ...] | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "SchedulerConfig":
        fields = _known_fields(cls, config)
        if "shift_terminal" in config and not config["shift_terminal"]:
            fields["shift_terminal"] = None  # null or 0 means "no terminal stretch"
        if fields.get("sigmas") is not None:
            fields["sigmas"] = tuple(float(s) for s in fields["sigmas"])
        return cls(**fields)


@dataclasses.dataclass
class VisionConfig:
    """Qwen2.5-VL's vision tower (the ``vision_config`` of the text encoder's config), used by the editing models."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    out_hidden_size: int = 3584
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rope_theta: float = 10000.0
    hidden_act: str = "silu"

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "VisionConfig":
        fields = _known_fields(cls, config)
        fields["fullatt_block_indexes"] = tuple(fields.get("fullatt_block_indexes", cls.fullatt_block_indexes))
        rope = config.get("rope_parameters") or {}
        if "rope_theta" in rope:
            fields["rope_theta"] = rope["rope_theta"]
        if fields.get("hidden_act", "silu") != "silu":
            raise ValueError(f"vision tower activation {fields['hidden_act']!r} is not supported (only silu)")
        return cls(**fields)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass
class TextEncoderConfig:
    """The Qwen2.5-VL-7B language model, plus what the editing models need: the vision tower's settings, the
    ``<|image_pad|>`` token id and the multimodal RoPE sections."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    image_token_id: int = 151655
    # Frequency pairs per position axis (temporal, height, width) of the multimodal RoPE; they sum to head_dim/2.
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    vision_config: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    quantization: dict | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "TextEncoderConfig":
        # transformers 5.x nests the language model under text_config and the RoPE settings under
        # rope_parameters; 4.x configs (the released one) keep both flat.
        flat = {**config, **(config.get("text_config") or {})}
        rope = flat.get("rope_parameters") or flat.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ValueError(f"text encoder rope type {rope_type!r} is not supported (only the default RoPE)")
        fields = _known_fields(cls, flat)
        if "rope_theta" in rope:
            fields["rope_theta"] = rope["rope_theta"]
        if "mrope_section" in rope:
            fields["mrope_section"] = tuple(rope["mrope_section"])
        fields["vision_config"] = VisionConfig.from_dict(config.get("vision_config") or {})
        return cls(**fields)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass
class VAEConfig:
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    # One flag per downsample; only its length matters for single images (the time axis is never resampled).
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    input_channels: int = 3
    latents_mean: tuple[float, ...] = (
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    )  # fmt: skip
    latents_std: tuple[float, ...] = (
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
    )  # fmt: skip

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "VAEConfig":
        fields = _known_fields(cls, config)
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            if name in fields:
                fields[name] = tuple(fields[name])
        return cls(**fields)

    @property
    def scale_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for the released model)."""
        return 2 ** (len(self.dim_mult) - 1)
