"""Backend selection for the public ops.

backend="auto" picks the best implementation available for the tensors' device;
a backend asked for by name that is unavailable raises BackendUnavailableError,
never a silent swap. Each backend module registers the ops it implements in
IMPLEMENTED; "auto" walks PREFERENCE for the device and takes the first one.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton", "native")

# Which ops each backend implements today. Backends add themselves here as they land.
IMPLEMENTED: dict[str, set[str]] = {
    "torch": {"decorrelation_penalty", "token_logprobs", "logprobs_from_logits"},
    "triton": {"decorrelation_penalty", "token_logprobs", "logprobs_from_logits"},
    "native": {"logprobs_from_logits", "token_logprobs"},
}

# Order in which "auto" tries backends, per device type.
PREFERENCE = {"cuda": ("triton", "torch"), "cpu": ("native", "torch")}


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run this op on these tensors."""


@torch.compiler.assume_constant_result
def _why_unavailable(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """'' when `backend` can run `op` on `device`, else the reason. Under torch.compile
    this is evaluated once while tracing, never traced into (it loads libraries)."""
    if op not in IMPLEMENTED[backend]:
        return f"decpo has no {backend} implementation of {op} yet"
    if backend == "triton":
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        if device.type != "cuda" and not (device.type == "cpu" and interpret):
            return "Triton kernels need a CUDA device (or CPU tensors with TRITON_INTERPRET=1)"
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            return f"triton is not installed ({exc})"
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"the Triton kernels read float32, bfloat16 and float16, got {dtype}"
    if backend == "native":
        if device.type != "cpu":
            return "the native library runs on CPU tensors only"
        from decpo import native

        if not native.is_available():
            return native.unavailable_reason()
        if dtype not in native.DTYPES:
            return f"the native kernels read {', '.join(map(str, native.DTYPES))}, got {dtype}"
    return ""


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
        fallback = candidate == "native" and op in IMPLEMENTED["native"]
        if fallback and _native_missing() and not torch.compiler.is_compiling():
            from decpo import native

            native.warn_fallback(op)
    return "torch"


@torch.compiler.assume_constant_result
def _native_missing() -> bool:
    from decpo import native

    return not native.is_available()
