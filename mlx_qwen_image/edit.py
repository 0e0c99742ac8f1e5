"""Image editing: Qwen-Image-Edit (one picture) and Edit-2509 / Edit-2511 (one to three pictures).

The pictures enter twice. The vision tower sees them small (about 384x384 for Edit-2509/2511; the output
size for the original Edit) inside the prompt, as ``<|image_pad|>`` tokens of the text encoder; the VAE
encodes them at about 1024x1024 and their latents are appended to the image tokens of every transformer call
as extra segments (frame index 1, 2, ...), of which only the generated segment's prediction is used. Which
variant a checkpoint is comes from its ``model_index.json`` ``_class_name``; Edit-2511's ``zero_cond_t`` is
read by the transformer from its own config.
"""

from __future__ import annotations

import hashlib
import time

import mlx.core as mx
import numpy as np
from PIL import Image

from .image import pil_to_array
from .image_processor import QwenImageProcessor
from .loading import TEXT_TO_IMAGE
from .pipeline import QwenImagePipeline, check_request, fit_area, pack_latents, run_steps

EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
EDIT_DROP = 64  # template tokens before the user's text (the system prompt and "<|im_start|>user\n")
PICTURE = "<|vision_start|><|image_pad|><|vision_end|>"
PLUS_CLASS, EDIT_CLASS = "QwenImageEditPlusPipeline", "QwenImageEditPipeline"
CONDITION_AREA = 384 * 384  # Edit-2509/2511: pictures as the vision tower sees them
VAE_AREA = 1024 * 1024  # ... and as the VAE encodes them
MAX_IMAGES = {PLUS_CLASS: 3, EDIT_CLASS: 1}


def _load_image(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as f:
            return f.convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {image}: {e}") from None


class QwenImageEditPipeline(QwenImagePipeline):
    COMPONENTS = TEXT_TO_IMAGE + ("processor",)
    CLASSES = (PLUS_CLASS, EDIT_CLASS)
    VISION = True

    def __init__(self, *args, processor: QwenImageProcessor | None = None, variant: str = PLUS_CLASS, **kwargs):
        super().__init__(*args, **kwargs)
        self.processor = processor or QwenImageProcessor.from_dict({})
        self.variant = variant

    @staticmethod
    def _wrong_checkpoint(root, kind: str) -> str:
        if kind in ("QwenImagePipeline", "QwenImageImg2ImgPipeline"):
            return f"{root} is a text-to-image checkpoint ({kind}): use `mlx-qwen-image generate` (QwenImagePipeline)"
        return f"{root} holds a {kind or 'unknown'} checkpoint, not a Qwen-Image-Edit one"

    @staticmethod
    def _extra_components(root, kind: str) -> dict:
        return {"processor": QwenImageProcessor.from_pretrained(root / "processor"), "variant": kind}

    @property
    def max_images(self) -> int:
        return MAX_IMAGES[self.variant]

    # -- inputs --------------------------------------------------------------------------------------------

    def prepare_images(self, images, width=None, height=None):
        """(pictures for the vision tower, pictures for the VAE, output width, output height)."""
        images = [_load_image(i) for i in ([images] if isinstance(images, (str, Image.Image)) else images)]
        if not images:
            raise ValueError("editing needs at least one input image")
        if len(images) > self.max_images:
            raise ValueError(f"this checkpoint ({self.variant}) takes at most {self.max_images} image(s), "
                             f"got {len(images)}")
        # As the reference: the output follows the last picture's aspect (Edit-2509/2511) or the only one.
        fit_w, fit_h = fit_area(*images[-1].size, VAE_AREA)
        width, height = width or fit_w, height or fit_h
        if self.variant == EDIT_CLASS:
            vae_images = [_resize(images[0], fit_w, fit_h)]
            return vae_images, vae_images, width, height
        condition = [_resize(i, *fit_area(*i.size, CONDITION_AREA)) for i in images]
        vae_images = [_resize(i, *fit_area(*i.size, VAE_AREA)) for i in images]
        return condition, vae_images, width, height

    def encode_prompt(self, prompt, images=None):
        """Text-and-picture features ``(B, L, 3584)`` and mask for each prompt with the same ``images``."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        self._ensure_text_encoder()
        pixel_values, grids = self.processor(images)
        if self.variant == PLUS_CLASS:
            pictures = "".join(f"Picture {i + 1}: {PICTURE}" for i in range(len(images)))
        else:
            pictures = PICTURE
        texts = [self.processor.expand_image_tokens(EDIT_TEMPLATE.format(pictures + p), grids) for p in prompts]
        sequences = self.tokenizer.encode_batch(texts)
        lengths = [len(s) for s in sequences]
        ids = np.full((len(sequences), max(lengths)), self.tokenizer.pad_token_id, dtype=np.int32)
        mask = np.zeros(ids.shape, dtype=np.int32)
        for i, s in enumerate(sequences):
            ids[i, : len(s)], mask[i, : len(s)] = s, 1
        # The tower runs once; every prompt row reuses its features.
        features = self.text_encoder.visual(mx.array(pixel_values), grids)
        hidden = self.text_encoder(
            mx.array(ids), mx.array(mask) if min(lengths) < max(lengths) else None,
            image_grid_thw=np.concatenate([grids] * len(prompts)),
            image_embeds=mx.concatenate([features] * len(prompts)),
        )
        mask = mx.array(mask[:, EDIT_DROP:])
        return mx.where(mask[..., None].astype(mx.bool_), hidden[:, EDIT_DROP:], 0), mask

    # -- editing -------------------------------------------------------------------------------------------

    def edit_steps(self, prompt: str, images, negative_prompt=None, width=None, height=None, steps=50,
                   cfg_scale=4.0, seed=0, latents=None):
        """Yield the (lazy) packed latents after each step of an edit; ``self.last_size`` is (width, height)."""
        if not isinstance(prompt, str):
            raise ValueError("edit takes one prompt at a time")
        condition, vae_images, width, height = self.prepare_images(images, width, height)
        check_request(width, height, steps, cfg_scale)
        self.last_size = (width, height)
        cfg = cfg_scale > 1

        negative = " " if negative_prompt is None else negative_prompt
        key = ("edit", prompt, negative, cfg, tuple(hashlib.sha1(i.tobytes()).hexdigest() for i in condition))
        embeds, mask = self._encode_phase(
            key, lambda: self.encode_prompt([prompt, negative] if cfg else prompt, condition))
        start = time.perf_counter()
        x = self.initial_latents(1, width, height, seed, latents)
        reference = mx.concatenate([self._image_latents(img) for img in vae_images], axis=1)
        sigmas = self.scheduler.sigmas(steps, x.shape[1])
        timesteps = self.scheduler.timesteps(steps, x.shape[1])
        segments = [(1, height // 16, width // 16)] + [(1, i.size[1] // 16, i.size[0] // 16) for i in vae_images]
        yield from self.sample(x, embeds, mask, sigmas, timesteps, cfg_scale, [segments] * (2 if cfg else 1),
                               reference=reference.astype(self.transformer.dtype))
        self._phase("denoise", start)

    def _image_latents(self, image: Image.Image) -> mx.array:
        x = pil_to_array(image, dtype=self.vae.dtype)
        return pack_latents(self.vae.normalize_latents(self.vae.encode(x)).astype(mx.float32))

    def edit(self, prompt: str, images, negative_prompt=None, width=None, height=None, steps=50, cfg_scale=4.0,
             seed=0, latents=None, output="pil", progress=None):
        """Edit ``images`` (paths or PIL images; 1-3 for Edit-2509/2511, 1 for Edit) as ``prompt`` says.

        The output size defaults to the (last) input picture's aspect at about 1024x1024 pixels.
        """
        if output not in ("pil", "np"):
            raise ValueError(f"output must be 'pil' or 'np', got {output!r}")
        run = self.edit_steps(prompt, images, negative_prompt, width, height, steps, cfg_scale, seed, latents)
        x = run_steps(run, steps, progress)
        return self.decode(x, *self.last_size, output)[0]

    def generate(self, *args, **kwargs):
        raise ValueError("this is an image-editing checkpoint: use edit(prompt, images=[...]) "
                         "(or `mlx-qwen-image edit`)")


def _resize(image: Image.Image, width: int, height: int) -> Image.Image:
    # Lanczos, as diffusers' image processor resizes.
    return image if image.size == (width, height) else image.resize((width, height), resample=Image.LANCZOS)
