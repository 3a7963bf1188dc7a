"""Decorrelation penalty on the native CPU library (kernels/decorrelation.cpp), fp32
and bf16: loss and gradient of every (layer, group) in one call.

Groups with n <= D (Gram path) multiply the raw rows: R = H H^T on register-tiled C++
GEMMs (vdpbf16ps bf16 dot products straight on bf16 input where the CPU has
AVX512_BF16, fp32 FMAs otherwise; upper tiles only), G = R / (d_i d_j), the loss from
E = G - I, and the gradient as one product dh = M H with the normalization's backward
folded into the n x n matrix M (for groups of <= 256 rows one fused pass that writes
dh from the register tiles; contiguous rows are read in place). Groups with n > D are
normalized once into a reused buffer and go through C = Z^T Z and Z (C - cI), the
normalization's backward fused into the epilogue. The gradient is written once in the
input dtype. OpenMP runs across (layer, group) units when they share evenly between
the threads, otherwise inside each product. The backward scales that stored gradient
by the upstream gradient in one native pass (decorrelation_penalty_backward).

The baseline (SSE, no FMA) variant multiplies 4 lanes at a time, at most 8 flop per
cycle and core; PyTorch's BLAS on the same CPU is never slower than that. A group's
product costs n D min(n, D) multiply-adds against ~n D for the passes around it, so
once min(n, D) passes BASELINE_PRODUCT_LIMIT the products decide, and the baseline
variant hands the call to the torch backend (PyTorch's matmul), with each group's row
gather and widening and its gradient's rounding and scatter in one native pass each
(copy_rows): bf16 then moves half the bytes of fp32 around the same products, where
widening the whole input first made it the slower twin (bf16 / fp32, 4 groups x 512,
D=4096, median of same-round ratios in three runs: 1.04-1.34 before, 0.93-1.00 after).
Measured on 2 cores with the kernels forced to baseline (bf16, fwd+bwd; native / torch
backend, ms): 16 x 128, D=4096: 133 / 205; 8 x 256, D=4096: 223 / 221; 2 x 1024,
D=1024: 174 / 112; 1 x 8192, D=512: 249 / 103.
"""

from __future__ import annotations

import torch

from decpo.native_backend.library import DTYPE_CODES, active_isa, library
from decpo.numerics import accumulation_dtype, bucket_rows, grad_dtype
from decpo.torch_backend import decorrelation as torch_decorrelation

BASELINE_PRODUCT_LIMIT = 256


def decorrelation_penalty(
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
    normalize: bool,
    offdiag: bool,
    reduction: str,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Penalty and (if compute_grad) its gradient for hidden (L, N, D), fp32 or bf16
    on CPU: (loss 0-dim fp32, grad (L, N, D) contiguous in hidden's dtype, already
    scaled for the reduction and the layer mean, or an empty tensor), as the torch
    backend returns them."""
    assert hidden.device.type == "cpu" and hidden.dtype in DTYPE_CODES
    n_layers, n, dim = hidden.shape
    if hidden.stride(2) != 1:
        hidden = hidden.contiguous()
    if mask is None and segment_ids is None:
        rows, sizes = None, [n]
    else:
        rows, sizes = bucket_rows(n, mask, segment_ids, hidden.device)
        rows = rows.to(torch.int64).contiguous()
    largest_product = max((min(s, dim) for s in sizes), default=0)
    if active_isa() == "baseline" and largest_product > BASELINE_PRODUCT_LIMIT:
        # The torch backend computes in fp32; PyTorch's gathers and bf16 conversions run
        # at SSE speed here, so each group's rows are gathered and widened, and its
        # gradient rounded and scattered, in one native pass each: the torch backend's
        # own bits, and bf16 moves half the bytes of its fp32 twin there.
        return torch_decorrelation.decorrelation_penalty(
            hidden, mask, segment_ids, normalize, offdiag, reduction, compute_grad, copy_rows
        )
    pairs = sum(s * (s - 1) if offdiag else s * s for s in sizes)
    # Rows outside every group keep a zero gradient; the kernel writes the others.
    full = rows is None or rows.numel() == n
    grad = (
        (torch.empty if full else torch.zeros)(hidden.shape, dtype=grad_dtype(hidden.dtype))
        if compute_grad
        else hidden.new_empty(0)
    )
    out_dtype = accumulation_dtype(hidden.dtype)
    if pairs == 0 or n_layers == 0:
        return hidden.new_zeros((), dtype=out_dtype), grad.zero_()

    # d(loss)/d(P_sum of layer l): 1/L for the mean over layers, 1/pairs for "mean".
    grad_scale = 1.0 / n_layers / (pairs if reduction == "mean" else 1)
    offsets = torch.zeros(len(sizes) + 1, dtype=torch.int64)  # (G + 1,)
    offsets[1:] = torch.tensor(sizes, dtype=torch.int64).cumsum(0)
    p_sum = torch.empty(n_layers, dtype=torch.float64)  # (L,)
    status = library().decpo_decorrelation_penalty(
        hidden.data_ptr(), DTYPE_CODES[hidden.dtype], n_layers, n, dim, hidden.stride(0),
        hidden.stride(1), None if rows is None else rows.data_ptr(), offsets.data_ptr(),
        len(sizes), int(normalize), int(offdiag), grad_scale, p_sum.data_ptr(),
        grad.data_ptr() if compute_grad else None,
    )  # fmt: skip
    if status == 4:
        raise MemoryError("decpo_decorrelation_penalty: no memory for its workspace")
    assert status == 0, f"decpo_decorrelation_penalty returned {status}"
    loss = (p_sum.sum() * grad_scale).to(out_dtype)
    # NaN or Inf anywhere in the selected rows must not come out as a finite number.
    loss = torch.where(torch.isfinite(loss), loss, torch.full_like(loss, float("nan")))
    return loss, grad


def decorrelation_penalty_backward(
    grad: torch.Tensor, grad_loss: torch.Tensor, in_place: bool = False
) -> torch.Tensor | None:
    """grad * grad_loss in grad's dtype (fp32 products, one rounding: the bits of
    PyTorch's bf16 tensor times fp32 scalar), in one native pass, into grad itself when
    in_place; None where this does not apply (grad_loss not an fp32 scalar on CPU, or a
    dtype the library does not take). PyTorch's bf16 multiply runs at SSE speed on CPUs
    below AVX2 (or with ATEN_CPU_CAPABILITY=default): 4.7 ms against 2.4 ms in fp32 at
    8 x 64 x 14336, the one place the bf16 path was slower than fp32 there."""
    scalar = grad_loss.numel() == 1 and grad_loss.device.type == "cpu"
    if not (scalar and grad_loss.dtype == torch.float32 and grad.dtype in DTYPE_CODES):
        return None
    assert grad.device.type == "cpu" and grad.is_contiguous()
    out = grad if in_place else torch.empty_like(grad)
    code = DTYPE_CODES[grad.dtype]
    status = library().decpo_scale(
        grad.data_ptr(), code, grad.numel(), float(grad_loss), out.data_ptr(), code
    )
    assert status == 0, f"decpo_scale returned {status}"
    return out


def copy_rows(
    src: torch.Tensor,
    src_rows: torch.Tensor | None,
    dst: torch.Tensor,
    dst_rows: torch.Tensor | None,
) -> None:
    """dst[:, dst_rows] = src[:, src_rows] (all rows where None) in dst's dtype, one
    native pass (decpo_copy_rows): src and dst (L, *, D) fp32 or bf16 on CPU with unit
    stride along D, the row lists (n,) int64 of the same length. The torch backend's
    RowCopy."""
    assert src.dim() == dst.dim() == 3 and src.shape[0] == dst.shape[0]
    assert src.shape[2] == dst.shape[2] and src.stride(2) == 1 and dst.stride(2) == 1
    assert src.dtype in DTYPE_CODES and dst.dtype in DTYPE_CODES
    n_layers, n = src.shape[0], src.shape[1] if src_rows is None else src_rows.numel()
    assert n == (dst.shape[1] if dst_rows is None else dst_rows.numel())

    def offsets(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:  # (L * n,)
        index = torch.arange(t.shape[1]) if rows is None else rows.to(torch.int64)
        return (torch.arange(n_layers)[:, None] * t.stride(0) + index * t.stride(1)).reshape(-1)

    src_off, dst_off = offsets(src, src_rows), offsets(dst, dst_rows)
    status = library().decpo_copy_rows(
        src.data_ptr(), DTYPE_CODES[src.dtype], src_off.data_ptr(), 0,
        dst.data_ptr(), DTYPE_CODES[dst.dtype], dst_off.data_ptr(), 0,
        n_layers * n, src.shape[2], 1.0,
    )  # fmt: skip
    assert status == 0, f"decpo_copy_rows returned {status}"
