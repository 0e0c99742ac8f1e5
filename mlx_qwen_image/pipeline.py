"""QwenImagePipeline: text -> features -> denoising loop -> VAE decode.

The denoising loop is a generator (`denoise`) that yields the lazy latents after each step: the caller
evaluates them (one ``mx.eval`` per step), shows progress and may stop early. ``generate`` is the plain loop
around it. Memory is staged: with ``low_memory`` the text encoder is dropped once the prompts are encoded
(it reloads lazily from the checkpoint when needed again).
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

from .config import read_json
from .image import array_to_numpy, array_to_pil, pil_to_array
from .loading import (DEFAULT_MODEL, TEXT_TO_IMAGE, CheckpointError, check_layout, lazy_weights, load_model,
                      quantize_model, resolve)
from .models.text_encoder import QwenTextEncoder
from .quantize import apply_plan, text_encoder_plan
from .models.transformer import QwenImageTransformer
from .models.vae import QwenImageVAE
from .scheduler import FlowMatchEulerScheduler
from .tokenizer import TEMPLATE_SUFFIX_TOKENS, TEXT_TO_IMAGE_DROP, TEXT_TO_IMAGE_TEMPLATE, QwenTokenizer

# Qwen-Image conditions on at most 1024 text features (prompt tokens plus the 5 closing template tokens);
# diffusers refuses larger values of max_sequence_length too.
MAX_SEQUENCE_LENGTH = 1024
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
TEXT_TO_IMAGE_CLASSES = ("QwenImagePipeline", "QwenImageImg2ImgPipeline")


def _dtype(dtype) -> mx.Dtype:
    if isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_request(width: int, height: int, steps: int, cfg_scale: float):
    """Refuse sizes, step counts and CFG scales the model cannot use, naming valid values."""
    for name, v in (("width", width), ("height", height)):
        if v < 16 or v % 16:
            lo = max(16, v // 16 * 16)
            raise ValueError(f"{name} {v} is not a multiple of 16; use {lo}" + (f" or {lo + 16}" if v > lo else ""))
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if cfg_scale < 1:
        raise ValueError(f"cfg_scale must be at least 1 (1 turns CFG off), got {cfg_scale}")


def pack_latents(z: mx.array) -> mx.array:
    """(B, H/8, W/8, C) channels-last latents -> diffusers' packed (B, (H/16)(W/16), C*4), channel-major."""
    B, h, w, C = z.shape
    z = z.reshape(B, h // 2, 2, w // 2, 2, C).transpose(0, 1, 3, 5, 2, 4)
    return z.reshape(B, (h // 2) * (w // 2), C * 4)


def unpack_latents(x: mx.array, height: int, width: int) -> mx.array:
    """Packed (B, N, C*4) -> channels-last (B, H/8, W/8, C)."""
    B, _, D = x.shape
    h, w, C = height // 16, width // 16, D // 4
    x = x.reshape(B, h, w, C, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(B, h * 2, w * 2, C)


def guided(cond: mx.array, uncond: mx.array, scale: float) -> mx.array:
    """True CFG, then rescaled per token to the conditional prediction's norm (as the reference does)."""
    cond, uncond = cond.astype(mx.float32), uncond.astype(mx.float32)
    comb = uncond + scale * (cond - uncond)
    return comb * (mx.linalg.norm(cond, axis=-1, keepdims=True) / mx.linalg.norm(comb, axis=-1, keepdims=True))


class QwenImagePipeline:
    def __init__(self, transformer=None, vae=None, text_encoder=None, tokenizer=None, scheduler=None):
        self.transformer: QwenImageTransformer | None = transformer
        self.vae: QwenImageVAE | None = vae
        self.text_encoder: QwenTextEncoder | None = text_encoder
        self.tokenizer: QwenTokenizer | None = tokenizer
        self.scheduler = scheduler or FlowMatchEulerScheduler()
        self.low_memory = False
        self.stats: dict[str, dict[str, float]] = {}
        self._text_encoder_source: tuple[Path, mx.Dtype, int | None] | None = None  # folder, dtype, bits
        self._transformer_source: Path | None = None
        self.loras: list[tuple] = []  # (source, scale) fused or added into the transformer
        self._features = None  # (key, (embeds, mask)) of the last encoded prompts

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path = DEFAULT_MODEL, quantize: int | None = None,
                        dtype="bfloat16", loras=(), text_encoder_bits: int | None = None) -> "QwenImagePipeline":
        """Load a diffusers-layout checkpoint (local folder or Hub repo id); weights are read lazily.

        ``loras``: (path, scale) pairs, fused into the float weights before ``quantize`` applies (on an already
        quantized checkpoint they run beside the quantized layers). ``text_encoder_bits=8`` quantizes the text
        encoder's language model on load, as ``convert --text-encoder-bits 8`` does.
        """
        if quantize not in (None, 4, 8):
            raise ValueError(f"quantize must be None, 4 or 8, got {quantize!r}")
        if text_encoder_bits not in (None, 8):
            raise ValueError(f"text_encoder_bits must be None or 8, got {text_encoder_bits!r} (at 4 bits the text "
                             "features change by 20-50% on the measured models)")
        dt = _dtype(dtype)
        root = resolve(path_or_repo_id, cls.COMPONENTS)
        kind = check_layout(root, cls.REQUIRED).get("_class_name", "")
        if kind not in cls.CLASSES:
            raise CheckpointError(cls._wrong_checkpoint(root, kind))
        transformer = load_model(QwenImageTransformer, root / "transformer", dt)
        if loras:
            from .lora import apply_lora

            apply_lora(transformer, list(loras))
        if quantize and not _is_quantized(transformer):
            quantize_model(transformer, bits=quantize)
        pipe = cls(
            transformer=transformer,
            vae=load_model(QwenImageVAE, root / "vae", dt),
            tokenizer=QwenTokenizer.from_pretrained(root / "tokenizer"),
            scheduler=FlowMatchEulerScheduler.from_config(read_json(root / "scheduler" / "scheduler_config.json")),
            **cls._extra_components(root, kind),
        )
        pipe._text_encoder_source = (root / "text_encoder", dt, text_encoder_bits)
        pipe._ensure_text_encoder()
        pipe._transformer_source = root / "transformer"
        pipe.loras = list(loras)
        return pipe

    COMPONENTS = REQUIRED = TEXT_TO_IMAGE
    CLASSES = TEXT_TO_IMAGE_CLASSES
    VISION = False

    @staticmethod
    def _wrong_checkpoint(root, kind: str) -> str:
        if kind.startswith("QwenImageEdit"):
            return f"{root} is an image-editing checkpoint ({kind}): use `mlx-qwen-image edit` (QwenImageEditPipeline)"
        return f"{root} holds a {kind or 'unknown'} checkpoint, not a Qwen-Image text-to-image one"

    @staticmethod
    def _extra_components(root, kind: str) -> dict:
        return {}

    def load_lora(self, path, scale: float = 1.0) -> int:
        """Apply a LoRA (safetensors) to the transformer; several LoRAs add up. Returns the layers changed."""
        from .lora import apply_lora

        changed = apply_lora(self.transformer, [(path, scale)])
        self.loras.append((path, scale))
        return changed

    # -- text ----------------------------------------------------------------------------------------------

    def _ensure_text_encoder(self):
        if self.text_encoder is None and self._text_encoder_source is not None:
            folder, dtype, bits = self._text_encoder_source
            self.text_encoder = load_model(QwenTextEncoder, folder, dtype, vision=self.VISION)
            if bits and not _is_quantized(self.text_encoder):
                apply_plan(self.text_encoder, text_encoder_plan(self.text_encoder, bits))
        return self.text_encoder

    def free_text_encoder(self):
        """Drop the text encoder's weights; it is reloaded (lazily) the next time a prompt is encoded."""
        if self._text_encoder_source is not None:
            self.text_encoder = None
            mx.clear_cache()

    def encode_prompt(
        self, prompt: str | list[str], max_sequence_length: int = MAX_SEQUENCE_LENGTH
    ) -> tuple[mx.array, mx.array]:
        """Text features ``(B, L, hidden)`` and their mask ``(B, L)`` (1 = token, 0 = right padding).

        Equal to diffusers' ``QwenImagePipeline.encode_prompt`` whenever a prompt fits in
        ``max_sequence_length`` features. A longer prompt loses its last tokens, not the closing template
        tokens as in diffusers (whose tokenizer truncation cuts the template's end first), with a warning.
        """
        if not TEMPLATE_SUFFIX_TOKENS < max_sequence_length <= MAX_SEQUENCE_LENGTH:
            raise ValueError(
                f"max_sequence_length must be in ({TEMPLATE_SUFFIX_TOKENS}, {MAX_SEQUENCE_LENGTH}], "
                f"got {max_sequence_length}"
            )
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("encode_prompt needs at least one prompt")
        self._ensure_text_encoder()
        # The whole template is tokenized at once, as diffusers does, so a prompt's first token may merge
        # with the template's "\n"; positions, not strings, decide what is dropped.
        sequences = self.tokenizer.encode_batch([TEXT_TO_IMAGE_TEMPLATE.format(p) for p in prompts])
        for i, ids in enumerate(sequences):
            excess = len(ids) - TEXT_TO_IMAGE_DROP - max_sequence_length
            if excess > 0:
                kept = max_sequence_length - TEMPLATE_SUFFIX_TOKENS
                warnings.warn(
                    f"prompt {i} has {kept + excess} tokens, more than the {kept} that fit in "
                    f"max_sequence_length={max_sequence_length}: its last {excess} tokens were cut",
                    stacklevel=2,
                )
                sequences[i] = ids[: TEXT_TO_IMAGE_DROP + kept] + ids[-TEMPLATE_SUFFIX_TOKENS:]

        lengths = [len(ids) for ids in sequences]
        longest = max(lengths)
        input_ids = np.full((len(sequences), longest), self.tokenizer.pad_token_id, dtype=np.int32)
        mask = np.zeros((len(sequences), longest), dtype=np.int32)
        for i, ids in enumerate(sequences):
            input_ids[i, : len(ids)] = ids
            mask[i, : len(ids)] = 1
        padded = min(lengths) < longest
        hidden = self.text_encoder(mx.array(input_ids), mx.array(mask) if padded else None)

        mask = mx.array(mask[:, TEXT_TO_IMAGE_DROP:])
        embeds = mx.where(mask[..., None].astype(mx.bool_), hidden[:, TEXT_TO_IMAGE_DROP:], 0)
        return embeds, mask

    def _conditioning(self, prompts: list[str], negative_prompt, cfg: bool):
        """Features of [prompts; negative prompts] in one text-encoder pass (the weights are read once)."""
        if not cfg:
            return self.encode_prompt(prompts)
        negatives = [" " if negative_prompt is None else negative_prompt] * len(prompts)
        if isinstance(negative_prompt, (list, tuple)):
            if len(negative_prompt) != len(prompts):
                raise ValueError(f"{len(negative_prompt)} negative prompts for {len(prompts)} prompts")
            negatives = list(negative_prompt)
        return self.encode_prompt(prompts + negatives)

    # -- denoising -----------------------------------------------------------------------------------------

    def _phase(self, name: str, start: float):
        self.stats[name] = {"seconds": time.perf_counter() - start, "peak_memory": mx.get_peak_memory()}
        mx.reset_peak_memory()

    def initial_latents(self, batch: int, width: int, height: int, seed: int, latents=None) -> mx.array:
        """Packed float32 noise ``(batch, (H/16)(W/16), 64)``; item ``i`` uses seed ``seed + i``."""
        n, channels = (height // 16) * (width // 16), self.transformer.config.in_channels
        if latents is not None:
            latents = mx.array(np.asarray(latents, dtype=np.float32)) if not isinstance(latents, mx.array) else latents
            if latents.shape != (batch, n, channels):
                raise ValueError(
                    f"latents have shape {tuple(latents.shape)}; expected {(batch, n, channels)} "
                    f"(batch, (H/16)*(W/16), {channels}) for {width}x{height}"
                )
            return latents.astype(mx.float32)
        if not 0 <= seed < 2**63 - batch:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        return mx.stack([mx.random.normal((n, channels), key=mx.random.key(seed + i)) for i in range(batch)])

    def encode_image(self, image, width: int, height: int) -> mx.array:
        """A PIL image -> normalised packed latents ``(1, (H/16)(W/16), 64)`` (the latent mean, resized with
        Lanczos to ``width`` x ``height`` as diffusers' image processor does)."""
        image = image.convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), resample=Image.LANCZOS)
        x = pil_to_array(image, dtype=self.vae.dtype)
        return pack_latents(self.vae.normalize_latents(self.vae.encode(x)).astype(mx.float32))

    def _encode_phase(self, key, encode):
        """Text features, evaluated; reused when ``key`` equals the previous run's (several seeds of one prompt
        encode once, and a released text encoder is not reloaded for them). Releases the text encoder if asked."""
        mx.reset_peak_memory()
        start = time.perf_counter()
        if self._features is not None and self._features[0] == key:
            embeds, mask = self._features[1]
        else:
            self._features = None
            embeds, mask = encode()
            mx.eval(embeds, mask)
            self._features = (key, (embeds, mask))
        if self.low_memory:
            self.free_text_encoder()
        self._phase("text_encoder", start)
        return embeds, mask

    def denoise(self, prompt, negative_prompt=None, width=None, height=None, steps=50, cfg_scale=4.0, seed=0,
                latents=None, image=None, strength=0.6):
        """Yield the (lazy) packed latents after each denoising step.

        With ``image`` (img2img) the run starts from the encoded image mixed with the noise at the noise level
        where a ``strength`` fraction of the ``steps`` remains, and only those steps run. ``latents`` is the
        noise (packed layout); without it the noise comes from ``seed``.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if image is not None and not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        width, height = output_size(width, height, image)
        check_request(width, height, steps, cfg_scale)
        batch, cfg = len(prompts), cfg_scale > 1
        key = ("text", tuple(prompts), negative_prompt if isinstance(negative_prompt, str) or negative_prompt is None
               else tuple(negative_prompt), cfg)
        embeds, mask = self._encode_phase(key, lambda: self._conditioning(prompts, negative_prompt, cfg))

        start = time.perf_counter()
        x = self.initial_latents(batch, width, height, seed, latents)
        sigmas = self.scheduler.sigmas(steps, x.shape[1])
        timesteps = self.scheduler.timesteps(steps, x.shape[1])
        if image is not None:
            first = steps - img2img_steps(steps, strength)
            sigmas, timesteps = sigmas[first:], timesteps[first:]
            s0 = mx.array(sigmas[0])  # float32, as the reference mixes
            x = s0 * x + (1 - s0) * self.encode_image(image, width, height)
        img_shapes = [[(1, height // 16, width // 16)]] * (2 * batch if cfg else batch)
        yield from self.sample(x, embeds, mask, sigmas, timesteps, cfg_scale, img_shapes)
        self._phase("denoise", start)

    def sample(self, x, embeds, mask, sigmas, timesteps, cfg_scale, img_shapes, reference=None):
        """The denoising loop proper: one transformer call per step ([cond; uncond] stacked under CFG).

        The timestep path (every ``*_mod`` layer, 6.8B parameters) runs once for the whole schedule before the
        loop; with ``low_memory`` its weights are freed for the loop and come back lazily from the checkpoint.
        ``reference`` (packed latents of Edit reference images) is appended to the image tokens of every call.
        """
        batch, n, cfg = x.shape[0], x.shape[1], cfg_scale > 1
        model = self.transformer
        # The reference feeds timestep / 1000 (not sigma itself); equal up to float32 rounding.
        t_all = np.asarray(timesteps, dtype=np.float32) / np.float32(1000)
        # A fused LoRA is not in the checkpoint the weights would come back from: then they stay.
        drop = self.low_memory and self._transformer_source is not None and not self.loras
        table = model.modulation_table(t_all, drop_weights=drop)
        try:
            for i in range(len(timesteps)):
                t = mx.full((2 * batch if cfg else batch,), t_all[i], dtype=mx.float32)
                inp = x.astype(model.dtype)
                if reference is not None:
                    inp = mx.concatenate([inp, mx.broadcast_to(reference, (batch, *reference.shape[1:]))], axis=1)
                v = model(mx.concatenate([inp, inp]) if cfg else inp, embeds, mask, t, img_shapes,
                          modulations=table[i])
                if reference is not None:
                    v = v[:, :n]
                if cfg:
                    v = guided(v[:batch], v[batch:], cfg_scale)
                x = self.scheduler.step(x, v, sigmas[i], sigmas[i + 1])
                yield x
        finally:
            if drop:  # lazy: read from disk again only when the next run's table needs them
                model.restore_modulation_weights(lazy_weights(self._transformer_source))

    def decode(self, latents: mx.array, width: int, height: int, output: str = "pil"):
        """Packed latents -> a list of PIL images, or (B, H, W, 3) float32 numpy in [0, 1] for "np"."""
        if output not in ("pil", "np"):
            raise ValueError(f"output must be 'pil' or 'np', got {output!r}")
        start = time.perf_counter()
        z = self.vae.denormalize_latents(unpack_latents(latents, height, width).astype(self.vae.dtype))
        x = self.vae.decode(z)
        mx.eval(x)
        self._phase("decode", start)
        return array_to_pil(x) if output == "pil" else array_to_numpy(x)

    def generate(self, prompt, negative_prompt=None, width=None, height=None, steps=50, cfg_scale=4.0, seed=0,
                 latents=None, output="pil", image=None, strength=0.6, progress=None):
        """Images for ``prompt`` (a string: one image; a list: one per prompt, seeds ``seed``, ``seed + 1`` ...).

        Size: 1024x1024 by default; with ``image`` (img2img) the image's aspect at about 1024x1024 pixels.
        ``progress(done, total)`` is called after each evaluated step.
        """
        if output not in ("pil", "np"):
            raise ValueError(f"output must be 'pil' or 'np', got {output!r}")
        width, height = output_size(width, height, image)
        total = steps if image is None else img2img_steps(steps, strength)
        run = self.denoise(prompt, negative_prompt, width, height, steps, cfg_scale, seed, latents, image, strength)
        images = self.decode(run_steps(run, total, progress), width, height, output)
        return images[0] if isinstance(prompt, str) else images


def run_steps(run, total: int, progress=None) -> mx.array:
    """Evaluate a denoising generator step by step; returns the final latents."""
    x = None
    for done, x in enumerate(run, 1):
        mx.eval(x)
        if progress is not None:
            progress(done, total)
    return x


def fit_area(width: int, height: int, area: int = 1024 * 1024, multiple: int = 32) -> tuple[int, int]:
    """The size with the aspect of ``width`` x ``height`` and about ``area`` pixels, sides multiples of 32."""
    w = math.sqrt(area * width / height)
    return round(w / multiple) * multiple, round(w / (width / height) / multiple) * multiple


def output_size(width, height, image=None) -> tuple[int, int]:
    """Requested size, defaulting to 1024x1024, or to ``image``'s aspect at about 1024x1024 pixels."""
    if image is not None and (width is None or height is None):
        fit_w, fit_h = fit_area(*image.size)
        width, height = width or fit_w, height or fit_h
    return width or 1024, height or 1024


def img2img_steps(steps: int, strength: float) -> int:
    """Steps that run for ``strength``: diffusers skips ``int(steps - steps * strength)`` of them."""
    return steps - int(max(steps - min(steps * strength, steps), 0))


def _is_quantized(model) -> bool:
    import mlx.nn as nn

    return any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
