"""One generate or edit command: the checks before loading, the output paths, progress lines, loading, the loop
over seeds and the report; and how the ranks of a multi-Mac run share that work (``--parallel``).

`UsageError` is the one-line error for anything the user can fix (exit code 1).
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from pathlib import Path

import click

from . import __version__


class UsageError(click.ClickException):
    """One-line error, exit code 1."""


def nearest16(v: int) -> str:
    lo = max(16, v // 16 * 16)
    return f"{lo} or {lo + 16}" if v > lo else str(lo)


def output_paths(output: str | None, seeds: list[int], overwrite: bool, when: float | None = None) -> list[Path]:
    """Where each image goes; refuses existing files (unless ``overwrite``) and unwritable folders up front."""
    if output is None:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(when))
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
    return os.access(folder, os.W_OK | os.X_OK)


def say(text: str):
    """A line on stderr from rank 0 only (the others of a multi-Mac run stay quiet)."""
    from .distributed import rank

    if rank() == 0:
        click.echo(text, err=True)


class Progress:
    """Progress on stderr: one status line rewritten in place on a terminal (step, s/step, ETA), one line per step
    in a log file; and a line when a long phase without steps starts (the text encoder, the pictures, the decode)."""

    PHASES = {"text_encoder": "encoding the prompt", "picture_encode": "encoding the pictures",
              "decode": "decoding the image"}

    def __init__(self, total: int, label: str):
        self.total, self.label = total, label
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()
        from .distributed import rank

        self.quiet = rank() != 0  # in a multi-Mac run, rank 0 alone reports

    def update(self, done: int):
        elapsed = time.perf_counter() - self.start
        per = elapsed / max(done, 1)
        eta = per * (self.total - done)
        bar = "#" * int(20 * done / self.total)
        line = f"{self.label} [{bar:<20}] {done}/{self.total}  {per:6.2f} s/step  ETA {eta:5.0f} s"
        if self.quiet:
            return
        if self.tty:
            click.echo("\r" + line, err=True, nl=done == self.total)
        else:
            click.echo(line, err=True)

    def phase(self, name: str):
        if name == "denoise":  # s/step and the ETA count the steps only
            self.start = time.perf_counter()
        if name in self.PHASES:
            say(f"{self.label}: {self.PHASES[name]}")


def format_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


class Job:
    """The checks and bookkeeping generate and edit share: settings, outputs, loading, the step loop."""

    def __init__(self, model, steps, cfg_scale, seed, num_images, output, overwrite, quantize, dtype, low_memory,
                 gguf, text_encoder_bits, loras, lightning, cache_spec=None, enhance_prompt=False, parallel=None,
                 connect_timeout=60.0, controlnets=()):
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
        from .distributed import agree, connect

        self.group, self.parallel = connect(connect_timeout), parallel
        if parallel is not None and self.group is None:
            raise UsageError(f"--parallel {parallel}: run under mlx.launch (e.g. mlx.launch --hosts mac1,mac2 -- "
                             "mlx-qwen-image generate ...)")
        seed = random.randrange(2**31) if seed is None else seed
        when = time.time()
        if self.group is not None:  # every rank uses rank 0's seed and time stamp
            seed, when = agree(self.group, seed), agree(self.group, int(when))
        self.seeds = [seed + i for i in range(num_images)]
        self.paths = output_paths(output, self.seeds, overwrite, when)
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
        self.controlnets = list(controlnets)  # paths; each one condition
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
            if (edits and not variant.edits) or (not edits and variant.needs_images):
                kind, command = ("an image-editing", "edit --image FILE") if variant.edits else \
                    ("a text-to-image", "generate")
                raise UsageError(f"{self.model} is {kind} checkpoint ({variant.class_name}): use "
                                 f"`mlx-qwen-image {command}`")
            most = variant.max_images
            if self.lightning and not variant.lightning:
                raise UsageError(f"--lightning is the schedule of Qwen-Image's Lightning LoRAs, which do not fit "
                                 f"{variant.name}; leave it out (a Turbo checkpoint brings its own few-step grid)")
        if pictures > most:
            which = f"this checkpoint ({variant.class_name})" if not is_repo_id(self.model) else "the editing models"
            raise UsageError(f"{pictures} pictures given; {which} takes at most {most}")
        return variant

    def check_size(self, variant, width=None, height=None, image=None, images=()):
        """Refuse a size whose activations cannot fit before loading; warn when the whole run may not fit."""
        from .conditioning import output_size
        from .memory import refuse_size, too_large

        m = variant.size_multiple
        for name, v in (("width", width), ("height", height)):
            if v is not None and v % m:
                lo = max(m, v // m * m)
                raise UsageError(f"--{name} {v} is not a multiple of {m} ({variant.name} needs that); use {lo}"
                                 + (f" or {lo + m}" if v > lo else ""))
        cfg = (self.cfg_scale if self.cfg_scale is not None else variant.cfg_scale) > 1
        width, height = output_size(variant, width, height, image, images)
        refusal = refuse_size(width, height, cfg, variant.stream_width, variant.attention_heads)
        if refusal:
            raise UsageError(refusal)
        sizes = [p.size for p in images]
        warning = too_large(self.model, self.quantize, width, height, cfg, self.low_memory, self.dtype,
                            self.text_encoder_bits, variant, self.gguf, pictures=sizes)
        if self.group is not None:
            from .distributed import choose, everyone

            fits = everyone(self.group, warning is None)
            self.parallel = choose(self.parallel, self.group, cfg, len(self.seeds), fits, variant.tensor_parallel,
                                   variant.name)
            size = self.group.size()
            if self.parallel == "tensor":  # the fit that matters: a shard beside the text encoder
                warning = too_large(self.model, self.quantize, width, height, cfg, self.low_memory, self.dtype,
                                    self.text_encoder_bits, variant, self.gguf, ranks=size, pictures=sizes)
            say(f"{size} ranks, --parallel {self.parallel}" +
                {"cfg": ": rank 0 the prompt, rank 1 the negative prompt",
                 "tensor": f": every block split {size} ways", "data": f": the {len(self.seeds)} images spread "
                 "over the ranks"}[self.parallel])
        if warning:
            say(warning)

    def load(self):
        from .pipeline import QwenImagePipeline
        from .scheduler import LIGHTNING_SCHEDULER_CONFIG

        split = self.group is not None and self.parallel in ("cfg", "tensor")
        pipe = QwenImagePipeline.from_pretrained(
            self.model, quantize=self.quantize, dtype=self.dtype, loras=self.loras,
            text_encoder_bits=self.text_encoder_bits, low_memory=self.low_memory, gguf=self.gguf,
            scheduler_config=LIGHTNING_SCHEDULER_CONFIG if self.lightning else None,
            group=self.group if split else None, parallel=self.parallel if split else None,
            controlnets=self.controlnets)
        self.quantization = pipe.quantization
        if self.lightning and not self.loras and not _baked_lightning(pipe.root):
            say("note: --lightning sets the Lightning schedule, which expects the Lightning LoRA (--lora "
                "Qwen-Image-Lightning-...safetensors) or a checkpoint with it baked in")
        return pipe

    def work(self):
        """(path, seed) of the images this rank makes: all of them, or its share under --parallel data."""
        pairs = list(zip(self.paths, self.seeds))
        if self.group is not None and self.parallel == "data":
            return pairs[self.group.rank()::self.group.size()]
        return pairs

    @property
    def writes(self) -> bool:
        """Whether this rank writes its images (rank 0, or every rank its own share under --parallel data)."""
        return self.group is None or self.parallel == "data" or self.group.rank() == 0

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
                say(f"{progress.label}: rewriting the prompt")
            if name == "text_encoder" and "enhance" in run.stats:
                self.enhanced = run.stats["enhance"]["prompts"][0]
                self.enhance_rate = run.stats["enhance"]["tokens_per_second"]
                say(f"enhanced prompt: {self.enhanced}")

        run.on_phase = phase
        if not self.writes:  # another rank writes this image: take part in the steps, skip the decode
            for _ in run:
                pass
            return
        image = run.complete("pil", lambda done, _: progress.update(done))[0]
        if self.enhanced is not None:
            metadata["enhanced_prompt"] = self.enhanced
        save_png(image, path, metadata, overwrite=self.overwrite)
        stats = run.stats
        self.peak = max([self.peak] + [p.get("peak_memory", 0) for p in stats.values() if isinstance(p, dict)])
        times = [f"{label} {stats[name]['seconds']:.1f} s" for name, label in
                 (("text_encoder", "prompt"), ("picture_encode", "pictures"), ("denoise", f"{run.total} steps"),
                  ("decode", "decode")) if name in stats]
        if "prefix_cache" in stats:
            kv = stats["prefix_cache"]
            times.append(f"prefix K/V cache {kv['tokens']} tokens, {kv['bytes'] / 1e9:.2f} GB")
        say(f"saved {path} ({', '.join(times)})")
        if "cache" in stats:
            self.passes += stats["cache"]["passes"]
            self.computed += stats["cache"]["computed"]
            if "mag_ratios" in stats["cache"] and self.calibration_file is not None:
                _write_ratios(self.calibration_file, stats["cache"]["mag_ratios"], run)

    def done(self):
        if self.group is not None:
            from .distributed import barrier

            barrier(self.group)  # rank 0 reports once every rank has written its images
        cached = f", {self.computed} of {self.passes} transformer passes computed in full ({self.cache.label})" \
            if self.cache is not None else ""
        if self.enhance_rate is not None:
            cached += f", prompt rewritten at {self.enhance_rate:.1f} tokens/s"
        ranks = f" on {self.group.size()} ranks (--parallel {self.parallel})" if self.group is not None else ""
        say(f"done: {len(self.paths)} image(s){ranks} in {time.perf_counter() - self.start:.1f} s, "
            f"peak memory {format_bytes(self.peak)}{cached}")


def _write_ratios(path: Path, ratios: list[float], run):
    """MagCache's measured ratios, atomically, for `--cache magcache:FILE`."""
    import json
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


def open_picture(path):
    from .image import open_image

    try:
        return open_image(path)
    except ValueError as e:
        raise UsageError(str(e)) from None

