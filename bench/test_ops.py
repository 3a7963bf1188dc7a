"""The op benchmarks: every case of bench/cases.py x provider x mode on this device.

CPU: python -m pytest bench/test_ops.py --benchmark-enable   (make bench)
GPU: bash bench/run_gpu.sh
Times come from pytest-benchmark's wall time on CPU (or, with
DECPO_BENCH_INTERLEAVE=1, from rounds alternating between the providers: see
interleaved_seconds); on CUDA the reported time is the median of CUDA-event times
(pytest-benchmark's own rounds end with a synchronize). Every row is also appended
to bench/results/ops-<device>-partial.jsonl as it is measured, so a run cut off by a
time limit keeps what it measured. Peak memory comes from a fresh process per case
on CPU and from the CUDA allocator on GPU. The session's summary table, the JSON
under bench/results/ and bench/README.md are written by bench/conftest.py.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import pytest
import torch

from bench.cases import Case, available, build, cases_for, floor_seconds, modes_for, work
from bench.measure import cpu_info, cuda_time_ms, peak_memory, peaks, synchronize
from bench.render import RESULTS_DIR

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RESULTS: list[dict] = []
# Optional subsets (bench/isa_sweep.py uses them): DECPO_BENCH_CASES, comma-separated
# substrings of the case key; DECPO_BENCH_MODES, comma-separated modes;
# DECPO_BENCH_ROUNDS, timed rounds per row (default 10 on CUDA, 3 on CPU).
_CASES = [c for c in os.environ.get("DECPO_BENCH_CASES", "").split(",") if c]
_MODES = [m for m in os.environ.get("DECPO_BENCH_MODES", "").split(",") if m]
PARAMS = [
    pytest.param(case, provider, mode, id=f"{case.key}|{provider}|{mode}")
    for case in cases_for(DEVICE)
    if not _CASES or any(c in case.key for c in _CASES)
    for provider in case.providers
    for mode in modes_for(case, provider)
    if not _MODES or mode in _MODES
]
# The CPU's capabilities and the native kernel variant, recorded with every row.
CPU = cpu_info() if DEVICE == "cpu" else {}
# DECPO_BENCH_INTERLEAVE=1 (CPU; bench/isa_sweep.py sets it): the providers of one
# (case, mode) are timed together in alternating rounds, each round in a rotated order,
# and each row reports its provider's median. Timed one provider after another, a slow
# spell of a shared machine (whole-case times here move 10-20% between runs, single
# rounds up to 2x) lands on whichever provider it overlaps: in one sweep it put fp32
# token_logprobs at 0.74x torch.compile, where alternating rounds of the same two
# measured decpo 13% faster.
INTERLEAVE = os.environ.get("DECPO_BENCH_INTERLEAVE") == "1" and DEVICE == "cpu"
_INTERLEAVED: dict[tuple[str, str], dict[str, list[float]]] = {}


def interleaved_seconds(case: Case, mode: str, rounds: int) -> dict[str, list[float]]:
    """Per provider of the case (those available here and timed in this mode), the
    seconds of `rounds` alternating rounds after one untimed warm-up round each."""
    key = (case.key, mode)
    if key not in _INTERLEAVED:
        runners = {
            provider: build(case, provider, mode, DEVICE)
            for provider in case.providers
            if mode in modes_for(case, provider) and not available(provider, DEVICE)
        }
        for setup, run in runners.values():
            run(setup())
        names = list(runners)
        seconds: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                setup, run = runners[name]
                state = setup()
                start = time.perf_counter()
                run(state)
                seconds[name].append(time.perf_counter() - start)
        _INTERLEAVED[key] = seconds
    return _INTERLEAVED[key]


@pytest.mark.parametrize("case,provider,mode", PARAMS)
def test_op(benchmark, case, provider, mode):
    if reason := available(provider, DEVICE):
        pytest.skip(reason)
    benchmark.group = f"{case.key} {mode}"
    rounds = int(os.environ.get("DECPO_BENCH_ROUNDS", 10 if DEVICE == "cuda" else 3))
    if INTERLEAVE:
        seconds = statistics.median(interleaved_seconds(case, mode, rounds)[provider])
    else:
        setup, run = build(case, provider, mode, DEVICE)

        def setup_round():
            return (setup(),), {}

        def timed(state):
            run(state)
            synchronize(DEVICE)

        benchmark.pedantic(timed, setup=setup_round, rounds=rounds, warmup_rounds=1)
        seconds = benchmark.stats.stats.median
        if DEVICE == "cuda":
            seconds = statistics.median(cuda_time_ms(setup, run, rounds)) / 1e3
    flops, nbytes = work(case, mode, case.dtype_bytes)
    peak = peaks(DEVICE)
    floor = floor_seconds(case, mode, peak)
    # Peak memory of the headline mode, from a fresh process on CPU (DECPO_BENCH_MEMORY=0
    # skips it: bench/isa_sweep.py measures speed per variant, memory does not change).
    measure = mode == "fwd+bwd" and os.environ.get("DECPO_BENCH_MEMORY") != "0"
    memory = peak_memory(case.key, provider, mode, DEVICE) if measure else {}
    row = {
        "op": case.op, "case": case.name, "provider": provider, "mode": mode,
        "median_ms": seconds * 1e3, "flops": flops, "bytes": nbytes,
        "floor_ms": floor * 1e3, "pct_of_floor": 100 * floor / seconds,
        "tflops": flops / seconds / 1e12, "timing": "interleaved" if INTERLEAVE else "per row",
        **memory, **CPU,
    }  # fmt: skip
    benchmark.extra_info.update(row)
    RESULTS.append(row)
    RESULTS_DIR.mkdir(exist_ok=True)
    with open(RESULTS_DIR / f"ops-{DEVICE}-partial.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
