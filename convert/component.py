"""One component of a conversion: its lazily built model, the quantization plan, and the streaming write of its
shards (`converter` runs one per model folder).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_qwen_image.config import naming, read_json
from mlx_qwen_image.loading import CheckpointError, load_shard, shard_files
from mlx_qwen_image.quantize import (plan_bytes, quantization_block, quantize_weight, text_encoder_plan,
                                     transformer_plan)

MAX_SHARD_BYTES = 5 * 10**9
Transform = Callable[[dict], dict]


class Component:
    """One model folder: its lazily built model (shapes only), quantization plan, and the streaming write."""

    def __init__(self, name: str, cls, folder: Path, shards: list[tuple[Path, dict]] | None = None,
                 build: dict | None = None):
        """``shards``: (file, lazy tensors) pairs; by default the folder's safetensors files, opened lazily.
        ``build``: the registry's ``from_config`` options for this component."""
        self.name, self.folder = name, folder
        self.config = read_json(folder / "config.json")
        with naming(folder / "config.json"):
            self.model = cls.from_config(self.config, **(build or {}))  # lazy: no parameter is allocated
        if shards is None:
            shards = [(file, load_shard(file)) for file in shard_files(folder)]
        self.files = [file for file, _ in shards]
        self.weights, self.origin = self._read(shards)
        self.expected = dict(tree_flatten(self.model.parameters()))
        self._check(self.weights)
        self.plan: dict = {}

    def _read(self, shards) -> tuple[dict, dict]:
        """Every tensor under our names, with the (file, source name) it came from."""
        weights, origin = {}, {}
        for file, shard in shards:
            if any(k.endswith(".scales") for k in shard):
                raise CheckpointError(f"{file} is already quantized; convert from the float checkpoint")
            for source_name, value in shard.items():
                # One tensor at a time, so that each of our names knows the source name it came from.
                for name, v in self.model.sanitize({source_name: value}).items():
                    if name in weights:
                        raise CheckpointError(f"{file}: tensor {source_name} is also in {origin[name][0]}")
                    weights[name], origin[name] = v, (file, source_name)
        return weights, origin

    def _check(self, weights: dict):
        files = ", ".join(f.name for f in self.files)
        for name, ref in self.expected.items():
            if name not in weights:
                raise CheckpointError(f"{self.name}: tensor {name} is missing from {files} in {self.folder}")
            if weights[name].shape != ref.shape:
                file, source_name = self.origin.get(name, (self.folder, name))
                raise CheckpointError(f"{file}: tensor {source_name} has shape {tuple(weights[name].shape)}, "
                                      f"{self.name}/config.json needs {tuple(ref.shape)}")
            if mx.issubdtype(ref.dtype, mx.floating) and not mx.issubdtype(weights[name].dtype, mx.floating):
                file, source_name = self.origin.get(name, (self.folder, name))
                raise CheckpointError(f"{file}: tensor {source_name} holds integers ({weights[name].dtype}) where "
                                      "the model has float weights")
        for name in weights:
            if name not in self.expected:
                file, source_name = self.origin.get(name, (self.folder, name))
                raise CheckpointError(f"{file}: tensor {source_name} is not a parameter of the {self.name} "
                                      f"that {self.name}/config.json describes")

    def plan_for(self, bits: int | None, group_size: int):
        if not bits:
            self.plan = {}
        elif self.name in ("transformer", "controlnet"):
            self.plan = transformer_plan(self.model, bits, group_size)
        elif self.name == "text_encoder":
            self.plan = text_encoder_plan(self.model, bits, group_size)
        else:
            raise ValueError(f"the {self.name} is not quantized")

    def estimate(self, dtype_bytes: int) -> int:
        return plan_bytes({k: v.shape for k, v in self.weights.items()}, self.plan, dtype_bytes)[1]

    def outputs(self, name: str, value: mx.array, dtype) -> dict[str, mx.array]:
        """The tensors written for one float tensor: cast, or quantized as the plan says (lazy)."""
        if mx.issubdtype(value.dtype, mx.floating):
            value = value.astype(dtype)
        layer = name[: -len(".weight")] if name.endswith(".weight") else None
        if layer in self.plan:
            return {f"{layer}.{k}": v for k, v in quantize_weight(value, self.plan[layer]).items()}
        return {name: value}

    def take_weights(self, transform: Transform | None = None) -> dict:
        """The float weights to write (lazy), handed over: the component keeps no reference to them, so each
        source tensor is freed once its output is written."""
        weights, self.weights = self.weights, {}
        if transform is not None:
            weights = transform(weights)
            self._check(weights)
        return weights

    def stream(self, weights: dict, dtype):
        """The output tensors, one source tensor at a time (lazy), emptying ``weights`` as it goes."""
        for name in list(weights):
            yield self.outputs(name, weights.pop(name), dtype)

    def write(self, dst: Path, dtype, transform: Transform | None, max_shard_bytes: int, log):
        dst.mkdir()
        weights = self.take_weights(transform)
        self.params = sum(v.size for v in weights.values())
        self.bytes_before = sum(f.stat().st_size for f in self.files)
        # Shards keep the source's file stem: diffusers' diffusion_pytorch_model, transformers' model.
        stem = "diffusion_pytorch_model" if self.files[0].name.startswith("diffusion_pytorch_model") \
            or self.name == "transformer" else "model"
        shard, shard_bytes, parts, weight_map = {}, 0, [], {}
        for tensors in self.stream(weights, dtype):
            mx.eval(list(tensors.values()))  # the source tensor is released here: only `tensors` refer to it
            size = sum(v.nbytes for v in tensors.values())
            if shard and shard_bytes + size > max_shard_bytes:
                parts.append(self._flush(dst, stem, len(parts) + 1, shard, weight_map, log))
                shard, shard_bytes = {}, 0
            shard.update(tensors)
            shard_bytes += size
        if shard or not parts:
            parts.append(self._flush(dst, stem, len(parts) + 1, shard, weight_map, log))
        # Final names once the count is known, as Hugging Face names shards.
        renames = {p: f"{stem}-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i, p in enumerate(parts)}
        for old, new in renames.items():
            os.rename(dst / old, dst / new)
        weight_map = {k: renames[v] for k, v in sorted(weight_map.items())}
        self.bytes_after = sum((dst / f).stat().st_size for f in renames.values())
        write_json(dst / f"{stem}.safetensors.index.json",
                    {"metadata": {"format": "mlx", "total_size": self.bytes_after}, "weight_map": weight_map})
        write_json(dst / "config.json", self.output_config())
        for extra in self.folder.glob("*.json"):  # e.g. generation_config.json; not the source's index
            if extra.name != "config.json" and not extra.name.endswith(".index.json"):
                shutil.copyfile(extra, dst / extra.name)

    def output_config(self) -> dict:
        """config.json with the mlx-lm style ``quantization`` block when the plan quantizes anything."""
        config = {k: v for k, v in self.config.items() if k != "quantization"}
        block = quantization_block(self.plan)
        if block:
            config["quantization"] = block
        return config

    def _flush(self, dst: Path, stem: str, number: int, shard: dict, weight_map: dict, log) -> str:
        name = f"{stem}-{number:05d}.safetensors"
        write_shard(dst / name, shard)
        weight_map.update({k: name for k in shard})
        log(f"{self.name}: shard {number} written ({sum(v.nbytes for v in shard.values()) / 1e9:.2f} GB, "
            f"peak memory {mx.get_peak_memory() / 1e9:.2f} GB)")
        shard.clear()
        mx.clear_cache()
        return name

    def summary(self) -> dict:
        return {"component": self.name, "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
                "params": self.params, "bits_per_weight": 8 * self.bytes_after / max(self.params, 1),
                "quantized_layers": len(self.plan)}


class GGUFComponent(Component):
    """The transformer from a GGUF file: its tensors converted one at a time, quantized as the file has them
    (`mlx_qwen_image.gguf`), under the config of the checkpoint folder's transformer."""

    def __init__(self, name: str, cls, folder: Path, path: Path, build: dict | None = None):
        from mlx_qwen_image import gguf

        self.name, self.folder, self.files = name, folder, [path]
        self.config = read_json(folder / "config.json")
        with naming(folder / "config.json"):
            self.model = cls.from_config(self.config, **(build or {}))
        self.weights = gguf.read(path)
        gguf.check(self.weights, self.model, path)
        self.plan = gguf.plan_of(self.weights)
        self.requantized = gguf.requantized_types(self.weights)

    def plan_for(self, bits: int | None, group_size: int):
        """A GGUF file's quantization is the file's; nothing to plan."""

    def estimate(self, dtype_bytes: int) -> int:
        return sum(t.data.nbytes for t in self.weights.values())

    def take_weights(self, transform: Transform | None = None) -> dict:
        weights, self.weights = self.weights, {}
        return weights

    def stream(self, weights: dict, dtype):
        from mlx_qwen_image import gguf

        for name in list(weights):
            yield gguf.convert(weights.pop(name), dtype)[0]


def write_shard(path: Path, tensors: dict[str, mx.array]):
    """One MLX safetensors shard, with the ``{"format": "mlx"}`` metadata mlx-lm writes."""
    mx.save_safetensors(str(path), tensors, metadata={"format": "mlx"})


def write_json(path: Path, data: dict):
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
