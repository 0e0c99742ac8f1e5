"""QwenImagePipeline: the public entry point that ties the components together."""

from __future__ import annotations

import warnings

import mlx.core as mx
import numpy as np

from .models.text_encoder import QwenTextEncoder
from .tokenizer import TEMPLATE_SUFFIX_TOKENS, TEXT_TO_IMAGE_DROP, TEXT_TO_IMAGE_TEMPLATE, QwenTokenizer

# Qwen-Image conditions on at most 1024 text features (prompt tokens plus the 5 closing template tokens);
# diffusers refuses larger values of max_sequence_length too.
MAX_SEQUENCE_LENGTH = 1024


class QwenImagePipeline:
    def __init__(self, tokenizer: QwenTokenizer, text_encoder: QwenTextEncoder):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder

    def encode_prompt(
        self, prompt: str | list[str], max_sequence_length: int = MAX_SEQUENCE_LENGTH
    ) -> tuple[mx.array, mx.array]:
        """Text features ``(B, L, hidden)`` and their mask ``(B, L)`` (1 = token, 0 = right padding).

        Equal to diffusers' ``QwenImagePipeline.encode_prompt`` whenever a prompt fits in
        ``max_sequence_length`` features. A longer prompt loses its last tokens, not the closing template
        tokens as in diffusers (whose tokenizer truncation cuts the template's end first), with a warning.
        """
        if not TEMPLATE_SUFFIX_TOKENS < max_sequence_length <= MAX_SEQUENCE_LENGTH:
            raise ValueError(
                f"max_sequence_length must be in ({TEMPLATE_SUFFIX_TOKENS}, {MAX_SEQUENCE_LENGTH}], "
                f"got {max_sequence_length}"
            )
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("encode_prompt needs at least one prompt")
        # The whole template is tokenized at once, as diffusers does, so a prompt's first token may merge
        # with the template's "\n"; positions, not strings, decide what is dropped.
        sequences = self.tokenizer.encode_batch([TEXT_TO_IMAGE_TEMPLATE.format(p) for p in prompts])
        for i, ids in enumerate(sequences):
            excess = len(ids) - TEXT_TO_IMAGE_DROP - max_sequence_length
            if excess > 0:
                kept = max_sequence_length - TEMPLATE_SUFFIX_TOKENS
                warnings.warn(
                    f"prompt {i} has {kept + excess} tokens, more than the {kept} that fit in "
                    f"max_sequence_length={max_sequence_length}: its last {excess} tokens were cut",
                    stacklevel=2,
                )
                sequences[i] = ids[: TEXT_TO_IMAGE_DROP + kept] + ids[-TEMPLATE_SUFFIX_TOKENS:]

        lengths = [len(ids) for ids in sequences]
        longest = max(lengths)
        input_ids = np.full((len(sequences), longest), self.tokenizer.pad_token_id, dtype=np.int32)
        mask = np.zeros((len(sequences), longest), dtype=np.int32)
        for i, ids in enumerate(sequences):
            input_ids[i, : len(ids)] = ids
            mask[i, : len(ids)] = 1
        padded = min(lengths) < longest
        hidden = self.text_encoder(mx.array(input_ids), mx.array(mask) if padded else None)

        mask = mx.array(mask[:, TEXT_TO_IMAGE_DROP:])
        embeds = mx.where(mask[..., None].astype(mx.bool_), hidden[:, TEXT_TO_IMAGE_DROP:], 0)
        return embeds, mask
