"""Loader for the CMake-built native CPU library (kernels/ -> libdecpo_native.so).

The library exposes a plain C ABI and is called through ctypes with tensor data
pointers, so it never links against libtorch and works with any installed torch.
Set DECPO_NATIVE_LIB to a library path to override where it is looked for.

Every kernel is built for several instruction sets (ISAS: baseline x86-64, avx2 =
x86-64-v3, avx512 = x86-64-v4, avx512bf16 = x86-64-v4 with bf16 dot products) and the
best one this CPU runs is used. DECPO_NATIVE_ISA=<name> (read when the library is
loaded) or select_isa() forces a lesser one, so one machine can test and measure what
a CPU with less would run; naming one the CPU cannot run is an error.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import os
import warnings
from pathlib import Path

import torch

LIBRARY_NAME = "libdecpo_native.so"
ABI_VERSION = 5
# Instruction-set variants of the kernels, in the library's numbering.
ISAS = ("baseline", "avx2", "avx512", "avx512bf16")
# decpo_cpu_features() bits.
CPU_FEATURES = {"avx2": 1, "avx512": 2, "avx512_bf16": 4, "amx_bf16": 8}
ISA_ENV = "DECPO_NATIVE_ISA"

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
# Dtypes the native kernels read and write.
DTYPES = tuple(_DTYPE_CODES)


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


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    errors = []
    for path in _candidate_paths():
        if not path.is_file():
            continue
        try:
            lib = ctypes.CDLL(str(path))
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
    signatures["decpo_select_isa"] = [i32]
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


def library() -> ctypes.CDLL:
    """The loaded library; RuntimeError with the reason when it cannot be loaded."""
    lib, reason = _load()
    if lib is None:
        raise RuntimeError(f"decpo native library unavailable: {reason}")
    return lib


def _select(lib: ctypes.CDLL, name: str, what: str) -> None:
    if name not in ISAS:
        raise ValueError(f"{what}: the native ISA must be one of {ISAS}")
    if lib.decpo_select_isa(ISAS.index(name)) != 0:
        have = [isa for isa in ISAS if isa_runs(isa, lib)]
        raise ValueError(f"{what}: this CPU or library cannot run {name!r} (it runs {have})")


def cpu_features() -> dict[str, bool]:
    """What this CPU can do, from the native library's own detection (cpuid and the
    OS-enabled register state): avx2 (x86-64-v3), avx512 (x86-64-v4), avx512_bf16
    (bf16 dot products), amx_bf16 (AMX tiles, used by PyTorch's oneDNN matmuls)."""
    bits = library().decpo_cpu_features()
    return {name: bool(bits & bit) for name, bit in CPU_FEATURES.items()}


def isa_runs(isa: str, lib: ctypes.CDLL | None = None) -> bool:
    """True when the library has the `isa` variant and this CPU can run it."""
    lib = lib or library()
    index = ISAS.index(isa)
    if not lib.decpo_compiled_isas() & (1 << index):
        return False
    bits = lib.decpo_cpu_features()
    need = {"baseline": 0, "avx2": 1, "avx512": 2, "avx512bf16": 4}[isa]
    return bits & need == need


def active_isa() -> str:
    """The kernel variant the native library runs now."""
    return ISAS[library().decpo_active_isa()]


def select_isa(isa: str | None) -> str:
    """Run the `isa` variant of every kernel from now on (None: the best this CPU
    runs); returns the previous one. ValueError naming the argument when the CPU or
    the library cannot run it."""
    previous = active_isa()
    if isa is None:
        library().decpo_select_isa(-1)
    else:
        _select(library(), isa, f"isa={isa!r}")
    return previous


def native_bf16_dot() -> bool:
    """Whether bf16 products run at bf16 speed here: the CPU has AVX512_BF16 or AMX,
    and the kernel variant in use is not forced below avx512bf16 (a forced variant
    stands for a CPU without them, whose bf16 matmuls crawl: about 0.5 GFLOP/s in
    PyTorch on AVX2, against 120 GFLOP/s in fp32)."""
    features = cpu_features()
    has_dot = features["avx512_bf16"] or features["amx_bf16"]
    return has_dot and active_isa() == "avx512bf16"


@functools.cache
def warn_fallback(op: str) -> None:
    """One warning per op when "auto" falls back from native to torch on CPU."""
    warnings.warn(
        f"decpo: native CPU library unavailable ({unavailable_reason()}); "
        f"{op} uses the torch backend",
        RuntimeWarning,
        stacklevel=3,
    )


def _check_status(status: int, fn: str, n_vocab: int, ignore_index: int) -> None:
    if status == 2:
        raise ValueError(f"targets must be in [0, {n_vocab}) or equal ignore_index={ignore_index}")
    assert status == 0, f"{fn} returned {status}"


def _unit_column_stride(logits: torch.Tensor) -> torch.Tensor:
    assert logits.dim() == 2 and logits.device.type == "cpu" and logits.dtype in _DTYPE_CODES
    return logits if logits.stride(1) == 1 else logits.contiguous()


def logprobs_from_logits_fwd(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise log-softmax-and-gather in one pass: (logp, lse), both fp32 (N,).

    logits (N, V) fp32 or bf16 on CPU with unit stride along V; targets (N,) int64.
    """
    assert targets.shape == logits.shape[:1] and targets.dtype == torch.int64
    logits = _unit_column_stride(logits)
    targets = targets.contiguous()
    n, v = logits.shape
    logp = torch.empty(n, dtype=torch.float32)
    lse = torch.empty(n, dtype=torch.float32)
    status = library().decpo_logprobs_from_logits_fwd(
        logits.data_ptr(), _DTYPE_CODES[logits.dtype], n, v, logits.stride(0),
        targets.data_ptr(), ignore_index, 1.0 / temperature,
        logp.data_ptr(), lse.data_ptr(),
    )  # fmt: skip
    _check_status(status, "decpo_logprobs_from_logits_fwd", v, ignore_index)
    return logp, lse


def logprobs_from_logits_bwd(
    grad_logp: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    temperature: float,
) -> torch.Tensor:
    """d logits = g (onehot - softmax) / T, (N, V) contiguous in the logits' dtype,
    written in one pass; rows whose target is ignore_index are zero."""
    logits = _unit_column_stride(logits)
    n, v = logits.shape
    grad_logp = grad_logp.to(torch.float32).contiguous()
    lse = lse.contiguous()
    targets = targets.contiguous()
    out = torch.empty((n, v), dtype=logits.dtype)
    status = library().decpo_logprobs_from_logits_bwd(
        grad_logp.data_ptr(), logits.data_ptr(), _DTYPE_CODES[logits.dtype], n, v,
        logits.stride(0), targets.data_ptr(), ignore_index, 1.0 / temperature,
        lse.data_ptr(), out.data_ptr(),
    )  # fmt: skip
    _check_status(status, "decpo_logprobs_from_logits_bwd", v, ignore_index)
    return out


def online_softmax_tile(
    tile: torch.Tensor,
    bias: torch.Tensor | None,
    inv_temperature: float,
    softcap: float,
    logit_scale: float,
    local_targets: torch.Tensor,
    m: torch.Tensor,
    s_other: torch.Tensor,
    s_target: torch.Tensor,
    target_logit: torch.Tensor,
    stats: torch.Tensor | None,
) -> torch.Tensor:
    """Fold one logit tile (R, Vc) into the running online-softmax state, in place.

    tile: h W_chunk^T, fp32 or bf16 with unit column stride; on return it holds
    exp(z - m_new), times (1 - tanh^2) when softcap > 0, with the target column zeroed,
    where z = softcap tanh(logit_scale (tile + bias) / softcap) / T (logit_scale
    (tile + bias) / T when softcap == 0). bias: (Vc,) or None. local_targets: (R,)
    int64 column of each row's target in this chunk or -1. m, s_other, s_target,
    target_logit: (R,) fp32, updated. stats: None or (3, R) fp32 running
    [sum e (z - m), sum e^2, sum z], updated. Returns rescale = exp(m_old - m_new),
    (R,) fp32.
    """
    assert tile.dim() == 2 and tile.stride(1) == 1 and tile.dtype in _DTYPE_CODES
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in (m, s_other, s_target))
    assert target_logit.is_contiguous() and local_targets.is_contiguous()
    assert stats is None or (stats.dtype == torch.float32 and stats.is_contiguous())
    n, v = tile.shape
    rescale = torch.empty(n, dtype=torch.float32)
    if bias is not None:
        bias = bias.to(torch.float32).contiguous()
    status = library().decpo_online_softmax_tile(
        tile.data_ptr(), _DTYPE_CODES[tile.dtype], n, v, tile.stride(0),
        None if bias is None else bias.data_ptr(), inv_temperature, softcap, logit_scale,
        local_targets.data_ptr(), m.data_ptr(), s_other.data_ptr(), s_target.data_ptr(),
        target_logit.data_ptr(), None if stats is None else stats.data_ptr(),
        rescale.data_ptr(),
    )  # fmt: skip
    assert status == 0, f"decpo_online_softmax_tile returned {status}"
    return rescale


def decorrelation_penalty(
    hidden: torch.Tensor,
    rows: torch.Tensor | None,
    sizes: list[int],
    normalize: bool,
    offdiag: bool,
    grad_scale: float,
    grad: torch.Tensor | None,
) -> torch.Tensor:
    """Per-layer sums over groups of sum over counted pairs (G_ij - delta_ij)^2, (L,)
    float64, for hidden (L, N, D) fp32 or bf16 on CPU with unit stride along D.

    rows: the selected row indices sorted by group (None: rows 0 .. sum(sizes) - 1 in
    order), sizes: each group's row count. grad: None, or (L, N, D) contiguous in
    hidden's dtype; the groups' rows are overwritten with grad_scale * dP/dh.
    """
    assert hidden.dim() == 3 and hidden.device.type == "cpu" and hidden.dtype in _DTYPE_CODES
    if hidden.stride(2) != 1:
        hidden = hidden.contiguous()
    n_layers, n, dim = hidden.shape
    offsets = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(sizes, dtype=torch.int64).cumsum(0)
    if rows is not None:
        rows = rows.to(torch.int64).contiguous()
    assert grad is None or (grad.is_contiguous() and grad.dtype == hidden.dtype)
    p_sum = torch.empty(n_layers, dtype=torch.float64)
    status = library().decpo_decorrelation_penalty(
        hidden.data_ptr(), _DTYPE_CODES[hidden.dtype], n_layers, n, dim, hidden.stride(0),
        hidden.stride(1), None if rows is None else rows.data_ptr(), offsets.data_ptr(),
        len(sizes), int(normalize), int(offdiag), grad_scale, p_sum.data_ptr(),
        None if grad is None else grad.data_ptr(),
    )  # fmt: skip
    if status == 4:
        raise MemoryError("decpo_decorrelation_penalty: out of memory for its workspace")
    assert status == 0, f"decpo_decorrelation_penalty returned {status}"
    return p_sum
