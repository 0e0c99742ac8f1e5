"""Flow-matching Euler sampler with the resolution-dependent ("dynamic") time shift of Qwen-Image.

Sigmas start from ``linspace(1, 1/N, N)`` (as the pipeline passes them), are shifted by
``mu`` interpolated between (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), stretched so the
last one equals ``shift_terminal``, and end with 0. The arithmetic is float32 like the reference's.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from .config import SchedulerConfig

# The Qwen-Image-Lightning LoRAs (lightx2v/Qwen-Image-Lightning, 4 and 8 steps, CFG 1) were distilled with a fixed
# shift of 3: mu = ln 3 at every resolution, no terminal stretch. Values as published in ModelTC/Qwen-Image-Lightning
# (README and generate_with_diffusers.py, the scheduler_config passed to FlowMatchEulerDiscreteScheduler).
LIGHTNING_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": math.log(3),
    "max_shift": math.log(3),
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": None,
    "time_shift_type": "exponential",
    "invert_sigmas": False,
    "stochastic_sampling": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
}
LIGHTNING_STEPS = (4, 8)  # the step counts the Lightning LoRAs are published for; they run with CFG 1


class FlowMatchEulerScheduler:
    def __init__(self, config: SchedulerConfig | None = None):
        self.config = config or SchedulerConfig()
        c = self.config
        unsupported = [
            name
            for name in ("invert_sigmas", "stochastic_sampling", "use_karras_sigmas", "use_exponential_sigmas",
                         "use_beta_sigmas")
            if getattr(c, name)
        ]
        if unsupported:
            raise ValueError(f"scheduler options not supported: {', '.join(unsupported)} (set them to false)")
        if c.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"unknown time_shift_type {c.time_shift_type!r}: expected 'exponential' or 'linear'")

    @classmethod
    def from_config(cls, config: dict) -> "FlowMatchEulerScheduler":
        return cls(SchedulerConfig.from_dict(config))

    def mu(self, image_seq_len: int) -> float:
        c = self.config
        slope = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
        return image_seq_len * slope + (c.base_shift - slope * c.base_image_seq_len)

    def sigmas(self, steps: int, image_seq_len: int) -> np.ndarray:
        """The ``steps + 1`` noise levels (float32, last one 0) for an image of ``image_seq_len`` latent patches."""
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        c = self.config
        s = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
        if c.use_dynamic_shifting:
            mu = self.mu(image_seq_len)
            if c.time_shift_type == "exponential":
                s = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
            else:
                s = mu / (mu + (1 / s - 1))
        else:
            s = c.shift * s / (1 + (c.shift - 1) * s)
        # With a single step the only sigma is 1 and the stretch is 0/0 (NaN in the reference): skip it.
        if c.shift_terminal and steps > 1:
            one_minus = 1 - s
            s = 1 - one_minus / (one_minus[-1] / (1 - c.shift_terminal))
        return np.append(s.astype(np.float32), np.float32(0.0))

    def timesteps(self, steps: int, image_seq_len: int) -> np.ndarray:
        """diffusers' timesteps, ``1000 * sigma`` (the transformer itself takes sigma)."""
        return self.sigmas(steps, image_seq_len)[:-1] * np.float32(self.config.num_train_timesteps)

    @staticmethod
    def step(latents: mx.array, velocity: mx.array, sigma: float, sigma_next: float) -> mx.array:
        """One Euler step ``x + (sigma_next - sigma) * v`` in float32."""
        return latents.astype(mx.float32) + (sigma_next - sigma) * velocity.astype(mx.float32)


def lightning_scheduler() -> FlowMatchEulerScheduler:
    """The sampler the Qwen-Image-Lightning LoRAs were distilled for (see ``LIGHTNING_SCHEDULER_CONFIG``)."""
    return FlowMatchEulerScheduler.from_config(LIGHTNING_SCHEDULER_CONFIG)
