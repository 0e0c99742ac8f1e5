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


def _one_line(result, code, message):
    lines = result.output.strip().splitlines()
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and "Traceback" not in result.output and message in lines[0], result.output


def test_command_line_mistakes_are_one_line_with_exit_2(model, tmp_path):
    _one_line(run("generate", "x", "--frobnicate"), 2,
              "Error: No such option '--frobnicate'. (see mlx-qwen-image generate --help)")
    _one_line(run("generate", "x", "--steps", "many"), 2, "'many' is not a valid integer")
    _one_line(run("nonsense"), 2, "No such command 'nonsense'")


@pytest.mark.parametrize("extra, message", [
    (("--cfg-scale", "inf"), "--cfg-scale inf: must be a number of at least 1"),
    (("--lora", "style.safetensors:nan"), "the scale must be a finite number, got nan"),
    (("--lora", "style.safetensors:abc"), "the scale 'abc' is not a number"),
    (("--seed", 2**63 - 1), "--seed 9223372036854775807: must be in [0, 2**63 - --num-images)"),
    (("--seed", 2**63 - 2, "--num-images", 2), "must be in [0, 2**63 - --num-images)"),
    (("--width", 100000, "--height", 64), "the largest size of this aspect that fits is"),
    (("--width", 100000, "--height", 100000), "for the run's activations alone"),
    (("--negative-prompt", "bad \udc80"), "negative_prompt is not valid text"),
])
def test_more_bad_options_are_refused_before_loading(model, tmp_path, extra, message):
    out = tmp_path / "x.png"
    _one_line(generate(model, out, *extra), 1, message)
    assert not out.exists()


def test_an_output_that_is_a_folder_is_refused(model, tmp_path):
    (tmp_path / "x.png").mkdir()
    _one_line(generate(model, tmp_path / "x.png", "--overwrite"), 1, "is a folder; give a file name ending in .png")


def test_ctrl_c_exits_130(model, tmp_path, monkeypatch):
    from mlx_qwen_image.pipeline import QwenImagePipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(QwenImagePipeline, "from_pretrained", interrupted)
    _one_line(generate(model, tmp_path / "x.png"), 130, "interrupted")


def test_progress_phases_and_warnings_in_a_log(model, tmp_path):
    long_prompt = "a very long prompt " * 300  # beyond the 1019 prompt tokens that fit: cut, with a warning
    result = run("generate", long_prompt, "--model", model, "--width", 32, "--steps", 2, "--dtype", "float32",
                 "--seed", 1, "--output", tmp_path / "x.png")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "\r" not in result.output  # not a terminal: one line per step
    assert any(line.startswith("seed 1 [") and " 1/2 " in line for line in lines)
    assert any(line.startswith("seed 1 [") and " 2/2 " in line for line in lines)
    assert "seed 1: encoding the prompt" in lines and "seed 1: decoding the image" in lines
    warning = next(line for line in lines if line.startswith("warning:"))
    assert "tokens were cut" in warning and "UserWarning" not in result.output and ".py:" not in result.output
    saved = next(line for line in lines if line.startswith("saved"))
    assert "prompt" in saved and "2 steps" in saved and "decode" in saved
    assert Image.open(tmp_path / "x.png").size == (32, 32)  # --width alone: the square aspect kept


def test_a_run_that_produces_nans_writes_no_file(model, tmp_path):
    lora = _lora_file(tmp_path / "huge.safetensors")
    out = tmp_path / "x.png"
    result = generate(model, out, "--lora", f"{lora}:1e38")  # finite, but the fused weights overflow
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output.strip().splitlines()[-1].startswith(
        "Error: the denoised latents hold NaN or infinite values, so no picture was made; likely causes: a LoRA")
    assert not out.exists() and list(tmp_path.iterdir()) == [lora]


def test_lightning_without_a_lora_gives_a_hint(model, tmp_path):
    result = run("generate", "x", "--model", model, "--width", 32, "--height", 32, "--dtype", "float32",
                 "--lightning", 4, "--output", tmp_path / "l.png")
    assert result.exit_code == 0, result.output
    assert "note: --lightning sets the Lightning schedule, which expects the Lightning LoRA" in result.output
