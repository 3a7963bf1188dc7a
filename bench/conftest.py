from __future__ import annotations

import datetime
import json
import platform
import subprocess
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from bench.cases import CASES
    from bench.test_cpu import RESULTS

    if not RESULTS:
        return
    write = terminalreporter.write_line
    write("")
    write("| case | provider | mean ms | vs eager | extra peak MiB | vs eager | target |")
    write("| --- | --- | --- | --- | --- | --- | --- |")
    for case_name, case in CASES.items():
        rows = {r["provider"]: r for r in RESULTS if r["case"] == case_name}
        eager = rows.get("eager")
        for provider in case.providers:
            row = rows.get(provider)
            if row is None:
                continue
            speed = f"{eager['mean_ms'] / row['mean_ms']:.2f}x" if eager else "-"
            mem = (
                f"{row['extra_mib'] / eager['extra_mib']:.2f}"
                if eager and eager["extra_mib"] > 0
                else "-"
            )
            write(
                f"| {case_name} {case.shape} | {provider} | {row['mean_ms']:.1f} | {speed} | "
                f"{row['extra_mib']:.0f} | {mem} | {case.target} |"
            )
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    record = {
        "device": f"CPU {_cpu_name()}, {torch.get_num_threads()} threads",
        "date": stamp.isoformat(timespec="seconds"),
        "commit": _commit(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "results": RESULTS,
    }
    path = RESULTS_DIR / f"cpu-{stamp:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(record, indent=1))
    write(f"results written to {path.relative_to(RESULTS_DIR.parents[1])}")
