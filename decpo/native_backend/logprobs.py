"""Per-token log-probs on the native CPU library (kernels/logprobs_from_logits.cpp,
kernels/online_softmax_tile.cpp), fp32 and bf16.

logprobs_from_logits: one C++ pass per row in the forward (online logsumexp and the
target gather, vectorized exp, OpenMP over rows) and one in the backward (read the
logits once, write d logits once): 2 reads + 1 write of N V elements in all, the
memory-bound minimum.

token_logprobs: the torch backend's tiling (decpo.torch_backend.logprobs), with
PyTorch's matmuls per (row chunk, vocabulary chunk) tile and the per-tile softmax
steps fused into one C++ pass over the tile (online_softmax_tile): one read and one
write of each R x Vc tile instead of one torch op (and one pass) per step.
A trainable head's backward recomputes tiles with the torch backend's code.
bf16 inputs on a CPU without bf16 dot products (no AVX512_BF16, no AMX; or the
kernels forced below the avx512bf16 variant) are multiplied as fp32 tiles, each
weight chunk converted as it is used: PyTorch's bf16 matmul runs at ~0.5 GFLOP/s
there against ~120 GFLOP/s in fp32 (2 cores), and the fp32 product is at least as
accurate. library.native_bf16_dot() makes that decision.
"""

from __future__ import annotations

import ctypes

import torch

from decpo.native_backend.library import DTYPE_CODES, library, native_bf16_dot
from decpo.torch_backend import logprobs as torch_logprobs


def _check_status(status: int, fn: str, n_vocab: int, ignore_index: int) -> None:
    if status == 2:
        raise ValueError(f"targets must be in [0, {n_vocab}) or equal ignore_index={ignore_index}")
    assert status == 0, f"{fn} returned {status}"


def _unit_column_stride(logits: torch.Tensor) -> torch.Tensor:
    assert logits.dim() == 2 and logits.device.type == "cpu" and logits.dtype in DTYPE_CODES
    return logits if logits.stride(1) == 1 else logits.contiguous()


def logprobs_from_logits(
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
        logits.data_ptr(), DTYPE_CODES[logits.dtype], n, v, logits.stride(0),
        targets.data_ptr(), ignore_index, 1.0 / temperature,
        logp.data_ptr(), lse.data_ptr(),
    )  # fmt: skip
    _check_status(status, "decpo_logprobs_from_logits_fwd", v, ignore_index)
    return logp, lse


def logprobs_from_logits_backward(
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
        grad_logp.data_ptr(), logits.data_ptr(), DTYPE_CODES[logits.dtype], n, v,
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
    assert tile.dim() == 2 and tile.stride(1) == 1 and tile.dtype in DTYPE_CODES
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in (m, s_other, s_target))
    assert target_logit.is_contiguous() and local_targets.is_contiguous()
    assert stats is None or (stats.dtype == torch.float32 and stats.is_contiguous())
    n, v = tile.shape
    rescale = torch.empty(n, dtype=torch.float32)
    if bias is not None:
        bias = bias.to(torch.float32).contiguous()
    status = library().decpo_online_softmax_tile(
        tile.data_ptr(), DTYPE_CODES[tile.dtype], n, v, tile.stride(0),
        None if bias is None else bias.data_ptr(), inv_temperature, softcap, logit_scale,
        local_targets.data_ptr(), m.data_ptr(), s_other.data_ptr(), s_target.data_ptr(),
        target_logit.data_ptr(), None if stats is None else stats.data_ptr(),
        rescale.data_ptr(),
    )  # fmt: skip
    assert status == 0, f"decpo_online_softmax_tile returned {status}"
    return rescale


def token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
    bias: torch.Tensor | None, ignore_index: int, temperature: float, softcap: float,
    logit_scale: float, frozen_grad: bool, with_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The torch backend's token_logprobs with online_softmax_tile as its tile epilogue;
    same arguments and outputs."""
    return torch_logprobs.token_logprobs(
        hidden, weight, targets, bias, ignore_index, temperature, softcap, logit_scale,
        frozen_grad, with_stats, epilogue=online_softmax_tile,
        matmul_dtype=matmul_dtype(hidden.dtype), widen=widen_bf16,
    )  # fmt: skip


def widen_bf16(src: torch.Tensor, dst: torch.Tensor) -> bool | None:
    """dst = src widened from bf16 to fp32 (exact), both (R, D) on CPU with unit column
    stride, in one native pass that also checks every element: whether all are finite.
    None (nothing written) for other dtypes or layouts."""
    layouts = src.stride(1) == 1 and dst.stride(1) == 1 and src.shape == dst.shape
    dtypes = src.dtype == torch.bfloat16 and dst.dtype == torch.float32
    if not (layouts and dtypes and src.device.type == "cpu" and dst.device.type == "cpu"):
        return None
    finite = ctypes.c_int(0)
    status = library().decpo_widen_bf16(
        src.data_ptr(), src.shape[0], src.shape[1], src.stride(0), dst.data_ptr(),
        dst.stride(0), ctypes.byref(finite),
    )  # fmt: skip
    assert status == 0, f"decpo_widen_bf16 returned {status}"
    return bool(finite.value)


def matmul_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """fp32 for bf16 inputs on a CPU without bf16 dot products, else None (the
    inputs' own dtype)."""
    return torch.float32 if dtype == torch.bfloat16 and not native_bf16_dot() else None


def token_logprobs_backward(
    grad_logp: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
    bias: torch.Tensor | None, lse: torch.Tensor, ignore_index: int, temperature: float,
    softcap: float, logit_scale: float, need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """A trainable head's backward: the torch backend's (it recomputes each logit tile
    and is bound by its matmuls, which PyTorch runs), with the same matmul dtype and
    native widening of bf16 weight chunks as the forward."""
    return torch_logprobs.token_logprobs_backward(
        grad_logp, hidden, weight, targets, bias, lse, ignore_index, temperature, softcap,
        logit_scale, need_hidden, need_weight, need_bias, matmul_dtype(hidden.dtype), widen_bf16,
    )  # fmt: skip
