"""token_logprobs and logprobs_from_logits: per-token log p(y_t | context).

Layers: backend kernels (decpo.<backend>_backend.logprobs for torch, triton and
native, chosen through decpo.backend's registry) -> custom ops decpo::token_logprobs
/ decpo::logprobs_from_logits and their backward ops -> autograd formulas -> the
public functions (validation, flattening to 2-D, backend choice).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from decpo import checks
from decpo.backend import implementation, resolve_backend
from decpo.numerics import accumulation_dtype
from decpo.ops import Inputs, input_grads

# ---------------------------------------------------------------- token_logprobs


class TokenStats(NamedTuple):
    """Per-token statistics of the final-logit distribution p = softmax(z), computed
    by token_logprobs(..., return_stats=True) in the same pass as the log-probs (no
    extra matmul). Each is fp32 (float64 for float64 input), shaped like targets,
    detached (no gradient), and 0 where the target is ignore_index.

    entropy:      H = logsumexp(z) - sum_v p_v z_v.
    logit_sum:    sum_v z_v over the whole vocabulary; TRL's mean logit (the logits/chosen
                  and logits/rejected metrics) is logit_sum / V.
    argmax_match: 1.0 where z_y == max_v z_v, else 0.0. A tie at the maximum counts as a
                  match (TRL's is_top1 takes torch.argmax's first maximum, so a tie with
                  an earlier vocabulary entry is a miss there; with continuous logits ties
                  are vanishingly rare). Sums to TRL's mean_token_accuracy numerator.
    log_sum_p2:   log sum_v p_v^2 = logsumexp(2 z) - 2 logsumexp(z), TRL's
                  log_sum_sq_probs (the WPO weights, use_weighting=True).
    """

    entropy: torch.Tensor
    logit_sum: torch.Tensor
    argmax_match: torch.Tensor
    log_sum_p2: torch.Tensor


def _token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    temperature: float,
    softcap: float,
    logit_scale: float,
    backend: str,
    frozen_grad: bool,
    with_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp (N,), lse (N,), d logp / d hidden (N, D) if frozen_grad else empty,
    stats (N, 4) [entropy, logit_sum, argmax_match, log_sum_p2] if with_stats else empty)."""
    checks.targets_in_range(targets, weight.shape[0], ignore_index)
    return implementation("token_logprobs", backend)(
        hidden, weight, targets, bias, ignore_index, temperature, softcap, logit_scale,
        frozen_grad, with_stats,
    )  # fmt: skip


_TOKEN_INPUTS = Inputs(_token_logprobs)
_token_logprobs_op = torch.library.custom_op(
    "decpo::token_logprobs", _token_logprobs, mutates_args=()
)


@_token_logprobs_op.register_fake
def _(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    a = _TOKEN_INPUTS.bind(args, kwargs)
    n = a.hidden.shape[0]
    out_dtype = accumulation_dtype(a.hidden.dtype)
    grad = a.hidden.new_empty(a.hidden.shape if a.frozen_grad else (0,))
    stats = a.hidden.new_empty((n, 4) if a.with_stats else (0,), dtype=out_dtype)
    return (
        a.hidden.new_empty(n, dtype=out_dtype),
        a.hidden.new_empty(n, dtype=out_dtype),
        grad,
        stats,
    )


def _token_logprobs_backward(
    grad_logp: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    ignore_index: int,
    temperature: float,
    softcap: float,
    logit_scale: float,
    backend: str,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d hidden, d weight, d bias) for a trainable head, each empty when not needed."""
    return implementation("token_logprobs", backend, backward=True)(
        grad_logp, hidden, weight, targets, bias, lse, ignore_index, temperature,
        softcap, logit_scale, need_hidden, need_weight, need_bias,
    )  # fmt: skip


_TOKEN_BACKWARD_INPUTS = Inputs(_token_logprobs_backward)
_token_logprobs_backward_op = torch.library.custom_op(
    "decpo::token_logprobs_backward", _token_logprobs_backward, mutates_args=()
)


@_token_logprobs_backward_op.register_fake
def _(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor, Tensor]:
    a = _TOKEN_BACKWARD_INPUTS.bind(args, kwargs)
    d_hidden = a.hidden.new_empty(a.hidden.shape if a.need_hidden else (0,))
    d_weight = a.weight.new_empty(a.weight.shape if a.need_weight else (0,))
    has_d_bias = a.need_bias and a.bias is not None
    d_bias = a.bias.new_empty(a.bias.shape) if has_d_bias else a.weight.new_empty(0)
    return d_hidden, d_weight, d_bias


def _token_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    a = _TOKEN_INPUTS.bind(inputs)
    _logp, lse, grad, stats = output
    ctx.mark_non_differentiable(lse, grad, stats)
    # No zero-filled grads for the non-differentiable outputs (the (N, D) gradient
    # among them): only logp's gradient is used.
    ctx.set_materialize_grads(False)
    ctx.frozen_grad = a.frozen_grad
    ctx.args = (a.ignore_index, a.temperature, a.softcap, a.logit_scale, a.backend)
    ctx.has_bias = a.bias is not None
    if a.frozen_grad:
        ctx.save_for_backward(grad)
    else:
        ctx.save_for_backward(a.hidden, a.weight, a.targets, a.bias, lse)


def _token_backward(
    ctx: Any, grad_logp: Tensor | None, *_unused: Tensor | None
) -> tuple[Tensor | None, ...]:
    if grad_logp is None:  # not materialized: no gradient flows into logp
        return input_grads(ctx)
    if ctx.frozen_grad:
        # One-pass frozen head: d hidden = g * d logp / d hidden, computed in the forward.
        # That stored gradient is a constant to autograd, so a second derivative through
        # it would be silently wrong: refuse it.
        if torch.is_grad_enabled():
            raise RuntimeError(
                "decpo.token_logprobs with a frozen head does not support double backward "
                "(create_graph=True): its gradient is computed in the forward pass"
            )
        (grad,) = ctx.saved_tensors
        return input_grads(ctx, (grad.to(grad_logp.dtype) * grad_logp[:, None]).to(grad.dtype))
    hidden, weight, targets, bias, lse = ctx.saved_tensors
    need_hidden, need_weight, _, need_bias = ctx.needs_input_grad[:4]
    need_bias = need_bias and ctx.has_bias
    d_hidden, d_weight, d_bias = _token_logprobs_backward_op(
        grad_logp.contiguous(), hidden, weight, targets, bias, lse, *ctx.args,
        need_hidden, need_weight, need_bias,
    )  # fmt: skip
    return input_grads(
        ctx,
        d_hidden if need_hidden else None,
        d_weight if need_weight else None,
        None,
        d_bias if need_bias else None,
    )


_token_logprobs_op.register_autograd(_token_backward, setup_context=_token_setup_context)


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_stats: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, TokenStats]:
    """log softmax(z) gathered at targets, without materializing the logits, where
    z = softcap tanh(logit_scale (hidden @ weight.T + bias) / softcap) / temperature
    (z = logit_scale (hidden @ weight.T + bias) / temperature when softcap is None).

    hidden (..., D) floating; weight (V, D), the LM head, same dtype; targets (...)
    int64 in [0, V) or ignore_index; bias (V,) optional. Returns fp32 log-probs
    (float64 for float64 input) shaped like targets, 0 where targets == ignore_index.
    Differentiable in hidden, weight and bias; with a frozen head (weight and bias
    not requiring grad) the gradient is computed in the forward pass, the chain rule
    through the scale and the softcap included.

    Model conventions: Gemma 2/3 final_logit_softcapping -> softcap; Cohere logit_scale
    -> logit_scale; Granite logits_scaling -> logit_scale = 1 / logits_scaling.

    return_stats=True returns (logp, TokenStats(entropy, logit_sum, argmax_match,
    log_sum_p2)), computed in the same pass; see TokenStats.
    """
    checks.floating("hidden", hidden)
    checks.floating("weight", weight)
    checks.integer("targets", targets)
    if hidden.dim() < 1:
        raise ValueError("hidden must be (..., D), got a 0-dim tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must be (V, D), got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight (V, D) = {tuple(weight.shape)} does not match hidden (..., D) = "
            f"{tuple(hidden.shape)}: D differs"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row, got V = 0")
    if hidden.shape[-1] == 0:
        raise ValueError(f"hidden must have D >= 1 features, got shape {tuple(hidden.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, "
            f"got {tuple(targets.shape)}"
        )
    if bias is not None:
        checks.floating("bias", bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(
                f"bias must have shape (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}"
            )
    checks.same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    checks.same_dtype(hidden=hidden, weight=weight, bias=bias)
    checks.integer_scalar("ignore_index", ignore_index)
    temperature = checks.positive_float("temperature", temperature)
    softcap_value = 0.0 if softcap is None else checks.positive_float("softcap", softcap)
    logit_scale = _finite_float("logit_scale", logit_scale)
    resolved = resolve_backend("token_logprobs", backend, hidden.device, hidden.dtype)

    grad_on = torch.is_grad_enabled()
    head_trainable = grad_on and (weight.requires_grad or (bias is not None and bias.requires_grad))
    frozen_grad = grad_on and hidden.requires_grad and not head_trainable
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, D)
    flat_targets = targets.reshape(-1).long()  # (N,)
    logp, _, _, stats = _token_logprobs_op(
        flat_hidden, weight, flat_targets, bias, ignore_index, temperature, softcap_value,
        logit_scale, resolved, frozen_grad, bool(return_stats),
    )  # fmt: skip
    logp = logp.reshape(targets.shape)
    if not return_stats:
        return logp
    return logp, TokenStats(*(stats[:, k].reshape(targets.shape) for k in range(4)))


def _finite_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


# ---------------------------------------------------------- logprobs_from_logits


def _logprobs_from_logits(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, temperature: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp (N,), lse (N,)) for logits (N, V)."""
    checks.targets_in_range(targets, logits.shape[1], ignore_index)
    return implementation("logprobs_from_logits", backend)(
        logits, targets, ignore_index, temperature
    )


_LOGITS_INPUTS = Inputs(_logprobs_from_logits)
_logits_op = torch.library.custom_op(
    "decpo::logprobs_from_logits", _logprobs_from_logits, mutates_args=()
)


@_logits_op.register_fake
def _(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
    logits = _LOGITS_INPUTS.bind(args, kwargs).logits
    n, out_dtype = logits.shape[0], accumulation_dtype(logits.dtype)
    return logits.new_empty(n, dtype=out_dtype), logits.new_empty(n, dtype=out_dtype)


def _logprobs_from_logits_backward(
    grad_logp: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    temperature: float,
    backend: str,
) -> torch.Tensor:
    """d logits (N, V), contiguous in the logits' dtype."""
    return implementation("logprobs_from_logits", backend, backward=True)(
        grad_logp, logits, targets, lse, ignore_index, temperature
    )


_LOGITS_BACKWARD_INPUTS = Inputs(_logprobs_from_logits_backward)
_logits_backward_op = torch.library.custom_op(
    "decpo::logprobs_from_logits_backward", _logprobs_from_logits_backward, mutates_args=()
)


@_logits_backward_op.register_fake
def _(*args: Any, **kwargs: Any) -> Tensor:
    logits = _LOGITS_BACKWARD_INPUTS.bind(args, kwargs).logits
    return logits.new_empty(logits.shape)  # contiguous, as every backend returns


def _logits_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    a = _LOGITS_INPUTS.bind(inputs)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled grad for lse
    ctx.save_for_backward(a.logits, a.targets, output[1])
    ctx.args = (a.ignore_index, a.temperature, a.backend)


def _logits_backward(
    ctx: Any, grad_logp: Tensor | None, _g_lse: Tensor | None
) -> tuple[Tensor | None, ...]:
    if grad_logp is None:  # not materialized: no gradient flows into logp
        return input_grads(ctx)
    logits, targets, lse = ctx.saved_tensors
    return input_grads(
        ctx, _logits_backward_op(grad_logp.contiguous(), logits, targets, lse, *ctx.args)
    )


_logits_op.register_autograd(_logits_backward, setup_context=_logits_setup_context)


def logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """log softmax(logits / temperature) gathered at targets, one read of the logits.

    logits (..., V) floating; targets (...) int64 in [0, V) or ignore_index. Returns
    fp32 log-probs (float64 for float64 input) shaped like targets, 0 at ignored
    positions. Differentiable in logits.
    """
    checks.floating("logits", logits)
    checks.integer("targets", targets)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be (..., V) with V >= 1, got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, "
            f"got {tuple(targets.shape)}"
        )
    checks.same_device(logits=logits, targets=targets)
    checks.integer_scalar("ignore_index", ignore_index)
    temperature = checks.positive_float("temperature", temperature)
    resolved = resolve_backend("logprobs_from_logits", backend, logits.device, logits.dtype)

    flat_logits = logits.reshape(-1, logits.shape[-1])  # (N, V)
    flat_targets = targets.reshape(-1).long()  # (N,)
    logp, _ = _logits_op(flat_logits, flat_targets, ignore_index, temperature, resolved)
    return logp.reshape(targets.shape)
