"""`mlx-qwen-image generate` on a tiny checkpoint: outputs, metadata, seeds, and clean refusals."""

import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mlx_qwen_image import __version__
from mlx_qwen_image.cli import cli


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return str(tiny_checkpoint[0])


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def generate(model, out, *extra):
    return run("generate", "a shop sign that says OPEN", "--model", model, "--width", 48, "--height", 32,
               "--steps", 2, "--dtype", "float32", "--output", out, *extra)


def test_png_with_metadata(model, tmp_path):
    out = tmp_path / "sign.png"
    result = generate(model, out, "--seed", 11, "--cfg-scale", 3, "--negative-prompt", "blurry")
    assert result.exit_code == 0, result.output
    assert "peak memory" in result.output and "s/step" in result.output
    image = Image.open(out)
    assert image.size == (48, 32) and image.mode == "RGB"
    meta = image.text
    assert meta["prompt"] == "a shop sign that says OPEN"
    assert meta["negative_prompt"] == "blurry"
    assert (meta["seed"], meta["steps"], meta["cfg_scale"]) == ("11", "2", "3.0")
    assert (meta["width"], meta["height"]) == ("48", "32")
    assert meta["model"] == model and meta["quantization"] == "none" and meta["text_encoder_quantization"] == "none"
    assert meta["software"] == f"mlx-qwen-image {__version__}"
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left behind


def test_same_seed_same_pixels(model, tmp_path):
    paths = [tmp_path / f"{name}.png" for name in ("a", "b", "c")]
    for path, seed in zip(paths, (5, 5, 6)):
        assert generate(model, path, "--seed", seed).exit_code == 0
    a, b, c = (np.asarray(Image.open(p)) for p in paths)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c).max() > 0


def test_num_images_use_consecutive_seeds(model, tmp_path):
    result = generate(model, tmp_path / "set.png", "--seed", 20, "--num-images", 2)
    assert result.exit_code == 0, result.output
    seeds = [Image.open(tmp_path / f"set-{i}.png").text["seed"] for i in (1, 2)]
    assert seeds == ["20", "21"]
    single = tmp_path / "single.png"
    assert generate(model, single, "--seed", 21).exit_code == 0
    np.testing.assert_array_equal(np.asarray(Image.open(single)), np.asarray(Image.open(tmp_path / "set-2.png")))


def test_existing_output_is_not_overwritten(model, tmp_path):
    out = tmp_path / "keep.png"
    out.write_bytes(b"precious")
    result = generate(model, out, "--seed", 1)
    assert result.exit_code != 0 and "already exists" in result.output
    assert out.read_bytes() == b"precious"
    assert generate(model, out, "--seed", 1, "--overwrite").exit_code == 0
    assert Image.open(out).size == (48, 32)


def _refused(result, message):
    assert result.exit_code not in (0, None), result.output
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--width", 50), "--width 50 is not a multiple of 16; use 48 or 64"),
        (("--height", 100), "--height 100 is not a multiple of 16; use 96 or 112"),
        (("--steps", 0), "--steps 0: at least 1 step is needed"),
        (("--cfg-scale", 0.5), "--cfg-scale 0.5: must be a number of at least 1"),
        (("--cfg-scale", "nan"), "--cfg-scale nan: must be a number of at least 1"),
        (("--aspect", "16:9"), "do not combine it with --width/--height"),
        (("--seed", -5), "--seed -5: must be in [0, 2**63 - --num-images)"),
    ],
)
def test_bad_arguments_are_refused(model, tmp_path, extra, message):
    out = tmp_path / "x.png"
    _refused(generate(model, out, *extra), message)
    assert not out.exists()


def test_bad_models_are_refused(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint
    out = tmp_path / "x.png"
    _refused(generate(str(tmp_path / "missing"), out), "does not exist")
    incomplete = tmp_path / "incomplete"
    shutil.copytree(folder, incomplete)
    shutil.rmtree(incomplete / "text_encoder")
    _refused(generate(str(incomplete), out), "missing text_encoder/")
    shutil.copytree(folder / "text_encoder", incomplete / "text_encoder")
    shard = next((incomplete / "vae").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:500])
    _refused(generate(str(incomplete), out), "damaged or incomplete: download or convert it again")
    assert not out.exists()


def test_unwritable_outputs_are_refused(model, tmp_path):
    _refused(generate(model, tmp_path / "no" / "such" / "dir.png"), "does not exist")
    blocker = tmp_path / "file"
    blocker.write_text("")
    _refused(generate(model, blocker / "x.png"), "does not exist")
    _refused(generate(model, tmp_path / "x.jpg"), "only .png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_warns_before_loading_a_model_too_large_for_memory(monkeypatch, tmp_path):
    import mlx_qwen_image.memory as memory

    monkeypatch.setattr(memory, "total_memory", lambda: 16 * 10**9)
    result = run("generate", "x", "--model", "nobody/not-cached", "--output", tmp_path / "x.png")
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("warning: nobody/not-cached at 1024x1024 needs about")
    assert "this machine has 16 GB; try --quantize 4 or --low-memory" in lines[0]
    assert result.exit_code != 0 and "could not get nobody/not-cached" in lines[1]
    # 4-bit weights with the text encoder released fit in 32 GB: no warning.
    monkeypatch.setattr(memory, "total_memory", lambda: 32 * 10**9)
    result = run("generate", "x", "--model", "nobody/not-cached", "--quantize", 4, "--low-memory")
    assert "warning" not in result.output


def test_img2img(model, tmp_path):
    source = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(source)
    out = tmp_path / "redrawn.png"
    result = generate(model, out, "--image", source, "--strength", 0.5, "--seed", 2)
    assert result.exit_code == 0, result.output
    meta = Image.open(out).text
    assert (meta["image"], meta["strength"]) == (str(source), "0.5")
    assert "1/1" in result.output  # int(2 - 2 * 0.5) of the 2 steps are skipped
    _refused(generate(model, tmp_path / "x.png", "--image", source, "--strength", 0), "--strength 0.0: must be in")
    _refused(generate(model, tmp_path / "x.png", "--image", tmp_path / "nope.png"), "cannot read image")


def _lora_file(path, key="transformer_blocks.0.attn.to_q", rank=2, width=32):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(3)
    save_file({f"transformer.{key}.lora_A.weight": rng.normal(size=(rank, width)).astype(np.float32),
               f"transformer.{key}.lora_B.weight": rng.normal(size=(width, rank)).astype(np.float32)}, path)
    return path


def test_lora_and_lightning(model, tmp_path):
    lora = _lora_file(tmp_path / "style.safetensors")
    plain, styled, light = tmp_path / "plain.png", tmp_path / "styled.png", tmp_path / "light.png"
    assert generate(model, plain, "--seed", 4).exit_code == 0
    result = generate(model, styled, "--seed", 4, "--lora", f"{lora}:0.5")
    assert result.exit_code == 0, result.output
    assert Image.open(styled).text["loras"] == f"{lora}:0.5"
    assert np.abs(np.asarray(Image.open(plain), int) - np.asarray(Image.open(styled))).max() > 0
    result = run("generate", "x", "--model", model, "--width", 32, "--height", 32, "--dtype", "float32",
                 "--lightning", 4, "--output", light)
    assert result.exit_code == 0, result.output
    meta = Image.open(light).text
    assert (meta["steps"], meta["cfg_scale"], meta["scheduler"]) == ("4", "1.0", "lightning-4")
    stray = _lora_file(tmp_path / "other.safetensors", key="some_other_model.layer")
    _refused(generate(model, tmp_path / "x.png", "--lora", stray), "match no")
    _refused(generate(model, tmp_path / "x.png", "--lora", tmp_path / "absent.safetensors"), "absent.safetensors")


@pytest.fixture(scope="module")
def edit_model(tmp_path_factory):
    from test_edit import build_edit_checkpoint

    from mlx_qwen_image.edit import PLUS_CLASS

    folder = tmp_path_factory.mktemp("edit") / "ckpt"
    build_edit_checkpoint(folder, PLUS_CLASS)
    return str(folder)


def test_edit_command(edit_model, model, tmp_path, monkeypatch):
    from test_edit import small_registry

    small_registry(monkeypatch)
    pictures = []
    for i, size in enumerate([(60, 40), (40, 50)]):
        pictures.append(tmp_path / f"p{i}.png")
        Image.fromarray(np.full((size[1], size[0], 3), 60 * i, np.uint8)).save(pictures[-1])
    out = tmp_path / "edited.png"
    args = ["edit", "swap them", "--model", edit_model, "--steps", 2, "--dtype", "float32", "--seed", 1]
    result = run(*args, "--image", pictures[0], "--image", pictures[1], "--output", out)
    assert result.exit_code == 0, result.output
    image = Image.open(out)
    assert image.size == (64, 64)  # the last picture's aspect at the (test-sized) 64x64 area
    assert image.text["images"] == f"{pictures[0]}, {pictures[1]}"
    _refused(run(*args, "--image", pictures[0], "--output", out), "already exists")
    # The picture limit is the registry's, checked before loading.
    _refused(run(*args, *["--image", pictures[0]] * 4, "--output", tmp_path / "y.png"),
             "4 pictures given; this checkpoint (QwenImageEditPlusPipeline) takes at most 3")
    _refused(run(*args, "--image", tmp_path / "missing.png", "--output", tmp_path / "y.png"), "cannot read image")
    # The wrong kind of checkpoint for the command, both ways.
    _refused(run("edit", "x", "--image", pictures[0], "--model", model, "--output", tmp_path / "y.png"),
             "is a text-to-image checkpoint (QwenImagePipeline): use `mlx-qwen-image generate`")
    _refused(generate(edit_model, tmp_path / "y.png"),
             "is an image-editing checkpoint (QwenImageEditPlusPipeline): use `mlx-qwen-image edit --image FILE`")
    assert not (tmp_path / "y.png").exists()
