"""Precomputed modulations for a whole schedule, dropping and restoring the timestep path, the mask memo."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import rel_err
from mlx.utils import tree_flatten

from mlx_qwen_image.models import transformer as tmod
from mlx_qwen_image.models.modulation import DroppedLinear, get_module
from mlx_qwen_image.models.transformer import QwenImageTransformer
from mlx_qwen_image.quantize import quantize_transformer

# 128 wide so that every layer takes group-wise quantization (input widths multiples of 64).
CONFIG = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=64,
              num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=[16, 24, 24])
TIMESTEPS = np.array([0.98, 0.7, 0.41, 0.05], dtype=np.float32)


def _model(seed=0, **overrides):
    mx.random.seed(seed)
    model = QwenImageTransformer.from_config({**CONFIG, **overrides})
    model.update(nn.utils.tree_map(lambda p: p * 20, model.parameters()))  # default init is too tame
    mx.eval(model.parameters())
    return model


def _inputs(batch=2, shapes=((1, 3, 4),), text_len=5, seed=1):
    rng = np.random.default_rng(seed)
    n = sum(f * h * w for f, h, w in shapes)
    x = mx.array(rng.standard_normal((batch, n, 16)).astype(np.float32))
    txt = mx.array(rng.standard_normal((batch, text_len, 24)).astype(np.float32))
    mask = mx.array((np.arange(text_len)[None] < np.array([text_len, 3])[:batch, None]).astype(np.int32))
    return x, txt, mask, [list(shapes)] * batch


def _weights(model, tmp_path):
    """The model's weights as a checkpoint file, read back lazily (as the pipeline's loader does)."""
    path = str(tmp_path / "transformer.safetensors")
    mx.save_safetensors(path, dict(tree_flatten(model.parameters())))
    return mx.load(path)


def _kinds(model):
    layers = [get_module(model, p) for p in model.modulation_layer_paths()]
    return [(type(m), getattr(m, "bits", None), getattr(m, "group_size", None)) for m in layers]


@pytest.mark.parametrize("zero_cond_t, shapes", [(False, ((1, 3, 4),)), (True, ((1, 3, 4), (1, 2, 2)))])
def test_table_rows_give_the_per_step_output(zero_cond_t, shapes):
    model = _model(zero_cond_t=zero_cond_t)
    x, txt, mask, img_shapes = _inputs(shapes=shapes)
    table = model.modulation_table(TIMESTEPS)
    assert len(table) == len(TIMESTEPS)
    for i, t in enumerate(TIMESTEPS):
        sigma = mx.full((2,), t, dtype=mx.float32)  # CFG: both halves at the same timestep
        expected = model(x, txt, mask, sigma, img_shapes)
        got = model(x, txt, mask, sigma, img_shapes, modulations=table[i])
        assert rel_err(np.array(got), np.array(expected)) < 1e-6


def test_drop_frees_the_timestep_path_and_restore_brings_it_back(tmp_path):
    model = _model()
    weights = _weights(model, tmp_path)
    x, txt, mask, img_shapes = _inputs()
    sigma = mx.full((2,), TIMESTEPS[1], dtype=mx.float32)
    before = model(x, txt, mask, sigma, img_shapes)
    params = sum(v.size for _, v in tree_flatten(model.parameters()))

    table = model.modulation_table(TIMESTEPS, drop_weights=True)
    assert model.modulation_weights_dropped
    dropped = {p for p, m in model.named_modules() if isinstance(m, DroppedLinear)}
    assert dropped == set(model.modulation_layer_paths())
    d = 128
    freed = 2 * 2 * (d * 6 * d + 6 * d) + (d * 2 * d + 2 * d) + (256 * d + d) + (d * d + d)  # 2 blocks, 2 streams
    assert params - sum(v.size for _, v in tree_flatten(model.parameters())) == freed
    assert mx.array_equal(model(x, txt, mask, sigma, img_shapes, modulations=table[1]), before)
    with pytest.raises(RuntimeError, match="dropped after precomputing"):
        model(x, txt, mask, sigma, img_shapes)
    with pytest.raises(RuntimeError, match="restore_modulation_weights"):
        model.modulation_table(TIMESTEPS, drop_weights=True)

    model.restore_modulation_weights(weights)
    assert not model.modulation_weights_dropped
    assert mx.array_equal(model(x, txt, mask, sigma, img_shapes), before)


def test_restore_requantizes_like_quantize_on_load(tmp_path):
    model = _model(seed=3)
    weights = _weights(model, tmp_path)
    quantize_transformer(model, 4)  # the mixed recipe, whatever bits it gives the modulation layers
    kinds = _kinds(model)
    assert any(k[0] is nn.QuantizedLinear for k in kinds)
    x, txt, mask, img_shapes = _inputs()
    sigma = mx.full((2,), TIMESTEPS[2], dtype=mx.float32)
    before = model(x, txt, mask, sigma, img_shapes)
    model.modulation_table(TIMESTEPS, drop_weights=True)
    model.restore_modulation_weights(weights)  # float weights, quantized again as on load
    assert _kinds(model) == kinds
    assert mx.array_equal(model(x, txt, mask, sigma, img_shapes), before)


def test_mask_checked_once_per_mask_object(monkeypatch):
    model = _model()
    calls = []
    real = tmod._key_mask
    monkeypatch.setattr(tmod, "_key_mask", lambda m, n: calls.append(1) or real(m, n))
    x, txt, mask, img_shapes = _inputs()
    sigma = mx.full((2,), 0.5, dtype=mx.float32)
    first = model(x, txt, mask, sigma, img_shapes)
    for _ in range(3):
        assert mx.array_equal(model(x, txt, mask, sigma, img_shapes), first)
    assert len(calls) == 1
    ones = mx.ones_like(mask)
    assert mx.array_equal(model(x, txt, ones, sigma, img_shapes), model(x, txt, None, sigma, img_shapes))
    assert len(calls) == 2


def test_a_lora_wrapped_layer_refuses_the_drop_before_anything_is_dropped():
    from mlx_qwen_image.lora import LoRALinear

    model = _model()
    blk = model.transformer_blocks[1]
    blk.txt_mod[1] = LoRALinear(blk.txt_mod[1], mx.zeros((4, 128)), mx.zeros((768, 4)))
    with pytest.raises(ValueError, match="transformer_blocks.1.txt_mod.1 is a LoRALinear: only"):
        model.modulation_table(TIMESTEPS, drop_weights=True)
    assert not model.modulation_weights_dropped
    assert len(model.modulation_table(TIMESTEPS)) == len(TIMESTEPS)  # keeping the weights still works
