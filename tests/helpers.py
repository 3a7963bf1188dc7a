"""Shared test helpers: tolerances of DESIGN section 6 and error measures."""

from __future__ import annotations

import torch

# Relative Frobenius error allowed against a float64 reference (DESIGN section 6).
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


def upstream_like(t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random signed, uneven upstream gradient shaped like t (fp32)."""
    g = torch.randn(t.shape, generator=generator, dtype=torch.float64)
    scale = torch.rand(t.shape, generator=generator, dtype=torch.float64) * 3 + 0.1
    return (g * scale).to(torch.float32 if t.dtype != torch.float64 else torch.float64)
