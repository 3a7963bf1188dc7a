"""Where the time of decorrelation_penalty goes on CUDA, for the benchmark cases: wall
time per call and the CUDA kernels of one forward+backward under torch.profiler; with
--host, the host time of each layer of the call (public function, custom op, backend
launcher) and the functions it is spent in (cProfile); with --backward, the host time
of the backward's parts (the upstream scaling, the autograd engine) at the last-token
shape.

    python -m experiments.gpu_decorrelation_profile [--host] [--backward]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

import decpo
from decpo.ops import decorrelation as ops_decorrelation
from decpo.reference import eager_decorrelation_penalty
from decpo.triton_backend import decorrelation as triton_decorrelation

CASES = {  # name: (hidden shape, groups)
    "last token 8 layers x 64 D=14336": ((8, 64, 14336), 1),
    "16 groups x 1024 D=4096": ((16384, 4096), 16),
}


def host_us(fn: Callable[[], object], calls: int = 300) -> tuple[float, float]:
    """(host microseconds to enqueue one call, wall microseconds per call) over `calls`
    calls with no synchronization between them: when the first is close to the
    second, the host is the limit."""
    fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    enqueued = time.perf_counter()
    torch.cuda.synchronize()
    done = time.perf_counter()
    return (enqueued - started) / calls * 1e6, (done - started) / calls * 1e6


def host_breakdown(h: torch.Tensor, seg: torch.Tensor | None) -> None:
    """Host time of each layer of the call, then cProfile's top functions."""

    def public() -> None:
        h.grad = None
        decpo.decorrelation_penalty(h, segment_ids=seg).backward()

    layers = {
        "public fwd+bwd": public,
        "public fwd": lambda: decpo.decorrelation_penalty(h, segment_ids=seg),
        "custom op": lambda: torch.ops.decpo.decorrelation_penalty(
            h if h.dim() == 3 else h.unsqueeze(0), None, seg, True, False, "mean", "triton", True
        ),
        "backend launcher": lambda: triton_decorrelation.decorrelation_penalty(
            h if h.dim() == 3 else h.unsqueeze(0), None, seg, True, False, "mean", True
        ),
    }
    for name, fn in layers.items():
        host, wall = host_us(fn)
        print(f"   {name:18s} host {host:8.1f} us   wall {wall:8.1f} us per call")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(200):
        public()
    torch.cuda.synchronize()
    profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(25)
    print("\n".join(line for line in out.getvalue().splitlines()[:60] if line.strip()))


@triton.jit
def _scale_kernel(g_ptr, s_ptr, n, BLOCK: tl.constexpr):
    """g *= s in fp32, rounded once (s: a 0-dim fp32 tensor on the device)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(g_ptr + offs, mask=ok)
    s = tl.load(s_ptr)
    tl.store(g_ptr + offs, (g.to(tl.float32) * s).to(g.dtype), mask=ok)


def backward_parts() -> None:
    """Host time of the backward's parts at 8 x 64 x 14336 bf16."""
    g = torch.randn(8, 64, 14336, device="cuda", dtype=torch.bfloat16)
    s0 = torch.full((), 1.0, device="cuda")
    h = g.clone().requires_grad_(True)

    class NoWork(torch.autograd.Function):
        @staticmethod
        def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
            return s0.clone()

        @staticmethod
        def backward(ctx: object, grad_out: torch.Tensor) -> torch.Tensor:
            return g

    def no_work() -> None:
        h.grad = None
        NoWork.apply(h).backward()

    def cpp_nodes() -> None:
        h.grad = None
        h.sum(dtype=torch.float32).backward()

    def public() -> None:
        h.grad = None
        decpo.decorrelation_penalty(h).backward()

    def staged(stage: int) -> Callable[[], None]:
        """A Function with no forward work whose backward does the first `stage` steps
        of decpo's backward: 1 unpack the saved gradient, 2 + _last_use, 3 + the
        upstream scaling, 4 decpo's whole _backward (after its _setup_context)."""

        class Staged(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
                loss, grad = s0.clone(), g.clone()
                if stage == 4:
                    inputs = (x, None, None, True, False, "mean", "triton", True)
                    ops_decorrelation._setup_context(ctx, inputs, (loss, grad))
                else:
                    ctx.save_for_backward(grad)
                return loss

            @staticmethod
            def backward(ctx: Any, grad_loss: torch.Tensor) -> Any:
                if stage == 4:
                    return ops_decorrelation._backward(ctx, grad_loss, None)[0]
                (grad,) = ctx.saved_tensors
                if stage >= 2:
                    ops_decorrelation._last_use(grad, grad_loss, grad.dtype)
                if stage >= 3:
                    ops_decorrelation._times_fp32(grad, grad_loss, out=grad)
                return grad

        def run() -> None:
            h.grad = None
            Staged.apply(h).backward()

        return run

    eager = torch.compile(eager_decorrelation_penalty, dynamic=False)

    def compiled() -> None:
        h.grad = None
        eager(h).backward()

    def triton_scale() -> None:
        _scale_kernel[(triton.cdiv(g.numel(), 4096),)](g, s0, g.numel(), BLOCK=4096)

    parts = {
        "mul out=g, (1,1,1) fp32": lambda: torch.mul(g, s0.reshape(1, 1, 1), out=g),
        "mul_ 0-dim fp32": lambda: g.mul_(s0),
        "mul, (1,1,1) fp32, new": lambda: torch.mul(g, s0.reshape(1, 1, 1)),
        "triton scale kernel": triton_scale,
        "autograd Function, no work": no_work,
        "+ clone g, unpack saved": staged(1),
        "+ _last_use": staged(2),
        "+ upstream scaling": staged(3),
        "decpo's _setup_context/_backward": staged(4),
        "sum().backward(), C++": cpp_nodes,
        "public fwd": lambda: decpo.decorrelation_penalty(h),
        "public fwd+bwd": public,
        "torch.compile fwd+bwd": compiled,
    }
    for name, fn in parts.items():
        host, wall = host_us(fn)
        print(f"   {name:28s} host {host:8.1f} us   wall {wall:8.1f} us per call")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", action="store_true", help="host time per layer, cProfile")
    parser.add_argument("--backward", action="store_true", help="host time of backward parts")
    args = parser.parse_args()
    if args.backward:
        backward_parts()
        return
    for name, (shape, groups) in CASES.items():
        torch.manual_seed(0)
        h = torch.randn(*shape, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
        n = shape[-2]
        seg = torch.arange(n, device="cuda") // (n // groups) if groups > 1 else None

        def step(h=h, seg=seg) -> None:
            h.grad = None
            decpo.decorrelation_penalty(h, segment_ids=seg).backward()

        step()
        ms = do_bench(step, warmup=25, rep=200, return_mode="median")
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            step()
            torch.cuda.synchronize()
        print(f"== {name}: fwd+bwd {ms:.3f} ms (do_bench median)")
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14,
                                          max_name_column_width=50)  # fmt: skip
        print(table)
        if args.host:
            host_breakdown(h, seg)


if __name__ == "__main__":
    main()
