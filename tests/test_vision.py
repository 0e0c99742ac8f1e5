"""The vision tower and the text encoder with pictures against transformers' Qwen2.5-VL (tiny random configs,
float32), and strict lazy loading of the full-size tower under both checkpoint spellings."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import RELEASED, randomize_, rel_err, torch_weights
from test_text_encoder import TINY_TEXT

from mlx_qwen_image.config import TextEncoderConfig, VisionConfig
from mlx_qwen_image.models.text_encoder import QwenTextEncoder, mrope_positions
from mlx_qwen_image.models.vision import VisionModel

# Windowed blocks 0 and 2, full attention in block 1. With the real patch (14) and window (112 px = 4x4 merge
# blocks), the grids below split into several windows, partial ones at the right and bottom edges.
TINY_VISION = dict(
    depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[1]
)
IMAGE_PAD, VISION_START, VISION_END = 151655, 151652, 151653
# Patch grids (t, h, w): 8x11 merge blocks (the height a multiple of the window), 5x14, and 3x2 (one window).
GRIDS = np.array([[1, 16, 22], [1, 10, 28], [1, 6, 4]])


def patches(grids, seed=0) -> np.ndarray:
    rows = int(grids.prod(1).sum())
    return np.random.default_rng(seed).standard_normal((rows, 3 * 2 * 14 * 14)).astype(np.float32)


@pytest.fixture(scope="module")
def tower():
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(vision_config=TINY_VISION).vision_config
    reference = randomize_(Qwen2_5_VisionTransformerPretrainedModel(config).eval(), std=0.2)
    ours = VisionModel(VisionConfig.from_dict(config.to_dict()))
    ours.load_weights(list(ours.sanitize(torch_weights(reference)).items()), strict=True)
    return reference, ours


def test_vision_config_released():
    released = json.loads((RELEASED / "text_encoder" / "config.json").read_text())
    assert TextEncoderConfig.from_dict(released).vision_config == VisionConfig()
    assert VisionConfig().head_dim == 80 and TextEncoderConfig().mrope_section == (16, 24, 24)


def test_tower_matches_transformers_two_images(tower):
    reference, ours = tower
    grids = GRIDS[:2]  # two non-square images of different sizes in one call
    pixels = patches(grids)
    with torch.no_grad():
        expected = reference(torch.from_numpy(pixels), grid_thw=torch.from_numpy(grids)).pooler_output.numpy()
    got = np.array(ours(mx.array(pixels), grids))
    assert got.shape == (pixels.shape[0] // 4, 64)
    assert rel_err(got, expected) < 1e-4

    # The check sees the attention pattern: full attention everywhere, or no image boundaries, is far off.
    all_full = VisionModel(VisionConfig(**{**vars(ours.config), "fullatt_block_indexes": (0, 1, 2)}))
    all_full.update(ours.parameters())
    assert rel_err(np.array(all_full(mx.array(pixels), grids)), expected) > 1e-2
    one_image = np.array(ours(mx.array(pixels[: 16 * 22]), grids[:1]))
    assert rel_err(one_image, expected[: 16 * 22 // 4]) < 1e-4, "images must not see each other"


def test_tower_bfloat16_close_to_float32_reference(tower):
    import copy

    reference, ours = tower
    grids = GRIDS[1:]
    pixels = patches(grids, seed=4)
    with torch.no_grad():
        expected = reference(torch.from_numpy(pixels), grid_thw=torch.from_numpy(grids)).pooler_output.numpy()
        in_bf16 = copy.deepcopy(reference).to(torch.bfloat16)
        expected_bf16 = in_bf16(torch.from_numpy(pixels), grid_thw=torch.from_numpy(grids)).pooler_output
    half = VisionModel(ours.config)
    half.update(ours.parameters())
    half.set_dtype(mx.bfloat16)
    got = half(mx.array(pixels), grids)  # float32 patches: the tower casts them to its own dtype
    assert got.dtype == mx.bfloat16
    err, err_ref = rel_err(np.array(got.astype(mx.float32)), expected), rel_err(expected_bf16.float().numpy(), expected)
    assert err < max(2 * err_ref, 1e-2), f"{err} vs transformers bf16 {err_ref}"


def test_tower_rejects_mismatched_patches(tower):
    _, ours = tower
    with pytest.raises(ValueError, match="patches do not match"):
        ours(mx.array(patches(GRIDS[:1])), GRIDS[:2])


# ---- the text encoder with pictures ----------------------------------------------------------------------


def prompt_ids(rng, images: list[int], words=(5, 3, 4)) -> list[int]:
    """Text, then per image <|vision_start|> <|image_pad|> * n <|vision_end|> and more text."""
    ids = list(rng.integers(0, 151643, words[0]))
    for n in images:
        ids += [VISION_START] + [IMAGE_PAD] * n + [VISION_END] + list(rng.integers(0, 151643, words[1]))
    return ids + list(rng.integers(0, 151643, words[2]))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(text_config=TINY_TEXT, vision_config=TINY_VISION, tie_word_embeddings=False)
    reference = randomize_(Qwen2_5_VLForConditionalGeneration(config).eval())
    folder = tmp_path_factory.mktemp("text_encoder_vision")
    reference.save_pretrained(folder)  # transformers 5 names (model.visual.*, model.language_model.*)
    ours = QwenTextEncoder.from_config(json.loads((folder / "config.json").read_text()), vision=True)
    weights = mx.load(str(folder / "model.safetensors"))
    ours.load_weights(list(ours.sanitize(weights).items()), strict=True)
    return reference, ours


def batch_with_images(grids):
    """Row 0 holds images 0 and 1, row 1 (shorter, right-padded) image 2."""
    rng = np.random.default_rng(1)
    counts = [int(g.prod()) // 4 for g in grids]
    rows = [prompt_ids(rng, counts[:2]), prompt_ids(rng, counts[2:], words=(2, 6, 1))]
    ids = np.full((2, max(map(len, rows))), 151643, dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    assert mask[1].sum() < ids.shape[1]
    return ids, mask


def reference_hidden(model, ids, mask, pixels, grids) -> np.ndarray:
    # transformers 5 needs the processor's mm_token_type_ids (1 = image token) to build the 3-D positions;
    # without it the model silently falls back to 1-D positions (diffusers issue 14194).
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            pixel_values=torch.from_numpy(pixels),
            image_grid_thw=torch.from_numpy(grids),
            mm_token_type_ids=torch.from_numpy((ids == IMAGE_PAD).astype(np.int64)),
            output_hidden_states=True,
        )
    return out.hidden_states[-1].numpy()


def test_text_encoder_with_images_matches_transformers(encoder):
    reference, ours = encoder
    ids, mask = batch_with_images(GRIDS)
    pixels = patches(GRIDS, seed=2)
    expected = reference_hidden(reference, ids, mask, pixels, GRIDS)
    got = np.array(ours(mx.array(ids.astype(np.int32)), mx.array(mask.astype(np.int32)), mx.array(pixels), GRIDS))
    for i, n in enumerate(mask.sum(1)):
        assert rel_err(got[i, :n], expected[i, :n]) < 1e-4, f"row {i}"

    # Precomputed tower features give the same result (one tower pass for a positive and a negative prompt).
    features = ours.visual(mx.array(pixels), GRIDS)
    again = np.array(ours(mx.array(ids.astype(np.int32)), mx.array(mask.astype(np.int32)),
                          image_grid_thw=GRIDS, image_embeds=features))
    np.testing.assert_allclose(again, got, rtol=1e-6, atol=1e-6)

    # The 3-D positions matter here: 1-D positions (the text-only path on the same embeddings) are far off.
    x = ours.model.embed_tokens(mx.array(ids[:1, : mask[0].sum()].astype(np.int32)))
    slots = np.flatnonzero(ids[0, : mask[0].sum()] == IMAGE_PAD)
    x[:, mx.array(slots)] = features[: len(slots)][None]
    one_d = np.array(ours.model(x, "causal", None))[0]
    assert rel_err(one_d, expected[0, : mask[0].sum()]) > 1e-3


def test_mrope_positions_follow_get_rope_index(encoder):
    reference, _ = encoder
    ids, mask = batch_with_images(GRIDS)
    expected, _ = reference.model.get_rope_index(
        torch.from_numpy(ids),
        mm_token_type_ids=torch.from_numpy((ids == IMAGE_PAD).astype(np.int64)),
        image_grid_thw=torch.from_numpy(GRIDS),
        attention_mask=torch.from_numpy(mask),
    )
    got = mrope_positions(ids, mask, GRIDS, IMAGE_PAD, 2)
    np.testing.assert_array_equal(got, expected.numpy())
    with pytest.raises(ValueError, match="do not match"):
        mrope_positions(ids, mask, GRIDS[[1, 0, 2]], IMAGE_PAD, 2)


def test_text_only_calls_skip_the_tower(encoder):
    reference, ours = encoder
    rng = np.random.default_rng(3)
    ids = np.array([rng.integers(0, 151643, 12)])
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(ids), output_hidden_states=True).hidden_states[-1].numpy()
    assert rel_err(np.array(ours(mx.array(ids.astype(np.int32)))), expected) < 1e-4


def test_without_vision_the_tower_is_neither_built_nor_loaded(encoder):
    _, with_vision = encoder
    config = with_vision.config
    plain = QwenTextEncoder(config)
    assert not plain.has_vision and with_vision.has_vision
    weights = {"visual.blocks.0.norm1.weight": mx.zeros((32,)), "model.norm.weight": mx.zeros((64,))}
    assert set(plain.sanitize(weights)) == {"model.norm.weight"}
    with pytest.raises(ValueError, match="vision tower"):
        plain(mx.array([[IMAGE_PAD]]), pixel_values=mx.zeros((4, 1176)), image_grid_thw=[[1, 2, 2]])


# ---- full size --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["text_encoder_legacy", "text_encoder_v5"])
def test_full_size_vision_tower_loads_strictly(manifest, spelling):
    released = json.loads((RELEASED / "text_encoder" / "config.json").read_text())
    mx.reset_peak_memory()
    model = QwenTextEncoder.from_config(released, vision=True)
    weights = {name: mx.zeros(shape, dtype=mx.bfloat16) for name, shape in manifest[spelling].items()}
    visual = [k for k in weights if k.startswith(("visual.", "model.visual."))]
    assert len(visual) == 32 * 12 + 1 + 5  # blocks, patch embedding, merger (ln_q, 2 linears)
    sanitized = model.sanitize(weights)
    model.load_weights(list(sanitized.items()), strict=True)
    assert len(sanitized) == len(weights) - 1  # everything but lm_head
    assert sanitized["visual.patch_embed.proj.weight"].shape == (1280, 1176)
    assert mx.get_peak_memory() < 2**30, "sanitize or load_weights evaluated the weights"
