"""The ``mlx-qwen-image`` command: parse, check, call the library, report. No model logic lives here.

Every error is one line on stderr, never a traceback: exit code 2 for a command line click cannot parse (an
unknown option, a value of the wrong type), 1 for everything else the user can fix (bad sizes, missing or damaged
models, unwritable outputs, a run that produced NaNs), 130 for Ctrl-C. Outputs are written atomically and never
replace an existing file unless asked.
"""

from __future__ import annotations

import functools
import math
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
        from .config import CheckpointError
        from .pipeline import NonFiniteError

        try:
            return fn(*args, **kwargs)
        except (CheckpointError, ValueError, OSError, NonFiniteError) as e:
            raise UsageError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None

    return wrapper


class Group(click.Group):
    """click's group, with every error on one line (click's usage errors print three, with the usage)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        import warnings

        # Library warnings (a prompt cut to fit) as one line, without Python's source location.
        warnings.showwarning = lambda message, *_, **__: click.echo(f"warning: {message}", err=True)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            names, ctx = [], e.ctx
            while ctx is not None and ctx.parent is not None:  # the subcommands, whatever the program was called
                names.insert(0, ctx.info_name)
                ctx = ctx.parent
            where = " ".join(["mlx-qwen-image"] + names)
            click.echo(f"Error: {e.format_message()} (see {where} --help)", err=True)
            code = 2
        except click.ClickException as e:
            click.echo(f"Error: {e.format_message()}", err=True)
            code = e.exit_code
        except (click.Abort, KeyboardInterrupt):
            click.echo("interrupted", err=True)
            code = 130
        code = code if isinstance(code, int) else 0
        if not standalone_mode:
            return code
        sys.exit(code)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlx-qwen-image")
def cli():
    """Qwen-Image text-to-image and image editing on Apple Silicon (MLX)."""


def _nearest16(v: int) -> str:
    lo = max(16, v // 16 * 16)
    return f"{lo} or {lo + 16}" if v > lo else str(lo)


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
        if p.is_dir():
            raise UsageError(f"--output {p} is a folder; give a file name ending in .png")
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
    """Progress on stderr: one status line rewritten in place on a terminal (step, s/step, ETA), one line per step
    in a log file; and a line when a long phase without steps starts (the text encoder, the pictures, the decode)."""

    PHASES = {"text_encoder": "encoding the prompt", "picture_encode": "encoding the pictures",
              "decode": "decoding the image"}

    def __init__(self, total: int, label: str):
        self.total, self.label = total, label
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, done: int):
        elapsed = time.perf_counter() - self.start
        per = elapsed / max(done, 1)
        eta = per * (self.total - done)
        bar = "#" * int(20 * done / self.total)
        line = f"{self.label} [{bar:<20}] {done}/{self.total}  {per:6.2f} s/step  ETA {eta:5.0f} s"
        if self.tty:
            click.echo("\r" + line, err=True, nl=done == self.total)
        else:
            click.echo(line, err=True)

    def phase(self, name: str):
        if name == "denoise":  # s/step and the ETA count the steps only
            self.start = time.perf_counter()
        if name in self.PHASES:
            click.echo(f"{self.label}: {self.PHASES[name]}", err=True)


def format_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def shared_options(fn):
    """Options that generate and edit share."""
    options = [
        click.option("--steps", type=int, default=None,
                     help="Denoising steps. [default: the checkpoint's, 50; 4/8 with --lightning]"),
        click.option("--cfg-scale", type=float, default=None,
                     help="True CFG scale; 1 turns CFG off. [default: the checkpoint's, 4.0; 1 with --lightning]"),
        click.option("--negative-prompt", default=None, help='Negative prompt for CFG. [default: " "]'),
        click.option("--seed", type=int, default=None, help="Random seed. [default: random]"),
        click.option("--num-images", type=int, default=1, show_default=True, help="Images with consecutive seeds."),
        click.option("--output", "-o", default=None, help="PNG file. [default: qwen-image-<time>-<seed>.png]"),
        click.option("--overwrite", is_flag=True, help="Replace an existing output file."),
        click.option("--quantize", type=click.Choice(["4", "8"]), default=None,
                     help="Quantize the transformer on load."),
        click.option("--dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16", show_default=True,
                     help="Weights and activations; float32 is the reference-exact mode (twice the memory)."),
        click.option("--low-memory", is_flag=True,
                     help="Free the text encoder once the prompt is encoded (reloaded for the next prompt)."),
        click.option("--gguf", default=None, metavar="FILE",
                     help="Take the transformer's weights from a GGUF file (e.g. Q4_K_M); the rest from --model."),
        click.option("--text-encoder-bits", type=click.Choice(["8"]), default=None,
                     help="Quantize the text encoder on load (8-bit: 8.9 GB instead of 14 GB)."),
        click.option("--lora", "loras", multiple=True, metavar="PATH[:SCALE]",
                     help="LoRA safetensors file, with an optional scale (repeatable; they add up)."),
        click.option("--cache", "cache_spec", default=None, metavar="SPEC",
                     help="Step cache: first-block[:THRESHOLD], taylorseer[:INTERVAL], magcache:FILE[:THRESHOLD], "
                          "or magcache-calibrate:FILE to measure MagCache's ratios. [default: off]"),
        click.option("--enhance-prompt", is_flag=True,
                     help="Rewrite the prompt first with the text encoder run as a chat model (offline; quoted "
                          "text is kept verbatim)."),
        click.option("--lightning", type=click.Choice(["4", "8"]), default=None,
                     help="Qwen-Image-Lightning preset: 4 or 8 steps, CFG 1 and the Lightning scheduler "
                          "(pass the Lightning LoRA with --lora, or a model with it baked in)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


class Job:
    """The checks and bookkeeping generate and edit share: settings, outputs, loading, the step loop."""

    def __init__(self, model, steps, cfg_scale, seed, num_images, output, overwrite, quantize, dtype, low_memory,
                 gguf, text_encoder_bits, loras, lightning, cache_spec=None, enhance_prompt=False):
        if lightning:
            steps = int(lightning) if steps is None else steps
            cfg_scale = 1.0 if cfg_scale is None else cfg_scale
        if steps is not None and steps < 1:
            raise UsageError(f"--steps {steps}: at least 1 step is needed")
        if cfg_scale is not None and not (math.isfinite(cfg_scale) and cfg_scale >= 1):
            raise UsageError(f"--cfg-scale {cfg_scale}: must be a number of at least 1 (1 turns CFG off)")
        if num_images < 1:
            raise UsageError(f"--num-images {num_images}: must be at least 1")
        from .lora import load_lora, parse_lora_arg

        self.loras = [parse_lora_arg(text) for text in loras]
        for path, _ in self.loras:
            load_lora(path)  # a bad file is refused now, not after minutes of loading
        if seed is not None and not 0 <= seed < 2**63 - num_images:
            raise UsageError(f"--seed {seed}: must be in [0, 2**63 - --num-images)")
        seed = random.randrange(2**31) if seed is None else seed
        self.seeds = [seed + i for i in range(num_images)]
        self.paths = output_paths(output, self.seeds, overwrite)
        self.overwrite = overwrite
        self.model, self.steps, self.cfg_scale, self.dtype, self.low_memory = model, steps, cfg_scale, dtype, low_memory
        self.quantize = int(quantize) if quantize else None
        self.text_encoder_bits = int(text_encoder_bits) if text_encoder_bits else None
        self.lightning = lightning
        if gguf is not None and not Path(gguf).expanduser().is_file():
            raise UsageError(f"--gguf {gguf}: no such file")
        if gguf is not None and quantize:
            raise UsageError("--gguf: a GGUF file comes quantized as it is; leave out --quantize")
        self.gguf = None if gguf is None else str(Path(gguf).expanduser())
        from .cache import parse

        self.cache, self.calibration_file = parse(cache_spec) if cache_spec else (None, None)
        if self.calibration_file is not None and self.calibration_file.exists() and not overwrite:
            raise UsageError(f"{self.calibration_file} already exists; choose another file or pass --overwrite")
        self.passes = self.computed = 0
        self.enhance, self.enhanced, self.enhance_rate = enhance_prompt, None, None
        self.start = time.perf_counter()
        self.peak = 0

    def check_model(self, edits: bool, pictures: int = 0):
        """Refuse a missing, incomplete or wrong-kind local checkpoint before loading, and more pictures than it
        takes; returns its variant (for a Hub repo not yet downloaded, the command's default one)."""
        from .loading import is_repo_id
        from .variants import DEFAULT_EDIT, DEFAULT_TEXT_TO_IMAGE, VARIANTS, locate

        variant = DEFAULT_EDIT if edits else DEFAULT_TEXT_TO_IMAGE
        most = max(v.max_images for v in VARIANTS.values())
        if not is_repo_id(self.model):
            _, variant = locate(self.model, variant, config_only=("transformer",) if self.gguf else ())
            if variant.edits != edits:
                kind, command = ("an image-editing", "edit --image FILE") if variant.edits else \
                    ("a text-to-image", "generate")
                raise UsageError(f"{self.model} is {kind} checkpoint ({variant.class_name}): use "
                                 f"`mlx-qwen-image {command}`")
            most = variant.max_images
        if pictures > most:
            which = f"this checkpoint ({variant.class_name})" if not is_repo_id(self.model) else "the editing models"
            raise UsageError(f"{pictures} pictures given; {which} takes at most {most}")
        return variant

    def check_size(self, variant, width=None, height=None, image=None, images=()):
        """Refuse a size whose activations cannot fit before loading; warn when the whole run may not fit."""
        from .conditioning import output_size
        from .memory import refuse_size, too_large

        cfg = (self.cfg_scale if self.cfg_scale is not None else variant.cfg_scale) > 1
        width, height = output_size(variant, width, height, image, images)
        refusal = refuse_size(width, height, cfg)
        if refusal:
            raise UsageError(refusal)
        warning = too_large(self.model, self.quantize, width, height, cfg, self.low_memory, self.dtype,
                            self.text_encoder_bits, variant, self.gguf)
        if warning:
            click.echo(warning, err=True)

    def load(self):
        from .pipeline import QwenImagePipeline
        from .scheduler import LIGHTNING_SCHEDULER_CONFIG

        pipe = QwenImagePipeline.from_pretrained(
            self.model, quantize=self.quantize, dtype=self.dtype, loras=self.loras,
            text_encoder_bits=self.text_encoder_bits, low_memory=self.low_memory, gguf=self.gguf,
            scheduler_config=LIGHTNING_SCHEDULER_CONFIG if self.lightning else None)
        self.quantization = pipe.quantization
        if self.lightning and not self.loras and not _baked_lightning(pipe.root):
            click.echo("note: --lightning sets the Lightning schedule, which expects the Lightning LoRA (--lora "
                       "Qwen-Image-Lightning-...safetensors) or a checkpoint with it baked in", err=True)
        return pipe

    def prompt(self, prompt: str) -> dict:
        """The prompt arguments of the next run: the first run rewrites, the others reuse its rewrite."""
        if self.enhanced is not None:
            return {"prompt": self.enhanced}
        return {"prompt": prompt, "enhance_prompt": self.enhance}

    def metadata(self, run, seed, **extra):
        req = run.request
        if self.enhanced is not None:
            extra["enhanced_prompt"] = self.enhanced
        return {
            **extra,
            "negative_prompt": req.negative_prompts[0] if req.negative_prompts else " ",
            "seed": seed, "steps": req.steps, "cfg_scale": req.cfg_scale, "width": run.width, "height": run.height,
            "model": str(self.model), "quantization": self.quantization,
            **({"gguf": self.gguf} if self.gguf else {}),
            "cache": self.cache.label if self.cache else "none",
            "text_encoder_quantization": f"{self.text_encoder_bits}-bit" if self.text_encoder_bits else "none",
            "dtype": self.dtype,
            "loras": ", ".join(f"{p}:{s:g}" for p, s in self.loras) or "none",
            "scheduler": f"lightning-{self.lightning}" if self.lightning else "default",
            "software": f"mlx-qwen-image {__version__}",
        }

    def save(self, run, seed, path, metadata):
        """Run the steps with a progress line, decode, write the PNG atomically."""
        from .image import save_png

        progress = Progress(run.total, f"seed {seed}")

        def phase(name):
            progress.phase(name)
            if name == "enhance":
                click.echo(f"{progress.label}: rewriting the prompt", err=True)
            if name == "text_encoder" and "enhance" in run.stats:
                self.enhanced = run.stats["enhance"]["prompts"][0]
                self.enhance_rate = run.stats["enhance"]["tokens_per_second"]
                click.echo(f"enhanced prompt: {self.enhanced}", err=True)

        run.on_phase = phase
        image = run.complete("pil", lambda done, _: progress.update(done))[0]
        if self.enhanced is not None:
            metadata["enhanced_prompt"] = self.enhanced
        save_png(image, path, metadata, overwrite=self.overwrite)
        stats = run.stats
        self.peak = max([self.peak] + [p.get("peak_memory", 0) for p in stats.values() if isinstance(p, dict)])
        times = [f"{label} {stats[name]['seconds']:.1f} s" for name, label in
                 (("text_encoder", "prompt"), ("picture_encode", "pictures"), ("denoise", f"{run.total} steps"),
                  ("decode", "decode")) if name in stats]
        click.echo(f"saved {path} ({', '.join(times)})", err=True)
        if "cache" in stats:
            self.passes += stats["cache"]["passes"]
            self.computed += stats["cache"]["computed"]
            if "mag_ratios" in stats["cache"] and self.calibration_file is not None:
                _write_ratios(self.calibration_file, stats["cache"]["mag_ratios"], run)

    def done(self):
        cached = f", {self.computed} of {self.passes} transformer passes computed in full ({self.cache.label})" \
            if self.cache is not None else ""
        if self.enhance_rate is not None:
            cached += f", prompt rewritten at {self.enhance_rate:.1f} tokens/s"
        click.echo(f"done: {len(self.paths)} image(s) in {time.perf_counter() - self.start:.1f} s, "
                   f"peak memory {format_bytes(self.peak)}{cached}", err=True)


def _write_ratios(path: Path, ratios: list[float], run):
    """MagCache's measured ratios, atomically, for `--cache magcache:FILE`."""
    import json
    import os
    import tempfile

    data = {"mag_ratios": ratios, "steps": run.total, "width": run.width, "height": run.height,
            "note": "per model and scheduler; measured by mlx-qwen-image --cache magcache-calibrate"}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent if str(path.parent) else ".")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
    click.echo(f"wrote MagCache's ratios to {path}", err=True)


def _baked_lightning(root) -> bool:
    """Whether a checkpoint's own scheduler is the Lightning one (a LoRA baked in by ``convert --lightning``)."""
    from .config import read_json
    from .scheduler import LIGHTNING_SCHEDULER_CONFIG

    stored = read_json(root / "scheduler" / "scheduler_config.json")
    return all(stored.get(k) == v for k, v in LIGHTNING_SCHEDULER_CONFIG.items())


def _open_image(path):
    from .image import open_image

    try:
        return open_image(path)
    except ValueError as e:
        raise UsageError(str(e)) from None


@cli.command()
@click.argument("prompt")
@click.option("--model", default="Qwen/Qwen-Image", show_default=True, help="Checkpoint folder or Hub repo id.")
@click.option("--width", type=int, default=None,
              help="Image width (multiple of 16). [default: 1024; with --height alone, that aspect kept]")
@click.option("--height", type=int, default=None,
              help="Image height (multiple of 16). [default: 1024; with --width alone, that aspect kept]")
@click.option("--aspect", type=click.Choice(list(ASPECTS)), default=None, help="An official size preset.")
@click.option("--image", "init_image", default=None, help="img2img: start from this picture.")
@click.option("--strength", type=float, default=0.6, show_default=True,
              help="img2img: how much of the picture is redrawn, in (0, 1].")
@shared_options
@user_errors
def generate(prompt, model, width, height, aspect, init_image, strength, steps, cfg_scale, negative_prompt, seed,
             num_images, output, overwrite, quantize, dtype, low_memory, gguf, text_encoder_bits, loras, cache_spec,
             enhance_prompt, lightning):
    """Generate images from PROMPT (or redraw --image, img2img)."""
    if aspect is not None and (width is not None or height is not None):
        raise UsageError("--aspect sets the size; do not combine it with --width/--height")
    for name, v in (("width", width), ("height", height)):
        if v is not None and (v < 16 or v % 16):
            raise UsageError(f"--{name} {v} is not a multiple of 16; use {_nearest16(v)}")
    if init_image is not None and not 0 < strength <= 1:
        raise UsageError(f"--strength {strength}: must be in (0, 1]")
    picture = _open_image(init_image) if init_image is not None else None
    if aspect:
        width, height = ASPECTS[aspect]
    job = Job(model, steps, cfg_scale, seed, num_images, output, overwrite, quantize, dtype, low_memory, gguf,
              text_encoder_bits, loras, lightning, cache_spec, enhance_prompt)
    job.check_size(job.check_model(edits=False), width, height, image=picture)
    pipe = job.load()
    for path, s in zip(job.paths, job.seeds):
        run = pipe.denoise(**job.prompt(prompt), negative_prompt=negative_prompt, width=width, height=height,
                           steps=job.steps, cfg_scale=job.cfg_scale, seed=s, image=picture,
                           strength=strength if picture is not None else None, cache=job.cache)
        extra = {"image": str(init_image), "strength": strength} if picture is not None else {}
        job.save(run, s, path, job.metadata(run, s, prompt=prompt, **extra))
    job.done()


@cli.command()
@click.argument("prompt")
@click.option("--image", "images", multiple=True, required=True, metavar="FILE",
              help="Input picture (repeat for up to 3 with Edit-2509/2511).")
@click.option("--model", default="Qwen/Qwen-Image-Edit-2509", show_default=True,
              help="Editing checkpoint folder or Hub repo id.")
@click.option("--width", type=int, default=None, help="Output width. [default: last picture's aspect, ~1024x1024]")
@click.option("--height", type=int, default=None,
              help="Output height (multiple of 16). [default: the last picture's aspect, ~1024x1024]")
@shared_options
@user_errors
def edit(prompt, images, model, width, height, steps, cfg_scale, negative_prompt, seed, num_images, output,
         overwrite, quantize, dtype, low_memory, gguf, text_encoder_bits, loras, cache_spec, enhance_prompt,
         lightning):
    """Edit pictures as PROMPT says (Qwen-Image-Edit, Edit-2509, Edit-2511)."""
    for name, v in (("width", width), ("height", height)):
        if v is not None and (v < 16 or v % 16):
            raise UsageError(f"--{name} {v} is not a multiple of 16; use {_nearest16(v)}")
    job = Job(model, steps, cfg_scale, seed, num_images, output, overwrite, quantize, dtype, low_memory, gguf,
              text_encoder_bits, loras, lightning, cache_spec, enhance_prompt)
    variant = job.check_model(edits=True, pictures=len(images))
    pictures = [_open_image(p) for p in images]
    job.check_size(variant, width, height, images=pictures)
    pipe = job.load()
    for path, s in zip(job.paths, job.seeds):
        run = pipe.denoise(**job.prompt(prompt), negative_prompt=negative_prompt, width=width, height=height,
                           steps=job.steps, cfg_scale=job.cfg_scale, seed=s, images=pictures, cache=job.cache)
        job.save(run, s, path, job.metadata(run, s, prompt=prompt, images=", ".join(images)))
    job.done()


@cli.command()
@click.argument("prompt")
@click.option("--model", default="Qwen/Qwen-Image", show_default=True, help="Checkpoint folder or Hub repo id.")
@click.option("--image", "images", multiple=True, metavar="FILE",
              help="A picture to edit (editing checkpoints): the rewrite sees it. Repeatable.")
@click.option("--max-tokens", type=int, default=256, show_default=True, help="At most this many new tokens.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: the most likely tokens.")
@click.option("--top-p", type=float, default=0.9, show_default=True, help="Nucleus size when sampling.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampling.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16", show_default=True,
              help="Weights and activations.")
@click.option("--text-encoder-bits", type=click.Choice(["8"]), default=None, help="Quantize the text encoder on load.")
@user_errors
def enhance(prompt, model, images, max_tokens, temperature, top_p, seed, dtype, text_encoder_bits):
    """Print PROMPT rewritten by the checkpoint's own text encoder (what --enhance-prompt generates from)."""
    from .pipeline import QwenImagePipeline

    if max_tokens < 1:
        raise UsageError(f"--max-tokens {max_tokens}: at least 1")
    if not (math.isfinite(temperature) and temperature >= 0) or not 0 < top_p <= 1:
        raise UsageError("--temperature must be a number of at least 0 and --top-p in (0, 1]")
    pictures = [_open_image(p) for p in images]
    pipe = QwenImagePipeline.from_pretrained(model, dtype=dtype,
                                             text_encoder_bits=int(text_encoder_bits) if text_encoder_bits else None)
    text, stats = pipe.enhance_prompt(prompt, images=pictures or None, max_tokens=max_tokens, temperature=temperature,
                                      top_p=top_p, seed=seed)
    click.echo(text)
    click.echo(f"{stats['tokens']} tokens in {stats['seconds']:.1f} s ({stats['tokens_per_second']:.1f} tokens/s)",
               err=True)


@cli.command("convert")
@click.option("--model", "source", default="Qwen/Qwen-Image", show_default=True,
              help="Source checkpoint: a diffusers-layout folder or Hub repo id.")
@click.option("--output", "-o", required=True, help="New folder for the MLX checkpoint (must not exist).")
@click.option("--bits", type=click.Choice(["4", "8"]), default=None,
              help="Quantize the transformer (mixed recipe). [default: float, in --dtype]")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True,
              help="Weights per quantization scale and bias.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16"]), default="bfloat16", show_default=True,
              help="dtype of the float weights and of the scales.")
@click.option("--text-encoder-bits", type=click.Choice(["8"]), default=None,
              help="Quantize the text encoder's language model too. [default: float]")
@click.option("--lora", "loras", multiple=True, metavar="PATH[:SCALE]",
              help="Bake a LoRA into the transformer before quantization (repeatable).")
@click.option("--lightning", is_flag=True,
              help="Write the Qwen-Image-Lightning scheduler config (for a baked Lightning LoRA).")
@click.option("--gguf", default=None, metavar="FILE",
              help="Take the transformer from a GGUF file, quantized as the file has it; the rest from --model.")
@click.option("--no-lm-head", is_flag=True,
              help="Leave out the text encoder's LM head (1.1 GB in bf16; --enhance-prompt needs it).")
@user_errors
def convert_command(source, output, bits, group_size, dtype, text_encoder_bits, loras, lightning, gguf, no_lm_head):
    """Convert a checkpoint into an MLX one (float, or 4/8-bit transformer) that loads by itself."""
    from .convert import convert
    from .convert.converter import format_summary
    from .lora import parse_lora_arg
    from .scheduler import LIGHTNING_SCHEDULER_CONFIG

    summary = convert(source, output, bits=int(bits) if bits else None, group_size=int(group_size), dtype=dtype,
                      text_encoder_bits=int(text_encoder_bits) if text_encoder_bits else None,
                      log=lambda line: click.echo(line, err=True), loras=[parse_lora_arg(t) for t in loras],
                      scheduler_config=LIGHTNING_SCHEDULER_CONFIG if lightning else None, gguf=gguf,
                      lm_head=not no_lm_head)
    for line in format_summary(summary):
        click.echo(line)


@cli.command()
@click.option("--model", default="Qwen/Qwen-Image", show_default=True, help="Checkpoint folder or Hub repo id.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback should come with --api-key.")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--api-key", default=None, help="Require `Authorization: Bearer KEY` on every API call.")
@click.option("--queue", "queue_size", type=int, default=16, show_default=True,
              help="Requests queued or running at once; more get 429.")
@click.option("--quantize", type=click.Choice(["4", "8"]), default=None, help="Quantize the transformer on load.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16", show_default=True,
              help="Weights and activations; float32 is the reference-exact mode (twice the memory).")
@click.option("--low-memory", is_flag=True, help="Free the text encoder once each prompt is encoded.")
@click.option("--gguf", default=None, metavar="FILE", help="Take the transformer's weights from a GGUF file.")
@click.option("--text-encoder-bits", type=click.Choice(["8"]), default=None,
              help="Quantize the text encoder on load (8-bit: 8.9 GB instead of 14 GB).")
@click.option("--lora", "loras", multiple=True, metavar="PATH[:SCALE]", help="LoRA safetensors file (repeatable).")
@user_errors
def serve(model, host, port, api_key, queue_size, quantize, dtype, low_memory, gguf, text_encoder_bits, loras):
    """Serve a model over HTTP: the OpenAI Images API, an AUTOMATIC1111 subset and a web page."""
    import ipaddress

    from .lora import load_lora, parse_lora_arg

    if queue_size < 1:
        raise UsageError(f"--queue {queue_size}: at least 1")
    if not 0 < port < 65536:
        raise UsageError(f"--port {port}: must be in 1-65535")
    if gguf is not None and not Path(gguf).expanduser().is_file():
        raise UsageError(f"--gguf {gguf}: no such file")
    parsed = [parse_lora_arg(text) for text in loras]
    for path, _ in parsed:
        load_lora(path)
    try:
        local = ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = host == "localhost"
    if not local and not api_key:
        click.echo(f"warning: serving on {host} without --api-key: anyone who can reach it can use it", err=True)
    import uvicorn

    from .jobs import Service
    from .server import create_app

    load = {"quantize": int(quantize) if quantize else None, "dtype": dtype, "loras": parsed, "gguf": gguf,
            "text_encoder_bits": int(text_encoder_bits) if text_encoder_bits else None}
    service = Service(model, load, queue_size=queue_size, api_key=api_key, low_memory=low_memory)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"mlx-qwen-image serving {model} at http://{shown}:{port}/ (the model loads in the background; "
               "Ctrl-C stops)", err=True)
    uvicorn.run(create_app(service), host=host, port=port, log_level="warning")


@cli.command("benchmark", add_help_option=False,
             context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def benchmark_command(args):
    """Speed and memory with random weights: s/step, efficiency against MLX's matmul, CUDA/Mac figures.

    Options as `python -m mlx_qwen_image.benchmarks.bench` (see `mlx-qwen-image benchmark --help`).
    """
    from .benchmarks.bench import main as bench_main

    code = bench_main(list(args), prog="mlx-qwen-image benchmark")
    if code:
        raise SystemExit(code)


def main():
    cli(standalone_mode=True)


if __name__ == "__main__":
    main()
