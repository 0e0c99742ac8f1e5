"""Qwen-Image 2.1's VAE against diffusers' AutoencoderKLQwenImage21 on tiny random configs, the released
config's names and shapes (built on the meta device), the one-frame shortcuts, tiling, latent normalisation and
the pipeline's packing."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from conftest import rel_err, randomize_, to_torch, torch_weights

from mlx_qwen_image.config import ConfigError
from mlx_qwen_image.models.vae import _tile_spans
from mlx_qwen_image.models.vae21 import QwenImage21VAE, UpBlock, VAE21Config, _avg_down

torch.set_default_dtype(torch.float32)

# The released block layout (16x, residual shortcuts with groups of 4) and one with other temporal flags and
# channel ratios (groups of 8 and 2, a plain nearest shortcut); tiny widths, one res block per level.
RELEASED_LAYOUT = dict(base_dim=4, decoder_base_dim=6, z_dim=8, num_res_blocks=1)
OTHER_LAYOUT = dict(base_dim=4, decoder_base_dim=6, z_dim=8, num_res_blocks=1, dim_mult=[1, 2, 2, 4, 4],
                    temperal_downsample=[True, False, False, True])
MEAN, STD = [0.1, -0.2, 0.3, 0.0, 0.5, -1.0, 0.2, 0.4], [1.5, 0.8, 1.2, 2.0, 0.9, 1.1, 3.0, 0.7]


def reference(config, seed=0, std=0.1):
    from diffusers import AutoencoderKLQwenImage21

    torch.manual_seed(seed)
    ref = AutoencoderKLQwenImage21(**config, latents_mean=MEAN, latents_std=STD).eval()
    return randomize_(ref, seed=seed, std=std)


def ours_from(ref) -> QwenImage21VAE:
    vae = QwenImage21VAE.from_config(dict(ref.config))
    vae.load_weights(list(vae.sanitize(torch_weights(ref)).items()), strict=True)
    return vae


def ref_encode(ref, x: np.ndarray) -> np.ndarray:
    # Channels-last single images -> diffusers' (B, C, T=1, H, W); the mode, as retrieve_latents(argmax).
    with torch.no_grad():
        mode = ref.encode(to_torch(x).permute(0, 3, 1, 2)[:, :, None]).latent_dist.mode()
    return mode[:, :, 0].permute(0, 2, 3, 1).numpy()


def ref_decode(ref, z: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        img = ref.decode(to_torch(z).permute(0, 3, 1, 2)[:, :, None]).sample
    return img[:, :, 0].permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module", params=[RELEASED_LAYOUT, OTHER_LAYOUT], ids=["released", "other"])
def pair(request):
    ref = reference(request.param)
    return ref, ours_from(ref)


def test_encode_matches_diffusers(pair):
    ref, vae = pair
    assert vae.config.scale_factor == ref.spatial_compression_ratio == 16
    x = np.random.default_rng(1).uniform(-1, 1, (2, 48, 80, 4)).astype(np.float32)
    expected = ref_encode(ref, x)
    got = np.array(vae.encode(mx.array(x)))
    assert got.shape == expected.shape == (2, 3, 5, 8)
    assert rel_err(got, expected) < 1e-4
    with pytest.raises(ValueError, match="divisible by 16"):
        vae.encode(mx.array(x[:, :40]))


def test_decode_matches_diffusers(pair):
    ref, vae = pair
    z = np.random.default_rng(2).normal(size=(2, 3, 5, 8)).astype(np.float32)
    expected = ref_decode(ref, z)
    got = np.array(vae.decode(mx.array(z)))
    assert got.shape == (2, 48, 80, 4)
    assert rel_err(got, expected) < 1e-4


def test_decode_clamps_like_diffusers():
    ref = reference(RELEASED_LAYOUT, seed=3)
    with torch.no_grad():
        ref.decoder.conv_out.weight.mul_(60.0)  # push many pixels past +-1
    vae = ours_from(ref)
    z = np.random.default_rng(3).normal(size=(1, 2, 3, 8)).astype(np.float32)
    expected = ref_decode(ref, z)
    assert expected.max() == 1.0 and expected.min() == -1.0 and (np.abs(expected) == 1.0).mean() > 0.2
    got = np.array(vae.decode(mx.array(z)))
    assert got.max() == 1.0 and got.min() == -1.0
    assert rel_err(got, expected) < 1e-4


def test_bfloat16_stays_bfloat16(pair):
    ref, vae = pair
    vae16 = ours_from(ref)
    vae16.set_dtype(mx.bfloat16)
    z = mx.array(np.random.default_rng(4).normal(size=(1, 2, 3, 8)).astype(np.float32))
    out = vae16.decode(z)
    assert out.dtype == mx.bfloat16 and vae16.dtype == mx.bfloat16
    assert rel_err(np.array(out.astype(mx.float32)), np.array(vae.decode(z))) < 5e-2


# --- the parameter-free shortcuts on one frame ----------------------------------------------------------------


@pytest.mark.parametrize("in_dim,out_dim,temporal,down", [
    (8, 8, False, True), (8, 16, True, True), (8, 8, True, True), (8, 16, False, True), (8, 8, False, False)])
def test_averaging_shortcut_matches_diffusers(in_dim, out_dim, temporal, down):
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage21 import QwenImage21AvgDown3D

    x = np.random.default_rng(5).normal(size=(2, 4, 6, in_dim)).astype(np.float32)
    ref = QwenImage21AvgDown3D(in_dim, out_dim, factor_t=2 if temporal else 1, factor_s=2 if down else 1)
    expected = ref(to_torch(x).permute(0, 3, 1, 2)[:, :, None])[:, :, 0].permute(0, 2, 3, 1).numpy()
    got = np.array(_avg_down(mx.array(x), out_dim, temporal, 2 if down else 1))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    if temporal and in_dim * 8 // out_dim == 4:  # the released grouping: even channels see only the pad frame
        pooled = x.reshape(2, 2, 2, 3, 2, in_dim).mean(axis=(2, 4))
        np.testing.assert_allclose(got[..., 0::2], 0.0)
        np.testing.assert_allclose(got[..., 1::2], pooled, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("in_dim,out_dim,temporal", [(8, 8, True), (8, 4, True), (8, 4, False), (8, 8, False)])
def test_duplicating_shortcut_matches_diffusers(in_dim, out_dim, temporal):
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage21 import QwenImage21DupUp3D

    x = np.random.default_rng(6).normal(size=(2, 3, 5, in_dim)).astype(np.float32)
    ref = QwenImage21DupUp3D(in_dim, out_dim, factor_t=2 if temporal else 1, factor_s=2)
    # first_chunk=True, as the decoder runs a lone frame: the last of the duplicated frame slots is kept.
    y = ref(to_torch(x).permute(0, 3, 1, 2)[:, :, None], first_chunk=True)
    assert y.shape[2] == 1
    expected = y[:, :, 0].permute(0, 2, 3, 1).numpy()
    block = UpBlock(in_dim, out_dim, 1, temporal, True)
    b, h, w, _ = x.shape
    got = mx.take(mx.array(x), block._source, axis=-1).reshape(b, h, w, out_dim, 2, 2)
    got = np.array(got.transpose(0, 1, 4, 2, 5, 3).reshape(b, 2 * h, 2 * w, out_dim))
    np.testing.assert_array_equal(got, expected)


# --- tiling ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    ref = reference(RELEASED_LAYOUT, seed=7)
    return ref, ours_from(ref)


def test_tiled_decode_is_exact_with_overlap_beyond_the_receptive_field(tiny):
    ref, vae = tiny
    # With one res block per level the decoder's upsampling path reaches 9 latent pixels (the released 13).
    vae.tile_size, vae.tile_overlap, vae.tile_blend = 24, 2 * 9 + 2, 2
    z = np.random.default_rng(8).normal(size=(1, 4, 28, 8)).astype(np.float32)
    assert len(_tile_spans(28, 24, 20)) == 2  # tiled along the width (the 2-D machinery is QwenImageVAE's)
    untiled = np.array(vae.decode(mx.array(z), tiled=False))
    tiled = np.array(vae.decode(mx.array(z), tiled=True))
    assert rel_err(tiled, untiled) < 1e-6
    assert rel_err(tiled, ref_decode(ref, z)) < 1e-4
    vae.tile_min_pixels = 64 * 448 - 1  # tiled=None switches on above it
    assert np.array_equal(np.array(vae.decode(mx.array(z))), tiled)
    # The same tiles trusted up to their edges (diffusers' ramp across the whole overlap) do differ.
    vae.tile_blend = vae.tile_overlap
    assert rel_err(np.array(vae.decode(mx.array(z), tiled=True)), untiled) > 1e-5


def test_tiled_encode_is_exact(tiny):
    ref, vae = tiny
    # A latent pixel reads image pixels 63 left and 93 right of its own 16 (one res block per level; released:
    # 125 and 155), so tiles are exact from 4 latent pixels after a cut on the left, 6 before one on the right.
    vae.tile_size, vae.encode_tile_overlap, vae.tile_blend = 16, 2 * 5 + 2, 2
    x = np.random.default_rng(9).uniform(-1, 1, (1, 320, 304, 4)).astype(np.float32)
    assert len(_tile_spans(20, 16, 12)) == len(_tile_spans(19, 16, 12)) == 2
    untiled = np.array(vae.encode(mx.array(x), tiled=False))
    tiled = np.array(vae.encode(mx.array(x), tiled=True))
    assert rel_err(tiled, untiled) < 1e-6
    assert rel_err(tiled, ref_encode(ref, x)) < 1e-4
    # Two latent pixels less of margin are not.
    vae.encode_tile_overlap = 2 * 3 + 2
    assert rel_err(np.array(vae.encode(mx.array(x), tiled=True)), untiled) > 1e-6


def test_receptive_fields_of_the_released_depth():
    # The reach depends on the block counts only: the released two res blocks per level, tiny widths.
    vae = QwenImage21VAE(VAE21Config(**{**RELEASED_LAYOUT, "num_res_blocks": 2}, latents_mean=tuple(MEAN),
                                     latents_std=tuple(STD)))
    rng = np.random.default_rng(13)
    x = rng.uniform(-1, 1, (1, 16, 512, 4)).astype(np.float32)
    base = np.array(vae.encoder.local(mx.array(x)))
    for col in (256, 271):  # first and last image column of latent column 16
        bumped = x.copy()
        bumped[:, :, col] += 1.0
        changed = np.flatnonzero(np.abs(np.array(vae.encoder.local(mx.array(bumped))) - base).max(axis=(0, 1, 3)))
        # Latent pixel p reads image columns 16p - 125 .. 16p + 155.
        assert list(changed) == [p for p in range(32) if 16 * p - 125 <= col <= 16 * p + 155]
    h = rng.normal(size=(1, 2, 40, 48)).astype(np.float32)
    base = np.array(vae.decoder.local(mx.array(h)))
    bumped = h.copy()
    bumped[:, :, 20] += 1.0
    changed = np.flatnonzero(np.abs(np.array(vae.decoder.local(mx.array(bumped))) - base).max(axis=(0, 1, 3)))
    # Latent column 20 reaches 12.6 latent pixels either way: image columns 16 * 20 - 202 .. 16 * 20 + 15 + 202.
    assert (changed.min(), changed.max(), len(changed)) == (320 - 202, 335 + 202, 420)


def test_released_tile_settings():
    vae = QwenImage21VAE(VAE21Config())  # lazy: its weights are never evaluated
    assert (vae.tile_size, vae.tile_overlap, vae.tile_blend, vae.encode_tile_overlap) == (32, 16, 2, 24)
    # The encoder's margin covers the released downsampling path's reach (8 left, 10 right latent pixels).
    assert (vae.encode_tile_overlap - vae.tile_blend) // 2 >= 10
    # Device defaults, as QwenImageVAE (this CPU: above 512x512).
    assert vae.tile_min_pixels is None
    assert not vae._use_tiles(None, 512, 512) and vae._use_tiles(None, 512, 528)
    assert not vae._use_tiles(False, 4096, 4096) and vae._use_tiles(True, 16, 16)


# --- the released config: names, shapes, latents, packing ------------------------------------------------


@pytest.fixture(scope="module")
def released():
    from diffusers import AutoencoderKLQwenImage21

    with torch.device("meta"):
        ref = AutoencoderKLQwenImage21()
    return ref


def test_released_config_defaults(released):
    config = VAE21Config.from_dict({**dict(released.config), "some_future_key": 1})
    assert config == VAE21Config()
    assert config.scale_factor == 16 and config.z_dim == 64
    assert (config.in_channels, config.out_channels, config.base_dim, config.decoder_base_dim) == (4, 4, 96, 144)
    assert QwenImage21VAE.image_mode == "RGBA"
    assert VAE21Config.from_dict({"base_dim": 32, "decoder_base_dim": None}).decoder_base_dim == 32
    for bad, match in [({"latents_mean": [0.0] * 16}, "latents_mean"), ({"is_residual": False}, "is_residual"),
                       ({"patch_size": 2}, "patch_size"), ({"scale_factor_spatial": 8}, "scale_factor_spatial"),
                       ({"temperal_downsample": [True]}, "temperal_downsample"),
                       ({"dim_mult": [1, 3, 4, 8, 8]}, "encoder block 1"), ({"num_res_blocks": 0}, "num_res_blocks")]:
        with pytest.raises(ConfigError, match=match):
            VAE21Config.from_dict(bad)


def test_full_size_names_and_shapes(released):
    shapes = {k: tuple(v.shape) for k, v in released.state_dict().items()}
    weights = {k: mx.zeros(s) for k, s in shapes.items()}  # lazy: never evaluated
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    vae = QwenImage21VAE(VAE21Config())
    sanitized = vae.sanitize(weights)
    ours = {k: tuple(v.shape) for k, v in tree_flatten(vae.parameters())}
    assert {k: tuple(v.shape) for k, v in sanitized.items()} == ours
    vae.load_weights(list(sanitized.items()), strict=True)
    assert mx.get_peak_memory() - before < 16 * 2**20  # nothing materialised (1.35 GB in float32)
    dropped = set(shapes) - set(sanitized)
    # The time convolutions of the three temporal resamples in each of encoder and decoder (weight + bias).
    assert len(dropped) == 12 and all(".time_conv." in k for k in dropped)
    assert sanitized["encoder.conv_in.weight"].shape == (96, 3, 3, 4)
    assert sanitized["decoder.conv_in.weight"].shape == (1152, 3, 3, 64)
    assert sanitized["decoder.conv_out.weight"].shape == (4, 3, 3, 144)
    assert sanitized["decoder.up_blocks.1.upsampler.resample.1.weight"].shape == (1152, 3, 3, 1152)
    assert sanitized["encoder.mid_block.attentions.0.to_qkv.weight"].shape == (2304, 768)
    assert sanitized["quant_conv.weight"].shape == (128, 128)
    assert sanitized["decoder.norm_out.gamma"].shape == (144,)
    # Our own layouts pass through unchanged.
    assert {k: v.shape for k, v in vae.sanitize(sanitized).items()} == {k: v.shape for k, v in sanitized.items()}


def test_sanitize_takes_the_last_time_slice_of_a_conv3d():
    vae = QwenImage21VAE(VAE21Config(**RELEASED_LAYOUT, latents_mean=tuple(MEAN), latents_std=tuple(STD)))
    w = np.random.default_rng(10).normal(size=(4, 4, 3, 3, 3)).astype(np.float32)
    got = np.array(vae.sanitize({"encoder.conv_in.weight": mx.array(w)})["encoder.conv_in.weight"])
    np.testing.assert_array_equal(got, w[:, :, -1].transpose(0, 2, 3, 1))


def test_latent_normalisation():
    vae = QwenImage21VAE(VAE21Config())
    z = np.random.default_rng(11).normal(size=(1, 3, 5, 64)).astype(np.float32)
    mean, std = np.array(VAE21Config().latents_mean), np.array(VAE21Config().latents_std)
    np.testing.assert_allclose(np.array(vae.denormalize_latents(mx.array(z))), z * std + mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.array(vae.normalize_latents(mx.array(z))), (z - mean) / std, rtol=1e-5, atol=1e-6)


def test_pack_unpack_match_the_pipeline():
    from diffusers import QwenImage21Pipeline

    vae = QwenImage21VAE(VAE21Config())
    z = np.random.default_rng(12).normal(size=(2, 4, 6, 64)).astype(np.float32)
    zt = to_torch(z).permute(0, 3, 1, 2)[:, :, None]  # the encoder's (B, C, 1, h, w)
    packed = QwenImage21Pipeline._pack_latents(zt, 2, 64, 4, 6)
    got = vae.pack(mx.array(z))
    np.testing.assert_array_equal(np.array(got), packed.numpy())
    unpacked = QwenImage21Pipeline._unpack_latents(packed, 64, 96, 16)[:, :, 0].permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(np.array(vae.unpack(got, 64, 96)), unpacked)
    with pytest.raises(ValueError, match="tokens"):
        vae.unpack(got, 64, 112)
