"""The benchmark for Qwen-Image 2.1 (``mlx-qwen-image benchmark --model 2.1``): random weights, the 2.1 components.

Phases as for Qwen-Image (see ``bench.py``): a plain MLX matmul of the 2.1 block's shapes (the reference rate),
the text encoder (the Qwen3-VL language model through ``prompts.encode_tokens``, ``--text-layers`` of its 36), the
transformer through the pipeline's own loop (``sample`` with the 2.1 variant: image slots, the prefix K/V cache,
the grid of sigmas), with CFG off (2.1's default) and on, the 64-channel RGBA VAE decoder. A 2.1 step differs from
the first one: the first fills the prefix K/V cache (text tokens through every block), later ones run the target's
tokens only; both are reported. Full-model (32-block) times are scaled from the measured depth by counted FLOPs.
"""

from __future__ import annotations

import dataclasses
import platform

import mlx.core as mx
import numpy as np

from mlx_qwen_image import memory
from mlx_qwen_image.conditioning import Conditioning
from mlx_qwen_image.config import TransformerConfig
from mlx_qwen_image.models.text_encoder21 import Qwen3TextEncoder, TextEncoder21Config
from mlx_qwen_image.models.transformer21 import QwenImage21Transformer, Transformer21Config
from mlx_qwen_image.models.vae21 import QwenImage21VAE, VAE21Config
from mlx_qwen_image.pipeline import QwenImagePipeline
from mlx_qwen_image.scheduler import FlowMatchEulerScheduler
from mlx_qwen_image.variants import VARIANTS

from .bench import DTYPES, RandomTimestepWeights, _free, _on_cpu, _weight_bytes, bench_vae, timed
from .flops import MatmulReference, text_encoder_flops, transformer21_step_flops, transformer_step_flops

VARIANT = VARIANTS["QwenImage21Pipeline"]
FULL_BLOCKS, FULL_TEXT_LAYERS = Transformer21Config.num_layers, TextEncoder21Config.num_hidden_layers
TINY = {
    "transformer": dict(num_attention_heads=2, attention_head_dim=32, axes_dims_rope=(8, 12, 12), context_in_dim=64),
    "text": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, mrope_section=(2, 3, 3)),
    "vae": dict(base_dim=8, decoder_base_dim=12, dim_mult=(1, 2, 2, 2, 2), num_res_blocks=1),
}
# FLOP table sizes: 2.1's two native scales, each against Qwen-Image at the same pixels.
TABLE_SIZES = ((1024, 1024), (2048, 2048))


def check_args(args) -> str | None:
    """What the 2.1 benchmark cannot do with these options, or None."""
    if args.width % 32 or args.height % 32:
        return "--model 2.1: width and height must be multiples of 32"
    if args.parallel or args.cache:
        return "--model 2.1: --parallel and --cache are not supported (2.1 runs on one Mac, without step caches)"
    return None


def auto_blocks(args, n_img: int) -> int:
    """All 32 blocks where the weights (plus activation headroom) fit in 3/4 of memory; 1 on the CPU."""
    if args.blocks != "auto":
        return int(args.blocks)
    if _on_cpu() or args.tiny:
        return 1
    per_block = VARIANT.transformer_params / FULL_BLOCKS * memory.bytes_per_param(args.quantize, args.dtype)
    activations = 2 * (n_img + args.text_tokens) * 4096 * 4 * 2 * 12
    return int(max(1, min(FULL_BLOCKS, (0.75 * (memory.total_memory() or 16e9) - activations) // per_block)))


def bench_text_encoder(args, dtype) -> dict:
    before = mx.get_active_memory()
    cfg = TextEncoder21Config(num_hidden_layers=args.text_layers, **(TINY["text"] if args.tiny else {}))
    model = Qwen3TextEncoder(cfg)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    pipe = QwenImagePipeline(text_encoder=model, variant=VARIANT)
    rng = np.random.default_rng(args.seed)
    prompt = rng.integers(0, cfg.vocab_size, VARIANT.drop + args.text_tokens).tolist()
    out = timed(lambda: pipe.prompts.encode_tokens([prompt]), args.warmup, args.trials, exclude=before)
    flops = text_encoder_flops(cfg, len(prompt))
    full = flops * FULL_TEXT_LAYERS / args.text_layers
    out.update(layers=args.text_layers, tokens=[len(prompt)], weight_bytes=_weight_bytes(model), flops=flops,
               flops_per_s=flops / out["seconds"], full_model_seconds=out["seconds"] * full / flops,
               extrapolated=args.text_layers != FULL_TEXT_LAYERS)
    del model, pipe
    _free()
    return out


def bench_transformer(args, dtype, cfg: Transformer21Config, n_img: int, reference: MatmulReference) -> dict:
    """Steps of the pipeline's loop with the 2.1 variant, CFG off and on; the first step (which fills the prefix
    K/V cache) apart from the rest."""
    mx.random.seed(args.seed)
    model = QwenImage21Transformer(cfg)
    model.set_dtype(dtype)
    if args.quantize:
        from mlx_qwen_image.quantize import quantize_transformer

        quantize_transformer(model, args.quantize)
    mx.eval(model.parameters())
    model.mark_timestep_path()
    pipe = QwenImagePipeline(transformer=model, scheduler=FlowMatchEulerScheduler(), variant=VARIANT,
                             timestep_source=RandomTimestepWeights())
    pipe.free_timestep_weights = not args.keep_modulation_weights
    rng = np.random.default_rng(args.seed)
    L = args.text_tokens
    txt = mx.array(rng.standard_normal((2, L, cfg.context_in_dim)).astype(np.float32)).astype(dtype)
    mask = mx.array((np.arange(L)[None] < np.array([L, min(L, 6)])[:, None]).astype(np.int32))
    slots = np.concatenate([np.zeros(L, bool), np.ones(n_img // 4, bool)])
    steps = max(args.steps, args.warmup + args.trials + 1)
    phases, weights = {}, {}
    for name, cfg_on in (("step_nocfg", False), ("step_cfg", True)):
        rows = 2 if cfg_on else 1
        cond = Conditioning(txt[:rows], mask[:rows], 1, args.width, args.height, 4.0 if cfg_on else 1.0,
                            [(1, args.height // 16, args.width // 16)], slots=slots)
        _free()
        run = pipe.sample(cond, steps, seed=args.seed)
        rates = []
        for i, _ in enumerate(run):
            if i == 0:
                weights = {"resident_bytes": _weight_bytes(model),
                           "modulation_weights_dropped": model.modulation_weights_dropped}
            if i > args.warmup:
                rates.append(reference.rate_once())
            if i == args.warmup + args.trials:
                break
        run.close()
        times = run.stats["steps"]
        trials = times[1 + args.warmup:]
        ph = {"seconds": float(np.median(trials)), "trials": trials, "first_step_seconds": times[0],
              "matmul_flops_per_s": rates, "peak_memory": run.stats["denoise"]["peak_memory"] - reference.nbytes,
              "flops": transformer21_step_flops(cfg, rows, n_img, L),
              "first_step_flops": transformer21_step_flops(cfg, rows, n_img, L, cached=False)}
        ph["flops_per_s"] = ph["flops"]["total"] / ph["seconds"]
        ph["efficiency"] = float(np.median([ph["flops"]["total"] / t / r for t, r in zip(trials, rates)]))
        phases[name] = ph
    table = run.stats["modulation_table"]
    phases["modulation_table"] = {"seconds": table["seconds"], "steps": steps,
                                  "peak_memory": table["peak_memory"] - reference.nbytes}
    del model, pipe
    _free()
    return {"phases": phases, "weights": weights}


def flop_table(steps_21: int = VARIANT.steps, steps_qwen: int = 50) -> list[dict]:
    """Per step and per image, 2.1 (no CFG, the prefix cached after step 1) against Qwen-Image (CFG), full size."""
    full, qwen = Transformer21Config(), TransformerConfig()
    rows = []
    for w, h in TABLE_SIZES:
        n_img, n_txt = (w // 16) * (h // 16), 64
        cached = transformer21_step_flops(full, 1, n_img, n_txt)["total"]
        first = transformer21_step_flops(full, 1, n_img, n_txt, cached=False)["total"]
        cfg_step = transformer21_step_flops(full, 2, n_img, n_txt)["total"]
        q = transformer_step_flops(qwen, 2, n_img, n_txt)["total"]
        image = first + (steps_21 - 1) * cached
        rows.append({"width": w, "height": h, "image_tokens": n_img, "text_tokens": n_txt,
                     "step_flops": cached, "first_step_flops": first, "cfg_step_flops": cfg_step,
                     "image_flops": image, "qwen_image_cfg_step_flops": q, "qwen_image_image_flops": steps_qwen * q,
                     "ratio": steps_qwen * q / image})
    return rows


def run(args) -> dict:
    dtype = DTYPES[args.dtype]
    n_img = (args.height // 16) * (args.width // 16)
    blocks = auto_blocks(args, n_img)
    cfg = Transformer21Config(num_layers=blocks, **(TINY["transformer"] if args.tiny else {}))
    full_width = cfg.inner_dim == Transformer21Config().inner_dim
    result = {
        "model": "qwen-image-2.1",
        "device": {"type": "cpu" if _on_cpu() else "gpu", **{k: str(v) for k, v in mx.device_info().items()}},
        "software": {"mlx": mx.__version__, "python": platform.python_version(), "platform": platform.platform()},
        "config": {"width": args.width, "height": args.height, "blocks": blocks, "full_width": full_width,
                   "inner_dim": cfg.inner_dim, "dtype": args.dtype, "quantize": args.quantize,
                   "text_tokens": args.text_tokens, "image_tokens": n_img, "steps": args.steps,
                   "warmup": args.warmup, "trials": args.trials, "seed": args.seed, "tiny": args.tiny},
    }
    mx.random.seed(args.seed)
    d = cfg.inner_dim
    # One cached no-CFG step's linear shapes: the target's tokens through q, k, v, out and the SwiGLU.
    shapes = [(n_img, d, d, 4), (n_img, d, cfg.mlp_ratio * d, 2), (n_img, cfg.mlp_ratio * d, d, 1)]
    reference = MatmulReference(shapes, dtype)
    result["matmul"] = reference.rate(args.trials, args.warmup)
    _free()
    phases = {}
    if not args.no_text_encoder:
        phases["text_encoder"] = bench_text_encoder(args, dtype)
    tr = bench_transformer(args, dtype, cfg, n_img, reference)
    del reference
    _free()
    phases.update(tr["phases"])
    result["weights"] = tr["weights"]
    if not args.no_vae:
        phases["vae_decode"] = bench_vae(args, dtype, VAE21Config(**(TINY["vae"] if args.tiny else {})),
                                         QwenImage21VAE)
    result["phases"] = phases
    result["efficiency"] = phases["step_nocfg"]["efficiency"]
    result["projection"] = project(result, cfg, n_img) if full_width else None
    result["flop_table"] = flop_table()
    return result


def project(result: dict, cfg: Transformer21Config, n_img: int) -> dict:
    """Full-model (32-block, 36-layer) figures at this size: steps scaled by FLOPs from the measured depth."""
    c, ph = result["config"], result["phases"]
    full = dataclasses.replace(cfg, num_layers=FULL_BLOCKS)
    L = c["text_tokens"]
    out = {"extrapolated": c["blocks"] != FULL_BLOCKS}
    for name, batch in (("step_nocfg", 1), ("step_cfg", 2)):
        out[f"{name}_seconds"] = ph[name]["seconds"] * (transformer21_step_flops(full, batch, n_img, L)["total"]
                                                        / ph[name]["flops"]["total"])
        out[f"{name}_first_seconds"] = ph[name]["first_step_seconds"] * (
            transformer21_step_flops(full, batch, n_img, L, cached=False)["total"]
            / ph[name]["first_step_flops"]["total"])
    if "text_encoder" in ph and "vae_decode" in ph:
        fixed = ph["text_encoder"]["full_model_seconds"] + ph["vae_decode"]["seconds"]
        fixed += ph["modulation_table"]["seconds"] * FULL_BLOCKS / c["blocks"]
        for name in ("nocfg", "cfg"):
            out[f"image_seconds_{name}"] = (fixed + out[f"step_{name}_first_seconds"]
                                            + (c["steps"] - 1) * out[f"step_{name}_seconds"])
    return out


def _gb(n) -> str:
    return f"{n / 1e9:.2f} GB"


def markdown(result: dict) -> str:
    c, ph, p = result["config"], result["phases"], result["projection"]
    lines = [f"# Qwen-Image 2.1 benchmark: {c['width']}x{c['height']}, {c['blocks']} of {FULL_BLOCKS} blocks, "
             f"{c['dtype']}{' q' + str(c['quantize']) if c['quantize'] else ''} on {result['device']['type']}",
             "", f"MLX {result['software']['mlx']}; {c['text_tokens']} text and {c['image_tokens']} image tokens; "
             f"matmul reference {result['matmul']['flops_per_s'] / 1e9:.1f} GFLOP/s.", "",
             "| phase | measured s | peak memory | full model s |", "|---|---|---|---|"]
    if "text_encoder" in ph:
        t = ph["text_encoder"]
        lines.append(f"| text encoder ({t['layers']} of {FULL_TEXT_LAYERS} layers) | {t['seconds']:.4f} | "
                     f"{_gb(t['peak_memory'])} | {t['full_model_seconds']:.3f} |")
    for name, label in (("step_nocfg", "step, CFG off"), ("step_cfg", "step, CFG on")):
        s = ph[name]
        full = f"{p[name + '_first_seconds']:.3f} / {p[name + '_seconds']:.3f}" if p else ""
        lines.append(f"| {label}: first (fills the prefix cache) / cached | {s['first_step_seconds']:.4f} / "
                     f"{s['seconds']:.4f} | {_gb(s['peak_memory'])} | {full} |")
    if "vae_decode" in ph:
        lines.append(f"| VAE decode (RGBA) | {ph['vae_decode']['seconds']:.4f} | "
                     f"{_gb(ph['vae_decode']['peak_memory'])} | {ph['vae_decode']['seconds']:.4f} |")
    lines.append(f"\nCFG-off step: {ph['step_nocfg']['flops_per_s'] / 1e9:.1f} GFLOP/s, "
                 f"{ph['step_nocfg']['efficiency']:.0%} of the matmul reference.")
    if p and "image_seconds_nocfg" in p:
        lines.append(f"Whole image, {c['steps']} steps (full model{', extrapolated' if p['extrapolated'] else ''}): "
                     f"{p['image_seconds_nocfg']:.1f} s without CFG, {p['image_seconds_cfg']:.1f} s with CFG.")
    lines += ["", "FLOPs of the full models (64 text tokens; 2.1 at its 40 steps without CFG, the prefix cached "
              "after the first step; Qwen-Image at 50 CFG steps):", "",
              "| size | 2.1 step (cached) | 2.1 first step | 2.1 CFG step | 2.1 image | Qwen-Image CFG step | "
              "Qwen-Image image | ratio |", "|---|---|---|---|---|---|---|---|"]
    for r in result["flop_table"]:
        lines.append(f"| {r['width']}x{r['height']} | {r['step_flops'] / 1e12:.1f} T | "
                     f"{r['first_step_flops'] / 1e12:.1f} T | {r['cfg_step_flops'] / 1e12:.1f} T | "
                     f"{r['image_flops'] / 1e15:.2f} P | {r['qwen_image_cfg_step_flops'] / 1e12:.1f} T | "
                     f"{r['qwen_image_image_flops'] / 1e15:.2f} P | {r['ratio']:.1f}x |")
    return "\n".join(lines) + "\n"
