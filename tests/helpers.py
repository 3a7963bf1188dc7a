"""Shared test helpers: the backend matrix and its skips, the tolerances of
docs/design.md ("Numerics contract"), error measures, and decpo.train runs (metrics
rows, 2-rank torchrun, row comparison)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from decpo import backend
from decpo.train import METRIC_KEYS

ROOT = Path(__file__).resolve().parents[1]

# The device the op tests run on: cpu (CI), or cuda on a GPU machine
# (DECPO_TEST_DEVICE=cuda; tests/conftest.py makes it torch's default device, so
# every tensor a test builds lands there and backend availability is asked for it).
DEVICE = torch.device(os.environ.get("DECPO_TEST_DEVICE", "cpu"))
# Set in CI: the native library must build and load (tests/test_native.py fails
# instead of skipping).
NATIVE_REQUIRED = os.environ.get("DECPO_REQUIRE_NATIVE") == "1"


def unavailable(name: str, dtype: torch.dtype = torch.float32) -> str:
    """Why backend `name` cannot run on DEVICE tensors of `dtype` here ('' when it
    can). Triton runs on CPU under TRITON_INTERPRET=1, which tests/conftest.py sets
    when there is no GPU."""
    return backend.AVAILABILITY[name](DEVICE, dtype)


def backends(op: str) -> list:
    """pytest parameters: every backend the registry lists for `op`, in the order
    torch, native, triton, each skipped (with the reason) where it cannot run here."""
    params = []
    for name in ("torch", "native", "triton"):
        if name in backend.OPS[op].backends:
            reason = unavailable(name)
            params.append(pytest.param(name, marks=pytest.mark.skipif(bool(reason), reason=reason)))
    return params


def skip_unless_runs(name: str, dtype: torch.dtype) -> None:
    """Inside a test: skip when backend `name` does not read `dtype` (or cannot run)."""
    if reason := unavailable(name, dtype):
        pytest.skip(f"{name}: {reason}")


# Relative Frobenius error allowed against a float64 reference (docs/design.md,
# "Numerics contract").
TOL = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 1e-2,
}


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    """||actual - expected||_F / max(||expected||_F, floor) in float64; `floor` keeps
    results that are exactly zero in float64 (and rounding noise at the dtype) from
    dividing by nothing."""
    diff = (actual.detach().double() - expected.detach().double()).norm().item()
    scale = max(expected.detach().double().norm().item(), floor)
    return diff / scale if scale > 0 else diff


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype,
    what: str = "",
    eager: torch.Tensor | None = None,
    floor: float = 1e-3,
) -> None:
    """actual within TOL[dtype] of the float64 `expected` (relative Frobenius error,
    with `floor` as the smallest scale); when `eager` (PyTorch's own result at the same
    dtype) is given, also no worse than it plus a small slack."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = rel_err(actual, expected, floor)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]:.0e} ({dtype})"
    if eager is not None:
        eager_err = rel_err(eager, expected, floor)
        slack = TOL[dtype] / 4
        assert err <= eager_err + slack, (
            f"{what}: error {err:.3g} worse than PyTorch's own {eager_err:.3g} + {slack:.0e}"
        )


def generator(seed: int) -> torch.Generator:
    """A seeded generator on the test device (random draws must match its device)."""
    return torch.Generator(device=DEVICE).manual_seed(seed)


def upstream_like(t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random signed, uneven upstream gradient shaped like t (fp32)."""
    g = torch.randn(t.shape, generator=generator, dtype=torch.float64)
    scale = torch.rand(t.shape, generator=generator, dtype=torch.float64) * 3 + 0.1
    return (g * scale).to(torch.float32 if t.dtype != torch.float64 else torch.float64)


# ---------------------------------------------------------------- decpo.train runs


def train_rows(out: Path) -> list[dict]:
    """The training rows of a run's metrics.jsonl (one per optimizer step)."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def torchrun_train(args: list[str], port: int) -> None:
    """python -m decpo.train with 2 gloo ranks on CPU (one thread each); fails the test
    with the end of stderr unless it exits 0."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(port), "-m", "decpo.train", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def assert_same_rows(
    a: list[dict], b: list[dict], keys: tuple[str, ...] = METRIC_KEYS, rel: float = 1e-4,
    abs: float = 1e-5,
) -> None:  # fmt: skip
    """Two runs logged the same steps and the same metrics to tolerance."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key in keys:
            assert rb[key] == pytest.approx(ra[key], rel=rel, abs=abs), (ra["step"], key)
