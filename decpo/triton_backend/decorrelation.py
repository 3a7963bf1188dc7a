"""Triton kernels for the decorrelation penalty: loss and gradient in one forward.

Rows are bucketed once on the device: the selected rows sorted by segment id, with
each group's offset and size (one host sync, to size the grids; none per group).
Per group of n rows, with z_i = h_i / max(||h_i||, eps):

- Gram path, n <= D (3 n^2 D FLOPs): one program per pair of BLOCK_R-row tiles
  (I, J) with J >= I, both from the same group. It computes H_I H_J^T over D in
  BLOCK_D chunks on the raw rows (bf16 operands on the GPU) and scales the tile by
  1/||h_i|| 1/||h_j|| (the normalization is fused into the epilogue), forms E = G - I
  (or zeroes the diagonal for offdiag), adds sum E^2 (twice for I != J) to a
  per-program partial, and accumulates dZ_I += E Z_J and dZ_J += E^T Z_I (rows
  normalized before the product) into an fp32 (rows, D) buffer with atomic adds. G never reaches
  global memory. Loss partials are summed in a fixed order (the loss is bit-identical
  run to run); the atomic gradient sums are not (their order varies).
- Covariance path, n > D (3 n D^2 FLOPs): one program per pair of BLOCK_C-column
  tiles (a, b), b >= a, computes C_ab = sum over the group's rows of z_a^T z_b (one
  fp32 D x D buffer per group, mirrored); the loss is
  ||C - cI||^2 + (s - D)^2 / D + (n - D) (full) or ||C - cI||^2 + s^2/D - sum||z||^4
  (offdiag), with s = sum ||z||^2, c = s / D, a sum of non-negative terms in the full
  case; then dZ = Z C - a z (a = 1, or ||z||^2 for offdiag) tile by tile.
- Epilogue (both paths): dh = scale (4 dZ - 4 (dZ . z) z) / ||h|| per row (dZ / eps
  where the norm was clamped), cast to the input dtype and written at the row's
  original position: the normalization's backward, fused with the reduction scale.
(L, N, D) input runs every layer in the same launches (the grid's second axis).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from decpo.torch_backend.decorrelation import bucket_rows, grad_dtype
from decpo.triton_backend.common import cast, dot, interpreting

EPS = 1e-6

# ------------------------------------------------------------------ kernels


@triton.jit
def _row_stats_kernel(
    h_ptr, rows_ptr, inv_ptr, sq_ptr,
    S, D, stride_hl, stride_hn, stride_hd,
    NORMALIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Per selected row r (bucketed order) of layer l: inv = 1 / max(||h||, eps) (1
    without normalization) and sq = ||z||^2."""
    layer = tl.program_id(1)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < S
    src = tl.load(rows_ptr + r, mask=r_ok, other=0).to(tl.int64)
    base = h_ptr + layer.to(tl.int64) * stride_hl + src * stride_hn
    acc = tl.zeros([BLOCK_R], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        h = tl.load(
            base[:, None] + ds[None, :] * stride_hd,
            mask=r_ok[:, None] & (ds < D)[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(h * h, 1)
    if NORMALIZE:
        inv = 1.0 / tl.maximum(tl.sqrt(acc), 1e-6)
    else:
        inv = tl.full([BLOCK_R], 1.0, tl.float32)
    out = layer.to(tl.int64) * S + r
    tl.store(inv_ptr + out, inv, mask=r_ok)
    tl.store(sq_ptr + out, acc * inv * inv, mask=r_ok)


@triton.jit
def _load_z(h_ptr, rows_ptr, inv_ptr, layer, S, r, r_ok, ds, d_ok,
            stride_hl, stride_hn, stride_hd):  # fmt: skip
    """z rows r (bucketed positions) at features ds, fp32: (len(r), len(ds))."""
    src = tl.load(rows_ptr + r, mask=r_ok, other=0).to(tl.int64)
    h = tl.load(
        h_ptr + layer.to(tl.int64) * stride_hl + src[:, None] * stride_hn + ds[None, :] * stride_hd,
        mask=r_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    inv = tl.load(inv_ptr + layer.to(tl.int64) * S + r, mask=r_ok, other=0.0)
    return h.to(tl.float32) * inv[:, None]


@triton.jit
def _load_h(h_ptr, rows_ptr, layer, r, r_ok, ds, d_ok, stride_hl, stride_hn, stride_hd):
    """Raw rows r (bucketed positions) at features ds, in the input dtype."""
    src = tl.load(rows_ptr + r, mask=r_ok, other=0).to(tl.int64)
    return tl.load(
        h_ptr + layer.to(tl.int64) * stride_hl + src[:, None] * stride_hn + ds[None, :] * stride_hd,
        mask=r_ok[:, None] & d_ok[None, :],
        other=0.0,
    )


@triton.jit
def _gram_kernel(
    h_ptr, rows_ptr, inv_ptr, dz_ptr, partial_ptr,
    pair_start_ptr, pair_n_ptr, pair_i_ptr, pair_j_ptr,
    S, D, P, stride_hl, stride_hn, stride_hd,
    OFFDIAG: tl.constexpr, COMPUTE_GRAD: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pair = tl.program_id(0)
    layer = tl.program_id(1)
    start = tl.load(pair_start_ptr + pair)
    n = tl.load(pair_n_ptr + pair)
    ti = tl.load(pair_i_ptr + pair)
    tj = tl.load(pair_j_ptr + pair)
    li = ti * BLOCK_R + tl.arange(0, BLOCK_R)  # rows within the group
    lj = tj * BLOCK_R + tl.arange(0, BLOCK_R)
    i_ok = li < n
    j_ok = lj < n
    ri = start + li  # bucketed positions
    rj = start + lj
    inv_i = tl.load(inv_ptr + layer.to(tl.int64) * S + ri, mask=i_ok, other=0.0)
    inv_j = tl.load(inv_ptr + layer.to(tl.int64) * S + rj, mask=j_ok, other=0.0)
    # H_I H_J^T on the raw rows (bf16 operands on the GPU, fp32 accumulation); the
    # normalization is applied to the tile afterwards: G = diag(inv_I) H_I H_J^T diag(inv_J).
    g = tl.zeros([BLOCK_R, BLOCK_R], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        hi = _load_h(h_ptr, rows_ptr, layer, ri, i_ok, ds, d_ok, stride_hl, stride_hn, stride_hd)
        hj = _load_h(h_ptr, rows_ptr, layer, rj, j_ok, ds, d_ok, stride_hl, stride_hn, stride_hd)
        g = dot(hi, tl.trans(hj), g, INTERPRET)
    g = g * inv_i[:, None] * inv_j[None, :]
    diag = li[:, None] == lj[None, :]
    if OFFDIAG:
        e = tl.where(diag, 0.0, g)
    else:
        e = tl.where(diag, g - 1.0, g)
    e = tl.where(i_ok[:, None] & j_ok[None, :], e, 0.0)
    weight = tl.where(ti == tj, 1.0, 2.0)
    tl.store(partial_ptr + layer.to(tl.int64) * P + pair, weight * tl.sum(tl.sum(e * e, 1), 0))
    if COMPUTE_GRAD:
        # dZ_I += E Z_J and dZ_J += E^T Z_I with the rows normalized first (|z| <= 1, so
        # nothing overflows); bf16 operands for bf16 input, fp32 otherwise (fp16's range
        # cannot hold E for unnormalized rows).
        if h_ptr.dtype.element_ty == tl.bfloat16:
            low = tl.bfloat16
        else:
            low = tl.float32
        e_low = cast(e, low, INTERPRET)
        e_t_low = cast(tl.trans(e), low, INTERPRET)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            zj = (
                _load_h(
                    h_ptr, rows_ptr, layer, rj, j_ok, ds, d_ok, stride_hl, stride_hn, stride_hd
                ).to(tl.float32)
                * inv_j[:, None]
            )
            out_i = dz_ptr + (layer.to(tl.int64) * S + ri)[:, None] * D + ds[None, :]
            tl.atomic_add(
                out_i,
                dot(
                    e_low,
                    cast(zj, low, INTERPRET),
                    tl.zeros([BLOCK_R, BLOCK_D], tl.float32),
                    INTERPRET,
                ),
                mask=i_ok[:, None] & d_ok[None, :],
            )
            if ti != tj:
                zi = (
                    _load_h(
                        h_ptr, rows_ptr, layer, ri, i_ok, ds, d_ok, stride_hl, stride_hn, stride_hd
                    ).to(tl.float32)
                    * inv_i[:, None]
                )
                out_j = dz_ptr + (layer.to(tl.int64) * S + rj)[:, None] * D + ds[None, :]
                tl.atomic_add(
                    out_j,
                    dot(
                        e_t_low,
                        cast(zi, low, INTERPRET),
                        tl.zeros([BLOCK_R, BLOCK_D], tl.float32),
                        INTERPRET,
                    ),
                    mask=j_ok[:, None] & d_ok[None, :],
                )


@triton.jit
def _cov_kernel(
    h_ptr, rows_ptr, inv_ptr, cov_ptr,
    pair_group_ptr, pair_a_ptr, pair_b_ptr, group_start_ptr, group_n_ptr,
    S, D, stride_hl, stride_hn, stride_hd,
    INTERPRET: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """C[g][a-tile, b-tile] = sum over group g's rows of z_a^T z_b, mirrored."""
    pair = tl.program_id(0)
    layer = tl.program_id(1)
    grp = tl.load(pair_group_ptr + pair)
    ta = tl.load(pair_a_ptr + pair)
    tb = tl.load(pair_b_ptr + pair)
    start = tl.load(group_start_ptr + grp)
    n = tl.load(group_n_ptr + grp)
    ca = ta * BLOCK_C + tl.arange(0, BLOCK_C)
    cb = tb * BLOCK_C + tl.arange(0, BLOCK_C)
    a_ok = ca < D
    b_ok = cb < D
    acc = tl.zeros([BLOCK_C, BLOCK_C], tl.float32)
    for r0 in range(0, n, BLOCK_R):
        lr = r0 + tl.arange(0, BLOCK_R)
        r_ok = lr < n
        za = _load_z(
            h_ptr,
            rows_ptr,
            inv_ptr,
            layer,
            S,
            start + lr,
            r_ok,
            ca,
            a_ok,
            stride_hl,
            stride_hn,
            stride_hd,
        )
        zb = _load_z(
            h_ptr,
            rows_ptr,
            inv_ptr,
            layer,
            S,
            start + lr,
            r_ok,
            cb,
            b_ok,
            stride_hl,
            stride_hn,
            stride_hd,
        )
        acc = dot(tl.trans(za), zb, acc, INTERPRET)
    out = cov_ptr + (grp.to(tl.int64) * tl.num_programs(1) + layer) * D * D  # C[g][layer]
    mask = a_ok[:, None] & b_ok[None, :]
    tl.store(out + ca[:, None].to(tl.int64) * D + cb[None, :], acc, mask=mask)
    if ta != tb:  # the mirrored tile C_ba = C_ab^T
        tl.store(out + cb[None, :].to(tl.int64) * D + ca[:, None], acc, mask=mask)


@triton.jit
def _cov_grad_kernel(
    h_ptr, rows_ptr, inv_ptr, sq_ptr, cov_ptr, dz_ptr,
    block_group_ptr, block_row_ptr, group_start_ptr, group_n_ptr,
    S, D, stride_hl, stride_hn, stride_hd,
    OFFDIAG: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """dZ/4 = Z C - a z for BLOCK_R rows of a covariance group, BLOCK_C output columns."""
    blk = tl.program_id(0)
    layer = tl.program_id(1)
    col_tile = tl.program_id(2)
    grp = tl.load(block_group_ptr + blk)
    r0 = tl.load(block_row_ptr + blk)
    start = tl.load(group_start_ptr + grp)
    n = tl.load(group_n_ptr + grp)
    lr = r0 + tl.arange(0, BLOCK_R)
    r_ok = lr < n
    r = start + lr
    cols = col_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < D
    cov = cov_ptr + (grp.to(tl.int64) * tl.num_programs(1) + layer) * D * D
    acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for k0 in range(0, D, BLOCK_C):
        ks = k0 + tl.arange(0, BLOCK_C)
        k_ok = ks < D
        z = _load_z(
            h_ptr, rows_ptr, inv_ptr, layer, S, r, r_ok, ks, k_ok, stride_hl, stride_hn, stride_hd
        )
        c = tl.load(
            cov + ks[:, None].to(tl.int64) * D + cols[None, :],
            mask=k_ok[:, None] & c_ok[None, :],
            other=0.0,
        )
        acc = dot(z, c, acc, INTERPRET)
    z_out = _load_z(
        h_ptr, rows_ptr, inv_ptr, layer, S, r, r_ok, cols, c_ok, stride_hl, stride_hn, stride_hd
    )
    if OFFDIAG:
        a = tl.load(sq_ptr + layer.to(tl.int64) * S + r, mask=r_ok, other=0.0)
        acc -= a[:, None] * z_out
    else:
        acc -= z_out
    tl.store(
        dz_ptr + (layer.to(tl.int64) * S + r)[:, None] * D + cols[None, :],
        acc,
        mask=r_ok[:, None] & c_ok[None, :],
    )


@triton.jit
def _normalize_backward_kernel(
    h_ptr, rows_ptr, inv_ptr, dz_ptr, grad_ptr,
    S, D, stride_hl, stride_hn, stride_hd, stride_gl, stride_gn, stride_gd,
    scale,
    NORMALIZE: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """grad[row] = scale * 4 (dz - [||h|| > eps] (dz . z) z) / max(||h||, eps), in the
    input dtype, at each selected row's original position (dz holds dP/dz / 4)."""
    layer = tl.program_id(1)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < S
    src = tl.load(rows_ptr + r, mask=r_ok, other=0).to(tl.int64)
    inv = tl.load(inv_ptr + layer.to(tl.int64) * S + r, mask=r_ok, other=0.0)
    dz_rows = dz_ptr + (layer.to(tl.int64) * S + r)[:, None] * D
    radial = tl.zeros([BLOCK_R], tl.float32)
    if NORMALIZE:
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            mask = r_ok[:, None] & (ds < D)[None, :]
            dz = tl.load(dz_rows + ds[None, :], mask=mask, other=0.0)
            z = _load_z(
                h_ptr,
                rows_ptr,
                inv_ptr,
                layer,
                S,
                r,
                r_ok,
                ds,
                ds < D,
                stride_hl,
                stride_hn,
                stride_hd,
            )
            radial += tl.sum(dz * z, 1)
        radial = tl.where(inv < 1e6, radial, 0.0)  # norm clamped at eps: no projection
    out = grad_ptr + layer.to(tl.int64) * stride_gl + src * stride_gn
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        mask = r_ok[:, None] & (ds < D)[None, :]
        dz = tl.load(dz_rows + ds[None, :], mask=mask, other=0.0)
        z = _load_z(
            h_ptr, rows_ptr, inv_ptr, layer, S, r, r_ok, ds, ds < D, stride_hl, stride_hn, stride_hd
        )
        dh = (dz - radial[:, None] * z) * (4.0 * scale * inv)[:, None]
        tl.store(
            out[:, None] + ds[None, :] * stride_gd,
            cast(dh, grad_ptr.dtype.element_ty, INTERPRET),
            mask=mask,
        )


# ------------------------------------------------------------------ launchers


def _blocks() -> tuple[int, int, int]:
    """(rows per tile, feature chunk, warps). tl.dot needs >= 16 per dimension; on the
    GPU 64 x 64 fp32 Gram tiles with 64-wide feature chunks keep the operands of both
    products in shared memory."""
    if interpreting():
        return 16, 16, 1
    return 64, 64, 4


def decorrelation_penalty(
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
    normalize: bool,
    offdiag: bool,
    reduction: str,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Penalty and (if compute_grad) its gradient for hidden (L, N, D); see the torch
    backend for the contract."""
    n_layers, n, dim = hidden.shape
    device = hidden.device
    rows, sizes = bucket_rows(n, mask, segment_ids, device)
    rows = rows.to(torch.int32).contiguous()
    n_sel = rows.numel()
    pairs = sum(s * (s - 1) if offdiag else s * s for s in sizes)
    grad = (
        torch.zeros(hidden.shape, dtype=grad_dtype(hidden.dtype), device=device)
        if compute_grad
        else hidden.new_empty(0)
    )
    if pairs == 0 or n_layers == 0:
        return torch.zeros((), dtype=torch.float32, device=device), grad
    grad_scale = 1.0 / n_layers / (pairs if reduction == "mean" else 1)
    block_r, block_d, warps = _blocks()
    interpret = interpreting()
    strides = (hidden.stride(0), hidden.stride(1), hidden.stride(2))

    inv = torch.empty((n_layers, n_sel), dtype=torch.float32, device=device)
    sq = torch.empty_like(inv)
    _row_stats_kernel[(triton.cdiv(n_sel, block_r), n_layers)](
        hidden, rows, inv, sq, n_sel, dim, *strides,
        NORMALIZE=normalize, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    dz = (
        torch.zeros((n_layers, n_sel, dim), dtype=torch.float32, device=device)
        if compute_grad
        else inv
    )
    starts = [0]
    for s in sizes:
        starts.append(starts[-1] + s)
    gram = [(g, s) for g, s in enumerate(sizes) if 1 <= s <= dim]
    cov = [(g, s) for g, s in enumerate(sizes) if s > dim]
    p_sum = torch.zeros(n_layers, dtype=torch.float32, device=device)

    if gram:
        # Tile pairs (I, J), J >= I, of every Gram group: G's symmetry halves the work.
        entries = []
        for g, s in gram:
            t = triton.cdiv(s, block_r)
            entries += [(starts[g], s, i, j) for i in range(t) for j in range(i, t)]
        table = torch.tensor(entries, dtype=torch.int32).T.contiguous().to(device)
        n_pairs = table.shape[1]
        partial = torch.empty((n_layers, n_pairs), dtype=torch.float32, device=device)
        _gram_kernel[(n_pairs, n_layers)](
            hidden, rows, inv, dz, partial, table[0], table[1], table[2], table[3],
            n_sel, dim, n_pairs, *strides,
            OFFDIAG=offdiag, COMPUTE_GRAD=compute_grad, INTERPRET=interpret,
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
        )  # fmt: skip
        p_sum += partial.sum(1)

    if cov:
        group_start = torch.tensor([starts[g] for g, _ in cov], dtype=torch.int32, device=device)
        group_n = torch.tensor([s for _, s in cov], dtype=torch.int32, device=device)
        tiles = triton.cdiv(dim, block_d)
        entries = [
            (k, a, b) for k in range(len(cov)) for a in range(tiles) for b in range(a, tiles)
        ]
        table = torch.tensor(entries, dtype=torch.int32).T.contiguous().to(device)
        cov_buf = torch.empty((len(cov), n_layers, dim, dim), dtype=torch.float32, device=device)
        _cov_kernel[(table.shape[1], n_layers)](
            hidden, rows, inv, cov_buf, table[0], table[1], table[2], group_start, group_n,
            n_sel, dim, *strides,
            INTERPRET=interpret, BLOCK_R=block_r, BLOCK_C=block_d, num_warps=warps,
        )  # fmt: skip
        # Loss from C: ||C - cI||^2 + (s - D)^2 / D + (n - D), or ||C - cI||^2 + s^2/D - q.
        seg = torch.repeat_interleave(
            torch.arange(len(cov), device=device),
            torch.tensor([s for _, s in cov], device=device),
        )
        cov_rows = torch.cat(
            [torch.arange(starts[g], starts[g] + s, device=device) for g, s in cov]
        )
        sq_cov = sq[:, cov_rows].double()  # (L, n_cov)
        s_tot = torch.zeros((n_layers, len(cov)), dtype=torch.float64, device=device)
        s_tot.index_add_(1, seg, sq_cov)
        q_tot = torch.zeros_like(s_tot).index_add_(1, seg, sq_cov.square())
        c = (s_tot / dim).T.float()  # (G, L)
        eye = torch.eye(dim, dtype=torch.float32, device=device)
        centered = cov_buf - c[:, :, None, None] * eye
        total = centered.square().sum((2, 3)).double().T  # (L, G)
        n_g = torch.tensor([s for _, s in cov], dtype=torch.float64, device=device)
        if offdiag:
            total = total + s_tot.square() / dim - q_tot
        else:
            total = total + (s_tot - dim).square() / dim + (n_g - dim)
        p_sum += total.sum(1).float()
        if compute_grad:
            blocks = [(k, r0) for k, (_, s) in enumerate(cov) for r0 in range(0, s, block_r)]
            btable = torch.tensor(blocks, dtype=torch.int32).T.contiguous().to(device)
            _cov_grad_kernel[(btable.shape[1], n_layers, tiles)](
                hidden, rows, inv, sq, cov_buf, dz, btable[0], btable[1], group_start, group_n,
                n_sel, dim, *strides,
                OFFDIAG=offdiag, INTERPRET=interpret, BLOCK_R=block_r, BLOCK_C=block_d,
                num_warps=warps,
            )  # fmt: skip

    if compute_grad:
        _normalize_backward_kernel[(triton.cdiv(n_sel, block_r), n_layers)](
            hidden, rows, inv, dz, grad, n_sel, dim, *strides,
            grad.stride(0), grad.stride(1), grad.stride(2), grad_scale,
            NORMALIZE=normalize, INTERPRET=interpret, BLOCK_R=block_r, BLOCK_D=block_d,
            num_warps=warps,
        )  # fmt: skip
    loss = p_sum.sum() * grad_scale
    loss = torch.where(torch.isfinite(loss), loss, torch.full_like(loss, float("nan")))
    return loss, grad
