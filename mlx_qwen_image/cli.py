"""The ``mlx-qwen-image`` command: parse, check, call the library, report. No model logic lives here.

Every error is one line on stderr, never a traceback: exit code 2 for a command line click cannot parse (an
unknown option, a value of the wrong type), 1 for everything else the user can fix (bad sizes, missing or damaged
models, unwritable outputs, a run that produced NaNs), 130 for Ctrl-C. Outputs are written atomically and never
replace an existing file unless asked.
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import click

from . import __version__
from .batch import Job, UsageError, nearest16, open_picture

from .variants import QWEN21_ASPECTS, QWEN_IMAGE_ASPECTS

ASPECT_NAMES = list(dict.fromkeys(name for name, _, _ in QWEN_IMAGE_ASPECTS + QWEN21_ASPECTS))



def user_errors(fn):
    """Turn the library's user-facing errors into one-line CLI errors."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .config import CheckpointError
        from .distributed import DistributedError, rank
        from .pipeline import NonFiniteError

        try:
            return fn(*args, **kwargs)
        except (CheckpointError, ValueError, OSError, NonFiniteError, DistributedError) as e:
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UsageError(f"rank {rank()}: {message}" if rank() else message) from None

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
        click.option("--parallel", type=click.Choice(["cfg", "tensor", "data"]), default=None,
                     help="Under mlx.launch (several Macs): split the run by CFG branch, by tensor (each block "
                          "split over the ranks) or by image. [default: the fastest that fits]"),
        click.option("--connect-timeout", type=click.FloatRange(min=1), default=60.0, show_default=True,
                     help="Under mlx.launch: seconds a rank waits for the others before it stops with a message."),
        click.option("--lightning", type=click.Choice(["4", "8"]), default=None,
                     help="Qwen-Image-Lightning preset: 4 or 8 steps, CFG 1 and the Lightning scheduler "
                          "(pass the Lightning LoRA with --lora, or a model with it baked in)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn



@cli.command()
@click.argument("prompt")
@click.option("--model", default="Qwen/Qwen-Image", show_default=True, help="Checkpoint folder or Hub repo id.")
@click.option("--width", type=int, default=None,
              help="Image width (multiple of 16). [default: 1024; with --height alone, that aspect kept]")
@click.option("--height", type=int, default=None,
              help="Image height (multiple of 16). [default: 1024; with --width alone, that aspect kept]")
@click.option("--aspect", type=click.Choice(ASPECT_NAMES), default=None,
              help="A size preset of the model (Qwen-Image: its published sizes; 2.1: about 1 Mpx, -2k: 4 Mpx).")
@click.option("--image", "init_image", default=None, help="img2img: start from this picture.")
@click.option("--strength", type=float, default=0.6, show_default=True,
              help="img2img: how much of the picture is redrawn, in (0, 1].")
@click.option("--mask", default=None, metavar="FILE",
              help="Inpainting with --image: repaint where the mask is white (or transparent, in an RGBA mask).")
@click.option("--mask-blur", type=click.FloatRange(min=0), default=0.0,
              help="Gaussian blur radius (px) applied to --mask first.")
@click.option("--mask-crop", type=click.IntRange(min=0), default=None, metavar="PX",
              help="Inpaint only the region around --mask (PX wider), at the output size, then paste it back into "
                   "the picture at its own size.")
@click.option("--controlnet", "controlnets", multiple=True, metavar="PATH[:SCALE]",
              help="A ControlNet folder or Hub repo id with its conditioning scale (repeatable: one per "
                   "--control-image; repeat one net for several conditions on the Union model).")
@click.option("--control-image", "control_images", multiple=True, metavar="FILE",
              help="The control picture (pose, depth, canny, soft edges) of each --controlnet, in order.")
@click.option("--control-start", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Fraction of the steps after which the ControlNets start to guide.")
@click.option("--control-end", type=click.FloatRange(0, 1), default=1.0, show_default=True,
              help="Fraction of the steps after which they stop.")
@shared_options
@user_errors
def generate(prompt, model, width, height, aspect, init_image, strength, mask, mask_blur, mask_crop, controlnets,
             control_images, control_start, control_end, steps, cfg_scale, negative_prompt, seed, num_images,
             output, overwrite, quantize, dtype, low_memory, gguf, text_encoder_bits, loras, cache_spec,
             enhance_prompt, parallel, connect_timeout, lightning):
    """Generate images from PROMPT (or redraw --image, img2img; with --mask, inpaint it; with --controlnet,
    guided by control pictures)."""
    if controlnets and not control_images:
        raise UsageError("--controlnet needs --control-image (one per --controlnet)")
    if control_images and not controlnets:
        raise UsageError("--control-image needs --controlnet, the ControlNet that reads it")
    if controlnets and len(controlnets) != len(control_images):
        raise UsageError(f"{len(controlnets)} --controlnet for {len(control_images)} --control-image: give one each")
    from .lora import parse_lora_arg

    nets = [parse_lora_arg(text, "--controlnet") for text in controlnets]
    check_controlnet_paths(path for path, _ in nets)
    if mask is not None and init_image is None and not controlnets:
        raise UsageError("--mask needs --image, the picture it applies to")
    if aspect is not None and (width is not None or height is not None):
        raise UsageError("--aspect sets the size; do not combine it with --width/--height")
    for name, v in (("width", width), ("height", height)):
        if v is not None and (v < 16 or v % 16):
            raise UsageError(f"--{name} {v} is not a multiple of 16; use {nearest16(v)}")
    if init_image is not None and not 0 < strength <= 1:
        raise UsageError(f"--strength {strength}: must be in (0, 1]")
    picture = open_picture(init_image) if init_image is not None else None
    region = open_picture(mask) if mask is not None else None
    controls = [open_picture(p) for p in control_images]
    job = Job(model, steps, cfg_scale, seed, num_images, output, overwrite, quantize, dtype, low_memory, gguf,
              text_encoder_bits, loras, lightning, cache_spec, enhance_prompt, parallel, connect_timeout,
              controlnets=[path for path, _ in nets])
    variant = job.check_model(edits=False)
    refuse_unavailable(variant, region, nets)
    if picture is not None and not variant.img2img:
        raise UsageError(f"{variant.name} does not redraw a picture (img2img); to edit it, use `mlx-qwen-image edit "
                         f"PROMPT --image {init_image}`" if variant.edits else
                         f"{variant.name} does not redraw a picture (img2img); it does {variant.tasks}")
    if aspect:
        sizes = {name: (w, h) for name, w, h in variant.aspects}
        if aspect not in sizes:
            raise UsageError(f"--aspect {aspect} is not a preset of {variant.name}; use one of {', '.join(sizes)}")
        width, height = sizes[aspect]
    job.check_size(variant, width, height, image=picture)
    pipe = job.load()
    for path, s in job.work():
        run = pipe.denoise(**job.prompt(prompt), negative_prompt=negative_prompt, width=width, height=height,
                           steps=job.steps, cfg_scale=job.cfg_scale, seed=s, image=picture,
                           strength=strength if picture is not None else None, cache=job.cache, mask=region,
                           mask_blur=mask_blur, mask_crop=mask_crop, control_images=controls or None,
                           control_scale=[scale for _, scale in nets] or None, control_start=control_start,
                           control_end=control_end)
        extra = {"image": str(init_image), "strength": strength} if picture is not None else {}
        if region is not None:
            extra.update(mask=str(mask), mask_blur=mask_blur, **({"mask_crop": mask_crop} if mask_crop else {}))
        if nets:
            extra.update(controlnets=", ".join(f"{p}:{c:g}" for p, c in nets), control_images=", ".join(control_images),
                         control_window=f"{control_start:g}-{control_end:g}")
        job.save(run, s, path, job.metadata(run, s, prompt=prompt, **extra))
    job.done()


def check_controlnet_paths(paths):
    """A missing --controlnet folder refused now, not after minutes of loading the model."""
    from .loading import is_repo_id

    for path in paths:
        if not is_repo_id(path) and not Path(path).expanduser().is_dir():
            raise UsageError(f"--controlnet {path}: no such folder (a ControlNet folder or a Hub repo id)")


def refuse_unavailable(variant, mask, controlnets):
    """Inpainting and ControlNets refused before loading on a checkpoint that has neither."""
    if mask is not None and not variant.inpainting:
        raise UsageError(f"--mask: inpainting is not available for {variant.name}")
    if controlnets and not variant.controlnet:
        raise UsageError(f"--controlnet: ControlNets are not available for {variant.name}")


@cli.command()
@click.argument("prompt")
@click.option("--image", "images", multiple=True, required=True, metavar="FILE",
              help="Input picture (repeat: up to 3 with Edit-2509/2511, up to 10 with Qwen-Image 2.1).")
@click.option("--model", default="Qwen/Qwen-Image-Edit-2509", show_default=True,
              help="Editing checkpoint folder or Hub repo id.")
@click.option("--width", type=int, default=None, help="Output width. [default: last picture's aspect, ~1024x1024]")
@click.option("--height", type=int, default=None,
              help="Output height (multiple of 16). [default: the last picture's aspect, ~1024x1024]")
@click.option("--mask", default=None, metavar="FILE",
              help="Inpaint the last picture: repaint where the mask is white (or transparent, in an RGBA mask).")
@click.option("--mask-blur", type=click.FloatRange(min=0), default=0.0,
              help="Gaussian blur radius (px) applied to --mask first.")
@click.option("--strength", type=float, default=None,
              help="With --mask: how much of the masked region is redrawn, in (0, 1]. [default: 0.6]")
@shared_options
@user_errors
def edit(prompt, images, model, width, height, mask, mask_blur, strength, steps, cfg_scale, negative_prompt, seed,
         num_images, output, overwrite, quantize, dtype, low_memory, gguf, text_encoder_bits, loras, cache_spec,
         enhance_prompt, parallel, connect_timeout, lightning):
    """Edit pictures as PROMPT says (Qwen-Image-Edit, Edit-2509, Edit-2511, Qwen-Image 2.1)."""
    for name, v in (("width", width), ("height", height)):
        if v is not None and (v < 16 or v % 16):
            raise UsageError(f"--{name} {v} is not a multiple of 16; use {nearest16(v)}")
    job = Job(model, steps, cfg_scale, seed, num_images, output, overwrite, quantize, dtype, low_memory, gguf,
              text_encoder_bits, loras, lightning, cache_spec, enhance_prompt, parallel, connect_timeout)
    if strength is not None and mask is None:
        raise UsageError("--strength applies with --mask (inpainting) only")
    if strength is not None and not 0 < strength <= 1:
        raise UsageError(f"--strength {strength}: must be in (0, 1]")
    variant = job.check_model(edits=True, pictures=len(images))
    pictures = [open_picture(p) for p in images]
    region = open_picture(mask) if mask is not None else None
    refuse_unavailable(variant, region, ())
    job.check_size(variant, width, height, images=pictures)
    pipe = job.load()
    for path, s in job.work():
        run = pipe.denoise(**job.prompt(prompt), negative_prompt=negative_prompt, width=width, height=height,
                           steps=job.steps, cfg_scale=job.cfg_scale, seed=s, images=pictures, cache=job.cache,
                           mask=region, mask_blur=mask_blur, strength=strength)
        extra = {"mask": str(mask), "mask_blur": mask_blur, "strength": strength or 0.6} if region is not None else {}
        job.save(run, s, path, job.metadata(run, s, prompt=prompt, images=", ".join(images), **extra))
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
    pictures = [open_picture(p) for p in images]
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
@click.option("--controlnet", is_flag=True,
              help="--model is a ControlNet (config.json and safetensors): convert it, --bits with the "
                   "transformer's recipe.")
@user_errors
def convert_command(source, output, bits, group_size, dtype, text_encoder_bits, loras, lightning, gguf, no_lm_head,
                    controlnet):
    """Convert a checkpoint into an MLX one (float, or 4/8-bit transformer) that loads by itself."""
    from .convert import convert
    from .convert.converter import convert_controlnet, format_summary
    from .lora import parse_lora_arg
    from .scheduler import LIGHTNING_SCHEDULER_CONFIG

    if controlnet:
        if text_encoder_bits or loras or lightning or gguf or no_lm_head:
            raise UsageError("--controlnet converts the ControlNet alone: only --bits, --group-size and --dtype "
                             "apply")
        summary = convert_controlnet(source, output, bits=int(bits) if bits else None, group_size=int(group_size),
                                     dtype=dtype, log=lambda line: click.echo(line, err=True))
        for line in format_summary(summary):
            click.echo(line)
        return
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
@click.option("--controlnet", "controlnets", multiple=True, metavar="PATH",
              help="A ControlNet folder or Hub repo id (repeatable, one per condition); requests then send "
                   "control_image.")
@user_errors
def serve(model, host, port, api_key, queue_size, quantize, dtype, low_memory, gguf, text_encoder_bits, loras,
          controlnets):
    """Serve a model over HTTP: the OpenAI Images API, an AUTOMATIC1111 subset and a web page."""
    import ipaddress

    from .distributed import launched
    from .lora import load_lora, parse_lora_arg

    if launched():
        raise UsageError("serve runs on one Mac: start it without mlx.launch (serving over several Macs is not "
                         "supported yet; generate and edit are)")
    if queue_size < 1:
        raise UsageError(f"--queue {queue_size}: at least 1")
    if not 0 < port < 65536:
        raise UsageError(f"--port {port}: must be in 1-65535")
    if gguf is not None and not Path(gguf).expanduser().is_file():
        raise UsageError(f"--gguf {gguf}: no such file")
    parsed = [parse_lora_arg(text) for text in loras]
    for path, _ in parsed:
        load_lora(path)
    check_controlnet_paths(controlnets)
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
            "text_encoder_bits": int(text_encoder_bits) if text_encoder_bits else None,
            "controlnets": list(controlnets)}
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
