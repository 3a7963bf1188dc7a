"""Loader for the CMake-built native CPU library (kernels/ -> libdecpo_native.so).

The library exposes a plain C ABI and is called through ctypes with tensor data
pointers, so it never links against libtorch and works with any installed torch.
It is looked for in DECPO_NATIVE_LIB (a path, when set), next to this file (where
both `pip install` and a plain CMake build put it), and among the installed
distribution's files (an editable install keeps it in site-packages).
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
ABI_VERSION = 4

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


@functools.cache
def warn_fallback(op: str) -> None:
    """One warning per op when "auto" falls back from native to torch on CPU."""
    warnings.warn(
        f"decpo: native CPU library unavailable ({unavailable_reason()}); "
        f"{op} uses the torch backend",
        RuntimeWarning,
        stacklevel=3,
    )
