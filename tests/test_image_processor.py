"""The image processor against transformers' PIL Qwen2VLImageProcessor: equal pixel_values and grids."""

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
