"""Transformer weights from a GGUF file (the city96 / QuantStack Qwen-Image files: diffusers tensor names, mixed
quantization types per file), read with llama.cpp's own reader (the ``gguf`` package, memory-mapped).

Each tensor becomes what an MLX checkpoint holds. Float tensors (F32, F16, BF16) stay float. The types whose blocks
are affine in 32-element groups repack exactly into MLX's group-wise affine quantization (``w = scale * q + bias``,
group size 32): Q8_0 (8 bits), Q4_0 and Q4_1 (4), Q5_0 and Q5_1 (5), and the K-quants Q4_K and Q5_K, whose 256-value
super-blocks hold eight 32-value sub-blocks with ``scale = d * sc`` and ``bias = -dmin * m``. The others (Q6_K's
16-value groups, Q2_K, Q3_K, the IQ types) are dequantized by the reader and quantized again at the nearest MLX
bits, which `load` reports once per type. Tensors are converted one at a time; no dequantized copy of the model
is ever made.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mlx.core as mx
import numpy as np

from .config import CheckpointError

GROUP = 32
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
# GGUF type name -> MLX bits, for the types that repack exactly, and for those quantized again.
EXACT = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q4_K": 4, "Q5_K": 5}
REQUANTIZED = {"Q6_K": 6, "Q3_K": 3, "Q2_K": 2, "IQ4_NL": 4, "IQ4_XS": 4, "IQ3_S": 3, "IQ3_XXS": 3, "IQ2_S": 2,
               "IQ2_XS": 2, "IQ2_XXS": 2}
FLOAT = ("F32", "F16", "BF16")


@dataclasses.dataclass
class Tensor:
    name: str  # ours (prefix removed)
    kind: str  # GGUF type name
    shape: tuple[int, ...]  # logical, row-major (GGUF lists it fastest dimension first)
    data: np.ndarray  # memory-mapped: typed values for F32/F16, raw bytes (rows, bytes per row) otherwise

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def bits(self) -> int | None:
        """The MLX bits this tensor becomes (None: float)."""
        return EXACT.get(self.kind) or REQUANTIZED.get(self.kind)


def read(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a GGUF file under our names; a damaged or foreign file is a `CheckpointError`."""
    import gguf

    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist")
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as e:  # the reader raises ValueError, struct errors, IndexError ... on damaged files
        raise CheckpointError(f"cannot read {path} as GGUF ({type(e).__name__}: {e}); download it again") from None
    tensors = {}
    for t in reader.tensors:
        name = t.name
        for prefix in PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        tensors[name] = Tensor(name, t.tensor_type.name, tuple(int(d) for d in reversed(t.shape)), t.data)
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors")
    return tensors


def load(path, model, dtype) -> tuple[dict[str, mx.array], dict[str, dict], dict[str, int]]:
    """(weights under our names, the quantization plan of the layers they quantize, {type: tensor count} of the
    types that were quantized again) for ``model``'s parameters, checked against its config first."""
    tensors = read(path)
    check(tensors, model, path)
    weights = {}
    for t in tensors.values():
        weights.update(convert(t, dtype)[0])
    return weights, plan_of(tensors), requantized_types(tensors)


def plan_of(tensors: dict[str, Tensor]) -> dict[str, dict]:
    """The quantization plan the file's tensors give: layer path -> {group_size, bits}."""
    return {t.name[: -len(".weight")]: {"group_size": GROUP, "bits": t.bits} for t in tensors.values() if t.bits}


def requantized_types(tensors: dict[str, Tensor]) -> dict[str, int]:
    """{type: tensor count} of the tensors that are dequantized and quantized again."""
    counts: dict[str, int] = {}
    for t in tensors.values():
        if t.kind in REQUANTIZED:
            counts[t.kind] = counts.get(t.kind, 0) + 1
    return counts


def check(tensors: dict[str, Tensor], model, path):
    """Every parameter present with its shape, nothing else, and every type one we read: one line naming a tensor."""
    from mlx.utils import tree_flatten

    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    for name, t in tensors.items():
        if name not in expected:
            raise CheckpointError(f"{path}: tensor {t.name} is not a parameter of the transformer its config.json "
                                  "describes (is the GGUF file for another model?)")
        if t.shape != expected[name]:
            raise CheckpointError(f"{path}: tensor {name} has shape {t.shape}, the transformer's config.json needs "
                                  f"{expected[name]}")
        if t.kind not in FLOAT and t.kind not in EXACT and t.kind not in REQUANTIZED:
            raise CheckpointError(f"{path}: tensor {name} is of GGUF type {t.kind}, which mlx-qwen-image does not "
                                  f"read (supported: {', '.join(FLOAT + tuple(EXACT) + tuple(REQUANTIZED))})")
        if t.kind not in FLOAT and (len(t.shape) != 2 or t.shape[1] % GROUP):
            raise CheckpointError(f"{path}: tensor {name} ({t.kind}, shape {t.shape}) is quantized but not a "
                                  f"matrix with rows in groups of {GROUP}")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        more = f" (+{len(missing) - 4} more)" if len(missing) > 4 else ""
        raise CheckpointError(f"{path}: {len(missing)} parameters of the transformer are not in the file: "
                              f"{', '.join(missing[:4])}{more}")


def convert(t: Tensor, dtype) -> tuple[dict[str, mx.array], int | None]:
    """One tensor as MLX arrays: ``{name: float}``, or ``{layer.weight, layer.scales, layer.biases}`` and its bits."""
    if t.kind in FLOAT:
        return {t.name: mx.array(_floats(t)).astype(dtype)}, None
    layer = t.name[: -len(".weight")]
    if t.kind in EXACT:
        codes, scales, biases = unpack(t)
        bits = EXACT[t.kind]
        return {f"{layer}.weight": mx.array(pack(codes, bits)),
                f"{layer}.scales": mx.array(scales).astype(dtype),
                f"{layer}.biases": mx.array(biases).astype(dtype)}, bits
    import gguf

    values = gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType[t.kind]).reshape(t.shape)
    bits = REQUANTIZED[t.kind]
    w, scales, biases = mx.quantize(mx.array(values.astype(np.float32)).astype(dtype), GROUP, bits)
    return {f"{layer}.weight": w, f"{layer}.scales": scales, f"{layer}.biases": biases}, bits


def _floats(t: Tensor) -> np.ndarray:
    if t.kind == "BF16":  # stored as raw bytes: the upper halves of float32s
        raw = np.ascontiguousarray(t.data).view(np.uint16).astype(np.uint32) << 16
        return raw.view(np.float32).reshape(t.shape)
    return np.asarray(t.data, dtype=np.float32).reshape(t.shape)


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte ``start`` of every block, as float32 (N,)."""
    return np.ascontiguousarray(blocks[:, start:start + 2]).view(np.float16)[:, 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(N, 16) bytes -> (N, 32) codes: the low nibbles are values 0-15, the high nibbles values 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit scales and mins of a K-quant super-block from its 12 bytes: (N, 8) each. Sub-blocks 0-3 use
    the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); 4-7 take their low 4 bits from bytes 8-11 and their top 2
    bits from the top of bytes 0-3 (scales) and 4-7 (mins)."""
    lo, hi, mix = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([lo & 0x3F, (mix & 0x0F) | ((lo >> 6) << 4)], axis=1)
    mins = np.concatenate([hi & 0x3F, (mix >> 4) | ((hi >> 6) << 4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def unpack(t: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes (rows, cols) uint8, scales and biases (rows, cols / 32) float32) with ``w = scale * code + bias``."""
    rows, cols = t.shape
    raw = np.ascontiguousarray(t.data).reshape(rows, -1)
    kind = t.kind
    size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q4_K": 144, "Q5_K": 176}[kind]
    blocks = raw.reshape(-1, size)
    if kind == "Q8_0":
        d = _f16(blocks, 0)
        codes = (blocks[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        scales, biases = d, -128 * d
    elif kind in ("Q4_0", "Q4_1"):
        d = _f16(blocks, 0)
        offset = 2 if kind == "Q4_0" else 4
        codes = _nibbles(blocks[:, offset:])
        scales, biases = d, (-8 * d if kind == "Q4_0" else _f16(blocks, 2))
    elif kind in ("Q5_0", "Q5_1"):
        d = _f16(blocks, 0)
        offset = 2 if kind == "Q5_0" else 4
        high = np.ascontiguousarray(blocks[:, offset:offset + 4]).view(np.uint32)  # bit i: value i's fifth bit
        fifth = ((high >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
        codes = _nibbles(blocks[:, offset + 4:]) | (fifth << 4)
        scales, biases = d, (-16 * d if kind == "Q5_0" else _f16(blocks, 2))
    else:  # Q4_K, Q5_K: eight sub-blocks of 32 per super-block
        d, dmin = _f16(blocks, 0), _f16(blocks, 2)
        sc, m = _k_scales(blocks[:, 4:16])
        qs = blocks[:, -128:].reshape(-1, 4, 32)  # four runs of 32 bytes: low nibbles sub-block 2c, high 2c + 1
        codes = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32)
        if kind == "Q5_K":
            high = blocks[:, 16:48]  # byte e, bit j: the fifth bit of value e of sub-block j
            codes = codes | ((((high[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1)) << 4)
        scales, biases = (d[:, None] * sc).reshape(-1), (-dmin[:, None] * m).reshape(-1)
    codes = codes.reshape(rows, cols)
    return codes, scales.reshape(rows, cols // GROUP), biases.reshape(rows, cols // GROUP)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """(rows, cols) codes -> MLX's packed (rows, cols * bits / 32) uint32: each row one little-endian bit stream."""
    rows, cols = codes.shape
    if bits == 8:
        return np.ascontiguousarray(codes).view("<u4").astype(np.uint32)
    if bits in (2, 4):  # whole codes per word: shift and add, no bit stream
        per = 32 // bits
        words = codes.reshape(rows, cols // per, per).astype(np.uint32) << (bits * np.arange(per, dtype=np.uint32))
        return np.bitwise_or.reduce(words, axis=2)
    stream = ((codes[..., None] >> np.arange(bits, dtype=np.uint8)) & 1).astype(np.uint8).reshape(rows, -1)
    return np.packbits(stream, axis=1, bitorder="little").view("<u4").astype(np.uint32)


class Source:
    """Where freed timestep-path layers of a GGUF-loaded transformer come back from: the same file (read again
    and converted at once, so freed layers come back right after the loop, not lazily)."""

    fuses_loras = False  # layers a LoRA changed are never freed (their marks are voided)

    def __init__(self, path, dtype):
        self.path, self.dtype = path, dtype

    def weights(self, model) -> dict:
        paths = tuple(p + "." for p in model.modulation_layer_paths())
        out = {}
        for t in read(self.path).values():
            if t.name.startswith(paths):
                out.update(convert(t, self.dtype)[0])
        return out
