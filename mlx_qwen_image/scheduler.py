"""Flow-matching Euler sampler with the resolution-dependent ("dynamic") time shift of Qwen-Image.

The scheduler owns the schedule of a run (`Schedule`): sigmas start from ``linspace(1, 1/N, N)`` (as the pipeline
passes them), are shifted by ``mu`` interpolated between (base_image_seq_len, base_shift) and (max_image_seq_len,
max_shift), stretched so the last one equals ``shift_terminal``, and end with 0; a fixed ``sigmas`` list in the
config replaces all of that. img2img starts part-way down (``strength``) from the picture mixed with the noise
(`add_noise`). The arithmetic is float32 like the reference's.
"""

from __future__ import annotations

import dataclasses
import math

import mlx.core as mx
import numpy as np

from .config import ConfigError, SchedulerConfig

# The Qwen-Image-Lightning LoRAs (lightx2v/Qwen-Image-Lightning, 4 and 8 steps, CFG 1) were distilled with a fixed
# shift of 3: mu = ln 3 at every resolution, no terminal stretch. Values as published in ModelTC/Qwen-Image-Lightning
# (README and generate_with_diffusers.py, the scheduler_config passed to FlowMatchEulerDiscreteScheduler).
LIGHTNING_SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
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


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The noise levels one run steps through: ``sigmas[i] -> sigmas[i + 1]`` at step ``i`` (the last is 0)."""

    sigmas: np.ndarray  # float32, (steps + 1,)
    timesteps: np.ndarray  # float32, (steps,): what the transformer gets, diffusers' ``1000 * sigma / 1000``
    scheduled_steps: int  # the full schedule's length, before img2img's start

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def start(self) -> int:
        """The index of the first step that runs (img2img skips the first ones)."""
        return self.scheduled_steps - self.steps

    def __len__(self) -> int:
        return self.steps


def img2img_steps(steps: int, strength: float) -> int:
    """Steps that run for ``strength``: diffusers skips ``int(steps - steps * strength)`` of them."""
    return steps - int(max(steps - min(steps * strength, steps), 0))


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
            raise ConfigError(f"scheduler options not supported: {', '.join(unsupported)} (set them to false)")
        if c.time_shift_type not in ("exponential", "linear"):
            raise ConfigError(f"unknown time_shift_type {c.time_shift_type!r}: expected 'exponential' or 'linear'")
        if c.sigmas is not None and (not c.sigmas or not all(0 < s <= 1 for s in c.sigmas)):
            raise ConfigError(f"the scheduler's fixed sigmas must be a non-empty list in (0, 1], got {list(c.sigmas)}")

    @classmethod
    def from_config(cls, config: dict) -> "FlowMatchEulerScheduler":
        return cls(SchedulerConfig.from_dict(config))

    @property
    def fixed_steps(self) -> int | None:
        """The step count of a fixed sigma grid, or None when any count works."""
        return len(self.config.sigmas) if self.config.sigmas is not None else None

    def mu(self, image_seq_len: int) -> float:
        c = self.config
        slope = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
        return image_seq_len * slope + (c.base_shift - slope * c.base_image_seq_len)

    def sigmas(self, steps: int, image_seq_len: int, grid=None) -> np.ndarray:
        """The ``steps + 1`` noise levels (float32, last one 0) for an image of ``image_seq_len`` latent patches.

        ``grid``: the checkpoint's own starting sigmas (2.1's ``sample_sigmas``) in place of ``linspace(1, 1/N, N)``;
        shifted as the config says, like any other."""
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        c = self.config
        if c.sigmas is not None:
            if steps != len(c.sigmas):
                raise ValueError(f"this scheduler has a fixed {len(c.sigmas)}-step schedule; use steps={len(c.sigmas)}")
            return np.append(np.asarray(c.sigmas, dtype=np.float32), np.float32(0.0))
        if grid is not None and steps != len(grid):
            raise ValueError(f"this checkpoint samples a fixed {len(grid)}-step grid (sample_sigmas in "
                             f"model_index.json); use steps={len(grid)}")
        s = (np.linspace(1.0, 1.0 / steps, steps) if grid is None else np.asarray(grid)).astype(np.float32)
        if c.use_dynamic_shifting:
            mu = self.mu(image_seq_len)
            # e^mu / (e^mu + 1/s - 1), written so that a huge mu (a huge image) cannot overflow.
            if c.time_shift_type == "exponential":
                s = 1 / (1 + (1 / s - 1) * math.exp(-mu))
            else:
                s = mu / (mu + (1 / s - 1))
        else:
            s = c.shift * s / (1 + (c.shift - 1) * s)
        # With a single step (or a shift so large that every sigma rounds to 1) the stretch is 0/0 (NaN in the
        # reference): skip it.
        if c.shift_terminal and steps > 1 and s[-1] < 1:
            one_minus = 1 - s
            s = 1 - one_minus / (one_minus[-1] / (1 - c.shift_terminal))
        return np.append(s.astype(np.float32), np.float32(0.0))

    def timesteps(self, steps: int, image_seq_len: int) -> np.ndarray:
        """diffusers' timesteps, ``1000 * sigma`` (the transformer itself takes sigma)."""
        return self.sigmas(steps, image_seq_len)[:-1] * np.float32(self.config.num_train_timesteps)

    def schedule(self, steps: int, image_seq_len: int, strength: float | None = None, grid=None) -> Schedule:
        """The run's schedule; with ``strength`` (img2img) only its last ``img2img_steps`` steps."""
        sigmas = self.sigmas(steps, image_seq_len, grid)
        if strength is not None:
            if not 0 < strength <= 1:
                raise ValueError(f"strength must be in (0, 1], got {strength}")
            sigmas = sigmas[steps - img2img_steps(steps, strength):]
        # The reference feeds timestep / 1000 (not sigma itself); equal up to float32 rounding.
        timesteps = sigmas[:-1] * np.float32(self.config.num_train_timesteps) / np.float32(1000)
        return Schedule(sigmas, timesteps.astype(np.float32), steps)

    @staticmethod
    def add_noise(picture: mx.array, noise: mx.array, schedule: Schedule) -> mx.array:
        """The starting latents of img2img: the picture's latents mixed with the noise at the first sigma."""
        s0 = mx.array(schedule.sigmas[0])  # float32, as the reference mixes
        return s0 * noise + (1 - s0) * picture

    @staticmethod
    def step(latents: mx.array, velocity: mx.array, schedule: Schedule, i: int) -> mx.array:
        """Euler step ``i``: ``x + (sigma_next - sigma) * v`` in float32."""
        sigma, sigma_next = schedule.sigmas[i], schedule.sigmas[i + 1]
        return latents.astype(mx.float32) + (sigma_next - sigma) * velocity.astype(mx.float32)


SCHEDULERS = {"FlowMatchEulerDiscreteScheduler": FlowMatchEulerScheduler}


def scheduler_from_config(config: dict) -> FlowMatchEulerScheduler:
    """The scheduler a ``scheduler_config.json`` names (``_class_name``; absent means flow-match Euler)."""
    if not isinstance(config, dict):
        raise ConfigError(f"the scheduler config is a JSON {type(config).__name__}, not an object")
    name = config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
    if name not in SCHEDULERS:
        raise ConfigError(f"scheduler {name} is not supported (supported: {', '.join(SCHEDULERS)})")
    return SCHEDULERS[name].from_config(config)


def lightning_scheduler() -> FlowMatchEulerScheduler:
    """The sampler the Qwen-Image-Lightning LoRAs were distilled for (see ``LIGHTNING_SCHEDULER_CONFIG``)."""
    return scheduler_from_config(LIGHTNING_SCHEDULER_CONFIG)
