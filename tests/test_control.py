"""ControlNet runs against diffusers' QwenImageControlNetPipeline (one ControlNet, the Multi model with two
conditions) and QwenImageControlNetInpaintPipeline, on tiny random checkpoints from the same noise; loading,
the CLI and refusals."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_TRANSFORMER, randomize_, rel_err
from PIL import Image, ImageDraw

from mlx_qwen_image import QwenImagePipeline
from mlx_qwen_image.cache import FirstBlockCache
from mlx_qwen_image.cli import cli

WIDTH, HEIGHT = 96, 64
TINY_CONTROLNET = {k: v for k, v in TINY_TRANSFORMER.items() if k != "out_channels"} | {"num_layers": 1}


@pytest.fixture(scope="module")
def controlnets(tmp_path_factory):
    """(folder, diffusers model) of a tiny ControlNet and of a tiny inpainting ControlNet."""
    from diffusers import QwenImageControlNetModel

    made = {}
    for key, extra, seed in (("plain", 0, 11), ("inpaint", 4, 12)):
        torch.manual_seed(seed)
        model = randomize_(QwenImageControlNetModel(**TINY_CONTROLNET, extra_condition_channels=extra), seed,
                           std=0.15).eval()
        folder = tmp_path_factory.mktemp(f"controlnet-{key}")
        model.save_pretrained(folder, safe_serialization=True)
        made[key] = (folder, model)
    return made


def picture(seed, width=80, height=60) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def noise(width=WIDTH, height=HEIGHT):
    from test_pipeline import _packed

    return _packed(torch.randn((1, 1, 4, height // 8, width // 8), generator=torch.Generator().manual_seed(0)).numpy())


@pytest.fixture
def mean_latents(monkeypatch):
    """diffusers encodes control pictures by sampling the VAE's distribution; we (as for img2img) use its mean."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())


def _reference(pipe, **kwargs):
    with torch.no_grad():
        return pipe(prompt="a dancer on a poster", negative_prompt=" ", true_cfg_scale=4.0, width=WIDTH,
                    height=HEIGHT, num_inference_steps=5, latents=torch.from_numpy(noise()), output_type="np",
                    **kwargs).images[0]


def test_one_controlnet_equals_diffusers(tiny_checkpoint, controlnets, mean_latents):
    from diffusers import QwenImageControlNetPipeline

    folder, reference = tiny_checkpoint
    net_folder, net = controlnets["plain"]
    ref = QwenImageControlNetPipeline(**reference.components, controlnet=net)
    settings = dict(controlnet_conditioning_scale=0.7, control_guidance_start=0.1, control_guidance_end=0.8)
    expected = _reference(ref, control_image=picture(1), **settings)
    ours = QwenImagePipeline.from_pretrained(folder, dtype="float32", controlnets=[net_folder])
    got = ours.generate("a dancer on a poster", width=WIDTH, height=HEIGHT, steps=5, cfg_scale=4.0,
                        latents=noise(), output="np", control_images=[picture(1)], control_scale=0.7,
                        control_start=0.1, control_end=0.8)
    assert rel_err(got - 0.5, expected - 0.5) < 1e-3
    plain = QwenImagePipeline.from_pretrained(folder, dtype="float32").generate(
        "a dancer on a poster", width=WIDTH, height=HEIGHT, steps=5, cfg_scale=4.0, latents=noise(), output="np")
    assert rel_err(plain - 0.5, expected - 0.5) > 1e-2  # the ControlNet matters
    # outside the whole schedule's window it does nothing
    off = ours.generate("a dancer on a poster", width=WIDTH, height=HEIGHT, steps=5, cfg_scale=4.0, latents=noise(),
                        output="np", control_images=[picture(1)], control_start=0.0, control_end=0.1)
    np.testing.assert_array_equal(off, plain)


def test_a_batch_of_prompts_gets_each_prompt_s_image(tiny_checkpoint, controlnets):
    """Two prompts under CFG: the residuals repeat per row ([cond; uncond] of a batch of two)."""
    folder, _ = tiny_checkpoint
    ours = QwenImagePipeline.from_pretrained(folder, dtype="float32", controlnets=[controlnets["plain"][0]])
    args = dict(width=WIDTH, height=HEIGHT, steps=2, cfg_scale=4.0, output="np", control_images=[picture(1)])
    lat = noise()
    both = ours.generate(["a dancer", "a lighthouse"], latents=np.concatenate([lat, lat]), **args)
    for prompt, got in zip(["a dancer", "a lighthouse"], both):
        assert rel_err(got, ours.generate(prompt, latents=lat, **args)) < 1e-5


def test_two_conditions_on_one_net_equal_diffusers_multi(tiny_checkpoint, controlnets, mean_latents):
    from diffusers import QwenImageControlNetPipeline, QwenImageMultiControlNetModel

    folder, reference = tiny_checkpoint
    net_folder, net = controlnets["plain"]
    ref = QwenImageControlNetPipeline(**reference.components, controlnet=QwenImageMultiControlNetModel([net]))
    expected = _reference(ref, control_image=[picture(1), picture(2, 60, 80)],
                          controlnet_conditioning_scale=[0.7, 0.4], control_guidance_start=[0.1, 0.0],
                          control_guidance_end=[0.8, 1.0])
    ours = QwenImagePipeline.from_pretrained(folder, dtype="float32", controlnets=[net_folder, net_folder])
    assert len(ours.controlnet.nets) == 1  # one net, two conditions (the Union model's use)
    got = ours.generate("a dancer on a poster", width=WIDTH, height=HEIGHT, steps=5, cfg_scale=4.0,
                        latents=noise(), output="np", control_images=[picture(1), picture(2, 60, 80)],
                        control_scale=[0.7, 0.4], control_start=[0.1, 0.0], control_end=[0.8, 1.0])
    assert rel_err(got - 0.5, expected - 0.5) < 1e-3


def test_inpainting_controlnet_equals_diffusers(tiny_checkpoint, controlnets, mean_latents):
    from diffusers import QwenImageControlNetInpaintPipeline

    folder, reference = tiny_checkpoint
    net_folder, net = controlnets["inpaint"]
    region = Image.new("L", (80, 60), 0)
    ImageDraw.Draw(region).ellipse([20, 10, 60, 45], fill=255)
    ref = QwenImageControlNetInpaintPipeline(**reference.components, controlnet=net)
    expected = _reference(ref, control_image=picture(3), control_mask=region, controlnet_conditioning_scale=0.9)
    ours = QwenImagePipeline.from_pretrained(folder, dtype="float32", controlnets=[net_folder])
    got = ours.generate("a dancer on a poster", width=WIDTH, height=HEIGHT, steps=5, cfg_scale=4.0,
                        latents=noise(), output="np", control_images=[picture(3)], mask=region, control_scale=0.9)
    assert rel_err(got - 0.5, expected - 0.5) < 1e-3
    with pytest.raises(ValueError, match="the inpainting ControlNet repaints its control picture"):
        ours.generate("x", control_images=[picture(3)], steps=1)


def test_refusals_and_the_cli(tiny_checkpoint, controlnets, tmp_path):
    folder, _ = tiny_checkpoint
    net_folder, _ = controlnets["plain"]
    ours = QwenImagePipeline.from_pretrained(folder, dtype="float32", controlnets=[net_folder])
    for kwargs, message in (
        (dict(), "this pipeline has a ControlNet: pass control_images"),
        (dict(control_images=[picture(1)], control_start=0.5, control_end=0.5), "0 <= start < end <= 1"),
        (dict(control_images=[picture(1)], control_scale=[1.0, 2.0]), "2 values for 1 control pictures"),
        (dict(control_images=[picture(1)], images=[picture(2)]), "ControlNets guide text-to-image"),
        (dict(control_images=[picture(1)], cache=FirstBlockCache()), "step caches .* do not run with ControlNets"),
    ):
        with pytest.raises(ValueError, match=message):
            ours.generate("x", steps=1, **kwargs)
    with pytest.raises(ValueError, match="control_images= needs a ControlNet"):
        QwenImagePipeline.from_pretrained(folder, dtype="float32").generate("x", control_images=[picture(1)])
    with pytest.raises(Exception, match="not a ControlNet checkpoint"):
        QwenImagePipeline.from_pretrained(folder, dtype="float32", controlnets=[tmp_path])

    control, out = tmp_path / "pose.png", tmp_path / "out.png"
    picture(1).save(control)
    args = ["generate", "a dancer on a poster", "--model", str(folder), "--width", str(WIDTH), "--height",
            str(HEIGHT), "--steps", "3", "--seed", "2", "--dtype", "float32"]
    result = CliRunner().invoke(cli, args + ["--controlnet", f"{net_folder}:0.7", "--control-image", str(control),
                                             "--control-end", "0.8", "-o", str(out)])
    assert result.exit_code == 0, result.output
    saved = Image.open(out)
    assert saved.text["controlnets"] == f"{net_folder}:0.7" and saved.text["control_images"] == str(control)
    expected = ours.generate("a dancer on a poster", width=WIDTH, height=HEIGHT, steps=3, seed=2,
                             control_images=[control], control_scale=0.7, control_end=0.8)
    np.testing.assert_array_equal(np.asarray(saved), np.asarray(expected))
    for extra, message in ((["--controlnet", str(net_folder)], "--controlnet needs --control-image"),
                           (["--control-image", str(control)], "--control-image needs --controlnet"),
                           (["--controlnet", str(tmp_path / "nowhere"), "--control-image", str(control)],
                            "no such folder")):
        result = CliRunner().invoke(cli, args + extra + ["-o", str(tmp_path / "x.png")])
        assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


def test_converted_controlnet_loads_and_gives_the_same_image(tiny_checkpoint, controlnets, tmp_path):
    folder, _ = tiny_checkpoint
    net_folder, _ = controlnets["plain"]
    out = tmp_path / "controlnet-mlx"
    result = CliRunner().invoke(cli, ["convert", "--controlnet", "--model", str(net_folder), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "controlnet" in result.output
    args = dict(width=WIDTH, height=HEIGHT, steps=2, cfg_scale=1.0, latents=noise(), output="np",
                control_images=[picture(1)], control_scale=0.7)
    direct = QwenImagePipeline.from_pretrained(folder, dtype="bfloat16", controlnets=[net_folder])
    converted = QwenImagePipeline.from_pretrained(folder, dtype="bfloat16", controlnets=[out])
    np.testing.assert_array_equal(direct.generate("a dancer", **args), converted.generate("a dancer", **args))
    again = CliRunner().invoke(cli, ["convert", "--controlnet", "--model", str(net_folder), "--output", str(out)])
    assert again.exit_code == 1 and "already exists" in again.output
    eight = tmp_path / "controlnet-8bit"
    result = CliRunner().invoke(cli, ["convert", "--controlnet", "--model", str(net_folder), "--output", str(eight),
                                      "--bits", "8", "--group-size", "32"])
    assert result.exit_code == 0, result.output
    quantized = QwenImagePipeline.from_pretrained(folder, dtype="bfloat16", controlnets=[eight])
    block = quantized.controlnet.nets[0].transformer_blocks[0].attn.to_q
    assert type(block).__name__ == "QuantizedLinear"
    assert type(quantized.controlnet.nets[0].controlnet_blocks[0]).__name__ == "Linear"
    got, ref = quantized.generate("a dancer", **args), direct.generate("a dancer", **args)
    assert 0 < rel_err(got - 0.5, ref - 0.5) < 5e-2


def test_a_server_with_a_controlnet(tiny_checkpoint, controlnets):
    """`serve --controlnet`: a real server and the OpenAI client; the control fields in the JSON body."""
    import base64
    import io

    from openai import BadRequestError, OpenAI
    from test_server import Running

    from mlx_qwen_image.jobs import Service

    folder, _ = tiny_checkpoint
    net_folder, _ = controlnets["plain"]
    running = Running(Service(str(folder), {"dtype": "float32", "controlnets": [str(net_folder)]})).ready()
    try:
        buffer = io.BytesIO()
        picture(1).save(buffer, format="PNG")
        control = base64.b64encode(buffer.getvalue()).decode()
        client = OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=300)
        response = client.images.generate(prompt="a dancer", size=f"{WIDTH}x{HEIGHT}", extra_body={
            "seed": 2, "steps": 3, "control_image": control, "control_scale": 0.7, "control_end": 0.8})
        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json))).convert("RGB"))
        expected = running.service.pipe.generate("a dancer", width=WIDTH, height=HEIGHT, steps=3, seed=2,
                                                 control_images=[picture(1)], control_scale=0.7, control_end=0.8)
        np.testing.assert_array_equal(served, np.asarray(expected))
        with pytest.raises(BadRequestError, match="this pipeline has a ControlNet: pass control_images"):
            client.images.generate(prompt="a dancer", size=f"{WIDTH}x{HEIGHT}", extra_body={"steps": 1})
        with pytest.raises(BadRequestError, match="control_scale must be a number"):
            client.images.generate(prompt="a dancer", size=f"{WIDTH}x{HEIGHT}",
                                   extra_body={"control_image": control, "control_scale": "big"})
    finally:
        running.stop()
