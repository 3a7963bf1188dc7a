"""Loader for the CMake-built native CPU library (kernels/ -> libdecpo_native.so).

The library exposes a plain C ABI and is called through ctypes with tensor data
pointers, so it never links against libtorch and works with any installed torch.
It is looked for in DECPO_NATIVE_LIB (a path, when set), next to this file (where
both `pip install` and a plain CMake build put it), and among the installed
distribution's files (an editable install keeps it in site-packages).

Every kernel is built for several instruction sets (ISAS: baseline x86-64, avx2 =
x86-64-v3, avx512 = x86-64-v4, avx512bf16 = x86-64-v4 with bf16 dot products) and the
library runs the best one this CPU supports. DECPO_NATIVE_ISA=<name>, read when the
library is loaded, or select_isa() forces a lesser one, so one machine can test and
measure what a CPU with less would run; naming one the CPU cannot run is an error.

The kernels use as many OpenMP threads as PyTorch's intra-op setting in the calling
thread (torch.get_num_threads(), passed on before a call whenever it changed).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import os
import threading
import warnings
from pathlib import Path

import torch

LIBRARY_NAME = "libdecpo_native.so"
ABI_VERSION = 12
# Instruction-set variants of the kernels, in the library's numbering (decpo_native.h).
ISAS = ("baseline", "avx2", "avx512", "avx512bf16")
# decpo_cpu_features() bits.
CPU_FEATURES = {"avx2": 1, "avx512": 2, "avx512_bf16": 4, "amx_bf16": 8}
# The cpu_features() a variant needs.
_ISA_NEEDS = {"baseline": (), "avx2": ("avx2",), "avx512": ("avx512",),
              "avx512bf16": ("avx512", "avx512_bf16")}  # fmt: skip
ISA_ENV = "DECPO_NATIVE_ISA"

# The C ABI's dtype argument (decpo_native.h) per torch dtype.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
# Dtypes the native kernels read and write.
DTYPES = tuple(DTYPE_CODES)


def _candidate_paths() -> list[Path]:
    paths = []
    if env := os.environ.get("DECPO_NATIVE_LIB"):
        paths.append(Path(env))
    paths.append(Path(__file__).with_name(LIBRARY_NAME))
    # Editable installs keep the Python sources in the checkout and the built
    # library in site-packages: ask the installed distribution where it put it.
    try:
        for file in importlib.metadata.files("decpo") or []:
            if file.name == LIBRARY_NAME:
                paths.append(Path(str(file.locate())))
    except importlib.metadata.PackageNotFoundError:
        pass
    return paths


# The library's OpenMP runtime is its own (the system libgomp; PyTorch ships another),
# and by default its idle threads spin after every parallel region, taking the cores
# from PyTorch's threads that run next (token_logprobs alternates native tile epilogues
# with PyTorch matmuls: the spinning threads measured as 18% of its profile). Unless
# the user chose a policy, the runtime is started with passive waiting: idle threads
# sleep at once. libgomp reads the setting when it loads, so it is set only around
# loading the library and restored after.
_WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def _load_library(path: Path) -> ctypes.CDLL:
    if any(name in os.environ for name in _WAIT_SETTINGS):
        return ctypes.CDLL(str(path))
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        return ctypes.CDLL(str(path))
    finally:
        del os.environ["OMP_WAIT_POLICY"]


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    errors = []
    for path in _candidate_paths():
        if not path.is_file():
            continue
        try:
            lib = _load_library(path)
        except OSError as exc:
            errors.append(f"{path}: {exc}")
            continue
        lib.decpo_abi_version.restype = ctypes.c_int
        if lib.decpo_abi_version() != ABI_VERSION:
            errors.append(f"{path}: ABI version {lib.decpo_abi_version()} != {ABI_VERSION}")
            continue
        _declare(lib)
        if forced := os.environ.get(ISA_ENV):
            _select(lib, forced, f"{ISA_ENV}={forced}")
        return lib, str(path)
    reason = "; ".join(errors) or (
        f"{LIBRARY_NAME} not found (build it with `pip install -e .` or "
        "`cmake -S . -B build && cmake --build build`)"
    )
    return None, reason


def _declare(lib: ctypes.CDLL) -> None:
    i64, f32, ptr, i32 = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int
    signatures = {
        # logits, dtype, n_rows, n_vocab, row_stride, targets, ignore_index, inv_t, logp, lse
        "decpo_logprobs_from_logits_fwd": [ptr, i32, i64, i64, i64, ptr, i64, f32, ptr, ptr],
        # grad_logp, logits, dtype, n_rows, n_vocab, row_stride, targets, ignore_index,
        # inv_t, lse, grad_logits
        "decpo_logprobs_from_logits_bwd": [ptr, ptr, i32, i64, i64, i64, ptr, i64, f32, ptr, ptr],
        # tile, dtype, n_rows, n_cols, row_stride, bias, inv_t, softcap, logit_scale,
        # local_targets, m, s_other, s_target, target_logit, stats, rescale
        "decpo_online_softmax_tile": [ptr, i32, i64, i64, i64, ptr, f32, f32, f32] + [ptr] * 7,
    }
    signatures["decpo_decorrelation_penalty"] = (
        # hidden, dtype, L, N, D, layer_stride, row_stride, rows, offsets, n_groups,
        # normalize, offdiag, grad_scale, p_sum, grad
        [ptr, i32, i64, i64, i64, i64, i64, ptr, ptr, i64, i32, i32, f32, ptr, ptr]
    )
    # src, n_rows, n_cols, src_stride, dst, dst_stride, all_finite
    signatures["decpo_widen_bf16"] = [ptr, i64, i64, i64, ptr, i64, ptr]
    # src, dtype, n, scale, dst
    signatures["decpo_scale"] = [ptr, i32, i64, f32, ptr]
    signatures["decpo_select_isa"] = [i32]
    signatures["decpo_set_num_threads"] = [i32]
    lib.decpo_advise_huge_pages.restype = None
    lib.decpo_advise_huge_pages.argtypes = [ptr, i64]
    lib.decpo_exp_probe.restype = None
    lib.decpo_exp_probe.argtypes = [ptr, i64, i64, ctypes.c_int, ptr]
    for name in ("decpo_cpu_features", "decpo_compiled_isas", "decpo_active_isa"):
        signatures[name] = []
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = argtypes


def is_available() -> bool:
    """True when the native library was built and loads."""
    return _load()[0] is not None


def unavailable_reason() -> str:
    """Why the library cannot be used ('' when it can)."""
    lib, reason = _load()
    return "" if lib is not None else reason


def loaded_path() -> str:
    """The file the library was loaded from; RuntimeError when it cannot be loaded."""
    library()
    return _load()[1]


# The thread count last passed to the library from each thread (its OpenMP runtime is
# not PyTorch's, and keeps one setting per calling thread).
_threads_set = threading.local()


def library() -> ctypes.CDLL:
    """The loaded library, its kernels set to use torch.get_num_threads() threads when
    called from this thread; RuntimeError with the reason when it cannot be loaded."""
    lib, reason = _load()
    if lib is None:
        raise RuntimeError(f"decpo native library unavailable: {reason}")
    threads = torch.get_num_threads()
    if getattr(_threads_set, "threads", 0) != threads:
        lib.decpo_set_num_threads(threads)
        _threads_set.threads = threads
    return lib


def _features(lib: ctypes.CDLL) -> dict[str, bool]:
    bits = lib.decpo_cpu_features()
    return {name: bool(bits & bit) for name, bit in CPU_FEATURES.items()}


def _runs(lib: ctypes.CDLL, isa: str) -> bool:
    built = lib.decpo_compiled_isas() & (1 << ISAS.index(isa))
    return bool(built) and all(_features(lib)[need] for need in _ISA_NEEDS[isa])


def _select(lib: ctypes.CDLL, name: str, what: str) -> None:
    if name not in ISAS:
        raise ValueError(f"{what}: the native ISA must be one of {ISAS}")
    if lib.decpo_select_isa(ISAS.index(name)) != 0:
        have = [isa for isa in ISAS if _runs(lib, isa)]
        raise ValueError(f"{what}: this CPU or library cannot run {name!r} (it runs {have})")


def cpu_features() -> dict[str, bool]:
    """What this CPU can do, from the native library's own detection (cpuid and the
    registers the OS enables): avx2 (x86-64-v3), avx512 (x86-64-v4), avx512_bf16
    (bf16 dot products), amx_bf16 (AMX tiles, which PyTorch's oneDNN matmuls use)."""
    return _features(library())


def isa_runs(isa: str) -> bool:
    """True when the library has the `isa` variant and this CPU can run it."""
    return _runs(library(), isa)


def active_isa() -> str:
    """The kernel variant the native library runs now."""
    return ISAS[library().decpo_active_isa()]


def select_isa(isa: str | None) -> str:
    """Run the `isa` variant of every kernel from now on (None: the best this CPU
    runs) and return the previous one; ValueError naming the argument when this CPU or
    the library cannot run it."""
    previous = active_isa()
    if isa is None:
        library().decpo_select_isa(-1)
    else:
        _select(library(), isa, f"isa={isa!r}")
    return previous


def native_bf16_dot() -> bool:
    """Whether bf16 products run at bf16 speed here: the CPU has AVX512_BF16 or AMX
    and the kernels are not forced below the avx512bf16 variant (a forced variant
    stands for a CPU without them). Without them PyTorch's bf16 matmul crawls
    (0.5-0.6 GFLOP/s on AVX2, against ~120 GFLOP/s in fp32 on 2 cores), so the native
    backend multiplies bf16 inputs as fp32 tiles instead."""
    features = cpu_features()
    return (features["avx512_bf16"] or features["amx_bf16"]) and active_isa() == "avx512bf16"


def exp_rate(seconds: float = 0.3, timings: int = 15, bf16: bool = False) -> float:
    """Measured exponentials per second of the kernels' vectorized exp (the active
    variant, every OpenMP thread, on an L1-resident block): the exp-throughput bound
    that bench/cases.py puts next to memory bandwidth in the log-prob floors. bf16:
    the bf16-accurate exp of a bf16 gradient (vexp_bf16) instead of the 1-ulp one. The best
    of `timings` short timings, because on a shared or virtual machine single timings
    of the same call vary by up to 2x (a core taken away for tens of milliseconds):
    the best is what the cores do when both run, the rate a floor should assume."""
    import time

    x = -torch.rand(4096, dtype=torch.float32) * 20  # (4096,), arguments in [-20, 0]
    out = torch.zeros(2, dtype=torch.float64)  # [sum, exps computed]
    lib = library()
    reps = 16
    while True:  # calibrate one timing to about seconds / timings
        start = time.perf_counter()
        lib.decpo_exp_probe(x.data_ptr(), x.numel(), reps, int(bf16), out.data_ptr())
        if time.perf_counter() - start >= seconds / timings:
            break
        reps *= 2
    best = 0.0
    for _ in range(timings):
        start = time.perf_counter()
        lib.decpo_exp_probe(x.data_ptr(), x.numel(), reps, int(bf16), out.data_ptr())
        best = max(best, float(out[1]) / (time.perf_counter() - start))
    return best


@functools.cache
def warn_fallback(op: str) -> None:
    """One warning per op when "auto" falls back from native to torch on CPU."""
    warnings.warn(
        f"decpo: native CPU library unavailable ({unavailable_reason()}); "
        f"{op} uses the torch backend",
        RuntimeWarning,
        stacklevel=3,
    )
