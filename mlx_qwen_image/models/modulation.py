"""The timestep path, precomputed: a schedule's modulation vectors, stand-ins for the layers freed while they are
in use, and the bookkeeping both transformers share (`TimestepPath`: which layers may be dropped and rebuilt)."""

from __future__ import annotations

import weakref

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten


class ModulationTable:
    """Modulations for every step of a schedule (from `QwenImageTransformer.modulation_table`).

    One row per step shared by the whole batch (CFG's cond and uncond halves have the same timestep); with
    ``zero_cond_t`` a last image row holds the t = 0 vectors of reference-image tokens.
    """

    def __init__(self, blocks, out, zero_row: bool):
        self.blocks, self.out, self.zero_row = blocks, out, zero_row

    def __len__(self) -> int:
        return self.out.shape[0]

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(f"step {i} of a {len(self)}-step modulation table")
        i %= len(self)

        def img_rows(a):
            return (mx.concatenate([a[i : i + 1], a[-1:]]) if self.zero_row else a[i : i + 1])[:, None]

        mods = [(img_rows(img), txt[i : i + 1][:, None]) for img, txt in self.blocks]
        return mods, self.out[i : i + 1][:, None]

    @property
    def nbytes(self) -> int:
        return self.out.nbytes + sum(a.nbytes + b.nbytes for a, b in self.blocks)


class DroppedLinear(nn.Module):
    """Stands in for a timestep-path linear layer whose weights were freed; remembers how to rebuild it."""

    def __init__(self, layer: nn.Module, path: str):
        super().__init__()
        self.check(layer, path)
        quantized = isinstance(layer, nn.QuantizedLinear)
        self.path = path
        self.bits = layer.bits if quantized else 0
        self.group_size = layer.group_size if quantized else 0
        self.quant_mode = getattr(layer, "mode", "affine")
        self.output_dims = layer.weight.shape[0]
        self.input_dims = layer.weight.shape[1] * 32 // self.bits if quantized else layer.weight.shape[1]
        self.has_bias = "bias" in layer
        self.param_dtype = (layer.scales if quantized else layer.weight).dtype

    @staticmethod
    def check(layer: nn.Module, path: str):
        if isinstance(layer, DroppedLinear):
            layer(None)  # already dropped: says to restore first
        if type(layer) not in (nn.Linear, nn.QuantizedLinear):  # e.g. a LoRA wrapper, which a reload would lose
            raise ValueError(f"{path} is a {type(layer).__name__}: only plain or quantized linear layers can be "
                             "dropped")

    def __call__(self, x):
        raise RuntimeError(
            f"{self.path} was dropped after precomputing the modulations: pass modulations= from the "
            "modulation table, or call restore_modulation_weights first"
        )

    def rebuild(self, weights: dict) -> nn.Module:
        """The layer from its checkpoint tensors (float, or quantized with ``scales``), as it was dropped."""
        weights = {k: v.astype(self.param_dtype) if mx.issubdtype(v.dtype, mx.floating) else v
                   for k, v in weights.items()}
        mode = {} if self.quant_mode == "affine" else {"mode": self.quant_mode}
        if "scales" in weights:
            layer = nn.QuantizedLinear(self.input_dims, self.output_dims, self.has_bias, self.group_size, self.bits,
                                       **mode)
        else:
            layer = nn.Linear(self.input_dims, self.output_dims, self.has_bias)
        try:
            layer.load_weights(list(weights.items()), strict=True)
        except ValueError as e:
            raise ValueError(f"cannot restore {self.path}: {e}") from None
        if self.bits and "scales" not in weights:  # quantized on load: quantize the float weights again
            layer = nn.QuantizedLinear.from_linear(layer, self.group_size, self.bits, **mode)
        return layer


class WeightMarks:
    """Weak references to some layers' parameter arrays, taken when they equal the checkpoint's.

    Any change to such a layer (a LoRA fused into it, ``load_weights``, a wrapper) replaces its arrays, so the
    references no longer point at the layer's arrays: `match` tells whether the layers are still as marked.
    """

    def __init__(self, model: nn.Module, paths: list[str]):
        self.refs = {}
        for path in paths:
            layer = get_module(model, path)
            self.refs[path] = (type(layer), {k: weakref.ref(v) for k, v in tree_flatten(layer.parameters())})

    def match(self, model: nn.Module) -> bool:
        for path, (kind, refs) in self.refs.items():
            layer = get_module(model, path)
            if type(layer) is not kind:
                return False
            arrays = dict(tree_flatten(layer.parameters()))
            if arrays.keys() != refs.keys() or any(refs[k]() is not v for k, v in arrays.items()):
                return False
        return True


class TimestepPath:
    """The bookkeeping of a transformer whose timestep-path layers (``modulation_layer_paths()``) are dropped while
    a run's modulation table is in use and rebuilt from the checkpoint after it; mixed into both transformers."""

    _timestep_marks: WeightMarks | None = None

    def mark_timestep_path(self):
        """Record that the timestep-path layers now hold weights their source can give again (the loader calls
        this after a load, the pipeline after fusing its own LoRAs); any later change to them voids the mark.
        Layers that are not plain or quantized linears (a LoRA beside a quantized layer) are never marked."""
        paths = self.modulation_layer_paths()
        plain = all(type(get_module(self, p)) in (nn.Linear, nn.QuantizedLinear) for p in paths)
        self._timestep_marks = WeightMarks(self, paths) if plain else None

    @property
    def timestep_path_marked(self) -> bool:
        """True while every timestep-path layer is exactly as last marked, so dropping and reloading it is safe."""
        return self._timestep_marks is not None and not self.modulation_weights_dropped and \
            self._timestep_marks.match(self)

    @property
    def modulation_weights_dropped(self) -> bool:
        return any(isinstance(get_module(self, p), DroppedLinear) for p in self.modulation_layer_paths())

    def _drop(self, *paths):
        for path in paths:
            set_module(self, path, DroppedLinear(get_module(self, path), path))
        mx.clear_cache()

    def restore_modulation_weights(self, weights: dict):
        """Rebuild the dropped layers from checkpoint weights (``loading.lazy_weights(folder)``: lazy, so only
        those layers are read, when next used), in the dtype and quantization they had when dropped. LoRAs fused
        into those layers are not in the checkpoint: pass weights with them fused (``lora.fuse_lora_weights``)."""
        weights = self.sanitize(weights)
        for path in self.modulation_layer_paths():
            layer = get_module(self, path)
            if isinstance(layer, DroppedLinear):
                prefix = path + "."
                own = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
                set_module(self, path, layer.rebuild(own))
        self.mark_timestep_path()


def get_module(model: nn.Module, path: str) -> nn.Module:
    for part in path.split(".") if path else ():
        model = model[int(part)] if isinstance(model, list) else model[part]
    return model


def set_module(model: nn.Module, path: str, module: nn.Module):
    *parents, last = path.split(".")
    parent = get_module(model, ".".join(parents))
    if isinstance(parent, list):
        parent[int(last)] = module
    else:
        setattr(parent, last, module)
