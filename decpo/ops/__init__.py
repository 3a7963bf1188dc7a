"""Public ops: validation, backend dispatch, torch custom ops and autograd.

Each op's custom-op function is its one full signature: the fake implementation,
setup_context and the backward read the inputs by name through `Inputs` and pad
their gradients with `input_grads`, instead of writing the parameter list again.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import torch


class Inputs:
    """The inputs of one custom-op call, by the parameter names of its function."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.names = tuple(inspect.signature(fn).parameters)

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> SimpleNamespace:
        """A namespace with one attribute per input (args positional, then kwargs)."""
        values = dict(zip(self.names, args, strict=False)) | (kwargs or {})
        if set(values) != set(self.names):
            raise TypeError(f"expected inputs {self.names}, got {tuple(values)}")
        return SimpleNamespace(**values)


def input_grads(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The backward's return value: `grads` for the leading inputs, None for the rest
    (as many as the op has inputs)."""
    return grads + (None,) * (len(ctx.needs_input_grad) - len(grads))


def eager_call(*tensors: torch.Tensor | None) -> bool:
    """Whether an op call may run its implementation through a plain autograd Function
    instead of the custom-op dispatcher: not traced by torch.compile, no dispatch mode
    active (FakeTensorMode, tracing), no functorch transform, and plain tensors only
    (no subclass such as DTensor). Torch-function modes (torch.set_default_device's)
    see the implementation's own torch calls, as for any function made of them. The
    dispatcher costs ~0.3 ms of host time per call on the H100 machine, more than the
    GPU time of the last-token decorrelation penalty; everything else goes through the
    op, whose fake implementation and autograd formula the same functions provide."""
    return (
        not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._are_functorch_transforms_active()
        and all(t is None or type(t) is torch.Tensor for t in tensors)
    )


_eager = threading.local()


@contextlib.contextmanager
def eager_scope() -> Iterator[None]:
    """Marks an implementation call made by the eager path (see eager_call): only
    there may a launcher keep small device tables from one call to the next
    (decpo.triton_backend.decorrelation._table). Under torch.compile the call may run
    while CUDA graphs are warmed up or captured, whose memory pool owns every tensor
    made then and may reuse the memory of any that outlives the call."""
    previous = getattr(_eager, "active", False)
    _eager.active = True
    try:
        yield
    finally:
        _eager.active = previous


def in_eager_scope() -> bool:
    return getattr(_eager, "active", False)
