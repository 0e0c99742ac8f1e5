"""Qwen-Image 2.1 editing against diffusers' QwenImage21Pipeline(image=[...]) on a tiny random checkpoint: the
prompt features with pictures, images from the same latents (one picture, two of different sizes, RGBA, CFG off
and on), the CLI and its refusals.

The pictures are resized to about 128x128 on both sides (diffusers' ``output_resolution=128``; ours: the variant's
``reference_area``), so the tiny models stay fast; the size rule is the same at 1024x1024."""

import dataclasses

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import rel_err
from PIL import Image

from mlx_qwen_image import QwenImagePipeline
from mlx_qwen_image.cli import cli

SIDE = 128


@pytest.fixture(scope="module")
def ours(tiny21_checkpoint):
    pipe = QwenImagePipeline.from_pretrained(tiny21_checkpoint[0], dtype="float32")
    small = dataclasses.replace(pipe.variant, reference_area=SIDE * SIDE)
    pipe.variant = pipe.prompts.variant = small
    return pipe


def picture(width, height, seed, alpha=False) -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth gradients plus noise: resizing matters, and so does every channel.
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], -1) * 200
    rgb = np.clip(base + rng.integers(0, 55, (height, width, 3)), 0, 255).astype(np.uint8)
    if not alpha:
        return Image.fromarray(rgb, "RGB")
    a = np.clip(255 * (x / width) + rng.integers(-30, 30, (height, width)), 0, 255).astype(np.uint8)
    return Image.fromarray(np.dstack([rgb, a]), "RGBA")


def noise(width, height, seed=0):
    return np.random.default_rng(seed).standard_normal((1, (height // 16) * (width // 16), 64)).astype(np.float32)


def reference(pipe, prompt, images, width, height, latents, steps=2, **kwargs):
    with torch.no_grad():
        return pipe(prompt, image=images, width=width, height=height, num_inference_steps=steps,
                    latents=torch.from_numpy(latents), output_type="np", output_resolution=SIDE, **kwargs).images[0]


def test_prompt_features_with_two_pictures_equal_diffusers(tiny21_checkpoint, ours):
    from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_dimensions

    pipe = tiny21_checkpoint[1]
    pictures = [picture(150, 100, 0), picture(90, 120, 1, alpha=True)]
    # diffusers' encode_prompt takes the pictures as its __call__ resized them
    resized = []
    for p in pictures:
        w, h, _ = calculate_dimensions(SIDE * SIDE, p.size[0] / p.size[1])
        resized.append(pipe.image_processor.resize(p.convert("RGBA"), width=w, height=h))
    prompts = ["put the cup from <image1> on the table of <image2>", "a cup"]
    with torch.no_grad():
        ref, ref_mask, ref_slots = pipe.encode_prompt(prompts, image=resized)
    got, mask = ours.encode_prompt(prompts, images=pictures)
    assert np.array_equal(np.array(mask), ref_mask.numpy())
    assert rel_err(np.array(got), ref.numpy()) < 1e-4
    slots = ours.prompts.image_slots(prompts, [r.convert("RGB") for r in resized])
    assert np.array_equal(slots, ref_slots[0].numpy()) and np.array_equal(slots, ref_slots[1].numpy())
    assert slots.sum() == sum((w // 32) * (h // 32) for w, h in (r.size for r in resized))


@pytest.mark.parametrize("case", ["one picture", "two pictures, CFG", "RGBA picture"])
def test_edit_equals_diffusers(tiny21_checkpoint, ours, case):
    pipe = tiny21_checkpoint[1]
    width, height = 96, 64
    if case == "one picture":
        pictures, settings = [picture(140, 100, 2)], {}
    elif case == "two pictures, CFG":
        pictures, settings = [picture(100, 150, 3), picture(160, 96, 4)], {"negative_prompt": "blurry"}
    else:
        pictures, settings = [picture(120, 120, 5, alpha=True)], {}
    cfg = 3.0 if "CFG" in case else 1.0
    latents = noise(width, height, seed=7)
    ref = reference(pipe, "make the sky red", pictures, width, height, latents, true_cfg_scale=cfg, **settings)
    got = ours.generate("make the sky red", images=pictures, width=width, height=height, steps=2, cfg_scale=cfg,
                        latents=latents, output="np", **settings)
    assert got.shape == ref.shape == (height, width, 4)
    assert rel_err(got, ref) < 1e-3
    # the pictures matter
    plain = ours.generate("make the sky red", width=width, height=height, steps=2, cfg_scale=cfg, latents=latents,
                          output="np", **settings)
    assert rel_err(plain, ref) > 1e-2


def test_output_size_follows_the_last_picture_and_the_prefix_cache_is_reported(ours):
    run = ours.denoise("a fox", images=[picture(64, 64, 8), picture(200, 100, 9)], steps=1, seed=0)
    assert (run.width, run.height) == (192, 96)  # about 128x128 at 2:1, multiples of 32
    run.complete("np")
    kv = run.stats["prefix_cache"]
    # text + both pictures' latents (4x4 and 12x6 tokens); float32 keys and values of 2 blocks, 2 heads of 32
    assert kv["tokens"] > 16 + 72
    assert kv["bytes"] == 2 * 2 * kv["tokens"] * 64 * 4


def test_eleven_pictures_are_refused(ours):
    with pytest.raises(ValueError, match="takes at most 10 picture"):
        ours.generate("a fox", images=[picture(64, 64, i) for i in range(11)], steps=1)


def test_cli_edits_with_a_2_1_checkpoint_and_refuses_bad_pictures(tiny21_checkpoint, tmp_path):
    model = str(tiny21_checkpoint[0])
    paths = []
    for i, p in enumerate([picture(64, 64, 10), picture(96, 64, 11, alpha=True)]):
        paths.append(tmp_path / f"in{i}.png")
        p.save(paths[-1])
    out = tmp_path / "out.png"
    args = ["edit", "swap them", "--model", model, "--steps", "1", "--width", "64", "--height", "64", "-o", str(out)]
    result = CliRunner().invoke(cli, args + sum((["--image", str(p)] for p in paths), []))
    assert result.exit_code == 0, result.output
    saved = Image.open(out)
    assert saved.mode == "RGBA" and "in0.png" in saved.text["images"]
    assert "prefix K/V cache" in result.output

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a picture")
    strip = tmp_path / "strip.png"
    picture(340, 20, 12).save(strip)
    out2 = tmp_path / "out2.png"
    for extra, message in (
        (["--image", str(paths[0])] * 11, "11 pictures given; this checkpoint (QwenImage21Pipeline) takes at most 10"),
        (["--image", str(bad)], "cannot read image"),
        (["--image", str(tmp_path / "missing.png")], "missing.png"),
        (["--image", str(strip)], "aspect ratio beyond 16:1"),
    ):
        args = ["edit", "swap them", "--model", model, "--steps", "1", "-o", str(out2)] + extra
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1 and message in result.output, result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
        assert not out2.exists()
    result = CliRunner().invoke(cli, ["generate", "a fox", "--model", model, "--image", str(paths[0]),
                                      "-o", str(out2)])
    assert result.exit_code == 1 and "use `mlx-qwen-image edit PROMPT --image" in result.output


def test_the_pictures_prefix_cache_is_estimated_before_loading(monkeypatch):
    from mlx_qwen_image import memory
    from mlx_qwen_image.variants import VARIANTS

    v21, per_token = VARIANTS["QwenImage21Pipeline"], 32 * 2 * 4096 * 2  # blocks x K, V x width x bf16
    one = 64 + 64 * 64 + 32 * 32  # text, then a 1024x1024 picture's latents and vision tokens
    assert memory.prefix_cache_bytes(v21, [(1024, 1024)]) == one * per_token  # 2.7 GB
    assert memory.prefix_cache_bytes(v21, [(3000, 3000)] * 10, cfg=True) == 2 * (64 + 10 * (one - 64)) * per_token
    assert memory.prefix_cache_bytes(VARIANTS["QwenImageEditPlusPipeline"], [(1024, 1024)]) == 0
    monkeypatch.setattr(memory, "total_memory", lambda: 36e9)
    monkeypatch.setattr(memory, "_on_cpu", lambda: False)
    # 2.1's activations are those of its own 4096-wide transformer (and the text's K/V cache), before loading
    weights = (v21.transformer_params + v21.text_encoder_params) * 2
    assert memory.estimate_bytes("Qwen/Qwen-Image-2.1", None, 1024, 1024, False, False, variant=v21) == \
        weights + memory.activation_bytes(1024, 1024, False, 4096, 32) + memory.prefix_cache_bytes(v21)
    assert memory.too_large("Qwen/Qwen-Image-2.1", 8, 1024, 1024, False, True, variant=v21,
                            pictures=[(1024, 1024)]) is None
    warning = memory.too_large("Qwen/Qwen-Image-2.1", 8, 1024, 1024, False, True, variant=v21,
                               pictures=[(1024, 1024)] * 10)
    assert "of it the pictures' K/V cache" in warning and "fewer pictures" in warning


def test_a_picture_the_processor_would_resize_is_refused(ours, monkeypatch):
    """Each vision token stands for 2x2 of the picture's latents, so the vision tower must see the picture at the
    size the VAE does: a processor whose pixel floor is above that size is refused, not a shape error."""
    monkeypatch.setattr(ours.prompts.processor, "min_pixels", 256 * 256)
    with pytest.raises(ValueError, match="picture 1 is used at 128x128, but the vision processor's pixel bounds "
                                         "make it 256x256"):
        ours.generate("a fox", images=[picture(100, 100, 13)], steps=1, output="np")
