"""The CPU op benchmarks once per native kernel variant, each in its own process with
the CPU forced down to that variant's class, so one machine measures what an AVX2 or
baseline user gets (decpo's kernels and PyTorch's own, eager and compiled):

    python -m bench.isa_sweep                      # every variant this CPU runs
    python -m bench.isa_sweep avx2 baseline        # some of them
    python -m bench.isa_sweep avx512bf16 --cases token_logprobs/fp32 --rounds 21

Per variant: DECPO_NATIVE_ISA selects decpo's kernels; ONEDNN_MAX_CPU_ISA,
ATEN_CPU_CAPABILITY and MKL_ENABLE_INSTRUCTIONS (plus MKL_CBWR on baseline, see
EMULATION) cap PyTorch's oneDNN, ATen and MKL kernels at the same class (on AVX2
PyTorch's bf16 matmul then runs at ~0.5 GFLOP/s, as on a real AVX2 CPU). Each run is
bench/test_ops.py on the cases below (headline fwd+bwd mode, median of 5 rounds
alternating between the providers of each case, no memory column: it does not depend
on the variant); its JSON (every
row carries cpu_features and native_isa) is saved as
bench/results/isa-cpu-<variant>-<stamp>.json and a summary table is printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.render import RESULTS_DIR, summarize

# What caps PyTorch at each variant's CPU class ({} : the machine as it is).
EMULATION = {
    "avx512bf16": {},
    "avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "ATEN_CPU_CAPABILITY": "avx512",
               "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "baseline": {"ONEDNN_MAX_CPU_ISA": "SSE41", "ATEN_CPU_CAPABILITY": "default",
                 "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "MKL_CBWR": "COMPATIBLE"},
}  # fmt: skip
# MKL on an AMD CPU runs one code path whatever MKL_ENABLE_INSTRUCTIONS says (a 2048^2
# fp32 matmul gives the same bits, at 140-180 GFLOP/s, under SSE4_2, AVX, AVX2 and
# AVX512); only MKL_CBWR=COMPATIBLE changes it, to MKL's SSE2 path (51-58 GFLOP/s on
# 2 cores, the class of the baseline variant). AVX2 and AVX-512 have the same FMA
# throughput on this CPU (2 x 256 bits per cycle), so the other caps need no such fix.
# Cases (substrings of bench/cases.py keys): every native op, bf16 and its fp32 twin;
# token_logprobs at the AVX2 report's shape (eager bf16 takes ~10 s a call there).
CASES = ("logprobs_from_logits/N=4096", "logprobs_from_logits/fp32", "decorrelation_penalty",
         "token_logprobs/N=256 D=512", "token_logprobs/fp32 N=256")  # fmt: skip


def run_variant(
    isa: str, root: Path, cases: tuple[str, ...] = CASES, rounds: int = 5
) -> Path | None:
    # A fresh torch.compile cache per variant: Inductor's cache key does not include
    # the capped CPU capability, and a kernel built under another cap crashes.
    cache = tempfile.mkdtemp(prefix=f"decpo-inductor-{isa}-")
    env = {**os.environ, **EMULATION[isa], "DECPO_NATIVE_ISA": isa,
           "TORCHINDUCTOR_CACHE_DIR": cache,
           "DECPO_BENCH_CASES": ",".join(cases), "DECPO_BENCH_MODES": "fwd+bwd",
           "DECPO_BENCH_MEMORY": "0", "DECPO_BENCH_ROUNDS": str(rounds),
           "DECPO_BENCH_INTERLEAVE": "1"}  # fmt: skip
    start = time.time()
    cmd = [sys.executable, "-m", "pytest", "bench/test_ops.py", "--benchmark-enable", "-q",
           "-p", "no:cacheprovider"]  # fmt: skip
    subprocess.run(cmd, cwd=root, env=env, check=False)
    made = [p for p in RESULTS_DIR.glob("ops-cpu-2*.json") if p.stat().st_mtime >= start]
    if not made:
        print(f"the {isa} run wrote no results (see its output above)", file=sys.stderr)
        return None
    stamp = datetime.datetime.now(datetime.timezone.utc)
    target = RESULTS_DIR / f"isa-cpu-{isa}-{stamp:%Y%m%d-%H%M%S}.json"
    max(made, key=lambda p: p.stat().st_mtime).rename(target)
    return target


def table(paths: list[Path]) -> list[str]:
    """Per variant and case: decpo's time, the best other provider's, and decpo's % of
    floor."""
    lines = ["| variant | case | decpo ms | best other | vs best other | % of floor |",
             "| --- | --- | ---: | --- | ---: | ---: |"]  # fmt: skip
    for path in paths:
        record = json.loads(path.read_text())
        rows = record["results"]
        summarize(rows)
        isa = rows[0].get("native_isa", "?") if rows else "?"
        for r in rows:
            if r["provider"] != "decpo":
                continue
            others = [o for o in rows if o["case"] == r["case"] and o["mode"] == r["mode"]
                      and o["provider"] not in ("decpo", "decpo-torch")]  # fmt: skip
            best = min(others, key=lambda o: o["median_ms"]) if others else None
            label = f"{best['provider']} {best['median_ms']:.1f} ms" if best else "-"
            lines.append(f"| {isa} | {r['op']} {r['case']} | {r['median_ms']:.1f} | {label} | "
                         f"{r['vs_best_other']:.3f}x | {r['pct_of_floor']:.0f}% |")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> None:
    from decpo.native_backend import library

    parser = argparse.ArgumentParser(
        prog="python -m bench.isa_sweep",
        description="The CPU op benchmarks once per native kernel variant, PyTorch capped "
        "at the same CPU class.",
    )
    parser.add_argument("variants", nargs="*", metavar="VARIANT",
                        help=f"{' | '.join(library.ISAS)} (default: every one this CPU "
                        "runs)")  # fmt: skip
    parser.add_argument("--cases", default=",".join(CASES),
                        help="comma-separated substrings of bench/cases.py keys (default: "
                        "every native op's cases above)")  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=5, help="alternating rounds per case (the median is reported)"
    )
    args = parser.parse_args(argv)
    unknown = [isa for isa in args.variants if isa not in library.ISAS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r} (choose from {', '.join(library.ISAS)})")
    cannot = [isa for isa in args.variants if not library.isa_runs(isa)]
    if cannot:
        parser.error(f"this CPU cannot run {', '.join(cannot)}")
    root = Path(__file__).resolve().parents[1]
    wanted = args.variants or [isa for isa in reversed(library.ISAS) if library.isa_runs(isa)]
    cases = tuple(c for c in args.cases.split(",") if c)
    paths = [run_variant(isa, root, cases, args.rounds) for isa in wanted]
    print("\n".join(table([p for p in paths if p is not None])))


if __name__ == "__main__":
    main()
