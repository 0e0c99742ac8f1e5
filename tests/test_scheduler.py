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
