"""Every bf16 CPU path against its fp32 twin, per native kernel variant: is bf16 ever
the slower one?

    python -m bench.twins                  # every variant this CPU runs
    python -m bench.twins avx512 avx2      # some of them

For each variant a child process (forced as in bench/isa_sweep.py: DECPO_NATIVE_ISA
and PyTorch capped at the same CPU class) times decpo (backend "auto", forward +
backward) on each case below in bf16 and in fp32, alternating the two dtypes call
by call (the order reversed every round), so that both see the same machine: on
this project's 2-core virtual machines one case's time moves by 10-20% between
whole benchmark runs, more than the differences asked about here. The verdict per
case is the median of the same-round ratios bf16 / fp32 (< 1: bf16 faster), with a
95% confidence interval for it that assumes nothing about the distribution of the
ratios (order statistics of the rounds: median_interval). A case is "bf16 slower"
only when the whole interval lies above 1, "bf16 faster" when it lies below 1, and a
"tie" otherwise: a median of 1.02 from rounds that range 0.7-1.5 says nothing about
which dtype is faster. With --processes K each variant runs in K processes and their
rounds are pooled (pool): the verdict then also needs every process's median on
its side of 1. Results go to bench/results/twins-cpu-<stamp>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

# name -> (bench/cases.py key, settings added to the case's extra); each case runs as
# given (bf16) and with fp32 inputs. The trainable head is token_logprobs with the
# weight needing a gradient: the forward without the one-pass hidden gradient, and a
# backward that recomputes every logit tile (three products per tile).
CASES = {
    "logprobs_from_logits/N=4096 V=32000": ("logprobs_from_logits/N=4096 V=32000", {}),
    "token_logprobs/N=256 D=512 V=32000": ("token_logprobs/N=256 D=512 V=32000", {}),
    "token_logprobs/trainable head N=256 D=512 V=32000": (
        "token_logprobs/N=256 D=512 V=32000",
        {"trainable_head": True},
    ),
    "decorrelation_penalty/4 groups x 512 D=4096": (
        "decorrelation_penalty/4 groups x 512 D=4096",
        {},
    ),
    "decorrelation_penalty/last token 8 layers x 64 D=14336": (
        "decorrelation_penalty/last token 8 layers x 64 D=14336",
        {},
    ),
}


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval for the median of `values`: the k-th
    smallest and k-th largest, with k the largest rank whose binomial tail,
    P(Binomial(n, 1/2) < k), is at most (1 - confidence) / 2 (n = 11 gives the 2nd
    smallest and 2nd largest, 98.8% coverage). Fewer than 6 values cannot reach 95%:
    the full range is returned."""
    x = sorted(values)
    n = len(x)
    assert n > 0
    k, tail = 0, 0.0  # tail = P(Binomial(n, 1/2) <= k - 1)
    while True:
        next_tail = tail + math.comb(n, k) / 2**n
        if next_tail > (1 - confidence) / 2:
            break
        k, tail = k + 1, next_tail
    k = max(k, 1)
    return x[k - 1], x[n - k]


def verdict(interval: tuple[float, float]) -> str:
    """bf16 slower / faster only when the whole interval of bf16 / fp32 says so."""
    low, high = interval
    return "bf16 slower" if low > 1.0 else "bf16 faster" if high < 1.0 else "tie"


def measure(rounds: int, only: tuple[str, ...] = ()) -> list[dict]:
    """This process's rows: per case (those whose key contains one of `only`, or
    all), both dtypes' median ms and the same-round ratios (pool adds the interval
    and the verdict)."""
    from bench.cases import build, cases_for
    from bench.measure import cpu_info, warm_memory

    warm_memory()
    by_key = {case.key: case for case in cases_for("cpu")}
    rows = []
    for case_name in [k for k in CASES if not only or any(o in k for o in only)]:
        key, extra = CASES[case_name]
        bf16_case = dataclasses.replace(by_key[key], extra={**by_key[key].extra, **extra})
        twins = {"bf16": bf16_case, "fp32": dataclasses.replace(bf16_case, dtype=torch.float32)}
        runs = {name: build(case, "decpo", "fwd+bwd", "cpu") for name, case in twins.items()}
        for setup, run in runs.values():
            run(setup())  # warm-up
        times: dict[str, list[float]] = {name: [] for name in runs}
        for i in range(rounds):
            # The order alternates round by round: whichever dtype runs first in a round
            # runs right after the other one's memory was freed.
            for name in list(runs) if i % 2 == 0 else list(runs)[::-1]:
                setup, run = runs[name]
                state = setup()
                start = time.perf_counter()
                run(state)
                times[name].append(time.perf_counter() - start)
        ratios = [b / f for b, f in zip(times["bf16"], times["fp32"], strict=True)]
        rows.append({
            "case": case_name, "rounds": rounds,
            "bf16_ms": 1e3 * statistics.median(times["bf16"]),
            "fp32_ms": 1e3 * statistics.median(times["fp32"]),
            "ratio_median": statistics.median(ratios),
            "ratio_range": [min(ratios), max(ratios)], "ratios": ratios, **cpu_info(),
        })  # fmt: skip
    return rows


def pool(runs: list[list[dict]]) -> list[dict]:
    """One row per case from the rows of one or more processes (same cases, same order):
    the ratios of all their rounds pooled for the median and its interval, and each
    process's own median kept. The interval of one process covers its rounds, not
    what differs between processes (one case's fp32 median moved from 39.5 to 50.4 ms
    between two processes, and its verdict with it), so the pooled verdict is "bf16
    slower" / "bf16 faster" only when the pooled interval says so and every process's
    median lies on the same side of 1; otherwise "tie"."""
    pooled = []
    for rows in zip(*runs, strict=True):
        ratios = [x for r in rows for x in r["ratios"]]
        medians = [r["ratio_median"] for r in rows]
        interval = median_interval(ratios)
        call = verdict(interval)
        if call == "bf16 slower" and min(medians) <= 1.0:
            call = "tie"
        if call == "bf16 faster" and max(medians) >= 1.0:
            call = "tie"
        pooled.append({
            **rows[0], "rounds": len(ratios), "processes": len(rows),
            "bf16_ms": statistics.median(r["bf16_ms"] for r in rows),
            "fp32_ms": statistics.median(r["fp32_ms"] for r in rows),
            "ratio_median": statistics.median(ratios), "process_medians": medians,
            "ratio_range": [min(ratios), max(ratios)], "ratio_interval95": list(interval),
            "verdict": call, "ratios": ratios,
        })  # fmt: skip
    return pooled


def run_variant(isa: str, rounds: int, only: tuple[str, ...] = ()) -> list[dict]:
    from bench.isa_sweep import EMULATION

    env = {**os.environ, **EMULATION[isa], "DECPO_NATIVE_ISA": isa}
    cmd = [sys.executable, "-m", "bench.twins", "--child", "--rounds", str(rounds)]
    if only:
        cmd += ["--cases", ",".join(only)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"the {isa} run failed:\n{done.stderr[-3000:]}", file=sys.stderr)
        return []
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    from decpo.native_backend import library

    parser = argparse.ArgumentParser(
        prog="python -m bench.twins",
        description="bf16 against fp32, alternating rounds, per native kernel variant.",
    )
    parser.add_argument("variants", nargs="*", metavar="VARIANT",
                        help=f"{' | '.join(library.ISAS)} (default: every one this CPU "
                        "runs)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=21, help="alternating rounds per case")
    parser.add_argument(
        "--cases", default="", help="comma-separated substrings of the case keys (default: all)"
    )
    parser.add_argument(
        "--processes", type=int, default=1,
        help="child processes per variant, their rounds pooled (see pool)",
    )  # fmt: skip
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    only = tuple(c for c in args.cases.split(",") if c)
    if args.child:
        print(json.dumps(measure(args.rounds, only)))
        return 0
    if args.rounds < 6:
        parser.error("--rounds must be at least 6 (a 95% interval for the median needs 6)")
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    if unmatched := [o for o in only if not any(o in key for key in CASES)]:
        parser.error(f"--cases {unmatched[0]!r} matches none of: {', '.join(CASES)}")
    if not library.is_available():
        parser.error(f"the native library is unavailable: {library.unavailable_reason()}")
    if unknown := [isa for isa in args.variants if isa not in library.ISAS]:
        parser.error(f"unknown variant {unknown[0]!r} (choose from {', '.join(library.ISAS)})")
    if cannot := [isa for isa in args.variants if not library.isa_runs(isa)]:
        parser.error(f"this CPU cannot run {', '.join(cannot)}")
    wanted = args.variants or [isa for isa in reversed(library.ISAS) if library.isa_runs(isa)]
    rows = []
    for isa in wanted:
        runs = [run_variant(isa, args.rounds, only) for _ in range(args.processes)]
        if all(runs):
            rows += pool(runs)
    from bench.render import RESULTS_DIR, environment

    stamp = datetime.datetime.now(datetime.timezone.utc)
    path = RESULTS_DIR / f"twins-cpu-{stamp:%Y%m%d-%H%M%S}.json"
    record = {**environment("cpu"), "date": stamp.isoformat(timespec="seconds"), "results": rows}
    path.write_text(json.dumps(record, indent=1))
    print("| variant | case | rounds | bf16 ms | fp32 ms | bf16 / fp32 median [95% interval] "
          "(range) | per process | verdict |")  # fmt: skip
    print("| --- | --- | ---: | ---: | ---: | --- | --- | --- |")
    for r in rows:
        low, high = r["ratio_range"]
        ci_low, ci_high = r["ratio_interval95"]
        each = " ".join(f"{m:.3f}" for m in r["process_medians"])
        print(f"| {r['native_isa']} | {r['case']} | {r['rounds']} | {r['bf16_ms']:.1f} | "
              f"{r['fp32_ms']:.1f} | {r['ratio_median']:.3f} [{ci_low:.3f}, {ci_high:.3f}] "
              f"({low:.2f}-{high:.2f}) | {each} | {r['verdict']} |")  # fmt: skip
    print(f"written to {path}")
    return 0 if rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
