"""decorrelation_penalty: the DecPO feature-decorrelation regularizer.

Layers: backend kernels (decpo.<backend>_backend.decorrelation for torch and triton,
chosen through decpo.backend's registry) -> the custom op decpo::decorrelation_penalty
(loss and gradient in one forward) -> its autograd formula (backward scales the stored
gradient by grad_output, in place unless the graph is retained, natively for the native
backend) -> the public function
(validation, backend choice). Eager calls on plain tensors take the same forward and
backward through a plain autograd Function (_EagerDecorrelation), without the custom-op
dispatcher's host cost; torch.compile, fake tensors and tensor subclasses take the op.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from decpo import checks
from decpo.backend import implementation, resolve_backend
from decpo.numerics import accumulation_dtype, grad_dtype
from decpo.ops import Inputs, eager_call, eager_scope, input_grads

REDUCTIONS = ("mean", "sum")


def _decorrelation(
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
    normalize: bool,
    offdiag: bool,
    reduction: str,
    backend: str,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss 0-dim, d loss / d hidden or an empty tensor) for hidden (L, N, D)."""
    return implementation("decorrelation_penalty", backend)(
        hidden, mask, segment_ids, normalize, offdiag, reduction, compute_grad
    )


_INPUTS = Inputs(_decorrelation)
_decorrelation_op = torch.library.custom_op(
    "decpo::decorrelation_penalty", _decorrelation, mutates_args=()
)


@_decorrelation_op.register_fake
def _(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
    a = _INPUTS.bind(args, kwargs)
    hidden = a.hidden
    gdt = grad_dtype(hidden.dtype)
    grad = hidden.new_empty(hidden.shape, dtype=gdt) if a.compute_grad else hidden.new_empty(0)
    return hidden.new_empty((), dtype=accumulation_dtype(hidden.dtype)), grad


def _times_fp32(grad: Tensor, grad_loss: Tensor, out: Tensor) -> Tensor:
    """grad * grad_loss (0-dim fp32) formed in fp32 and rounded once into out (out may
    be grad itself), in one pass. On CPU PyTorch multiplies a bf16 tensor by a 0-dim
    fp32 one in fp32 already. CUDA casts a 0-dim operand to the other's dtype first (a
    bf16 upstream gradient: up to 2^-9 relative error in the whole result), so there
    the scalar gets a shape and takes part in type promotion; on CPU that shaped form
    runs a slow broadcast path (24 ms against 0.7 at 8 x 64 x 14336 bf16)."""
    scalar = grad_loss if grad.device.type == "cpu" else grad_loss.reshape([1] * grad.dim())
    return torch.mul(grad, scalar, out=out)


def _scale_torch(grad: Tensor, grad_loss: Tensor, dtype: torch.dtype) -> Tensor:
    """grad * grad_loss in dtype, multiplied in fp32 or better. fp32 and bf16 gradients
    take one pass (_times_fp32): the upcast copy and the cast back cost 5 ms of a
    14 ms CPU step at 8 x 64 x 14336."""
    if grad.dtype in (torch.bfloat16, torch.float32) and grad_loss.dtype == torch.float32:
        return _times_fp32(grad, grad_loss, torch.empty_like(grad, dtype=dtype))
    return (grad.to(torch.promote_types(grad.dtype, torch.float32)) * grad_loss).to(dtype)


def _scale_native(grad: Tensor, grad_loss: Tensor) -> Tensor:
    """grad * grad_loss in grad's dtype on the native library (one pass); PyTorch's
    multiply where the library does not take these inputs."""
    scaled = implementation("decorrelation_penalty", "native", backward=True)(grad, grad_loss)
    return _scale_torch(grad, grad_loss, grad.dtype) if scaled is None else scaled


# A custom op of its own, so that torch.compile traces the backward through it.
_scale_native_op = torch.library.custom_op(
    "decpo::decorrelation_scale_native", _scale_native, mutates_args=()
)


@_scale_native_op.register_fake
def _(grad: Tensor, grad_loss: Tensor) -> Tensor:
    return torch.empty_like(grad)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    ctx.mark_non_differentiable(output[1])
    # No zero-filled grad for the non-differentiable gradient output: materializing it
    # wrote an (L, N, D) tensor of zeros every backward (0.5 ms at 8 x 64 x 14336 bf16).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])
    bound = _INPUTS.bind(inputs)
    ctx.hidden_dtype = bound.hidden.dtype
    ctx.backend = bound.backend


def _backward(
    ctx: Any, grad_loss: Tensor | None, _grad_of_grad: Tensor | None
) -> tuple[Tensor | None, ...]:
    if torch.is_grad_enabled():  # create_graph=True: the stored gradient is a constant
        raise RuntimeError(
            "decpo.decorrelation_penalty does not support double backward (create_graph=True): "
            "its gradient is computed in the forward pass"
        )
    (grad,) = ctx.saved_tensors
    if grad_loss is None:  # not materialized: no gradient flows into the loss
        return input_grads(ctx, None)
    # The gradient was computed in the forward; scale it by the upstream gradient.
    if _last_use(grad, grad_loss, ctx.hidden_dtype):
        # Nothing reads the stored gradient after this backward: scale it in place.
        # A second (L, N, D) buffer per step also made glibc return the pair of them to
        # the OS, so every other step paid fresh-page faults (bf16 8 x 64 x 14336,
        # avx512bf16: backward 1.1 ms, or 21 ms in those steps).
        if ctx.backend == "native":
            native = implementation("decorrelation_penalty", "native", backward=True)
            scaled = native(grad, grad_loss, in_place=True)
            if scaled is not None:
                return input_grads(ctx, scaled)
        return input_grads(ctx, _times_fp32(grad, grad_loss, out=grad))
    if ctx.backend == "native" and grad.dtype == ctx.hidden_dtype:
        return input_grads(ctx, _scale_native_op(grad, grad_loss))
    return input_grads(ctx, _scale_torch(grad, grad_loss, ctx.hidden_dtype))


def _last_use(grad: Tensor, grad_loss: Tensor, hidden_dtype: torch.dtype) -> bool:
    """Whether the stored gradient may be scaled in place: eager (not traced by
    torch.compile), the graph freed after this backward (no retain_graph, which would
    run it again on the scaled values), and an in-place multiply with the bits of the
    out-of-place one (gradient in the input's dtype, fp32 or bf16, times a 0-dim fp32
    scalar on the same device: _times_fp32 either way)."""
    if torch.compiler.is_compiling() or torch._C._autograd._get_current_graph_task_keep_graph():
        return False
    same_math = grad.dtype == hidden_dtype and grad.dtype in (torch.bfloat16, torch.float32)
    return same_math and grad_loss.dtype == torch.float32 and grad_loss.dim() == 0


_decorrelation_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerDecorrelation(torch.autograd.Function):
    """The op's forward and autograd formula (_setup_context, _backward) without the
    dispatcher: returns the loss only."""

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> Tensor:
        with eager_scope():
            loss, grad = _decorrelation(*inputs)
        _setup_context(ctx, inputs, (loss, grad))
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor | None) -> tuple[Tensor | None, ...]:
        return _backward(ctx, grad_loss, None)


def decorrelation_penalty(
    hidden: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    normalize: bool = True,
    offdiag: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Frobenius penalty pushing the Gram matrix of (normalized) rows towards I.

    hidden: (N, D) or (L, N, D) floating tensor, rows are tokens. mask: (N,) bool,
    selects rows. segment_ids: (N,) int, groups rows (any order); rows interact only
    within their group. normalize: rows are scaled to unit norm first. offdiag: count
    only pairs i != j. reduction: "mean" (over counted pairs) or "sum". For (L, N, D)
    the result is the mean over layers. Returns a 0-dim fp32 tensor (float64 for
    float64 input); 0 with zero gradient when no pair is counted.
    """
    checks.floating("hidden", hidden)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be (N, D) or (L, N, D), got shape {tuple(hidden.shape)}")
    if hidden.shape[-1] == 0:
        raise ValueError(f"hidden must have at least one feature, got shape {tuple(hidden.shape)}")
    n = hidden.shape[-2]
    if mask is not None:
        checks.tensor("mask", mask)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got dtype {mask.dtype}")
        if mask.shape != (n,):
            raise ValueError(
                f"mask must have shape (N,) = ({n},) for hidden {tuple(hidden.shape)}, "
                f"got {tuple(mask.shape)}"
            )
    if segment_ids is not None:
        checks.integer("segment_ids", segment_ids)
        if segment_ids.shape != (n,):
            raise ValueError(
                f"segment_ids must have shape (N,) = ({n},) for hidden {tuple(hidden.shape)}, "
                f"got {tuple(segment_ids.shape)}"
            )
    checks.same_device(hidden=hidden, mask=mask, segment_ids=segment_ids)
    checks.flag("normalize", normalize)
    checks.flag("offdiag", offdiag)
    checks.choice("reduction", reduction, REDUCTIONS)
    resolved = resolve_backend("decorrelation_penalty", backend, hidden.device, hidden.dtype)

    compute_grad = hidden.requires_grad and torch.is_grad_enabled()
    layered = hidden if hidden.dim() == 3 else hidden.unsqueeze(0)  # (L, N, D)
    inputs = (layered, mask, segment_ids, normalize, offdiag, reduction, resolved, compute_grad)
    if eager_call(hidden, mask, segment_ids):
        return _EagerDecorrelation.apply(*inputs)
    loss, _ = _decorrelation_op(*inputs)
    return loss
