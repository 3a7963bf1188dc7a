"""decpo's CPU token_logprobs (backend "auto", forward+backward) against the torch
backend's logprobs.py of an older commit, in alternating calls in one process (the
order reversed every round), so that both see the same machine:

    python -m experiments.token_logprobs_ab aa591cb                 # fp32 N=256 D=512
    python -m experiments.token_logprobs_ab aa591cb --dtype bf16 --case "Llama-2-7B N=512"

Both the native and the torch backend call decpo.torch_backend.logprobs.token_logprobs,
which is swapped call by call. Prints each side's median and best, and the median of
the same-round ratios new / old. Caps and variants are set as in bench/isa_sweep.py
(for instance DECPO_NATIVE_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import statistics
import subprocess
import tempfile
import time
import types
from pathlib import Path

import torch

import decpo.torch_backend.logprobs as current
from bench.cases import build, cases_for
from bench.measure import warm_memory

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def old_module(rev: str) -> types.ModuleType:
    """decpo/torch_backend/logprobs.py as of `rev`, loaded as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{rev}:decpo/torch_backend/logprobs.py"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp(prefix="decpo-ab-")) / "old_logprobs.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_logprobs", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="the commit to compare with")
    parser.add_argument("--case", default="N=256 D=512 V=32000", help="a token_logprobs case")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)

    warm_memory()
    cases = {c.key: c for c in cases_for("cpu")}
    case = dataclasses.replace(cases[f"token_logprobs/{args.case}"], dtype=DTYPES[args.dtype])
    setup, run = build(case, "decpo", "fwd+bwd", "cpu")
    impls = {"old": old_module(args.rev).token_logprobs, "new": current.token_logprobs}
    times: dict[str, list[float]] = {name: [] for name in impls}
    try:
        for name in impls:  # warm-up
            current.token_logprobs = impls[name]
            run(setup())
        for i in range(args.rounds):
            for name in list(impls) if i % 2 == 0 else list(impls)[::-1]:
                current.token_logprobs = impls[name]
                state = setup()
                start = time.perf_counter()
                run(state)
                times[name].append(time.perf_counter() - start)
    finally:
        current.token_logprobs = impls["new"]
    for name, t in times.items():
        print(f"{name}: median {1e3 * statistics.median(t):.1f} ms, best {1e3 * min(t):.1f} ms")
    ratios = [n / o for n, o in zip(times["new"], times["old"], strict=True)]
    print(f"new / old, median of same-round ratios: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
