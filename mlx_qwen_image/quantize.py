"""Quantization recipes, shared by the converter and ``QwenImagePipeline.from_pretrained(quantize=...)``.

A *plan* maps a layer path (``transformer_blocks.3.attn.to_q``) to its ``{"group_size", "bits"}``; layers not in
the plan stay float. Loading applies a plan to a model with ``nn.quantize``; the converter applies the same plan
tensor by tensor with `quantize_weight`. Both end in ``mx.quantize`` of the same float weights, so a converted
checkpoint holds exactly the weights that quantize-on-load computes (for the same dtype).

The recipe (which layers stay float) was chosen from measured output errors; the numbers are in the README,
section "Quantized checkpoints", and ``benchmarks/quantization_recipe.py`` reproduces them.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .config import ConfigError

GROUP_SIZES = (32, 64, 128)
BITS = (4, 8)

# What a quantized transformer keeps at higher precision, by layer group (see `transformer_group`): None = float,
# a number = those bits; everything else gets the asked bits. Float: img_in, txt_in, norm_out.linear, proj_out and the
# timestep embedder (measured: proj_out alone at 4 bits moves the output 30x more than all the blocks together; 0.2%
# of the weights). 8 bits: every *_mod layer and the first and last blocks, as published evidence on the real
# weights asks (another MLX port's 4-bit images were noisy until img_mod stayed at 8 bits; the GGUF files keep blocks
# 0 and 59 at Q5_K/Q6_K); the *_mod layers are dropped during the loop, so they cost disk and load time only.
RECIPE = {"img_in": None, "io": None, "time": None, "mod": 8, "first": 8, "last": 8}


def transformer_group(path: str, num_blocks: int) -> str:
    """The recipe group of a transformer linear layer.

    ``img_in`` (64 inputs), ``io`` (``txt_in`` and 2.1's ``txt_in.*`` MLP, ``norm_out.linear``, ``proj_out``, a
    ControlNet's ``controlnet_x_embedder`` and ``controlnet_blocks.*``, which write its residuals),
    ``time`` (the timestep embedder), ``mod`` (every block's ``img_mod``/``txt_mod``; 2.1's shared ``modulation.1``),
    ``first`` and ``last`` (the other layers of the first and last block), ``body`` (everything else).
    """
    if path == "img_in":
        return "img_in"
    if path in ("txt_in", "proj_out", "norm_out.linear") or path.startswith(("txt_in.", "controlnet_")):
        return "io"
    if path.startswith("time_text_embed."):
        return "time"
    if path.endswith("_mod.1") or path == "modulation.1":
        return "mod"
    if path.startswith("transformer_blocks.0."):
        return "first"
    if path.startswith(f"transformer_blocks.{num_blocks - 1}."):
        return "last"
    return "body"


def _fits(module: nn.Module, group_size: int) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.shape[-1] % group_size == 0


def transformer_plan(model: nn.Module, bits: int, group_size: int = 64, recipe: dict | None = None) -> dict:
    """The plan for the transformer at ``bits`` (4 or 8) with `RECIPE`, or with ``recipe``: {group or layer path:
    bits, or None for float}, where a layer's path wins over its group and anything not named gets ``bits``.
    Layers whose input width the group size does not divide stay float."""
    _check(bits, group_size)
    recipe = RECIPE if recipe is None else recipe
    num_blocks = len(model.transformer_blocks)
    plan = {}
    for path, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not _fits(module, group_size):
            continue
        b = recipe.get(path, recipe.get(transformer_group(path, num_blocks), bits))
        if b:
            plan[path] = {"group_size": group_size, "bits": b}
    return plan


def text_encoder_plan(model: nn.Module, bits: int, group_size: int = 64) -> dict:
    """Every linear layer of the language model and its token embedding at ``bits``; the vision tower stays float
    (it is small and runs once per reference image)."""
    _check(bits, group_size)
    return {
        path: {"group_size": group_size, "bits": bits}
        for path, module in model.named_modules()
        if not path.startswith("visual") and _fits(module, group_size)
    }


def _check(bits: int, group_size: int):
    if bits not in BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, BITS))}, got {bits}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())


def quantized_bits(model: nn.Module) -> int | None:
    """The fewest bits a model's quantized layers use: the recipe's bits (None when nothing is quantized)."""
    bits = [m.bits for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    return min(bits) if bits else None


def apply_plan(model: nn.Module, plan: dict) -> nn.Module:
    """Quantize ``model``'s layers in place as ``plan`` says (lazily: nothing is evaluated)."""
    nn.quantize(model, class_predicate=lambda path, module: dict(plan[path]) if path in plan else False)
    return model


def quantize_transformer(model: nn.Module, bits: int, group_size: int = 64) -> dict:
    """Quantize-on-load: the same plan the converter writes, applied to a loaded float transformer."""
    plan = transformer_plan(model, bits, group_size)
    apply_plan(model, plan)
    return plan


def quantize_weight(weight: mx.array, params: dict) -> dict[str, mx.array]:
    """``weight``, ``scales`` and ``biases`` of one layer, as ``nn.QuantizedLinear.from_linear`` computes them."""
    w, scales, biases = mx.quantize(weight, params["group_size"], params["bits"])
    return {"weight": w, "scales": scales, "biases": biases}


def quantization_block(plan: dict) -> dict | None:
    """The ``quantization`` entry of a component's config.json, as mlx-lm writes it: the most common
    ``group_size``/``bits`` plus an entry for every layer quantized differently."""
    if not plan:
        return None
    counts: dict[tuple, int] = {}
    for p in plan.values():
        key = (p["group_size"], p["bits"])
        counts[key] = counts.get(key, 0) + 1
    group_size, bits = max(counts, key=counts.get)
    block = {"group_size": group_size, "bits": bits, "mode": "affine"}
    for path, p in plan.items():
        if (p["group_size"], p["bits"]) != (group_size, bits):
            block[path] = {"group_size": p["group_size"], "bits": p["bits"]}
    return block


def plan_from_config(block: dict | None, quantized: set[str]) -> dict:
    """The plan of a converted checkpoint: the layers that have ``.scales``, with their bits and group size from
    the config's ``quantization`` block (per-layer entries first, then its defaults)."""
    block = block or {}
    if not isinstance(block, dict):
        raise ConfigError(f"quantization must be an object, got {block!r}")
    default = {"group_size": block.get("group_size", 64), "bits": block.get("bits", 4)}
    plan = {}
    for path in quantized:
        entry = block.get(path)
        plan[path] = {k: entry.get(k, default[k]) for k in default} if isinstance(entry, dict) else dict(default)
        if plan[path]["bits"] not in (2, 3, 4, 5, 6, 8) or plan[path]["group_size"] not in GROUP_SIZES:
            raise ConfigError(f"quantization of {path}: bits {plan[path]['bits']} / group size "
                              f"{plan[path]['group_size']} are not ones MLX quantizes with")
    return plan


def plan_bytes(shapes: dict[str, tuple], plan: dict, dtype_bytes: int = 2) -> tuple[int, int]:
    """(parameters, bytes) of weights with these shapes once ``plan`` is applied (scale and bias per group in the
    float dtype)."""
    params = nbytes = 0
    for name, shape in shapes.items():
        n = 1
        for d in shape:
            n *= d
        params += n
        p = plan.get(name[: -len(".weight")]) if name.endswith(".weight") else None
        if p:
            nbytes += n * p["bits"] // 8 + 2 * (n // p["group_size"]) * dtype_bytes
        else:
            nbytes += n * dtype_bytes
    return params, nbytes
