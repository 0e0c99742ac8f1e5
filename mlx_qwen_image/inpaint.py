"""Inpainting: repaint the masked region of a picture and keep the rest, as diffusers' QwenImageInpaintPipeline
(text-to-image checkpoints) and QwenImageEditInpaintPipeline (editing checkpoints) do.

The run starts as img2img from the picture (``strength``), and after every Euler step the latents outside the
mask are replaced by the picture's latents noised to the next sigma (the last step: the picture's latents
themselves), so the kept region ends as the picture's VAE round trip. The mask is white (or, in an RGBA mask,
transparent) where the picture is repainted; it is resized to the output size as the reference resizes it
(Lanczos, then grey, then cut at 0.5) and sampled at the latents' resolution (the top-left pixel of each 8x8
block, torch's nearest interpolation at an integer scale).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from PIL import Image, ImageFilter

from .conditioning import Conditioning, Request, StepHook, edit, img2img
from .image import resize


def mask_from(picture: Image.Image) -> Image.Image:
    """The repaint region as an 8-bit grey picture: white repaints. An RGBA mask with transparency marks the
    region by its transparent pixels (as OpenAI's edits API does); any other picture by its brightness."""
    if picture.mode == "RGBA":
        alpha = picture.getchannel("A")
        if alpha.getextrema()[0] < 255:
            return alpha.point(lambda a: 255 - a)
    return picture.convert("L")


def prepare_mask(mask: Image.Image, width: int, height: int, blur: float = 0.0) -> np.ndarray:
    """(height, width) float32 of 0 and 1: 1 where the picture is repainted. ``blur``: a Gaussian blur of that
    radius on the mask as given, before it is resized and cut (diffusers' ``mask_processor.blur``)."""
    if blur:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    grey = np.asarray(resize(mask, width, height).convert("L")).astype(np.float32) / 255.0
    return (grey >= 0.5).astype(np.float32)


def mask_latents(pipe, mask: np.ndarray) -> mx.array:
    """The pixel mask at the packed latents' layout ``(1, tokens, channels)``, every channel of a latent pixel
    alike."""
    s = pipe.vae.config.scale_factor
    m = mask[::s, ::s]  # nearest at an integer scale: the top-left pixel of each block
    channels = pipe.vae.config.z_dim
    return pipe.vae.pack(mx.broadcast_to(mx.array(m)[None, :, :, None], (1, *m.shape, channels)))


class Blend(StepHook):
    """After each step, the latents outside the mask become the picture's, noised to the next sigma."""

    def __init__(self, picture: mx.array, noise: mx.array, mask: mx.array):
        self.picture, self.noise, self.mask = picture, noise, mask

    def after_step(self, step: int, latents: mx.array, sigma_next: float) -> mx.array:
        s = mx.array(sigma_next, dtype=mx.float32)
        known = s * self.noise + (1 - s) * self.picture
        return (1 - self.mask) * known + self.mask * latents


def picture_inpaint(pipe, req: Request, phase) -> Conditioning:
    """Text-to-image checkpoints: img2img from the picture (resized to the output size) with a mask."""
    cond = img2img(pipe, req, phase)
    cond.repaint = mask_latents(pipe, prepare_mask(req.mask, req.width, req.height, req.mask_blur))
    return cond


def edit_inpaint(pipe, req: Request, phase) -> Conditioning:
    """Editing checkpoints: the edit pictures as conditions, and the last one (at the output size, its own aspect)
    is also where the run starts and what the mask keeps."""
    cond = edit(pipe, req, phase)
    n = cond.image_tokens
    cond.start, cond.strength = cond.reference[:, -n:], req.strength
    cond.repaint = mask_latents(pipe, prepare_mask(req.mask, req.width, req.height, req.mask_blur))
    return cond
