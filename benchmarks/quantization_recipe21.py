"""Which Qwen-Image 2.1 transformer layers lose most when quantized: the table behind using the same
``mlx_qwen_image.quantize.RECIPE`` for 2.1 (README, "Qwen-Image 2.1").

A 2-block transformer at full width (4096 wide, 32 heads, the SwiGLU 3x; the first and the last block, no body),
our MLX model with random weights rounded to bf16 as released, text-only joint sequence of 32 text + 32 image
tokens; each recipe applies the real ``nn.quantize`` and the table gives the relative error of the velocity
against the float weights, averaged over 2 noise levels. The size column is the full 32-block model under that
recipe, from the lazily built full-size config (nothing allocated).

Random weights have no outlier channels, so real checkpoints lose more at 4 bits; the ranking of the groups is
what the recipe uses. Run: ``python benchmarks/quantization_recipe21.py [PART]`` (~12 min, 2 CPU cores, ~5 GB).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quantization_recipe import rel  # noqa: E402
from mlx_qwen_image.models.transformer21 import QwenImage21Transformer  # noqa: E402
from mlx_qwen_image.quantize import RECIPE, apply_plan, plan_bytes, transformer_plan  # noqa: E402

FLOAT_EDGES = {"img_in": None, "io": None, "time": None}
_ALL_FLOAT = {g: None for g in ("img_in", "io", "time", "mod", "first", "last", "body")}
RECIPES = [
    ("uniform 8-bit", 8, {}, 64),
    ("uniform 4-bit", 4, {}, 64),
    ("8-bit, img_in+io+time float (RECIPE)", 8, RECIPE, 64),
    ("4-bit, img_in float", 4, {"img_in": None}, 64),
    ("4-bit, img_in+io+time float", 4, FLOAT_EDGES, 64),
    ("4-bit, edges float, mod 8", 4, {**FLOAT_EDGES, "mod": 8}, 64),
    ("4-bit, edges float, first+last 8", 4, {**FLOAT_EDGES, "first": 8, "last": 8}, 64),
    ("4-bit, edges float, mod+first+last 8 (RECIPE)", 4, RECIPE, 64),
    ("4-bit, edges float, mod float, first+last 8", 4, {**RECIPE, "mod": None}, 64),
    ("4-bit RECIPE, group size 32", 4, RECIPE, 32),
    ("4-bit RECIPE, group size 128", 4, RECIPE, 128),
]
RECIPES += [(f"only {x} at 4-bit", 4, {**_ALL_FLOAT, x: 4}, 64) for x in ("io", "time", "mod", "first", "last")]
RECIPES += [("only txt_in.in_layer at 4-bit", 4, {**_ALL_FLOAT, "txt_in.in_layer": 4}, 64),
            ("only proj_out at 4-bit", 4, {**_ALL_FLOAT, "proj_out": 4}, 64)]


def random_model(num_layers: int, seed: int = 0) -> QwenImage21Transformer:
    mx.random.seed(seed)
    model = QwenImage21Transformer.from_config({"num_layers": num_layers})
    params = []
    for k, v in tree_flatten(model.parameters()):
        if v.ndim == 1:  # norms: scale near 1 (txt_in's zero-centred norm stores scale - 1)
            v = 0.1 * mx.random.normal(v.shape) + (0.0 if k.startswith("txt_in.") else 1.0)
        else:
            v = mx.random.normal(v.shape) * (1.0 / v.shape[-1]) ** 0.5
        params.append((k, v.astype(mx.bfloat16).astype(mx.float32)))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model


def inputs(config, seed: int = 1):
    rng = np.random.default_rng(seed)
    text, (h, w) = 32, (4, 8)
    img_mask = np.array([False] * text + [True] * (h * w // 4))
    return [
        (mx.array(rng.standard_normal((1, h * w, 64)).astype(np.float32)),
         mx.array(rng.standard_normal((1, text, config.context_in_dim)).astype(np.float32)),
         None, mx.array([s], dtype=mx.float32), [[(1, h, w)]], img_mask)
        for s in (0.9, 0.3)
    ]


def full_size(bits: int, recipe: dict, group_size: int) -> tuple[float, int]:
    """Bits per weight and bytes of the 32-block transformer under a recipe."""
    model = QwenImage21Transformer.from_config({})  # lazy: shapes only
    shapes = {k: v.shape for k, v in tree_flatten(model.parameters())}
    params, nbytes = plan_bytes(shapes, transformer_plan(model, bits, group_size, recipe))
    return 8 * nbytes / params, nbytes


def main(only: str | None = None):
    base = random_model(2)
    weights = tree_flatten(base.parameters())
    xs = inputs(base.config)
    ref = [np.array(base(*x)) for x in xs]
    print(f"{'recipe':<48} {'velocity err':>12}  full size (32 blocks)")
    for label, bits, recipe, gs in RECIPES:
        if only and only not in label:
            continue
        t0 = time.time()
        model = QwenImage21Transformer.from_config({"num_layers": 2})
        model.load_weights(weights)
        apply_plan(model, transformer_plan(model, bits, gs, recipe))
        err = float(np.mean([rel(np.array(model(*x)), r) for x, r in zip(xs, ref)]))
        size = ""
        if not label.startswith("only"):
            bpw, nbytes = full_size(bits, recipe, gs)
            size = f"{bpw:5.2f} bits/weight {nbytes / 1e9:5.2f} GB"
        print(f"{label:<48} {err:12.5f}  {size}  ({time.time() - t0:.0f} s)", flush=True)
        del model
    print(f"bf16: {full_size(8, _ALL_FLOAT, 64)[1] / 1e9:.2f} GB")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)  # an argument: only the recipes whose label holds it
