"""Damaged checkpoints, table-driven, through `generate` and `convert`: exit 1, one line naming the file and what
is wrong, no traceback, nothing written. And the checks behind them, unit by unit."""

import json
import os
import shutil
import struct

import numpy as np
import pytest
from click.testing import CliRunner

from mlx_qwen_image.cli import cli
from mlx_qwen_image.config import CheckpointError, TransformerConfig
from mlx_qwen_image.loading import check_safetensors


def _own(path):
    """Make ``path`` a file of its own (the copy's files are hard links to the shared checkpoint's)."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)


def _edit_json(relative, change):
    def mutate(root):
        path = root / relative
        data = json.loads(path.read_text())
        _own(path)
        path.write_text(json.dumps(change(data)))
    return mutate


def _write(relative, content: bytes):
    def mutate(root):
        path = root / relative
        if path.exists():
            path.unlink()
        path.write_bytes(content)
    return mutate


def _remove(relative):
    return lambda root: (root / relative).unlink()


def _header_claims(relative, claimed: int):
    def mutate(root):
        path = root / relative
        data = path.read_bytes()
        path.unlink()
        path.write_bytes(struct.pack("<Q", claimed) + data[8:])
    return mutate


def _integer_tensor(root):
    from safetensors.numpy import load_file, save_file

    path = root / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    name = sorted(k for k in tensors if k.endswith("bias"))[0]
    tensors[name] = tensors[name].astype(np.int32)
    path.unlink()
    save_file(tensors, str(path))


T, V, S, K = "transformer/config.json", "vae/config.json", "scheduler/scheduler_config.json", "tokenizer"
CASES = {
    "config is a list": (_edit_json(T, lambda c: [c]), "transformer/config.json holds a JSON list, not an object"),
    "config not JSON": (_write(T, b'{"num_layers": 2,,}'), "transformer/config.json is not valid JSON (Expecting"),
    "string for a number": (_edit_json(T, lambda c: c | {"num_layers": "two"}),
                            "transformer/config.json: num_layers must be an integer, got 'two'"),
    "zero head dimension": (_edit_json(T, lambda c: c | {"attention_head_dim": 0}),
                            "transformer/config.json: attention_head_dim must be at least 1, got 0"),
    "rope axes off": (_edit_json(T, lambda c: c | {"axes_dims_rope": [4, 6, 8]}),
                      "axes_dims_rope [4, 6, 8] must add up to attention_head_dim 16"),
    # (what generate says, what convert says): the loader lists the names, the converter names the source file.
    "wrong widths": (_edit_json(T, lambda c: c | {"joint_attention_dim": 48}),
                     ("2 tensors have the wrong shape: txt_in.weight (32, 32) (needs (32, 48))",
                      "transformer/config.json needs (")),
    "one block less": (_edit_json(T, lambda c: c | {"num_layers": 1}),
                       ("checkpoint tensors are not parameters of the model its config.json describes: "
                        "transformer_blocks.1.", "diffusion_pytorch_model.safetensors: tensor transformer_blocks.1.")),
    "latents_std short": (_edit_json(V, lambda c: c | {"latents_std": [1.0, 2.0, 3.0]}),
                          "vae/config.json: latents_std has 3 values for z_dim 4"),
    "index is a list": (_write("model_index.json", b"[1, 2]"), "model_index.json holds a JSON list, not an object"),
    "unknown class": (_write("model_index.json", b'{"_class_name": "QwenImageLayeredPipeline"}'),
                      "is a QwenImageLayeredPipeline checkpoint, which mlx-qwen-image does not run"),
    "empty shift range": (_edit_json(S, lambda c: c | {"max_image_seq_len": 256}),
                          "scheduler_config.json: max_image_seq_len (256) must be larger than base_image_seq_len"),
    "unknown scheduler": (_edit_json(S, lambda c: c | {"_class_name": "DPMSolverMultistepScheduler"}),
                          "scheduler_config.json: scheduler DPMSolverMultistepScheduler is not supported"),
    "shard of 5 bytes": (_write("vae/diffusion_pytorch_model.safetensors", b"12345"),
                         "is 5 bytes, too short for a safetensors file"),
    "absurd header": (_header_claims("vae/diffusion_pytorch_model.safetensors", 2**60),
                      "its header claims 1152921504606846976 bytes in a"),
    "integer weights": (_integer_tensor, "where the model has float weights"),
    "vocab not JSON": (_write(f"{K}/vocab.json", b"not json"), "tokenizer/vocab.json is not valid JSON"),
    "vocab empty": (_write(f"{K}/vocab.json", b""), "tokenizer/vocab.json is not valid JSON"),
    "vocab unreadable": (_write(f"{K}/vocab.json", b"\xff\xfe\x00"), "tokenizer/vocab.json"),
    "merges empty": (_write(f"{K}/merges.txt", b"#version: 0.2\n"), "tokenizer/merges.txt has no merges"),
    "merges garbage": (_write(f"{K}/merges.txt", b"#version: 0.2\na b c d\n"),
                       "tokenizer/merges.txt line 1 is not a pair of tokens"),
    "no tokenizer_config": (_remove(f"{K}/tokenizer_config.json"), "tokenizer/tokenizer_config.json is missing"),
}


@pytest.fixture(scope="module")
def damaged(tiny_checkpoint, tmp_path_factory):
    folder, _ = tiny_checkpoint
    made = {}
    for name, (mutate, _) in CASES.items():
        root = tmp_path_factory.mktemp("damaged") / name.replace(" ", "-")
        shutil.copytree(folder, root, copy_function=os.link)
        mutate(root)
        made[name] = root
    return made


def _one_line_refusal(result, message):
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert message in lines[0], lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_checkpoints_through_generate_and_convert(damaged, tmp_path, case):
    root, message = damaged[case], CASES[case][1]
    on_generate, on_convert = message if isinstance(message, tuple) else (message, message)
    out = tmp_path / "x.png"
    result = CliRunner().invoke(cli, ["generate", "x", "--model", str(root), "--width", "32", "--height", "32",
                                      "--steps", "1", "--output", str(out)])
    _one_line_refusal(result, on_generate)
    assert not out.exists()
    dest = tmp_path / "converted"
    result = CliRunner().invoke(cli, ["convert", "--model", str(root), "--output", str(dest)])
    _one_line_refusal(result, on_convert)
    assert not dest.exists() and list(tmp_path.iterdir()) == []  # no partial folder either


def test_an_editing_checkpoint_needs_its_processor(tiny_checkpoint, tmp_path):
    root = tmp_path / "edit"
    shutil.copytree(tiny_checkpoint[0], root, copy_function=os.link)
    _write("model_index.json", b'{"_class_name": "QwenImageEditPlusPipeline"}')(root)
    result = CliRunner().invoke(cli, ["edit", "x", "--image", str(root / "model_index.json"), "--model", str(root)])
    _one_line_refusal(result, "missing processor/")


def test_safetensors_headers_are_read_defensively(tmp_path):
    from safetensors.numpy import save_file

    good = tmp_path / "good.safetensors"
    save_file({"a": np.ones((2, 3), np.float32)}, str(good))
    assert check_safetensors(good)["a"]["shape"] == [2, 3]
    data = good.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    cases = {
        "not JSON": b"{" * length,
        "a list": json.dumps([1]).encode().ljust(length),
        "bad dtype": json.dumps({"a": {**header["a"], "dtype": "F17"}}).encode().ljust(length),
        "past the end": json.dumps({"a": {**header["a"], "data_offsets": [0, 10**6]}}).encode().ljust(length),
        "size mismatch": json.dumps({"a": {**header["a"], "shape": [2, 4]}}).encode().ljust(length),
    }
    for name, bad_header in cases.items():
        broken = tmp_path / f"{name}.safetensors"
        broken.write_bytes(data[:8] + bad_header[:length] + data[8 + length:])
        with pytest.raises(CheckpointError, match=str(broken)):
            check_safetensors(broken)


def test_config_values_are_checked_against_their_types():
    from mlx_qwen_image.config import ConfigError, SchedulerConfig, VAEConfig

    with pytest.raises(ConfigError, match="rope_theta must be a finite number, got nan"):
        TransformerConfig.from_dict({"rope_theta": float("nan")})
    with pytest.raises(ConfigError, match="guidance_embeds must be true or false"):
        TransformerConfig.from_dict({"guidance_embeds": "yes"})
    with pytest.raises(ConfigError, match="shift_terminal must be in"):
        SchedulerConfig.from_dict({"shift_terminal": 1.5})
    with pytest.raises(ConfigError, match="dim_mult must be a list of integers"):
        VAEConfig.from_dict({"dim_mult": [1, "x"]})
    assert TransformerConfig.from_dict({"unknown_key": [1, 2], "num_layers": 3}).num_layers == 3
