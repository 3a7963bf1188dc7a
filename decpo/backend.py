"""The backend registry: which backend implements which op, when it can run, and
where its code is. It drives both backend choice and dispatch.

Every backend is a package decpo/<name>_backend/ with one module per op family,
the same file stem in every backend (OPS[op].stem): the module defines a function
named after the op and, for ops whose backward is a separate pass, `<op>_backward`.
Modules are imported on first use, so a backend that is not installed costs nothing
until it is asked for.

backend="auto" walks PREFERENCE for the tensors' device and takes the first
backend that can run; a backend asked for by name that cannot run raises
BackendUnavailableError with the reason, never a silent swap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Set
from dataclasses import dataclass
from typing import Any

import torch

from decpo.numerics import interpreting


@dataclass(frozen=True)
class OpSpec:
    """Where an op lives: its module's file stem in every backend package, and the
    backends that implement it."""

    stem: str
    backends: Set[str]


ALL = frozenset({"torch", "triton", "native"})

# op -> backends implementing it. Add a backend here when its module lands.
OPS: dict[str, OpSpec] = {
    "decorrelation_penalty": OpSpec("decorrelation", ALL),
    "token_logprobs": OpSpec("logprobs", ALL),
    "logprobs_from_logits": OpSpec("logprobs", ALL),
}

BACKENDS = ("auto", "torch", "triton", "native")

# Order in which "auto" tries backends, per device type.
PREFERENCE = {"cuda": ("triton", "torch"), "cpu": ("native", "torch")}

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run this op on these tensors."""


def _torch_unavailable(device: torch.device, dtype: torch.dtype) -> str:
    return ""


def _triton_unavailable(device: torch.device, dtype: torch.dtype) -> str:
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        return "Triton kernels need a CUDA device (or CPU tensors with TRITON_INTERPRET=1)"
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    if dtype not in TRITON_DTYPES:
        return f"the Triton kernels read float32, bfloat16 and float16, got {dtype}"
    return ""


def _native_unavailable(device: torch.device, dtype: torch.dtype) -> str:
    if device.type != "cpu":
        return "the native library runs on CPU tensors only"
    from decpo.native_backend import library

    if not library.is_available():
        return library.unavailable_reason()
    if dtype not in library.DTYPES:
        return f"the native kernels read {', '.join(map(str, library.DTYPES))}, got {dtype}"
    return ""


# backend -> (device, dtype) -> '' when it can run there, else the reason.
AVAILABILITY: dict[str, Callable[[torch.device, torch.dtype], str]] = {
    "torch": _torch_unavailable,
    "triton": _triton_unavailable,
    "native": _native_unavailable,
}


@torch.compiler.assume_constant_result
def _why_unavailable(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """'' when `backend` can run `op` on `device`, else the reason. Under torch.compile
    this is evaluated once while tracing, never traced into (it loads libraries)."""
    if backend not in OPS[op].backends:
        return f"decpo has no {backend} implementation of {op} yet"
    return AVAILABILITY[backend](device, dtype)


def resolve_backend(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend that runs `op` on tensors of `device` and `dtype` for the
    requested `backend`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        reason = _why_unavailable(op, backend, device, dtype)
        if reason:
            raise BackendUnavailableError(
                f'{op}(backend="{backend}") is unavailable on {device.type}: {reason}. '
                'Use backend="torch" (runs anywhere) or backend="auto".'
            )
        return backend
    for candidate in PREFERENCE.get(device.type, ("torch",)):
        if not _why_unavailable(op, candidate, device, dtype):
            return candidate
        fallback = candidate == "native" and "native" in OPS[op].backends
        if fallback and _native_missing() and not torch.compiler.is_compiling():
            from decpo.native_backend import library

            library.warn_fallback(op)
    return "torch"


@torch.compiler.assume_constant_result
def _native_missing() -> bool:
    from decpo.native_backend import library

    return not library.is_available()


def implementation(op: str, backend: str, backward: bool = False) -> Callable[..., Any]:
    """The function of `backend` that runs `op` (its separate backward pass with
    backward=True): decpo.<backend>_backend.<stem>.<op>[_backward]. Called inside the
    custom ops, on a backend resolve_backend returned."""
    spec = OPS[op]
    if backend not in spec.backends:
        raise BackendUnavailableError(f"decpo has no {backend} implementation of {op}")
    module = importlib.import_module(f"decpo.{backend}_backend.{spec.stem}")
    return getattr(module, f"{op}_backward" if backward else op)
