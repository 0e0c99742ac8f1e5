"""GGUF transformers: every tensor type repacked or re-quantized, against llama.cpp's reader and against diffusers
loading the same file (`from_single_file` with `GGUFQuantizationConfig`)."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import randomize_, rel_err, to_torch

from mlx_qwen_image import gguf as ours_gguf
from mlx_qwen_image.config import CheckpointError
from mlx_qwen_image.models.transformer import QwenImageTransformer
from mlx_qwen_image.quantize import apply_plan

# Widths of 256 and more, so that every linear layer splits into K-quant super-blocks; img_in (16 inputs) stays float.
WIDE = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=128, num_attention_heads=2,
            joint_attention_dim=256, axes_dims_rope=[16, 56, 56])
EXACT_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K"]
BLOCK = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
         "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}


def _random_blocks(kind: str, rows: int, cols: int, rng) -> np.ndarray:
    """Valid blocks of ``kind`` made of random bytes (any bit pattern decodes), with small finite float16 scales."""
    values, size = BLOCK[kind]
    blocks = rng.integers(0, 256, (rows * cols // values, size), dtype=np.uint8)
    scale_at = {"Q6_K": [208]}.get(kind, [0, 2] if kind in ("Q4_1", "Q5_1", "Q4_K", "Q5_K") else [0])
    for at in scale_at:
        small = (rng.uniform(0.2, 1.0, len(blocks)) * (3e-4 if "K" in kind else 3e-3)).astype(np.float16)
        blocks[:, at:at + 2] = small.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def _types(model, kinds, multiple=256, floats=("BF16", "F32", "F16")):
    """A GGUF type for every weight of the model: the linear layers cycle through ``kinds``, img_in is BF16, the
    vectors (biases, norm gains) F32 or F16 (as published files store them; diffusers reads vectors only as floats)."""
    from mlx.utils import tree_flatten

    out, i = {}, 0
    for name, v in tree_flatten(model.parameters()):
        if v.ndim == 2 and v.shape[1] % multiple == 0:
            out[name] = kinds[i % len(kinds)]
            i += 1
        else:
            out[name] = floats[0] if v.ndim == 2 else floats[1 + len(out) % 2]
    return out


def write_gguf(path, reference, kinds, prefix="", seed=0, config=WIDE, floats=("BF16", "F32", "F16")):
    """A GGUF file of ``reference``'s (diffusers) tensors, quantized as ``kinds`` says; returns {name: type}."""
    import gguf
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    state = {k: v.detach().float().numpy() for k, v in reference.state_dict().items()}
    multiple = 256 if any("K" in k for k in kinds) else 32
    types = _types(QwenImageTransformer.from_config(config), kinds, multiple, floats)
    writer = gguf.GGUFWriter(str(path), "qwen_image")
    for name, kind in types.items():
        value = state[name]
        if kind == "F32":
            writer.add_tensor(prefix + name, value.astype(np.float32))
        elif kind == "F16":
            writer.add_tensor(prefix + name, value.astype(np.float16))
        else:
            T = gguf.GGMLQuantizationType[kind]
            if kind in ("BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
                data = quantize(value, T)
            else:  # gguf cannot quantize K-types: random valid blocks, the same bytes for both readers
                data = _random_blocks(kind, *value.shape, rng)
            writer.add_tensor(prefix + name, data, raw_shape=data.shape, raw_dtype=T)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


@pytest.fixture(scope="module")
def reference():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return randomize_(QwenImageTransformer2DModel(**WIDE).eval(), seed=1, std=0.05)


def _ours(path, dtype=mx.float32):
    model = QwenImageTransformer.from_config(WIDE)
    weights, plan, requantized = ours_gguf.load(path, model, dtype)
    apply_plan(model, plan)
    model.set_dtype(dtype)
    model.load_weights(list(weights.items()), strict=True)
    return model, plan, requantized


def _diffusers(path, folder):
    from diffusers import GGUFQuantizationConfig, QwenImageTransformer2DModel

    return QwenImageTransformer2DModel.from_single_file(
        str(path), config=str(folder), quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
        torch_dtype=torch.float32).eval()


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 6, 16)).astype(np.float32)
    txt = rng.standard_normal((1, 5, 256)).astype(np.float32)
    return x, txt, np.ones((1, 5), np.int32), np.array([0.7], np.float32), [[(1, 2, 3)]]


def _run_both(ours, theirs):
    x, txt, mask, t, shapes = _inputs()
    got = np.array(ours(mx.array(x), mx.array(txt), mx.array(mask), mx.array(t), shapes))
    with torch.no_grad():
        expected = theirs(hidden_states=to_torch(x), encoder_hidden_states=to_torch(txt),
                          encoder_hidden_states_mask=torch.from_numpy(mask).long(), timestep=to_torch(t),
                          img_shapes=shapes, return_dict=False)[0].numpy()
    return got, expected


@pytest.fixture(scope="module")
def files(reference, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    (root / "config").mkdir()
    (root / "config" / "config.json").write_text(json.dumps(dict(reference.config)))
    exact = root / "exact.gguf"
    types = write_gguf(exact, reference, EXACT_TYPES)
    mixed = root / "mixed.gguf"
    write_gguf(mixed, reference, EXACT_TYPES + ["Q6_K"], prefix="model.diffusion_model.")
    return {"root": root, "exact": exact, "mixed": mixed, "types": types}


def test_every_exact_type_repacks_to_the_readers_values(files):
    import gguf

    seen = set()
    for t in ours_gguf.read(files["exact"]).values():
        expected = gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType[t.kind]).reshape(t.shape)
        arrays, bits = ours_gguf.convert(t, mx.float32)
        if bits:
            layer = t.name[: -len(".weight")]
            got = mx.dequantize(arrays[f"{layer}.weight"], arrays[f"{layer}.scales"], arrays[f"{layer}.biases"],
                                group_size=32, bits=bits)
        else:
            got = arrays[t.name]
        assert rel_err(np.array(got), expected) < 1e-6, (t.name, t.kind)
        seen.add(t.kind)
    assert seen == set(EXACT_TYPES) | {"F32", "F16", "BF16"}


@pytest.fixture
def float32_dequant(monkeypatch):
    """diffusers calls its dequantizers without a dtype, so they compute in the file's float16 (Q4_1's d * q + m
    rounds there: 5e-4 per tensor); llama.cpp computes in float32, as we do. The reference is made to as well."""
    import diffusers.quantizers.gguf.utils as utils

    for kind, fn in list(utils.dequantize_functions.items()):
        monkeypatch.setitem(utils.dequantize_functions, kind,
                            lambda blocks, size, type_size, fn=fn: fn(blocks, size, type_size, dtype=torch.float32))


def test_the_transformer_equals_diffusers_on_the_same_file(files, float32_dequant):
    ours, plan, requantized = _ours(files["exact"])
    assert not requantized and {p["bits"] for p in plan.values()} == {4, 5, 8}
    got, expected = _run_both(ours, _diffusers(files["exact"], files["root"] / "config"))
    assert rel_err(got, expected) < 1e-4  # measured 6.6e-6


def test_q6_k_is_quantized_again_and_the_prefix_is_read(files, float32_dequant):
    ours, plan, requantized = _ours(files["mixed"])
    assert set(requantized) == {"Q6_K"} and requantized["Q6_K"] > 0
    theirs = _diffusers_prefixed(files)
    got, expected = _run_both(ours, theirs)
    assert rel_err(got, expected) < 2e-2  # measured 6.8e-3: Q6_K's 16-value groups become 6-bit groups of 32


def _diffusers_prefixed(files):
    """diffusers reads bare names only for this model: the same file's tensors under bare names."""
    import gguf

    reader = gguf.GGUFReader(str(files["mixed"]))
    bare = files["root"] / "mixed-bare.gguf"
    writer = gguf.GGUFWriter(str(bare), "qwen_image")
    for t in reader.tensors:
        writer.add_tensor(t.name.removeprefix("model.diffusion_model."), np.array(t.data),
                          raw_shape=np.array(t.data).shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return _diffusers(bare, files["root"] / "config")


def test_foreign_and_damaged_files_get_one_line(files, tmp_path):
    import gguf

    model = QwenImageTransformer.from_config({**WIDE, "joint_attention_dim": 512})
    with pytest.raises(CheckpointError, match=r"exact.gguf: tensor .* has shape .* config.json needs"):
        ours_gguf.load(files["exact"], model, mx.float32)
    with pytest.raises(CheckpointError, match="not a parameter of the transformer"):
        ours_gguf.load(files["exact"], QwenImageTransformer.from_config({**WIDE, "num_layers": 1}), mx.float32)
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(CheckpointError, match="cannot read .*junk.gguf as GGUF"):
        ours_gguf.read(tmp_path / "junk.gguf")
    odd = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(odd), "qwen_image")
    writer.add_tensor("transformer_blocks.0.attn.to_q.weight", np.zeros((256, 66), np.uint8), raw_shape=(256, 66),
                      raw_dtype=gguf.GGMLQuantizationType.TQ2_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensors = ours_gguf.read(odd)
    with pytest.raises(CheckpointError, match="tensor transformer_blocks.0.attn.to_q.weight is of GGUF type TQ2_0"):
        ours_gguf.check(tensors, QwenImageTransformer.from_config(WIDE), odd)


def test_packing_matches_mlx(tmp_path):
    rng = np.random.default_rng(0)
    for bits in (2, 3, 4, 5, 6, 8):
        codes = rng.integers(0, 2**bits, (3, 64), dtype=np.uint8)
        packed = mx.array(ours_gguf.pack(codes, bits))
        got = mx.dequantize(packed, mx.ones((3, 2)), mx.zeros((3, 2)), group_size=32, bits=bits)
        np.testing.assert_array_equal(np.array(got), codes)



# -- through the pipeline, the CLI and the converter, on the tiny checkpoint ---------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint's transformer as GGUF files (all float, and Q8_0/Q4_0 where rows split in 32s), and a
    copy of the checkpoint without transformer weights."""
    import shutil

    from conftest import TINY_TRANSFORMER

    folder, reference = tiny_checkpoint
    root = tmp_path_factory.mktemp("tiny-gguf")
    write_gguf(root / "float.gguf", reference.transformer, ["F32"], config=TINY_TRANSFORMER, floats=("F32",) * 3)
    write_gguf(root / "q8.gguf", reference.transformer, ["Q8_0", "Q4_0"], config=TINY_TRANSFORMER)
    bare = root / "bare"
    shutil.copytree(folder, bare)
    for f in (bare / "transformer").glob("*.safetensors"):
        f.unlink()
    return folder, root, bare


def test_a_pipeline_takes_its_transformer_from_gguf(tiny):
    from mlx_qwen_image import QwenImagePipeline

    folder, root, bare = tiny
    args = dict(width=32, height=48, steps=2, cfg_scale=2.0, seed=3, output="np")
    plain = QwenImagePipeline.from_pretrained(folder, dtype="float32").generate("a lamp", **args)
    same = QwenImagePipeline.from_pretrained(bare, dtype="float32", gguf=root / "float.gguf")
    np.testing.assert_array_equal(same.generate("a lamp", **args), plain)  # only the transformer's source differs
    q8 = QwenImagePipeline.from_pretrained(bare, dtype="float32", gguf=root / "q8.gguf")
    assert q8.quantization == "4-bit"  # the fewest bits of its layers (Q4_0)
    first = q8.generate("a lamp", low_memory=True, **args)  # the timestep layers come back from the file
    np.testing.assert_array_equal(q8.generate("a lamp", low_memory=True, **args), first)
    assert 0 < rel_err(first - 0.5, plain - 0.5) < 0.2  # Q8_0 and Q4_0 on the tiny random weights: 5.7%
    with pytest.raises(ValueError, match="a GGUF file comes quantized as it is"):
        QwenImagePipeline.from_pretrained(bare, gguf=root / "q8.gguf", quantize=4)


def test_generate_and_convert_with_gguf(tiny, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from mlx_qwen_image import QwenImagePipeline
    from mlx_qwen_image.cli import cli

    folder, root, bare = tiny
    out = tmp_path / "g.png"
    result = CliRunner().invoke(cli, ["generate", "x", "--model", str(bare), "--gguf", str(root / "q8.gguf"),
                                      "--width", "32", "--height", "32", "--steps", "2", "--dtype", "float32",
                                      "--seed", "1", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert Image.open(out).text["gguf"] == str(root / "q8.gguf") and Image.open(out).text["quantization"] == "4-bit"
    converted = tmp_path / "converted"
    result = CliRunner().invoke(cli, ["convert", "--model", str(bare), "--gguf", str(root / "q8.gguf"),
                                      "--dtype", "float16", "--output", str(converted)])
    assert result.exit_code == 0, result.output
    config = json.loads((converted / "transformer" / "config.json").read_text())
    assert config["quantization"]["group_size"] == 32 and {config["quantization"]["bits"]} <= {4, 8}
    args = dict(width=32, height=32, steps=2, cfg_scale=1.0, seed=1, output="np")
    from_file = QwenImagePipeline.from_pretrained(bare, dtype="float16", gguf=root / "q8.gguf").generate("x", **args)
    stored = QwenImagePipeline.from_pretrained(converted, dtype="float16").generate("x", **args)
    np.testing.assert_array_equal(stored, from_file)  # the converted checkpoint holds exactly the loaded weights
    result = CliRunner().invoke(cli, ["convert", "--model", str(bare), "--gguf", str(root / "q8.gguf"), "--bits",
                                      "4", "--output", str(tmp_path / "no")])
    assert result.exit_code == 1 and "leave out --bits" in result.output
