"""FLOP counts of the model's passes and the reference rate of a plain MLX matmul.

Counted: 2 FLOPs per multiply-add of every matmul that a step needs: all linear layers (the modulation layers
included, one row per batch item as the reference computes them) and attention's QK^T and AV over all heads.
Norms, activations, RoPE and softmax are not counted (a few percent of the time; no matmul rate applies).
"""

from __future__ import annotations

import time

import mlx.core as mx

from mlx_qwen_image.config import TextEncoderConfig, TransformerConfig

TIMESTEP_CHANNELS = 256  # the sinusoid fed to the time embedder


def transformer_step_flops(cfg: TransformerConfig, batch: int, n_img: int, n_txt: int) -> dict[str, float]:
    """FLOPs of one transformer call on ``batch`` items of ``n_img`` image and ``n_txt`` text tokens."""
    d, hidden, blocks = cfg.inner_dim, 4 * cfg.inner_dim, cfg.num_layers
    tokens = n_img + n_txt
    # Per block and token: q, k, v, out (4 D x D) and the MLP (D x 4D, 4D x D); each stream has its own weights
    # but every token goes through one set, so text and image tokens count alike.
    linear = blocks * 2 * tokens * (4 * d * d + 2 * d * hidden)
    # The last block's text outputs feed nothing, so MLX's lazy graph never computes its to_add_out and text MLP.
    linear -= 2 * n_txt * (d * d + 2 * d * hidden)
    linear += 2 * n_img * cfg.in_channels * d + 2 * n_txt * cfg.joint_attention_dim * d
    linear += 2 * n_img * d * cfg.patch_size**2 * cfg.out_channels
    attention = blocks * 2 * (2 * tokens * tokens * d)  # QK^T and AV, all heads together
    modulation = blocks * 2 * (2 * d * 6 * d) + 2 * d * 2 * d  # img_mod + txt_mod per block, norm_out
    modulation += 2 * (TIMESTEP_CHANNELS * d + d * d)  # the time embedder
    parts = {"linear": batch * linear, "attention": batch * attention, "modulation": batch * modulation}
    parts["total"] = sum(parts.values())
    return parts


def text_encoder_flops(cfg: TextEncoderConfig, length: int, layers: int | None = None) -> float:
    """FLOPs of the language model on one prompt of ``length`` tokens (attention counted unmasked)."""
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
    per_token = 2 * (2 * h * h + 2 * h * kv + 3 * h * cfg.intermediate_size)
    per_layer = length * per_token + 2 * 2 * length * length * h
    return (cfg.num_hidden_layers if layers is None else layers) * per_layer


def block_matmul_shapes(stream_rows, dim: int, hidden: int) -> list[tuple[int, int, int, int]]:
    """(M, K, N, count) of the linear layers one block applies to each stream's rows (batch x its tokens):
    q, k, v, out (4 D x D), the MLP's D x 4D and 4D x D."""
    return [s for rows in stream_rows if rows for s in ((rows, dim, dim, 4), (rows, dim, hidden, 1),
                                                          (rows, hidden, dim, 1))]


class MatmulReference:
    """Plain ``x @ w.T`` (the layout of ``nn.Linear``) over ``shapes``, each weighted by its count: the rate a
    step whose FLOPs were all such matmuls would reach. Timed beside the step, trial by trial, so that both see
    the same machine load."""

    def __init__(self, shapes, dtype):
        self.shapes, self.dtype = list(shapes), dtype
        self.arrays = [(mx.random.normal((m, k), key=mx.random.key(0)).astype(dtype),
                        mx.random.normal((n, k), key=mx.random.key(1)).astype(dtype)) for m, k, n, _ in self.shapes]
        mx.eval(self.arrays)
        self.nbytes = sum(x.nbytes + w.nbytes for x, w in self.arrays)
        self.flops = sum(2.0 * m * k * n * count for m, k, n, count in self.shapes)

    def seconds(self) -> list[float]:
        """One timed run of each shape."""
        times = []
        for x, w in self.arrays:
            start = time.perf_counter()
            mx.eval(x @ w.T)
            times.append(time.perf_counter() - start)
        return times

    def rate(self, trials: int = 3, warmup: int = 1) -> dict:
        """FLOP/s from the median time of each shape over ``trials``."""
        runs = [self.seconds() for _ in range(warmup + trials)][warmup:]
        medians = [sorted(r[i] for r in runs)[len(runs) // 2] for i in range(len(self.shapes))]
        total = sum(t * count for t, (*_, count) in zip(medians, self.shapes))
        per_shape = [{"shape": [m, k, n], "count": c, "seconds": t, "flops_per_s": 2.0 * m * k * n / t}
                     for t, (m, k, n, c) in zip(medians, self.shapes)]
        return {"flops_per_s": self.flops / total, "shapes": per_shape, "dtype": str(self.dtype).split(".")[-1]}

    def rate_once(self) -> float:
        return self.flops / sum(t * count for t, (*_, count) in zip(self.seconds(), self.shapes))


def transformer21_step_flops(cfg, batch: int, n_img: int, n_txt: int, cached: bool = True) -> dict[str, float]:
    """FLOPs of one Qwen-Image 2.1 transformer call (`models/transformer21.py`) on ``batch`` items of ``n_img``
    target and ``n_txt`` text tokens. ``cached``: a step after the first, when the prefix K/V cache holds the text's
    keys and values, so only the target's tokens run through the blocks (the first step also runs the text)."""
    d, hidden, blocks = cfg.inner_dim, cfg.mlp_ratio * cfg.inner_dim, cfg.num_layers
    rows = n_img if cached else n_img + n_txt
    # Per block and token: q, k, v, out (4 D x D) and the SwiGLU (gate and up D x 3D, down 3D x D).
    linear = blocks * 2 * rows * (4 * d * d + 3 * d * hidden)
    linear += 2 * n_img * cfg.in_channels * d + 2 * n_img * d * cfg.out_channels
    if not cached:
        linear += 2 * n_txt * (cfg.context_in_dim * d + d * d)  # txt_in's MLP
    # Target queries see every key; text queries (first step only) see the text before them.
    attention = blocks * 2 * 2 * n_img * (n_txt + n_img) * d
    if not cached:
        attention += blocks * 2 * 2 * (n_txt * (n_txt + 1) // 2) * d
    modulation = 2 * d * 4 * d + 2 * d * d + 2 * (TIMESTEP_CHANNELS * d + d * d)  # shared modulation, norm_out, time
    parts = {"linear": batch * linear, "attention": batch * attention, "modulation": batch * modulation}
    parts["total"] = sum(parts.values())
    return parts
