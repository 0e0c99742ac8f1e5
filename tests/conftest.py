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
