"""Measure which transformer layers lose most at 4 bits, and what 8 bits costs the text encoder.

Prints the tables behind ``mlx_qwen_image.quantize.RECIPE`` (README, "Quantized checkpoints"):

- full width (3072, 24 heads): a 2-block Qwen-Image transformer (diffusers, torch float32; the first and the last
  block) with random weights rounded to bf16 as released; each recipe replaces its weights by
  ``mx.dequantize(mx.quantize(w))`` (what the quantized matmul computes, up to rounding) and the table gives the
  relative error of the velocity against the bf16 weights; 256 image + 32 text tokens, 3 noise levels;
- tiny (6 blocks, 128 wide, widths multiples of 64): our MLX transformer with the real ``nn.quantize``, the final
  latents of an 8-step Euler loop against float32;
- the text encoder: one full-width Qwen2 text model (3584 wide, 2 layers, the real vocabulary) in torch, and the
  tiny MLX text encoder, 8 and 4 bits, with and without the token embedding.

Random weights have no outlier channels, so real checkpoints lose more at 4 bits than these numbers; the ranking
of the layer groups is what the recipe uses. Run: ``python benchmarks/quantization_recipe.py`` (~10 min, ~8 GB).
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlx_qwen_image.models.text_encoder import QwenTextEncoder  # noqa: E402
from mlx_qwen_image.models.transformer import QwenImageTransformer  # noqa: E402
from mlx_qwen_image.quantize import (  # noqa: E402
    apply_plan, plan_bytes, text_encoder_plan, transformer_group, transformer_plan)

GROUPS = ("img_in", "io", "time", "mod", "first", "last", "body")
IO = ("txt_in", "norm_out.linear", "proj_out")
FLOAT_EDGES = {"img_in": None, "io": None, "time": None}
CHOSEN = {**FLOAT_EDGES, "mod": 8, "first": 8, "last": 8}  # = mlx_qwen_image.quantize.RECIPE
# (label, bits, recipe, group size). Recipe: group or layer path -> bits (None = float); what is not named gets the
# base bits. img_in stays float in all but the first rows: the transformer reads its activation dtype from it.
RECIPES = [
    ("uniform 8-bit", 8, {}, 64),
    ("uniform 4-bit", 4, {}, 64),
    ("8-bit, img_in float", 8, {"img_in": None}, 64),
    ("8-bit, img_in+io+time float (chosen)", 8, CHOSEN, 64),
    ("4-bit, img_in float", 4, {"img_in": None}, 64),
    ("4-bit, io 8", 4, {"img_in": None, "io": 8}, 64),
    ("4-bit, io 8, time 8", 4, {"img_in": None, "io": 8, "time": 8}, 64),
    ("4-bit, io+time float (the recipe before)", 4, FLOAT_EDGES, 64),
    ("4-bit, io+time float, mod 8", 4, {**FLOAT_EDGES, "mod": 8}, 64),
    ("4-bit, io+time float, first+last 8", 4, {**FLOAT_EDGES, "first": 8, "last": 8}, 64),
    ("4-bit, io+time float, mod+first+last 8 (chosen)", 4, CHOSEN, 64),
    ("4-bit, io+time float, mod float", 4, {**FLOAT_EDGES, "mod": None}, 64),
    ("4-bit chosen, group size 32", 4, CHOSEN, 32),
    ("4-bit chosen, group size 128", 4, CHOSEN, 128),
    ("8-bit chosen, group size 128", 8, CHOSEN, 128),
]
_ALL_FLOAT = {g: None for g in GROUPS}
RECIPES += [(f"only {x} at 4-bit", 4, {**_ALL_FLOAT, x: 4}, 64) for x in IO + GROUPS[2:]]
RECIPES += [(f"only {x} at 8-bit", 8, {**_ALL_FLOAT, x: 8}, 64) for x in IO + GROUPS[2:]]

def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def fake_quant(w: torch.Tensor, bits: int, group_size: int = 64) -> torch.Tensor:
    q = mx.quantize(mx.array(w.float().numpy()).astype(mx.bfloat16), group_size, bits)
    return torch.from_numpy(np.array(mx.dequantize(*q, group_size, bits).astype(mx.float32)))


def full_size_bits(recipe_bits: int, recipe: dict, group_size: int) -> float:
    """Bits per weight of the whole 60-block transformer under a recipe (from the released shapes)."""
    manifest = json.loads((ROOT / "tests/fixtures/checkpoint_manifest.json").read_text())["transformer"]
    config = json.loads((ROOT / "tests/fixtures/qwen_image/transformer/config.json").read_text())
    model = QwenImageTransformer.from_config(config)  # lazy: nothing is allocated
    plan = transformer_plan(model, recipe_bits, group_size, recipe)
    params, nbytes = plan_bytes({k: tuple(v) for k, v in manifest.items()}, plan)
    return 8 * nbytes / params, nbytes


# -- full width -------------------------------------------------------------------------------------------------

def full_width_transformer():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(num_layers=2).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.ndim == 1:  # biases: small but not zero
                p.copy_(0.02 * torch.randn_like(p))
            p.copy_(p.to(torch.bfloat16).float())
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    originals = {n: m.weight.detach().to(torch.bfloat16).clone() for n, m in linears.items()}
    g = torch.Generator().manual_seed(1)
    inputs = [
        dict(hidden_states=torch.randn(1, 256, 64, generator=g),
             encoder_hidden_states=torch.randn(1, 32, 3584, generator=g),
             encoder_hidden_states_mask=torch.ones(1, 32, dtype=torch.long),
             timestep=torch.tensor([s]), img_shapes=[[(1, 16, 16)]], return_dict=False)
        for s in (0.9, 0.6, 0.2)
    ]
    return model, linears, originals, inputs


def run_full_width():
    model, linears, originals, inputs = full_width_transformer()
    with torch.no_grad():
        ref = [model(**x)[0].numpy() for x in inputs]
    rows = []
    for label, bits, recipe, gs in RECIPES:
        if label.startswith("only body"):
            continue  # 2 blocks: the first and the last, no body
        t0 = time.time()
        with torch.no_grad():
            for name, m in linears.items():
                b = recipe.get(name, recipe.get(transformer_group(name, 2), bits))
                w = originals[name]
                m.weight.copy_(fake_quant(w, b, gs) if b and w.shape[-1] % gs == 0 else w.float())
            out = [model(**x)[0].numpy() for x in inputs]
        err = float(np.mean([rel(o, r) for o, r in zip(out, ref)]))
        size = ""
        if not label.startswith("only"):  # the 60-block model's groups differ from this 2-block one's
            bpw, nbytes = full_size_bits(bits, recipe, gs)
            size = f"  60 blocks: {bpw:5.2f} bits/weight {nbytes / 1e9:5.2f} GB"
        rows.append((label, err))
        print(f"  full width  {label:<44} err {err:.5f}{size}  ({time.time() - t0:.0f} s)", flush=True)
    del model, linears, originals
    gc.collect()
    return rows


# -- tiny MLX transformer -----------------------------------------------------------------------------------------

TINY = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=6, attention_head_dim=64,
            num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=[8, 28, 28])


def tiny_transformer(seed=0):
    from mlx.utils import tree_flatten, tree_unflatten

    mx.random.seed(seed)
    model = QwenImageTransformer.from_config(TINY)
    params = []
    for k, v in tree_flatten(model.parameters()):
        if v.ndim == 1:
            v = (1 + 0.1 * mx.random.normal(v.shape)) if "norm" in k else 0.02 * mx.random.normal(v.shape)
        params.append((k, v.astype(mx.bfloat16).astype(mx.float32)))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model


def tiny_denoise(model, x, txt, steps=8):
    sigmas = np.linspace(1.0, 0.0, steps + 1)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        v = model(x, txt, None, mx.array([s], dtype=mx.float32), [[(1, 8, 8)]])
        x = x + (s_next - s) * v
    mx.eval(x)
    return x


def run_tiny():
    from mlx.utils import tree_flatten

    rows = []
    errs = {label: [] for label, *_ in RECIPES}
    for seed in range(3):
        base = tiny_transformer(seed)
        key = mx.random.key(100 + seed)
        x = mx.random.normal((1, 64, 64), key=key)
        txt = mx.random.normal((1, 16, 64), key=mx.random.split(key)[0])
        ref = np.array(tiny_denoise(base, x, txt))
        weights = tree_flatten(base.parameters())
        for label, bits, recipe, gs in RECIPES:
            model = QwenImageTransformer.from_config(TINY)
            model.load_weights(weights)
            apply_plan(model, transformer_plan(model, bits, gs, recipe))
            errs[label].append(rel(np.array(tiny_denoise(model, x, txt)), ref))
    for label, *_ in RECIPES:
        rows.append((label, float(np.mean(errs[label]))))
        print(f"  tiny        {label:<44} err {rows[-1][1]:.5f}", flush=True)
    return rows


# -- text encoder -------------------------------------------------------------------------------------------------

def run_text_full_width():
    from transformers import Qwen2Config, Qwen2Model

    torch.manual_seed(0)
    model = Qwen2Model(Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                   num_hidden_layers=2, num_attention_heads=28, num_key_value_heads=4,
                                   rms_norm_eps=1e-6, rope_theta=1e6)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.02 * torch.randn_like(p))
            p.copy_(p.to(torch.bfloat16).float())
    mods = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    originals = {n: m.weight.detach().to(torch.bfloat16).clone() for n, m in mods.items()}
    ids = torch.randint(0, 152064, (1, 96), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).last_hidden_state.numpy()
    rows = []
    for label, bits, embed in (("8-bit", 8, True), ("8-bit, embedding float", 8, False),
                               ("4-bit", 4, True), ("4-bit, embedding float", 4, False)):
        with torch.no_grad():
            for name, m in mods.items():
                quantize = embed or not isinstance(m, torch.nn.Embedding)
                m.weight.copy_(fake_quant(originals[name], bits) if quantize else originals[name].float())
            err = rel(model(ids).last_hidden_state.numpy(), ref)
        rows.append((label, err))
        print(f"  text full width {label:<28} err {err:.5f}", flush=True)
    del model, mods, originals
    gc.collect()
    return rows


def run_text_tiny():
    config = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=4096, rope_theta=1e6,
                  rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]})
    from mlx.utils import tree_flatten

    mx.random.seed(0)
    base = QwenTextEncoder.from_config(config)
    mx.eval(base.parameters())
    weights = tree_flatten(base.parameters())
    ids = mx.random.randint(0, 4096, (2, 40))
    ref = np.array(base(ids))
    rows = []
    for label, bits, embed in (("8-bit", 8, True), ("8-bit, embedding float", 8, False),
                               ("4-bit", 4, True), ("4-bit, embedding float", 4, False)):
        model = QwenTextEncoder.from_config(config)
        model.load_weights(weights)
        plan = text_encoder_plan(model, bits, 64)
        if not embed:
            plan.pop("model.embed_tokens")
        apply_plan(model, plan)
        rows.append((label, rel(np.array(model(ids)), ref)))
        print(f"  text tiny       {label:<28} err {rows[-1][1]:.5f}", flush=True)
    return rows


if __name__ == "__main__":
    which = sys.argv[1:] or ["tiny", "text", "full"]
    if "tiny" in which:
        run_tiny()
    if "text" in which:
        run_text_tiny()
        run_text_full_width()
    if "full" in which:
        run_full_width()
