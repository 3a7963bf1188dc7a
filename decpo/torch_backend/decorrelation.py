"""Decorrelation penalty in pure PyTorch: loss and gradient together, per group.

Per group of n selected rows Z (n, D) (normalized rows when normalize=True) the
penalty is P_sum = sum over counted pairs (G_ij - delta_ij)^2 with G = Z Z^T.
Two exact paths; the cheaper is chosen per group (docs/design.md,
"decorrelation_penalty" under "Algorithms and budgets"):

- Gram path, n <= D: G = Z Z^T costs n^2 D multiply-adds, dZ = 4 (G - I) Z another
  n^2 D; the (n, n) matrix is no larger than Z itself.
- Covariance path, n > D: C = Z^T Z costs n D^2, dZ = 4 Z (C - I) another n D^2,
  and only the (D, D) matrix is held, never (n, n). Rows are streamed in chunks so
  no fp32 copy of the whole group is held either. The loss is evaluated as
      P_sum = ||C - cI||_F^2 + (s - D)^2 / D + (n - D)       (full, c = s / D)
      P_sum = ||C - cI||_F^2 + s^2 / D - sum ||z_i||^4       (offdiag)
  with s = sum ||z_i||^2 = tr C; this equals ||C||_F^2 - 2 s + n (resp.
  ||C||_F^2 - sum ||z_i||^4) exactly, but the full form is a sum of non-negative
  terms (n > D), so nothing cancels when n is close to D.

All arithmetic is in fp32 (float64 for float64 input). The gradient is computed
only when asked for and returned in the input dtype, already scaled for the
reduction and the mean over layers; the autograd backward multiplies it by
grad_output.
"""

from __future__ import annotations

import torch

from decpo.numerics import EPS, accumulation_dtype, bucket_rows, grad_dtype

# Rows per chunk on the covariance path: bounds the fp32 working copy to
# ROW_CHUNK x D per layer. Groups whose whole fp32 copy is at most KEEP_BYTES are
# held instead, so the normalization is not recomputed for the gradient.
ROW_CHUNK = 4096
KEEP_BYTES = 64 << 20
# Column block of the symmetric product A^T A: only the blocks on and above the
# diagonal are multiplied, (k + 1) / 2k of the FLOPs for k blocks (k = 4 at D = 512
# saves 37%); blocks narrower than 128 columns lose more to matmul efficiency.
SYMMETRIC_BLOCK = 128


def _symmetric_product(a: torch.Tensor) -> torch.Tensor:
    """a^T a for a (L, m, k), exploiting symmetry: (L, k, k)."""
    k = a.shape[-1]
    if k <= SYMMETRIC_BLOCK:
        return a.transpose(1, 2) @ a
    out = a.new_empty((a.shape[0], k, k))
    for i in range(0, k, SYMMETRIC_BLOCK):
        j = min(i + SYMMETRIC_BLOCK, k)
        block = a[:, :, i:j].transpose(1, 2) @ a[:, :, i:]  # (L, b, k - i): row i..j, col i..
        out[:, i:j, i:] = block
        out[:, j:, i:j] = block[:, :, j - i :].transpose(1, 2)
    return out


def _normalize(h: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """z = h / max(||h||, eps) row-wise; returns (z, clamped norms or None)."""
    if not normalize:
        return h, None
    denom = torch.linalg.vector_norm(h, dim=-1, keepdim=True).clamp_min(EPS)  # (L, n, 1)
    return h / denom, denom


def _row_gradient(
    y: torch.Tensor, a: torch.Tensor | float, z: torch.Tensor, denom: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:  # fmt: skip
    """scale * dP/dh for dP/dz = 4 (y - a z), y and z (L, n, D), a (L, n, 1) or a number.

    Through z = h / max(||h||, eps): dh = (dz - (dz . z) z) / ||h||, and dh = dz / eps
    where the norm was clamped (the exact derivative of the clamped formula). Both
    are (y - b z) * 4 scale / denom with b = a + [||h|| > eps] ((y . z) - a ||z||^2),
    so the whole epilogue is one row dot, one multiply-add and one scaling pass.
    """
    if denom is None:
        # a is a number here: as a 0-dim host tensor it must be addcmul's second factor
        # (CUDA takes a host scalar there, not as the first).
        return torch.addcmul(y, z, torch.as_tensor(a, dtype=y.dtype), value=-1.0).mul_(4 * scale)
    yz = torch.linalg.vecdot(y, z).unsqueeze(-1)  # (L, n, 1)
    zz = torch.linalg.vecdot(z, z).unsqueeze(-1)
    b = a + torch.where(denom > EPS, yz - a * zz, torch.zeros_like(yz))
    return torch.addcmul(y, b, z, value=-1.0).mul_((4 * scale) / denom)


def _gram_group(
    h: torch.Tensor, normalize: bool, offdiag: bool, compute_grad: bool, grad_scale: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(P_sum per layer (L,), grad_scale * dH (L, n, D) or None) for a group with n <= D."""
    z, denom = _normalize(h, normalize)  # (L, n, D)
    e = _symmetric_product(z.transpose(1, 2))  # (L, n, n) = G = Z Z^T
    diag = e.diagonal(dim1=1, dim2=2)
    if offdiag:
        diag.zero_()
    else:
        diag.sub_(1.0)
    p_sum = e.square().sum((1, 2))  # (L,)
    if not compute_grad:
        return p_sum, None
    # E is symmetric: dP/dz_i = 4 sum_j E_ij z_j
    return p_sum, _row_gradient(e @ z, 0.0, z, denom, grad_scale)


def _covariance_group(
    hidden: torch.Tensor,
    rows: torch.Tensor | None,
    normalize: bool,
    offdiag: bool,
    compute_dtype: torch.dtype,
    grad_out: torch.Tensor | None,
    grad_scale: float,
) -> torch.Tensor:
    """P_sum per layer (L,) for one group with n > D; writes scaled dH into grad_out."""
    n_layers, n_total, dim = hidden.shape
    n = n_total if rows is None else rows.numel()

    keep = n_layers * n * dim * torch.finfo(compute_dtype).bits // 8 <= KEEP_BYTES
    row_chunk = n if keep else ROW_CHUNK

    def chunk(start: int) -> torch.Tensor:  # (L, c, D) in compute dtype
        if rows is None:
            return hidden[:, start : start + row_chunk].to(compute_dtype)
        return hidden[:, rows[start : start + row_chunk]].to(compute_dtype)

    cov = hidden.new_zeros((n_layers, dim, dim), dtype=compute_dtype)  # C = Z^T Z
    sq_sum = hidden.new_zeros(n_layers, dtype=torch.float64)  # s = sum ||z||^2
    quad_sum = hidden.new_zeros(n_layers, dtype=torch.float64)  # sum ||z||^4
    kept: tuple[torch.Tensor, torch.Tensor | None] | None = None
    for start in range(0, n, row_chunk):
        z, denom = _normalize(chunk(start), normalize)
        cov += _symmetric_product(z)
        sq = torch.linalg.vecdot(z, z).double()  # (L, c)
        sq_sum += sq.sum(-1)
        quad_sum += sq.square().sum(-1)
        if keep:
            kept = (z, denom)

    c = (sq_sum / dim).to(compute_dtype)  # (L,)
    centered = cov - c[:, None, None] * torch.eye(dim, dtype=compute_dtype, device=cov.device)
    p_sum = centered.square().sum((1, 2)).double()
    if offdiag:
        p_sum = p_sum + sq_sum.square() / dim - quad_sum
    else:
        p_sum = p_sum + (sq_sum - dim).square() / dim + (n - dim)

    if grad_out is not None:
        for start in range(0, n, row_chunk):
            z, denom = kept if kept is not None else _normalize(chunk(start), normalize)
            # dP/dz = 4 (C z - z), or 4 (C z - ||z||^2 z) for offdiag
            a = torch.linalg.vecdot(z, z).unsqueeze(-1) if offdiag else 1.0
            dh = _row_gradient(z @ cov, a, z, denom, grad_scale).to(grad_out.dtype)
            if rows is None:
                grad_out[:, start : start + row_chunk] = dh
            else:
                grad_out[:, rows[start : start + row_chunk]] = dh
    return p_sum.to(compute_dtype)


def _groups(
    n: int, mask: torch.Tensor | None, segment_ids: torch.Tensor | None, device: torch.device
) -> list[torch.Tensor | None]:
    """Row indices of each group (None = all n rows in one group)."""
    if mask is None and segment_ids is None:
        return [None]
    rows, sizes = bucket_rows(n, mask, segment_ids, device)
    return list(torch.split(rows, sizes)) if sizes else [rows]


def decorrelation_penalty(
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
    normalize: bool,
    offdiag: bool,
    reduction: str,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Penalty and (if compute_grad) its gradient for hidden (L, N, D).

    Returns (loss 0-dim, grad (L, N, D) contiguous in grad_dtype(hidden.dtype), already
    scaled for the reduction and the layer mean, or an empty tensor).
    """
    n_layers, n, dim = hidden.shape
    compute_dtype = accumulation_dtype(hidden.dtype)
    groups = _groups(n, mask, segment_ids, hidden.device)
    sizes = [n if rows is None else rows.numel() for rows in groups]
    pairs = sum(s * (s - 1) if offdiag else s * s for s in sizes)

    grad = (
        torch.zeros(hidden.shape, dtype=grad_dtype(hidden.dtype), device=hidden.device)
        if compute_grad
        else hidden.new_empty(0)
    )
    if pairs == 0 or n_layers == 0:
        return hidden.new_zeros((), dtype=compute_dtype), grad

    # d(loss)/d(P_sum of layer l) for every layer: 1/L for the mean over layers,
    # times 1/pairs for reduction="mean".
    grad_scale = 1.0 / n_layers / (pairs if reduction == "mean" else 1)
    p_sum = hidden.new_zeros(n_layers, dtype=compute_dtype)
    for rows, size in zip(groups, sizes, strict=True):
        if size == 0 or (offdiag and size == 1):
            continue
        if size <= dim:
            h = (hidden if rows is None else hidden[:, rows]).to(compute_dtype)  # (L, n, D)
            group_p, dh = _gram_group(h, normalize, offdiag, compute_grad, grad_scale)
            if dh is not None:
                dh = dh.to(grad.dtype)
                if rows is None:
                    grad.copy_(dh)
                else:
                    grad[:, rows] = dh
        else:
            group_p = _covariance_group(
                hidden, rows, normalize, offdiag, compute_dtype,
                grad if compute_grad else None, grad_scale,
            )  # fmt: skip
        p_sum += group_p

    loss = p_sum.sum() * grad_scale
    # NaN or Inf anywhere in the selected rows must not come out as a finite number.
    loss = torch.where(torch.isfinite(loss), loss, torch.full_like(loss, float("nan")))
    return loss, grad
