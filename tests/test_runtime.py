"""The MLX owner thread and the wired-memory limit of a run."""

import threading

import mlx.core as mx
import pytest

from mlx_qwen_image import runtime


def test_work_from_any_thread_runs_on_the_owner_thread_and_its_arrays_read_anywhere():
    made = runtime.call(lambda: (threading.current_thread().name, mx.arange(4) * 2))  # lazy, made on the owner
    assert made[0] == "mlx-qwen-image"
    assert made[1].tolist() == [0, 2, 4, 6]  # read in this thread
    out = {}

    def other():
        lazy = mx.ones(3) * 5  # this thread's own lazy array, evaluated before it crosses
        out["sum"] = runtime.call(lambda a: (a + made[1][:3]).sum().item(), lazy)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert out["sum"] == 15 + 6
    with pytest.raises(ZeroDivisionError):  # exceptions come back to the caller
        runtime.call(lambda: 1 / 0)
    assert runtime.call(lambda: runtime.call(lambda: 7)) == 7  # nested calls run inline


def test_wired_limit_is_raised_for_a_run_and_restored(monkeypatch):
    calls = []
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 48 * 2**30})
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: calls.append(n) or 7)
    monkeypatch.setattr(mx, "synchronize", lambda *a: None)
    with runtime.wired_limit():
        assert calls == [48 * 2**30]
    assert calls == [48 * 2**30, 7]  # the previous limit, restored
    with pytest.raises(RuntimeError):
        with runtime.wired_limit():
            raise RuntimeError("a failed run")
    assert calls[-1] == 7


def test_wired_limit_does_nothing_without_metal(monkeypatch):
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: pytest.fail("set_wired_limit called"))
    with runtime.wired_limit():
        pass
