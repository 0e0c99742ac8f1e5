"""Component configurations, read from each component's ``config.json``.

Every dataclass takes the released Qwen-Image values as defaults, so a missing key means "as released",
and ``from_dict`` ignores keys it does not know (diffusers and transformers add bookkeeping keys freely). The keys
it knows are checked against the field's type and range (`validate`): a damaged config is a `ConfigError` naming
the key, which the loaders turn into a `CheckpointError` naming the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path
from typing import Any


class CheckpointError(ValueError):
    """A model folder or file that cannot be used; the message says what is wrong and what to do."""


class ConfigError(ValueError):
    """A config value the models cannot use; the message names the key."""


def _known_fields(cls, config: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(config, dict):
        raise ConfigError(f"the config is a JSON {type(config).__name__}, not an object")
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in config.items() if k in names and v is not None}


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from ``path``; unreadable, invalid or non-object files are a `CheckpointError` naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                              "download or convert the checkpoint again") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object; download or convert the "
                              "checkpoint again")
    return data


@contextlib.contextmanager
def naming(path):
    """Config errors raised inside become a `CheckpointError` naming ``path`` (the file they came from)."""
    try:
        yield
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e} (fix the file, or download or convert the checkpoint again)") from None


def _type_ok(kind: str, value) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "str":
        return isinstance(value, str)
    if kind == "dict":
        return isinstance(value, dict)
    if kind.startswith("tuple["):
        inner = kind[len("tuple["):-1].split(",")[0].strip()
        return isinstance(value, (list, tuple)) and all(_type_ok(inner, v) for v in value)
    return True  # nested configs check themselves


def validate(config) -> None:
    """Check every field of a config dataclass against its annotation and the class's ``_MIN`` bounds (ints are at
    least 1 unless the class says otherwise); then the class's own ``_check`` for relations between fields."""
    bounds = getattr(config, "_MIN", {})
    for f in dataclasses.fields(config):
        value, kind = getattr(config, f.name), str(f.type)
        optional = kind.endswith(" | None")
        kind = kind.removesuffix(" | None")
        if value is None:
            if not optional:
                raise ConfigError(f"{f.name} must not be null")
            continue
        if not _type_ok(kind, value):
            raise ConfigError(f"{f.name} must be {_describe(kind)}, got {value!r}")
        low = bounds.get(f.name, 1 if kind in ("int", "tuple[int, ...]") else None)
        values = value if isinstance(value, (list, tuple)) else [value]
        if low is not None and kind != "bool" and any(v < low for v in values):
            raise ConfigError(f"{f.name} must be at least {low}, got {value!r}")
    check = getattr(config, "_check", None)
    if check is not None:
        check()


def _describe(kind: str) -> str:
    names = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string",
             "dict": "an object"}
    if kind.startswith("tuple["):
        return "a list of " + names.get(kind[len("tuple["):-1].split(",")[0].strip(), "values").split(" ", 1)[1] + "s"
    return names.get(kind, kind)


def _require(ok: bool, message: str):
    if not ok:
        raise ConfigError(message)


def _require_rope_axes(axes, head_dim: int):
    """The 3-axis RoPE of the image transformers: three even spans that fill the attention head."""
    _require(len(axes) == 3 and all(d % 2 == 0 for d in axes), f"axes_dims_rope must be three even numbers, got "
             f"{list(axes)}")
    _require(sum(axes) == head_dim, f"axes_dims_rope {list(axes)} must add up to attention_head_dim {head_dim}")


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
        if isinstance(fields.get("axes_dims_rope"), list):
            fields["axes_dims_rope"] = tuple(fields["axes_dims_rope"])
        config = cls(**fields)
        validate(config)
        return config

    _MIN = {"axes_dims_rope": 0, "rope_theta": 1e-9}

    def _check(self):
        _require_rope_axes(self.axes_dims_rope, self.attention_head_dim)
        _require(self.in_channels == self.patch_size**2 * self.out_channels,
                 f"in_channels {self.in_channels} must be patch_size^2 x out_channels "
                 f"({self.patch_size}^2 x {self.out_channels})")

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
        if isinstance(fields.get("sigmas"), list):
            fields["sigmas"] = tuple(fields["sigmas"])
        config = cls(**fields)
        validate(config)
        return config

    _MIN = {"shift": 1e-9, "base_shift": None, "max_shift": None, "shift_terminal": None, "sigmas": None}

    def _check(self):
        if self.use_dynamic_shifting and self.sigmas is None:
            _require(self.max_image_seq_len > self.base_image_seq_len,
                     f"max_image_seq_len ({self.max_image_seq_len}) must be larger than base_image_seq_len "
                     f"({self.base_image_seq_len}): the shift is interpolated between them")
        _require(self.shift_terminal is None or 0 < self.shift_terminal < 1,
                 f"shift_terminal must be in (0, 1) or null, got {self.shift_terminal}")


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
        if isinstance(fields.get("fullatt_block_indexes"), list):
            fields["fullatt_block_indexes"] = tuple(fields["fullatt_block_indexes"])
        rope = config.get("rope_parameters") or {}
        if isinstance(rope, dict) and "rope_theta" in rope:
            fields["rope_theta"] = rope["rope_theta"]
        config = cls(**fields)
        validate(config)
        return config

    _MIN = {"fullatt_block_indexes": 0, "rope_theta": 1e-9}

    def _check(self):
        _require(self.hidden_act == "silu", f"vision tower activation {self.hidden_act!r} is not supported (only silu)")
        _require(self.hidden_size % self.num_heads == 0,
                 f"hidden_size {self.hidden_size} must be a multiple of num_heads {self.num_heads}")

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
    tie_word_embeddings: bool = False  # the LM head is the token embedding (the released 7B model has its own)
    quantization: dict | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "TextEncoderConfig":
        # transformers 5.x nests the language model under text_config and the RoPE settings under
        # rope_parameters; 4.x configs (the released one) keep both flat.
        if not isinstance(config, dict) or not isinstance(config.get("text_config") or {}, dict):
            raise ConfigError("the config (or its text_config) is not a JSON object")
        flat = {**config, **(config.get("text_config") or {})}
        rope = flat.get("rope_parameters") or flat.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"rope_parameters must be an object, got {rope!r}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ValueError(f"text encoder rope type {rope_type!r} is not supported (only the default RoPE)")
        fields = _known_fields(cls, flat)
        if "rope_theta" in rope:
            fields["rope_theta"] = rope["rope_theta"]
        if "mrope_section" in rope:
            fields["mrope_section"] = rope["mrope_section"]
        if isinstance(fields.get("mrope_section"), list):
            fields["mrope_section"] = tuple(fields["mrope_section"])
        try:
            fields["vision_config"] = VisionConfig.from_dict(config.get("vision_config") or {})
        except ConfigError as e:
            raise ConfigError(f"vision_config: {e}") from None
        config = cls(**fields)
        validate(config)
        return config

    _MIN = {"image_token_id": 0, "rms_norm_eps": 1e-30, "rope_theta": 1e-9, "mrope_section": 0}

    def _check(self):
        _require(self.hidden_size % self.num_attention_heads == 0,
                 f"hidden_size {self.hidden_size} must be a multiple of num_attention_heads "
                 f"{self.num_attention_heads}")
        _require(self.num_attention_heads % self.num_key_value_heads == 0,
                 f"num_attention_heads {self.num_attention_heads} must be a multiple of num_key_value_heads "
                 f"{self.num_key_value_heads}")
        _require(sum(self.mrope_section) == self.head_dim // 2,
                 f"mrope_section {list(self.mrope_section)} must add up to head_dim / 2 = {self.head_dim // 2}")

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
        _require(len(self.temperal_downsample) == len(self.dim_mult) - 1,
                 f"temperal_downsample needs {len(self.dim_mult) - 1} flags (one per downsample), got "
                 f"{len(self.temperal_downsample)}")

    @property
    def scale_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for the released model)."""
        return 2 ** (len(self.dim_mult) - 1)
