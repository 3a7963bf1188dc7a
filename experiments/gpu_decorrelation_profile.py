"""Where the time of decorrelation_penalty goes on CUDA, for the benchmark cases: wall
time per call and the CUDA kernels of one forward+backward under torch.profiler; with
--host, the host time of each layer of the call (public function, custom op, backend
launcher) and the functions it is spent in (cProfile).

    python -m experiments.gpu_decorrelation_profile [--host]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from collections.abc import Callable

import torch
from triton.testing import do_bench

import decpo
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", action="store_true", help="host time per layer, cProfile")
    args = parser.parse_args()
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
