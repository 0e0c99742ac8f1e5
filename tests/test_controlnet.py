"""The MLX Qwen-Image ControlNet against diffusers' QwenImageControlNetModel / QwenImageMultiControlNetModel, and the
transformer's ``controlnet_block_samples`` against diffusers' transformer, on tiny random configs."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from conftest import randomize_, rel_err, to_torch, torch_weights

from mlx_qwen_image.config import ConfigError
from mlx_qwen_image.models.controlnet import ControlNetConfig, QwenImageControlNet, QwenImageMultiControlNet
from mlx_qwen_image.models.transformer import QwenImageTransformer

TINY = dict(patch_size=2, in_channels=16, out_channels=4, attention_head_dim=32, num_attention_heads=2,
            joint_attention_dim=24, axes_dims_rope=[8, 12, 12])
DIM = 64
# InstantX/Qwen-Image-ControlNet-Union's config.json (as mirrored by Runware/Qwen-Image-ControlNet-Union), with the
# bookkeeping keys diffusers writes and the two keys (guidance_embeds, pooled_projection_dim) it does not read.
UNION = {"_class_name": "QwenImageControlNetModel", "_diffusers_version": "0.35.0.dev0", "attention_head_dim": 128,
         "axes_dims_rope": [16, 56, 56], "extra_condition_channels": 0, "guidance_embeds": False, "in_channels": 64,
         "joint_attention_dim": 3584, "num_attention_heads": 24, "num_layers": 5, "out_channels": 16,
         "patch_size": 2, "pooled_projection_dim": 768}


def _controlnet_pair(seed=0, num_layers=2, **overrides):
    from diffusers import QwenImageControlNetModel

    config = {**TINY, "num_layers": num_layers, **overrides}
    torch.manual_seed(seed)
    ref = randomize_(QwenImageControlNetModel(**config).eval(), seed=seed)
    ours = QwenImageControlNet.from_config(config)
    ours.load_weights(list(ours.sanitize(torch_weights(ref)).items()), strict=True)
    return ref, ours


def _transformer_pair(seed=0, num_layers=5):
    from diffusers import QwenImageTransformer2DModel

    config = {**TINY, "num_layers": num_layers}
    torch.manual_seed(seed)
    ref = randomize_(QwenImageTransformer2DModel(**config).eval(), seed=seed)
    ours = QwenImageTransformer.from_config(config)
    ours.load_weights(list(ours.sanitize(torch_weights(ref)).items()), strict=True)
    return ref, ours


def _inputs(img_shapes=((1, 3, 5),), text_len=7, batch=2, mask_lengths=(7, 4), cond_channels=16, n_conds=1, seed=1):
    rng = np.random.default_rng(seed)
    n = sum(f * h * w for f, h, w in img_shapes)
    x = rng.standard_normal((batch, n, TINY["in_channels"])).astype(np.float32)
    conds = [rng.standard_normal((batch, n, cond_channels)).astype(np.float32) for _ in range(n_conds)]
    txt = rng.standard_normal((batch, text_len, TINY["joint_attention_dim"])).astype(np.float32)
    mask = None
    if mask_lengths is not None:
        mask = (np.arange(text_len)[None] < np.array(mask_lengths)[:, None]).astype(np.int64)
    sigma = rng.uniform(0.05, 1.0, size=(batch,)).astype(np.float32)
    return dict(x=x, conds=conds, txt=txt, mask=mask, sigma=sigma, shapes=[list(img_shapes)] * batch)


def _ref_args(i):
    return dict(hidden_states=to_torch(i["x"]), encoder_hidden_states=to_torch(i["txt"]),
                encoder_hidden_states_mask=None if i["mask"] is None else torch.from_numpy(i["mask"]),
                timestep=to_torch(i["sigma"]), img_shapes=i["shapes"], return_dict=False)


def _our_args(i):
    return (mx.array(i["txt"]), None if i["mask"] is None else mx.array(i["mask"]), mx.array(i["sigma"]), i["shapes"])


def _ref_controlnet(ref, i, cond, scale):
    with torch.no_grad():
        return [s.numpy() for s in ref(controlnet_cond=to_torch(cond), conditioning_scale=scale, **_ref_args(i))]


def _our_controlnet(ours, i, cond, scale, **kwargs):
    return ours(mx.array(i["x"]), mx.array(cond), scale, *_our_args(i), **kwargs)


def _assert_samples_close(got, expected, tol=1e-4):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert rel_err(np.array(g), e) < tol


@pytest.mark.parametrize("img_shapes, mask_lengths", [([(1, 3, 5)], [7, 4]), ([(1, 4, 2)], None)])
def test_controlnet_parity(img_shapes, mask_lengths):
    ref, ours = _controlnet_pair(num_layers=3)
    i = _inputs(img_shapes, mask_lengths=mask_lengths)
    expected = _ref_controlnet(ref, i, i["conds"][0], 0.7)
    got = _our_controlnet(ours, i, i["conds"][0], 0.7)
    assert len(got) == 3 and got[0].shape == (2, sum(f * h * w for f, h, w in img_shapes), DIM)
    _assert_samples_close(got, expected)


def test_inpainting_extra_condition_channels():
    # The inpainting pipeline packs 16 masked-image latent channels + 1 mask channel: 4 extra after packing.
    ref, ours = _controlnet_pair(seed=2, extra_condition_channels=4)
    assert ours.controlnet_x_embedder.weight.shape == (DIM, 20)
    i = _inputs(cond_channels=20, seed=3)
    _assert_samples_close(_our_controlnet(ours, i, i["conds"][0], 0.7), _ref_controlnet(ref, i, i["conds"][0], 0.7))


def test_precomputed_modulations_give_the_same_samples():
    _, ours = _controlnet_pair(seed=4)
    i = _inputs(batch=1, mask_lengths=[5])
    i["sigma"] = np.array([0.6], np.float32)
    table = ours.modulation_table(np.array([1.0, 0.6, 0.2], np.float32))
    assert len(table) == 3
    plain = _our_controlnet(ours, i, i["conds"][0], 0.7)
    fast = _our_controlnet(ours, i, i["conds"][0], 0.7, modulations=table[1])
    for a, b in zip(plain, fast):
        assert mx.allclose(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("n_samples", [1, 2, 3, 5])  # intervals 5, 3, 2, 1 over 5 blocks
def test_transformer_adds_block_samples_as_diffusers(n_samples):
    ref, ours = _transformer_pair()
    i = _inputs(img_shapes=[(1, 3, 4)])
    rng = np.random.default_rng(7)
    samples = [rng.standard_normal((2, 12, DIM)).astype(np.float32) * 0.5 for _ in range(n_samples)]
    with torch.no_grad():
        expected = ref(controlnet_block_samples=[to_torch(s) for s in samples], **_ref_args(i))[0].numpy()
        plain = ref(**_ref_args(i))[0].numpy()
    got = np.array(ours(mx.array(i["x"]), *_our_args(i), controlnet_block_samples=[mx.array(s) for s in samples]))
    assert rel_err(got, expected) < 1e-4
    assert rel_err(plain, expected) > 1e-2  # the samples matter


def test_controlnet_into_transformer_end_to_end():
    """The pipeline's step: ControlNet samples (fewer than the transformer's blocks) fed to the transformer, both
    from precomputed modulation tables."""
    ref_cn, cn = _controlnet_pair(seed=5, num_layers=2)
    ref_tr, tr = _transformer_pair(seed=6, num_layers=5)
    i = _inputs(batch=1, mask_lengths=[6], seed=8)
    i["sigma"] = np.array([0.75], np.float32)
    with torch.no_grad():
        samples = ref_cn(controlnet_cond=to_torch(i["conds"][0]), conditioning_scale=0.7, **_ref_args(i))
        expected = ref_tr(controlnet_block_samples=samples, **_ref_args(i))[0].numpy()
    steps = np.array([1.0, 0.75], np.float32)
    ours = _our_controlnet(cn, i, i["conds"][0], 0.7, modulations=cn.modulation_table(steps)[1])
    got = tr(mx.array(i["x"]), *_our_args(i), modulations=tr.modulation_table(steps)[1],
             controlnet_block_samples=ours)
    assert rel_err(np.array(got), expected) < 1e-4


def test_multi_controlnet_union_parity():
    """diffusers' Multi model with its one (Union) net runs it per condition, each with its scale, and sums."""
    from diffusers import QwenImageMultiControlNetModel

    ref, ours = _controlnet_pair(seed=9)
    i = _inputs(n_conds=2, seed=10)
    with torch.no_grad():
        expected = QwenImageMultiControlNetModel([ref])(
            controlnet_cond=[to_torch(c) for c in i["conds"]], conditioning_scale=[0.5, 0.8], **_ref_args(i))
    got = QwenImageMultiControlNet([ours])(mx.array(i["x"]), [mx.array(c) for c in i["conds"]], [0.5, 0.8],
                                           *_our_args(i))
    _assert_samples_close(got, [e.numpy() for e in expected])


def test_multi_controlnet_with_two_nets_sums_them():
    """Two different nets: diffusers' Multi model refuses them; ours sums net k's samples for condition k."""
    from diffusers import QwenImageMultiControlNetModel

    (ref_a, a), (ref_b, b) = _controlnet_pair(seed=11), _controlnet_pair(seed=12)
    i = _inputs(n_conds=2, seed=13)
    with pytest.raises(ValueError):
        QwenImageMultiControlNetModel([ref_a, ref_b])(controlnet_cond=[to_torch(c) for c in i["conds"]],
                                                      conditioning_scale=[0.5, 0.8], **_ref_args(i))
    expected = [p + q for p, q in zip(_ref_controlnet(ref_a, i, i["conds"][0], 0.5),
                                      _ref_controlnet(ref_b, i, i["conds"][1], 0.8))]
    multi = QwenImageMultiControlNet([a, b])
    got = multi(mx.array(i["x"]), [mx.array(c) for c in i["conds"]], [0.5, 0.8], *_our_args(i))
    _assert_samples_close(got, expected)
    assert {k.split(".")[0] for k, _ in tree_flatten(multi.parameters())} == {"nets"}  # diffusers' nets.K names
    with pytest.raises(ValueError):
        multi(mx.array(i["x"]), [mx.array(i["conds"][0])], [0.5], *_our_args(i))
    with pytest.raises(ValueError):
        QwenImageMultiControlNet([a, _controlnet_pair(num_layers=3)[1]])


def test_config_ignores_unknown_keys_and_checks_values():
    config = ControlNetConfig.from_dict(UNION)
    assert (config.num_layers, config.inner_dim, config.cond_channels) == (5, 3072, 64)
    assert ControlNetConfig.from_dict({}).num_layers == 60  # diffusers' default
    with pytest.raises(ConfigError, match="axes_dims_rope"):
        ControlNetConfig.from_dict({**UNION, "axes_dims_rope": [16, 56, 50]})
    with pytest.raises(ConfigError, match="extra_condition_channels"):
        ControlNetConfig.from_dict({**UNION, "extra_condition_channels": -1})


@pytest.mark.parametrize("extra", [0, 4])  # the Union model, and the Inpainting model's condition channels
def test_full_size_names_and_shapes_equal_diffusers(extra):
    from diffusers import QwenImageControlNetModel

    config = {**UNION, "extra_condition_channels": extra}
    with torch.device("meta"):
        ref = QwenImageControlNetModel.from_config(config)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    model = QwenImageControlNet.from_config(config)  # lazy: never evaluated
    ours = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    assert model.sanitize(expected) == ours
    weights = {k: mx.zeros(shape, dtype=mx.bfloat16) for k, shape in expected.items()}
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    assert sum(v.size for _, v in tree_flatten(model.parameters())) == sum(v.numel() for v in ref.parameters())


def test_quantized_controlnet_keeps_its_projections_float():
    """quantize= applies the transformer's recipe: the blocks at 4/8 bits, the residual projections and the control
    embedder float (they write and read the residuals directly)."""
    import mlx.nn as nn

    from mlx_qwen_image.loading import quantize_model

    config = dict(num_layers=3, attention_head_dim=64, num_attention_heads=2, joint_attention_dim=64,
                  axes_dims_rope=[16, 24, 24], in_channels=64)
    mx.random.seed(0)
    net = QwenImageControlNet.from_config(config)
    quantized = QwenImageControlNet.from_config(config)
    quantized.load_weights(tree_flatten(net.parameters()))
    quantize_model(quantized, bits=4)
    kinds = {path: type(m).__name__ for path, m in quantized.named_modules() if isinstance(m, (nn.Linear,
                                                                                              nn.QuantizedLinear))}
    assert kinds["controlnet_blocks.0"] == kinds["controlnet_x_embedder"] == "Linear"
    assert kinds["transformer_blocks.1.attn.to_q"] == "QuantizedLinear"
    rng = np.random.default_rng(0)
    x, cond = (mx.array(rng.standard_normal((1, 12, 64)).astype(np.float32)) for _ in range(2))
    txt = mx.array(rng.standard_normal((1, 5, 64)).astype(np.float32))
    args = (x, cond, 1.0, txt, None, mx.array([0.5]), [[(1, 3, 4)]])
    for a, b in zip(net(*args), quantized(*args)):
        assert 0 < rel_err(np.array(b), np.array(a)) < 0.1
