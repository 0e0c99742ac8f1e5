"""Shared test helpers: tiny random reference models from diffusers/transformers, run offline on the CPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
RELEASED = FIXTURES / "qwen_image"


def rel_err(ours, ref) -> float:
    """Relative L2 error of ``ours`` against the reference ``ref``."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"shape {ours.shape} != reference {ref.shape}"
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))


def randomize_(module, seed: int = 0, std: float = 0.05):
    """Give every parameter of a torch module random values.

    Default inits leave gates and norms at 0 or 1, which hides mistakes; norm gammas get 1 + noise.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
            if "norm" in name and p.ndim == 1:
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)
    return module


def torch_weights(module) -> dict:
    """A torch module's state dict as float32 MLX arrays, under the checkpoint names."""
    return {k: mx.array(v.detach().float().numpy()) for k, v in module.state_dict().items()}


def to_torch(x):
    import torch

    return torch.from_numpy(np.asarray(x, dtype=np.float32))


@pytest.fixture(scope="session")
def manifest():
    import json

    with open(FIXTURES / "checkpoint_manifest.json") as f:
        return json.load(f)


# Tiny components whose shapes fit together: text features 32 wide, a VAE with 4 latent channels and scale 8.
TINY_TEXT_ENCODER = dict(
    text_config=dict(vocab_size=152064, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}),
    vision_config=dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32,
                       fullatt_block_indexes=[0]),
    tie_word_embeddings=False,
)
TINY_TRANSFORMER = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 6, 6])
TINY_VAE = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
                latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 2.0])


def build_tiny_checkpoint(folder: Path, seed: int = 0):
    """A random diffusers QwenImagePipeline saved in the published layout (tokenizer as vocab.json +
    merges.txt, no tokenizer.json); returns the diffusers pipeline it was saved from."""
    import json
    import shutil

    import torch
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    torch.manual_seed(seed)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**TINY_TEXT_ENCODER))
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(
            json.loads((RELEASED / "scheduler" / "scheduler_config.json").read_text())),
        vae=randomize_(AutoencoderKLQwenImage(**TINY_VAE), seed + 1, std=0.2).eval(),
        text_encoder=randomize_(text_encoder, seed + 2, std=0.1).eval(),
        tokenizer=Qwen2Tokenizer.from_pretrained(str(RELEASED / "tokenizer")),
        transformer=randomize_(QwenImageTransformer2DModel(**TINY_TRANSFORMER), seed + 3, std=0.15).eval(),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    tok = folder / "tokenizer"
    shutil.rmtree(tok)
    shutil.copytree(RELEASED / "tokenizer", tok)
    return pipe


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """(folder, diffusers pipeline) for a tiny random text-to-image checkpoint."""
    folder = tmp_path_factory.mktemp("tiny") / "qwen-image-tiny"
    return folder, build_tiny_checkpoint(folder)


# Qwen-Image 2.1: a Qwen3-VL text encoder 64 wide, a single-stream transformer reading it, a 64-channel RGBA VAE.
TINY21_TEXT_ENCODER = dict(
    text_config=dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 3, 3],
                                      "mrope_interleaved": True}),
    vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                       deepstack_visual_indexes=[0]),
    tie_word_embeddings=False,
)
TINY21_TRANSFORMER = dict(num_layers=2, attention_head_dim=32, num_attention_heads=2, context_in_dim=64,
                          axes_dims_rope=(8, 12, 12))
TINY21_VAE = dict(base_dim=8, decoder_base_dim=12, z_dim=64, dim_mult=[1, 2, 2, 2, 2], num_res_blocks=1,
                  temperal_downsample=[False, True, True, True],
                  latents_mean=[0.05 * (i % 7) - 0.15 for i in range(64)],
                  latents_std=[1.0 + 0.1 * (i % 5) for i in range(64)])
# A minimal chat template with Qwen3-VL's layout for text turns (the processor uses it only to count the system
# turn's tokens, which diffusers drops).
CHAT_TEMPLATE21 = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TURBO_SIGMAS = [1.0, 0.9, 0.75, 0.5, 0.3]


def build_tiny21_checkpoint(folder: Path, seed: int = 0, sample_sigmas=None):
    """A random diffusers QwenImage21Pipeline saved in the published layout (tokenizer files in processor/); with
    ``sample_sigmas``, a Turbo-like checkpoint (that grid, a scheduler without shift). Returns the pipeline."""
    import torch
    from diffusers import (AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline,
                           QwenImage21Transformer2DModel)
    from transformers import (Qwen2Tokenizer, Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                              Qwen3VLProcessor)

    # transformers checks the video processor's class, which needs torchvision (not installed): skip the check.
    Qwen3VLProcessor.check_argument_for_proper_class = lambda self, name, arg: None
    torch.manual_seed(seed)
    tokenizer = Qwen2Tokenizer.from_pretrained(str(RELEASED / "tokenizer"))
    # Qwen3-VL's processor settings, but a lower pixel floor (the real one is 256^2) for small test pictures.
    image_processor = Qwen2VLImageProcessor(patch_size=16, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                            size={"shortest_edge": 32 * 32, "longest_edge": 16777216})
    processor = Qwen3VLProcessor(image_processor=image_processor,
                                 tokenizer=tokenizer, video_processor=None, chat_template=CHAT_TEMPLATE21)

    def save_processor(path, **kwargs):  # without a video processor to save
        tokenizer.save_pretrained(path)
        processor.image_processor.save_pretrained(path)

    processor.save_pretrained = save_processor
    if sample_sigmas is None:
        scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                    base_image_seq_len=256, max_image_seq_len=4096)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=False, shift=1.0)
    pipe = QwenImage21Pipeline(
        scheduler=scheduler,
        vae=randomize_(AutoencoderKLQwenImage21(**TINY21_VAE), seed + 1, std=0.2).eval(),
        text_encoder=randomize_(Qwen3VLForConditionalGeneration(Qwen3VLConfig(**TINY21_TEXT_ENCODER)), seed + 2,
                                std=0.1).eval(),
        processor=processor,
        transformer=randomize_(QwenImage21Transformer2DModel(**TINY21_TRANSFORMER), seed + 3, std=0.15).eval(),
        sample_sigmas=sample_sigmas,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


@pytest.fixture(scope="session")
def tiny21_checkpoint(tmp_path_factory):
    """(folder, diffusers pipeline) for a tiny random Qwen-Image 2.1 checkpoint."""
    folder = tmp_path_factory.mktemp("tiny21") / "qwen-image-2.1-tiny"
    return folder, build_tiny21_checkpoint(folder)


@pytest.fixture(scope="session")
def tiny21_turbo_checkpoint(tmp_path_factory):
    """(folder, diffusers pipeline) for a tiny random 2.1-Turbo-like checkpoint (a fixed sigma grid)."""
    folder = tmp_path_factory.mktemp("tiny21turbo") / "qwen-image-2.1-turbo-tiny"
    return folder, build_tiny21_checkpoint(folder, seed=5, sample_sigmas=TURBO_SIGMAS)
