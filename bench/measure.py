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


def _best_rate(work: float, run: Callable[[], object], device: str, reps: int) -> float:
    """work / the fastest of `reps` timings of run() (after one untimed call). Best, not
    mean: on this project's virtual machines single timings of the same call vary by
    up to 2x, and a floor taken from a slow timing would put kernels above 100% of it."""
    run()
    synchronize(device)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        run()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return work / best


def _matmul_rate(device: str, dtype: torch.dtype, size: int, reps: int) -> float:
    dev = torch.device(device)
    a = torch.randn(size, size, device=dev, dtype=dtype)
    b = torch.randn(size, size, device=dev, dtype=dtype)
    return _best_rate(2 * size**3, lambda: a @ b, device, reps)


def warm_memory(gib: float = 4.0) -> float:
    """Touch `gib` GiB once and free it; returns the seconds it took. On this project's
    virtual machines the first touch of guest memory the host has not backed yet is
    slow: a fresh 262 MB output (logprobs_from_logits' bf16 gradient at N=4096,
    V=32000) took 235-460 ms in a process's first rounds and 37 ms once warm, and
    4 GiB touched once took 5.4 s. Without this, whichever provider runs a case first
    pays for the host's page faults (decpo, listed first). The kernel reuses the freed
    pages for the allocations that follow."""
    start = time.perf_counter()
    block = torch.ones(int(gib * (1 << 28)))  # (gib * 2^28,) fp32
    del block
    return time.perf_counter() - start


def fresh_page_rate(reps: int = 10) -> float:
    """Bytes per second at which this machine hands out fresh zeroed memory: the time
    to fill a new 256 MiB tensor (huge pages advised through the native library, as
    its large outputs are) minus the time to fill it again once mapped, best of `reps`
    each. A gradient of bench/cases.py:FRESH_PAGES_MIN_BYTES or more returned by any
    provider pays this on top of its own writes (bench/cases.py:floor_seconds)."""
    from decpo.native_backend import library

    n = 1 << 26  # fp32 elements: 256 MiB
    fresh = reused = float("inf")
    for _ in range(reps):
        t = torch.empty(n)
        library.library().decpo_advise_huge_pages(t.data_ptr(), n * 4)
        start = time.perf_counter()
        t.fill_(1.0)
        fresh = min(fresh, time.perf_counter() - start)
        start = time.perf_counter()
        t.fill_(2.0)
        reused = min(reused, time.perf_counter() - start)
        del t
    return n * 4 / max(fresh - reused, 1e-9)


def cpu_info() -> dict:
    """The CPU's capabilities and the native kernel variant in use (from the native
    library's own detection), and the environment that forces lesser ones: recorded
    with every CPU result. {} when the native library is unavailable."""
    import os

    from decpo.native_backend import library

    if not library.is_available():
        return {}
    forced = ("DECPO_NATIVE_ISA", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY",
              "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")  # fmt: skip
    return {"cpu_features": library.cpu_features(), "native_isa": library.active_isa(),
            "native_bf16_dot": library.native_bf16_dot(),
            "forced": {k: os.environ[k] for k in forced if k in os.environ}}  # fmt: skip


@functools.cache
def peaks(device: str, repeats: int = 3) -> dict[str, float]:
    """The best of `repeats` measurements (seconds apart) of each of _peaks' rates: on
    the 2-core virtual machines one measurement of the exp rate ranged 4.9-9.4 G/s and
    of the bf16 matmul rate 243-391 GFLOP/s, as a core was taken away for a while;
    floors must come from the rates the machine reaches, or kernels read over 100%."""
    runs = [_peaks(device) for _ in range(repeats)]
    return {key: max(run[key] for run in runs) for key in runs[0]}


def _peaks(device: str) -> dict[str, float]:
    """Measured matrix rates (FLOP/s, bf16 and fp32), copy bandwidth (bytes/s) and, on
    CPU, the native kernels' exp rates (exps/s, decpo.native_backend.library.exp_rate:
    the 1-ulp exp, and the bf16-accurate one a bf16 gradient takes)
    and the rate at which fresh pages are zeroed (fresh_page_rate):
    the denominators of every "% of floor" in the reports. Under a forced lesser CPU
    (bench/isa_sweep.py) they are what that CPU class gets: its bf16 matmul can be
    slower than fp32, and floors then use the faster of the two."""
    dev = torch.device(device)
    size = 8192 if device == "cuda" else 2048
    reps = 20 if device == "cuda" else 10
    # A CPU without bf16 dot products crawls through bf16 matmuls (~0.5 GFLOP/s at
    # 2048^2, a few GFLOP/s at 512^2 where the operands sit in cache; 100+ with bf16
    # dot products): a small probe first, so that measuring it does not take minutes
    # (11 timings of a 2048^2 bf16 matmul at 0.5 GFLOP/s: 6 minutes).
    crawls = device == "cpu" and _matmul_rate(device, torch.bfloat16, 512, 1) < 20e9
    flops = _matmul_rate(device, torch.bfloat16, 512 if crawls else size, 1 if crawls else reps)
    fp32_flops = _matmul_rate(device, torch.float32, size, reps)
    n = (1 << 30) if device == "cuda" else (1 << 27)  # elements of fp32: 4 GiB / 512 MiB
    src = torch.empty(n, device=dev)
    dst = torch.empty_like(src)
    bandwidth = _best_rate(2 * n * 4, lambda: dst.copy_(src), device, reps)  # read + write
    out = {"bf16_matmul_flops": flops, "fp32_matmul_flops": fp32_flops,
           "copy_bytes_per_s": bandwidth}  # fmt: skip
    if device == "cpu":
        from decpo.native_backend import library

        if library.is_available():
            out["native_exp_per_s"] = library.exp_rate()
            out["native_exp_bf16_per_s"] = library.exp_rate(bf16=True)
            out["fresh_page_bytes_per_s"] = fresh_page_rate()
    return out


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
