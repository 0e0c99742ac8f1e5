"""The MLX Qwen-Image 2.1 transformer against diffusers' QwenImage21Transformer2DModel on tiny random configs."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from conftest import randomize_, rel_err, to_torch, torch_weights

from mlx_qwen_image.config import ConfigError
from mlx_qwen_image.models.rope21 import rope_walk
from mlx_qwen_image.models.transformer21 import (PrefixCache, QwenImage21Transformer, Transformer21Config)

TINY = dict(num_layers=2, attention_head_dim=32, num_attention_heads=2, context_in_dim=24, axes_dims_rope=[8, 12, 12])
TOL = 1e-4


def _pair(seed=0, **overrides):
    from diffusers import QwenImage21Transformer2DModel

    config = {**TINY, **overrides}
    torch.manual_seed(seed)
    # std 0.15: modulations of order 1, so tanh gates and the t = 0 rows matter (0.05 leaves gates ~0.02)
    ref = randomize_(QwenImage21Transformer2DModel(**config).eval(), seed=seed, std=0.15)
    ours = QwenImage21Transformer.from_config(config)
    ours.load_weights(list(ours.sanitize(torch_weights(ref)).items()), strict=True)
    return ref, ours


@pytest.fixture(scope="module")
def pair():
    return _pair()


def _case(layout, target, batch=1, seed=1, lengths=None):
    """Inputs as the pipeline builds them. ``layout``: the text encoder's sequence as ("text", n) runs and
    (h, w) condition images (h * w / 4 slots each); ``target``: (h, w); ``lengths``: valid text tokens per row
    (right padding), the image slots lying in the common part."""
    rng = np.random.default_rng(seed)
    slots, shapes = [], []
    for item in layout:
        if item[0] == "text":
            slots += [False] * item[1]
        else:
            slots += [True] * (item[0] * item[1] // 4)
            shapes.append((1, *item))
    L = len(slots)
    n_target = target[0] * target[1]
    img_mask = np.array(slots + [True] * (n_target // 4))
    shapes.append((1, *target))
    n = sum(h * w for _, h, w in shapes)
    mask = None
    if lengths is not None:
        mask = (np.arange(L)[None] < np.array(lengths)[:, None]).astype(np.int64)
    return dict(
        x=rng.standard_normal((batch, n, 64)).astype(np.float32),
        txt=rng.standard_normal((batch, L, TINY["context_in_dim"])).astype(np.float32),
        mask=mask, img_mask=img_mask, shapes=[shapes] * batch, n_target=n_target,
        t=rng.uniform(0.05, 1.0, size=(batch,)).astype(np.float32),
    )


def _ref(ref, c, t=None, rows=slice(None), length=None, **kw):
    """diffusers' velocity of the target tokens, for some rows, their text cut to ``length`` (unpadded)."""
    x, txt = c["x"][rows], c["txt"][rows]
    L = txt.shape[1]
    img_mask = c["img_mask"]
    if length is not None:
        txt, img_mask = txt[:, :length], np.concatenate([img_mask[:length], img_mask[L:]])
    mask = None if c["mask"] is None or length is not None else torch.from_numpy(c["mask"][rows])
    with torch.no_grad():
        out = ref(hidden_states=to_torch(x), encoder_hidden_states=to_torch(txt),
                  timestep=to_torch(c["t"][rows] if t is None else t), img_shapes=c["shapes"][: x.shape[0]],
                  img_mask=torch.from_numpy(np.tile(img_mask, (x.shape[0], 1))), encoder_hidden_states_mask=mask,
                  return_dict=False, **kw)[0]
    return out[:, -c["n_target"]:].numpy()


def _ours(ours, c, t=None, **kw):
    mask = None if c["mask"] is None else mx.array(c["mask"])
    out = ours(mx.array(c["x"]), mx.array(c["txt"]), mask, mx.array(c["t"] if t is None else t), c["shapes"],
               c["img_mask"], **kw)
    return np.array(out)


def test_text_only(pair):
    ref, ours = pair
    c = _case([("text", 7)], (4, 6), batch=2)
    got = _ours(ours, c)
    assert got.shape == (2, 24, 64)
    assert rel_err(got, _ref(ref, c)) < TOL


def test_padded_batch_rows_walk_alone(pair):
    ref, ours = pair
    layout = [("text", 3), (4, 4), ("text", 9)]
    c = _case(layout, (4, 4), batch=2, lengths=[16, 10])
    got = _ours(ours, c)
    for r, length in enumerate([16, 10]):
        assert rel_err(got[r: r + 1], _ref(ref, c, rows=slice(r, r + 1), length=length)) < TOL
    # an unpadded batch (an all-ones mask) is diffusers' batched call
    full = _case(layout, (4, 4), batch=2, lengths=[16, 16])
    assert rel_err(_ours(ours, full), _ref(ref, {**full, "mask": None})) < TOL


def test_adjacent_condition_blocks(pair):
    ref, ours = pair
    c = _case([("text", 2), (2, 6), (4, 4), ("text", 5)], (4, 4), batch=1)
    assert rel_err(_ours(ours, c), _ref(ref, c)) < TOL
    # the walk keeps them apart: the second block starts a new frame position after max(2, 6)
    is_image = np.repeat(c["img_mask"], np.where(c["img_mask"], 4, 1))
    pos = rope_walk(is_image, c["shapes"][0])
    assert pos[2, 0] == 2 and pos[2 + 12, 0] == 2 + 6 and pos[2 + 28, 0] == 2 + 6 + 4


def test_non_square_images(pair):
    ref, ours = pair
    c = _case([("text", 4), (3, 4), ("text", 6)], (3, 8), batch=1, seed=4)
    assert rel_err(_ours(ours, c), _ref(ref, c)) < TOL


def test_prefix_cache(pair):
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    ref, ours = pair
    c = _case([("text", 3), (4, 4), ("text", 6)], (4, 4), batch=1)
    ts = [np.array([s], np.float32) for s in (0.9, 0.6, 0.3)]
    kv, ref_kv = PrefixCache(), QwenImage21KVCache(len(ref.transformer_blocks))
    for i, t in enumerate(ts):
        got = _ours(ours, c, t=t, kv_cache=kv)
        assert kv.filled
        assert rel_err(got, _ref(ref, c, t=t)) < TOL
        cached = _ref(ref, c, t=t, kv_cache=ref_kv, kv_cache_mode="cached" if i else "extract")
        assert rel_err(got, cached) < TOL
    # filled, the prefix is not recomputed: other text and condition latents change nothing
    other = {**c, "txt": np.zeros_like(c["txt"]), "x": np.concatenate(
        [np.zeros_like(c["x"][:, :16]), c["x"][:, 16:]], axis=1)}
    assert np.array_equal(_ours(ours, other, t=ts[2], kv_cache=kv), got)


def test_prefix_cache_padded_batch(pair):
    _, ours = pair
    c = _case([("text", 3), (2, 4), ("text", 8)], (4, 4), batch=2, lengths=[13, 7])
    kv = PrefixCache()
    for s in (0.8, 0.4):
        t = np.full((2,), s, np.float32)
        assert rel_err(_ours(ours, c, t=t, kv_cache=kv), _ours(ours, c, t=t)) < 1e-6
    with pytest.raises(ValueError, match="prefix cache"):
        _ours(ours, {**c, "x": c["x"][:1], "txt": c["txt"][:1], "mask": c["mask"][:1]}, t=t[:1], kv_cache=kv)


def test_causal_condition_false():
    ref, ours = _pair(seed=2, causal_condition=False)
    c = _case([("text", 2), (4, 2), ("text", 4)], (2, 6), batch=2, seed=3)
    assert rel_err(_ours(ours, c), _ref(ref, c)) < TOL
    with pytest.raises(ValueError, match="causal_condition"):
        _ours(ours, c, kv_cache=PrefixCache())


def test_modulation_table_and_dropping():
    ref, ours = _pair(seed=5)
    weights = ours.sanitize(torch_weights(ref))
    c = _case([("text", 3), (2, 4), ("text", 4)], (4, 4), batch=2)
    ts = np.array([0.9, 0.5, 0.2], np.float32)
    t = np.full((2,), ts[1], np.float32)
    plain = _ours(ours, c, t=t)
    table = ours.modulation_table(ts)
    assert len(table) == 3 and table[1][0].shape == (2, 4 * 64)  # [step row; t = 0 row]
    assert np.allclose(_ours(ours, c, t=t, modulations=table[1]), plain, atol=1e-6)
    assert not np.allclose(_ours(ours, c, t=t, modulations=table[0]), plain, atol=1e-3)

    ours.mark_timestep_path()
    assert ours.timestep_path_marked
    table = ours.modulation_table(ts, drop_weights=True)
    assert ours.modulation_weights_dropped and not ours.timestep_path_marked
    assert np.allclose(_ours(ours, c, t=t, modulations=table[1]), plain, atol=1e-6)
    with pytest.raises(RuntimeError, match="dropped"):
        _ours(ours, c, t=t)
    ours.restore_modulation_weights(weights)
    assert not ours.modulation_weights_dropped and ours.timestep_path_marked
    assert np.allclose(_ours(ours, c, t=t), plain, atol=1e-6)


def test_comfyui_fused_gate_up(pair):
    ref, _ = pair
    comfy = {}
    for k, v in torch_weights(ref).items():
        if ".img_mlp.gate_layer." in k:
            k, v = k.replace("gate_layer", "gate_up"), mx.concatenate([v, torch_weights(ref)[k.replace(
                "gate_layer", "proj")]])
        elif ".img_mlp.proj." in k:
            continue
        comfy["model.diffusion_model." + k] = v
    ours = QwenImage21Transformer.from_config(TINY)
    ours.load_weights(list(ours.sanitize(comfy).items()), strict=True)
    c = _case([("text", 5)], (2, 2), batch=1)
    assert rel_err(_ours(ours, c), _ref(ref, c)) < TOL


def test_step_cache_refused(pair):
    with pytest.raises(ValueError, match="step caches"):
        _ours(pair[1], _case([("text", 3)], (2, 2)), cache=object())


def test_config():
    config = Transformer21Config.from_dict({"num_layers": 4, "_class_name": "x", "axes_dims_rope": [16, 56, 56]})
    assert config.num_layers == 4 and config.inner_dim == 4096 and config.causal_condition
    with pytest.raises(ConfigError, match="axes_dims_rope"):
        Transformer21Config.from_dict({"axes_dims_rope": [16, 56, 50]})
    with pytest.raises(ConfigError, match="mlp_ratio"):
        Transformer21Config.from_dict({"mlp_ratio": 0})


def test_full_size_names_and_shapes():
    from diffusers import QwenImage21Transformer2DModel

    with torch.device("meta"):
        ref = QwenImage21Transformer2DModel()
    assert sum(p.numel() for p in ref.parameters()) == 7_115_124_736
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ours = QwenImage21Transformer.from_config(dict(ref.config))
    assert {k: v.shape for k, v in tree_flatten(ours.parameters())} == expected  # lazy: never evaluated

    comfy = {}
    for k, shape in expected.items():
        if ".img_mlp.proj." in k:
            continue
        if ".img_mlp.gate_layer." in k:
            k, shape = k.replace("gate_layer", "gate_up"), (2 * shape[0], shape[1])
        comfy["model.diffusion_model." + k] = mx.zeros(shape, mx.bfloat16)
    assert {k: v.shape for k, v in ours.sanitize(comfy).items()} == expected


def test_every_layer_quantized_with_and_without_condition_blocks(pair):
    """img_in quantized too (not the recipe's choice, but a plan may ask for it): a text-only call has no condition
    rows for it, which MLX's quantized matmul cannot take."""
    from mlx_qwen_image.quantize import apply_plan, transformer_plan

    ref, ours = pair
    quantized = QwenImage21Transformer.from_config(TINY)
    quantized.load_weights(tree_flatten(ours.parameters()))
    plan = transformer_plan(quantized, 8, 32, recipe={})
    assert "img_in" in plan
    apply_plan(quantized, plan)
    for layout in ([("text", 7)], [("text", 3), (4, 4), ("text", 4)]):
        c = _case(layout, (4, 4))
        assert rel_err(_ours(quantized, c), _ref(ref, c)) < 5e-2  # 8 bits on every layer: a few percent
