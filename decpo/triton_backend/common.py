"""Helpers shared by the Triton kernels: interpreter-safe dot and cast, and the one
place every kernel is launched from (so `python -m bench.kernel_stats` can record
the launches a launcher makes and compile exactly those for the GPU, without one).

Block configurations are `KernelConfig`s: a small named set per kernel, one default
per shape class. With DECPO_TRITON_AUTOTUNE=1 on a GPU, `pick_config` times the
named set once per (kernel, key) and keeps the fastest; otherwise the default runs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl

from decpo.numerics import interpreting


@dataclass(frozen=True)
class KernelConfig:
    """Block sizes (constexpr keyword arguments) and launch options of one variant."""

    name: str
    blocks: dict[str, int]
    num_warps: int = 4
    num_stages: int = 3

    def __hash__(self) -> int:
        return hash(
            (self.name, tuple(sorted(self.blocks.items())), self.num_warps, self.num_stages)
        )

    def kwargs(self) -> dict[str, Any]:
        return {**self.blocks, "num_warps": self.num_warps, "num_stages": self.num_stages}


@dataclass
class Launch:
    """One kernel launch as a launcher made it: kernel, grid, keyword arguments."""

    kernel: Any
    grid: tuple[int, ...]
    args: dict[str, Any]
    config: KernelConfig
    # Every config the launcher could have picked for this launch (autotuning set).
    candidates: tuple[KernelConfig, ...] = field(default_factory=tuple)


_recorder: list[Launch] | None = None


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Within the block, `launch` records instead of running (the kernels' outputs stay
    unwritten). Used by bench.kernel_stats to see what the launchers launch."""
    global _recorder
    previous, _recorder = _recorder, []
    try:
        yield _recorder
    finally:
        _recorder = previous


def launch(
    kernel: Any,
    grid: tuple[int, ...],
    config: KernelConfig,
    candidates: tuple[KernelConfig, ...] = (),
    **args: Any,
) -> None:
    """kernel[grid](**args, **config) with keyword arguments only, or record it."""
    if _recorder is not None:
        _recorder.append(Launch(kernel, grid, args, config, candidates or (config,)))
        return
    kernel[grid](**args, **config.kwargs())


_tuned: dict[tuple[Any, ...], KernelConfig] = {}


def autotuning() -> bool:
    return os.environ.get("DECPO_TRITON_AUTOTUNE") == "1" and not interpreting()


def pick_config(
    key: tuple[Any, ...],
    default: KernelConfig,
    candidates: tuple[KernelConfig, ...],
    run: Callable[[KernelConfig], None],
) -> KernelConfig:
    """The default config, or with DECPO_TRITON_AUTOTUNE=1 the fastest of `candidates`
    for this key (timed once with triton.testing.do_bench, then cached). `run(config)`
    must be side-effect free apart from its own scratch outputs."""
    if not autotuning() or _recorder is not None:
        return default
    if key not in _tuned:
        from triton.testing import do_bench

        times = {c: do_bench(lambda c=c: run(c), warmup=5, rep=20) for c in candidates}
        _tuned[key] = min(times, key=times.__getitem__)
    return _tuned[key]


def launch_tuned(
    kernel: Any,
    key: tuple[Any, ...],
    default: KernelConfig,
    candidates: tuple[KernelConfig, ...],
    grid: Callable[[KernelConfig], tuple[int, ...]],
    **args: Any,
) -> None:
    """Launch with the config `pick_config` chooses; grid(config) sizes the grid."""

    def run(config: KernelConfig) -> None:
        launch(kernel, grid(config), config, **args)

    config = pick_config(key, default, candidates, run)
    launch(kernel, grid(config), config, candidates, **args)


def host_table(
    values: list, dtype: torch.dtype, device: torch.device, transpose: bool = False
) -> torch.Tensor:
    """A small index or size table built on the host (rows of `values`; transposed,
    one row per field, with `transpose`), on `device` without a host sync: staged
    through pinned memory and copied asynchronously on CUDA. A plain
    torch.tensor(values, device="cuda") waits for all the GPU work queued before it
    (on an H100 the decorrelation launcher's tables held a 1 ms call at 3-4 ms)."""
    host = torch.tensor(values, dtype=dtype, device="cpu")
    if transpose:
        host = host.T.contiguous()
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


@triton.jit
def dot(a, b, acc, INTERPRET: tl.constexpr):
    """acc + a @ b with fp32 accumulation. Under the interpreter, bf16/fp16 operands
    are upcast first: Triton 3.x's interpreter multiplies their raw bit patterns
    (triton-lang/triton#11584). On the GPU the operands stay in their dtype (tensor
    cores); fp32 operands use IEEE fp32 products, not TF32, so fp32 inputs keep fp32
    accuracy."""
    if INTERPRET:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """x.to(dtype) rounding to nearest even. Triton 3.x's interpreter truncates fp32 ->
    bfloat16 (a biased error of up to 2^-8); round the bits first there. The GPU
    rounds to nearest even by itself."""
    if INTERPRET:  # noqa: SIM102 (nested constexpr conditions compile everywhere)
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(dtype)
