"""A `Run`: one request of a pipeline, iterated step by step, and what a run records of its phases.

The pipeline (`pipeline.QwenImagePipeline`) makes runs; a run holds the pipeline's lock while it runs, asks its
core loop for each step's latents on the MLX owner thread, and decodes at the end.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import mlx.core as mx

from . import runtime
from .conditioning import Conditioning, Request

if TYPE_CHECKING:
    from .pipeline import QwenImagePipeline


class Run:
    """One request. Iterating runs it: the conditioning, then one denoising step per item (the evaluated packed
    latents); `complete` runs what is left and decodes. ``stats`` holds each phase's seconds and peak memory.

    A run holds its pipeline (other runs wait) until it finishes or is closed (``close()``, or dropping it).
    """

    def __init__(self, pipe: "QwenImagePipeline", request: Request, schedule, low_memory: bool,
                 conditioning: Conditioning | None = None):
        self.pipe, self.request, self.schedule, self.low_memory = pipe, request, schedule, low_memory
        self.conditioning = conditioning  # prebuilt (`sample`); otherwise the request's builder makes it
        self.width, self.height = request.width, request.height
        self.total = schedule.steps
        self.done = 0
        self.latents: mx.array | None = None
        self.stats: dict = {}
        self.on_phase = None  # called with each phase's name as it starts (for progress lines)
        self._iterator = None

    def tell(self, phase: str):
        if self.on_phase is not None:
            self.on_phase(phase)

    def __iter__(self):
        if self._iterator is None:
            self._iterator = self._run()
        return self._iterator

    def __next__(self):
        return next(iter(self))

    def _run(self):
        with self.pipe._lock:
            steps = self.pipe._steps(self)
            try:
                while (x := runtime.call(next, steps, None)) is not None:
                    self.latents, self.done = x, self.done + 1
                    yield x
            finally:
                runtime.call(steps.close)

    def close(self):
        """Stop the run early; the pipeline is restored and free for other runs."""
        if self._iterator is not None:
            self._iterator.close()

    def complete(self, output: str = "pil", progress=None):
        """Run the remaining steps (``progress(done, total)`` after each) and decode: a list of images."""
        if output not in ("pil", "np"):
            raise ValueError(f"output must be 'pil' or 'np', got {output!r}")
        for _ in self:
            if progress is not None:
                progress(self.done, self.total)
        if self.done < self.total:
            raise RuntimeError(f"the run was closed after {self.done} of {self.total} steps")
        self.tell("decode")
        with self.pipe._lock:
            images = runtime.call(self.pipe._decode, self.latents, self.width, self.height, output, self.stats)
        if self.request.mask_crop is not None:  # the inpainted crop goes back into the whole picture
            from .inpaint import paste_back

            images = paste_back(self.request, images, output)
        return images


class NonFiniteError(RuntimeError):
    """A run produced NaN or infinite values; no picture is made from them."""


def check_finite(x: mx.array, what: str):
    if not mx.all(mx.isfinite(x)).item():
        raise NonFiniteError(f"{what} hold NaN or infinite values, so no picture was made; likely causes: a LoRA (try "
                             "it at a lower scale, or without it), a float16 overflow (use bfloat16), or a damaged "
                             "checkpoint (download or convert it again)")


def phase_start() -> float:
    mx.reset_peak_memory()
    return time.perf_counter()


def record_phase(stats: dict, name: str, start: float):
    stats[name] = {"seconds": time.perf_counter() - start, "peak_memory": mx.get_peak_memory()}
