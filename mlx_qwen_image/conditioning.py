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
import math
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
from PIL import Image

from .image import fit_area, on_white, open_image, resize
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
    cache: object | None = None  # a step cache setting (`mlx_qwen_image.cache`)
    enhance: dict | None = None  # rewrite the prompts first (`enhance.rewrite` options)
    mask: Image.Image | None = None  # inpainting: grey, white where the picture is repainted (`inpaint.mask_from`)
    mask_blur: float = 0.0
    control: object | None = None  # `control.ControlRequest`
    mask_crop: int | None = None  # inpaint only the region around the mask, this many pixels wider (`inpaint`)

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
    slots: np.ndarray | None = None  # 2.1: (L + image slots,) bool, True where image tokens sit in the sequence
    repaint: mx.array | None = None  # inpainting: (1, N, C) packed, 1 where repainted, 0 where ``start`` is kept
    control: list | None = None  # ControlNet: the packed control latents of each condition (`control`)

    @property
    def cfg(self) -> bool:
        return self.cfg_scale > 1

    @property
    def image_tokens(self) -> int:
        return (self.height // 16) * (self.width // 16)


def _conditioning(pipe, req: Request, features, **task) -> Conditioning:
    embeds, mask = features
    cond = Conditioning(embeds, mask, req.batch, req.width, req.height, req.cfg_scale,
                        [(1, req.height // 16, req.width // 16)], hooks=req.hooks, **task)
    if pipe.variant.image_slots:  # the text, then one slot per 2x2 group of the image's tokens
        cond.slots = np.concatenate([np.zeros(embeds.shape[1], bool), np.ones(cond.image_tokens // 4, bool)])
    return cond


# A builder is ``builder(pipe, request, phase)``: ``with phase(name):`` times each stage into the run's stats
# ("text_encoder", "picture_encode"); what it returns is evaluated, so no stage's work lands in the first step.

def text_to_image(pipe, req: Request, phase) -> Conditioning:
    with phase("text_encoder"):
        features = pipe.text_features(req.text_rows)
    return _conditioning(pipe, req, features)


def img2img(pipe, req: Request, phase) -> Conditioning:
    """The picture, resized to the output size, is the start; the scheduler mixes it with the noise."""
    with phase("text_encoder"):
        features = pipe.text_features(req.text_rows)
    with phase("picture_encode"):
        start = pipe.encode_image(resize(req.image, req.width, req.height))
        mx.eval(start)
    return _conditioning(pipe, req, features, start=start, strength=req.strength)


def edit_pictures(variant: Variant, images) -> tuple[list[Image.Image], list[Image.Image]]:
    """(the pictures as the vision tower sees them, the pictures as the VAE encodes them), each at its own
    aspect: the VAE's at about ``reference_area`` pixels, the tower's at ``condition_area`` (or the VAE's, with
    any transparency composited onto white)."""
    vae = [resize(i, *fit_area(*i.size, variant.reference_area)) for i in images]
    if variant.condition_area is None:
        return [on_white(i) for i in vae], vae
    return [resize(i, *fit_area(*i.size, variant.condition_area)) for i in images], vae


def edit(pipe, req: Request, phase) -> Conditioning:
    """The pictures enter twice: as vision tokens inside the prompt, and as VAE latents appended to the image
    tokens of every transformer call (segments 1, 2, ...), of which only the generated segment's output is used."""
    condition, vae = edit_pictures(pipe.variant, req.images)
    if pipe.variant.image_slots:  # each vision token must stand for 2x2 of the picture's latents
        for i, p in enumerate(condition):
            seen = pipe.prompts.processor.resized_size(*p.size)
            if seen != p.size:
                raise ValueError(f"picture {i + 1} is used at {p.size[0]}x{p.size[1]}, but the vision processor's "
                                 f"pixel bounds make it {seen[0]}x{seen[1]}; check processor/preprocessor_config.json")
    with phase("text_encoder"):
        features = pipe.text_features(req.text_rows, condition)
    with phase("picture_encode"):
        reference = mx.concatenate([pipe.encode_image(p) for p in vae], axis=1)
        mx.eval(reference)
    cond = _conditioning(pipe, req, features, reference=reference)
    pictures = [(1, p.size[1] // 16, p.size[0] // 16) for p in vae]
    cond.segments = pictures + cond.segments if pipe.variant.references_first else cond.segments + pictures
    if pipe.variant.image_slots:  # where the pictures' vision tokens sit in the text, then the image's slots
        text = pipe.prompts.image_slots(req.text_rows, condition)
        cond.slots = np.concatenate([text, np.ones(cond.image_tokens // 4, bool)])
    return cond


def builder(req: Request):
    """The builder for a request: edit pictures, an img2img picture, or text alone; with a mask, inpainting."""
    if req.mask is not None and (req.images or req.image is not None):
        from .inpaint import edit_inpaint, picture_inpaint

        return edit_inpaint if req.images else picture_inpaint
    if req.images:
        return edit
    return img2img if req.image is not None else text_to_image


def output_size(variant: Variant, width, height, image=None, images=()) -> tuple[int, int]:
    """The requested size, or the default: the (last) edit picture's aspect at the variant's reference area, the
    img2img picture's aspect at about 1024x1024, or the variant's size. With one side given, the other keeps that
    default's aspect (rounded to a multiple of 16)."""
    if images:
        fit = fit_area(*images[-1].size, variant.reference_area)
    elif image is not None:
        fit = fit_area(*image.size)
    else:
        fit = variant.size
    m = variant.size_multiple
    if width is not None and height is None:
        height = max(m, round(width * fit[1] / fit[0] / m) * m)
    elif height is not None and width is None:
        width = max(m, round(height * fit[0] / fit[1] / m) * m)
    return (fit[0], fit[1]) if width is None else (width, height)


def check_request(width: int, height: int, steps: int, cfg_scale: float, multiple: int = 16):
    """Refuse sizes, step counts and CFG scales the model cannot use, naming valid values."""
    for name, v in (("width", width), ("height", height)):
        if v < multiple or v % multiple:
            lo = max(multiple, v // multiple * multiple)
            raise ValueError(f"{name} {v} is not a multiple of {multiple}; use {lo}"
                             + (f" or {lo + multiple}" if v > lo else ""))
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not math.isfinite(cfg_scale) or cfg_scale < 1:
        raise ValueError(f"cfg_scale must be a number of at least 1 (1 turns CFG off), got {cfg_scale}")


def check_prompts(prompt, name: str = "prompt") -> list[str]:
    """A prompt or a non-empty list of prompts, each a real string that can be encoded as UTF-8."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{name} must be a string or a non-empty list of strings, got {_short(prompt)}")
    for p in prompts:
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{name} is not valid text: it holds {p[e.start]!r} at position {e.start} (the shell "
                             "passed bytes that are not UTF-8; check the terminal's encoding)") from None
    return list(prompts)


def pictures_list(images, variant: Variant) -> list[Image.Image]:
    """The edit pictures, opened, after checking that the checkpoint edits and takes that many."""
    if not variant.edits:
        raise ValueError(f"this checkpoint ({variant.class_name}) takes no edit pictures; it does {variant.tasks}")
    items = [images] if isinstance(images, (str, Path, Image.Image)) else images
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"images must be a list of paths or PIL images, got {_short(images)}")
    if not items:
        raise ValueError("editing needs at least one picture in images=[...]")
    if len(items) > variant.max_images:
        raise ValueError(f"this checkpoint ({variant.class_name}) takes at most {variant.max_images} picture(s), "
                         f"got {len(items)}")
    return [open_image(i).convert(variant.picture_mode) for i in items]


def _integer(name: str, value, low: int | None = None):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {_short(value)}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")
    return int(value)


def _number(name: str, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {_short(value)}")
    return float(value)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def make_request(variant: Variant, channels: int, fixed_steps: int | None, prompt, negative_prompt=None, width=None,
                 height=None, steps=None, cfg_scale=None, seed=0, latents=None, images=None, image=None,
                 strength=None, hooks=(), cache=None, enhance_prompt=False, mask=None, mask_blur=None,
                 controlnet=None, control_images=None, control_scale=None, control_start=None,
                 control_end=None, mask_crop=None) -> Request:
    """Check a run's arguments against the checkpoint (``variant``, the transformer's latent ``channels``, the
    scheduler's ``fixed_steps``) and resolve the defaults; every mistake is a one-line ``ValueError``."""
    prompts = check_prompts(prompt)
    if image is not None and not variant.img2img:
        raise ValueError(f"this checkpoint ({variant.class_name}) does not do img2img; it does {variant.tasks}")
    if images is None and variant.needs_images:
        raise ValueError(f"this checkpoint ({variant.class_name}) edits pictures: pass images=[...] "
                         "(mlx-qwen-image edit --image FILE)")
    strength = _number("strength", strength)
    if mask is not None and not variant.inpainting:
        raise ValueError(f"inpainting (mask=) is not available for {variant.name}")
    from .control import check_control, inpainting

    control = check_control(controlnet, control_images, control_scale, control_start, control_end)
    if control is not None and cache is not None:
        raise ValueError("step caches (cache=, --cache) do not run with ControlNets yet: leave one out")
    if control is not None and images is not None:
        raise ValueError("ControlNets guide text-to-image (and img2img) runs, not edits with images=[...]")
    if inpainting(controlnet) and (mask is None or image is not None or images is not None):
        raise ValueError("the inpainting ControlNet repaints its control picture: pass control_images=[picture] "
                         "and mask=, without image= or images=")
    if mask is not None and image is None and images is None and not inpainting(controlnet):
        raise ValueError("mask= needs the picture it applies to: pass image= (images= on an editing checkpoint)")
    if strength is not None and image is None and (mask is None or images is None):
        raise ValueError("strength applies to img2img only: pass image= too")
    pictures = tuple(pictures_list(images, variant)) if images is not None else ()
    picture = open_image(image).convert(variant.picture_mode) if image is not None else None
    if picture is not None or (mask is not None and pictures):  # img2img, or inpainting a picture
        strength = 0.6 if strength is None else strength
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
    mask_crop = _integer("mask_crop", mask_crop, low=0)
    if mask_crop is not None and (mask is None or image is None):
        raise ValueError("mask_crop applies to inpainting a picture: pass image= and mask= too")
    mask_blur = _number("mask_blur", mask_blur) or 0.0
    if mask_blur < 0:
        raise ValueError(f"mask_blur must be at least 0, got {mask_blur}")
    if mask is not None:
        from .inpaint import mask_from

        mask = mask_from(open_image(mask, name="the mask") if not isinstance(mask, Image.Image) else mask)
    width, height = _integer("width", width), _integer("height", height)
    steps = _integer("steps", steps)
    steps = (fixed_steps or variant.steps) if steps is None else steps
    cfg_scale = _number("cfg_scale", cfg_scale)
    cfg_scale = variant.cfg_scale if cfg_scale is None else cfg_scale
    if mask is not None and pictures:  # the output is the last picture, repainted where the mask says
        size = fit_area(*pictures[-1].size, variant.reference_area)
        if (width, height) not in ((None, None), size):
            raise ValueError(f"with a mask the output is the last picture at its own size, {size[0]}x{size[1]}; "
                             "leave out width and height")
    width, height = output_size(variant, width, height, picture, pictures)
    check_request(width, height, steps, cfg_scale, variant.size_multiple)
    negatives = None
    if cfg_scale > 1:
        if isinstance(negative_prompt, (list, tuple)):
            negatives = check_prompts(negative_prompt, "negative_prompt")
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        else:
            negatives = check_prompts(" " if negative_prompt is None else negative_prompt, "negative_prompt")
            negatives = negatives * len(prompts)
    n = (height // 16) * (width // 16)
    if latents is not None:
        latents = latents if isinstance(latents, mx.array) else mx.array(np.asarray(latents, dtype=np.float32))
        if latents.shape != (len(prompts), n, channels):
            raise ValueError(f"latents have shape {tuple(latents.shape)}; expected {(len(prompts), n, channels)} "
                             f"(batch, (H/16)*(W/16), {channels}) for {width}x{height}")
        latents = latents.astype(mx.float32)
        mx.eval(latents)
    else:
        if seed is None:
            raise ValueError("seed must be an integer, got None (or pass latents=)")
        seed = _integer("seed", seed)
        if not 0 <= seed < 2**63 - len(prompts):
            raise ValueError(f"seed must be in [0, 2**63 - {len(prompts)}), got {seed}")
    if cache is not None and not variant.step_caches:
        raise ValueError(f"step caches (cache=, --cache) are not available for {variant.name}; its own prefix K/V "
                         "cache is always on")
    if cache is not None and not callable(getattr(cache, "start", None)):
        raise ValueError(f"cache must be a step cache (mlx_qwen_image.cache), got {_short(cache)}")
    if not isinstance(enhance_prompt, (bool, dict)):
        raise ValueError(f"enhance_prompt must be true, false or a dict of options, got {_short(enhance_prompt)}")
    enhance = ({} if enhance_prompt is True else enhance_prompt) or None
    if enhance_prompt is not False and enhance is None:
        enhance = {}
    return Request(tuple(prompts), tuple(negatives) if negatives else None, width, height, steps, cfg_scale, seed,
                   latents, pictures, picture, strength, tuple(hooks), cache, enhance, mask, mask_blur, control,
                   mask_crop)
