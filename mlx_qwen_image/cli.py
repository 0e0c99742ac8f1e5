"""The ``mlx-qwen-image`` command: parse, check, call the library, report. No model logic lives here.

User mistakes (bad sizes, missing models, unwritable outputs) end in one line on stderr and exit code 1,
never a traceback; outputs are written atomically and never overwrite an existing file unless asked.
"""

from __future__ import annotations

import functools
import random
import sys
import time
from pathlib import Path

import click

from . import __version__

ASPECTS = {
    "1:1": (1328, 1328),
    "16:9": (1664, 928),
    "9:16": (928, 1664),
    "4:3": (1472, 1104),
    "3:4": (1104, 1472),
    "3:2": (1584, 1056),
    "2:3": (1056, 1584),
}


class UsageError(click.ClickException):
    """One-line error, exit code 1."""


def user_errors(fn):
    """Turn the library's user-facing errors into one-line CLI errors."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .loading import CheckpointError

        try:
            return fn(*args, **kwargs)
        except (CheckpointError, ValueError, OSError) as e:
            raise UsageError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        except KeyboardInterrupt:
            raise UsageError("interrupted") from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlx-qwen-image")
def cli():
    """Qwen-Image text-to-image and image editing on Apple Silicon (MLX)."""


def _nearest16(v: int) -> str:
    lo = max(16, v // 16 * 16)
    return f"{lo} or {lo + 16}" if v > lo else str(lo)


def check_size(width: int, height: int):
    for name, v in (("width", width), ("height", height)):
        if v < 16 or v % 16:
            raise UsageError(f"--{name} {v} is not a multiple of 16; use {_nearest16(v)}")


def output_paths(output: str | None, seeds: list[int], overwrite: bool) -> list[Path]:
    """Where each image goes; refuses existing files (unless ``overwrite``) and unwritable folders up front."""
    if output is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        paths = [Path(f"qwen-image-{stamp}-{s}.png") for s in seeds]
    else:
        base = Path(output).expanduser()
        if base.suffix.lower() != ".png":
            raise UsageError(f"--output {output}: only .png is written; give a file name ending in .png")
        paths = [base] if len(seeds) == 1 else [base.with_name(f"{base.stem}-{i + 1}.png") for i in range(len(seeds))]
    for p in paths:
        parent = p.parent if str(p.parent) else Path(".")
        if not parent.is_dir():
            raise UsageError(f"cannot write {p}: folder {parent} does not exist")
        if not _writable(parent):
            raise UsageError(f"cannot write {p}: folder {parent} is not writable")
        if p.exists() and not overwrite:
            raise UsageError(f"{p} already exists; choose another --output or pass --overwrite")
    return paths


def _writable(folder: Path) -> bool:
    import os

    return os.access(folder, os.W_OK | os.X_OK)


class Progress:
    """One status line on stderr: step, s/step and ETA."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.start = total, label, time.perf_counter()

    def update(self, done: int):
        elapsed = time.perf_counter() - self.start
        per = elapsed / max(done, 1)
        eta = per * (self.total - done)
        bar = "#" * int(20 * done / self.total)
        click.echo(
            f"\r{self.label} [{bar:<20}] {done}/{self.total}  {per:6.2f} s/step  ETA {eta:5.0f} s",
            err=True,
            nl=done == self.total,
        )


def format_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


@cli.command()
@click.argument("prompt")
@click.option("--model", default="Qwen/Qwen-Image", show_default=True, help="Checkpoint folder or Hub repo id.")
@click.option("--width", type=int, default=None, help="Image width (multiple of 16). [default: 1024]")
@click.option("--height", type=int, default=None, help="Image height (multiple of 16). [default: 1024]")
@click.option("--aspect", type=click.Choice(list(ASPECTS)), default=None, help="An official size preset.")
@click.option("--steps", type=int, default=50, show_default=True)
@click.option("--cfg-scale", type=float, default=4.0, show_default=True, help="True CFG scale; 1 turns CFG off.")
@click.option("--negative-prompt", default=None, help='Negative prompt for CFG. [default: " "]')
@click.option("--seed", type=int, default=None, help="Random seed. [default: random]")
@click.option("--num-images", type=int, default=1, show_default=True, help="Images with consecutive seeds.")
@click.option("--output", "-o", default=None, help="PNG file. [default: qwen-image-<time>-<seed>.png]")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--quantize", type=click.Choice(["4", "8"]), default=None, help="Quantize the transformer on load.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16", show_default=True)
@click.option("--low-memory", is_flag=True, help="Free the text encoder before denoising.")
@user_errors
def generate(prompt, model, width, height, aspect, steps, cfg_scale, negative_prompt, seed, num_images, output,
             overwrite, quantize, dtype, low_memory):
    """Generate images from PROMPT."""
    if aspect is not None and (width is not None or height is not None):
        raise UsageError("--aspect sets the size; do not combine it with --width/--height")
    width, height = ASPECTS[aspect] if aspect else (width or 1024, height or 1024)
    check_size(width, height)
    if steps < 1:
        raise UsageError(f"--steps {steps}: at least 1 step is needed")
    if cfg_scale < 1:
        raise UsageError(f"--cfg-scale {cfg_scale}: must be at least 1 (1 turns CFG off)")
    if num_images < 1:
        raise UsageError(f"--num-images {num_images}: must be at least 1")
    seed = random.randrange(2**31) if seed is None else seed
    seeds = [seed + i for i in range(num_images)]
    paths = output_paths(output, seeds, overwrite)
    quantize = int(quantize) if quantize else None

    import mlx.core as mx

    from .image import save_png
    from .loading import check_layout, is_repo_id, resolve
    from .memory import warn_if_too_large
    from .pipeline import QwenImagePipeline

    if not is_repo_id(model):  # a local folder: refuse a missing or incomplete one before anything else
        check_layout(resolve(model))
    warn_if_too_large(model, quantize, width, height, cfg_scale > 1, low_memory, dtype)
    t0 = time.perf_counter()
    pipe = QwenImagePipeline.from_pretrained(model, quantize=quantize, dtype=dtype)
    pipe.low_memory = low_memory
    for path, s in zip(paths, seeds):
        progress = Progress(steps, f"seed {s}")
        run = pipe.denoise(prompt, negative_prompt=negative_prompt, width=width, height=height, steps=steps,
                           cfg_scale=cfg_scale, seed=s)
        for i, latents in enumerate(run):
            mx.eval(latents)
            progress.update(i + 1)
        image = pipe.decode(latents, width, height, output="pil")[0]
        save_png(image, path, {
            "prompt": prompt,
            "negative_prompt": " " if negative_prompt is None else negative_prompt,
            "seed": s, "steps": steps, "cfg_scale": cfg_scale, "width": width, "height": height,
            "model": str(model), "quantization": f"{quantize}-bit" if quantize else "none", "dtype": dtype,
            "software": f"mlx-qwen-image {__version__}",
        })
        click.echo(f"saved {path}", err=True)
    peak = mx.get_peak_memory()
    click.echo(f"done: {len(paths)} image(s) in {time.perf_counter() - t0:.1f} s, peak memory {format_bytes(peak)}",
               err=True)


def main():
    try:
        cli(standalone_mode=True)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
