"""Qwen-Image 2.1 end to end against diffusers' QwenImage21Pipeline (and the Turbo modular pipeline) on tiny random
checkpoints: prompt features, images from the same latents with CFG off and on, the Turbo grid, RGBA output, the
CLI."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TURBO_SIGMAS, rel_err
from PIL import Image

from mlx_qwen_image import QwenImagePipeline
from mlx_qwen_image.cli import cli
from mlx_qwen_image.variants import VARIANTS


@pytest.fixture(scope="module")
def ours(tiny21_checkpoint):
    return QwenImagePipeline.from_pretrained(tiny21_checkpoint[0], dtype="float32")


def noise(width, height, seed=0):
    return np.random.default_rng(seed).standard_normal((1, (height // 16) * (width // 16), 64)).astype(np.float32)


def reference(pipe, prompt, width, height, latents, steps, **kwargs):
    with torch.no_grad():
        return pipe(prompt, width=width, height=height, num_inference_steps=steps, latents=torch.from_numpy(latents),
                    output_type="np", **kwargs).images[0]


def test_the_variant_drops_what_diffusers_drops(tiny21_checkpoint, ours):
    pipe = tiny21_checkpoint[1]
    assert VARIANTS["QwenImage21Pipeline"].drop == pipe._drop_idx
    assert ours.variant.class_name == "QwenImage21Pipeline" and ours.sample_sigmas is None


def test_prompt_features_equal_diffusers(tiny21_checkpoint, ours):
    pipe = tiny21_checkpoint[1]
    prompts = ["a red fox in the snow", "a sign that says OPEN, in neon, at night"]
    with torch.no_grad():
        ref, ref_mask, slots = pipe.encode_prompt(prompts)
    got, mask = ours.encode_prompt(prompts)
    assert np.array_equal(np.array(mask), ref_mask.numpy()) and not slots.any()
    assert rel_err(np.array(got), ref.numpy()) < 1e-4
    with torch.no_grad():
        alone = pipe.encode_prompt("a red fox in the snow")[0]
    assert rel_err(np.array(ours.encode_prompt("a red fox in the snow")[0]), alone.numpy()) < 1e-4


def test_image_equals_diffusers_without_cfg(tiny21_checkpoint, ours):
    latents = noise(96, 64)
    got = ours.generate("a red fox", width=96, height=64, steps=3, latents=latents, output="np")
    ref = reference(tiny21_checkpoint[1], "a red fox", 96, 64, latents, 3)
    assert got.shape == ref.shape == (64, 96, 4)  # RGBA
    assert rel_err(got, ref) < 1e-3


def test_image_equals_diffusers_with_cfg(tiny21_checkpoint, ours):
    latents = noise(64, 96, seed=1)
    settings = dict(width=64, height=96, latents=latents)
    got = ours.generate("a lighthouse at dusk", negative_prompt="blurry, low quality", steps=3, cfg_scale=3.0,
                        output="np", **settings)
    ref = reference(tiny21_checkpoint[1], "a lighthouse at dusk", 64, 96, latents, 3,
                    negative_prompt="blurry, low quality", true_cfg_scale=3.0)
    assert rel_err(got, ref) < 1e-3


def test_turbo_grid_equals_the_modular_turbo_pipeline(tiny21_turbo_checkpoint):
    from diffusers.modular_pipelines import QwenImage21TurboAutoBlocks

    folder, pipe = tiny21_turbo_checkpoint
    turbo = QwenImage21TurboAutoBlocks().init_pipeline()
    turbo.update_components(transformer=pipe.transformer, vae=pipe.vae, text_encoder=pipe.text_encoder,
                            processor=pipe.processor, scheduler=pipe.scheduler)
    turbo.register_to_config(sample_sigmas=TURBO_SIGMAS)
    latents = noise(96, 64, seed=2)
    with torch.no_grad():
        ref = turbo(prompt="a paper boat", width=96, height=64, latents=torch.from_numpy(latents), output_type="np",
                    output="images")[0]
    ours = QwenImagePipeline.from_pretrained(folder, dtype="float32")
    assert ours.sample_sigmas == tuple(TURBO_SIGMAS)
    run = ours.denoise("a paper boat", width=96, height=64, latents=latents)
    assert run.total == len(TURBO_SIGMAS)  # the grid sets the step count
    got = run.complete("np")[0]
    assert rel_err(got, np.asarray(ref)) < 1e-3
    with pytest.raises(ValueError, match="fixed 5-step grid .*use steps=5"):
        ours.denoise("a paper boat", width=96, height=64, steps=8)


def test_sizes_are_multiples_of_32_and_pictures_rgba(ours):
    with pytest.raises(ValueError, match="width 80 is not a multiple of 32; use 64 or 96"):
        ours.denoise("a fox", width=80, height=64)
    with pytest.raises(ValueError, match="step caches .* not available for Qwen-Image 2.1"):
        from mlx_qwen_image.cache import FirstBlockCache

        ours.denoise("a fox", width=64, height=64, cache=FirstBlockCache())
    image = ours.generate("a fox", width=64, height=64, steps=2, seed=3)
    assert isinstance(image, Image.Image) and image.mode == "RGBA" and image.size == (64, 64)


def test_cli_writes_an_rgba_png_with_metadata(tiny21_checkpoint, tmp_path):
    out = tmp_path / "fox.png"
    args = ["generate", "a red fox", "--model", str(tiny21_checkpoint[0]), "--steps", "2", "--dtype", "float32",
            "--seed", "4"]
    result = CliRunner().invoke(cli, [*args, "--width", "96", "--height", "64", "-o", str(out)])
    assert result.exit_code == 0, result.output
    image = Image.open(out)
    assert image.mode == "RGBA" and image.size == (96, 64)
    assert image.text["prompt"] == "a red fox" and image.text["steps"] == "2" and image.text["seed"] == "4"
    bad = CliRunner().invoke(cli, [*args, "--width", "80", "--height", "64", "-o", str(tmp_path / "bad.png")])
    assert bad.exit_code == 1 and "--width 80 is not a multiple of 32" in bad.output
    assert "Traceback" not in bad.output and not (tmp_path / "bad.png").exists()


def test_size_presets_are_what_the_pipeline_makes_of_each_aspect(tiny_checkpoint, tmp_path):
    from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_dimensions

    from mlx_qwen_image.variants import RATIOS

    presets = {name: (w, h) for name, w, h in VARIANTS["QwenImage21Pipeline"].aspects}
    for name, (a, b) in RATIOS.items():
        for suffix, side in (("", 1024), ("-2k", 2048)):
            assert presets[name + suffix] == calculate_dimensions(side * side, a / b)[:2]
    # A 2.1 preset on a Qwen-Image checkpoint is refused, naming that model's presets.
    result = CliRunner().invoke(cli, ["generate", "a fox", "--model", str(tiny_checkpoint[0]), "--aspect", "16:9-2k",
                                      "-o", str(tmp_path / "a.png")])
    assert result.exit_code == 1 and "--aspect 16:9-2k is not a preset of Qwen-Image text-to-image" in result.output


@pytest.mark.parametrize("bits", [4, 8])
def test_converted_checkpoint_equals_quantize_on_load(tiny21_checkpoint, tmp_path, bits):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_qwen_image.convert import convert

    convert(tiny21_checkpoint[0], tmp_path / "q", bits=bits)
    on_load = QwenImagePipeline.from_pretrained(tiny21_checkpoint[0], quantize=bits, dtype="bfloat16")
    stored = QwenImagePipeline.from_pretrained(tmp_path / "q", dtype="bfloat16")
    assert on_load.quantization == stored.quantization != "none"  # 2 blocks: both first and last, so 8-bit
    a, b = dict(tree_flatten(on_load.transformer.parameters())), dict(tree_flatten(stored.transformer.parameters()))
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]) for k in a)
    # The recipe: the edges and the timestep path float, the shared modulation and first/last blocks at 8 bits.
    kinds = {path: getattr(m, "bits", None) for path, m in stored.transformer.named_modules()}
    assert kinds["img_in"] is kinds["proj_out"] is kinds["txt_in.in_layer"] is None
    assert kinds["modulation.1"] == kinds["transformer_blocks.0.attn.to_q"] == 8
    latents = noise(64, 64, seed=6)
    settings = dict(width=64, height=64, steps=2, latents=latents, output="np")
    assert np.array_equal(on_load.generate("a fox", **settings), stored.generate("a fox", **settings))
    exact = QwenImagePipeline.from_pretrained(tiny21_checkpoint[0], dtype="bfloat16").generate("a fox", **settings)
    assert 0 < rel_err(stored.generate("a fox", **settings), exact) < (0.05 if bits == 8 else 0.2)


def test_cli_refuses_lightning(tiny21_checkpoint, tmp_path):
    result = CliRunner().invoke(cli, ["generate", "a fox", "--model", str(tiny21_checkpoint[0]), "--lightning", "8",
                                      "-o", str(tmp_path / "fox.png")])
    assert result.exit_code == 1 and "--lightning is the schedule of Qwen-Image's Lightning LoRAs" in result.output
    assert not (tmp_path / "fox.png").exists()


def test_cli_refuses_masks_and_controlnets_before_loading(tiny21_checkpoint, tmp_path):
    picture = tmp_path / "in.png"
    Image.new("RGB", (64, 64)).save(picture)
    model = str(tiny21_checkpoint[0])
    for args, message in ((["edit", "x", "--image", str(picture), "--mask", str(picture)],
                           "--mask: inpainting is not available for Qwen-Image 2.1"),
                          (["generate", "x", "--controlnet", str(tmp_path), "--control-image", str(picture)],
                           "--controlnet: ControlNets are not available for Qwen-Image 2.1")):
        result = CliRunner().invoke(cli, args + ["--model", model, "-o", str(tmp_path / "out.png")])
        assert result.exit_code == 1 and message in result.output, result.output
