"""Peak resident memory of one benchmark case in a fresh process.

    python -m bench.peak_memory CASE PROVIDER   -> prints {"base_mib", "peak_mib", "extra_mib"}

VmHWM (the high-water mark of resident memory) is reset by writing 5 to
/proc/self/clear_refs after the inputs are built and one warm-up run is done, so
"extra_mib" is what one forward+backward needs beyond its inputs and the process
baseline, the gradient it returns included. ru_maxrss is not used: it survives exec and misleads.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def measure_here(case: str, provider: str) -> dict[str, float]:
    from bench.cases import build

    run = build(case, provider)
    run()  # warm-up: compiles, allocator pools, library loading
    run.leaf.grad = None  # the gradient the measured run writes counts as its memory
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_mib("VmRSS")
    run()
    peak = _status_mib("VmHWM")
    return {
        "base_mib": round(base, 1),
        "peak_mib": round(peak, 1),
        "extra_mib": round(peak - base, 1),
    }


def measure(case: str, provider: str) -> dict[str, float]:
    """measure_here in a fresh interpreter (nothing else's peak counts)."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-m", "bench.peak_memory", case, provider],
        cwd=root, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(measure_here(sys.argv[1], sys.argv[2])))
