"""The MLX MMDiT against diffusers' QwenImageTransformer2DModel on tiny random configs."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from conftest import RELEASED, randomize_, rel_err, to_torch, torch_weights

from mlx_qwen_image.config import read_json
from mlx_qwen_image.models.rope import rope_angles
from mlx_qwen_image.models.transformer import QwenImageTransformer

TINY = dict(
    patch_size=2,
    in_channels=16,
    out_channels=4,
    num_layers=2,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=24,
    axes_dims_rope=[8, 12, 12],
)


def _pair(seed=0, **overrides):
    from diffusers import QwenImageTransformer2DModel

    config = {**TINY, **overrides}
    torch.manual_seed(seed)
    ref = randomize_(QwenImageTransformer2DModel(**config).eval(), seed=seed)
    ours = QwenImageTransformer.from_config(config)
    ours.load_weights(list(ours.sanitize(torch_weights(ref)).items()), strict=True)
    return ref, ours


def _inputs(img_shapes, text_len, batch, seed=1, mask_lengths=None, config=TINY):
    rng = np.random.default_rng(seed)
    n = sum(f * h * w for f, h, w in img_shapes)
    x = rng.standard_normal((batch, n, config["in_channels"])).astype(np.float32)
    txt = rng.standard_normal((batch, text_len, config["joint_attention_dim"])).astype(np.float32)
    mask = None
    if mask_lengths is not None:
        mask = (np.arange(text_len)[None] < np.array(mask_lengths)[:, None]).astype(np.int64)
    sigma = rng.uniform(0.05, 1.0, size=(batch,)).astype(np.float32)
    return x, txt, mask, sigma, [list(img_shapes)] * batch


def _run_both(ref, ours, x, txt, mask, sigma, shapes):
    with torch.no_grad():
        expected = ref(
            hidden_states=to_torch(x),
            encoder_hidden_states=to_torch(txt),
            encoder_hidden_states_mask=None if mask is None else torch.from_numpy(mask),
            timestep=to_torch(sigma),
            img_shapes=shapes,
            return_dict=False,
        )[0].numpy()
    got = ours(mx.array(x), mx.array(txt), None if mask is None else mx.array(mask), mx.array(sigma), shapes)
    return np.array(got), expected


@pytest.mark.parametrize(
    "img_shapes, text_len, batch, mask_lengths",
    [
        ([(1, 5, 5)], 7, 1, None),  # square, odd grid
        ([(1, 3, 7)], 9, 2, [9, 4]),  # non-square, odd, padded text batch with a mask
        ([(1, 4, 6), (1, 3, 5)], 6, 2, [3, 6]),  # two image segments (an Edit reference image)
    ],
)
def test_parity_with_diffusers(img_shapes, text_len, batch, mask_lengths):
    ref, ours = _pair()
    got, expected = _run_both(ref, ours, *_inputs(img_shapes, text_len, batch, mask_lengths=mask_lengths))
    assert got.shape == expected.shape
    assert rel_err(got, expected) < 1e-4


def test_zero_cond_t_parity():
    ref, ours = _pair(seed=3, zero_cond_t=True)
    inputs = _inputs([(1, 4, 4), (1, 3, 5), (1, 2, 3)], 5, 2, mask_lengths=[5, 2])
    got, expected = _run_both(ref, ours, *inputs)
    assert rel_err(got, expected) < 1e-4
    # The switch matters: the same weights without zero_cond_t give a clearly different answer.
    ours.config.zero_cond_t = False
    plain = np.array(ours(*[mx.array(a) if a is not None else None for a in inputs[:4]], inputs[4]))
    assert rel_err(plain, expected) > 1e-3


def test_mask_of_all_ones_equals_no_mask():
    _, ours = _pair()
    x, txt, _, sigma, shapes = _inputs([(1, 3, 3)], 5, 2)
    args = (mx.array(x), mx.array(txt))
    a = ours(*args, mx.ones((2, 5), dtype=mx.int32), mx.array(sigma), shapes)
    b = ours(*args, None, mx.array(sigma), shapes)
    assert mx.array_equal(a, b)


def test_rope_angles_equal_reference():
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    segments, text_len = [(1, 3, 5), (1, 4, 2)], 6
    img, txt = QwenEmbedRope(theta=10000, axes_dim=[16, 56, 56], scale_rope=True)(
        [segments], max_txt_seq_len=text_len, device=torch.device("cpu")
    )
    expected = np.concatenate([np.angle(txt.numpy()), np.angle(img.numpy())])
    got = np.array(rope_angles(segments, text_len))
    np.testing.assert_allclose(np.cos(got), np.cos(expected), atol=2e-6)
    np.testing.assert_allclose(np.sin(got), np.sin(expected), atol=2e-6)


def test_bfloat16_close_to_float32():
    _, ours = _pair(seed=5)
    inputs = _inputs([(1, 4, 6)], 8, 2, mask_lengths=[8, 5])
    args = [mx.array(a) if a is not None else None for a in inputs[:4]]
    full = np.array(ours(*args, inputs[4]))
    ours.set_dtype(mx.bfloat16)
    half = ours(*args, inputs[4])
    assert half.dtype == mx.bfloat16
    half = np.array(half.astype(mx.float32))
    assert np.isfinite(half).all()
    assert rel_err(half, full) < 3e-2


def test_precomputed_modulations_give_the_same_output():
    _, ours = _pair(seed=2, zero_cond_t=True)
    x, txt, mask, sigma, shapes = _inputs([(1, 3, 4), (1, 2, 2)], 4, 2, mask_lengths=[4, 3])
    args = (mx.array(x), mx.array(txt), mx.array(mask), mx.array(sigma), shapes)
    mods = ours.modulations(ours.time_embedding(mx.array(sigma)))
    assert mx.allclose(ours(*args), ours(*args, modulations=mods), atol=0, rtol=0)


def test_full_size_checkpoint_loads_strictly(manifest):
    model = QwenImageTransformer.from_config(read_json(RELEASED / "transformer" / "config.json"))
    weights = {name: mx.zeros(shape, dtype=mx.bfloat16) for name, shape in manifest["transformer"].items()}
    sanitized = model.sanitize(weights)
    assert len(sanitized) == len(weights) == 1933
    model.load_weights(list(sanitized.items()), strict=True)
    assert sum(v.size for _, v in tree_flatten(model.parameters())) == 20_430_401_088
