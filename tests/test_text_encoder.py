"""Text encoder parity with transformers' Qwen2.5-VL, full-size strict loading, and encode_prompt parity with
diffusers' QwenImagePipeline (tiny random text encoder, the real tokenizer)."""

import copy
import json
import warnings

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import RELEASED, randomize_, rel_err

from mlx_qwen_image.config import TextEncoderConfig
from mlx_qwen_image.models.text_encoder import QwenTextEncoder
from mlx_qwen_image.pipeline import QwenImagePipeline
from mlx_qwen_image.tokenizer import QwenTokenizer
from mlx_qwen_image.variants import DEFAULT_TEXT_TO_IMAGE, TEXT_TO_IMAGE_TEMPLATE

TEXT_TO_IMAGE_DROP = DEFAULT_TEXT_TO_IMAGE.drop

TOKENIZER = RELEASED / "tokenizer"

# Tiny Qwen2.5-VL with GQA (4 query heads, 2 KV heads) and the real vocabulary, so the real tokenizer's ids
# fit. Theta 1e4 rather than the released 1e6 makes the rotations large enough to catch RoPE mistakes.
TINY_TEXT = dict(
    vocab_size=152064,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
)
TINY_VISION = dict(
    depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[0]
)


def load_ours(folder, dtype=mx.float32) -> QwenTextEncoder:
    """Our model from a transformers save_pretrained folder (5.x names, nested config)."""
    with open(folder / "config.json") as f:
        model = QwenTextEncoder.from_config(json.load(f))
    weights = {k: v.astype(dtype) for k, v in mx.load(str(folder / "model.safetensors")).items()}
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers model, our float32 model loaded from its save_pretrained folder, that folder)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(text_config=TINY_TEXT, vision_config=TINY_VISION, tie_word_embeddings=False)
    reference = randomize_(Qwen2_5_VLForConditionalGeneration(config).eval())
    folder = tmp_path_factory.mktemp("text_encoder")
    reference.save_pretrained(folder)
    return reference, load_ours(folder), folder


def reference_hidden(model, input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """What diffusers reads: the last entry of hidden_states (after the final norm)."""
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(input_ids).long(),
            attention_mask=torch.from_numpy(mask).long(),
            output_hidden_states=True,
        )
    return out.hidden_states[-1].float().numpy()


def padded_batch(lengths, vocab=151643, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), max(lengths)), 151643, dtype=np.int64)
    mask = np.zeros(ids.shape, dtype=np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(0, vocab, n)
        mask[i, :n] = 1
    return ids, mask


def test_config_flat_and_nested(tiny):
    _, ours, _ = tiny
    released = json.loads((RELEASED / "text_encoder" / "config.json").read_text())
    assert TextEncoderConfig.from_dict(released) == TextEncoderConfig()
    # The tiny model's config was written by transformers 5 (nested text_config, rope_parameters).
    config = ours.config
    assert (config.hidden_size, config.num_key_value_heads, config.rope_theta) == (64, 2, 10000.0)
    with pytest.raises(ValueError, match="rope type"):
        TextEncoderConfig.from_dict({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_parity_padded_batch_float32(tiny):
    reference, ours, _ = tiny
    lengths = [23, 17, 9]
    ids, mask = padded_batch(lengths)
    expected = reference_hidden(reference, ids, mask)
    got = np.array(ours(mx.array(ids.astype(np.int32)), mx.array(mask.astype(np.int32))))
    assert got.dtype == np.float32
    for i, n in enumerate(lengths):
        assert rel_err(got[i, :n], expected[i, :n]) < 1e-4, f"sequence {i}"
    # Right padding never reaches a valid position through causal attention; only the padded rows show
    # whether padded keys are masked as in transformers.
    assert rel_err(got, expected) < 1e-4

    # Without a mask the unpadded sequence must agree too (the "causal" fast path).
    alone = np.array(ours(mx.array(ids[:1, : lengths[0]].astype(np.int32))))
    assert rel_err(alone[0], expected[0, : lengths[0]]) < 1e-4


def test_bfloat16_close_to_float32_reference(tiny):
    reference, _, folder = tiny
    ids, mask = padded_batch([31, 20], seed=1)
    expected = reference_hidden(reference, ids, mask)
    got = load_ours(folder, mx.bfloat16)(mx.array(ids.astype(np.int32)), mx.array(mask.astype(np.int32)))
    assert got.dtype == mx.bfloat16
    got = np.array(got.astype(mx.float32))
    # transformers in bf16 sets the scale: our rounding must be no worse than its own.
    expected_bf16 = reference_hidden(copy.deepcopy(reference).to(torch.bfloat16), ids, mask)
    for i, n in enumerate([31, 20]):
        err = rel_err(got[i, :n], expected[i, :n])
        err_ref = rel_err(expected_bf16[i, :n], expected[i, :n])
        assert err < max(2 * err_ref, 1e-2), f"sequence {i}: {err} vs transformers bf16 {err_ref}"


@pytest.mark.parametrize("spelling", ["text_encoder_legacy", "text_encoder_v5"])
def test_full_size_checkpoint_names_load_strictly(manifest, spelling):
    released = json.loads((RELEASED / "text_encoder" / "config.json").read_text())
    mx.reset_peak_memory()
    model = QwenTextEncoder.from_config(released)
    # Lazy zeros: nothing is allocated as long as nothing is evaluated.
    weights = {name: mx.zeros(shape, dtype=mx.bfloat16) for name, shape in manifest[spelling].items()}
    sanitized = model.sanitize(weights)
    model.load_weights(list(sanitized.items()), strict=True)

    kept = {id(v) for v in sanitized.values()}
    dropped = {k for k, v in weights.items() if id(v) not in kept}
    visual_prefix = "visual." if spelling == "text_encoder_legacy" else "model.visual."
    assert dropped == {k for k in weights if k.startswith((visual_prefix, "lm_head."))}
    assert len(sanitized) == len(weights) - len(dropped) == 28 * 12 + 2
    assert mx.get_peak_memory() < 2**30, "sanitize or load_weights evaluated the 15 GB of weights"


# ---- encode_prompt against diffusers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipelines(tiny):
    """(diffusers QwenImagePipeline, ours), sharing the tiny text encoder's weights and the real tokenizer."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import QwenImagePipeline as DiffusersPipeline
    from transformers import Qwen2Tokenizer

    reference, ours, _ = tiny
    theirs = DiffusersPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=reference,
        tokenizer=Qwen2Tokenizer.from_pretrained(TOKENIZER),
        transformer=None,
    )
    assert theirs.prompt_template_encode == TEXT_TO_IMAGE_TEMPLATE
    assert theirs.prompt_template_encode_start_idx == TEXT_TO_IMAGE_DROP
    return theirs, QwenImagePipeline(tokenizer=QwenTokenizer.from_pretrained(TOKENIZER), text_encoder=ours)


def diffusers_encode(pipe, prompt, **kwargs):
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(prompt, device=torch.device("cpu"), **kwargs)
    if mask is None:  # diffusers drops an all-ones mask
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    return embeds.float().numpy(), mask.numpy()


@pytest.mark.parametrize(
    "prompt",
    [
        "A coffee shop entrance with a chalkboard sign reading 'Qwen Coffee $2 per cup', neon light 'OPEN'",
        "一只橘猫坐在窗台上，窗外是下雨的上海夜景，霓虹灯招牌写着“通义千问”",
        [
            "A red bicycle leaning against a brick wall, watercolor",
            " ",
            "\n海报：春节快乐 2025，金色书法字体",
            "Three  spaces\n\nand blank lines <|im_start|> inline",
        ],
    ],
    ids=["english", "chinese", "batch"],
)
def test_encode_prompt_matches_diffusers(pipelines, prompt):
    theirs, ours = pipelines
    expected, expected_mask = diffusers_encode(theirs, prompt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is cut within the cap
        embeds, mask = ours.encode_prompt(prompt)
    assert embeds.shape == (expected.shape[0], expected.shape[1], 64)
    np.testing.assert_array_equal(np.array(mask), expected_mask)
    got = np.array(embeds)
    for i, n in enumerate(expected_mask.sum(axis=1)):
        assert rel_err(got[i, :n], expected[i, :n]) < 1e-4, f"prompt {i}"
        assert not got[i, n:].any(), "padding must be zeros"


def test_encode_prompt_cap_cuts_prompt_tokens_and_keeps_the_template_end(pipelines):
    theirs, ours = pipelines
    prompt = "A long prompt about a lighthouse on a cliff at dawn, seagulls, waves, fog and a small red boat"
    n_features = len(ours.tokenizer.encode(TEXT_TO_IMAGE_TEMPLATE.format(prompt))) - TEXT_TO_IMAGE_DROP

    # Exactly at the cap: no warning, and diffusers (which slices to max_sequence_length) agrees.
    expected, _ = diffusers_encode(theirs, prompt, max_sequence_length=n_features)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        at_cap, _ = ours.encode_prompt(prompt, max_sequence_length=n_features)
    assert rel_err(np.array(at_cap), expected) < 1e-4

    cap = n_features - 7
    message = rf"has {n_features - 5} tokens, more than the {cap - 5} .* last 7 tokens were cut"
    with pytest.warns(UserWarning, match=message):
        embeds, mask = ours.encode_prompt(prompt, max_sequence_length=cap)
    assert embeds.shape[:2] == (1, cap) and np.array(mask).all()
    got = np.array(embeds)[0]
    # The kept prompt tokens see the same context as in diffusers (attention is causal) ...
    kept = cap - 5
    assert rel_err(got[:kept], expected[0, :kept]) < 1e-4
    # ... and the 5 closing template tokens follow them directly.
    ids = theirs.tokenizer(TEXT_TO_IMAGE_TEMPLATE.format(prompt)).input_ids
    cut = np.array([ids[: TEXT_TO_IMAGE_DROP + kept] + ids[-5:]])
    reference = reference_hidden(theirs.text_encoder, cut, np.ones_like(cut))[0, TEXT_TO_IMAGE_DROP:]
    assert rel_err(got, reference) < 1e-4

    with pytest.raises(ValueError, match="max_sequence_length"):
        ours.encode_prompt(prompt, max_sequence_length=1025)
