"""The image processor against transformers' PIL Qwen2VLImageProcessor: equal pixel_values and grids."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from conftest import RELEASED

from mlx_qwen_image.image_processor import IMAGE_PAD, QwenImageProcessor, smart_resize
from mlx_qwen_image.tokenizer import QwenTokenizer

# Small max_pixels so that a modest picture already needs downscaling; the released value is 12845056.
CONFIG = dict(min_pixels=56 * 56, max_pixels=160 * 28 * 28, patch_size=14, temporal_patch_size=2, merge_size=2)


def reference_processor(**overrides):
    # The PIL/numpy class: transformers' default Qwen2VLImageProcessor needs torchvision.
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**{**CONFIG, **overrides})


def random_image(height, width, mode="RGB", seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    # Smooth structure plus noise, so resampling has edges and gradients to get right.
    y, x = np.mgrid[0:height, 0:width]
    base = 127 + 100 * np.sin(x / 7.0)[..., None] * np.cos(y / 11.0)[..., None]
    pixels = np.clip(base + rng.normal(0, 40, (height, width, channels)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode)


# (height, width): plain rounding, downscaled to max_pixels, upscaled to min_pixels, tall and thin.
SIZES = [(300, 457), (700, 433), (37, 61), (250, 90)]


def test_resize_rules_cover_both_bounds():
    h, w = smart_resize(700, 433, 28, CONFIG["min_pixels"], CONFIG["max_pixels"])
    assert (h, w) != (700 // 28 * 28, 433 // 28 * 28) and h * w <= CONFIG["max_pixels"]
    h, w = smart_resize(37, 61, 28, CONFIG["min_pixels"], CONFIG["max_pixels"])
    assert h * w >= CONFIG["min_pixels"] and (h, w) != (28, 56)


def test_matches_transformers_on_several_sizes():
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    expected = reference_processor()(images, return_tensors="np")
    pixel_values, grid_thw = QwenImageProcessor.from_dict(CONFIG)(images)
    np.testing.assert_array_equal(grid_thw, expected["image_grid_thw"])
    assert pixel_values.dtype == np.float32 and pixel_values.shape[1] == 3 * 2 * 14 * 14
    np.testing.assert_array_equal(pixel_values, expected["pixel_values"])


def test_transparency_and_arrays_match_transformers():
    rgba = random_image(120, 200, "RGBA", seed=5)
    expected = reference_processor()([rgba], return_tensors="np")
    for image in (rgba, np.asarray(rgba)):
        pixel_values, grid_thw = QwenImageProcessor.from_dict(CONFIG)(image)
        np.testing.assert_array_equal(grid_thw, expected["image_grid_thw"])
        np.testing.assert_array_equal(pixel_values, expected["pixel_values"])


def test_config_file_and_released_defaults(tmp_path):
    from mlx_qwen_image.config import CheckpointError

    with pytest.raises(CheckpointError, match="preprocessor_config.json: No such file"):  # never guessed
        QwenImageProcessor.from_pretrained(tmp_path)
    released = reference_processor(min_pixels=3136, max_pixels=12845056)
    ours = QwenImageProcessor()
    assert (ours.min_pixels, ours.max_pixels) == (released.size["shortest_edge"], released.size["longest_edge"])
    assert ours.image_mean == tuple(released.image_mean) and ours.image_std == tuple(released.image_std)
    # Newer transformers write the bounds under "size"; older files as min/max_pixels.
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"size": {"shortest_edge": 1000, "longest_edge": 5000}, "image_processor_type": "X"})
    )
    assert (QwenImageProcessor.from_pretrained(tmp_path).min_pixels,
            QwenImageProcessor.from_pretrained(tmp_path).max_pixels) == (1000, 5000)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 7, "max_pixels": 9}))
    assert QwenImageProcessor.from_pretrained(tmp_path).max_pixels == 9
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"patch_size": 0}))
    with pytest.raises(CheckpointError, match="preprocessor_config.json: patch_size must be at least 1, got 0"):
        QwenImageProcessor.from_pretrained(tmp_path)


def test_image_token_count_follows_the_grid():
    ours = QwenImageProcessor.from_dict(CONFIG)
    images = [random_image(h, w) for h, w in SIZES[:2]]
    _, grid_thw = ours(images)
    text = "".join(f"Picture {i}: <|vision_start|>{IMAGE_PAD}<|vision_end|>" for i in (1, 2))
    expanded = ours.expand_image_tokens(text, grid_thw)
    counts = [int(g.prod()) // 4 for g in grid_thw]
    assert expanded.count(IMAGE_PAD) == sum(counts)
    assert f"<|vision_start|>{IMAGE_PAD * counts[0]}<|vision_end|>Picture 2" in expanded
    ids = QwenTokenizer.from_pretrained(RELEASED / "tokenizer").encode(expanded)
    assert ids.count(151655) == sum(counts), "each placeholder must stay one token"
    reference = reference_processor()
    for (h, w), n in zip(SIZES[:2], counts):
        assert reference.get_number_of_image_patches(h, w) // 4 == n
    with pytest.raises(ValueError, match="placeholders"):
        ours.expand_image_tokens(text, grid_thw[:1])


# Qwen3-VL's preprocessor_config.json (the vision tower of Qwen-Image 2.1), as its checkpoints ship it: the bounds
# only under "size"; transformers runs it through Qwen2VLImageProcessor.
QWEN3_VL = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "image_processor_type": "Qwen2VLImageProcessorFast",
}
# Plain rounding (landscape, portrait), then below the 65536 floor so upscaled: small, tall, a 47:1 strip, and
# tiny pictures (upscaled like transformers does, not refused).
QWEN3_SIZES = [(300, 457), (700, 433), (37, 61), (250, 90), (40, 1900), (8, 8), (1, 1)]


def qwen3_reference(config=QWEN3_VL):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # A deep copy: its constructor writes min/max_pixels into the size dict it is given.
    config = json.loads(json.dumps(config))
    return Qwen2VLImageProcessorPil(**{k: v for k, v in config.items() if k != "image_processor_type"})


def assert_matches(ours, reference, images):
    expected = reference(images, return_tensors="np")
    pixel_values, grid_thw = ours(images)
    np.testing.assert_array_equal(grid_thw, expected["image_grid_thw"])
    assert pixel_values.dtype == np.float32
    assert pixel_values.shape[1] == 3 * ours.temporal_patch_size * ours.patch_size**2
    np.testing.assert_array_equal(pixel_values, expected["pixel_values"])  # bit for bit
    return grid_thw


def test_qwen3_vl_matches_transformers():
    ours = QwenImageProcessor.from_dict(QWEN3_VL)
    assert (ours.factor, ours.min_pixels, ours.max_pixels) == (32, 65536, 16777216)
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(QWEN3_SIZES)]
    images.append(random_image(130, 210, "RGBA", seed=9))  # composited onto white, as transformers does
    grids = assert_matches(ours, qwen3_reference(), images)
    assert all((h * 16 * w * 16) >= 65536 for _, h, w in grids)  # every picture reached the floor
    reference = qwen3_reference()
    for (h, w), grid in zip(QWEN3_SIZES, grids):
        assert reference.get_number_of_image_patches(h, w) == grid.prod()
        assert ours.num_image_tokens(grid) == grid.prod() // 4


def test_qwen3_vl_top_level_bounds_win_like_transformers():
    # A file with both spellings: transformers lets min_pixels/max_pixels override size; so do we. A small ceiling
    # exercises the downscaling branch at factor 32 without a 16-megapixel picture.
    config = {**QWEN3_VL, "min_pixels": 4096, "max_pixels": 300 * 32 * 32}
    ours = QwenImageProcessor.from_dict(config)
    reference = qwen3_reference(config)
    assert (ours.min_pixels, ours.max_pixels) == (reference.size.shortest_edge, reference.size.longest_edge)
    images = [random_image(900, 1300, seed=1), random_image(1000, 240, "RGBA", seed=2), random_image(20, 30)]
    grids = assert_matches(ours, reference, images)
    assert grids[0].prod() * 16 * 16 <= 300 * 32 * 32 < 900 * 1300


def test_qwen3_vl_config_file(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(QWEN3_VL, indent=2))
    ours = QwenImageProcessor.from_pretrained(tmp_path)
    assert (ours.patch_size, ours.merge_size, ours.temporal_patch_size) == (16, 2, 2)
    assert ours.image_mean == ours.image_std == (0.5, 0.5, 0.5)
    assert (ours.min_pixels, ours.max_pixels, ours.factor) == (65536, 16777216, 32)
    # What transformers itself writes for this config (with do_*, resample and rescale_factor) reads the same.
    saved = tmp_path / "saved"
    qwen3_reference().save_pretrained(saved)
    assert QwenImageProcessor.from_pretrained(saved) == ours
    assert QwenImageProcessor() == QwenImageProcessor.from_dict({}), "Qwen2-VL's defaults are unchanged"


def one_line_error(match, call, *args):
    with pytest.raises(ValueError, match=match) as info:
        call(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_unusable_pictures_are_refused_in_one_line():
    ours = QwenImageProcessor.from_dict(QWEN3_VL)
    # 300:1 strips: transformers refuses them too (its "absolute aspect ratio must be smaller than 200").
    for height, width in ((10, 3000), (900, 3)):
        strip = random_image(height, width)
        with pytest.raises(ValueError, match="aspect ratio"):
            qwen3_reference()(strip, return_tensors="np")
        message = one_line_error(r"aspect ratio of 300:1, above the 200:1 .*crop or pad", ours, strip)
        assert f"{width}x{height} (width x height)" in message
    # An empty picture: transformers fails with a ZeroDivisionError; we say what is wrong.
    one_line_error(r"0x8 \(width x height\) has no pixels", ours, Image.new("RGB", (0, 8)))
    # A side that would round to zero patches: only reachable with a min_pixels no config file may hold.
    unbounded = QwenImageProcessor(**{**dataclasses.asdict(ours), "min_pixels": 0})
    one_line_error(r"8x8 \(width x height\) resizes to 0x0, under one 32x32 merged token; set min_pixels",
                   unbounded, random_image(8, 8))
    from mlx_qwen_image.config import ConfigError

    with pytest.raises(ConfigError, match="min_pixels must be at least 1, got 0"):  # which is why
        QwenImageProcessor.from_dict({**QWEN3_VL, "min_pixels": 0})
    one_line_error("no images were given", ours, [])
    one_line_error(r"HxWx4 \(RGBA\), got shape \(8, 8, 2\)", ours, np.zeros((8, 8, 2), np.uint8))
