"""Finding, downloading and loading checkpoints in the diffusers layout.

Loading is: lazy ``mx.load`` of every safetensors shard -> the model's ``sanitize`` -> ``nn.quantize`` of the
layers that the checkpoint stores quantized (where ``<layer>.scales`` exists, with the bits and group size of
config.json's ``quantization`` block) -> cast -> strict ``load_weights``. Nothing is read from disk until the
arrays are evaluated. Only safetensors are read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx

from .config import read_json
from .quantize import apply_plan, plan_from_config, quantize_transformer

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CheckpointError(ValueError):
    """A model folder or file that cannot be used; the message says what is wrong and what to do."""


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


def download(repo_id: str, components=None) -> Path:
    """The Hub snapshot of ``repo_id`` holding ``model_index.json`` and, for each of ``components``, only the
    files a pipeline reads (configs, safetensors, tokenizer files)."""
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json"]
    for c in components or ():
        patterns += [f"{c}/*.json", f"{c}/*.safetensors", f"{c}/*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # the Hub raises many types; all mean "not available"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"could not get {repo_id} from the Hugging Face Hub ({type(e).__name__}: {reason}); "
            "connect to the internet once to download it, or pass a local folder"
        ) from None


def check_layout(root: Path, components) -> None:
    """Refuse a checkpoint folder that lacks a file one of ``components`` needs."""
    missing = []
    for c in components:
        folder = root / c
        if not folder.is_dir():
            missing.append(f"{c}/")
        elif c == "tokenizer":
            if not (folder / "tokenizer.json").is_file() and not (
                (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
            ):
                missing.append("tokenizer/vocab.json + merges.txt")
        elif c == "scheduler":
            if not (folder / "scheduler_config.json").is_file():
                missing.append("scheduler/scheduler_config.json")
        elif c == "processor":
            if not list(folder.glob("*.json")):
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
        with open(indexes[0], encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        files = [folder / n for n in names]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{folder}: shards listed in {indexes[0].name} are missing: {', '.join(absent)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        hint = " (PyTorch .bin files are not read: use a safetensors checkpoint)" if list(folder.glob("*.bin")) else ""
        raise CheckpointError(f"no .safetensors weights in {folder}{hint}")
    return files


def lazy_weights(folder: Path) -> dict[str, mx.array]:
    """Every tensor of a component's shards, as lazy arrays (read from disk only when evaluated)."""
    weights = {}
    for file in shard_files(folder):
        weights.update(load_shard(file))
    return weights


def load_shard(file: Path) -> dict[str, mx.array]:
    """One safetensors file as lazy arrays; a damaged file is a `CheckpointError` naming it."""
    try:
        return mx.load(str(file))
    except Exception as e:
        raise CheckpointError(
            f"cannot read {file}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__} "
            "(the file is damaged or incomplete: download or convert it again)"
        ) from None


def _cast(weights: dict, dtype) -> dict:
    return {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}


def load_model(model_cls, folder: Path, dtype=mx.bfloat16, config: dict | None = None, **build):
    """Build ``model_cls`` from ``folder/config.json`` (``build`` goes to ``from_config``) and load its shards
    strictly (lazily)."""
    config = read_json(folder / "config.json") if config is None else config
    model = model_cls.from_config(config, **build)
    weights = model.sanitize(lazy_weights(folder))
    quantized = {k[: -len(".scales")] for k in weights if k.endswith(".scales")}
    if quantized:
        apply_plan(model, plan_from_config(config.get("quantization"), quantized))
    model.set_dtype(dtype)
    try:
        model.load_weights(list(_cast(weights, dtype).items()), strict=True)
    except ValueError as e:
        raise CheckpointError(f"{folder} does not match its config.json: {e}") from None
    return model


def quantize_model(model, bits: int, group_size: int = 64) -> dict:
    """Quantize-on-load of a float transformer with the converter's recipe, so that it gets exactly the weights a
    converted checkpoint holds; returns the plan."""
    return quantize_transformer(model, bits, group_size)
