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

Every variant runs these kernels, baseline (SSE2, no FMA) included. Against
PyTorch's BLAS held to the same class (MKL's SSE2 path, MKL_CBWR=COMPATIBLE) they are
no slower at any group size measured (2 cores, kernels forced to baseline, fwd+bwd,
median of 7 interleaved rounds; native / PyTorch's matmuls through the torch backend,
ms): fp32 4 x 512, D=4096: 383 / 457; 16 x 512, D=1024: 245 / 365; 2 x 1024,
D=1024: 230 / 232; 1 x 8192, D=512: 143 / 163; bf16 274 / 348, 245 / 338, 185 / 195,
164 / 190. (An earlier hand-over of large products to PyTorch on this variant was
measured with MKL running its AVX-512 kernels, which it does on this AMD CPU whatever
MKL_ENABLE_INSTRUCTIONS says: a rate no SSE CPU has.)
"""

from __future__ import annotations

import torch

from decpo.native_backend.library import DTYPE_CODES, library
from decpo.numerics import accumulation_dtype, bucket_rows, grad_dtype


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
    status = library().decpo_scale(
        grad.data_ptr(), DTYPE_CODES[grad.dtype], grad.numel(), float(grad_loss), out.data_ptr()
    )
    assert status == 0, f"decpo_scale returned {status}"
    return out
