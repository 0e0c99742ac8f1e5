"""Step caches against diffusers' cache hooks on a tiny random checkpoint: the same steps computed per CFG branch, and
the same image, at settings where the reference skips a real fraction of steps and where it skips none."""

import copy
import json

import numpy as np
import pytest
import torch
from conftest import rel_err

from mlx_qwen_image import QwenImagePipeline
from mlx_qwen_image.cache import FirstBlockCache, MagCache, TaylorSeerCache, parse

WIDTH, HEIGHT, STEPS = 64, 48, 20


@pytest.fixture(scope="module")
def pipes(tiny_checkpoint):
    folder, reference = tiny_checkpoint
    return QwenImagePipeline.from_pretrained(folder, dtype="float32"), reference


def _noise(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((1, (HEIGHT // 16) * (WIDTH // 16), 16)).astype(np.float32)


def _diffusers(reference, config, probe: str, latents):
    """diffusers' image with ``config`` enabled on a copy of its transformer, and the steps each branch computed in
    full (a call of the ``probe`` submodule during that branch's transformer call)."""
    from diffusers import QwenImagePipeline as Reference

    transformer = copy.deepcopy(reference.transformer)
    transformer.enable_cache(config)
    pipe = Reference(**{**reference.components, "transformer": transformer})
    calls, computed = [0], [[], []]
    transformer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))

    def seen(*_):
        index = calls[0] - 1  # cond, then uncond, at every step
        step, branch = index // 2, index % 2
        if not computed[branch] or computed[branch][-1] != step:
            computed[branch].append(step)

    transformer.get_submodule(probe).register_forward_hook(seen)
    with torch.no_grad():
        image = pipe(prompt="a lamp", negative_prompt=" ", true_cfg_scale=4.0, width=WIDTH, height=HEIGHT,
                     num_inference_steps=STEPS, latents=torch.from_numpy(latents), output_type="np").images[0]
    return image, computed


def _ours(pipe, cache, latents):
    run = pipe.denoise("a lamp", width=WIDTH, height=HEIGHT, steps=STEPS, cfg_scale=4.0, latents=latents, cache=cache)
    return run.complete("np")[0], run.stats["cache"]


def _check(pipes, ours_cache, config, probe, skips_some):
    pipe, reference = pipes
    latents = _noise()
    expected, their_steps = _diffusers(reference, config, probe, latents)
    got, stats = _ours(pipe, ours_cache, latents)
    assert stats["computed_steps"] == their_steps, (stats["computed_steps"], their_steps)
    skipped = 2 * STEPS - stats["computed"]
    assert (skipped > 0) == skips_some, stats
    assert rel_err(got - 0.5, expected - 0.5) < 1e-3
    if not skips_some:
        plain, _ = pipe.generate("a lamp", width=WIDTH, height=HEIGHT, steps=STEPS, cfg_scale=4.0, latents=latents,
                                 output="np"), None
        np.testing.assert_array_equal(got, plain)
    return stats


@pytest.mark.parametrize("threshold, skips_some", [(1.19, True), (0.01, False)])
def test_first_block_cache_equals_diffusers(pipes, threshold, skips_some):
    from diffusers import FirstBlockCacheConfig

    # Block 1 runs only when the branch computes the step in full. The tiny random model's first-block residual
    # moves by 0.8-2.2 of its size from step to step: 1.19 skips some steps, on one branch or on both.
    stats = _check(pipes, FirstBlockCache(threshold), FirstBlockCacheConfig(threshold=threshold),
                   "transformer_blocks.1.attn", skips_some)
    if skips_some:  # the two branches decide on their own residuals
        assert stats["computed_steps"][0] != stats["computed_steps"][1] or stats["computed"] < 2 * STEPS


@pytest.mark.parametrize("interval, before, skips_some", [(5, 3, True), (1, 3, False)])
def test_taylorseer_equals_diffusers(pipes, interval, before, skips_some):
    from diffusers import TaylorSeerCacheConfig

    config = TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=before)
    _check(pipes, TaylorSeerCache(cache_interval=interval, disable_cache_before_step=before), config,
           "transformer_blocks.0.attn.to_q", skips_some)


@pytest.mark.parametrize("threshold, skips_some", [(0.5, True), (0.0, False)])
def test_magcache_equals_diffusers(pipes, threshold, skips_some):
    from diffusers import MagCacheConfig

    ratios = [1.0] + [0.97 + 0.002 * (i % 7) for i in range(29)]  # 30 values: interpolated to the 20 steps
    config = MagCacheConfig(threshold=threshold, max_skip_steps=3, retention_ratio=0.2, num_inference_steps=STEPS,
                            mag_ratios=ratios)
    _check(pipes, MagCache(threshold=threshold, mag_ratios=ratios), config, "transformer_blocks.0.attn.to_q",
           skips_some)


def test_magcache_calibration_equals_diffusers(pipes, capsys, tmp_path):
    from diffusers import MagCacheConfig

    pipe, reference = pipes
    latents = _noise(1)
    _diffusers(reference, MagCacheConfig(calibrate=True, num_inference_steps=STEPS), "proj_out", latents)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[") and "MagCache" not in line]
    theirs = [float(v) for v in printed[0].strip("[]").split(",")]  # the conditional context prints first
    _, stats = _ours(pipe, MagCache(calibrate=True), latents)
    assert stats["computed"] == 2 * STEPS and len(stats["mag_ratios"]) == STEPS
    np.testing.assert_allclose(stats["mag_ratios"], theirs, rtol=1e-3)


def test_settings_are_checked_and_parsed(tmp_path):
    import json

    with pytest.raises(ValueError, match="MagCache needs mag_ratios"):
        MagCache()
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        FirstBlockCache(float("nan"))
    with pytest.raises(ValueError, match="cache_interval must be an integer of at least 1"):
        TaylorSeerCache(0)
    assert parse("first-block:0.12")[0].threshold == 0.12 and parse("taylorseer:4")[0].cache_interval == 4
    (tmp_path / "r.json").write_text(json.dumps({"mag_ratios": [1.0, 0.9]}))
    cache, _ = parse(f"magcache:{tmp_path / 'r.json'}:0.1")
    assert cache.threshold == 0.1 and cache.mag_ratios == [1.0, 0.9]
    cache, target = parse(f"magcache-calibrate:{tmp_path / 'new.json'}")
    assert cache.calibrate and target == tmp_path / "new.json"
    with pytest.raises(ValueError, match="--cache magcache:.*missing.json: .*not a MagCache ratios file"):
        parse(f"magcache:{tmp_path / 'missing.json'}")
    with pytest.raises(ValueError, match="unknown cache"):
        parse("teacache:0.1")


def test_the_cli_reports_and_records_the_cache(tiny_checkpoint, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from mlx_qwen_image.cli import cli

    def generate(out, *extra):
        return CliRunner().invoke(cli, ["generate", "a lamp", "--model", str(tiny_checkpoint[0]), "--width", "64",
                                        "--height", "48", "--steps", "20", "--dtype", "float32", "--seed", "1",
                                        "--output", str(out), *extra])

    result = generate(tmp_path / "fb.png", "--cache", "first-block:1.19")
    assert result.exit_code == 0, result.output
    line = result.output.strip().splitlines()[-1]
    assert " of 40 transformer passes computed in full (first-block:1.19)" in line
    assert Image.open(tmp_path / "fb.png").text["cache"] == "first-block:1.19"
    ratios = tmp_path / "ratios.json"
    result = generate(tmp_path / "cal.png", "--cache", f"magcache-calibrate:{ratios}")
    assert result.exit_code == 0 and "wrote MagCache's ratios" in result.output, result.output
    assert len(json.loads(ratios.read_text())["mag_ratios"]) == 20
    result = generate(tmp_path / "mc.png", "--cache", f"magcache:{ratios}:0.5")
    assert result.exit_code == 0 and "(magcache:0.5)" in result.output, result.output
    result = generate(tmp_path / "x.png", "--cache", "magcache")
    assert result.exit_code == 1 and "needs its ratios file" in result.output
