"""Collects the op benchmark rows, prints ratios and writes bench/results/ at the end
of a benchmark session. bench/README.md is rendered from those files by an explicit
`python -m bench.render`, never as a side effect of running benchmarks."""

from __future__ import annotations

import datetime
import json

from bench.render import RESULTS_DIR, environment, summarize


def pytest_sessionstart(session):
    """CPU timing sessions first warm the process's memory (bench/measure.py:warm_memory)."""
    import torch

    from bench.measure import warm_memory

    benchmarking = session.config.getoption("benchmark_enable", default=False)
    if benchmarking and not torch.cuda.is_available():
        print(f"warmed 4 GiB of memory in {warm_memory():.1f} s")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from bench.measure import peaks
    from bench.test_ops import DEVICE, RESULTS

    if not RESULTS:
        return
    summarize(RESULTS)
    write = terminalreporter.write_line
    write("")
    write("| case | mode | provider | ms | vs eager | vs best other | % of floor | extra MiB |")
    write("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in RESULTS:
        write(
            f"| {r['op']} {r['case']} | {r['mode']} | {r['provider']} | {r['median_ms']:.2f} | "
            f"{r['vs_eager']:.2f}x | {r['vs_best_other']:.2f}x | {r['pct_of_floor']:.0f}% | "
            f"{r.get('extra_mib', '')} |"
        )
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    record = {**environment(DEVICE), "date": stamp.isoformat(timespec="seconds"),
              "peaks": peaks(DEVICE), "results": RESULTS}  # fmt: skip
    path = RESULTS_DIR / f"ops-{DEVICE}-{stamp:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(record, indent=1))
    (RESULTS_DIR / f"ops-{DEVICE}-partial.jsonl").unlink(missing_ok=True)
    write(f"results written to {path}; `python -m bench.render` updates bench/README.md")
