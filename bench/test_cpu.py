"""CPU benchmark: every case of bench/cases.py x provider, forward + backward.

Run: make bench   (python -m pytest bench --benchmark-enable -q)
Time is wall time from pytest-benchmark; peak memory comes from a fresh process per
case (bench/peak_memory.py). The terminal summary prints each case's ratios against
eager and the DESIGN section 5 target beside them, and writes bench/results/.
"""

from __future__ import annotations

import pytest

from bench.cases import CASES, available, build
from bench.peak_memory import measure

RESULTS: list[dict] = []


@pytest.mark.parametrize(
    "case,provider",
    [(name, provider) for name, case in CASES.items() for provider in case.providers],
)
def test_cpu(benchmark, case, provider):
    if reason := available(provider):
        pytest.skip(reason)
    run = build(case, provider)
    benchmark.group = f"{case} fwd+bwd {CASES[case].shape}"
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    memory = measure(case, provider)
    benchmark.extra_info.update(memory)
    RESULTS.append(
        {"case": case, "provider": provider, "mean_ms": benchmark.stats.stats.mean * 1e3,
         "min_ms": benchmark.stats.stats.min * 1e3, **memory}
    )  # fmt: skip
