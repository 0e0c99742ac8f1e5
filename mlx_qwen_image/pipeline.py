"""QwenImagePipeline: one entry point for every supported checkpoint, one verb, one denoising core.

``from_pretrained`` reads the checkpoint's variant from the registry (`variants`); ``generate`` (or ``denoise`` for
step-by-step control) checks the request, a builder in `conditioning` turns it into a `Conditioning`, and
`_steps`, the one core loop, denoises it with the scheduler's `Schedule`; ``decode`` turns latents into pictures.

Runs are stateless: a `Run` carries its own request, schedule, latents and stats. A pipeline may be called from
several threads: runs are serialized by a lock inside it and all MLX work happens on the process's MLX owner
thread (`runtime`), so that lazily loaded weights are always evaluated where they were made.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import memory, runtime
from .conditioning import (Conditioning, Request, builder, check_prompts, edit_pictures, make_request,
                           pictures_list)
from .config import naming, read_json
from .image import array_to_numpy, array_to_pil, pil_to_array
from .image_processor import QwenImageProcessor
from .loading import TimestepSource, gguf_transformer, load_model, quantize_model, sample_sigmas
from .prompts import MAX_SEQUENCE_LENGTH, FeatureCache, PromptEncoder
from .run import NonFiniteError, Run, check_finite, phase_start, record_phase  # noqa: F401 (NonFiniteError: API)
from .quantize import is_quantized, quantized_bits
from .scheduler import scheduler_from_config
from .tokenizer import QwenTokenizer
from .variants import DEFAULT_TEXT_TO_IMAGE, Variant, locate

DEFAULT_MODEL = "Qwen/Qwen-Image"
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


def _dtype(dtype) -> mx.Dtype:
    if isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def guided(cond: mx.array, uncond: mx.array, scale: float, rescale: bool = True) -> mx.array:
    """True CFG; with ``rescale`` (Qwen-Image) rescaled per token to the conditional prediction's norm, as the
    reference does (2.1 uses the plain combination)."""
    cond, uncond = cond.astype(mx.float32), uncond.astype(mx.float32)
    comb = uncond + scale * (cond - uncond)
    if not rescale:
        return comb
    return comb * (mx.linalg.norm(cond, axis=-1, keepdims=True) / mx.linalg.norm(comb, axis=-1, keepdims=True))


class QwenImagePipeline:
    def __init__(self, transformer=None, vae=None, text_encoder=None, tokenizer=None, scheduler=None,
                 variant: Variant = DEFAULT_TEXT_TO_IMAGE, processor: QwenImageProcessor | None = None,
                 low_memory: bool = False, timestep_source=None):
        """Components whose arrays the MLX owner thread can evaluate (made through ``runtime.call``, or already
        evaluated); `from_pretrained` is the usual way in. ``timestep_source`` (``weights(model) -> dict``) gives
        back the timestep-path weights that low-memory runs free; without one they are never freed."""
        self.transformer, self.vae = transformer, vae
        self.prompts = PromptEncoder(variant, tokenizer, text_encoder, processor)
        self.scheduler = scheduler or scheduler_from_config({})
        self.variant = variant
        self.low_memory = low_memory  # the default of every run's low_memory: free the text encoder after encoding
        # Free the timestep-path weights (6.8B parameters at full size) for every run's loop; they come back lazily.
        self.free_timestep_weights = True
        self.loras: list[tuple] = []  # (source, scale) applied through this pipeline
        self._lock = threading.RLock()
        self._timestep_source = timestep_source
        self.root: Path | None = None  # the checkpoint folder, when loaded from one
        self.sample_sigmas: tuple[float, ...] | None = None  # the checkpoint's own sampling grid (2.1-Turbo)
        self.group, self.parallel = None, None  # an mx.distributed group and how runs split over it
        self.controlnet = None  # `models.controlnet.QwenImageMultiControlNet`, from from_pretrained(controlnets=)

    # The text side lives in `prompts`; these are its parts under the names diffusers users know.
    text_encoder = property(lambda self: self.prompts.text_encoder,
                            lambda self, model: setattr(self.prompts, "text_encoder", model))
    tokenizer = property(lambda self: self.prompts.tokenizer)
    processor = property(lambda self: self.prompts.processor)

    @property
    def prompt_cache(self) -> FeatureCache | None:
        """Text features of the last request; ``pipe.prompt_cache = None`` turns caching off."""
        return self.prompts.cache

    @prompt_cache.setter
    def prompt_cache(self, cache: FeatureCache | None):
        self.prompts.cache = cache

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path = DEFAULT_MODEL, quantize: int | None = None,
                        dtype="bfloat16", loras=(), text_encoder_bits: int | None = None,
                        scheduler_config: dict | None = None, low_memory: bool = False,
                        gguf: str | Path | None = None, group=None, parallel: str | None = None,
                        controlnets=()) -> "QwenImagePipeline":
        """Load any supported checkpoint (a local diffusers-layout folder or a Hub repo id); weights load lazily.

        ``loras``: (path, scale) pairs, fused into the float weights before ``quantize`` applies (on an already
        quantized checkpoint they run beside the quantized layers). ``text_encoder_bits=8`` quantizes the text
        encoder's language model on load. ``scheduler_config`` replaces the checkpoint's (e.g.
        ``scheduler.LIGHTNING_SCHEDULER_CONFIG``). ``low_memory``: the default memory policy of runs. ``gguf``: a
        GGUF file the transformer's weights come from (everything else comes from the checkpoint folder).
        ``group`` (`distributed.connect()`) and ``parallel`` ("cfg", "tensor" or "data"): how runs split over the
        ranks of several Macs (`distributed`); "tensor" shards the transformer as it loads. ``controlnets``:
        ControlNet folders or Hub repo ids (one per condition; the same one repeated for several conditions on the
        Union model), quantized as the transformer under ``quantize`` (`control`).
        """
        if quantize not in (None, 4, 8):
            raise ValueError(f"quantize must be None, 4 or 8, got {quantize!r}")
        if text_encoder_bits not in (None, 8):
            raise ValueError(f"text_encoder_bits must be None or 8, got {text_encoder_bits!r} (at 4 bits the text "
                             "features change by 20-50% on the measured models)")
        dt = _dtype(dtype)
        root, variant = locate(path_or_repo_id, config_only=("transformer",) if gguf is not None else ())
        cls._check_variant(root, variant)
        scheduler_file = root / "scheduler" / "scheduler_config.json"
        with naming("scheduler_config" if scheduler_config is not None else scheduler_file):
            scheduler = scheduler_from_config(scheduler_config if scheduler_config is not None
                                              else read_json(scheduler_file))
        if parallel is not None and group is None:
            raise ValueError(f"parallel={parallel!r} needs a group of ranks (distributed.connect() under mlx.launch)")
        pipe = runtime.call(cls._load, root, variant, dt, quantize, list(loras), text_encoder_bits, scheduler,
                            None if gguf is None else Path(gguf).expanduser(), group if parallel == "tensor" else None)
        pipe.low_memory = low_memory
        pipe.group, pipe.parallel = group, parallel
        if controlnets:
            if not variant.controlnet:
                raise ValueError(f"ControlNets are not available for {variant.name}")
            if group is not None:
                raise ValueError("ControlNets do not run split over several Macs yet; run on one")
            from .control import load_controlnets

            pipe.controlnet = runtime.call(load_controlnets, list(controlnets), dt, quantize, pipe.transformer)
        return pipe

    @classmethod
    def _check_variant(cls, root: Path, variant: Variant):
        """Subclasses that serve only some variants refuse the others here, before anything loads."""

    @classmethod
    def _load(cls, root, variant, dtype, quantize, loras, text_encoder_bits, scheduler,
              gguf_file=None, shard_over=None) -> "QwenImagePipeline":
        if gguf_file is not None:
            transformer, source = gguf_transformer(variant, root, gguf_file, dtype, quantize)
        else:
            transformer = load_model(variant.model_class("transformer"), root / "transformer", dtype)
            source = TimestepSource(root / "transformer", dtype, loras)
        stored = quantized_bits(transformer)
        if quantize and stored and quantize != stored:
            raise ValueError(f"{root} is already quantized ({stored}-bit): quantize={quantize} cannot change that; "
                             "leave it out, or convert from the float checkpoint")
        if not source.fuses_loras:  # marked before the LoRAs: the layers they change are then never freed
            transformer.mark_timestep_path()
        if loras:
            from .lora import apply_lora

            apply_lora(transformer, loras)
        if quantize and not is_quantized(transformer):
            quantize_model(transformer, bits=quantize)
        if shard_over is not None:
            from .distributed import shard_transformer

            shard_transformer(transformer, shard_over)  # the timestep path stays whole: it is freed for the loop
        if source.fuses_loras:
            transformer.mark_timestep_path()
        pipe = cls(
            transformer=transformer,
            vae=load_model(variant.model_class("vae"), root / "vae", dtype),
            tokenizer=QwenTokenizer.from_pretrained(variant.tokenizer_folder(root)),
            scheduler=scheduler,
            variant=variant,
            processor=QwenImageProcessor.from_pretrained(root / "processor") if variant.vision else None,
        )
        pipe.prompts.source = (root / "text_encoder", dtype, text_encoder_bits)
        if shard_over is not None:  # the memory mode: rank 0 alone holds the text encoder
            pipe.prompts.share = shard_over
        if shard_over is None or shard_over.rank() == 0:
            pipe.prompts.load()
        pipe._timestep_source = source
        pipe.loras = list(loras)
        pipe.root = root
        pipe.sample_sigmas = sample_sigmas(root)
        return pipe

    @property
    def quantization(self) -> str:
        """The transformer's quantization as it runs ("4-bit", "8-bit" or "none"), however it came about."""
        bits = quantized_bits(self.transformer)
        return f"{bits}-bit" if bits else "none"

    def load_lora(self, path, scale: float = 1.0) -> int:
        """Apply a LoRA (safetensors) to the transformer; several LoRAs add up. Returns the layers changed."""
        with self._lock:
            return runtime.call(self._load_lora, path, scale)

    def _load_lora(self, path, scale):
        from .lora import apply_lora

        reloadable = self.transformer.timestep_path_marked
        changed = apply_lora(self.transformer, [(path, scale)])
        self.loras.append((path, scale))
        source = self._timestep_source
        if reloadable and source is not None and source.fuses_loras:  # the reload source learns the new LoRA too
            self._timestep_source.loras.append((path, scale))
            self.transformer.mark_timestep_path()
        return changed

    # -- text ----------------------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | list[str], images=None, max_sequence_length: int = MAX_SEQUENCE_LENGTH):
        """Text features ``(B, L, hidden)`` and their mask ``(B, L)`` (1 = token, 0 = right padding); on an editing
        checkpoint ``images`` are the pictures, prepared for the vision tower as a run prepares them.

        Equal to diffusers' ``encode_prompt`` whenever a prompt fits in ``max_sequence_length`` features. A longer
        prompt loses its last tokens (not the closing template tokens, as in diffusers), with a warning.
        """
        prompts = check_prompts(prompt)
        pictures = None
        if images is not None:
            pictures = edit_pictures(self.variant, pictures_list(images, self.variant))[0]
        with self._lock:
            return runtime.call(self.prompts.encode, prompts, pictures, max_sequence_length)

    def text_features(self, rows: list[str], pictures=None):
        """Evaluated features of a text-encoder batch (the builders' entry; on the MLX owner thread)."""
        return self.prompts.features(rows, pictures)

    def free_text_encoder(self):
        """Drop the text encoder's weights; it is reloaded (lazily) the next time a prompt is encoded."""
        self.prompts.free()

    # -- pictures ------------------------------------------------------------------------------------------

    def encode_image(self, image) -> mx.array:
        """A picture at its own size (sides multiples of 16) -> normalised packed latents ``(1, (H/16)(W/16), C)``
        (the VAE's latent mean)."""
        x = pil_to_array(image, dtype=self.vae.dtype, mode=self.vae.image_mode)
        return self.vae.pack(self.vae.normalize_latents(self.vae.encode(x)).astype(mx.float32))

    # -- runs ----------------------------------------------------------------------------------------------

    def denoise(self, prompt, negative_prompt=None, width=None, height=None, steps=None, cfg_scale=None, seed=0,
                latents=None, images=None, image=None, strength=None, low_memory=None, hooks=(), cache=None,
                enhance_prompt=False, mask=None, mask_blur=None, control_images=None, control_scale=None,
                control_start=None, control_end=None, mask_crop=None) -> Run:
        """A `Run` of ``generate``'s request: iterate it for the evaluated latents after each step, then
        ``run.complete()`` decodes. Everything about the request is checked here, before any work."""
        fixed = self.scheduler.fixed_steps or (len(self.sample_sigmas) if self.sample_sigmas else None)
        request = make_request(self.variant, self.transformer.config.in_channels, fixed,
                               prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
                               steps=steps, cfg_scale=cfg_scale, seed=seed, latents=latents, images=images,
                               image=image, strength=strength, hooks=hooks, cache=cache,
                               enhance_prompt=enhance_prompt, mask=mask, mask_blur=mask_blur,
                               controlnet=self.controlnet, control_images=control_images, control_scale=control_scale,
                               control_start=control_start, control_end=control_end, mask_crop=mask_crop)
        config = self.transformer.config
        message = memory.refuse_size(request.width, request.height, request.cfg_scale > 1, config.inner_dim,
                                     config.num_attention_heads)
        if message:
            raise ValueError(message)
        schedule = self.scheduler.schedule(request.steps, (request.height // 16) * (request.width // 16),
                                           request.strength, self.sample_sigmas)
        return Run(self, request, schedule, self.low_memory if low_memory is None else low_memory)

    def sample(self, conditioning: Conditioning, steps: int, seed: int = 0, latents=None, low_memory=None,
               cache=None) -> Run:
        """A `Run` of the core loop on a prebuilt `Conditioning` (what the builders make; the benchmark and
        parallel runs build their own)."""
        c = conditioning
        if latents is not None:
            latents = latents if isinstance(latents, mx.array) else mx.array(np.asarray(latents, dtype=np.float32))
            mx.eval(latents)
        request = Request(("",) * c.batch, ("",) * c.batch if c.cfg else None, c.width, c.height, steps,
                          c.cfg_scale, seed, latents, strength=c.strength, hooks=c.hooks, cache=cache)
        schedule = self.scheduler.schedule(steps, c.image_tokens, c.strength, self.sample_sigmas)
        return Run(self, request, schedule, self.low_memory if low_memory is None else low_memory, conditioning)

    def generate(self, prompt, negative_prompt=None, width=None, height=None, steps=None, cfg_scale=None, seed=0,
                 latents=None, output="pil", images=None, image=None, strength=None, low_memory=None, hooks=(),
                 cache=None, enhance_prompt=False, progress=None, mask=None, mask_blur=None, control_images=None,
                 control_scale=None, control_start=None, control_end=None, mask_crop=None):
        """Images for ``prompt`` (a string: one image; a list: one per prompt, seeds ``seed``, ``seed + 1`` ...).

        ``images=[...]``: the pictures an editing checkpoint edits. ``image=`` with ``strength=`` (default 0.6):
        img2img on a text-to-image checkpoint. Steps, CFG scale and size default to the checkpoint's (size: the
        (last) picture's aspect at about 1024x1024 when there is one). ``progress(done, total)`` is called after
        each step. ``cache``: a step cache (`mlx_qwen_image.cache`). ``enhance_prompt``: rewrite the prompt first with
        the text encoder run as a chat model (True, or a dict of `enhance.rewrite` options; the rewrite is in the
        run's ``stats["enhance"]``). ``mask=`` (a picture or a path: white, or transparent in an RGBA mask, where
        the picture is repainted; ``mask_blur`` a Gaussian radius; ``mask_crop`` N: only the region around the mask,
        N pixels wider, is inpainted at the output size, then pasted back into the picture at its own size) with
        ``image=`` or ``images=``: inpainting, the rest of the picture kept (`inpaint`). ``control_images`` (one
        per condition) with ``control_scale``, ``control_start``, ``control_end`` (numbers, or one per condition):
        the ControlNets of `from_pretrained` (`control`; with the inpainting ControlNet, ``mask=`` marks what its
        picture repaints). What a checkpoint cannot do is refused with a ``ValueError`` saying what it can do.
        """
        if output not in ("pil", "np"):
            raise ValueError(f"output must be 'pil' or 'np', got {output!r}")
        run = self.denoise(prompt, negative_prompt, width, height, steps, cfg_scale, seed, latents, images, image,
                           strength, low_memory, hooks, cache, enhance_prompt, mask, mask_blur, control_images,
                           control_scale, control_start, control_end, mask_crop)
        pictures = run.complete(output, progress)
        return pictures[0] if isinstance(prompt, str) else pictures

    def edit(self, prompt, images, **kwargs):
        """``generate(prompt, images=images, ...)``, kept for the editing API of earlier versions."""
        return self.generate(prompt, images=images, **kwargs)

    def _steps(self, run: Run):
        """The core loop, on the MLX owner thread: build the conditioning, then one transformer call per step
        ([cond; uncond] stacked under CFG), the Euler step, the hooks; yields the evaluated latents."""
        req, schedule, stats = run.request, run.schedule, run.stats
        @contextlib.contextmanager
        def phase(name):
            run.tell(name)
            start = phase_start()
            yield
            if name == "text_encoder" and run.low_memory:  # staged: never beside the transformer's loop
                self.free_text_encoder()
            record_phase(stats, name, start)

        with runtime.wired_limit():
            if req.enhance is not None and run.conditioning is None:
                req = self._enhance(req, phase, stats)
            cond = run.conditioning or builder(req)(self, req, phase)
            if req.control is not None and cond.control is None:
                from .control import control_latents

                with phase("control_encode"):
                    cond.control = control_latents(self, req)
                    mx.eval(cond.control)
            run.tell("denoise")
            start = phase_start()
            x = noise = self._noise(req, cond.image_tokens)
            if cond.start is not None:
                x = self.scheduler.add_noise(cond.start, x, schedule)
            model, batch = self.transformer, cond.batch
            # Freed only when the model still holds what the source gives back (a LoRA fused another way stays).
            drop = self.free_timestep_weights and self._timestep_source is not None and model.timestep_path_marked
            table = model.modulation_table(schedule.timesteps, drop_weights=drop)
            stats["modulation_table"] = {"seconds": time.perf_counter() - start, "peak_memory": mx.get_peak_memory()}
            rows = 2 * batch if cond.cfg else batch
            reference = None
            if cond.reference is not None:
                reference = mx.broadcast_to(cond.reference.astype(model.dtype), (batch, *cond.reference.shape[1:]))
            img_shapes, step_seconds = [cond.segments] * rows, []
            inputs = self._model_inputs(model, cond)
            residuals = None
            if cond.control is not None:
                from .control import Residuals

                residuals = Residuals(self.controlnet, req.control, cond.control, schedule.timesteps, schedule.steps)
            branch = self._branch(cond)
            branches = 2 if cond.cfg and branch is None else 1
            cache = None if req.cache is None else req.cache.start(schedule.steps, batch, branches)
            hooks = ((cache,) if cache is not None else ()) + tuple(cond.hooks)
            if cond.repaint is not None:  # inpainting: the kept region is the picture's, noised to each next sigma
                from .inpaint import Blend

                hooks += (Blend(cond.start, noise, cond.repaint),)
            try:
                for i in range(schedule.steps):
                    t0 = time.perf_counter()
                    step_inputs = inputs
                    if residuals is not None:  # the same residuals for the conditional and unconditional rows
                        samples = residuals(i, x, cond.embeds, cond.mask, schedule.timesteps[i], img_shapes, rows)
                        step_inputs = inputs if samples is None else {**inputs, "controlnet_block_samples": samples}
                    compute = partial(self._velocity, model, x, cond, reference, img_shapes, table[i],
                                      schedule.timesteps[i], rows, cache, branch, step_inputs)
                    for hook in reversed(hooks):
                        compute = partial(hook.predict, i, float(schedule.sigmas[i]), compute)
                    x = self.scheduler.step(x, compute(), schedule, i)
                    for hook in hooks:
                        x = hook.after_step(i, x, float(schedule.sigmas[i + 1]))
                    mx.eval(x)
                    step_seconds.append(time.perf_counter() - t0)
                    yield x
            finally:
                if drop:  # lazy: read from disk again only when the next run's table needs them
                    model.restore_modulation_weights(self._timestep_source.weights(model))
                stats["steps"] = step_seconds
                prefix = inputs.get("kv_cache")
                if prefix is not None and prefix.filled:  # (rows, text + condition tokens), and what it holds
                    stats["prefix_cache"] = {"tokens": prefix.shape[1], "bytes": prefix.nbytes}
                if cache is not None:
                    stats["cache"] = cache.finish()
                record_phase(stats, "denoise", start)

    def _enhance(self, req: Request, phase, stats: dict) -> Request:
        """The request with its prompts rewritten (in the text-encoder phase: the same weights, loaded once)."""
        pictures = edit_pictures(self.variant, req.images)[0] if req.images else None
        rewritten, tokens, seconds = [], 0, 0.0
        with phase("enhance"):
            for prompt in req.prompts:
                text, info = self.prompts.enhance(prompt, pictures, **req.enhance)
                rewritten.append(text)
                tokens, seconds = tokens + info["tokens"], seconds + info["seconds"]
        stats["enhance"].update(prompts=rewritten, tokens=tokens, tokens_per_second=tokens / max(seconds, 1e-9))
        return dataclasses.replace(req, prompts=tuple(rewritten))

    def enhance_prompt(self, prompt: str, images=None, **options) -> tuple[str, dict]:
        """``prompt`` rewritten (pictures: an editing checkpoint's, which the rewrite sees) and the decoding stats."""
        prompt = check_prompts(prompt)[0]
        pictures = edit_pictures(self.variant, pictures_list(images, self.variant))[0] if images is not None else None
        with self._lock:
            return runtime.call(self.prompts.enhance, prompt, pictures, **options)

    def _model_inputs(self, model, cond: Conditioning) -> dict:
        """What a family's transformer takes beyond the shared arguments, for one run: 2.1's image slots in the
        text sequence and its prefix K/V cache (filled by the first step, exact for the others)."""
        inputs = {}
        if cond.slots is not None:
            inputs["img_mask"] = cond.slots
        if hasattr(model, "prefix_cache"):
            inputs["kv_cache"] = model.prefix_cache()
        return inputs

    def _velocity(self, model, x, cond, reference, img_shapes, modulations, timestep, rows, cache=None,
                  branch=None, inputs=None) -> mx.array:
        """One step's velocity: [cond; uncond] in one batched call, or under CFG-parallel (``branch`` = (this
        rank's text features, mask, group)) this rank's branch, then the other's through one all-gather. The edit
        pictures' latents go after the image (Qwen-Image) or before it (2.1); only the image's velocity is kept."""
        variant, inputs = self.variant, inputs or {}
        inp = x.astype(model.dtype)
        if reference is not None:
            inp = mx.concatenate([reference, inp] if variant.references_first else [inp, reference], axis=1)
        if branch is not None:
            embeds, mask, group = branch
            t = mx.full((cond.batch,), timestep, dtype=mx.float32)
            v = model(inp, embeds, mask, t, img_shapes[: cond.batch], modulations=modulations, cache=cache, **inputs)
            v = mx.distributed.all_gather(v[:, : cond.image_tokens], group=group)  # rank order: [cond; uncond]
            return guided(v[: cond.batch], v[cond.batch:], cond.cfg_scale, variant.cfg_rescale)
        t = mx.full((rows,), timestep, dtype=mx.float32)
        v = model(mx.concatenate([inp, inp]) if cond.cfg else inp, cond.embeds, cond.mask, t, img_shapes,
                  modulations=modulations, cache=cache, **inputs)
        if reference is not None and not variant.references_first:
            v = v[:, : cond.image_tokens]
        return guided(v[: cond.batch], v[cond.batch:], cond.cfg_scale, variant.cfg_rescale) if cond.cfg else v

    def _branch(self, cond: Conditioning):
        """Under CFG-parallel, this rank's text rows (rank 0 the prompts, rank 1 the negative ones), else None."""
        if self.parallel != "cfg" or not cond.cfg:
            return None
        rows = slice(self.group.rank() * cond.batch, (self.group.rank() + 1) * cond.batch)
        embeds, mask = cond.embeds[rows], cond.mask[rows]
        mx.eval(embeds, mask)
        return embeds, mask, self.group

    def _noise(self, req: Request, n: int) -> mx.array:
        """Packed float32 noise ``(batch, n, C)``: the request's latents, or item ``i`` from seed ``seed + i``."""
        if req.latents is not None:
            return req.latents
        channels = self.transformer.config.in_channels
        return mx.stack([mx.random.normal((n, channels), key=mx.random.key(req.seed + i)) for i in range(req.batch)])

    def decode(self, latents, width: int, height: int, output: str = "pil"):
        """Packed latents (mx or numpy) -> a list of PIL images, or (B, H, W, 3) float32 numpy in [0, 1] for
        "np". Non-finite latents are a `NonFiniteError`: never a black picture."""
        if output not in ("pil", "np"):
            raise ValueError(f"output must be 'pil' or 'np', got {output!r}")
        latents = latents if isinstance(latents, mx.array) else mx.array(np.asarray(latents, dtype=np.float32))
        n = (height // 16) * (width // 16)
        if latents.ndim != 3 or latents.shape[1] != n:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; expected (batch, {n}, C) for "
                             f"{width}x{height}")
        with self._lock:
            return runtime.call(self._decode, latents, width, height, output, {})

    def _decode(self, latents, width, height, output, stats):
        check_finite(latents, "the denoised latents")
        start = phase_start()
        z = self.vae.denormalize_latents(self.vae.unpack(latents, height, width).astype(self.vae.dtype))
        x = self.vae.decode(z)
        mx.eval(x)
        check_finite(x, "the decoded picture")
        record_phase(stats, "decode", start)
        return array_to_pil(x) if output == "pil" else array_to_numpy(x)
