"""Public ops: validation, backend dispatch, torch custom ops and autograd.

Each op's custom-op function is its one full signature: the fake implementation,
setup_context and the backward read the inputs by name through `Inputs` and pad
their gradients with `input_grads`, instead of writing the parameter list again.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
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
