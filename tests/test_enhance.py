"""The prompt enhancer: greedy decoding with a KV cache against transformers' generate on a tiny random Qwen2.5-VL
(text only and with a picture), the quote-keeping post-processing, and the CLI path."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import RELEASED, TINY_TEXT_ENCODER, randomize_, rel_err, torch_weights
from PIL import Image

from mlx_qwen_image import enhance
from mlx_qwen_image.cli import cli
from mlx_qwen_image.image_processor import QwenImageProcessor
from mlx_qwen_image.models.text_encoder import QwenTextEncoder
from mlx_qwen_image.tokenizer import QwenTokenizer

IMAGE_PAD = 151655
NEW = 32


@pytest.fixture(scope="module")
def models():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    theirs = randomize_(Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**TINY_TEXT_ENCODER)), 3, std=0.1).eval()
    ours = QwenTextEncoder.from_config(json.loads(theirs.config.to_json_string()), vision=True, lm_head=True)
    ours.load_weights(list(ours.sanitize(torch_weights(theirs)).items()), strict=True)
    return ours, theirs, QwenTokenizer.from_pretrained(RELEASED / "tokenizer")


def _their_greedy(theirs, ids, **vision):
    with torch.no_grad():
        extra = {}
        if vision:
            extra = {"pixel_values": torch.from_numpy(vision["pixel_values"]),
                     "image_grid_thw": torch.from_numpy(np.asarray(vision["grids"])),
                     "mm_token_type_ids": (torch.tensor([ids]) == IMAGE_PAD).long()}
        out = theirs.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, **extra)
    return out.sequences[0, len(ids):].tolist(), out.logits[0][0].numpy()


def test_greedy_text_only_equals_transformers(models):
    ours, theirs, tokenizer = models
    ids = tokenizer.encode(enhance.chat(enhance.SYSTEM, 'a shop sign that says "OPEN"'))
    expected, first_logits = _their_greedy(theirs, ids)
    logits, _ = ours.start(mx.array([ids], dtype=mx.int32))
    assert rel_err(np.array(logits)[0], first_logits) < 1e-4
    got, stats = enhance.decode(ours, ids, stop=set(), max_tokens=NEW)
    assert got == expected and stats["tokens"] == NEW and stats["tokens_per_second"] > 0


def test_greedy_with_a_picture_equals_transformers(models):
    ours, theirs, tokenizer = models
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8))
    pixel_values, grids = QwenImageProcessor()([picture])
    text = QwenImageProcessor().expand_image_tokens(
        enhance.chat(enhance.EDIT_SYSTEM, "Picture 1: <|vision_start|><|image_pad|><|vision_end|>make it night"), grids)
    ids = tokenizer.encode(text)
    expected, first_logits = _their_greedy(theirs, ids, pixel_values=pixel_values, grids=grids)
    logits, _ = ours.start(mx.array([ids], dtype=mx.int32), mx.array(pixel_values), np.asarray(grids))
    assert rel_err(np.array(logits)[0], first_logits) < 1e-4
    got, _ = enhance.decode(ours, ids, stop=set(), max_tokens=NEW, pixel_values=pixel_values, grids=np.asarray(grids))
    assert got == expected


def test_sampling_is_seeded_and_stops(models):
    ours, _, tokenizer = models
    ids = tokenizer.encode(enhance.chat(enhance.SYSTEM, "a cat"))
    a, _ = enhance.decode(ours, ids, set(), 12, temperature=1.0, top_p=0.9, seed=3)
    b, _ = enhance.decode(ours, ids, set(), 12, temperature=1.0, top_p=0.9, seed=3)
    c, _ = enhance.decode(ours, ids, set(), 12, temperature=1.0, top_p=0.9, seed=4)
    assert a == b and a != c
    greedy, _ = enhance.decode(ours, ids, set(), 12)
    stopped, _ = enhance.decode(ours, ids, {greedy[3]}, 12)
    assert stopped == greedy[:greedy.index(greedy[3])]


@pytest.mark.parametrize("prompt, rewrite, expected", [
    ('a sign that says "OPEN"', 'A red neon sign reading "OPEN".', 'A red neon sign reading "OPEN".'),
    ('a sign that says "OPEN"', "A red neon sign above a door.",
     'A red neon sign above a door. The text "OPEN" appears exactly as written.'),
    ('a sign that says "OPEN"', 'A sign reading "OPEN", a "SALE" banner.', 'A sign reading "OPEN", a SALE banner.'),
    ("招牌上写着“咖啡”", "一块木质招牌，上面写着咖啡。", "一块木质招牌，上面写着咖啡。 文字“咖啡”原样出现。"),
    ('a poster "Hello" and "World"', "", 'a poster "Hello" and "World"'),
])
def test_quoted_text_survives_verbatim(prompt, rewrite, expected):
    assert enhance.keep_quotes(prompt, rewrite) == expected


def test_the_cli_rewrites_records_both_prompts_and_refuses_without_a_head(tiny_checkpoint, tmp_path, monkeypatch):
    from mlx_qwen_image.convert import convert

    folder, _ = tiny_checkpoint
    forced = 'A bright shop sign with the word "OPEN" in neon, and a "SALE" sticker.'

    def decode(encoder, input_ids, *args, **options):  # the model's words, forced
        tokenizer = QwenTokenizer.from_pretrained(folder / "tokenizer")
        return tokenizer.encode(forced), {"tokens": 20, "seconds": 0.5, "tokens_per_second": 40.0,
                                          "prompt_tokens": len(input_ids)}

    monkeypatch.setattr(enhance, "decode", decode)
    out = tmp_path / "x.png"
    result = CliRunner().invoke(cli, ["generate", 'a sign that says "OPEN"', "--model", str(folder), "--width", "32",
                                      "--height", "32", "--steps", "1", "--dtype", "float32", "--enhance-prompt",
                                      "--output", str(out)])
    assert result.exit_code == 0, result.output
    rewritten = 'A bright shop sign with the word "OPEN" in neon, and a SALE sticker.'
    assert f"enhanced prompt: {rewritten}" in result.output and "tokens/s" in result.output
    meta = Image.open(out).text
    assert meta["prompt"] == 'a sign that says "OPEN"' and meta["enhanced_prompt"] == rewritten
    result = CliRunner().invoke(cli, ["enhance", 'a sign that says "OPEN"', "--model", str(folder)])
    assert result.exit_code == 0 and result.output.splitlines()[0] == rewritten
    headless = tmp_path / "no-head"
    convert(folder, headless, lm_head=False)
    result = CliRunner().invoke(cli, ["generate", "x", "--model", str(headless), "--width", "32", "--height", "32",
                                      "--steps", "1", "--enhance-prompt", "--output", str(tmp_path / "y.png")])
    assert result.exit_code == 1 and "has no language-model head" in result.output.strip().splitlines()[-1]
    assert not (tmp_path / "y.png").exists()
