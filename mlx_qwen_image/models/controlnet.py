"""The Qwen-Image ControlNet (InstantX Union / Inpainting): a few MMDiT blocks that read the packed control latents
and return one residual per block for the transformer's image stream.

It is the transformer's front end and blocks (`TransformerBlock`, `TimeTextEmbed`, the same RoPE and text mask)
plus two zero-initialised projections: ``controlnet_x_embedder`` adds the control latents to the embedded noisy
latents, and ``controlnet_blocks.N`` maps block N's image stream to its residual. Attribute names are the
checkpoint keys, so loading is a strict ``load_weights`` after `sanitize`.

`QwenImageTransformer` adds the residuals (``controlnet_block_samples=``): sample ``i // ceil(60 / len(samples))``
after block ``i``, so the 5 samples of the Union model each cover 12 consecutive blocks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..config import _known_fields, _require_rope_axes, validate
from .rope import RopeCache
from .transformer import EPS, TimeTextEmbed, TransformerBlock, _MaskMemo

# diffusers builds the ControlNet's RoPE with a fixed theta (it is not a config key).
ROPE_THETA = 10000.0


@dataclasses.dataclass
class ControlNetConfig:
    """diffusers' ``QwenImageControlNetModel`` config; its defaults (a missing key reads as diffusers reads it).
    The released InstantX checkpoints say ``num_layers: 5``; the Inpainting one adds 4 condition channels."""

    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = 16  # unused by the model (no output projection); kept as diffusers keeps it
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    # Inpainting: the control latents carry a mask beside the masked image's latents (16 + 1 channels, x 4 packed).
    extra_condition_channels: int = 0
    quantization: dict | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "ControlNetConfig":
        fields = _known_fields(cls, config)
        if isinstance(fields.get("axes_dims_rope"), list):
            fields["axes_dims_rope"] = tuple(fields["axes_dims_rope"])
        config = cls(**fields)
        validate(config)
        return config

    _MIN = {"axes_dims_rope": 0, "extra_condition_channels": 0}

    def _check(self):
        _require_rope_axes(self.axes_dims_rope, self.attention_head_dim)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def cond_channels(self) -> int:
        """Channels of the packed control latents ``controlnet_cond`` (B, N, cond_channels)."""
        return self.in_channels + self.extra_condition_channels


class ControlNetModulationTable:
    """Every step's block modulations (from `QwenImageControlNet.modulation_table`); ``table[i]`` is step ``i``'s
    ``modulations=``. One row per step, shared by the whole batch."""

    def __init__(self, blocks):
        self.blocks = blocks  # per block: (img_mod, txt_mod), each (steps, 6 * dim)

    def __len__(self) -> int:
        return self.blocks[0][0].shape[0] if self.blocks else 0

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(f"step {i} of a {len(self)}-step modulation table")
        i %= len(self)
        return [(img[i : i + 1][:, None], txt[i : i + 1][:, None]) for img, txt in self.blocks]


class QwenImageControlNet(nn.Module):
    def __init__(self, config: ControlNetConfig):
        super().__init__()
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
        self.controlnet_blocks = [nn.Linear(dim, dim) for _ in range(config.num_layers)]
        self.controlnet_x_embedder = nn.Linear(config.cond_channels, dim)
        self.rope_cache = RopeCache(config.axes_dims_rope, ROPE_THETA)
        self._masks = _MaskMemo()

    @classmethod
    def from_config(cls, config: dict) -> "QwenImageControlNet":
        return cls(ControlNetConfig.from_dict(config))

    @staticmethod
    def sanitize(weights: dict) -> dict:
        """Checkpoint names are our names; a ``controlnet.`` prefix is removed and RoPE buffers (``pos_embed``,
        which diffusers computes and never saves) are dropped should an export carry them."""
        prefix = "controlnet."
        out = {}
        for k, v in weights.items():
            k = k[len(prefix):] if k.startswith(prefix) else k
            if not k.startswith("pos_embed."):
                out[k] = v
        return out

    @property
    def dtype(self):
        # A norm gain: never quantized, unlike a linear weight.
        return self.txt_norm.weight.dtype

    def time_embedding(self, sigma: mx.array) -> mx.array:
        # Rounded to the activation dtype like the transformer's: the pipeline gives both models the same timestep,
        # already in the model dtype, so both see one value (diffusers' ControlNet itself skips this rounding).
        sigma = mx.array(sigma).reshape(-1).astype(self.dtype)
        return self.time_text_embed(sigma, self.dtype)

    def modulations(self, temb: mx.array):
        """Every block's (img_mod, txt_mod) for one timestep embedding: a function of the timestep alone."""
        return [blk.modulation(temb, temb) for blk in self.transformer_blocks]

    def modulation_table(self, timesteps) -> ControlNetModulationTable:
        """The modulations of every step of a schedule, one matmul per layer (``timesteps`` as `__call__` gets
        them). Small next to the transformer's (5 blocks), so nothing is dropped."""
        act = nn.silu(self.time_embedding(mx.array(timesteps)))
        blocks = [(blk.img_mod[1](act), blk.txt_mod[1](act)) for blk in self.transformer_blocks]
        mx.eval(blocks)
        return ControlNetModulationTable(blocks)

    def __call__(
        self,
        hidden_states: mx.array,
        controlnet_cond: mx.array,
        conditioning_scale: float,
        encoder_hidden_states: mx.array,
        encoder_hidden_states_mask: mx.array | None,
        timestep: mx.array,
        img_shapes,
        modulations=None,
    ) -> list[mx.array]:
        """One residual (B, N, dim) per block, already times ``conditioning_scale``, for the transformer's
        ``controlnet_block_samples``.

        ``hidden_states`` (B, N, in_channels): the packed noisy latents the transformer gets; ``controlnet_cond``
        (B or 1, N, cond_channels): the packed control latents; the text features, mask, sigma (B,) and
        ``img_shapes`` as for `QwenImageTransformer`. ``modulations`` (from `modulations`, or a `modulation_table`
        row) skips the timestep path.
        """
        dtype = self.dtype
        B, N, _ = hidden_states.shape
        L = encoder_hidden_states.shape[1]
        # The control latents enter once, added to the embedded noisy latents; the zero-initialised embedder made
        # the untrained ControlNet a no-op.
        img = self.img_in(hidden_states.astype(dtype)) + self.controlnet_x_embedder(controlnet_cond.astype(dtype))
        txt = self.txt_in(self.txt_norm(encoder_hidden_states.astype(dtype)))
        if modulations is None:
            modulations = self.modulations(self.time_embedding(timestep))
        if len(modulations) != len(self.transformer_blocks):
            raise ValueError(f"{len(modulations)} block modulations for a {len(self.transformer_blocks)}-block "
                             "ControlNet: pass this ControlNet's own modulation table")

        rope = self.rope_cache(img_shapes[0], L)
        mask = self._masks(encoder_hidden_states_mask, N)
        samples = []
        for blk, proj, (img_mod, txt_mod) in zip(self.transformer_blocks, self.controlnet_blocks, modulations):
            img, txt = blk(img, txt, img_mod, txt_mod, rope, mask)
            samples.append(proj(img) * conditioning_scale)
        return samples


class QwenImageMultiControlNet(nn.Module):
    """Several control conditions summed into one list of residuals, as diffusers' ``QwenImageMultiControlNetModel``.

    With one net (the Union model: diffusers accepts only this) that net runs once per condition, with that
    condition's scale, and the per-block residuals are summed. With several nets (not in diffusers, which refuses
    them) net ``k`` takes condition ``k``; their block counts must agree, since the sum is block by block.
    """

    def __init__(self, nets: list[QwenImageControlNet]):
        super().__init__()
        if not nets:
            raise ValueError("QwenImageMultiControlNet needs at least one ControlNet")
        if len({len(n.transformer_blocks) for n in nets}) > 1:
            raise ValueError("the ControlNets have different numbers of blocks, so their residuals cannot be summed")
        self.nets = list(nets)  # weights under nets.K, as in diffusers' Multi model

    def __call__(
        self,
        hidden_states: mx.array,
        controlnet_cond: list[mx.array],
        conditioning_scale: list[float],
        encoder_hidden_states: mx.array,
        encoder_hidden_states_mask: mx.array | None,
        timestep: mx.array,
        img_shapes,
        modulations=None,
    ) -> list[mx.array]:
        """``controlnet_cond`` and ``conditioning_scale``: one per condition. ``modulations``: one net's (shared by
        all its conditions) or a list with one per net."""
        conds, scales = list(controlnet_cond), list(conditioning_scale)
        if len(scales) != len(conds):
            raise ValueError(f"{len(conds)} control conditions but {len(scales)} conditioning scales")
        if len(self.nets) == 1:
            net = self.nets[0]
            if modulations is None:  # one timestep path for every condition of the one net
                modulations = net.modulations(net.time_embedding(timestep))
            runs = [(net, modulations)] * len(conds)
        elif len(self.nets) == len(conds):
            runs = list(zip(self.nets, modulations if modulations is not None else [None] * len(conds)))
        else:
            raise ValueError(f"{len(self.nets)} ControlNets for {len(conds)} control conditions")
        total = None
        for (net, mods), cond, scale in zip(runs, conds, scales):
            samples = net(hidden_states, cond, scale, encoder_hidden_states, encoder_hidden_states_mask, timestep,
                          img_shapes, modulations=mods)
            # diffusers sums in condition order: first list, then each next one added block by block.
            total = samples if total is None else [a + b for a, b in zip(total, samples)]
        return total


__all__ = ["ControlNetConfig", "ControlNetModulationTable", "QwenImageControlNet",
           "QwenImageMultiControlNet"]
