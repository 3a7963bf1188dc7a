"""Backend selection: "auto" picks what runs; a named unavailable backend is an error."""

from __future__ import annotations

import pytest
import torch

import decpo
from decpo import backend


@pytest.mark.parametrize("op", ["decorrelation_penalty", "token_logprobs", "logprobs_from_logits"])
def test_auto_on_cpu_resolves_to_an_implemented_backend(op):
    chosen = backend.resolve_backend(op, "auto", torch.device("cpu"), torch.float32)
    assert chosen in backend.OPS[op].backends
    assert callable(backend.implementation(op, chosen))


@pytest.mark.parametrize("name", ["triton", "native"])
def test_unimplemented_backend_by_name_is_a_clear_error(name, monkeypatch):
    for op, spec in backend.OPS.items():
        monkeypatch.setitem(backend.OPS, op, backend.OpSpec(spec.stem, spec.backends - {name}))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    h = torch.randn(4, 3)
    with pytest.raises(decpo.BackendUnavailableError, match=f'backend="{name}"'):
        decpo.decorrelation_penalty(h, backend=name)
    with pytest.raises(decpo.BackendUnavailableError, match="token_logprobs"):
        decpo.token_logprobs(h, torch.randn(5, 3), torch.zeros(4, dtype=torch.long), backend=name)
    with pytest.raises(decpo.BackendUnavailableError, match="logprobs_from_logits"):
        decpo.logprobs_from_logits(h, torch.zeros(4, dtype=torch.long), backend=name)


def test_triton_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(decpo.BackendUnavailableError, match="CUDA"):
        backend.resolve_backend(
            "decorrelation_penalty", "triton", torch.device("cpu"), torch.float32
        )


def test_native_unavailable_auto_falls_back_with_one_warning(monkeypatch):
    from decpo.native_backend import library

    monkeypatch.setattr(library, "is_available", lambda: False)
    monkeypatch.setattr(library, "unavailable_reason", lambda: "not built")
    library.warn_fallback.cache_clear()
    with pytest.warns(RuntimeWarning, match="not built"):
        chosen = backend.resolve_backend(
            "logprobs_from_logits", "auto", torch.device("cpu"), torch.bfloat16
        )
        assert chosen == "torch"
    with pytest.raises(decpo.BackendUnavailableError, match="not built"):
        backend.resolve_backend(
            "logprobs_from_logits", "native", torch.device("cpu"), torch.float32
        )
    library.warn_fallback.cache_clear()


def test_auto_picks_native_for_the_dtypes_it_reads():
    from decpo import native_backend

    if not native_backend.is_available():
        pytest.skip(native_backend.unavailable_reason())
    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.bfloat16):
        assert backend.resolve_backend("logprobs_from_logits", "auto", cpu, dtype) == "native"
    for dtype in (torch.float16, torch.float64):
        assert backend.resolve_backend("logprobs_from_logits", "auto", cpu, dtype) == "torch"
        with pytest.raises(decpo.BackendUnavailableError, match="native kernels read"):
            backend.resolve_backend("logprobs_from_logits", "native", cpu, dtype)


def test_every_registered_implementation_exists():
    """The registry names a module and function for every (op, backend) it lists; each
    has the op's forward, and the log-prob ops their separate backward."""
    for op, spec in backend.OPS.items():
        for name in spec.backends:
            if name == "triton":
                pytest.importorskip("triton")
            assert callable(backend.implementation(op, name))
            if op != "decorrelation_penalty":
                assert callable(backend.implementation(op, name, backward=True))


def test_implementation_refuses_an_unregistered_backend(monkeypatch):
    monkeypatch.setitem(backend.OPS, "token_logprobs", backend.OpSpec("logprobs", {"torch"}))
    with pytest.raises(decpo.BackendUnavailableError, match="no native implementation"):
        backend.implementation("token_logprobs", "native")
