"""Speed and memory of mlx-qwen-image with random weights: no checkpoint or download needed.

Phases run in the pipeline's order, each with the previous one freed: a plain MLX matmul (the reference rate),
the text encoder (the pipeline's ``prompts.encode_tokens``: prompt and negative prompt as one padded batch), the
transformer (the pipeline's own core loop through ``sample``: modulation precompute, then denoising steps with
CFG on and off), the VAE decoder. Every figure is the median of ``--trials`` steps or runs after ``--warmup``
ones, with a fixed seed.

The transformer runs ``--blocks`` full-width blocks (auto: as many of the 60 as memory allows on a GPU, 1 on the
CPU); the text encoder ``--text-layers`` of its 28 layers. Full-model times are extrapolated from those in
proportion to the counted FLOPs and marked so; the VAE and matmul figures are measured as they are.

    mlx-qwen-image benchmark                            # defaults for this machine
    mlx-qwen-image benchmark --width 1328 --height 1328 --quantize 8 --steps 50
    python -m benchmarks.bench --blocks 4               # the same, from a source checkout

Writes ``<out>.json`` and ``<out>.md`` (default: benchmarks/results/ in a source checkout, else
./benchmark-results/; named <device>-<size>-<blocks>b-<dtype>[-qN]).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_qwen_image import memory, runtime
from mlx_qwen_image.conditioning import Conditioning
from mlx_qwen_image.config import TextEncoderConfig, TransformerConfig, VAEConfig
from mlx_qwen_image.models import transformer as transformer_module
from mlx_qwen_image.models.modulation import get_module
from mlx_qwen_image.models.text_encoder import QwenTextEncoder
from mlx_qwen_image.models.transformer import QwenImageTransformer
from mlx_qwen_image.models.vae import QwenImageVAE
from mlx_qwen_image.pipeline import QwenImagePipeline
from mlx_qwen_image.scheduler import FlowMatchEulerScheduler
from mlx_qwen_image.variants import DEFAULT_TEXT_TO_IMAGE

from .flops import MatmulReference, block_matmul_shapes, text_encoder_flops, transformer_step_flops
from .report import markdown, reference_rows

# In a source checkout the results sit beside the benchmark (and are committed); installed, in the working folder.
_SOURCE_RESULTS = Path(__file__).resolve().parent / "results"
RESULTS = _SOURCE_RESULTS if _SOURCE_RESULTS.is_dir() else Path("benchmark-results")
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
FULL_BLOCKS, FULL_TEXT_LAYERS = TransformerConfig.num_layers, TextEncoderConfig.num_hidden_layers
TEXT_TO_IMAGE_DROP = DEFAULT_TEXT_TO_IMAGE.drop
NEGATIVE_TOKENS = TEXT_TO_IMAGE_DROP + 6  # the default negative prompt " " with its template
# CI-sized components (--tiny): the code paths of the real ones at a few thousandths of their cost.
TINY = {
    "transformer": dict(num_attention_heads=2, attention_head_dim=32, axes_dims_rope=(8, 12, 12),
                        joint_attention_dim=64),
    "text": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, mrope_section=(2, 3, 3)),
    "vae": dict(base_dim=8, dim_mult=(1, 2, 2, 2)),
}


def parse_args(argv=None, prog: str = "python -m benchmarks.bench") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["qwen-image", "2.1"], default="qwen-image",
                   help="which transformer, text encoder and VAE to time (2.1: Qwen-Image 2.1, see bench21.py)")
    p.add_argument("--width", type=int, default=None, help="image width (default: 1024 on a GPU, 64 on the CPU)")
    p.add_argument("--height", type=int, default=None, help="image height (default: as --width)")
    p.add_argument("--blocks", default="auto", help="transformer blocks to run, or auto (memory permitting)")
    p.add_argument("--text-tokens", type=int, default=None, help="prompt features (default 64; 16 on the CPU)")
    p.add_argument("--text-layers", type=int, default=None, help="text encoder layers (default 28; 1 on the CPU)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--quantize", type=int, choices=[4, 8], default=None, help="the transformer's recipe bits")
    p.add_argument("--steps", type=int, default=None,
                   help="steps of the whole-image estimate (default: the model's, 50 or 2.1's 40)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-modulation-weights", action="store_true",
                   help="keep the timestep-path weights during the steps (pipe.free_timestep_weights = False)")
    p.add_argument("--no-compile", action="store_true", help="run the block's elementwise tails uncompiled")
    p.add_argument("--cache", default=None, metavar="SPEC",
                   help="also time whole --steps images (CFG) with and without this step cache, e.g. first-block:0.1")
    p.add_argument("--no-text-encoder", action="store_true")
    p.add_argument("--no-vae", action="store_true")
    p.add_argument("--parallel", choices=["cfg", "tensor", "data"], default=None,
                   help="under mlx.launch: split the transformer steps over the ranks this way")
    p.add_argument("--tiny", action="store_true", help="CI-sized components (seconds; figures meaningless)")
    p.add_argument("--out", default=None, help="output path without extension")
    p.add_argument("--check-efficiency", type=float, default=None,
                   help="exit with status 1 if the CFG step's efficiency is below this fraction")
    args = p.parse_args(argv)
    if args.width is None or args.height is None:
        side = 64 if _on_cpu() or args.tiny else 1024
        args.width, args.height = args.width or args.height or side, args.height or args.width or side
    if args.width % 16 or args.height % 16 or min(args.width, args.height) < 16:
        p.error("width and height must be multiples of 16")
    if args.text_tokens is None:
        args.text_tokens = 16 if _on_cpu() or args.tiny else 64
    if args.text_layers is None:
        args.text_layers = 1 if _on_cpu() or args.tiny else FULL_TEXT_LAYERS if args.model == "qwen-image" else 36
    if args.steps is None:
        args.steps = 40 if args.model == "2.1" else 50
    if args.model == "2.1":
        from .bench21 import check_args

        if (problem := check_args(args)) is not None:
            p.error(problem)
    if args.trials < 1 or args.warmup < 0:
        p.error("--trials must be at least 1 and --warmup at least 0")
    return args


def _on_cpu() -> bool:
    return mx.default_device().type == mx.cpu


def auto_blocks(args, n_img: int) -> int:
    """All 60 blocks where the weights (plus activation headroom) fit in 3/4 of memory; 1 on the CPU."""
    if _on_cpu() or args.tiny:
        return 1
    per_block = (DEFAULT_TEXT_TO_IMAGE.transformer_params / FULL_BLOCKS
                 * memory.bytes_per_param(args.quantize, args.dtype))
    total = memory.total_memory() or 16e9
    activations = 2 * (n_img + args.text_tokens) * 3072 * 4 * 2 * 12
    return int(max(1, min(FULL_BLOCKS, (0.75 * total - activations) // per_block)))


def timed(fn, warmup: int, trials: int, exclude: int = 0, reference: MatmulReference | None = None) -> dict:
    """Median and all trial seconds of ``mx.eval(fn())``; the peak memory over warm-up and trials less
    ``exclude`` bytes (arrays alive but not the phase's); with ``reference``, its FLOP rate after each trial."""
    mx.reset_peak_memory()
    for _ in range(warmup):
        mx.eval(fn())
    times, rates = [], []
    for _ in range(trials):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
        if reference is not None:
            rates.append(reference.rate_once())
    out = {"seconds": float(np.median(times)), "trials": times, "peak_memory": mx.get_peak_memory() - exclude}
    if reference is not None:
        out["matmul_flops_per_s"] = rates
    return out


def _free():
    mx.clear_cache()
    mx.reset_peak_memory()


def _weight_bytes(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def bench_text_encoder(args, dtype) -> dict:
    before = mx.get_active_memory()
    cfg = TextEncoderConfig(num_hidden_layers=args.text_layers, **(TINY["text"] if args.tiny else {}))
    model = QwenTextEncoder(cfg)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    pipe = QwenImagePipeline(text_encoder=model)
    rng = np.random.default_rng(args.seed)
    prompt_len = TEXT_TO_IMAGE_DROP + args.text_tokens
    prompt = rng.integers(0, cfg.vocab_size, prompt_len).tolist()
    negative = rng.integers(0, cfg.vocab_size, NEGATIVE_TOKENS).tolist()
    # As a CFG run encodes: prompt and negative prompt as one right-padded batch with a mask.
    out = timed(lambda: pipe.prompts.encode_tokens([prompt, negative]), args.warmup, args.trials, exclude=before)
    out.update(layers=args.text_layers, tokens=[prompt_len, prompt_len], weight_bytes=_weight_bytes(model))
    flops = 2 * text_encoder_flops(cfg, prompt_len)
    full = flops * FULL_TEXT_LAYERS / args.text_layers
    out.update(flops=flops, flops_per_s=flops / out["seconds"], full_model_seconds=out["seconds"] * full / flops,
               extrapolated=args.text_layers != FULL_TEXT_LAYERS)
    del model, pipe
    _free()
    return out


class RandomTimestepWeights:
    """Where a benchmark's freed timestep-path weights come back from: new random arrays of the same shapes (there
    is no checkpoint to read them from again)."""

    def weights(self, model) -> dict:
        out = {}
        for path in model.modulation_layer_paths():
            layer = get_module(model, path)
            out[f"{path}.weight"] = 0.02 * mx.random.normal((layer.output_dims, layer.input_dims))
            if layer.has_bias:
                out[f"{path}.bias"] = mx.zeros((layer.output_dims,))
        return out


def bench_transformer(args, dtype, cfg: TransformerConfig, n_img: int, reference: MatmulReference,
                      group=None) -> dict:
    """Denoising steps of the pipeline's own loop (modulation table, transformer, CFG combination, Euler update),
    with CFG on and off, on a random transformer; each run stops after warm-up + trials steps. With a ``group``,
    split over its ranks as ``--parallel`` says (every rank draws the same random weights)."""
    mx.random.seed(args.seed)
    model = QwenImageTransformer(cfg)  # random weights, lazy until first used
    model.set_dtype(dtype)
    if args.quantize:
        from mlx_qwen_image.quantize import quantize_transformer

        quantize_transformer(model, args.quantize)
    if args.parallel == "tensor":
        from mlx_qwen_image.distributed import shard_transformer

        shard_transformer(model, group)
    mx.eval(model.parameters())
    model.mark_timestep_path()
    pipe = QwenImagePipeline(transformer=model, scheduler=FlowMatchEulerScheduler(),
                             timestep_source=RandomTimestepWeights())
    pipe.free_timestep_weights = not args.keep_modulation_weights
    pipe.group, pipe.parallel = group, args.parallel
    rng = np.random.default_rng(args.seed)
    L = args.text_tokens
    txt = mx.array(rng.standard_normal((2, L, cfg.joint_attention_dim)).astype(np.float32)).astype(dtype)
    # Under CFG the negative prompt " " is shorter than the prompt: its row is padded, so a mask is passed.
    mask = mx.array((np.arange(L)[None] < np.array([L, min(L, 6)])[:, None]).astype(np.int32))
    steps = max(args.steps, args.warmup + args.trials)
    phases, weights = {}, {}
    for name, cfg_on in (("step_cfg", True), ("step_nocfg", False)):
        rows = 2 if cfg_on else 1
        cond = Conditioning(txt[:rows], mask[:rows], 1, args.width, args.height, 4.0 if cfg_on else 1.0,
                            [(1, args.height // 16, args.width // 16)])
        _free()
        run = pipe.sample(cond, steps, seed=args.seed)
        rates = []
        for i, _ in enumerate(run):
            if i == 0 and cfg_on:
                weights = {"resident_bytes": _weight_bytes(model),
                           "modulation_weights_dropped": model.modulation_weights_dropped}
            if i >= args.warmup:
                rates.append(reference.rate_once())
            if i + 1 == args.warmup + args.trials:
                break
        run.close()
        trials = run.stats["steps"][args.warmup:]
        ph = {"seconds": float(np.median(trials)), "trials": trials, "matmul_flops_per_s": rates,
              "peak_memory": run.stats["denoise"]["peak_memory"] - reference.nbytes}
        ph["flops"] = transformer_step_flops(cfg, rows, n_img, L)
        ph["flops_per_s"] = ph["flops"]["total"] / ph["seconds"]
        # Per trial: the step's rate over the matmul rate measured right after it; the median of those.
        ratios = [ph["flops"]["total"] / t / r for t, r in zip(trials, rates)]
        ph["efficiency"] = float(np.median(ratios))
        phases[name] = ph
        if cfg_on:
            table = run.stats["modulation_table"]
            phases["modulation_table"] = {"seconds": table["seconds"], "steps": steps,
                                          "peak_memory": table["peak_memory"] - reference.nbytes}
            if args.cache:
                phases["cache"] = bench_cache(args, pipe, cond)
    del model, pipe
    _free()
    return {"phases": phases, "weights": weights}


def bench_cache(args, pipe, cond) -> dict:
    """Whole images of ``--steps`` steps through the pipeline's loop, without and with ``--cache``, one after the
    other in one run."""
    from mlx_qwen_image.cache import parse

    cache, _ = parse(args.cache)
    out = {"setting": cache.label, "steps": args.steps}
    for label, setting in (("without", None), ("with", cache)):
        _free()
        start = time.perf_counter()
        run = pipe.sample(cond, args.steps, seed=args.seed, cache=setting)
        for _ in run:
            pass
        out[f"seconds_{label}"] = time.perf_counter() - start
        if setting is not None:
            out.update(computed=run.stats["cache"]["computed"], passes=run.stats["cache"]["passes"],
                       peak_memory=run.stats["denoise"]["peak_memory"])
    out["seconds"] = out["seconds_with"]
    out["speedup"] = out["seconds_without"] / out["seconds_with"]
    return out


def bench_vae(args, dtype, cfg=None, cls=QwenImageVAE) -> dict:
    """Decode timing of a random VAE (Qwen-Image's, or ``cls`` built from ``cfg``)."""
    before = mx.get_active_memory()
    cfg = cfg or VAEConfig(**(TINY["vae"] if args.tiny else {}))
    vae = cls(cfg)
    vae.set_dtype(dtype)
    mx.eval(vae.parameters())
    s = cfg.scale_factor
    z = mx.random.normal((1, args.height // s, args.width // s, cfg.z_dim), key=mx.random.key(args.seed))
    out = timed(lambda: vae.decode(z.astype(dtype)), args.warmup, args.trials, exclude=before)
    out["weight_bytes"] = _weight_bytes(vae)
    del vae
    _free()
    return out


def run(args, group=None) -> dict:
    dtype = DTYPES[args.dtype]
    n_img = (args.height // 16) * (args.width // 16)
    blocks = auto_blocks(args, n_img) if args.blocks == "auto" else int(args.blocks)
    cfg = TransformerConfig(num_layers=blocks, **(TINY["transformer"] if args.tiny else {}))
    full_width = cfg.inner_dim == TransformerConfig().inner_dim
    result = {
        "device": {"type": "cpu" if _on_cpu() else "gpu", **{k: str(v) for k, v in mx.device_info().items()}},
        "software": {"mlx": mx.__version__, "python": platform.python_version(), "platform": platform.platform()},
        "config": {"width": args.width, "height": args.height, "blocks": blocks, "full_width": full_width,
                   "inner_dim": cfg.inner_dim, "dtype": args.dtype, "quantize": args.quantize,
                   "text_tokens": args.text_tokens, "image_tokens": n_img, "steps": args.steps,
                   "warmup": args.warmup, "trials": args.trials, "seed": args.seed, "compile": not args.no_compile,
                   "modulations": "table", "keep_modulation_weights": args.keep_modulation_weights,
                   "tiny": args.tiny},
    }
    if group is not None:
        from .communication import traffic_rows

        result["parallel"] = {"mode": args.parallel, "ranks": group.size(),
                              "traffic": traffic_rows(ranks=group.size())}
    mx.random.seed(args.seed)
    # The CFG step's own linear shapes: image and text streams, batch 2.
    streams = (2 * n_img, 2 * args.text_tokens)
    reference = MatmulReference(block_matmul_shapes(streams, cfg.inner_dim, 4 * cfg.inner_dim), dtype)
    result["matmul"] = reference.rate(args.trials, args.warmup)
    _free()
    phases = {}
    if not args.no_text_encoder:
        phases["text_encoder"] = bench_text_encoder(args, dtype)
    compiled, transformer_module.COMPILE = transformer_module.COMPILE, not args.no_compile
    try:
        tr = bench_transformer(args, dtype, cfg, n_img, reference, group)
    finally:
        transformer_module.COMPILE = compiled
    del reference
    _free()
    phases.update(tr["phases"])
    result["weights"] = tr["weights"]
    if not args.no_vae:
        phases["vae_decode"] = bench_vae(args, dtype)
    result["phases"] = phases
    result["efficiency"] = phases["step_cfg"]["efficiency"]
    result["projection"] = project(result, cfg, n_img) if full_width else None
    result["references"] = reference_rows(result) if full_width else []
    return result


def project(result: dict, cfg: TransformerConfig, n_img: int) -> dict:
    """Full-model (60-block, 28-layer) figures for this size: measured parts as measured, the rest scaled by
    FLOPs from the measured depth."""
    c, ph = result["config"], result["phases"]
    full = dataclasses.replace(cfg, num_layers=FULL_BLOCKS)
    out = {"measured": ["matmul", "vae_decode"], "extrapolated": []}
    for name, batch in (("step_cfg", 2), ("step_nocfg", 1)):
        scale = transformer_step_flops(full, batch, n_img, c["text_tokens"])["total"] / ph[name]["flops"]["total"]
        out[f"{name}_seconds"] = ph[name]["seconds"] * scale
    table = ph.get("modulation_table", {}).get("seconds", 0.0) * FULL_BLOCKS / c["blocks"]
    text = ph["text_encoder"]["full_model_seconds"] if "text_encoder" in ph else None
    vae = ph["vae_decode"]["seconds"] if "vae_decode" in ph else None
    if c["blocks"] != FULL_BLOCKS:
        out["extrapolated"] += ["step_cfg", "step_nocfg", "modulation_table"]
    else:
        out["measured"] += ["step_cfg", "step_nocfg", "modulation_table"]
    if text is not None:
        (out["extrapolated"] if ph["text_encoder"]["extrapolated"] else out["measured"]).append("text_encoder")
    if text is not None and vae is not None:
        for name in ("cfg", "nocfg"):
            out[f"image_seconds_{name}"] = text + table + c["steps"] * out[f"step_{name}_seconds"] + vae
    return out


def default_out(result: dict) -> Path:
    c = result["config"]
    quant = f"-q{c['quantize']}" if c["quantize"] else ""
    tiny = "-tiny" if c["tiny"] else ""
    split = f"-{result['parallel']['mode']}{result['parallel']['ranks']}" if "parallel" in result else ""
    model = "qwen21-" if result.get("model") == "qwen-image-2.1" else ""
    return RESULTS / (f"{model}{result['device']['type']}-{c['width']}x{c['height']}-{c['blocks']}b-{c['dtype']}{quant}"
                      f"{split}{tiny}")


def main(argv=None, prog: str = "python -m benchmarks.bench") -> int:
    args = parse_args(argv, prog)
    group = None
    if args.parallel:
        from mlx_qwen_image.distributed import DistributedError, choose, connect

        group = connect()
        if group is None:
            print(f"--parallel {args.parallel}: run under mlx.launch (e.g. mlx.launch --backend ring -n 2 -- "
                  f"{prog} --parallel {args.parallel})", file=sys.stderr)
            return 2
        try:
            choose(args.parallel, group, cfg=True, images=1, fits_one=True)
        except DistributedError as e:
            print(e, file=sys.stderr)
            return 2
    if args.model == "2.1":
        from . import bench21

        result = runtime.call(bench21.run, args)
        table = bench21.markdown(result)
    else:
        result = runtime.call(run, args, group)  # the pipeline's MLX work belongs on the MLX owner thread
        table = markdown(result)
    if group is not None and group.rank() != 0:
        return 0  # rank 0 reports
    out = Path(args.out) if args.out else default_out(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}", file=sys.stderr)
    if args.check_efficiency is not None and result["efficiency"] < args.check_efficiency:
        print(f"efficiency {result['efficiency']:.1%} is below {args.check_efficiency:.0%}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
