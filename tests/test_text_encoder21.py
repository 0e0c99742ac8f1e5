"""Qwen-Image 2.1's text encoder (Qwen3-VL's language model) against transformers' Qwen3VLForConditionalGeneration:
pre-norm features as diffusers reads them, logits, greedy decoding, the image/deepstack seam, and the full-size
checkpoint names and shapes."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import randomize_, rel_err, torch_weights
from mlx.utils import tree_flatten

from mlx_qwen_image.config import ConfigError
from mlx_qwen_image.enhance import decode
from mlx_qwen_image.models.text_encoder import mrope_positions
from mlx_qwen_image.models.text_encoder21 import Qwen3TextEncoder, TextEncoder21Config

# Qwen3-VL-8B-Instruct's config.json as released (transformers 4.57 layout).
RELEASED = {
    "architectures": ["Qwen3VLForConditionalGeneration"],
    "image_token_id": 151655,
    "model_type": "qwen3_vl",
    "text_config": {
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "dtype": "bfloat16",
        "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 12288, "max_position_embeddings": 262144,
        "model_type": "qwen3_vl_text", "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
        "rope_theta": 5000000, "tie_word_embeddings": False, "use_cache": True, "vocab_size": 151936,
    },
    "tie_word_embeddings": False,
    "transformers_version": "4.57.0.dev0",
    "video_token_id": 151656,
    "vision_config": {
        "deepstack_visual_indexes": [8, 16, 24], "depth": 27, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1152,
        "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4304, "model_type": "qwen3_vl",
        "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 4096, "patch_size": 16,
        "spatial_merge_size": 2, "temporal_patch_size": 2,
    },
    "vision_end_token_id": 151653,
    "vision_start_token_id": 151652,
}

# head_dim 24 is not hidden / heads (16), so a model deriving it would fail to load; theta 1e4 rather than 5e6
# makes the rotations large enough to catch RoPE mistakes; sections [5, 4, 3] give the three axes different spans.
VOCAB, IMAGE, VIDEO, PAD = 1024, 1000, 1001, 1010
TINY_TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-6,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [5, 4, 3],
                                  "mrope_interleaved": True})
TINY_VISION = dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                   num_position_embeddings=16, deepstack_visual_indexes=[0])


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny(request, tmp_path_factory):
    """(transformers model, ours with the LM head, loaded from its save_pretrained folder)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen3VLConfig(text_config=TINY_TEXT, vision_config=TINY_VISION, image_token_id=IMAGE,
                           video_token_id=VIDEO, vision_start_token_id=1002, vision_end_token_id=1003,
                           tie_word_embeddings=request.param)
    # std 0.2: with smaller weights greedy decoding of the tied model repeats its first token forever.
    reference = randomize_(Qwen3VLForConditionalGeneration(config).eval(), std=0.2)
    reference.generation_config.eos_token_id = None
    reference.generation_config.pad_token_id = PAD
    folder = tmp_path_factory.mktemp("qwen3_vl")
    reference.save_pretrained(folder)
    with open(folder / "config.json") as f:
        ours = Qwen3TextEncoder.from_config(json.load(f), lm_head=True)
    weights = mx.load(str(folder / "model.safetensors"))
    assert ("lm_head.weight" in weights) != request.param
    ours.load_weights(list(ours.sanitize(weights).items()), strict=True)
    return reference, ours


def reference_features(model, ids: np.ndarray, mask: np.ndarray | None = None, **kwargs) -> np.ndarray:
    """What diffusers reads: hidden_states[-1] with the final norm hooked away (it returns its input)."""
    handle = model.model.language_model.norm.register_forward_hook(lambda module, args, output: args[0])
    try:
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(ids).long(), output_hidden_states=True,
                        attention_mask=None if mask is None else torch.from_numpy(mask).long(), **kwargs)
    finally:
        handle.remove()
    return out.hidden_states[-1].float().numpy()


def left_padded(lengths, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), max(lengths)), PAD, dtype=np.int64)
    mask = np.zeros(ids.shape, dtype=np.int64)
    for i, n in enumerate(lengths):
        ids[i, ids.shape[1] - n:] = rng.integers(0, 990, n)
        mask[i, ids.shape[1] - n:] = 1
    return ids, mask


def ours_np(model, ids, mask=None, **kwargs):
    mask = None if mask is None else mx.array(mask.astype(np.int32))
    return np.array(model(mx.array(ids.astype(np.int32)), mask, **kwargs))


def test_config_released_nested_flat_and_errors():
    assert TextEncoder21Config.from_dict(RELEASED) == TextEncoder21Config(vision_config=RELEASED["vision_config"])
    # transformers reads the same values from the released file (its own class defaults are another model's).
    from transformers import Qwen3VLConfig

    text = Qwen3VLConfig(**RELEASED).text_config
    ours = TextEncoder21Config()
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "rms_norm_eps", "attention_bias", "hidden_act"):
        assert getattr(text, name) == getattr(ours, name), name
    assert text.rope_parameters["rope_theta"] == ours.rope_theta
    assert tuple(text.rope_parameters["mrope_section"]) == ours.mrope_section

    flat = TextEncoder21Config.from_dict({"hidden_size": 64, "num_hidden_layers": 2, "head_dim": 16,
                                          "mrope_section": [3, 3, 2], "rope_theta": 1e4, "unknown_key": 1})
    assert (flat.hidden_size, flat.head_dim, flat.mrope_section, flat.rope_theta) == (64, 16, (3, 3, 2), 1e4)
    nested_v5 = TextEncoder21Config.from_dict({"text_config": TINY_TEXT, "tie_word_embeddings": True})
    assert (nested_v5.head_dim, nested_v5.rope_theta, nested_v5.mrope_section) == (24, 1e4, (5, 4, 3))
    assert nested_v5.tie_word_embeddings

    for bad, match in [({"mrope_section": [24, 20, 19]}, "mrope_section"),
                       ({"num_key_value_heads": 5}, "num_key_value_heads"),
                       ({"num_hidden_layers": 0}, "num_hidden_layers"),
                       ({"rope_scaling": {"rope_type": "yarn"}}, "rope type"),
                       ({"rope_scaling": {"mrope_interleaved": False}}, "interleaved"),
                       ({"text_config": {"hidden_act": "gelu"}}, "activation")]:
        with pytest.raises(ConfigError, match=match):
            TextEncoder21Config.from_dict(bad)
    assert not Qwen3TextEncoder.from_config(RELEASED).has_vision
    assert Qwen3TextEncoder.from_config(RELEASED, vision=True).has_vision


def test_single_prompt_pre_norm_features_and_logits(tiny):
    reference, ours = tiny
    ids, _ = left_padded([21], seed=1)
    expected = reference_features(reference, ids)
    got = ours_np(ours, ids)
    assert got.shape == (1, 21, 64) and got.dtype == np.float32
    assert rel_err(got, expected) < 1e-4
    with torch.no_grad():
        out = reference(input_ids=torch.from_numpy(ids).long(), output_hidden_states=True)
    # transformers 5's own hidden_states[-1] is post-norm: far from the features the image model reads.
    assert rel_err(got, out.hidden_states[-1].numpy()) > 0.1
    logits = np.array(ours.logits(mx.array(got)))
    assert rel_err(logits, out.logits.numpy()) < 1e-4


def test_left_padded_batch_like_diffusers(tiny):
    reference, ours = tiny
    lengths = [19, 11, 6]
    ids, mask = left_padded(lengths, seed=2)
    seen = {}

    def record(module, args, output):  # returns None: the output stays as it is
        seen["positions"] = args[1].clone()

    hook = reference.model.language_model.rotary_emb.register_forward_hook(record)
    try:
        # diffusers passes the processor's mm_token_type_ids (all text) too.
        expected = reference_features(reference, ids, mask, mm_token_type_ids=torch.zeros(ids.shape, dtype=torch.long))
    finally:
        hook.remove()
    # Text only: positions 0 .. L-1 on every axis, for every row, whatever the padding.
    np.testing.assert_array_equal(seen["positions"].numpy(), np.broadcast_to(np.arange(ids.shape[1]), (3,) + ids.shape))

    got = ours_np(ours, ids, mask)
    assert np.isfinite(got).all()
    width = ids.shape[1]
    for i, n in enumerate(lengths):
        assert rel_err(got[i, width - n:], expected[i, width - n:]) < 1e-4, f"row {i}"
        # Alone and unpadded, the row starts at position 0 instead; RoPE sees only position differences.
        alone = ours_np(ours, ids[i : i + 1, width - n:])
        assert rel_err(alone[0], expected[i, width - n:]) < 1e-4, f"row {i} alone"
    # Explicit positions (the vision seam's path) equal to the default ones give the same features.
    positions = np.broadcast_to(np.arange(width), (3,) + ids.shape)
    explicit = ours_np(ours, ids, mask, positions=positions)
    for i, n in enumerate(lengths):
        assert rel_err(explicit[i, width - n:], expected[i, width - n:]) < 1e-4


def test_greedy_decoding_matches_generate(tiny):
    reference, ours = tiny
    ids, _ = left_padded([9], seed=3)
    with torch.no_grad():
        out = reference.generate(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.ones_like(
            torch.from_numpy(ids)), max_new_tokens=16, do_sample=False)
    expected = out[0, ids.shape[1]:].tolist()
    assert len(expected) == 16 and len(set(expected)) > 8
    tokens, stats = decode(ours, ids[0].tolist(), stop=set(), max_tokens=16)
    assert tokens == expected
    assert stats["tokens"] == 16


def test_image_embeds_deepstack_and_3d_positions(tiny):
    """The vision seam without the tower: features and deepstack features handed in as transformers takes
    precomputed ones, with the 3-D positions of a non-square image in a left-padded batch."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    reference, ours = tiny
    grid = [1, 4, 6]  # 2 x 3 merged tokens
    rows = [[5, 6, 7] + [IMAGE] * 6 + [8, 9, 10, 11], [12] + [IMAGE] * 6 + [13, 14]]
    width = max(map(len, rows))
    ids = np.full((2, width), PAD, dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    rng = np.random.default_rng(4)
    embeds = rng.standard_normal((12, 64)).astype(np.float32)
    deepstack = [rng.standard_normal((12, 64)).astype(np.float32) for _ in range(2)]
    grids = torch.tensor([grid, grid])
    types = torch.from_numpy((ids == IMAGE).astype(np.int64))

    positions = mrope_positions(ids, mask, grids.numpy(), IMAGE, merge_size=2)
    theirs, _ = reference.model.get_rope_index(torch.from_numpy(ids), types, image_grid_thw=grids,
                                               attention_mask=torch.from_numpy(mask))
    np.testing.assert_array_equal(positions, theirs.numpy())

    vision = BaseModelOutputWithDeepstackFeatures(
        pooler_output=tuple(torch.from_numpy(embeds).split(6)),
        deepstack_features=[tuple(torch.from_numpy(d).split(6)) for d in deepstack])
    reference.model.rope_deltas = None
    expected = reference_features(reference, ids, mask, image_grid_thw=grids, mm_token_type_ids=types,
                                  mm_encoder_outputs={"image": vision})
    reference.model.rope_deltas = None
    got = ours_np(ours, ids, mask, positions=positions, image_embeds=mx.array(embeds),
                  deepstack=[mx.array(d) for d in deepstack])
    for i, row in enumerate(rows):
        assert rel_err(got[i, width - len(row):], expected[i, width - len(row):]) < 1e-4, f"row {i}"
    # Each part matters: without deepstack the features differ.
    plain = ours_np(ours, ids, mask, positions=positions, image_embeds=mx.array(embeds))
    assert rel_err(plain[0, width - len(rows[0]):], expected[0, width - len(rows[0]):]) > 1e-2
    with pytest.raises(ValueError, match="positions"):
        ours(mx.array(ids.astype(np.int32)), image_embeds=mx.array(embeds))
    with pytest.raises(ValueError, match="image_pad"):
        ours(mx.array(ids.astype(np.int32)), positions=positions, image_embeds=mx.array(embeds[:6]))


def test_sanitize_drops_vision_and_head_when_not_built(tiny):
    reference, _ = tiny
    weights = torch_weights(reference)
    plain = Qwen3TextEncoder.from_config(reference.config.to_dict())
    sanitized = plain.sanitize(weights)
    assert not plain.generates and not plain.has_vision
    assert all(k.startswith("model.language_model.") for k in sanitized)
    plain.load_weights(list(sanitized.items()), strict=True)
    with pytest.raises(ValueError, match="language-model head"):
        plain.logits(mx.zeros((1, 64)))


def test_full_size_names_and_shapes():
    """The released config, built lazily here and on the meta device in transformers: same names and shapes."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    with torch.device("meta"):
        reference = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**RELEASED))
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    mx.reset_peak_memory()
    ours = Qwen3TextEncoder.from_config(RELEASED, lm_head=True)
    # Lazy zeros stand in for the checkpoint: nothing is allocated as long as nothing is evaluated.
    weights = {k: mx.zeros(s, dtype=mx.bfloat16) for k, s in shapes.items()}
    sanitized = ours.sanitize(weights)
    assert set(weights) - set(sanitized) == {k for k in weights if k.startswith("model.visual.")}
    params = {k: tuple(v.shape) for k, v in tree_flatten(ours.parameters())}
    assert params == {k: tuple(v.shape) for k, v in sanitized.items()}
    assert len(params) == 36 * 11 + 3
    ours.load_weights(list(sanitized.items()), strict=True)
    assert mx.get_peak_memory() < 2**30, "building or loading evaluated the 16 GB of weights"
    count = sum(int(np.prod(s)) for s in params.values())
    assert count == 8_190_735_360, count
    # Built for editing, every tensor of the checkpoint is read (the patch embedding's Conv3d as a matrix).
    editing = Qwen3TextEncoder.from_config(RELEASED, lm_head=True, vision=True)
    sanitized = editing.sanitize(weights)
    assert {k.replace("model.visual.", "") for k in sanitized if k.startswith("model.visual.")} == \
        {k.replace("model.visual.", "") for k in weights if k.startswith("model.visual.")}
    editing.load_weights(list(sanitized.items()), strict=True)
    assert mx.get_peak_memory() < 2**30
