"""The timestep path of the MMDiT, precomputed: a schedule's modulation vectors, and stand-ins for the layers
freed while they are in use (`QwenImageTransformer.modulation_table` / `restore_modulation_weights`)."""

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
