"""Sigmas and timesteps against diffusers' FlowMatchEulerDiscreteScheduler with the released config."""

import numpy as np
import pytest
from conftest import RELEASED

from mlx_qwen_image.config import read_json
from mlx_qwen_image.scheduler import FlowMatchEulerScheduler

CONFIG = read_json(RELEASED / "scheduler" / "scheduler_config.json")


def _reference(steps, width, height, config=CONFIG):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    ref = FlowMatchEulerDiscreteScheduler.from_config(config)
    seq_len = (height // 16) * (width // 16)
    mu = calculate_shift(
        seq_len, ref.config.base_image_seq_len, ref.config.max_image_seq_len, ref.config.base_shift,
        ref.config.max_shift,
    )
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return ref.sigmas.numpy(), ref.timesteps.numpy(), seq_len


@pytest.mark.parametrize("steps", [50, 8, 4])
@pytest.mark.parametrize("width, height", [(1024, 1024), (1328, 1328), (1664, 928), (64, 32)])
def test_sigmas_and_timesteps_equal_diffusers(steps, width, height):
    sigmas, timesteps, seq_len = _reference(steps, width, height)
    ours = FlowMatchEulerScheduler.from_config(CONFIG)
    np.testing.assert_allclose(ours.sigmas(steps, seq_len), sigmas, atol=1e-6, rtol=0)
    np.testing.assert_allclose(ours.timesteps(steps, seq_len), timesteps, atol=1e-3, rtol=1e-6)


def test_design_card_values_at_1024():
    ours = FlowMatchEulerScheduler.from_config(CONFIG)
    assert ours.mu(4096) == pytest.approx(0.693548, abs=1e-6)
    s = ours.sigmas(50, 4096)
    np.testing.assert_allclose(s[:3], [1.0, 0.989701, 0.979192], atol=1e-6)
    np.testing.assert_allclose(s[-3:], [0.058476, 0.02, 0.0], atol=1e-6)


def test_without_dynamic_shift_or_terminal_stretch():
    config = {**CONFIG, "use_dynamic_shifting": False, "shift": 3.0, "shift_terminal": None}
    sigmas, _, seq_len = _reference(8, 512, 512, config)
    np.testing.assert_allclose(FlowMatchEulerScheduler.from_config(config).sigmas(8, seq_len), sigmas, atol=1e-6)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_single_step_goes_from_noise_to_zero():
    # The reference's terminal stretch divides 0 by 0 for one step; ours skips the stretch.
    assert _reference(1, 512, 512)[0][0] != _reference(1, 512, 512)[0][0]
    np.testing.assert_array_equal(FlowMatchEulerScheduler.from_config(CONFIG).sigmas(1, 1024), [1.0, 0.0])


def test_refuses_bad_input():
    with pytest.raises(ValueError, match="steps"):
        FlowMatchEulerScheduler.from_config(CONFIG).sigmas(0, 4096)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        FlowMatchEulerScheduler.from_config({**CONFIG, "use_karras_sigmas": True})


def test_img2img_schedule_starts_where_diffusers_does():
    from mlx_qwen_image.scheduler import img2img_steps

    ours = FlowMatchEulerScheduler.from_config(CONFIG)
    full = ours.schedule(10, 64)
    for strength in (0.3, 0.6, 1.0):
        s = ours.schedule(10, 64, strength)
        assert s.steps == img2img_steps(10, strength) and s.start == 10 - s.steps
        np.testing.assert_array_equal(s.sigmas, full.sigmas[s.start:])
    with pytest.raises(ValueError, match="strength must be in"):
        ours.schedule(10, 64, 0)
    import mlx.core as mx

    picture, noise = mx.ones((1, 4, 2)), mx.zeros((1, 4, 2))
    s = ours.schedule(10, 64, 0.5)
    assert float(ours.add_noise(picture, noise, s)[0, 0, 0]) == pytest.approx(1 - float(s.sigmas[0]))


def test_fixed_sigmas_from_the_config_and_the_class_name():
    from mlx_qwen_image.scheduler import scheduler_from_config

    fixed = scheduler_from_config({**CONFIG, "sigmas": [1.0, 0.75, 0.5, 0.25]})
    assert fixed.fixed_steps == 4
    np.testing.assert_allclose(fixed.schedule(4, 4096).sigmas, [1.0, 0.75, 0.5, 0.25, 0.0])  # whatever the size
    np.testing.assert_allclose(fixed.schedule(4, 64).sigmas, [1.0, 0.75, 0.5, 0.25, 0.0])
    with pytest.raises(ValueError, match="fixed 4-step schedule; use steps=4"):
        fixed.schedule(8, 64)
    with pytest.raises(ValueError, match="scheduler DPMSolverMultistepScheduler is not supported"):
        scheduler_from_config({"_class_name": "DPMSolverMultistepScheduler"})
    assert scheduler_from_config(CONFIG).fixed_steps is None


def test_the_shift_stays_in_range_for_huge_images():
    ours = FlowMatchEulerScheduler.from_config(CONFIG)
    s = ours.sigmas(10, 39_062_500)  # 100000x100000: mu ~ 1900, whose exp overflows a float
    assert np.isfinite(s).all() and s[0] == 1.0 and (np.diff(s) <= 0).all()
