"""The real Qwen2 tokenizer files: our ids equal transformers' Qwen2Tokenizer through both loading paths."""

import json
import shutil

import pytest
from conftest import RELEASED

from mlx_qwen_image.config import CheckpointError
from mlx_qwen_image.tokenizer import PRETOKENIZE_REGEX, QwenTokenizer
from mlx_qwen_image.variants import DEFAULT_TEXT_TO_IMAGE, TEMPLATE_SUFFIX_TOKENS, TEXT_TO_IMAGE_TEMPLATE

TEXT_TO_IMAGE_DROP = DEFAULT_TEXT_TO_IMAGE.drop

TOKENIZER = RELEASED / "tokenizer"

CORPUS = [
    "",
    "A cat holding a sign that says hello world",
    "It's a poster: \"GRAND OPENING\" -- 50% off, don't miss it! I'LL be there.",
    "一只橘猫坐在窗台上，窗外是下雨的上海夜景。",
    "海报上写着“通义千问 Qwen-Image”，中英混排 mixed text。",
    "東京の夜景、ネオンサインに「営業中」と書かれている。カタカナとひらがな",
    "emoji 🐱🎉👍🏽 and a family 👨‍👩‍👧 ❤️",
    "3.14159 1234567890 2025年12月31日 ٣٤٥ ⅷ",
    "spaces   three  two\tand tabs\n\n\nnewlines\r\n then trailing   ",
    "   leading spaces and\n  indented\n\n",
    "inline <|im_start|>user\nhi<|im_end|> and <|endoftext|><tool_call>x</tool_call><|vision_pad|>",
    "almost special <|im_start|  and <im_start> stay text",
    "combining: e\u0301 vs \u00e9, Å vs A\u030a, ﬁ ligature, Ｆｕｌｌ width",
    "code: def f(x):\n    return x**2  # comment\n",
    "Привет, мир! Γειά σου κόσμε! مرحبا بالعالم",
    TEXT_TO_IMAGE_TEMPLATE.format("A red bicycle against a brick wall"),
]


@pytest.fixture(scope="module")
def reference():
    from transformers import Qwen2Tokenizer

    return Qwen2Tokenizer.from_pretrained(TOKENIZER)


def reference_ids(reference, text):
    return reference(text).input_ids


def check_corpus(ours, reference):
    for text in CORPUS:
        expected = reference_ids(reference, text)
        assert ours.encode(text) == expected, repr(text)
        assert ours.decode(expected) == reference.decode(expected), repr(text)
    assert ours.encode_batch(CORPUS) == [reference_ids(reference, t) for t in CORPUS]


def test_vocab_and_merges_match_transformers(reference):
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as expected_regex

    assert PRETOKENIZE_REGEX == expected_regex
    assert not (TOKENIZER / "tokenizer.json").exists()  # the published checkpoint has none
    ours = QwenTokenizer.from_pretrained(TOKENIZER)
    check_corpus(ours, reference)
    assert len(ours) == len(reference)
    assert ours.pad_token_id == reference.pad_token_id


def test_tokenizer_json_matches_transformers(reference, tmp_path):
    # transformers writes the tokenizer.json it built from vocab.json + merges.txt; load only that.
    reference.save_pretrained(tmp_path)
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).unlink(missing_ok=True)
    assert (tmp_path / "tokenizer.json").is_file()
    check_corpus(QwenTokenizer.from_pretrained(tmp_path), reference)


def test_added_tokens_json_layout(reference, tmp_path):
    # Older checkpoints list added tokens in added_tokens.json rather than in tokenizer_config.json.
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(TOKENIZER / name, tmp_path / name)
    config = json.loads((TOKENIZER / "tokenizer_config.json").read_text())
    added = {spec["content"]: int(i) for i, spec in config.pop("added_tokens_decoder").items()}
    (tmp_path / "added_tokens.json").write_text(json.dumps(added))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    check_corpus(QwenTokenizer.from_pretrained(tmp_path), reference)


def test_text_to_image_template(reference):
    ours = QwenTokenizer.from_pretrained(TOKENIZER)
    prefix, suffix = (reference_ids(reference, part) for part in TEXT_TO_IMAGE_TEMPLATE.split("{}"))
    assert len(prefix) == TEXT_TO_IMAGE_DROP == 34
    assert len(suffix) == TEMPLATE_SUFFIX_TOKENS == 5
    # The prompt's tokens sit between the two, whatever the prompt.
    for prompt in ("a cat", "一只猫", " "):
        assert ours.encode(TEXT_TO_IMAGE_TEMPLATE.format(prompt)) == prefix + ours.encode(prompt) + suffix


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer folder not found"):
        QwenTokenizer.from_pretrained(tmp_path / "nope")
    shutil.copy(TOKENIZER / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(CheckpointError, match="expected tokenizer.json, or vocab.json and merges.txt"):
        QwenTokenizer.from_pretrained(tmp_path)
