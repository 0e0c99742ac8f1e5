"""The prompt enhancer: the text encoder (the whole Qwen2.5-VL-7B-Instruct checkpoint, LM head included) run as a
chat model that rewrites a short prompt into the detailed one Qwen-Image renders best, offline.

`decode` is plain autoregressive decoding with a KV cache (greedy, or temperature with top-p from a seed) up to
``<|im_end|>`` or a token cap. `rewrite` builds the chat (our own system instruction; for editing checkpoints the
pictures go in through the vision tower, so the rewrite sees what it edits), decodes, and then `keep_quotes` makes
sure every quoted text of the prompt is in the rewrite verbatim and that no quoted text was invented.
"""

from __future__ import annotations

import re
import time

import mlx.core as mx
import numpy as np

SYSTEM = (
    "You rewrite prompts for Qwen-Image, a text-to-image model that renders text in pictures very well. Rewrite the "
    "user's prompt into one detailed paragraph in the user's language (English or Chinese): the subject, the layout "
    "and composition, the style or medium, the lighting and colours, the background. Any text in quotation marks "
    "must appear in your rewrite exactly as written, inside the same quotation marks, and say where it is placed. "
    "Never add any other text, words, letters, logos or captions that the user did not ask for. Do not explain, do "
    "not add a title: answer with the rewritten prompt only.\n"
    "你负责为 Qwen-Image 改写提示词。用用户的语言（中文或英文）把提示词扩写成一段详细描述："
    "主体、布局与构图、风格或媒介、光线与色彩、背景。引号中的文字必须原样保留在引号里，并说明位置；"
    "不要添加用户没有要求的任何文字、字母、标志或标题。只输出改写后的提示词。"
)
EDIT_SYSTEM = (
    "You rewrite editing instructions for Qwen-Image-Edit. Look at the picture(s) and rewrite the user's instruction "
    "into one precise paragraph in the user's language (English or Chinese): what to change, where, and what must "
    "stay as it is (subject identity, composition, style, the rest of the picture). Any text in quotation marks must "
    "appear exactly as written, inside the same quotation marks. Never add text the user did not ask for. Answer with "
    "the rewritten instruction only.\n"
    "你负责改写 Qwen-Image-Edit 的编辑指令。看图后用用户的语言写成一段精确的指令："
    "改什么、在哪里、哪些保持不变。引号中的文字必须原样保留；不要添加用户没有要求的文字。"
    "只输出改写后的指令。"
)
# Straight and curly double quotes, CJK corner brackets; single quotes are apostrophes too often to count.
QUOTED = re.compile(r'"([^"\n]+)"|“([^”\n]+)”|「([^」\n]+)」|『([^』\n]+)』')


def quoted(text: str) -> list[str]:
    """The quoted texts of ``text``, in order."""
    return [next(g for g in m.groups() if g is not None) for m in QUOTED.finditer(text)]


def keep_quotes(prompt: str, rewrite: str) -> str:
    """The rewrite, with every quoted text of the prompt present verbatim (appended, quoted as the user quoted it,
    when the model dropped or changed it) and the quote marks taken off texts the user never quoted."""
    wanted = quoted(prompt)
    rewrite = rewrite.strip()

    def unquote(match: re.Match) -> str:
        inner = next(g for g in match.groups() if g is not None)
        return match.group(0) if inner in wanted else inner

    rewrite = QUOTED.sub(unquote, rewrite)
    missing = [q for q in wanted if not any(q == inner for inner in quoted(rewrite))]
    if not rewrite:
        return prompt
    chinese = re.search(r"[\u4e00-\u9fff]", prompt) is not None
    for text in missing:
        marks = next(m.group(0) for m in QUOTED.finditer(prompt) if text in m.groups())
        rewrite += f" 文字{marks}原样出现。" if chinese else f" The text {marks} appears exactly as written."
    return rewrite


def sample(logits: mx.array, temperature: float, top_p: float, key) -> int:
    """The next token: the most likely one at temperature 0, else drawn from the top-p nucleus."""
    if temperature <= 0:
        return int(mx.argmax(logits, axis=-1).item())
    probs = mx.softmax(logits.astype(mx.float32) / temperature, axis=-1).reshape(-1)
    order = mx.argsort(-probs)
    sorted_probs = probs[order]
    keep = mx.cumsum(sorted_probs) - sorted_probs < top_p  # the smallest set whose mass reaches top_p
    choice = mx.random.categorical(mx.log(mx.where(keep, sorted_probs, 0)), key=key)
    return int(order[choice].item())


def decode(encoder, input_ids: list[int], stop: set[int], max_tokens: int = 256, temperature: float = 0.0,
           top_p: float = 0.9, seed: int = 0, pixel_values=None, grids=None) -> tuple[list[int], dict]:
    """New tokens after ``input_ids`` (not including the stop token), and the decoding stats."""
    start = time.perf_counter()
    logits, state = encoder.start(mx.array([input_ids], dtype=mx.int32),
                                  None if pixel_values is None else mx.array(pixel_values), grids)
    mx.eval(logits)
    prefill = time.perf_counter() - start
    key, tokens = mx.random.key(seed), []
    while len(tokens) < max_tokens:
        key, sub = mx.random.split(key)
        token = sample(logits, temperature, top_p, sub)
        if token in stop:
            break
        tokens.append(token)
        logits = encoder.step(token, state)
        mx.eval(logits)
    seconds = time.perf_counter() - start
    rate = len(tokens) / max(seconds - prefill, 1e-9)
    return tokens, {"prompt_tokens": len(input_ids), "tokens": len(tokens), "seconds": seconds,
                    "tokens_per_second": rate}


def chat(system: str, user: str) -> str:
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def rewrite(prompts, prompt: str, pictures=None, max_tokens: int = 256, temperature: float = 0.0,
            top_p: float = 0.9, seed: int = 0) -> tuple[str, dict]:
    """``prompt`` rewritten by ``prompts`` (a `prompts.PromptEncoder`) and the stats of the decoding."""
    from .variants import PICTURE_TOKENS

    encoder = prompts.load()
    if encoder is None or not encoder.generates:
        raise ValueError("this checkpoint's text encoder has no language-model head (lm_head.weight), so it cannot "
                         "rewrite prompts; use the original checkpoint, or convert without --no-lm-head")
    tokenizer = prompts.tokenizer
    vision = {}
    if pictures:
        marks = "".join(f"Picture {i + 1}: {PICTURE_TOKENS}" for i in range(len(pictures)))
        pixel_values, grids = prompts.processor(pictures)
        text = prompts.processor.expand_image_tokens(chat(EDIT_SYSTEM, marks + prompt), grids)
        vision = {"pixel_values": pixel_values, "grids": np.asarray(grids)}
    else:
        text = chat(SYSTEM, prompt)
    stop = {t for t in (tokenizer.tokenizer.token_to_id("<|im_end|>"), tokenizer.pad_token_id) if t is not None}
    tokens, stats = decode(encoder, tokenizer.encode(text), stop, max_tokens, temperature, top_p, seed, **vision)
    return keep_quotes(prompt, tokenizer.decode(tokens, skip_special_tokens=True)), stats
