"""The VAE against diffusers' AutoencoderKLQwenImage on tiny random configs, the real checkpoint's names and
shapes, tiling, latent normalisation and the image helpers."""

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import RELEASED, rel_err, randomize_, torch_weights

from mlx_qwen_image.config import VAEConfig, read_json
from mlx_qwen_image.image import array_to_numpy, array_to_pil, array_to_uint8, pil_to_array
from mlx_qwen_image.models.vae import QwenImageVAE, _tile_spans

# Scale 8 (three downsamples, as released) and scale 4; z_dim 16 as released, tiny widths.
SCALE8 = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True])
SCALE4 = dict(base_dim=12, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=2, temperal_downsample=[False, True])


def reference(config, seed=0):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    z = config["z_dim"]
    ref = AutoencoderKLQwenImage(**config, latents_mean=[0.0] * z, latents_std=[1.0] * z).eval()
    return randomize_(ref, seed=seed, std=0.1)


def ours_from(ref) -> QwenImageVAE:
    vae = QwenImageVAE.from_config(dict(ref.config))
    vae.load_weights(list(vae.sanitize(torch_weights(ref)).items()), strict=True)
    return vae


def ref_encode(ref, x: np.ndarray) -> np.ndarray:
    # Channels-last single images -> diffusers' (B, C, T=1, H, W) and back.
    with torch.no_grad():
        mean = ref.encode(torch.from_numpy(x).permute(0, 3, 1, 2)[:, :, None]).latent_dist.mean
    return mean[:, :, 0].permute(0, 2, 3, 1).numpy()


def ref_decode(ref, z: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        img = ref.decode(torch.from_numpy(z).permute(0, 3, 1, 2)[:, :, None]).sample
    return img[:, :, 0].permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module", params=[SCALE8, SCALE4], ids=["scale8", "scale4"])
def pair(request):
    ref = reference(request.param)
    return ref, ours_from(ref)


def test_encode_matches_diffusers(pair):
    ref, vae = pair
    s = vae.config.scale_factor
    assert s == ref.spatial_compression_ratio
    rng = np.random.default_rng(1)
    # Non-square; the second size is not a multiple of the scale factor (floor at every downsample).
    for h, w in [(5 * s, 7 * s), (5 * s + 4, 3 * s + 6)]:
        x = rng.uniform(-1, 1, (2, h, w, 3)).astype(np.float32)
        expected = ref_encode(ref, x)
        got = np.array(vae.encode(mx.array(x)))
        assert got.shape == expected.shape
        assert rel_err(got, expected) < 1e-4


def test_decode_matches_diffusers(pair):
    ref, vae = pair
    rng = np.random.default_rng(2)
    z = rng.normal(size=(2, 5, 7, vae.config.z_dim)).astype(np.float32)
    expected = ref_decode(ref, z)
    got = np.array(vae.decode(mx.array(z)))
    assert got.shape == (2, 5 * vae.config.scale_factor, 7 * vae.config.scale_factor, 3)
    assert rel_err(got, expected) < 1e-4


def test_decode_clamps_like_diffusers():
    ref = reference(SCALE8, seed=3)
    with torch.no_grad():
        ref.decoder.conv_out.weight.mul_(40.0)  # push most pixels past +-1
    vae = ours_from(ref)
    z = np.random.default_rng(3).normal(size=(1, 4, 6, 16)).astype(np.float32)
    expected = ref_decode(ref, z)
    assert expected.max() == 1.0 and expected.min() == -1.0 and (np.abs(expected) == 1.0).mean() > 0.2
    got = np.array(vae.decode(mx.array(z)))
    assert got.max() == 1.0 and got.min() == -1.0
    assert rel_err(got, expected) < 1e-4


def test_bfloat16_stays_bfloat16(pair):
    ref, vae = pair
    vae16 = ours_from(ref)
    vae16.set_dtype(mx.bfloat16)
    z = np.random.default_rng(4).normal(size=(1, 3, 4, vae.config.z_dim)).astype(np.float32)
    out = vae16.decode(mx.array(z))
    assert out.dtype == mx.bfloat16
    # bf16 weights and activations: about 1% off the float32 result, nowhere near a wrong layer.
    assert rel_err(np.array(out.astype(mx.float32)), np.array(vae.decode(mx.array(z)))) < 5e-2


# --- the released checkpoint's names and shapes -----------------------------------------------------------


def test_released_config_defaults():
    config = read_json(RELEASED / "vae" / "config.json")
    assert VAEConfig.from_dict({**config, "some_future_key": 1}) == VAEConfig()
    assert VAEConfig().scale_factor == 8


def test_full_size_loads_every_manifest_tensor_lazily(manifest):
    shapes = manifest["vae"]
    weights = {k: mx.zeros(shape) for k, shape in shapes.items()}  # lazy: never evaluated
    assert sum(math.prod(s) for s in shapes.values()) == pytest.approx(126.9e6, rel=1e-3)
    before = mx.get_active_memory()  # arrays other tests left alive count in the peak too
    mx.reset_peak_memory()
    vae = QwenImageVAE.from_config(read_json(RELEASED / "vae" / "config.json"))
    sanitized = vae.sanitize(weights)
    vae.load_weights(list(sanitized.items()), strict=True)
    # Nothing was materialised (the weights alone would be 500 MB in float32).
    assert mx.get_peak_memory() - before < 16 * 2**20
    dropped = set(shapes) - set(sanitized)
    # Exactly the resample time convolutions (2 in the encoder, 2 in the decoder, weight + bias each).
    assert len(dropped) == 8 and all(".time_conv." in k for k in dropped)
    assert set(sanitized) <= set(shapes)
    assert sanitized["decoder.conv_in.weight"].shape == (384, 3, 3, 16)  # (O, kh, kw, I)
    assert sanitized["encoder.down_blocks.2.resample.1.weight"].shape == (96, 3, 3, 96)
    assert sanitized["decoder.mid_block.attentions.0.to_qkv.weight"].shape == (1152, 384)
    assert sanitized["encoder.down_blocks.3.conv_shortcut.weight"].shape == (192, 96)
    assert sanitized["decoder.norm_out.gamma"].shape == (96,)
    # Our own (converted) names and layouts pass through unchanged, including the 3-channel conv_in.
    again = vae.sanitize(sanitized)
    assert {k: v.shape for k, v in again.items()} == {k: v.shape for k, v in sanitized.items()}


def test_loads_a_saved_diffusers_folder(tmp_path):
    ref = reference(SCALE4, seed=12)
    ref.save_pretrained(tmp_path)
    vae = QwenImageVAE.from_config(read_json(tmp_path / "config.json"))
    weights = {}
    for shard in sorted(tmp_path.glob("*.safetensors")):
        weights.update(mx.load(str(shard)))  # lazy, as the pipeline loads
    vae.load_weights(list(vae.sanitize(weights).items()), strict=True)
    z = np.random.default_rng(12).normal(size=(1, 6, 5, 4)).astype(np.float32)
    assert rel_err(np.array(vae.decode(mx.array(z))), ref_decode(ref, z)) < 1e-4


def test_sanitize_takes_the_last_time_slice():
    ref = reference(SCALE4)
    w = ref.decoder.up_blocks[0].resnets[0].conv1.weight.detach().numpy()  # (O, I, 3, 3, 3)
    got = np.array(ours_from(ref).decoder.up_blocks[0].resnets[0].conv1.weight)
    np.testing.assert_array_equal(got, w[:, :, -1].transpose(0, 2, 3, 1))


# --- tiling ----------------------------------------------------------------------------------------------


def decoder_field(cfg: VAEConfig) -> float:
    """Receptive field radius of the decoder's upsampling path, in latent pixels: 3x3 convs at level l (2^l
    image-to-latent scale) reach 1 / 2^l latent pixels each."""
    levels = len(cfg.dim_mult)
    convs = sum(2 * (cfg.num_res_blocks + 1) / 2**lv for lv in range(levels))
    return convs + sum(1 / 2 ** (lv + 1) for lv in range(levels - 1)) + 1 / 2 ** (levels - 1)


def encoder_field(cfg: VAEConfig) -> float:
    """The same for the encoder's downsampling path (the stride-2 convs reach 2 pixels to the right)."""
    levels = len(cfg.dim_mult)
    px = 1 + sum((2 * cfg.num_res_blocks + 2) * 2**lv for lv in range(levels - 1))
    px += 2 * cfg.num_res_blocks * 2 ** (levels - 1)
    return px / 2 ** (levels - 1) + 1


def far_from_seams(n: int, tile: int, overlap: int, field: float, scale: int) -> np.ndarray:
    """Output pixels farther than ``field`` latent pixels from every seam (the middle of each overlap)."""
    spans = _tile_spans(n, tile, overlap)
    pos = (np.arange(n * scale) + 0.5) / scale
    far = np.ones(n * scale, bool)
    for (_, end), (start, _) in zip(spans[:-1], spans[1:]):
        far &= np.abs(pos - (start + end) / 2) > field
    return far


@pytest.fixture(scope="module")
def tiny():
    return ours_from(reference(SCALE8, seed=5))


def test_tiled_decode_differs_only_near_seams(tiny):
    vae = tiny
    field = decoder_field(vae.config)
    vae.tile_size, vae.tile_overlap, vae.tile_blend = 16, 8, 2
    z = mx.array(np.random.default_rng(6).normal(size=(1, 30, 21, 16)).astype(np.float32))
    assert len(_tile_spans(30, 16, 8)) == 3 and len(_tile_spans(21, 16, 8)) == 2
    untiled = np.array(vae.decode(z, tiled=False))
    diff = np.abs(np.array(vae.decode(z, tiled=True)) - untiled).max(axis=(0, 3))
    far = far_from_seams(30, 16, 8, field, 8)[:, None] & far_from_seams(21, 16, 8, field, 8)[None, :]
    assert far.sum() > 1000 and diff[far].max() <= 1e-5
    # Near seams each tile is weighted zero within (overlap - blend) / 2 of its cut edges; diffusers' ramp
    # across the whole overlap, which trusts tiles up to their edges, is worse on the same tiles.
    vae.tile_blend = vae.tile_overlap
    diff_full_ramp = np.abs(np.array(vae.decode(z, tiled=True)) - untiled).max(axis=(0, 3))
    assert 0 < diff[~far].max() < diff_full_ramp.max() / 4
    # The stated bound (README): at most 1e-3 on the [-1, 1] scale near seams, an eighth of an 8-bit level.
    assert diff.max() <= 1e-3


def test_tiled_decode_is_exact_with_overlap_beyond_the_receptive_field(tiny):
    vae = tiny
    vae.tile_size, vae.tile_blend = 22, 2
    vae.tile_overlap = 2 * math.ceil(decoder_field(vae.config)) + vae.tile_blend
    z = mx.array(np.random.default_rng(7).normal(size=(1, 24, 23, 16)).astype(np.float32))
    assert len(_tile_spans(24, 22, vae.tile_overlap)) == len(_tile_spans(23, 22, vae.tile_overlap)) == 2
    untiled = np.array(vae.decode(z, tiled=False))
    assert rel_err(np.array(vae.decode(z, tiled=True)), untiled) < 1e-5
    # The same tiles trusted up to their edges do differ: the check above can fail.
    vae.tile_blend = vae.tile_overlap
    assert rel_err(np.array(vae.decode(z, tiled=True)), untiled) > 1e-4


def test_tiled_encode_is_exact(tiny):
    vae = tiny
    vae.tile_size, vae.tile_blend = 24, 2
    vae.encode_tile_overlap = 2 * math.ceil(encoder_field(vae.config)) + vae.tile_blend
    x = mx.array(np.random.default_rng(8).uniform(-1, 1, (1, 256, 224, 3)).astype(np.float32))
    assert len(_tile_spans(32, 24, vae.encode_tile_overlap)) == len(_tile_spans(28, 24, vae.encode_tile_overlap)) == 2
    untiled = np.array(vae.encode(x, tiled=False))
    assert rel_err(np.array(vae.encode(x, tiled=True)), untiled) < 1e-5
    with pytest.raises(ValueError, match="divisible"):
        vae.encode(x[:, :100], tiled=True)


def test_tiling_switches_on_above_the_threshold(tiny):
    vae = tiny
    vae.tile_size, vae.tile_overlap, vae.tile_blend = 10, 4, 4
    z = mx.array(np.random.default_rng(9).normal(size=(1, 16, 12, 16)).astype(np.float32))
    tiled, untiled = vae.decode(z, tiled=True), vae.decode(z, tiled=False)
    assert not mx.array_equal(tiled, untiled)
    vae.tile_min_pixels = 16 * 12 * 64 - 1
    assert mx.array_equal(vae.decode(z), tiled)
    vae.tile_min_pixels = 16 * 12 * 64
    assert mx.array_equal(vae.decode(z), untiled)
    # Device defaults (CPU: above 512x512; GPU: above 2048x2048).
    vae.tile_min_pixels = None
    assert not vae._use_tiles(None, 512, 512) and vae._use_tiles(None, 2048, 2056)


# --- latents and images ---------------------------------------------------------------------------------


def test_latent_normalisation():
    vae = QwenImageVAE(VAEConfig())
    z = np.random.default_rng(10).normal(size=(1, 3, 5, 16)).astype(np.float32)
    mean, std = np.array(VAEConfig().latents_mean), np.array(VAEConfig().latents_std)
    np.testing.assert_allclose(np.array(vae.denormalize_latents(mx.array(z))), z * std + mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.array(vae.normalize_latents(mx.array(z))), (z - mean) / std, rtol=1e-5, atol=1e-6)


def test_image_helpers_match_diffusers_processor():
    from diffusers.image_processor import VaeImageProcessor

    proc = VaeImageProcessor(do_resize=False)
    rng = np.random.default_rng(11)
    pixels = rng.integers(0, 256, (2, 24, 40, 3), dtype=np.uint8)
    images = [Image.fromarray(p) for p in pixels]
    x = pil_to_array(images)
    expected = proc.preprocess(images).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.array(x), expected, atol=1e-7)
    assert pil_to_array(images[0]).shape == (1, 24, 40, 3)
    # Round trip is exact, and outputs (including out-of-range values) match diffusers' postprocess.
    np.testing.assert_array_equal(np.asarray(array_to_pil(x)[1]), pixels[1])
    y = rng.uniform(-1.2, 1.2, (2, 24, 40, 3)).astype(np.float32)
    ref_pil = proc.postprocess(torch.from_numpy(y).permute(0, 3, 1, 2), output_type="pil")
    for ours, theirs in zip(array_to_pil(mx.array(y)), ref_pil):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    ref_np = proc.postprocess(torch.from_numpy(y).permute(0, 3, 1, 2), output_type="np")
    np.testing.assert_allclose(array_to_numpy(mx.array(y).astype(mx.bfloat16)), ref_np, atol=1e-2)
    np.testing.assert_allclose(array_to_numpy(y), ref_np, atol=1e-7)
    assert array_to_uint8(y[0]).shape == (24, 40, 3) and len(array_to_pil(y[0])) == 1
