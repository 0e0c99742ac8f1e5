"""Qwen2 tokenizer (byte-level BPE through the ``tokenizers`` library); the prompt templates are in `variants`.

Qwen2's tokenizer is a GPT-2 style byte-level BPE, not a sentencepiece model. A checkpoint ships either a
``tokenizer.json`` (used as is) or only ``vocab.json`` + ``merges.txt`` (the published Qwen-Image layout); for
the latter we rebuild the pipeline transformers' ``Qwen2Tokenizer`` builds: NFC, Qwen2's split regex,
byte-level mapping without a prefix space, and the added tokens of ``tokenizer_config.json`` /
``added_tokens.json``, matched inline in the text.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from .config import CheckpointError, read_json

# Qwen2's pre-tokenizer split: English contractions, letter runs with one leading non-letter, single digits,
# punctuation runs (with trailing newlines), newline runs, then the remaining whitespace.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Special-token fields of tokenizer_config.json; their values may be strings or AddedToken-like dicts.
_SPECIAL_FIELDS = ("bos_token", "eos_token", "unk_token", "pad_token", "additional_special_tokens")


class QwenTokenizer:
    """A thin wrapper around a ``tokenizers.Tokenizer`` that knows Qwen's padding token."""

    def __init__(self, tokenizer: Tokenizer, pad_token: str = "<|endoftext|>"):
        self.tokenizer = tokenizer
        self.pad_token_id = tokenizer.token_to_id(pad_token)
        if self.pad_token_id is None:
            raise ValueError(f"padding token {pad_token!r} is not in the tokenizer's vocabulary")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "QwenTokenizer":
        """Load from a checkpoint's ``tokenizer/`` folder; damaged or missing files are a `CheckpointError`
        naming the file."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"tokenizer folder not found: {path}")
        config = _read_json(path / "tokenizer_config.json")
        if (path / "tokenizer.json").is_file():
            try:
                tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as e:  # the tokenizers library raises plain Exceptions
                raise CheckpointError(f"{path / 'tokenizer.json'} is not a valid tokenizer ({e}); download the "
                                      "checkpoint again") from None
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            if config is None:
                raise CheckpointError(f"{path / 'tokenizer_config.json'} is missing: beside vocab.json and merges.txt "
                                      "it lists the special tokens (<|im_start|>, <|endoftext|> ...); download the "
                                      "checkpoint again")
            _check_vocab_and_merges(path)
            try:
                tokenizer = _build_from_vocab_and_merges(path, config)
            except CheckpointError:
                raise
            except Exception as e:  # malformed added tokens; the tokenizers library raises plain Exceptions
                raise CheckpointError(f"{path}: the tokenizer files do not fit together ({type(e).__name__}: {e}); "
                                      "download the checkpoint again") from None
        else:
            raise CheckpointError(f"no tokenizer in {path}: expected tokenizer.json, or vocab.json and merges.txt")
        pad = _token_content((config or {}).get("pad_token")) or "<|endoftext|>"
        if tokenizer.token_to_id(pad) is None:
            raise CheckpointError(f"{path}: the padding token {pad!r} is not in the tokenizer's vocabulary (is "
                                  "tokenizer_config.json from another model?)")
        return cls(tokenizer, pad_token=pad)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)


def _check_vocab_and_merges(path: Path):
    vocab = read_json(path / "vocab.json")
    if not vocab or not all(isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()):
        raise CheckpointError(f"{path / 'vocab.json'} is not a token -> id map; download the checkpoint again")
    try:
        lines = (path / "merges.txt").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path / 'merges.txt'}: {getattr(e, 'strerror', None) or e}") from None
    merges = [line for line in lines if line and not line.startswith("#version")]
    bad = next((i for i, line in enumerate(merges) if len(line.split(" ")) != 2), None)
    if not merges or bad is not None:
        what = "has no merges" if not merges else f"line {bad + 1} is not a pair of tokens: {merges[bad][:40]!r}"
        raise CheckpointError(f"{path / 'merges.txt'} {what}; download the checkpoint again")


def _build_from_vocab_and_merges(path: Path, config: dict) -> Tokenizer:
    tokenizer = Tokenizer(BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()

    added = _added_tokens(path, config)
    # tokenizers numbers new tokens consecutively after the BPE vocabulary, so add them in id order
    # and check that each landed on the id the checkpoint gives it.
    for token_id, token in sorted(added.items()):
        if token.special:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])
        got = tokenizer.token_to_id(token.content)
        if got != token_id:
            raise CheckpointError(f"{path}: added token {token.content!r} got id {got}, tokenizer_config.json says "
                                  f"{token_id}; download the checkpoint again")
    return tokenizer


def _added_tokens(path: Path, config: dict) -> dict[int, AddedToken]:
    """The added tokens by id, from ``added_tokens_decoder`` (newer) and ``added_tokens.json`` (older)."""
    special = set()
    for field in _SPECIAL_FIELDS:
        values = config.get(field)
        for value in values if isinstance(values, list) else [values]:
            if _token_content(value):
                special.add(_token_content(value))

    tokens: dict[int, AddedToken] = {}
    for content, token_id in (_read_json(path / "added_tokens.json") or {}).items():
        is_special = content in special
        tokens[int(token_id)] = AddedToken(content, special=is_special, normalized=not is_special)
    for token_id, spec in config.get("added_tokens_decoder", {}).items():
        tokens[int(token_id)] = AddedToken(
            spec["content"],
            single_word=spec.get("single_word", False),
            lstrip=spec.get("lstrip", False),
            rstrip=spec.get("rstrip", False),
            normalized=spec.get("normalized", not spec.get("special", False)),
            special=spec.get("special", False) or spec["content"] in special,
        )
    return tokens


def _token_content(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict | None:
    return read_json(path) if path.is_file() else None
