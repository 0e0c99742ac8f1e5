"""What one run conditions on, and the builders of it: text-to-image, img2img and edit.

The core loop (`QwenImagePipeline` `denoise`) runs any `Conditioning`: text features with their mask (the
conditional rows, then the unconditional ones under CFG), the image segments the transformer sees, and what
differs per task: the packed latents of edit pictures appended to the image tokens (``reference``), or the picture
img2img starts from (``start`` with ``strength``). ``hooks`` are per-step extensions (`StepHook`) that the loop
calls: the place for step caches and inpainting blends. A builder is a function of the pipeline and a `Request`;
a new task is one more builder (and a hook if it acts during the loop).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import mlx.core as mx
from PIL import Image

from .image import fit_area, resize
from .variants import Variant


@dataclasses.dataclass(frozen=True)
class Request:
    """A checked request: sizes resolved, pictures opened, CFG rows known."""

    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...] | None  # None: CFG off
    width: int
    height: int
    steps: int
    cfg_scale: float
    seed: int
    latents: mx.array | None = None  # the noise, packed; otherwise drawn from seed, seed + 1, ...
    images: tuple[Image.Image, ...] = ()  # edit pictures
    image: Image.Image | None = None  # img2img picture
    strength: float | None = None
    hooks: tuple = ()

    @property
    def batch(self) -> int:
        return len(self.prompts)

    @property
    def text_rows(self) -> list[str]:
        """The prompts of the text-encoder batch: [prompts; negative prompts] under CFG."""
        return list(self.prompts) + list(self.negative_prompts or ())


class StepHook:
    """A per-step extension of the core loop; both methods default to doing nothing.

    ``predict(step, sigma, compute)`` returns the step's velocity: ``compute()`` runs the transformer, a cache may
    return a stored one instead. ``after_step(step, latents, sigma_next)`` may change the latents after the Euler
    step (inpainting blends the known region back in here).
    """

    def predict(self, step: int, sigma: float, compute: Callable[[], mx.array]) -> mx.array:
        return compute()

    def after_step(self, step: int, latents: mx.array, sigma_next: float) -> mx.array:
        return latents


@dataclasses.dataclass
class Conditioning:
    embeds: mx.array  # (rows, L, D): a row per prompt, then a row per negative prompt under CFG
    mask: mx.array  # (rows, L)
    batch: int
    width: int
    height: int
    cfg_scale: float
    segments: list[tuple[int, int, int]]  # (frames, H/16, W/16): the generated image, then each edit picture
    reference: mx.array | None = None  # (1, M, C) packed latents of the edit pictures
    start: mx.array | None = None  # (1, N, C) packed latents of the img2img picture
    strength: float | None = None
    hooks: tuple = ()

    @property
    def cfg(self) -> bool:
        return self.cfg_scale > 1

    @property
    def image_tokens(self) -> int:
        return (self.height // 16) * (self.width // 16)


def _conditioning(req: Request, features, **task) -> Conditioning:
    embeds, mask = features
    return Conditioning(embeds, mask, req.batch, req.width, req.height, req.cfg_scale,
                        [(1, req.height // 16, req.width // 16)], hooks=req.hooks, **task)


def text_to_image(pipe, req: Request) -> Conditioning:
    return _conditioning(req, pipe.text_features(req.text_rows))


def img2img(pipe, req: Request) -> Conditioning:
    """The picture, resized to the output size, is the start; the scheduler mixes it with the noise."""
    start = pipe.encode_image(resize(req.image, req.width, req.height))
    return _conditioning(req, pipe.text_features(req.text_rows), start=start, strength=req.strength)


def edit_pictures(variant: Variant, images) -> tuple[list[Image.Image], list[Image.Image]]:
    """(the pictures as the vision tower sees them, the pictures as the VAE encodes them), each at its own
    aspect: the VAE's at about ``reference_area`` pixels, the tower's at ``condition_area`` (or the VAE's)."""
    vae = [resize(i, *fit_area(*i.size, variant.reference_area)) for i in images]
    if variant.condition_area is None:
        return vae, vae
    return [resize(i, *fit_area(*i.size, variant.condition_area)) for i in images], vae


def edit(pipe, req: Request) -> Conditioning:
    """The pictures enter twice: as vision tokens inside the prompt, and as VAE latents appended to the image
    tokens of every transformer call (segments 1, 2, ...), of which only the generated segment's output is used."""
    condition, vae = edit_pictures(pipe.variant, req.images)
    features = pipe.text_features(req.text_rows, condition)
    reference = mx.concatenate([pipe.encode_image(p) for p in vae], axis=1)
    cond = _conditioning(req, features, reference=reference)
    cond.segments += [(1, p.size[1] // 16, p.size[0] // 16) for p in vae]
    return cond


def builder(req: Request):
    """The builder for a request: edit pictures, an img2img picture, or text alone."""
    if req.images:
        return edit
    return img2img if req.image is not None else text_to_image


def output_size(variant: Variant, width, height, image=None, images=()) -> tuple[int, int]:
    """The requested size, or the default: the (last) edit picture's aspect at the variant's reference area, the
    img2img picture's aspect at about 1024x1024, or the variant's size."""
    if images:
        fit = fit_area(*images[-1].size, variant.reference_area)
    elif image is not None:
        fit = fit_area(*image.size)
    else:
        fit = variant.size
    return width or fit[0], height or fit[1]
