"""Qwen3-VL's vision tower against transformers' Qwen3VLVisionModel (tiny random configs, float32), its position
embedding taps against transformers' own helper, and strict lazy loading of the full-size tower under both
checkpoint spellings."""

import copy

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import TINY21_TEXT_ENCODER, randomize_, rel_err, torch_weights
from mlx.utils import tree_flatten

from mlx_qwen_image.config import ConfigError
from mlx_qwen_image.models.vision21 import Qwen3VisionTower, Vision21Config, grid_layout

# An 8 x 8 position table; deepstack after blocks 0 and 2 (the last), so the last deepstack merger and the final
# merger read the same hidden states through different norms.
TINY = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
            num_position_embeddings=64, deepstack_visual_indexes=[0, 2])
# Patch grids (t, h, w): smaller than the table (6x8), a two-frame clip (frames attend separately) and one larger
# than the table both ways (12x18), all non-square.
GRIDS = np.array([[1, 6, 8], [2, 4, 10], [1, 12, 18]])
# Ours is within ~1e-6 of transformers; swapping the tanh and erf GELUs (blocks, mergers) moves the outputs by only
# 2e-5 .. 1e-4 here, so a looser bound would not see it.
TOL = 1e-5


def patches(grids, seed=0) -> np.ndarray:
    rows = int(grids.prod(1).sum())
    return np.random.default_rng(seed).standard_normal((rows, 3 * 2 * 16 * 16)).astype(np.float32)


def prefixed(module, prefix="model.visual.") -> dict:
    return {prefix + k: v for k, v in torch_weights(module).items()}


def build(overrides=None, seed=0):
    from transformers import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    torch.manual_seed(seed)
    config = Qwen3VLVisionConfig(**{**TINY, **(overrides or {})})
    reference = randomize_(Qwen3VLVisionModel(config).eval(), seed=seed, std=0.2)
    ours = Qwen3VisionTower(Vision21Config.from_dict(config.to_dict()))
    ours.load_weights(list(ours.sanitize(prefixed(reference)).items()), strict=True)
    return reference, ours


@pytest.fixture(scope="module")
def tower():
    return build()


def reference_outputs(reference, pixels, grids):
    with torch.no_grad():
        out = reference(torch.from_numpy(pixels), grid_thw=torch.from_numpy(grids))
    return out.pooler_output.float().numpy(), [d.float().numpy() for d in out.deepstack_features]


def test_config_defaults_follow_transformers():
    from transformers import Qwen3VLVisionConfig

    reference = Qwen3VLVisionConfig().to_dict()
    assert Vision21Config.from_dict({**reference, "unknown_key": 1}) == Vision21Config()
    config = Vision21Config.from_dict({"out_hidden_size": 4096, "rope_parameters": {"rope_theta": 500.0}})
    assert (config.out_hidden_size, config.rope_theta, config.head_dim, config.grid_side) == (4096, 500.0, 72, 48)
    for bad in ({"hidden_act": "relu"}, {"num_heads": 5}, {"deepstack_visual_indexes": [8, 27]},
                {"deepstack_visual_indexes": [8, 8]}, {"depth": 0}, {"rope_parameters": {"rope_type": "mrope"}}):
        with pytest.raises(ConfigError):
            Vision21Config.from_dict(bad)


def test_position_taps_match_transformers():
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    # The tiny table and the real one (48 x 48); grids smaller, equal and larger, one row of blocks, a clip.
    for side, grids in ((8, GRIDS), (8, np.array([[1, 8, 8], [1, 2, 14]])),
                        (48, np.array([[1, 64, 90], [1, 2, 48], [3, 30, 22]]))):
        config = Vision21Config(num_position_embeddings=side * side)
        layout = grid_layout(grids.tolist(), config)
        index, weight = get_vision_interpolation_indices_and_weights(
            torch.from_numpy(grids), num_grid_per_side=side, mode="bilinear", align_corners=True, spatial_merge_size=2)
        np.testing.assert_array_equal(np.array(layout.pos_index), index.numpy())
        np.testing.assert_array_equal(np.array(layout.pos_weight), weight.numpy())
    # A grid the size of the table reads each entry once, in merge-block order.
    layout = grid_layout([[1, 8, 8]], Vision21Config(num_position_embeddings=64))
    first = np.array(layout.pos_index)[np.array(layout.pos_weight) == 1]
    assert first[:6].tolist() == [0, 1, 8, 9, 2, 3] and sorted(first.tolist()) == list(range(64))


def test_tower_matches_transformers(tower):
    reference, ours = tower
    pixels = patches(GRIDS)
    expected, expected_deepstack = reference_outputs(reference, pixels, GRIDS)
    embeds, deepstack = ours(mx.array(pixels), GRIDS)
    assert embeds.shape == (pixels.shape[0] // 4, 64) and len(deepstack) == len(expected_deepstack) == 2
    assert rel_err(np.array(embeds), expected) < TOL
    for i, (got, want) in enumerate(zip(deepstack, expected_deepstack)):
        assert rel_err(np.array(got), want) < TOL, f"deepstack {i}"
    # The deepstack features are not the final ones (block 2 feeds both, through different norms and weights).
    assert rel_err(np.array(deepstack[1]), expected) > 0.1

    # Images, and the frames of a clip, do not see each other; the tower's output per image is the same alone.
    first = 6 * 8
    alone, alone_deepstack = ours(mx.array(pixels[:first]), GRIDS[:1])
    assert rel_err(np.array(alone), expected[: first // 4]) < TOL
    assert rel_err(np.array(alone_deepstack[0]), expected_deepstack[0][: first // 4]) < TOL
    clip, _ = ours(mx.array(pixels[first: first + 40]), [[1, 4, 10]])
    assert rel_err(np.array(clip), expected[first // 4: (first + 40) // 4]) < TOL


def test_deepstack_order_follows_blocks_mergers_follow_the_list():
    # Unsorted indexes: the features come out in block order, each through the merger at its index's place.
    reference, ours = build({"deepstack_visual_indexes": [2, 0]}, seed=1)
    grids = GRIDS[2:]
    pixels = patches(grids, seed=1)
    expected, expected_deepstack = reference_outputs(reference, pixels, grids)
    embeds, deepstack = ours(mx.array(pixels), grids)
    assert rel_err(np.array(embeds), expected) < TOL
    for got, want in zip(deepstack, expected_deepstack):
        assert rel_err(np.array(got), want) < TOL
    assert rel_err(np.array(deepstack[1]), expected_deepstack[0]) > 0.1


def test_tower_bfloat16_close_to_float32_reference(tower):
    reference, ours = tower
    grids = GRIDS[:2]
    pixels = patches(grids, seed=4)
    expected, _ = reference_outputs(reference, pixels, grids)
    expected_bf16, _ = reference_outputs(copy.deepcopy(reference).to(torch.bfloat16), pixels, grids)
    half = Qwen3VisionTower(ours.config)
    half.update(ours.parameters())
    half.set_dtype(mx.bfloat16)
    got, deepstack = half(mx.array(pixels), grids)  # float32 patches: the tower casts them to its own dtype
    assert got.dtype == mx.bfloat16 and all(d.dtype == mx.bfloat16 for d in deepstack)
    err, err_ref = rel_err(np.array(got.astype(mx.float32)), expected), rel_err(expected_bf16, expected)
    assert err < max(2 * err_ref, 1e-2), f"{err} vs transformers bf16 {err_ref}"


def test_tower_rejects_bad_inputs(tower):
    _, ours = tower
    with pytest.raises(ValueError, match="do not match"):
        ours(mx.array(patches(GRIDS[:1])), GRIDS[:2])
    with pytest.raises(ValueError, match="merge size"):
        ours(mx.array(patches(np.array([[1, 3, 4]]))), [[1, 3, 4]])


# ---- checkpoint names ------------------------------------------------------------------------------------------


def test_sanitize_both_spellings_load_strictly():
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    full = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**TINY21_TEXT_ENCODER)).eval()
    randomize_(full.model.visual, std=0.2)
    v5 = torch_weights(full)  # transformers 5 names: model.visual.*, model.language_model.*, lm_head.*
    assert any(k.startswith("model.visual.") for k in v5) and any(k.startswith("model.language_model.") for k in v5)
    legacy = {k.replace("model.visual.", "visual.").replace("model.language_model.", "model."): v
              for k, v in v5.items()}
    assert not any(k.startswith("model.visual.") for k in legacy)

    grids = np.array([[1, 4, 6], [1, 2, 2]])
    pixels = patches(grids, seed=5)
    expected, expected_deepstack = reference_outputs(full.model.visual, pixels, grids)
    config = Vision21Config.from_dict(full.config.vision_config.to_dict())
    outputs = []
    for weights in (v5, legacy):
        ours = Qwen3VisionTower(config)
        sanitized = ours.sanitize(weights)
        assert sanitized["patch_embed.proj.weight"].shape == (32, 1536)
        ours.load_weights(list(sanitized.items()), strict=True)
        outputs.append(ours(mx.array(pixels), grids))
    for embeds, deepstack in outputs:
        assert rel_err(np.array(embeds), expected) < TOL
        assert rel_err(np.array(deepstack[0]), expected_deepstack[0]) < TOL
    np.testing.assert_array_equal(np.array(outputs[0][0]), np.array(outputs[1][0]))

    # strict loading sees a missing tower weight.
    ours = Qwen3VisionTower(config)
    incomplete = {k: v for k, v in ours.sanitize(v5).items() if k != "pos_embed.weight"}
    with pytest.raises(ValueError):
        ours.load_weights(list(incomplete.items()), strict=True)


def test_full_size_tower_names_and_shapes():
    """Qwen3-VL-8B's tower, built on torch's meta device and lazily in MLX: the same names and shapes. Its
    out_hidden_size is 4096 (the 8B language model's width), not transformers' default 3584, so it is set here."""
    from transformers import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    config = Qwen3VLVisionConfig(out_hidden_size=4096)
    with torch.device("meta"):
        reference = Qwen3VLVisionModel(config)
    names = {f"model.visual.{k}": tuple(v.shape) for k, v in reference.state_dict().items()}
    assert len(names) == 27 * 12 + 3 + 6 + 3 * 6  # blocks, patch embedding + pos_embed, mergers

    mx.reset_peak_memory()
    ours = Qwen3VisionTower(Vision21Config.from_dict(config.to_dict()))
    ours_shapes = {k: tuple(v.shape) for k, v in tree_flatten(ours.parameters())}
    weights = {name: mx.zeros(shape, dtype=mx.bfloat16) for name, shape in names.items()}
    sanitized = ours.sanitize(weights)
    assert {k: tuple(v.shape) for k, v in sanitized.items()} == ours_shapes
    assert ours_shapes["patch_embed.proj.weight"] == (1152, 1536) and ours_shapes["pos_embed.weight"] == (2304, 1152)
    assert ours_shapes["merger.linear_fc2.weight"] == (4096, 4608) and ours_shapes["merger.norm.weight"] == (1152,)
    assert ours_shapes["deepstack_merger_list.2.norm.weight"] == (4608,)  # normalised after the 2x2 shuffle
    ours.load_weights(list(sanitized.items()), strict=True)
    assert mx.get_peak_memory() < 2**28, "building, sanitize or load_weights evaluated the weights"
