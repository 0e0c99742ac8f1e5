"""Editing: our QwenImageEditPipeline against diffusers' QwenImageEditPlusPipeline / QwenImageEditPipeline."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import RELEASED, TINY_TEXT_ENCODER, TINY_TRANSFORMER, TINY_VAE, randomize_, rel_err
from PIL import Image

import mlx_qwen_image.edit as edit
from mlx_qwen_image import QwenImagePipeline
from mlx_qwen_image.conditioning import edit_pictures, output_size
from mlx_qwen_image.edit import QwenImageEditPipeline
from mlx_qwen_image.loading import CheckpointError
from mlx_qwen_image.variants import VARIANTS

IMAGE_PAD = 151655


def _processor(tokenizer):
    """transformers' Qwen2VLProcessor around the PIL image processor (its __init__ wants torchvision)."""
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    proc = object.__new__(Qwen2VLProcessor)
    proc.image_processor, proc.tokenizer, proc.video_processor, proc.chat_template = (
        Qwen2VLImageProcessorPil(), tokenizer, None, None)
    proc.image_token, proc.video_token = "<|image_pad|>", "<|video_pad|>"
    proc.image_token_id, proc.video_token_id = IMAGE_PAD, 151656
    return proc


def _with_3d_positions(text_encoder):
    """diffusers does not pass the processor's mm_token_type_ids, so transformers 5 silently gives image tokens
    1-D positions (diffusers issue 14194); the model was trained with 3-D ones, which is what we compute."""

    def hook(module, args, kwargs):
        if kwargs.get("pixel_values") is not None:
            kwargs["mm_token_type_ids"] = (kwargs["input_ids"] == IMAGE_PAD).long()
        return args, kwargs

    text_encoder.register_forward_pre_hook(hook, with_kwargs=True)
    return text_encoder


def build_edit_checkpoint(folder, variant, zero_cond_t=False, seed=0):
    """Tiny random editing components saved in the published layout; returns the diffusers pipeline."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline,
                           QwenImageEditPlusPipeline, QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    torch.manual_seed(seed)
    tokenizer = Qwen2Tokenizer.from_pretrained(str(RELEASED / "tokenizer"))
    components = dict(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(
            json.loads((RELEASED / "scheduler" / "scheduler_config.json").read_text())),
        vae=randomize_(AutoencoderKLQwenImage(**TINY_VAE), seed + 1, std=0.2).eval(),
        text_encoder=randomize_(Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**TINY_TEXT_ENCODER)),
                                seed + 2, std=0.1).eval(),
        tokenizer=tokenizer,
        processor=_processor(tokenizer),
        transformer=randomize_(QwenImageTransformer2DModel(**TINY_TRANSFORMER, zero_cond_t=zero_cond_t),
                               seed + 3, std=0.15).eval(),
    )
    for name in ("vae", "text_encoder", "transformer", "scheduler"):
        components[name].save_pretrained(folder / name)
    shutil.copytree(RELEASED / "tokenizer", folder / "tokenizer")
    components["processor"].image_processor.save_pretrained(folder / "processor")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": variant}))
    _with_3d_positions(components["text_encoder"])
    cls = QwenImageEditPlusPipeline if variant == edit.PLUS_CLASS else QwenImageEditPipeline
    return cls(**components)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {}
    for key, variant, zero in (("plus", edit.PLUS_CLASS, False), ("2511", edit.PLUS_CLASS, True),
                               ("edit", edit.EDIT_CLASS, False)):
        folder = tmp_path_factory.mktemp(key) / "ckpt"
        made[key] = (folder, build_edit_checkpoint(folder, variant, zero_cond_t=zero))
    return made


def _pictures():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((70, 100), (90, 60))]


def small_registry(monkeypatch):
    """Our editing variants with pictures at 64x64-ish for the VAE and 56x56-ish for the vision tower."""
    for name, v in VARIANTS.items():
        if v.edits:
            small = dict(reference_area=64 * 64) | ({"condition_area": 56 * 56} if v.condition_area else {})
            monkeypatch.setitem(VARIANTS, name, dataclasses.replace(v, **small))


@pytest.fixture
def small_areas(monkeypatch):
    """Pictures at 64x64-ish for the VAE and 56x56-ish for the vision tower, on both sides, so tests are fast."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as ref_edit
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as ref_plus

    monkeypatch.setattr(ref_plus, "VAE_IMAGE_SIZE", 64 * 64)
    monkeypatch.setattr(ref_plus, "CONDITION_IMAGE_SIZE", 56 * 56)
    original = ref_edit.calculate_dimensions
    monkeypatch.setattr(ref_edit, "calculate_dimensions", lambda area, ratio: original(64 * 64, ratio))
    small_registry(monkeypatch)


def _reference(pipe, images, prompt, latents, width, height, steps, cfg_scale):
    with torch.no_grad():
        return pipe(image=images, prompt=prompt, negative_prompt=" " if cfg_scale > 1 else None,
                    true_cfg_scale=cfg_scale, width=width, height=height, num_inference_steps=steps,
                    latents=torch.from_numpy(latents), output_type="np").images


@pytest.mark.parametrize("key", ["plus", "2511"])
def test_edit_plus_equals_diffusers(checkpoints, small_areas, key):
    folder, reference = checkpoints[key]
    # The single entry point and the single verb: generate(images=[...]) on an editing checkpoint.
    ours = QwenImagePipeline.from_pretrained(folder, dtype="float32")
    assert ours.variant.class_name == edit.PLUS_CLASS and ours.transformer.config.zero_cond_t == (key == "2511")
    width, height, steps = 64, 48, 3
    latents = np.random.default_rng(1).standard_normal((1, (height // 16) * (width // 16), 16)).astype(np.float32)
    pictures = _pictures()
    expected = _reference(reference, pictures, "put the cat on the sofa", latents, width, height, steps, 4.0)
    got = ours.generate("put the cat on the sofa", images=pictures, width=width, height=height, steps=steps,
                        cfg_scale=4.0, latents=latents, output="np")
    assert got.shape == expected[0].shape == (height, width, 3)
    assert rel_err(got - 0.5, expected[0] - 0.5) < 1e-3
    # The reference pictures matter: dropping the second one changes the result.
    other = ours.generate("put the cat on the sofa", images=pictures[:1], width=width, height=height, steps=steps,
                          cfg_scale=4.0, latents=latents, output="np")
    assert rel_err(other - 0.5, expected[0] - 0.5) > 1e-2
    # The pictures' VAE encode is a phase of its own, evaluated before the first step.
    run = ours.denoise("put the cat on the sofa", images=pictures, width=width, height=height, steps=1, seed=0)
    list(run)
    assert {"text_encoder", "picture_encode", "denoise"} <= set(run.stats)
    assert run.stats["picture_encode"]["peak_memory"] > 0
    # The alias gives the same arrays.
    alias = QwenImageEditPipeline.from_pretrained(folder, dtype="float32")
    np.testing.assert_array_equal(alias.edit("put the cat on the sofa", pictures, width=width, height=height,
                                             steps=steps, cfg_scale=4.0, latents=latents, output="np"), got)


def test_original_edit_equals_diffusers(checkpoints, small_areas):
    folder, reference = checkpoints["edit"]
    ours = QwenImagePipeline.from_pretrained(folder, dtype="float32")
    picture = _pictures()[0]
    latents = np.random.default_rng(2).standard_normal((1, 12, 16)).astype(np.float32)
    expected = _reference(reference, picture, "make it night", latents, 64, 48, 3, 2.5)
    got = ours.generate("make it night", images=[picture], width=64, height=48, steps=3, cfg_scale=2.5,
                        latents=latents, output="np")
    assert rel_err(got - 0.5, expected[0] - 0.5) < 1e-3


def test_prompt_embeddings_equal_diffusers(checkpoints, small_areas):
    folder, reference = checkpoints["plus"]
    ours = QwenImagePipeline.from_pretrained(folder, dtype="float32")
    condition, _ = edit_pictures(ours.variant, _pictures())
    with torch.no_grad():
        expected, expected_mask = reference.encode_prompt(prompt="swap the two", image=condition)
    embeds, mask = ours.encode_prompt("swap the two", images=_pictures())
    assert expected_mask is None and bool(np.array(mask).all())
    assert rel_err(np.array(embeds), expected.numpy()) < 1e-4


def test_default_size_follows_the_last_picture():
    variant = VARIANTS[edit.PLUS_CLASS]
    _, vae_images = edit_pictures(variant, _pictures())
    # the 60x90 picture's aspect at about 1024x1024, sides / 32
    assert output_size(variant, None, None, images=_pictures()) == (832, 1248)
    assert [i.size for i in vae_images] == [(1216, 864), (832, 1248)]


def test_bad_edit_inputs(checkpoints, tiny_checkpoint, tmp_path):
    ours = QwenImagePipeline.from_pretrained(checkpoints["edit"][0], dtype="float32")
    with pytest.raises(ValueError, match=r"\(QwenImageEditPipeline\) takes at most 1 picture"):
        ours.generate("x", images=_pictures())
    with pytest.raises(ValueError, match="at least one picture"):
        ours.generate("x", images=[])
    with pytest.raises(ValueError, match="cannot read image"):
        ours.edit("x", [tmp_path / "missing.png"])
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        ours.edit("x", [tmp_path / "junk.png"])
    with pytest.raises(ValueError, match=r"edits pictures: pass images=\[...\]"):
        ours.generate("x")
    with pytest.raises(ValueError, match="does not do img2img; it does image editing"):
        ours.generate("x", image=_pictures()[0])
    with pytest.raises(CheckpointError, match="text-to-image checkpoint"):
        QwenImageEditPipeline.from_pretrained(tiny_checkpoint[0])
