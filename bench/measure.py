"""Device peaks, timing and peak memory for the benchmark suite."""

from __future__ import annotations

import functools
import gc
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@functools.cache
def peaks(device: str) -> dict[str, float]:
    """Measured bf16 matrix rate (FLOP/s) and copy bandwidth (bytes/s) of this device:
    the denominators of every "% of limit" in the reports."""
    dev = torch.device(device)
    size = 8192 if device == "cuda" else 2048
    a = torch.randn(size, size, device=dev, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=dev, dtype=torch.bfloat16)
    reps = 20 if device == "cuda" else 5
    a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    synchronize(device)
    flops = 2 * size**3 * reps / (time.perf_counter() - start)
    n = (1 << 30) if device == "cuda" else (1 << 27)  # elements of fp32: 4 GiB / 512 MiB
    src = torch.empty(n, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    synchronize(device)
    bandwidth = 2 * n * 4 * reps / (time.perf_counter() - start)
    del src, dst, a, b
    return {"bf16_matmul_flops": flops, "copy_bytes_per_s": bandwidth}


def cuda_time_ms(setup: Callable, run: Callable, rounds: int) -> list[float]:
    """Per-round times from CUDA events (setup excluded)."""
    times = []
    for _ in range(rounds):
        state = setup()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(state)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def peak_memory_here(op_key: str, provider: str, mode: str, device: str) -> dict[str, float]:
    """Memory one round needs beyond its inputs: on CUDA max_memory_allocated after a
    reset; on CPU the resident high-water mark (VmHWM) after resetting it through
    /proc/self/clear_refs. ru_maxrss is not used: it survives exec and misleads."""
    from bench.cases import build, cases_for

    case = next(c for c in cases_for(device) if c.key == op_key)
    setup, run = build(case, provider, mode, device)
    run(setup())  # warm-up: compilation, allocator pools, library loading
    synchronize(device)
    gc.collect()
    if device == "cuda":
        state = setup()  # frees the warm-up's gradient before the baseline is read
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run(state)
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - base) / 2**20
        return {"extra_mib": round(extra, 1)}
    state = setup()
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_mib("VmRSS")
    run(state)
    return {"extra_mib": round(_status_mib("VmHWM") - base, 1)}


def peak_memory(op_key: str, provider: str, mode: str, device: str) -> dict[str, float]:
    """peak_memory_here in a fresh interpreter on CPU (nothing else's peak counts);
    in this process on CUDA (the allocator's counters are exact)."""
    if device == "cuda":
        return peak_memory_here(op_key, provider, mode, device)
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-m", "bench.measure", op_key, provider, mode, device],
        cwd=root, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(peak_memory_here(*sys.argv[1:5])))
