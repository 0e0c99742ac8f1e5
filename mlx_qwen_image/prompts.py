"""The text side of a run: prompts (and edit pictures) -> text features, with the text encoder staged in memory.

`PromptEncoder` holds the tokenizer, the image processor of editing checkpoints and the text encoder, which it can
free and reload lazily from the checkpoint; it wraps prompts in the variant's chat template (with one
``Picture N:`` vision block per edit picture where the variant asks for it), runs the text encoder on one
right-padded batch and drops the template's leading tokens. A small `FeatureCache` keeps the features of the last
batch, so several seeds of one prompt encode it once.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict
from pathlib import Path

import mlx.core as mx
import numpy as np

from .config import read_json
from .loading import load_model, tensor_names
from .quantize import apply_plan, is_quantized, text_encoder_plan
from .image_processor import IMAGE_PAD
from .variants import PICTURE_TOKENS, TEMPLATE_SUFFIX_TOKENS, Variant

# Qwen-Image conditions on at most 1024 text features (prompt tokens plus the 5 closing template tokens);
# diffusers refuses larger values of max_sequence_length too.
MAX_SEQUENCE_LENGTH = 1024


class FeatureCache:
    """Text features of the last ``size`` text-encoder batches, keyed by their prompts (and pictures)."""

    def __init__(self, size: int = 1):
        self.size, self._items = size, OrderedDict()

    def get(self, key):
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        return None

    def put(self, key, value):
        self._items[key] = value
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def clear(self):
        self._items.clear()


class PromptEncoder:
    def __init__(self, variant: Variant, tokenizer=None, text_encoder=None, processor=None,
                 source: tuple[Path, mx.Dtype, int | None] | None = None):
        """``source``: (folder, dtype, bits) the text encoder is (re)loaded from; without it, it is never freed."""
        self.variant, self.tokenizer, self.text_encoder, self.processor = variant, tokenizer, text_encoder, processor
        self.source = source
        self.cache: FeatureCache | None = FeatureCache()
        self.share = None  # an mx.distributed group whose rank 0 alone runs the text encoder and sends the features

    def load(self):
        """The text encoder, loaded (lazily) from ``source`` if it was freed."""
        if self.text_encoder is None and self.source is not None:
            folder, dtype, bits = self.source
            cls = self.variant.model_class("text_encoder")
            # The LM head (the prompt enhancer's) is built when the checkpoint has it; it stays lazy until used.
            config = read_json(folder / "config.json")
            tied = {**config, **(config.get("text_config") or {})}.get("tie_word_embeddings", False)
            head = tied is True or any(name.startswith("lm_head.") for name in tensor_names(folder))
            build = self.variant.build_options("text_encoder")
            self.text_encoder = load_model(cls, folder, dtype, lm_head=head, **build)
            if bits and not is_quantized(self.text_encoder):
                apply_plan(self.text_encoder, text_encoder_plan(self.text_encoder, bits))
        return self.text_encoder

    def free(self):
        """Drop the text encoder's weights; `load` reads them again when a prompt next needs encoding."""
        if self.source is not None:
            self.text_encoder = None
            mx.clear_cache()

    def encode(self, prompts: list[str], pictures=None, max_sequence_length: int = MAX_SEQUENCE_LENGTH):
        """Features ``(B, L, hidden)`` and mask ``(B, L)`` of ``prompts``, each seeing ``pictures`` (prepared for
        the vision tower) on an editing checkpoint."""
        if not TEMPLATE_SUFFIX_TOKENS < max_sequence_length <= MAX_SEQUENCE_LENGTH:
            raise ValueError(f"max_sequence_length must be in ({TEMPLATE_SUFFIX_TOKENS}, {MAX_SEQUENCE_LENGTH}], "
                             f"got {max_sequence_length}")
        if not prompts:
            raise ValueError("encode_prompt needs at least one prompt")
        sequences, vision = self._sequences(prompts, pictures, max_sequence_length)
        return self.encode_tokens(sequences, **vision)

    def _sequences(self, prompts: list[str], pictures, max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                   pixels: bool = True):
        """The token ids of each prompt in the template (with the pictures' vision tokens), and the processor's
        ``pixel_values`` and ``grids`` of the pictures (``pixels=False``: the ids alone)."""
        variant, pictures = self.variant, list(pictures or ())
        if variant.blank_prompt is not None:
            prompts = [p or variant.blank_prompt for p in prompts]
        prefix = variant.picture_separator.join(variant.picture_label.format(i + 1) + PICTURE_TOKENS
                                                for i in range(len(pictures)))
        texts = [variant.template.format(prefix + p) for p in prompts]
        vision = {}
        if pictures and not pixels:
            grids = self.processor.grids(pictures)
            texts = [self.processor.expand_image_tokens(t, grids) for t in texts]
        elif pictures:
            pixel_values, grids = self.processor(pictures)
            texts = [self.processor.expand_image_tokens(t, grids) for t in texts]
            vision = {"pixel_values": pixel_values, "grids": grids}
        # The whole template is tokenized at once, as diffusers does, so a prompt's first token may merge with
        # the template's "\n"; positions, not strings, decide what is dropped.
        sequences = self.tokenizer.encode_batch(texts)
        if variant.max_text_tokens:
            sequences = [self._truncate(i, ids, max_sequence_length) for i, ids in enumerate(sequences)]
        return sequences, vision

    def image_slots(self, prompts: list[str], pictures) -> np.ndarray:
        """``(L,)`` bool over the features `encode` gives these prompts: True at the pictures' vision tokens. The
        pictures come before the prompt in the user turn, so every row of a right-padded batch has them at the
        same places."""
        sequences, _ = self._sequences(prompts, pictures, pixels=False)
        pad = self.tokenizer.tokenizer.token_to_id(IMAGE_PAD)
        width = max(len(ids) for ids in sequences) - self.variant.drop
        rows = []
        for ids in sequences:
            row = np.zeros(width, bool)
            row[: len(ids) - self.variant.drop] = np.array(ids[self.variant.drop:]) == pad
            rows.append(row)
        if any(not np.array_equal(row, rows[0]) for row in rows):
            raise ValueError("the pictures' vision tokens are not at the same places in every prompt row")
        return rows[0]

    def _truncate(self, i: int, ids: list[int], max_sequence_length: int) -> list[int]:
        drop = self.variant.drop
        excess = len(ids) - drop - max_sequence_length
        if excess <= 0:
            return ids
        kept = max_sequence_length - TEMPLATE_SUFFIX_TOKENS
        warnings.warn(f"prompt {i} has {kept + excess} tokens, more than the {kept} that fit in "
                      f"max_sequence_length={max_sequence_length}: its last {excess} tokens were cut", stacklevel=3)
        return ids[: drop + kept] + ids[-TEMPLATE_SUFFIX_TOKENS:]

    def encode_tokens(self, sequences: list[list[int]], pixel_values=None, grids=None):
        """Features and mask of tokenized prompts (template included), padded right into one text-encoder batch,
        the template's leading tokens dropped; with the processor's ``pixel_values`` and ``grids`` of the pictures
        whose ``<|image_pad|>`` runs the sequences hold. Under ``share``, rank 0's features reach every rank."""
        lengths = [len(ids) for ids in sequences]
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else 0
        ids = np.full((len(sequences), max(lengths)), pad, dtype=np.int32)
        mask = np.zeros(ids.shape, dtype=np.int32)
        for i, s in enumerate(sequences):
            ids[i, : len(s)], mask[i, : len(s)] = s, 1
        drop = self.variant.drop
        keep = mx.array(mask[:, drop:])
        if self.share is not None and self.share.rank() != 0:  # every rank tokenized alike: the shape is known
            features = mx.zeros((len(sequences), ids.shape[1] - drop, self._hidden_size()), dtype=self.source[1])
            return mx.distributed.all_sum(features, group=self.share), keep  # rank 0's, as the others send zeros
        encoder = self.load()
        padding = mx.array(mask) if min(lengths) < max(lengths) else None
        if pixel_values is not None:  # the tower runs once; every prompt row reuses what it saw
            hidden = encoder(mx.array(ids), padding, **encoder.see(pixel_values, grids, len(sequences)))
        else:
            hidden = encoder(mx.array(ids), padding)
        features = mx.where(keep[..., None].astype(mx.bool_), hidden[:, drop:], 0)
        if self.share is not None:
            features = mx.distributed.all_sum(features, group=self.share)
        return features, keep

    def _hidden_size(self) -> int:
        config = read_json(self.source[0] / "config.json")
        return {**config, **(config.get("text_config") or {})}["hidden_size"]

    def enhance(self, prompt: str, pictures=None, **options) -> tuple[str, dict]:
        """``prompt`` rewritten by the text encoder run as a chat model (`enhance.rewrite`)."""
        from .enhance import rewrite

        if self.share is None:
            return rewrite(self, prompt, pictures, **options)
        from .distributed import broadcast_json

        answer = rewrite(self, prompt, pictures, **options) if self.share.rank() == 0 else None
        return tuple(broadcast_json(self.share, answer))  # rank 0's rewrite, on every rank

    def features(self, rows: list[str], pictures=None):
        """Evaluated features for a text-encoder batch, through the cache."""
        key = (tuple(rows), tuple(hashlib.sha1(p.tobytes()).hexdigest() for p in pictures or ()))
        cached = self.cache.get(key) if self.cache is not None else None
        if cached is not None:
            return cached
        features = self.encode(rows, pictures)
        mx.eval(features)
        if self.cache is not None:
            self.cache.put(key, features)
        return features

