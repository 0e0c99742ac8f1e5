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
from PIL import Image, ImageFilter, ImageOps

from .conditioning import Conditioning, Request, StepHook, _conditioning, edit, img2img
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
    """Text-to-image checkpoints: img2img from the picture (resized to the output size) with a mask; with
    ``mask_crop``, from the region around the mask only (`crop_region`), pasted back by `overlay`."""
    if req.mask_crop is None:
        cond = img2img(pipe, req, phase)
        cond.repaint = mask_latents(pipe, prepare_mask(req.mask, req.width, req.height, req.mask_blur))
        return cond
    mask = blurred(req.mask, req.mask_blur)
    box = crop_region(mask, req.width, req.height, req.mask_crop)
    with phase("text_encoder"):
        features = pipe.text_features(req.text_rows)
    with phase("picture_encode"):
        start = pipe.encode_image(fill(req.image.crop(box), req.width, req.height))
        mx.eval(start)
    cond = _conditioning(pipe, req, features, start=start, strength=req.strength)
    region = fill(mask.crop(box), req.width, req.height)
    cond.repaint = mask_latents(pipe, prepare_mask(region, req.width, req.height))
    return cond


def blurred(mask: Image.Image, radius: float) -> Image.Image:
    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius else mask


def crop_region(mask: Image.Image, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2) of the picture that is inpainted under ``mask_crop``: the masked area's bounding box,
    ``pad`` pixels wider, grown to the output's aspect inside the picture (diffusers' ``get_crop_region``)."""
    m = np.asarray(mask.convert("L"))
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    h, w = m.shape
    if not rows.size:
        return 0, 0, w, h
    x1, y1 = max(int(cols[0]) - pad, 0), max(int(rows[0]) - pad, 0)
    x2, y2 = min(int(cols[-1]) + 1 + pad, w), min(int(rows[-1]) + 1 + pad, h)
    if (x2 - x1) / (y2 - y1) > width / height:  # too wide: grow the height, centred, shifted inside
        y1, y2 = _grow(y1, y2, int((x2 - x1) / (width / height) - (y2 - y1)), h)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * (width / height) - (x2 - x1)), w)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, by: int, size: int) -> tuple[int, int]:
    lo, hi = lo - by // 2, hi + by - by // 2
    if hi >= size:
        lo, hi = lo - (hi - size), size
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, size)


def fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resized to fit inside ``width`` x ``height`` at its aspect, centred, the rest filled by stretching its edge
    rows or columns (diffusers' ``resize_mode="fill"``)."""
    ratio, src = width / height, image.width / image.height
    w = width if ratio < src else image.width * height // image.height
    h = height if ratio >= src else image.height * width // image.width
    resized = image.resize((w, h), resample=Image.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - w // 2, height // 2 - h // 2))
    if ratio < src and (gap := height // 2 - h // 2) > 0:
        out.paste(resized.resize((width, gap), box=(0, 0, width, 0)), box=(0, 0))
        out.paste(resized.resize((width, gap), box=(0, resized.height, width, resized.height)), box=(0, gap + h))
    elif ratio > src and (gap := width // 2 - w // 2) > 0:
        out.paste(resized.resize((gap, height), box=(0, 0, 0, height)), box=(0, 0))
        out.paste(resized.resize((gap, height), box=(resized.width, 0, resized.width, height)), box=(gap + w, 0))
    return out


def overlay(mask: Image.Image, original: Image.Image, generated: Image.Image, box) -> Image.Image:
    """The generated crop put back into the original picture, the original kept where the mask is black (blended
    where it is grey), as diffusers' ``apply_overlay``: the output has the original picture's size."""
    kept = Image.new("RGBa", original.size)
    kept.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    ratio, src = w / h, generated.width / generated.height
    sw = w if ratio > src else generated.width * h // generated.height
    sh = h if ratio <= src else generated.height * w // generated.width
    cropped = Image.new("RGB", (w, h))
    cropped.paste(generated.resize((sw, sh), resample=Image.LANCZOS), box=(w // 2 - sw // 2, h // 2 - sh // 2))
    base = Image.new("RGBA", original.size)
    base.paste(cropped, (x1, y1))
    out = base.convert("RGB").convert("RGBA")
    out.alpha_composite(kept.convert("RGBA"))
    return out.convert("RGB")


def edit_inpaint(pipe, req: Request, phase) -> Conditioning:
    """Editing checkpoints: the edit pictures as conditions, and the last one (at the output size, its own aspect)
    is also where the run starts and what the mask keeps."""
    cond = edit(pipe, req, phase)
    n = cond.image_tokens
    cond.start, cond.strength = cond.reference[:, -n:], req.strength
    cond.repaint = mask_latents(pipe, prepare_mask(req.mask, req.width, req.height, req.mask_blur))
    return cond


def paste_back(req: Request, images: list, output: str) -> list:
    """Under ``mask_crop``: each decoded crop put back into the picture (`overlay`), at the picture's size."""
    mask = blurred(req.mask, req.mask_blur)
    box = crop_region(mask, req.width, req.height, req.mask_crop)
    out = []
    for image in images:
        generated = image if output == "pil" else Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
        pasted = overlay(mask, req.image, generated, box)
        out.append(pasted if output == "pil" else np.asarray(pasted).astype(np.float32) / 255.0)
    return out
