"""ControlNet for a run: loading the nets, the control latents, and their residuals at every step, as diffusers'
QwenImageControlNetPipeline and QwenImageControlNetInpaintPipeline do.

A control picture is resized to the output size and VAE-encoded like an img2img picture (the latent mean,
normalised, packed). An inpainting ControlNet (``extra_condition_channels``) reads instead the picture with the
masked pixels set to -1, encoded, beside the inverted mask at the latents' resolution: 4 x 17 packed channels.
Each step the nets run on the noisy latents with the prompt's rows only; their per-block residuals are added to
the transformer's image stream, the same residuals for the conditional and the unconditional rows under CFG. A
condition counts only inside its guidance window: its scale is zero for step ``i`` of ``n`` when ``i / n < start``
or ``(i + 1) / n > end``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mlx.core as mx
import numpy as np

from .config import CheckpointError
from .image import resize
from .loading import download, is_repo_id, load_model, local_folder
from .models.controlnet import QwenImageControlNet, QwenImageMultiControlNet


@dataclasses.dataclass(frozen=True)
class ControlRequest:
    """The checked control settings of a run: one picture and scale per condition, their guidance windows."""

    pictures: tuple
    scales: tuple[float, ...]
    windows: tuple[tuple[float, float], ...]


def locate_controlnet(path_or_repo_id) -> Path:
    """A ControlNet folder (``config.json`` and safetensors), local or downloaded from the Hub."""
    if is_repo_id(path_or_repo_id):
        root = download(str(path_or_repo_id), patterns=["*.json", "*.safetensors"])
    else:
        root = local_folder(path_or_repo_id)
    if not (root / "config.json").is_file() or not list(root.glob("*.safetensors")):
        raise CheckpointError(f"{root} is not a ControlNet checkpoint: it needs config.json and safetensors weights")
    return root


def load_controlnets(paths, dtype, quantize, transformer) -> QwenImageMultiControlNet:
    """The nets of ``paths`` (a path repeated is one net with several conditions, as the Union model is used),
    checked against the transformer they feed; quantized with the transformer's recipe under ``quantize``."""
    from .loading import quantize_model

    unique = list(dict.fromkeys(str(p) for p in paths))
    if len(unique) > 1 and len(unique) != len(paths):
        raise ValueError("a ControlNet may be repeated (several conditions on one net, as the Union model takes "
                         "them) only when it is the only one")
    nets = []
    for path in unique:
        root = locate_controlnet(path)
        net = load_model(QwenImageControlNet, root, dtype)
        if net.config.inner_dim != transformer.config.inner_dim:
            raise ValueError(f"the ControlNet {path} is {net.config.inner_dim} wide and the transformer "
                             f"{transformer.config.inner_dim}: it was made for another model")
        if quantize and not any(k.endswith(".scales") for k in _names(net)):
            quantize_model(net, bits=quantize)
        nets.append(net)
    return QwenImageMultiControlNet(nets)


def _names(model):
    from mlx.utils import tree_flatten

    return [k for k, _ in tree_flatten(model.parameters())]


def check_control(controlnet, pictures, scales, start, end) -> ControlRequest | None:
    """The control settings of a run, every mistake a one-line ``ValueError``."""
    if not pictures:
        if controlnet is not None:
            raise ValueError("this pipeline has a ControlNet: pass control_images=[...] (one per condition)")
        return None
    if controlnet is None:
        raise ValueError("control_images= needs a ControlNet: from_pretrained(..., controlnets=[PATH])")
    pictures = list(pictures)
    nets = len(controlnet.nets)
    if nets > 1 and len(pictures) != nets:
        raise ValueError(f"{nets} ControlNets take {nets} control pictures, got {len(pictures)}")
    n = len(pictures)

    def per_condition(name, value, default):
        values = [default if value is None else value] * n if not isinstance(value, (list, tuple)) else list(value)
        if len(values) != n:
            raise ValueError(f"{name}: {len(values)} values for {n} control pictures")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
                raise ValueError(f"{name} must be finite numbers, got {v!r}")
        return [float(v) for v in values]

    scales = per_condition("control_scale", scales, 1.0)
    starts, ends = per_condition("control_start", start, 0.0), per_condition("control_end", end, 1.0)
    for s, e in zip(starts, ends):
        if not 0 <= s < e <= 1:
            raise ValueError(f"the control guidance window must satisfy 0 <= start < end <= 1, got [{s}, {e}]")
    from .image import open_image

    opened = tuple(open_image(p, name="the control picture").convert("RGB") for p in pictures)
    return ControlRequest(opened, tuple(scales), tuple(zip(starts, ends)))


def inpainting(controlnet) -> bool:
    """Whether the nets read a masked picture and its mask (the inpainting ControlNet)."""
    return controlnet is not None and controlnet.nets[0].config.extra_condition_channels > 0


def control_latents(pipe, req) -> list[mx.array]:
    """The packed control latents of each condition, at the output size."""
    out = []
    for picture in req.control.pictures:
        sized = resize(picture, req.width, req.height)
        if not inpainting(pipe.controlnet):
            out.append(pipe.encode_image(sized))
            continue
        from .image import pil_to_array
        from .inpaint import prepare_mask

        keep = prepare_mask(req.mask, req.width, req.height)  # 1: repaint
        pixels = pil_to_array(sized, dtype=pipe.vae.dtype)
        masked = mx.where(mx.array(keep > 0.5)[None, :, :, None], -1.0, pixels).astype(pipe.vae.dtype)
        latents = pipe.vae.normalize_latents(pipe.vae.encode(masked)).astype(mx.float32)
        s = pipe.vae.config.scale_factor
        inverted = mx.array(1.0 - keep[::s, ::s])[None, :, :, None]
        out.append(pipe.vae.pack(mx.concatenate([latents, inverted], axis=-1)))
    return out


class Residuals:
    """The ControlNet residuals of one run, step by step (the nets' modulations precomputed for the schedule)."""

    def __init__(self, controlnet: QwenImageMultiControlNet, control: ControlRequest, latents: list[mx.array],
                 timesteps, steps: int):
        self.controlnet, self.control, self.latents, self.steps = controlnet, control, latents, steps
        tables = [net.modulation_table(timesteps) for net in controlnet.nets]
        self.tables = tables

    def scales(self, i: int) -> list[float]:
        n = self.steps
        return [c * (0.0 if (i / n < s or (i + 1) / n > e) else 1.0)
                for c, (s, e) in zip(self.control.scales, self.control.windows)]

    def __call__(self, i: int, x: mx.array, embeds, mask, timestep, img_shapes, rows: int) -> list[mx.array] | None:
        """The residuals for step ``i`` (None when every condition is outside its window), repeated for ``rows``
        transformer rows."""
        scales = self.scales(i)
        if not any(scales):
            return None
        batch = x.shape[0]
        t = mx.full((batch,), timestep, dtype=mx.float32)
        mods = self.tables[0][i] if len(self.tables) == 1 else [table[i] for table in self.tables]
        samples = self.controlnet(x, self.latents, scales, embeds[:batch], None if mask is None else mask[:batch],
                                  t, img_shapes[:batch], modulations=mods)
        if rows == batch or batch == 1:  # one row broadcasts over the CFG rows in the transformer's add
            return samples
        return [mx.concatenate([s] * (rows // batch)) for s in samples]
