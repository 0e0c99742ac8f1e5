"""Finding, downloading and loading checkpoints in the diffusers layout.

Loading is: lazy ``mx.load`` of every safetensors shard -> the model's ``sanitize`` -> ``nn.quantize`` of the
layers that the checkpoint stores quantized (where ``<layer>.scales`` exists, with the bits and group size of
config.json's ``quantization`` block) -> cast -> strict ``load_weights``. Nothing is read from disk until the
arrays are evaluated. Only safetensors are read.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .config import CheckpointError, ConfigError, naming, read_json
from .quantize import apply_plan, plan_from_config, quantize_transformer

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# safetensors dtypes and their sizes in bytes
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_MAX_HEADER = 100 * 2**20  # real headers are a few MB at most
_SHOW = 4


def local_folder(path: str | Path) -> Path:
    """An existing checkpoint folder, or a `CheckpointError` saying what ``path`` is instead."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise CheckpointError(f"model folder {folder} does not exist (pass a local folder or a Hub repo id)")
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is a file; a model is a checkpoint folder or a Hub repo id")
    return folder


def is_repo_id(name: str | Path) -> bool:
    """``owner/name`` that is not an existing local path."""
    return bool(_REPO_ID.match(str(name))) and not Path(name).expanduser().exists()


def download(repo_id: str, components=None, config_only=(), patterns=None) -> Path:
    """The Hub snapshot of ``repo_id`` holding ``model_index.json`` and, for each of ``components``, only the
    files a pipeline reads (configs, safetensors, tokenizer files); of ``config_only`` components, the config.
    ``patterns``: exactly these files instead (a single-model repo such as a ControlNet's)."""
    from huggingface_hub import snapshot_download

    patterns = list(patterns) if patterns is not None else ["model_index.json"]
    for c in components or ():
        patterns += [f"{c}/*.json"] if c in config_only else [f"{c}/*.json", f"{c}/*.safetensors", f"{c}/*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # the Hub raises many types; all mean "not available"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"could not get {repo_id} from the Hugging Face Hub ({type(e).__name__}: {reason}); "
            "connect to the internet once to download it, or pass a local folder"
        ) from None


def check_layout(root: Path, components, config_only=()) -> None:
    """Refuse a checkpoint folder that lacks a file one of ``components`` needs (only the config for those in
    ``config_only``, whose weights come from elsewhere)."""
    missing = []
    for c in components:
        folder = root / c
        if not folder.is_dir():
            missing.append(f"{c}/")
        elif c in config_only:
            if not (folder / "config.json").is_file():
                missing.append(f"{c}/config.json")
        elif c == "tokenizer":
            if not (folder / "tokenizer.json").is_file() and not (
                (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
            ):
                missing.append("tokenizer/vocab.json + merges.txt")
        elif c == "scheduler":
            if not (folder / "scheduler_config.json").is_file():
                missing.append("scheduler/scheduler_config.json")
        elif c == "processor":
            if not (folder / "preprocessor_config.json").is_file():
                missing.append("processor/preprocessor_config.json")
        else:
            if not (folder / "config.json").is_file():
                missing.append(f"{c}/config.json")
            if not list(folder.glob("*.safetensors")):
                missing.append(f"{c}/*.safetensors")
    if missing:
        raise CheckpointError(f"incomplete checkpoint {root}: missing {', '.join(missing)}")


def shard_files(folder: Path) -> list[Path]:
    """The safetensors shards of a component, as its index lists them when it has one."""
    indexes = list(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = read_json(indexes[0]).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{indexes[0]} has no valid weight_map; download or convert the checkpoint again")
        files = [folder / n for n in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{folder}: shards listed in {indexes[0].name} are missing: {', '.join(absent)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        hint = " (PyTorch .bin files are not read: use a safetensors checkpoint)" if list(folder.glob("*.bin")) else ""
        raise CheckpointError(f"no .safetensors weights in {folder}{hint}")
    return files


def tensor_names(folder: Path) -> set[str]:
    """The tensor names of a component's shards, from their headers (nothing else is read)."""
    return {name for file in shard_files(folder) for name in check_safetensors(file) if name != "__metadata__"}


def lazy_weights(folder: Path) -> dict[str, mx.array]:
    """Every tensor of a component's shards, as lazy arrays (read from disk only when evaluated)."""
    weights = {}
    for file in shard_files(folder):
        weights.update(load_shard(file))
    return weights


def check_safetensors(file: Path) -> dict:
    """The header of a safetensors file, read defensively: its length, its JSON, every tensor's dtype, shape and
    byte range inside the file. Anything wrong is a `CheckpointError` naming the file and the problem."""
    damaged = "(the file is damaged or incomplete: download or convert it again)"
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file} is {size} bytes, too short for a safetensors file {damaged}")
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, _MAX_HEADER):
                raise CheckpointError(f"{file}: its header claims {length} bytes in a {size}-byte file {damaged}")
            header = json.loads(f.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {file}: {getattr(e, 'strerror', None) or e} {damaged}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: its header is not a JSON object {damaged}")
    data = size - 8 - length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(info, dict) and info.get("dtype") in _DTYPE_BYTES and isinstance(info.get("shape"), list) \
            and all(isinstance(d, int) and d >= 0 for d in info["shape"]) \
            and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2 \
            and all(isinstance(o, int) for o in info["data_offsets"])
        if not ok:
            raise CheckpointError(f"{file}: tensor {name} has an invalid entry in the header {damaged}")
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= data or end - begin != math.prod(info["shape"]) * _DTYPE_BYTES[info["dtype"]]:
            raise CheckpointError(f"{file}: tensor {name} ({info['dtype']} {info['shape']}) lies outside the file "
                                  f"or has the wrong size {damaged}")
    return header


def load_shard(file: Path) -> dict[str, mx.array]:
    """One safetensors file as lazy arrays, after `check_safetensors`."""
    check_safetensors(file)
    try:
        return mx.load(str(file))
    except Exception as e:
        raise CheckpointError(
            f"cannot read {file}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__} "
            "(the file is damaged or incomplete: download or convert it again)"
        ) from None


def _cast(weights: dict, dtype) -> dict:
    return {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}


def _names(items) -> str:
    items = sorted(items)
    return ", ".join(items[:_SHOW]) + (f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else "")


def check_weights(model, weights: dict, where) -> None:
    """Refuse checkpoint tensors that a strict load would reject, naming them: missing, unexpected, mis-shaped, or
    integers where the model has float parameters."""
    expected = dict(tree_flatten(model.parameters()))
    missing, extra = set(expected) - set(weights), set(weights) - set(expected)
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} parameters of the model its config.json describes are not in "
                              f"the checkpoint: {_names(missing)}")
    if extra:
        raise CheckpointError(f"{where}: {len(extra)} checkpoint tensors are not parameters of the model its "
                              f"config.json describes: {_names(extra)}")
    shapes = [f"{k} {tuple(weights[k].shape)} (needs {tuple(v.shape)})" for k, v in expected.items()
              if tuple(weights[k].shape) != tuple(v.shape)]
    if shapes:
        raise CheckpointError(f"{where}: {len(shapes)} tensors have the wrong shape: {_names(shapes)}")
    ints = [k for k, v in expected.items() if mx.issubdtype(v.dtype, mx.floating)
            and not mx.issubdtype(weights[k].dtype, mx.floating)]
    if ints:
        raise CheckpointError(f"{where}: {len(ints)} tensors hold integers where the model has float weights: "
                              f"{_names(ints)}")


def load_model(model_cls, folder: Path, dtype=mx.bfloat16, config: dict | None = None, **build):
    """Build ``model_cls`` from ``folder/config.json`` (``build`` goes to ``from_config``) and load its shards
    strictly (lazily)."""
    config = read_json(folder / "config.json") if config is None else config
    with naming(folder / "config.json"):
        try:
            model = model_cls.from_config(config, **build)
        except (TypeError, ZeroDivisionError) as e:  # a value of a type the checks did not foresee
            raise ConfigError(str(e)) from None
    weights = model.sanitize(lazy_weights(folder))
    quantized = {k[: -len(".scales")] for k in weights if k.endswith(".scales")}
    if quantized:
        with naming(folder / "config.json"):
            apply_plan(model, plan_from_config(config.get("quantization"), quantized))
    model.set_dtype(dtype)
    check_weights(model, weights, folder)
    model.load_weights(list(_cast(weights, dtype).items()), strict=True)
    return model


def quantize_model(model, bits: int, group_size: int = 64) -> dict:
    """Quantize-on-load of a float transformer with the converter's recipe, so that it gets exactly the weights a
    converted checkpoint holds; returns the plan."""
    return quantize_transformer(model, bits, group_size)


class TimestepSource:
    """Where freed timestep-path weights come back from: the checkpoint, with the pipeline's own LoRAs fused."""

    fuses_loras = True

    def __init__(self, folder: Path, dtype, loras):
        self.folder, self.dtype, self.loras = folder, dtype, list(loras)

    def weights(self, model) -> dict:
        weights = model.sanitize(lazy_weights(self.folder))
        if not self.loras:
            return weights
        from .lora import fuse_lora_weights

        cast = {k: v.astype(self.dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
        return fuse_lora_weights(cast, self.loras, only=model.modulation_layer_paths())


def gguf_transformer(variant, root, path, dtype, quantize):
    """The transformer of ``root``'s config with its weights from a GGUF file, and the file as its reload source."""
    import warnings

    from . import gguf
    from .quantize import apply_plan

    if quantize:
        raise ValueError("a GGUF file comes quantized as it is: leave out quantize (--quantize)")
    config_file = root / "transformer" / "config.json"
    with naming(config_file):
        model = variant.model_class("transformer").from_config(read_json(config_file))
    weights, plan, requantized = gguf.load(path, model, dtype)
    apply_plan(model, plan)
    model.set_dtype(dtype)
    model.load_weights(list(weights.items()), strict=True)
    for kind, count in requantized.items():
        warnings.warn(f"{path}: {count} {kind} tensors were dequantized and quantized again at "
                      f"{gguf.REQUANTIZED[kind]} bits (MLX has no exact form of {kind})", stacklevel=2)
    return model, gguf.Source(path, dtype)


def sample_sigmas(root: Path) -> tuple[float, ...] | None:
    """The sampling grid a checkpoint ships in model_index.json (2.1-Turbo's ``sample_sigmas``), or None."""
    index = root / "model_index.json"
    grid = read_json(index).get("sample_sigmas")
    if grid is None:
        return None
    if not isinstance(grid, list) or not grid or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1 for v in grid):
        raise CheckpointError(f"{index}: sample_sigmas must be a non-empty list of numbers in (0, 1], got "
                              f"{str(grid)[:60]}; fix the file, or download the checkpoint again")
    return tuple(float(v) for v in grid)
