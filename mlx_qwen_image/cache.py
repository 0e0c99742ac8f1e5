"""Step caches: fewer transformer passes per image, deciding every step as diffusers' cache hooks decide.

A cache is a setting (`FirstBlockCache`, `TaylorSeerCache`, `MagCache`); ``start`` gives the state of one run, which
the core loop calls as a per-step hook (`conditioning.StepHook`: it learns the step) and hands to the transformer,
whose block loop it then runs (``blocks``) or whose attention it sees (``attention``). Under CFG the conditional and
unconditional rows of the one batched call are separate branches with states of their own, as diffusers' pipelines
keep them in separate cache contexts; a step where both branches skip costs no block matmuls, and one where only one
computes runs the blocks on that branch's rows only.

- First-block cache: block 0 always runs; when its image residual moved less than ``threshold`` (mean absolute
  change over mean absolute value) since the last computed step, the other blocks are skipped and their last
  residual (image and text) is added instead.
- TaylorSeer: every block's attention is computed on a fixed pattern of steps and predicted in between by a Taylor
  series of its past outputs (factors stored in bfloat16, as the reference's default).
- MagCache: from per-step magnitude ratios of the residual (per model; ``calibrate`` measures them), whole steps
  are skipped while the accumulated error stays under ``threshold``; the image stream gets the last residual.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np

from .conditioning import StepHook


class _Run(StepHook):
    """A run's cache state: the step, the branches' rows, and which passes were computed in full."""

    def __init__(self, setting, steps: int, batch: int, branches: int):
        self.setting, self.steps, self.batch, self.branches = setting, steps, batch, branches
        self.step = -1
        self.computed_steps: list[list[int]] = [[] for _ in range(branches)]  # per branch, the steps run in full

    def predict(self, step, sigma, compute):
        self.step = step
        return compute()

    def rows(self, b: int) -> slice:
        return slice(b * self.batch, (b + 1) * self.batch)

    def blocks(self, run, img, txt):
        """The block loop: all blocks, all rows (the caches that decide per step or per branch replace it)."""
        return run(img, txt)

    def count(self, b: int):
        if not self.computed_steps[b] or self.computed_steps[b][-1] != self.step:
            self.computed_steps[b].append(self.step)

    def stats(self) -> dict:
        return {"cache": self.setting.label, "passes": self.steps * self.branches,
                "computed": sum(len(s) for s in self.computed_steps), "computed_steps": self.computed_steps}

    def finish(self) -> dict:
        return self.stats()


def _join(parts: list) -> mx.array:
    return parts[0] if len(parts) == 1 else mx.concatenate(parts)


class FirstBlockCache:
    def __init__(self, threshold: float = 0.05):
        self.threshold = _number("threshold", threshold, 0)

    @property
    def label(self) -> str:
        return f"first-block:{self.threshold:g}"

    def start(self, steps: int, batch: int, branches: int) -> "_FirstBlockRun":
        return _FirstBlockRun(self, steps, batch, branches)


class _FirstBlockRun(_Run):
    def __init__(self, *args):
        super().__init__(*args)
        self.head_residual = [None] * self.branches  # of the last computed step
        self.tail = [None] * self.branches  # (image, text) residual of blocks 1..n over block 0's output

    def _should_compute(self, b: int, residual: mx.array) -> bool:
        previous = self.head_residual[b]
        if previous is None:
            return True
        change = mx.mean(mx.abs(residual - previous)) / mx.mean(mx.abs(previous))
        return change.item() > self.setting.threshold

    def blocks(self, run, img, txt):
        head_img, head_txt = run(img, txt, 0, 1)
        residual = head_img - img
        compute = [self._should_compute(b, residual[self.rows(b)]) for b in range(self.branches)]
        rows = [self.rows(b) for b in range(self.branches) if compute[b]]
        if rows:
            part = slice(rows[0].start, rows[-1].stop)  # one or both branches: contiguous rows
            tail_img, tail_txt = run(head_img[part], head_txt[part], 1, None, None if len(rows) == self.branches
                                     else part)
        out_img, out_txt = [], []
        for b in range(self.branches):
            r = self.rows(b)
            if compute[b]:
                local = slice(r.start - part.start, r.stop - part.start)
                self.head_residual[b] = residual[r]
                self.tail[b] = (tail_img[local] - head_img[r], tail_txt[local] - head_txt[r])
                out_img.append(tail_img[local])
                out_txt.append(tail_txt[local])
                self.count(b)
            else:
                out_img.append(self.tail[b][0] + head_img[r])
                out_txt.append(self.tail[b][1] + head_txt[r])
        return _join(out_img), _join(out_txt)


class TaylorSeerCache:
    def __init__(self, cache_interval: int = 5, disable_cache_before_step: int = 3,
                 disable_cache_after_step: int | None = None, max_order: int = 1):
        self.cache_interval = _integer("cache_interval", cache_interval, 1)
        self.disable_cache_before_step = _integer("disable_cache_before_step", disable_cache_before_step, 0)
        self.disable_cache_after_step = None if disable_cache_after_step is None else \
            _integer("disable_cache_after_step", disable_cache_after_step, 0)
        self.max_order = _integer("max_order", max_order, 0)

    @property
    def label(self) -> str:
        return f"taylorseer:{self.cache_interval}"

    def computes(self, step: int) -> bool:
        """Whether step ``step`` computes the attention (the reference's pattern)."""
        warmup = step < self.disable_cache_before_step
        refresh = (step - self.disable_cache_before_step - 1) % self.cache_interval == 0
        cooldown = self.disable_cache_after_step is not None and step >= self.disable_cache_after_step
        return warmup or refresh or cooldown

    def start(self, steps: int, batch: int, branches: int) -> "_TaylorSeerRun":
        return _TaylorSeerRun(self, steps, batch, branches)


class _TaylorSeerRun(_Run):
    def __init__(self, *args):
        super().__init__(*args)
        self.factors: dict[int, list[list[mx.array]]] = {}  # block -> per output, the Taylor factors (bf16)
        self.updated: dict[int, int] = {}  # block -> the step it was last computed
        self.dtypes: dict[int, list] = {}  # block -> the dtypes of its outputs

    def attention(self, index: int, compute):
        if self.setting.computes(self.step):
            outputs = compute()
            self._update(index, outputs)
            for b in range(self.branches):  # both branches compute on the same steps
                self.count(b)
            return outputs
        offset = self.step - self.updated[index]
        predicted = []
        for factors, like in zip(self.factors[index], self.dtypes[index]):
            out = mx.zeros(factors[0].shape, dtype=like)
            for order, factor in enumerate(factors):
                out = out + factor.astype(like) * (offset**order / math.factorial(order))
            predicted.append(out)
        return tuple(predicted)

    def _update(self, index: int, outputs):
        last = self.updated.get(index)
        previous = self.factors.get(index)
        new = []
        for i, features in enumerate(outputs):
            factors = [features]
            if last is not None:
                delta = self.step - last
                for j in range(self.setting.max_order):
                    if j >= len(previous[i]):
                        break
                    factors.append((factors[j] - previous[i][j].astype(features.dtype)) / delta)
            new.append([f.astype(mx.bfloat16) for f in factors])
        self.factors[index] = new
        self.dtypes[index] = [o.dtype for o in outputs]
        self.updated[index] = self.step


class MagCache:
    def __init__(self, threshold: float = 0.06, max_skip_steps: int = 3, retention_ratio: float = 0.2,
                 mag_ratios=None, calibrate: bool = False):
        self.threshold = _number("threshold", threshold, 0)
        self.max_skip_steps = _integer("max_skip_steps", max_skip_steps, 0)
        self.retention_ratio = _number("retention_ratio", retention_ratio, 0)
        self.calibrate = bool(calibrate)
        if mag_ratios is None and not calibrate:
            raise ValueError("MagCache needs mag_ratios (they are per model): measure them once with "
                             "MagCache(calibrate=True) (CLI: --cache magcache-calibrate:FILE), then pass them")
        self.mag_ratios = None if mag_ratios is None else [_number("mag_ratios", r, 0) for r in mag_ratios]

    @classmethod
    def from_file(cls, path, **kwargs) -> "MagCache":
        """A MagCache with the ratios a calibration run wrote to ``path``."""
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            ratios = data["mag_ratios"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a MagCache ratios file ({type(e).__name__}: {e}); write one with "
                             "--cache magcache-calibrate:FILE") from None
        return cls(mag_ratios=ratios, **kwargs)

    @property
    def label(self) -> str:
        return "magcache:calibrate" if self.calibrate else f"magcache:{self.threshold:g}"

    def ratios(self, steps: int) -> list[float]:
        """The ratios for a run of ``steps`` steps: nearest-neighbour interpolated when their count differs."""
        src = self.mag_ratios
        if len(src) == steps:
            return list(src)
        if steps == 1:
            return src[-1:]
        scale = (len(src) - 1) / (steps - 1)
        # np.round rounds halves to even, as the reference's torch.round does.
        return [src[int(i)] for i in np.round(np.arange(steps, dtype=np.float32) * np.float32(scale))]

    def start(self, steps: int, batch: int, branches: int) -> "_MagRun":
        return _MagRun(self, steps, batch, branches)


class _MagRun(_Run):
    def __init__(self, *args):
        super().__init__(*args)
        c = self.setting
        self.scales = None if c.calibrate else c.ratios(self.steps)
        self.retention = int(c.retention_ratio * self.steps + 0.5)
        self.previous = [None] * self.branches  # the last image residual of the whole block stack
        self.ratio = [1.0] * self.branches
        self.skipped = [0] * self.branches
        self.error = [0.0] * self.branches
        self.calibration = [[] for _ in range(self.branches)]

    def _should_compute(self, b: int) -> bool:
        if self.setting.calibrate or self.step < self.retention:
            return True
        scale = self.scales[self.step] if self.step < len(self.scales) else 1.0
        self.ratio[b] *= scale
        self.skipped[b] += 1
        self.error[b] += abs(1.0 - self.ratio[b])
        if self.previous[b] is not None and self.error[b] <= self.setting.threshold \
                and self.skipped[b] <= self.setting.max_skip_steps:
            return False
        self.ratio[b], self.skipped[b], self.error[b] = 1.0, 0, 0.0
        return True

    def blocks(self, run, img, txt):
        compute = [self._should_compute(b) for b in range(self.branches)]
        rows = [self.rows(b) for b in range(self.branches) if compute[b]]
        if rows:
            part = slice(rows[0].start, rows[-1].stop)
            full = len(rows) == self.branches
            out_img, out_txt = run(img if full else img[part], txt if full else txt[part], 0, None,
                                   None if full else part)
        images, texts = [], []
        for b in range(self.branches):
            r = self.rows(b)
            if compute[b]:
                local = slice(r.start - part.start, r.stop - part.start)
                residual = out_img[local] - img[r]
                if self.setting.calibrate:
                    self.calibration[b].append(self._ratio(residual, self.previous[b]))
                self.previous[b] = residual
                images.append(out_img[local])
                texts.append(out_txt[local])
                self.count(b)
            else:  # the text stream is left as it came in, as the reference leaves it
                images.append(img[r] + self.previous[b])
                texts.append(txt[r])
        return _join(images), _join(texts)

    @staticmethod
    def _ratio(current: mx.array, previous: mx.array | None) -> float:
        if previous is None:
            return 1.0
        now = mx.linalg.norm(current.astype(mx.float32), axis=-1)
        before = mx.linalg.norm(previous.astype(mx.float32), axis=-1)
        return mx.mean(now / (before + 1e-8)).item()

    def finish(self) -> dict:
        stats = self.stats()
        if self.setting.calibrate:
            stats["mag_ratios"] = self.calibration[0]  # the conditional branch's, as a ratios file keeps them
        return stats


def _number(name: str, value, low: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        raise ValueError(f"{name} must be a finite number of at least {low}, got {value!r}")
    return float(value)


def _integer(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer of at least {low}, got {value!r}")
    return value


def parse(text: str):
    """A cache from the CLI's ``--cache`` value: ``first-block[:THRESHOLD]``, ``taylorseer[:INTERVAL]``,
    ``magcache:FILE[:THRESHOLD]`` or ``magcache-calibrate:FILE`` (then also the file to write)."""
    name, _, rest = text.partition(":")
    try:
        if name == "first-block":
            return FirstBlockCache(float(rest)) if rest else FirstBlockCache(), None
        if name == "taylorseer":
            return TaylorSeerCache(int(rest)) if rest else TaylorSeerCache(), None
        if name == "magcache":
            path, _, threshold = rest.rpartition(":") if rest.count(":") and _is_number(rest.rsplit(":", 1)[1]) \
                else (rest, "", "")
            if not path:
                raise ValueError("magcache needs its ratios file: --cache magcache:FILE (write one with "
                                 "--cache magcache-calibrate:FILE)")
            return MagCache.from_file(path, **({"threshold": float(threshold)} if threshold else {})), None
        if name == "magcache-calibrate":
            if not rest:
                raise ValueError("magcache-calibrate needs the file to write: --cache magcache-calibrate:FILE")
            return MagCache(calibrate=True), Path(rest).expanduser()
    except ValueError as e:
        raise ValueError(f"--cache {text}: {e}") from None
    raise ValueError(f"--cache {text}: unknown cache; use first-block[:THRESHOLD], taylorseer[:INTERVAL], "
                     "magcache:FILE[:THRESHOLD] or magcache-calibrate:FILE")


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
