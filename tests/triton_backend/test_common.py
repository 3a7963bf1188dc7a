"""The Triton launch point: recording, named configs and opt-in autotuning."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from decpo.triton_backend import common


def test_recording_captures_launches_instead_of_running():
    config = common.KernelConfig("c", {"BLOCK": 16}, 4, 2)

    class Kernel:  # launching it would fail: it must not be called
        def __getitem__(self, grid):
            raise AssertionError("launched while recording")

    with common.recording() as launches:
        common.launch(Kernel(), (3,), config, x=1)
    assert len(launches) == 1
    assert launches[0].grid == (3,) and launches[0].args == {"x": 1}
    assert launches[0].candidates == (config,)
    assert config.kwargs() == {"BLOCK": 16, "num_warps": 4, "num_stages": 2}


def test_pick_config_default_without_autotuning(monkeypatch):
    monkeypatch.delenv("DECPO_TRITON_AUTOTUNE", raising=False)
    a, b = common.KernelConfig("a", {"B": 1}), common.KernelConfig("b", {"B": 2})
    assert common.pick_config(("k",), a, (a, b), lambda c: None) is a


def test_pick_config_autotunes_once_per_key(monkeypatch):
    import triton.testing

    a, b = common.KernelConfig("a", {"B": 1}), common.KernelConfig("b", {"B": 2})
    timed = []

    def fake_bench(fn, warmup, rep):
        fn()
        return {"a": 2.0, "b": 1.0}[timed[-1].name]

    monkeypatch.setattr(common, "autotuning", lambda: True)
    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(common, "_tuned", {})
    assert common.pick_config(("k", 1), a, (a, b), timed.append) == b
    assert len(timed) == 2
    assert common.pick_config(("k", 1), a, (a, b), timed.append) == b  # cached
    assert len(timed) == 2
