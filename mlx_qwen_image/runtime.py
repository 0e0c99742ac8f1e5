"""Where MLX work runs: one owner thread per process, and the wired-memory limit of a run.

MLX 0.32 binds streams to threads: an array made lazily in one thread (a lazily loaded weight, a step's latents)
cannot be evaluated in another ("There is no Stream(cpu, 0) in current thread"), and compiled functions (mlx.nn's
activations among them) used from a thread that exits without releasing its streams can abort the process at
exit. So every pipeline does its MLX work on one long-lived thread, `call` hands work to it from any thread, and
its default streams are MLX's thread-unsafe streams (serialized by this thread), so that what it makes can still
be read by the caller's thread. At exit the thread releases its streams before the process ends.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import queue
import threading

import mlx.core as mx


def _devices() -> list:
    return [mx.cpu] + ([mx.gpu] if mx.is_available(mx.gpu) else [])


def _settle(values):
    """Evaluate the caller's own lazy arrays in the caller's thread, so the owner thread can use them."""
    arrays = [v for v in values if isinstance(v, mx.array)]
    for v in values:
        if isinstance(v, (list, tuple)):
            arrays += [a for a in v if isinstance(a, mx.array)]
    if arrays:
        mx.eval(arrays)


class OwnerThread:
    """A single thread that runs MLX work handed to it, one call at a time, in the order received."""

    def __init__(self, name: str = "mlx-qwen-image"):
        self.name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    @property
    def is_current(self) -> bool:
        return threading.current_thread() is self._thread

    def call(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the owner thread; its result or exception comes back to the caller."""
        if self.is_current:
            return fn(*args, **kwargs)
        _settle(list(args) + list(kwargs.values()))
        self._ensure_started()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((future, fn, args, kwargs))
        return future.result()

    def _ensure_started(self):
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()

    def _loop(self):
        for device in _devices():
            mx.set_default_stream(mx.new_thread_unsafe_stream(device))
        while True:
            job = self._queue.get()
            if job is None:
                break
            future, fn, args, kwargs = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except RuntimeError as e:
                future.set_exception(_explained(e))
            except BaseException as e:  # handed to the caller, who re-raises it
                future.set_exception(e)
            del job, future, fn, args, kwargs
        mx.synchronize()
        mx.clear_streams()

    def stop(self, timeout: float | None = None):
        """Finish the queued work, release the thread's streams and end it (at exit; a later call restarts it)."""
        thread = self._thread
        if thread is not None and thread.is_alive() and not self.is_current:
            self._queue.put(None)
            thread.join(timeout)


def _explained(error: RuntimeError) -> RuntimeError:
    if "in current thread" not in str(error):
        return error
    return RuntimeError(f"{error} A model of this pipeline holds an array made lazily in another thread; evaluate it "
                        "there first (mx.eval(model.parameters())), or change models through the pipeline")


OWNER = OwnerThread()
atexit.register(OWNER.stop)


def call(fn, *args, **kwargs):
    """Run ``fn`` on the process's MLX owner thread (see the module docstring)."""
    return OWNER.call(fn, *args, **kwargs)


@contextlib.contextmanager
def wired_limit():
    """On a Mac, keep the weights wired for the duration of a run: raise MLX's wired memory limit to the device's
    recommended working set (as mlx-lm does for large models), and restore it afterwards.

    Without it macOS may page a model that takes most of unified memory out between steps, and every step then
    reads it back from the SSD. Elsewhere (CPU, CUDA) this does nothing.
    """
    if not mx.metal.is_available():
        yield
        return
    limit = mx.device_info().get("max_recommended_working_set_size")
    if not limit:
        yield
        return
    previous = mx.set_wired_limit(int(limit))
    try:
        yield
    finally:
        mx.synchronize()
        mx.set_wired_limit(previous)
