"""Convert a diffusers-layout Qwen-Image checkpoint into an MLX checkpoint: float, or 4/8-bit transformer.

The output is a complete checkpoint in the same layout (model_index.json, one folder per component, tokenizer
and scheduler copied) whose weights carry our parameter names and layouts (what each model's ``sanitize``
returns, so loading it is a plain strict load), in MLX safetensors shards of at most 5 GB with an index.

It streams: every source shard is opened lazily, and tensors are cast, quantized, evaluated and written one
output shard at a time, each source tensor dropped once its output exists, so the peak memory is about one
output shard, not the model. It writes into a hidden folder next to the destination and renames it at the end:
an interrupted conversion leaves no destination, and the partial folder has no model_index.json.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import mlx.core as mx

from mlx_qwen_image import __version__
from mlx_qwen_image.config import naming, read_json
from mlx_qwen_image.loading import CheckpointError, is_repo_id, tensor_names
from mlx_qwen_image.quantize import (RECIPE)
from mlx_qwen_image.variants import locate

from .component import MAX_SHARD_BYTES, Component, GGUFComponent, Transform, write_json

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16}
GROUP_NAMES = {"img_in": "img_in", "io": "txt_in, norm_out.linear and proj_out", "time": "the timestep embedder",
               "mod": "every img_mod/txt_mod", "first": "block 0", "last": "the last block", "body": "the rest"}


def convert(source: str | Path, output: str | Path, bits: int | None = None, group_size: int = 64,
            dtype: str = "bfloat16", text_encoder_bits: int | None = None, transform: Transform | None = None,
            max_shard_bytes: int = MAX_SHARD_BYTES, log: Callable[[str], None] = lambda line: None,
            loras=(), scheduler_config: dict | None = None, gguf: str | Path | None = None,
            lm_head: bool = True) -> list[dict]:
    """Write the MLX checkpoint of ``source`` (a local folder or Hub repo id) into the new folder ``output``.

    ``bits`` quantizes the transformer with the mixed recipe (`mlx_qwen_image.quantize`), ``text_encoder_bits``
    the text encoder's language model; the VAE stays float. Float weights (and the quantization scales) are
    written in ``dtype``. ``transform`` receives the transformer's float weights (our names, lazy arrays) before
    quantization and returns the weights to write, same names and shapes. ``loras`` ((path, scale) pairs) are
    fused into those float weights before quantization; ``scheduler_config`` replaces the scheduler's config
    (a Lightning model baked this way loads with its own scheduler). ``gguf``: a GGUF file the transformer's weights
    come from, written quantized as the file has them (the rest comes from ``source``). ``lm_head=False`` leaves
    out the text encoder's language-model head (1.1 GB in bf16; the prompt enhancer needs it).
    Returns one summary row per component: name, bytes before and after, parameters, bits per weight.
    """
    if gguf is not None and (bits or loras or transform):
        raise ValueError("--gguf writes the file's own quantization: leave out --bits and --lora (bake LoRAs into "
                         "a float checkpoint)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if text_encoder_bits not in (None, 8):
        raise ValueError(f"text_encoder_bits must be 8 or None, got {text_encoder_bits!r} (at 4 bits the text "
                         "features change by 20-50% on the measured models)")
    if loras:
        from mlx_qwen_image.lora import fuse_lora_weights, load_lora

        loras = [(load_lora(path), scale) for path, scale in loras]  # a bad file is refused before any work
        inner, target = transform, DTYPES[dtype]

        def transform(weights):
            # Fused in the output dtype, as quantize-on-load fuses into the loaded weights: identical results.
            weights = inner(weights) if inner else weights
            cast = {k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
            return fuse_lora_weights(cast, loras)
    dest, parent = _destination(output)
    root, variant = locate(source, config_only=("transformer",) if gguf is not None else ())
    if _inside(dest, root):
        raise CheckpointError(f"--output {dest} is inside the source checkpoint {root}; write it somewhere else")
    _validate_source(root, variant)
    index = read_json(root / "model_index.json")
    # The components with weights, as the registry says the variant has them; every other folder is copied.
    head = lm_head and any(n.startswith("lm_head.") for n in tensor_names(root / "text_encoder"))
    builds = {name: {**variant.build_options(name), **({"lm_head": head} if name == "text_encoder" else {})}
              for name in variant.model_components}
    jobs = [GGUFComponent(name, variant.model_class(name), root / name, Path(gguf).expanduser(), builds[name])
            if gguf is not None and name == "transformer" else
            Component(name, variant.model_class(name), root / name, build=builds[name])
            for name in variant.model_components]
    for job in jobs:
        for kind, count in getattr(job, "requantized", {}).items():
            log(f"{count} {kind} tensors are dequantized and quantized again (MLX has no exact form of {kind})")
    for job in jobs:
        job.plan_for(bits if job.name == "transformer" else text_encoder_bits if job.name == "text_encoder" else None,
                     group_size)
    need = sum(job.estimate(DTYPES[dtype].size) for job in jobs)

    def fill(tmp: Path) -> list[dict]:
        tmp.mkdir()
        for job in jobs:
            job.write(tmp / job.name, DTYPES[dtype], transform if job.name == "transformer" else None,
                      max_shard_bytes, log)
        for name in index:
            folder = root / name
            if not name.startswith("_") and folder.is_dir() and name not in {job.name for job in jobs}:
                _copy_files(folder, tmp / name)
        if scheduler_config is not None:
            write_json(tmp / "scheduler" / "scheduler_config.json",
                        {"_class_name": "FlowMatchEulerDiscreteScheduler", **scheduler_config})
        summary = [job.summary() for job in jobs]
        card = _model_card(source, dest, bits, group_size, dtype, text_encoder_bits, summary, variant)
        if gguf is not None:
            card += f"\nThe transformer's weights come from the GGUF file {Path(gguf).name}, repacked into MLX " \
                    "quantization as mlx-qwen-image's GGUF reader does.\n"
        if loras:
            card += "\nLoRAs fused into the transformer before quantization: " + ", ".join(
                f"{lora.name}:{scale:g}" for lora, scale in loras) + ".\n"
        if scheduler_config is not None:
            card += "\nThe scheduler config was replaced (Lightning preset: exponential shift ln 3, no terminal " \
                    "stretch); run it with the step count its LoRA was distilled for and CFG 1.\n"
        (tmp / "README.md").write_text(card, encoding="utf-8")
        # model_index.json last: until it exists the partial folder is not a checkpoint.
        shutil.copyfile(root / "model_index.json", tmp / "model_index.json")
        return summary

    return _staged(dest, parent, need, fill, log)


def convert_controlnet(source: str | Path, output: str | Path, bits: int | None = None, group_size: int = 64,
                       dtype: str = "bfloat16", log: Callable[[str], None] = lambda line: None) -> list[dict]:
    """Write the MLX form of a ControlNet (a folder or Hub repo with config.json and safetensors) into the new
    folder ``output``: our names, ``bits`` with the transformer's recipe (its residual projections float)."""
    from mlx_qwen_image.control import locate_controlnet
    from mlx_qwen_image.models.controlnet import QwenImageControlNet

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    dest, parent = _destination(output)
    root = locate_controlnet(source)
    if _inside(dest, root):
        raise CheckpointError(f"--output {dest} is inside the source ControlNet {root}; write it somewhere else")
    job = Component("controlnet", QwenImageControlNet, root)
    job.plan_for(bits, group_size)

    def fill(tmp: Path) -> list[dict]:
        job.write(tmp, DTYPES[dtype], None, MAX_SHARD_BYTES, log)
        return [job.summary()]

    return _staged(dest, parent, job.estimate(DTYPES[dtype].size), fill, log)


def _destination(output) -> tuple[Path, Path]:
    """The output folder, refused unless it is new and its parent writable; and that parent."""
    dest = Path(output).expanduser()
    if dest.exists() or dest.is_symlink():
        raise CheckpointError(f"{dest} already exists; choose a new --output folder (a conversion never overwrites)")
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise CheckpointError(f"cannot write {dest}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write {dest}: folder {parent} is not writable")
    return dest, parent


def _staged(dest: Path, parent: Path, need: int, fill, log):
    """``fill(tmp)`` writes the conversion into a hidden folder next to ``dest``, renamed to it when complete; an
    error, Ctrl-C, SIGTERM or a full disk removes the partial folder."""
    free = shutil.disk_usage(parent).free
    if need > free:
        raise CheckpointError(f"not enough disk space in {parent}: the conversion writes about {need / 1e9:.1f} GB, "
                              f"{free / 1e9:.1f} GB are free")
    _remove_stale_partials(parent, dest.name, log)
    tmp = parent / f"{_PARTIAL.format(name=dest.name)}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    previous = _on_sigterm()
    try:
        t0 = time.perf_counter()
        summary = fill(tmp)
        if dest.exists():
            raise CheckpointError(f"{dest} appeared during the conversion; the conversion is left unwritten")
        os.rename(tmp, dest)
        log(f"wrote {dest} in {time.perf_counter() - t0:.0f} s")
        return summary
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise CheckpointError(f"the disk holding {parent} filled up during the conversion (it writes about "
                                  f"{need / 1e9:.1f} GB); the partial output was removed: free space and run it "
                                  "again") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


_PARTIAL = ".{name}.partial-"  # + the converting process's id


def _inside(dest: Path, root: Path) -> bool:
    try:
        dest.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _validate_source(root: Path, variant):
    """The checks loading runs, on the parts the converter copies as they are: nothing is written for a source
    whose tokenizer, processor or scheduler config could not load."""
    from mlx_qwen_image.image_processor import QwenImageProcessor
    from mlx_qwen_image.scheduler import scheduler_from_config
    from mlx_qwen_image.tokenizer import QwenTokenizer

    QwenTokenizer.from_pretrained(variant.tokenizer_folder(root))
    if variant.vision:
        QwenImageProcessor.from_pretrained(root / "processor")
    scheduler_file = root / "scheduler" / "scheduler_config.json"
    with naming(scheduler_file):
        scheduler_from_config(read_json(scheduler_file))


def _remove_stale_partials(parent: Path, name: str, log):
    """Partial outputs of conversions to ``name`` whose process is gone (killed, or the machine restarted)."""
    prefix = _PARTIAL.format(name=name)
    for folder in parent.glob(prefix + "*"):
        pid = folder.name[len(prefix):]
        if folder.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            log(f"removed {folder}, left by an earlier conversion that did not finish")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _on_sigterm():
    """While converting, SIGTERM unwinds like Ctrl-C, so the partial output is removed; returns the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, stop)


def _copy_files(src: Path, dst: Path):
    """File contents only: a read-only source (a Hub cache, a fixture) must not make the output read-only."""
    for file in sorted(src.rglob("*")):
        if file.is_file():
            target = dst / file.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target)


def format_summary(summary: list[dict]) -> list[str]:
    """The table printed after a conversion."""
    lines = [f"{'component':<14}{'before':>11}{'after':>11}{'bits/weight':>13}"]
    for row in summary:
        lines.append(f"{row['component']:<14}{row['bytes_before'] / 1e9:>8.2f} GB{row['bytes_after'] / 1e9:>8.2f} GB"
                     f"{row['bits_per_weight']:>13.2f}")
    before, after = sum(r["bytes_before"] for r in summary), sum(r["bytes_after"] for r in summary)
    lines.append(f"{'total':<14}{before / 1e9:>8.2f} GB{after / 1e9:>8.2f} GB")
    return lines


def _model_card(source, dest: Path, bits, group_size, dtype, text_encoder_bits, summary, variant) -> str:
    command = f"mlx-qwen-image convert --model {source} --output {dest.name}"
    if bits:
        command += f" --bits {bits} --group-size {group_size}"
    command += f" --dtype {dtype}"
    if text_encoder_bits:
        command += f" --text-encoder-bits {text_encoder_bits}"
    if bits:
        kept = "; ".join(f"{GROUP_NAMES[g]} {f'{b}-bit' if b else dtype}" for g, b in RECIPE.items())
        transformer = f"{bits}-bit group-wise affine (group size {group_size}), except: {kept}"
    else:
        transformer = dtype
    text = f"{text_encoder_bits}-bit (language model and token embedding)" if text_encoder_bits else dtype
    text += f"; vision tower {dtype}" if variant.vision else "; no vision tower (text-to-image does not use it)"
    task = "image-to-image" if variant.edits else "text-to-image"
    front = ["---", "library_name: mlx", f"tags: [mlx, qwen-image, {task}]"]
    if is_repo_id(source):
        front.append(f"base_model: {source}")
    front.append("---")
    rows = "\n".join(f"| {r['component']} | {r['bytes_after'] / 1e9:.2f} GB | {r['bits_per_weight']:.2f} |"
                     for r in summary)
    return "\n".join(front) + f"""

# {dest.name}

An MLX checkpoint of `{source}` for mlx-qwen-image (Qwen-Image on Apple Silicon), made with mlx-qwen-image
{__version__}:

```
{command}
```

- transformer: {transformer}
- text encoder: {text}
- VAE: {dtype}

| component | size | bits per weight |
|---|---|---|
{rows}

Load it with `QwenImagePipeline.from_pretrained("{dest.name}")` or
`mlx-qwen-image generate "a prompt" --model {dest.name}`. The weights use mlx-qwen-image's parameter names and
layouts (quantized layers as MLX `weight`/`scales`/`biases`), so diffusers and transformers cannot load them.
The license is the source model's (Qwen-Image: Apache-2.0).
"""
