"""A/B two builds of the native library in one process: is a kernel change faster?

    python -m bench.native_ab OLD.so                        # against the library decpo loads
    python -m bench.native_ab OLD.so NEW.so --op logits_bwd --isa avx512 --dtype fp32

An old build comes from a worktree: `git worktree add /tmp/old <rev>`, then `cmake -S
/tmp/old -B /tmp/oldbuild -DCMAKE_BUILD_TYPE=Release && cmake --build /tmp/oldbuild`,
which writes /tmp/old/decpo/native_backend/libdecpo_native.so.

Whole benchmark runs on this project's 2-core virtual machines move 10-20% from one
run to the next, more than most kernel changes: both libraries are loaded (ctypes,
each forced to the same kernel variant) and their C entry points called on the same
tensors, alternating old and new call by call for `--rounds` rounds in a rotated order,
so both see the same machine. Reports each one's best and median and checks that they
computed the same bits. Ops (bench/cases.py shapes):

    logits_fwd     decpo_logprobs_from_logits_fwd, N=4096 V=32000
    logits_bwd     decpo_logprobs_from_logits_bwd into a reused output, then a fresh one
    decorrelation  decpo_decorrelation_penalty with its gradient: 8 layers x 64 rows,
                   D=14336 (--shape last-token), or 4 groups x 512 rows, D=4096
                   (--shape groups)
"""

from __future__ import annotations

import argparse
import ctypes
import time
from collections.abc import Callable
from pathlib import Path

import torch

from decpo.native_backend import library

i64, f32, ptr, i32 = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int
# The entry points compared, with signatures unchanged since ABI 5 (library._declare).
SIGNATURES = {
    "decpo_logprobs_from_logits_fwd": [ptr, i32, i64, i64, i64, ptr, i64, f32, ptr, ptr],
    "decpo_logprobs_from_logits_bwd": [ptr, ptr, i32, i64, i64, i64, ptr, i64, f32, ptr, ptr],
    "decpo_decorrelation_penalty": [ptr, i32, i64, i64, i64, i64, i64, ptr, ptr, i64, i32, i32,
                                    f32, ptr, ptr],
    "decpo_select_isa": [i32],
}  # fmt: skip
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
OPS = ("logits_fwd", "logits_bwd", "decorrelation")
# Decorrelation shapes (layers, groups per layer, rows per group, D), bench/cases.py's.
SHAPES = {"last-token": (8, 1, 64, 14336), "groups": (1, 4, 512, 4096)}


def load(path: Path, isa: str) -> ctypes.CDLL:
    """One build, forced to the `isa` variant."""
    lib = ctypes.CDLL(str(path.resolve()))
    for name, argtypes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = ctypes.c_int, argtypes
    if lib.decpo_select_isa(library.ISAS.index(isa)) != 0:
        raise SystemExit(f"{path} cannot run the {isa} variant on this CPU")
    return lib


def calls(
    op: str, dtype: torch.dtype, first: ctypes.CDLL, tiny: bool = False,
    shape: str = "last-token",
) -> tuple[Callable[[], torch.Tensor], list[tuple[str, Callable]]]:  # fmt: skip
    """(make_out() -> an output tensor, [(label, call(lib, out) -> what it wrote)]);
    `first` computes what a call needs from another one (the backward's lse); tiny:
    small shapes, for the tests; shape: the decorrelation case (SHAPES)."""
    code = library.DTYPE_CODES[dtype]
    if op.startswith("logits"):
        n, v = (16, 1000) if tiny else (4096, 32000)
        logits = (torch.randn(n, v) * 3).to(dtype)  # (N, V)
        targets = torch.randint(0, v, (n,))
        grad = torch.randn(n)
        logp, lse = torch.empty(n), torch.empty(n)

        def forward(lib: ctypes.CDLL, out: torch.Tensor) -> torch.Tensor:
            lib.decpo_logprobs_from_logits_fwd(
                logits.data_ptr(), code, n, v, v, targets.data_ptr(), -100, 1.0,
                out.data_ptr(), lse.data_ptr(),
            )  # fmt: skip
            return out

        forward(first, logp)  # lse for the backward

        def backward(lib: ctypes.CDLL, out: torch.Tensor | None) -> torch.Tensor:
            out = torch.empty(n, v, dtype=dtype) if out is None else out
            lib.decpo_logprobs_from_logits_bwd(
                grad.data_ptr(), logits.data_ptr(), code, n, v, v, targets.data_ptr(), -100,
                1.0, lse.data_ptr(), out.data_ptr(),
            )  # fmt: skip
            return out

        if op == "logits_fwd":
            return lambda: torch.empty(n), [("forward", forward)]
        return lambda: torch.empty(n, v, dtype=dtype), [
            ("backward, reused output", backward),
            ("backward, fresh output", lambda lib, _out: backward(lib, None)),
        ]
    layers, groups, rows, dim = (2, 2, 8, 100) if tiny else SHAPES[shape]
    hidden = torch.randn(layers, groups * rows, dim).to(dtype)  # (L, G n, D)
    offsets = torch.arange(groups + 1, dtype=torch.int64) * rows  # (G + 1,)
    # Groups come with a row index, as decpo.decorrelation_penalty(segment_ids=...)
    # passes them (the kernel then copies rows instead of reading them in place).
    index = torch.arange(groups * rows, dtype=torch.int64) if groups > 1 else None  # (G n,)
    p_sum = torch.empty(layers, dtype=torch.float64)

    def penalty(lib: ctypes.CDLL, out: torch.Tensor) -> torch.Tensor:
        lib.decpo_decorrelation_penalty(
            hidden.data_ptr(), code, layers, groups * rows, dim, groups * rows * dim, dim,
            None if index is None else index.data_ptr(), offsets.data_ptr(), groups, 1, 0,
            1.0 / (layers * groups * rows * rows),
            p_sum.data_ptr(),
            out.data_ptr(),
        )  # fmt: skip
        return out

    return lambda: torch.empty_like(hidden), [("loss + gradient", penalty)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path, nargs="?", help="default: the library decpo loads")
    parser.add_argument("--op", choices=OPS, default="logits_bwd")
    parser.add_argument("--isa", choices=library.ISAS, default=None, help="default: the best")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--tiny", action="store_true", help="small shapes (the tests)")
    parser.add_argument("--shape", choices=SHAPES, default="last-token",
                        help="the decorrelation case")  # fmt: skip
    args = parser.parse_args(argv)
    new = args.new or Path(library.loaded_path())
    previous = library.active_isa()
    isa = args.isa or previous
    try:  # the default new build is the process's own library: its variant is restored
        compare(args, new, isa)
    finally:
        library.select_isa(previous)


def compare(args: argparse.Namespace, new: Path, isa: str) -> None:
    """Times and checks args.op on the two builds, both forced to `isa`."""
    libs = {"old": load(args.old, isa), "new": load(new, isa)}
    torch.manual_seed(0)
    make_out, timed = calls(args.op, DTYPES[args.dtype], libs["old"], args.tiny, args.shape)
    print(f"{args.op} {args.dtype} on {isa}: old {args.old}, new {new}")
    for label, call in timed:
        outs = {name: make_out() for name in libs}
        a, b = (call(libs[name], outs[name]) for name in ("old", "new"))  # warm-up, bits
        same = torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        times: dict[str, list[float]] = {name: [] for name in libs}
        for r in range(args.rounds):
            for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
                start = time.perf_counter()
                call(libs[name], outs[name])
                times[name].append(time.perf_counter() - start)
        best = {k: min(v) * 1e3 for k, v in times.items()}
        median = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
        print(
            f"  {label}: old best {best['old']:.2f} median {median['old']:.2f} ms, new best "
            f"{best['new']:.2f} median {median['new']:.2f} ms (new/old best "
            f"{best['new'] / best['old']:.3f}); results {'bitwise equal' if same else 'DIFFER'}"
        )


if __name__ == "__main__":
    main()
