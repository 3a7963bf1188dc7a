"""Compile every Triton kernel exactly as decpo's launchers launch it, for Hopper
(sm_90a), with no GPU; print what the GPU compiler made of it; predict run times.

How: each Triton module's `gate_cases()` calls its own launchers on CPU tensors of
representative shapes inside `common.recording()`, so the launches are recorded
(kernel, grid, keyword arguments, block config, autotuning candidates) instead of
run. Each recorded launch, and every autotuning candidate of it, is then bound by
Triton's own JIT binder for an sm_90 target (so it gets the same specialisations a
real launch gets: integer arguments equal to 1 become constants, pointers and
integers divisible by 16 get tt.divisibility=16), compiled to PTX and cubin by
Triton, and the PTX is assembled once more by Triton's ptxas with `-v` for the
register, spill and shared-memory report.

The gate (tests/triton_backend/test_kernel_gate.py runs it in CI) fails on:
- any register spill (ptxas "bytes spill stores/loads" > 0);
- a bf16/fp16 tl.dot that is not a wgmma (Hopper tensor-core MMA) in the PTX;
- a bf16/fp16 matmul kernel whose operand loads use neither cp.async nor TMA
  (no software pipelining into shared memory).

    python -m bench.kernel_stats                 # table + bench/results/kernel-stats-sm90.json
    python -m bench.kernel_stats --roofline      # predicted H100/H200 time per headline case
    python -m bench.kernel_stats --gate          # exit 1 if any variant breaks a rule

Run it without TRITON_INTERPRET (the kernels must be compiled, not interpreted).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("bench.kernel_stats compiles kernels: run it without TRITON_INTERPRET=1")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bench.render import git_commit
from decpo.triton_backend import common

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# bf16 dense tensor-core peak and HBM bandwidth: the H100 SXM's published figures;
# for the H200, the peaks measured on the H200s this project benchmarks on.
DEVICES = {
    "H100": {"tflops": 989.0, "tbps": 3.35, "sms": 132, "smem_kib": 228, "regs": 65536},
    "H200": {"tflops": 790.0, "tbps": 4.3, "sms": 132, "smem_kib": 228, "regs": 65536},
}


@dataclass
class VariantStats:
    case: str
    kernel: str
    config: str
    shape_class: str
    dtype: str
    launched: bool  # the launcher's own pick (False: an autotuning candidate)
    num_warps: int
    num_stages: int
    grid: tuple[int, ...]
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    ctas_per_sm: int
    dots: int  # tt.dot ops in the Triton IR
    wgmma: bool
    cp_async: bool
    tma: bool
    low_precision: bool  # bf16/fp16 operands
    problems: list[str]


def _target(arch: int) -> GPUTarget:
    return GPUTarget("cuda", arch, 32)


def _unwrap(kernel: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The JITFunction under @triton.heuristics, with the heuristics' values added
    to the arguments as a launch adds them."""
    from triton.runtime.autotuner import Heuristics

    while isinstance(kernel, Heuristics):
        kwargs = {**kwargs, **{k: h(kwargs) for k, h in kernel.values.items()}}
        kernel = kernel.fn
    return kernel, kwargs


def _jit_fn(kernel: Any) -> Any:
    """The JITFunction under any @triton.heuristics / @triton.autotune wrappers."""
    while not hasattr(kernel, "params"):
        kernel = kernel.fn
    return kernel


def _bind(kernel: Any, args: dict[str, Any], config: common.KernelConfig, arch: int):
    """signature, constexprs, attrs and options exactly as the JIT derives them."""
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(_target(arch))
    kernel, kwargs = _unwrap(kernel, {**args, **config.kwargs()})
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(**kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound_args, specialization, options
    )
    return signature, constexprs, attrs, options


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from `ptxas -v`."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path if _takes_arch(get_ptxas) else get_ptxas().path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run(
            [ptxas, "-v", f"--gpu-name=sm_{arch}a", str(src), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    log = out.stderr + out.stdout
    regs = max((int(x) for x in re.findall(r"Used (\d+) registers", log)), default=0)
    stores = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log))
    loads = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", log))
    return regs, stores, loads


def _takes_arch(fn: Callable[..., Any]) -> bool:
    import inspect

    return len(inspect.signature(fn).parameters) > 0


@dataclass
class Job:
    """One variant to compile: the JIT's binding of a recorded launch."""

    case: str
    shape_class: str
    kernel: Any  # the JITFunction
    config: common.KernelConfig
    launched: bool
    grid: tuple[int, ...]
    signature: dict[str, Any]
    constexprs: dict[Any, Any]
    attrs: dict[Any, Any]
    options: dict[str, Any]

    def key(self) -> str:
        return repr(
            (self.kernel.fn.__name__, self.config, self.signature, self.constexprs, self.attrs)
        )


def _compile(job: Job, arch: int) -> VariantStats:
    src = ASTSource(
        fn=job.kernel, signature=job.signature, constexprs=job.constexprs, attrs=job.attrs
    )
    compiled = triton.compile(src, target=_target(arch), options=job.options)
    ptx = compiled.asm["ptx"]
    ttir = compiled.asm["ttir"]
    regs, spill_st, spill_ld = _ptxas_report(ptx, arch)
    shared = int(compiled.metadata.shared)
    config = job.config
    dev = DEVICES["H100"]
    by_regs = dev["regs"] // max(1, regs * config.num_warps * 32)
    by_smem = (dev["smem_kib"] * 1024) // shared if shared else 32
    ctas = max(0, min(by_regs, by_smem, 32))
    dtypes = {v for v in job.signature.values() if isinstance(v, str) and v.startswith("*")}
    low = bool(dtypes & {"*bf16", "*fp16"})
    dots = len(re.findall(r"tt\.dot\b", ttir))
    wgmma = "wgmma.mma_async" in ptx
    cp_async = "cp.async" in ptx
    tma = "cp.async.bulk.tensor" in ptx
    problems = []
    if spill_st or spill_ld:
        problems.append(f"spills {spill_st} B stores / {spill_ld} B loads")
    if low and dots and not wgmma:
        problems.append("bf16/fp16 tl.dot compiled without wgmma")
    if low and dots and not (cp_async or tma):
        problems.append("bf16/fp16 matmul operands loaded without cp.async or TMA")
    dtype = "bf16" if "*bf16" in dtypes else "fp16" if "*fp16" in dtypes else "fp32"
    return VariantStats(
        case=job.case,
        kernel=job.kernel.fn.__name__,
        config=config.name,
        shape_class=job.shape_class,
        dtype=dtype,
        launched=job.launched,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        grid=tuple(job.grid),
        registers=regs,
        spill_stores=spill_st,
        spill_loads=spill_ld,
        shared_bytes=shared,
        ctas_per_sm=ctas,
        dots=dots,
        wgmma=wgmma,
        cp_async=cp_async,
        tma=tma,
        low_precision=low,
        problems=problems,
    )


def gate_cases() -> list[tuple[str, str, Callable[[], None]]]:
    """(case name, shape class, thunk calling a launcher) from every Triton module."""
    from decpo.triton_backend import decorrelation, logprobs

    cases = []
    for module in (logprobs, decorrelation):
        if hasattr(module, "gate_cases"):
            cases += module.gate_cases()
    return cases


_JOBS: list[Job] = []  # read by the forked compile workers


def _compile_job(index_arch: tuple[int, int]) -> VariantStats:
    return _compile(_JOBS[index_arch[0]], index_arch[1])


def jobs(only: str | None = None, launched_only: bool = False, arch: int = 90) -> list[Job]:
    """Record every gate case's launches and bind each distinct variant."""
    out: dict[str, Job] = {}
    torch.manual_seed(0)
    for case, shape_class, thunk in gate_cases():
        if only and only not in case:
            continue
        with common.recording() as launches:
            thunk()
        assert launches, f"gate case {case} launched no kernel"
        for launch in launches:
            configs = (launch.config,) if launched_only else launch.candidates
            for config in configs:
                signature, constexprs, attrs, options = _bind(
                    launch.kernel, launch.args, config, arch
                )
                job = Job(
                    case,
                    shape_class,
                    _jit_fn(launch.kernel),
                    config,
                    config == launch.config,
                    tuple(launch.grid),
                    signature,
                    constexprs,
                    attrs,
                    options.__dict__,
                )
                out.setdefault(job.key(), job)
    return list(out.values())


def collect(
    arch: int = 90, only: str | None = None, launched_only: bool = False, verbose: bool = True
) -> list[VariantStats]:
    """Compile every variant (in parallel, one process a core) and report each."""
    import multiprocessing

    _JOBS[:] = jobs(only, launched_only, arch)
    workers = min(len(_JOBS), os.cpu_count() or 1) or 1
    rows = []
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for row in pool.imap(_compile_job, [(i, arch) for i in range(len(_JOBS))]):
            rows.append(row)
            if verbose:
                print(_format_row(row), flush=True)
    return rows


HEADER = (
    f"{'case':<34} {'kernel':<34} {'config':<12} {'class':<10} {'dt':<5} {'w':>2} {'st':>2} "
    f"{'regs':>4} {'spill':>5} {'smem KiB':>8} {'CTA/SM':>6} {'wgmma':>5} {'cp.async/TMA':>12}"
)


def _format_row(r: VariantStats) -> str:
    mark = "" if r.launched else " (cand)"
    pipe = "TMA" if r.tma else ("cp.async" if r.cp_async else "-")
    return (
        f"{r.case:<34} {r.kernel:<34} {(r.config + mark):<12} {r.shape_class:<10} {r.dtype:<5} "
        f"{r.num_warps:>2} {r.num_stages:>2} {r.registers:>4} {r.spill_stores + r.spill_loads:>5} "
        f"{r.shared_bytes / 1024:>8.1f} {r.ctas_per_sm:>6} {('yes' if r.wgmma else '-'):>5} "
        f"{pipe:>12}" + (f"  !! {'; '.join(r.problems)}" if r.problems else "")
    )


def roofline() -> list[dict[str, Any]]:
    """Predicted time of every GPU benchmark case: max(FLOPs / peak, bytes / bandwidth)
    with FLOPs and bytes from the launchers' own cost functions (bench.cases.tiled_cost)."""
    from bench.cases import GPU_CASES, tiled_cost

    rows = []
    for case in GPU_CASES:
        for mode in ("fwd", "fwd+bwd"):
            try:
                flops, nbytes = tiled_cost(case, mode)
            except (ImportError, AttributeError) as exc:  # a module without a cost model
                print(f"no cost model for {case.key}: {exc}", file=sys.stderr)
                continue
            for dev_name, dev in DEVICES.items():
                t_flops = flops / (dev["tflops"] * 1e12)
                t_bytes = nbytes / (dev["tbps"] * 1e12)
                rows.append(
                    {
                        "case": f"{case.key} {mode}",
                        "device": dev_name,
                        "flops": flops,
                        "bytes": nbytes,
                        "ms": 1e3 * max(t_flops, t_bytes),
                        "bound": "compute" if t_flops >= t_bytes else "memory",
                        "intensity": flops / max(nbytes, 1),
                    }
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.kernel_stats",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--arch", type=int, default=90, help="compute capability (90: Hopper)")
    parser.add_argument("--only", default=None, help="only cases whose name contains this")
    parser.add_argument("--gate", action="store_true", help="exit 1 if any variant has a problem")
    parser.add_argument(
        "--launched-only",
        action="store_true",
        help="only the configs launched without autotuning (not the autotuning candidates)",
    )
    parser.add_argument("--roofline", action="store_true", help="print predicted H100/H200 times")
    parser.add_argument("--out", default=None, help="JSON output (default bench/results/...)")
    args = parser.parse_args(argv)

    if args.roofline:
        print(f"{'case':<64} {'device':<6} {'GFLOP':>9} {'GB':>8} {'FLOP/B':>7} {'ms':>8} bound")
        for r in roofline():
            print(
                f"{r['case']:<64} {r['device']:<6} {r['flops'] / 1e9:>9.1f} "
                f"{r['bytes'] / 1e9:>8.3f} {r['intensity']:>7.0f} {r['ms']:>8.3f} {r['bound']}"
            )
        return 0

    print(HEADER)
    rows = collect(args.arch, args.only, args.launched_only)
    bad = [r for r in rows if r.problems]
    print(f"compiled {len(rows)} kernel variants for sm_{args.arch}a; {len(bad)} with problems")
    if not args.only:
        out = Path(args.out) if args.out else RESULTS / f"kernel-stats-sm{args.arch}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        commit = git_commit()
        meta = {
            "triton": triton.__version__,
            "torch": torch.__version__,
            "arch": f"sm_{args.arch}a",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "commit": commit,
            "launched_only": args.launched_only,
        }
        payload = {
            "meta": meta,
            "variants": [dataclasses.asdict(r) for r in rows],
            "roofline": roofline(),
        }
        out.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 1 if (args.gate and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
