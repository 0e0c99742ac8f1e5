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

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "SchedulerConfig":
        fields = _known_fields(cls, config)
        if "shift_terminal" in config and not config["shift_terminal"]:
            fields["shift_terminal"] = None  # null or 0 means "no terminal stretch"
        return cls(**fields)


@dataclasses.dataclass
class TextEncoderConfig:
    """The Qwen2.5-VL-7B language model; the vision tower's settings are not read yet."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
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
        return cls(**fields)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads
