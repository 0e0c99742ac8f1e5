"""LoRA adapters for the Qwen-Image transformers (Qwen-Image's MMDiT and 2.1's single stream): read the published
file formats, fuse or add them.

A LoRA file is normalised to one ``LoRALayer`` per transformer linear layer (by its path, e.g.
``transformer_blocks.0.attn.to_q``): ``down`` (r, in), ``up`` (out, r) and ``scale`` (alpha / r, or 1 without an
alpha), so that the layer's weight becomes ``W + user_scale * scale * up @ down``. Spellings understood:

- diffusers / PEFT: ``[transformer.|base_model.model.]<path>.lora_A[.default].weight`` and ``lora_B``, alpha from
  ``<path>.alpha`` keys or from the adapter config diffusers stores in the file's metadata;
- ComfyUI / original: ``diffusion_model.<path>.lora_down.weight`` / ``lora_up`` (or lora_A / lora_B), ``.alpha``;
- kohya: ``lora_unet_<path with _ for .>.lora_down.weight`` / ``lora_up``, ``.alpha``;
- 2.1 in ComfyUI's layout: a fused ``img_mlp.gate_up`` layer, split onto ``gate_layer`` and ``proj``.

Anything else in the file, or a layer that the transformer does not have, is an error: a LoRA that silently
drops half its layers would give plausible but wrong images.

Float layers get the LoRA fused into their weights (exact, in float32). Quantized layers either get it before
quantization (`apply_lora` on the float model before ``nn.quantize``, or `fuse_lora_weights` on the checkpoint
dict), or keep it beside them as a low-rank add (`LoRALinear`, what `apply_lora` does to quantized layers).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Iterable, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .models.modulation import set_module

_PREFIXES = ("transformer.", "diffusion_model.", "model.diffusion_model.", "base_model.model.")
_KOHYA_PREFIX = "lora_unet_"
_WEIGHT_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.default)?\.(?P<param>weight|bias)$"
)
_ALPHA_KEY = re.compile(r"^(?P<module>.+)\.alpha$")
_SHOW = 4  # how many offending keys an error message lists


@dataclasses.dataclass
class LoRALayer:
    down: mx.array  # (r, in)
    up: mx.array  # (out, r)
    scale: float  # alpha / r, folded with nothing else: the user's scale comes on top
    up_bias: mx.array | None = None  # PEFT's lora_bias: (out,)

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclasses.dataclass
class LoRA:
    name: str
    layers: dict[str, LoRALayer]  # layer path (dotted), or the underscore-flattened path for kohya files
    flat_names: bool = False


Source = Union[str, Path, dict, LoRA]


def _fail(what: str, items: Iterable[str], hint: str = "") -> None:
    items = sorted(items)
    shown = ", ".join(items[:_SHOW]) + (f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else "")
    raise ValueError(f"{what}: {shown}{'; ' + hint if hint else ''}")


def _read_file(path: Path) -> tuple[dict, dict | None, str]:
    """Tensors, the PEFT adapter config if the file carries one, and a display name."""
    if path.is_dir():
        names = [p for p in ("pytorch_lora_weights.safetensors", "adapter_model.safetensors") if (path / p).exists()]
        files = [path / names[0]] if names else sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise ValueError(f"{path}: expected one .safetensors LoRA file in the folder, found {len(files)}")
        path = files[0]
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: LoRA files are read only as .safetensors (other formats can run code on load)")
    if not path.exists():
        raise ValueError(f"{path}: no such LoRA file")
    try:
        tensors, metadata = mx.load(str(path), return_metadata=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors file ({str(e).strip() or type(e).__name__})") from None
    config = None
    if metadata and metadata.get("lora_adapter_metadata"):
        # diffusers keeps the training LoraConfig (lora_alpha, alpha_pattern ...) as "<component>.<field>".
        packed = json.loads(metadata["lora_adapter_metadata"])
        config = {k[len("transformer."):]: v for k, v in packed.items() if k.startswith("transformer.")}
    elif (path.parent / "adapter_config.json").exists() and path.name == "adapter_model.safetensors":
        config = json.loads((path.parent / "adapter_config.json").read_text())
    return tensors, config, str(path)


def _config_scale(config: dict, module: str, rank: int) -> float:
    """alpha / r for ``module`` under a PEFT LoraConfig (with its per-module alpha_pattern and rsLoRA)."""
    alpha = config.get("lora_alpha", rank)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def load_lora(source: Source) -> LoRA:
    """Read a LoRA (a .safetensors file, a folder holding one, or a dict of arrays) into a `LoRA`."""
    if isinstance(source, LoRA):
        return source
    config = None
    if isinstance(source, dict):
        tensors, name = {k: mx.array(np.asarray(v)) if not isinstance(v, mx.array) else v
                         for k, v in source.items()}, "LoRA weights"
    else:
        tensors, config, name = _read_file(Path(source).expanduser())
    if config and config.get("use_dora"):
        raise ValueError(f"{name}: DoRA adapters are not supported (only plain LoRA)")

    flat = any(k.startswith(_KOHYA_PREFIX) for k in tensors)
    parts: dict[str, dict[str, mx.array]] = {}
    unknown = []
    for key, value in tensors.items():
        bare = key
        if flat:
            bare = key[len(_KOHYA_PREFIX):] if key.startswith(_KOHYA_PREFIX) else None
        else:
            for prefix in _PREFIXES:
                if bare.startswith(prefix):
                    bare = bare[len(prefix):]
                    break
        m = _WEIGHT_KEY.match(bare) if bare else None
        if m:
            kind = {"lora_down": "lora_A", "lora_up": "lora_B"}.get(m["kind"], m["kind"])
            parts.setdefault(m["module"], {})[f"{kind}.{m['param']}"] = value
        elif bare and (m := _ALPHA_KEY.match(bare)):
            parts.setdefault(m["module"], {})["alpha"] = value
        else:
            unknown.append(key)
    if unknown:
        _fail(f"{name}: {len(unknown)} keys are not LoRA weights that mlx-qwen-image understands", unknown,
              "supported: diffusers/PEFT lora_A/lora_B, diffusion_model. lora_down/lora_up, kohya lora_unet_ "
              "(DoRA, LoKr, LoHa, text-encoder LoRAs and full-weight diffs are not)")

    layers, broken = {}, []
    for module, p in parts.items():
        down, up = p.get("lora_A.weight"), p.get("lora_B.weight")
        if down is None or up is None or "lora_A.bias" in p or down.ndim != 2 or up.ndim != 2 \
                or down.shape[0] != up.shape[1]:
            broken.append(f"{module} ({', '.join(f'{k} {tuple(v.shape)}' for k, v in sorted(p.items()))})")
            continue
        rank = down.shape[0]
        if "alpha" in p:
            scale = float(p["alpha"].astype(mx.float32).reshape(-1)[0].item()) / rank
        elif config:
            scale = _config_scale(config, module, rank)
        else:
            scale = 1.0
        layers[module] = LoRALayer(down, up, scale, p.get("lora_B.bias"))
    if broken:
        _fail(f"{name}: {len(broken)} LoRA layers need a 2-D down (r, in) and up (out, r) pair of equal rank",
              broken)
    if not layers:
        raise ValueError(f"{name}: no LoRA layers found")
    _check_values(name, layers)
    return LoRA(name, layers, flat)


def _check_values(name: str, layers: dict[str, LoRALayer]):
    """Float tensors with finite values only: a NaN or an integer tensor would give black or garbage images."""
    ints = [m for m, lyr in layers.items() if any(not mx.issubdtype(t.dtype, mx.floating)
                                                   for t in (lyr.down, lyr.up, lyr.up_bias) if t is not None)]
    if ints:
        _fail(f"{name}: {len(ints)} LoRA layers hold integer tensors, not float weights", ints)
    finite = {m: mx.all(mx.isfinite(lyr.down)) & mx.all(mx.isfinite(lyr.up))
              & (mx.all(mx.isfinite(lyr.up_bias)) if lyr.up_bias is not None else True) for m, lyr in layers.items()}
    mx.eval(list(finite.values()))
    bad = [m for m, ok in finite.items() if not ok.item()] + [m for m, lyr in layers.items()
                                                                 if not math.isfinite(lyr.scale)]
    if bad:
        _fail(f"{name}: {len(bad)} LoRA layers hold NaN or infinite values (a damaged or badly trained file)", bad)


def _resolve(lora: LoRA, targets: dict[str, tuple[int, int] | None]) -> dict[str, LoRALayer]:
    """Map the LoRA's layers onto ``targets`` ({path: (out, in) or None for "unknown"}); refuse unmatched names
    and wrong shapes."""
    lookup = {p.replace(".", "_"): p for p in targets} if lora.flat_names else {p: p for p in targets}
    lora = _split_fused(lora, lookup)
    missing = [n for n in lora.layers if n not in lookup]
    if missing:
        _fail(f"{lora.name}: {len(missing)} LoRA layers match no linear layer of the transformer", missing,
              "is it a LoRA for another model?")
    resolved, bad = {}, []
    for name, layer in lora.layers.items():
        path = lookup[name]
        out_dims, in_dims = targets[path] or (layer.up.shape[0], layer.down.shape[1])
        if layer.down.shape[1] != in_dims or layer.up.shape[0] != out_dims:
            bad.append(f"{path} (layer {out_dims}x{in_dims}, LoRA {layer.up.shape[0]}x{layer.down.shape[1]})")
        resolved[path] = layer
    if bad:
        _fail(f"{lora.name}: {len(bad)} LoRA layers do not fit the transformer's shapes", bad,
              "is it a LoRA for another model size?")
    return resolved


def _split_fused(lora: LoRA, lookup: dict) -> LoRA:
    """A 2.1 LoRA in ComfyUI's spelling adapts the fused SwiGLU input ``img_mlp.gate_up`` ([gate; up] rows), which
    the model holds as ``gate_layer`` and ``proj``: one shared ``down``, ``up`` split in halves."""
    sep = "_" if lora.flat_names else "."
    fused = [n for n in lora.layers if n.endswith(f"{sep}gate_up") and n not in lookup
             and n[: -len("gate_up")] + "gate_layer" in lookup and n[: -len("gate_up")] + "proj" in lookup]
    if not fused:
        return lora
    layers = dict(lora.layers)
    for name in fused:
        layer, stem = layers.pop(name), name[: -len("gate_up")]
        half = layer.up.shape[0] // 2
        for part, rows in (("gate_layer", slice(0, half)), ("proj", slice(half, None))):
            bias = None if layer.up_bias is None else layer.up_bias[rows]
            layers[stem + part] = LoRALayer(layer.down, layer.up[rows], layer.scale, bias)
    return dataclasses.replace(lora, layers=layers)


def _collect(loras, targets) -> dict[str, list[tuple[LoRALayer, float]]]:
    """Every (layer, user scale) per target path, over all LoRAs ((source, scale) pairs, or bare sources for
    scale 1); several on one layer add up."""
    per_path: dict[str, list[tuple[LoRALayer, float]]] = {}
    for item in loras:
        source, scale = item if isinstance(item, tuple) else (item, 1.0)
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
            what = source if isinstance(source, (str, Path)) else getattr(source, "name", "LoRA weights")
            raise ValueError(f"LoRA scale {scale!r} for {what} must be a finite number")
        for path, layer in _resolve(load_lora(source), targets).items():
            per_path.setdefault(path, []).append((layer, float(scale)))
    return per_path


def _delta(entries) -> tuple[mx.array, mx.array | None]:
    """sum of scale * up @ down (and of the up biases) in float32."""
    f32 = mx.float32
    delta = sum((s * layer.scale) * (layer.up.astype(f32) @ layer.down.astype(f32)) for layer, s in entries)
    biases = [(s * layer.scale) * layer.up_bias.astype(f32) for layer, s in entries if layer.up_bias is not None]
    return delta, (sum(biases) if biases else None)


def fuse_lora_weights(weights: dict[str, mx.array], loras, only=None) -> dict[str, mx.array]:
    """A copy of a sanitized checkpoint dict with ``loras`` ([(source, scale)]) fused into its float weights.

    Lazy in, lazy out: for the loader and the converter before quantization (``<path>.weight`` gets
    ``W + delta`` computed in float32 and cast back to W's dtype). With ``only`` (layer paths), the LoRAs' other
    layers are checked but not fused (reloading some layers of a model that has the LoRAs applied).
    """
    quantized = {k[: -len(".scales")] for k in weights if k.endswith(".scales")}
    targets = {
        k[: -len(".weight")]: tuple(v.shape)
        for k, v in weights.items()
        if k.endswith(".weight") and v.ndim == 2 and k[: -len(".weight")] not in quantized
    }
    targets.update({p: None for p in quantized})  # present, but refused below with a clear reason
    per_path = _collect(loras, targets)
    if only is not None:
        per_path = {p: e for p, e in per_path.items() if p in set(only)}
    hit = sorted(set(per_path) & quantized)
    if hit:
        _fail("these layers are already quantized; fuse before quantizing or use apply_lora on the loaded model",
              hit)
    out = dict(weights)
    for path, entries in per_path.items():
        delta, bias = _delta(entries)
        w = weights[f"{path}.weight"]
        out[f"{path}.weight"] = (w.astype(mx.float32) + delta).astype(w.dtype)
        if bias is not None:
            if f"{path}.bias" not in weights:
                _fail("the LoRA has a bias for layers without one", [path])
            b = weights[f"{path}.bias"]
            out[f"{path}.bias"] = (b.astype(mx.float32) + bias).astype(b.dtype)
    return out


class LoRALinear(nn.Module):
    """A linear layer (usually quantized) plus a low-rank term: ``base(x) + (x @ down.T) @ up.T (+ bias)``.

    Several LoRAs are stacked along the rank, their scales folded into ``up``, so the add is two thin matmuls.
    """

    def __init__(self, base: nn.Module, down: mx.array, up: mx.array, bias: mx.array | None = None):
        super().__init__()
        self.base = base
        self.down = down
        self.up = up
        if bias is not None:
            self.up_bias = bias

    def add(self, down: mx.array, up: mx.array, bias: mx.array | None = None) -> None:
        self.down = mx.concatenate([self.down, down.astype(self.down.dtype)], axis=0)
        self.up = mx.concatenate([self.up, up.astype(self.up.dtype)], axis=1)
        if bias is not None:
            self.up_bias = self.get("up_bias", 0) + bias.astype(self.up.dtype)

    def __call__(self, x):
        y = mx.addmm(self.base(x), x @ self.down.T, self.up.T)
        return y + self["up_bias"] if "up_bias" in self else y


def _dims(layer) -> tuple[int, int]:
    """(out, in) of a linear, quantized linear or LoRALinear."""
    if isinstance(layer, LoRALinear):
        return _dims(layer.base)
    out_dims, cols = layer.weight.shape
    return (out_dims, cols * 32 // layer.bits) if isinstance(layer, nn.QuantizedLinear) else (out_dims, cols)


def apply_lora(model: nn.Module, loras) -> int:
    """Apply ``loras`` ([(source, scale)], sources as for `load_lora`) to ``model`` in place.

    Float ``nn.Linear`` layers get the sum fused into their weights (exact: float32, then cast back), one layer
    evaluated at a time so memory never holds two copies of the model; called before ``nn.quantize`` this is
    "fuse, then quantize". Quantized layers are wrapped in a `LoRALinear` low-rank add (dequantizing, adding and
    quantizing again would round away most of a small LoRA at 4 bits). Everything is checked before anything
    changes.
    Returns the number of layers changed.
    """
    modules = model.named_modules()
    wrapped = {path + ".base" for path, m in modules if isinstance(m, LoRALinear)}
    layers = {
        path: m
        for path, m in modules
        if isinstance(m, (nn.Linear, nn.QuantizedLinear, LoRALinear)) and path not in wrapped
    }
    per_path = _collect(loras, {p: _dims(m) for p, m in layers.items()})
    for path, entries in per_path.items():
        layer = layers[path]
        base = layer.base if isinstance(layer, LoRALinear) else layer
        if any(lyr.up_bias is not None for lyr, _ in entries) and "bias" not in base:
            _fail("the LoRA has a bias for layers without one", [path])
    for path, entries in per_path.items():
        layer = layers[path]
        if isinstance(layer, nn.Linear):
            delta, bias = _delta(entries)
            layer.weight = (layer.weight.astype(mx.float32) + delta).astype(layer.weight.dtype)
            if bias is not None:
                layer.bias = (layer.bias.astype(mx.float32) + bias).astype(layer.bias.dtype)
            mx.eval(layer.parameters())
            continue
        # Stack the ranks: down (R, in) as is, up (out, R) with each LoRA's scales folded in.
        dtype = (layer.base if isinstance(layer, LoRALinear) else layer).scales.dtype
        down = mx.concatenate([lyr.down for lyr, _ in entries], axis=0).astype(dtype)
        up = mx.concatenate([(s * lyr.scale) * lyr.up.astype(mx.float32) for lyr, s in entries], axis=1)
        biases = [(s * lyr.scale) * lyr.up_bias.astype(mx.float32) for lyr, s in entries if lyr.up_bias is not None]
        bias = sum(biases).astype(dtype) if biases else None
        if isinstance(layer, LoRALinear):
            layer.add(down, up.astype(dtype), bias)
            mx.eval(layer.parameters())
        else:
            wrapper = LoRALinear(layer, down, up.astype(dtype), bias)
            mx.eval(wrapper.parameters())
            set_module(model, path, wrapper)
    return len(per_path)


def parse_lora_arg(text: str, option: str = "--lora") -> tuple[str, float]:
    """``PATH[:SCALE]`` as the CLI takes it (``--lora``, ``--controlnet``); a path that itself contains ':' works
    when no scale follows (an existing file named so). A scale that is not a finite number is refused."""
    path, sep, tail = text.rpartition(":")
    if not sep or Path(text).expanduser().exists():
        return text, 1.0
    try:
        scale = float(tail)
    except ValueError:
        raise ValueError(f"{option} {text}: the scale {tail!r} is not a number (PATH[:SCALE], e.g. "
                         "style.safetensors:0.8)") from None
    if not math.isfinite(scale):
        raise ValueError(f"{option} {text}: the scale must be a finite number, got {tail}")
    return path, scale
