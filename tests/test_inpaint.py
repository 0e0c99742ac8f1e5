"""Inpainting against diffusers' QwenImageInpaintPipeline and QwenImageEditInpaintPipeline on tiny random
checkpoints, from the same noise; the kept region against the picture's VAE round trip; masks and refusals."""

import numpy as np
import pytest
import torch
from conftest import rel_err
from PIL import Image, ImageDraw, ImageFilter
from test_edit import checkpoints, small_areas  # noqa: F401 (fixtures)
from test_pipeline import _packed

from mlx_qwen_image import QwenImagePipeline
from mlx_qwen_image.inpaint import mask_from, prepare_mask

WIDTH, HEIGHT = 96, 64


@pytest.fixture(scope="module")
def pipes(tiny_checkpoint):
    folder, reference = tiny_checkpoint
    return QwenImagePipeline.from_pretrained(folder, dtype="float32"), reference


def picture(width=70, height=50, seed=4) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def mask(kind: str, width=70, height=50) -> Image.Image:
    m = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(m)
    if kind == "rectangle":
        draw.rectangle([10, 8, 40, 30], fill=255)
    else:  # a soft brush stroke: grey edges, cut at 0.5 by the preprocessing
        draw.line([(5, 40), (35, 10), (65, 25)], fill=255, width=9)
        m = m.filter(ImageFilter.GaussianBlur(3))
    return m


def _mode_latents(monkeypatch, module):
    # diffusers samples the picture's latents from the VAE's distribution; we use its mean (as for img2img).
    monkeypatch.setattr(module, "retrieve_latents", lambda out, generator=None, sample_mode="": out.latent_dist.mode())


def _noise(width, height, channels=4):
    """The reference's first random draw with seed 0, in our packed layout."""
    noise = torch.randn((1, 1, channels, height // 8, width // 8), generator=torch.Generator().manual_seed(0))
    return _packed(noise.numpy())


@pytest.mark.parametrize("kind, strength, cfg_scale", [("rectangle", 0.6, 4.0), ("brush", 1.0, 4.0),
                                                       ("rectangle", 1.0, 1.0)])
def test_inpainting_equals_diffusers(pipes, monkeypatch, kind, strength, cfg_scale):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_inpaint as ref_module

    ours, reference = pipes
    _mode_latents(monkeypatch, ref_module)
    ref = ref_module.QwenImageInpaintPipeline(**reference.components)
    with torch.no_grad():
        expected = ref(prompt="a red door", image=picture(), mask_image=mask(kind), strength=strength, width=WIDTH,
                       height=HEIGHT, negative_prompt=" " if cfg_scale > 1 else None, true_cfg_scale=cfg_scale,
                       num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    got = ours.generate("a red door", image=picture(), mask=mask(kind), strength=strength, width=WIDTH,
                        height=HEIGHT, steps=4, cfg_scale=cfg_scale, latents=_noise(WIDTH, HEIGHT), output="np")
    assert rel_err(got - 0.5, expected - 0.5) < 1e-3
    plain = ours.generate("a red door", image=picture(), strength=strength, width=WIDTH, height=HEIGHT, steps=4,
                          cfg_scale=cfg_scale, latents=_noise(WIDTH, HEIGHT), output="np")
    assert rel_err(plain - 0.5, expected - 0.5) > 1e-2  # the mask matters


def test_mask_crop_equals_diffusers_padding_mask_crop(pipes, monkeypatch):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_inpaint as ref_module

    from mlx_qwen_image.inpaint import crop_region

    ours, reference = pipes
    _mode_latents(monkeypatch, ref_module)
    ref = ref_module.QwenImageInpaintPipeline(**reference.components)
    source = picture(150, 110, 6)
    region = Image.new("L", (150, 110), 0)
    ImageDraw.Draw(region).rectangle([90, 60, 120, 80], fill=255)  # small, off-centre: the crop matters
    with torch.no_grad():
        expected = ref(prompt="a window", image=source, mask_image=region, strength=1.0, width=WIDTH, height=HEIGHT,
                       padding_mask_crop=12, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                       output_type="pil").images[0]
    assert expected.size == source.size  # pasted back into the picture at its own size
    assert crop_region(region, WIDTH, HEIGHT, 12) == ref.mask_processor.get_crop_region(region, WIDTH, HEIGHT, 12)
    got = ours.generate("a window", image=source, mask=region, strength=1.0, width=WIDTH, height=HEIGHT,
                        mask_crop=12, steps=3, cfg_scale=1.0, latents=_noise(WIDTH, HEIGHT))
    assert got.size == source.size
    a, b = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    assert np.abs(a - b).max() <= 1  # 8-bit rounding of a 1e-6 difference
    keep = np.asarray(region) == 0
    assert np.array_equal(np.asarray(got)[keep], np.asarray(source)[keep])  # the rest is the picture itself
    with pytest.raises(ValueError, match="mask_crop applies to inpainting a picture"):
        ours.generate("x", mask_crop=4, steps=1)


def test_outside_the_mask_is_the_pictures_vae_round_trip(pipes):
    """The kept latents are the picture's exactly (what the reference's blend gives). Decoded, pixels away from the
    repainted corner are the picture's VAE round trip up to the decoder's mid-block attention, which lets every
    latent touch every pixel a little."""
    from mlx_qwen_image.image import resize

    ours, _ = pipes
    width, height = 192, 128
    region = Image.new("L", (70, 50), 0)
    ImageDraw.Draw(region).rectangle([0, 0, 15, 11], fill=255)  # the top-left corner: 48x32 px at 192x128
    run = ours.denoise("a red door", image=picture(), mask=region, strength=1.0, width=width, height=height,
                       steps=3, cfg_scale=1.0, latents=_noise(width, height))
    image = run.complete("np")[0]
    start = np.array(ours.encode_image(resize(picture(), width, height)))
    keep = prepare_mask(region, width, height)[::8, ::8] == 0
    kept_tokens = _packed(np.broadcast_to(keep, (1, 1, 4) + keep.shape).astype(np.float32))[0, :, 0] == 1
    latents = np.array(run.latents)
    np.testing.assert_allclose(latents[0, kept_tokens], start[0, kept_tokens], rtol=0, atol=1e-6)
    assert not np.allclose(latents[0, ~kept_tokens], start[0, ~kept_tokens], atol=1e-2)
    round_trip = ours.generate("a red door", image=picture(), mask=Image.new("L", (70, 50), 0), strength=1.0,
                               width=width, height=height, steps=1, cfg_scale=1.0, output="np")
    far = np.ones((height, width), bool)
    far[: 32 + 48, : 48 + 48] = False  # the repainted corner and a 48 px margin
    assert rel_err(image[far], round_trip[far]) < 5e-3
    near = ~far
    assert rel_err(image[near], round_trip[near]) > 4 * rel_err(image[far], round_trip[far])


def test_edit_inpainting_equals_diffusers(checkpoints, small_areas, monkeypatch):  # noqa: F811
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_inpaint as ref_module

    folder, reference = checkpoints["edit"]
    _mode_latents(monkeypatch, ref_module)
    original = ref_module.calculate_dimensions
    monkeypatch.setattr(ref_module, "calculate_dimensions", lambda area, ratio: original(64 * 64, ratio))
    ref = ref_module.QwenImageEditInpaintPipeline(**reference.components)
    source, region = picture(100, 70, 5), mask("rectangle", 100, 70)
    with torch.no_grad():
        expected = ref(prompt="make the door blue", image=source, mask_image=region, strength=0.8,
                       negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=3,
                       generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    ours = QwenImagePipeline.from_pretrained(folder, dtype="float32")
    height, width = expected.shape[:2]
    got = ours.generate("make the door blue", images=[source], mask=region, strength=0.8, steps=3, cfg_scale=4.0,
                        latents=_noise(width, height), output="np")
    assert got.shape == expected.shape
    assert rel_err(got - 0.5, expected - 0.5) < 1e-3
    with pytest.raises(ValueError, match="with a mask the output is the last picture at its own size"):
        ours.generate("x", images=[source], mask=region, width=32, height=32, steps=1)


def test_masks_and_refusals(pipes, tmp_path):
    ours, _ = pipes
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 255))
    rgba.putpixel((2, 3), (0, 0, 0, 0))
    region = np.asarray(mask_from(rgba))
    assert region[3, 2] == 255 and region.sum() == 255  # transparent pixels are repainted
    assert np.asarray(mask_from(Image.new("RGBA", (4, 4), (255, 255, 255, 255)))).min() == 255  # opaque: brightness
    soft = Image.new("L", (4, 4), 127)
    assert prepare_mask(soft, 4, 4).max() == 0 and prepare_mask(Image.new("L", (4, 4), 128), 4, 4).min() == 1
    with pytest.raises(ValueError, match="mask= needs the picture it applies to"):
        ours.generate("x", mask=mask("rectangle"), steps=1)
    with pytest.raises(ValueError, match="mask_blur must be at least 0"):
        ours.generate("x", image=picture(), mask=mask("rectangle"), mask_blur=-1, steps=1)
    with pytest.raises(ValueError, match="cannot read image"):
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"nope")
        ours.generate("x", image=picture(), mask=bad, steps=1)


def test_cli_inpaints_and_says_what_is_wrong(tiny_checkpoint, pipes, tmp_path):
    from click.testing import CliRunner

    from mlx_qwen_image.cli import cli

    ours, _ = pipes
    source, region, out = tmp_path / "in.png", tmp_path / "mask.png", tmp_path / "out.png"
    picture().save(source)
    mask("rectangle").save(region)
    args = ["generate", "a red door", "--model", str(tiny_checkpoint[0]), "--image", str(source), "--width", "96",
            "--height", "64", "--steps", "2", "--seed", "5", "--cfg-scale", "1", "--dtype", "float32"]
    result = CliRunner().invoke(cli, args + ["--mask", str(region), "--mask-blur", "1.5", "-o", str(out)])
    assert result.exit_code == 0, result.output
    saved = Image.open(out)
    assert saved.text["mask"] == str(region) and saved.text["mask_blur"] == "1.5"
    expected = ours.generate("a red door", image=str(source), mask=str(region), mask_blur=1.5, width=96, height=64,
                             steps=2, seed=5, cfg_scale=1.0)
    np.testing.assert_array_equal(np.asarray(saved), np.asarray(expected))
    cropped = tmp_path / "cropped.png"
    result = CliRunner().invoke(cli, args + ["--mask", str(region), "--mask-crop", "8", "-o", str(cropped)])
    assert result.exit_code == 0, result.output
    assert Image.open(cropped).size == picture().size and Image.open(cropped).text["mask_crop"] == "8"
    for extra, message in ((["--mask", str(region)], None), (["--mask", str(tmp_path / "none.png")], "none.png")):
        base = args if message else [a for a in args if a not in ("--image", str(source))]
        result = CliRunner().invoke(cli, base + extra + ["-o", str(tmp_path / "x.png")])
        assert result.exit_code != 0 and not (tmp_path / "x.png").exists()
        assert (message or "--mask needs --image") in result.output and "Traceback" not in result.output
