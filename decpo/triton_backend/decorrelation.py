"""Triton kernels for the decorrelation penalty: loss and gradient in one forward.

Per group of n selected rows with z_i = h_i / max(||h_i||, eps) (z = h without
normalization), P_sum = sum over counted pairs of (G_ij - delta_ij)^2, G = Z Z^T.
Both exact algebraic paths run as tensor-core GEMMs (bf16 / fp16 operands, fp32
accumulation; fp32 input keeps IEEE fp32 products):

1. Pack (memory-bound, once): rows are bucketed by group (one host sync, to size
   the grids), and each selected row is read once, normalized in fp32 and rounded
   once to the operand dtype into a contiguous (L, S, Dp) buffer (Dp = D rounded up
   to 16, zero padded), with 1/||h||, ||z||^2 of the rounded row and of the exact
   one (1 unless the norm was clamped at eps). Every GEMM then
   loads dense, 16-byte aligned tiles (cp.async pipelined, wgmma operands) instead
   of gathering rows, and the rounding happens after the scaling, as eager PyTorch
   would do it, but once.
2. Gram path, n <= D (3 n^2 D FLOPs, ~ (3 + 1/T) n^2 D with G's symmetry):
   - a group that fits one BLOCK_R tile (the last-token mode: 64 rows a layer) is one
     program: the tile is loaded once per feature chunk and meets itself
     (dot(z, z^T)), E = G - I (diagonal zeroed for offdiag) and sum E^2 stay in
     registers, the radial term dz_i . z_i = sum_j E_ij G_ij comes from the tile
     itself, and a second pass over the features writes
     dh = 4 scale (E Z - r z) / ||h||, r = (dz . z) / ||z||^2, in the gradient
     dtype. No atomics, no fp32 dZ buffer, no second kernel.
   - larger groups (deterministic E path, the default): one program per tile pair
     (I, J >= I) of T = ceil(n / BLOCK_R) tiles (diagonal pairs a separate launch
     that loads its tile once) computes G_IJ, sums ||E_IJ||^2 into the loss in fp32
     (before any rounding), stores E_IJ and its mirror E_JI = E_IJ^T once into the
     group's (ld x ld) block, ld = n rounded up to BLOCK_R (bf16 for bf16; fp16 for
     normalized fp16, |E| <= 1; else fp32), and the partial radial sums of E o G
     (row sums into slot J of rows I, column sums into slot I of rows J). A second
     tensor-core GEMM, BLOCK_M rows x BLOCK_N features per program with K = the
     group's rows, forms dz = E Z and applies the normalization's backward in its
     epilogue, dh = 4 scale (dz - r z) / ||h|| with dz . z summed from the T
     partials in a fixed order: every output tile written once, no atomics, no
     fp32 dZ buffer, bit-identical run to run. E costs n^2 x 2 bytes per group and
     layer in bf16 (2 MB at n = 1024).
   - if the E blocks of all layers exceed E_BUDGET (512 MiB), the atomic path
     runs instead: diagonal pairs store dZ_I = E_II Z_I (and dz . z) into an fp32
     (S, Dp) buffer (no zero fill); the off-diagonal pairs add E Z_J to dZ_I and
     E^T Z_I to dZ_J with relaxed atomics (only the sums matter), then one
     elementwise pass writes dh. Atomic traffic is ~n Dp T fp32 adds per group (at
     L2), and the summation order, hence the gradient's last bits, varies.
   Accuracy: G's diagonal is taken from the exact ||z||^2, not from the rounded
   rows (E_ii = 0 up to fp32 instead of ~2^-8), and the projection uses the
   rounded row the products used, r = (dz . z) / ||z||^2: a radial part of dz then
   cancels exactly instead of leaking its rounding error into dh. Gradients come
   out about 2x closer to float64 than eager PyTorch at the same dtype.
3. Covariance path, n > D (3 n D^2 FLOPs, ~ (1 + 1/T) n D^2 + 2 n D^2):
   - C = Z^T Z over BLOCK_C x BLOCK_C tiles (b >= a only; diagonal tiles load their
     panel once), K = the group's rows. The epilogue subtracts cI (c = s / D,
     s = sum ||z||^2 = tr C) in fp32, adds ||C - cI||^2 to a per-tile partial, and
     stores M = C - cI mirrored, rounded to bf16 only now (fp32 for fp16 input,
     whose range cannot hold C of unnormalized rows). The loss is
     ||C - cI||^2 + (s - D)^2 / D + (n - D) (full; non-negative terms, nothing
     cancels near n = D) or ||C - cI||^2 + s^2 / D - sum ||z||^4 (offdiag).
   - dZ/4 = Z M + (c - a_i) z_i (a = 1, or ||z_i||^2 for offdiag), since
     Z C - a z = Z (C - cI) + (c - a) z: the GEMM multiplies the small deviation M,
     never C itself, so nothing cancels after rounding, and the (c - a) z term is
     added in fp32 (it is radial: the projection removes it again for normalized
     rows). Row blocks x column tiles, column tiles fastest so the row
     panel is reused from L2 while M (32 MB at D = 4096, bf16) stays in L2. dZ goes
     to an fp32 buffer (the projection needs dz . z over the whole row), r by
     relaxed atomics over column tiles, then the elementwise pass writes dh.
   fp16 input multiplies M (fp32) in TF32 (10-bit mantissa like fp16, fp32 range).
4. Loss: per-program partials summed in a fixed order (bit-identical run to run).
   The gradient is bit-identical too on the fused and E paths; the atomic sums of
   the covariance path (dz . z over column tiles) and of the atomic Gram fallback
   are not.
(L, N, D) input runs every layer in the same launches (a grid axis).

Costs (decorrelation_cost / decorrelation_cost_detail, counted from this tiling;
HBM bytes under the L2 model stated in _kernel_costs), bf16, loss + gradient:
- 16 groups x 1024 rows, D = 4096 (tile pairs, E path): 215 GFLOP (206 useful,
  3 n^2 D; 77 GFLOP for G with symmetry, 138 GFLOP for E Z), 0.715 GB HBM (pack:
  h read, Z written, 0.27 GB; tile pairs: Z read, E written, 0.17 GB; E Z: E and
  Z read, dh written, 0.28 GB), no atomics: 0.218 ms of tensor-core time vs 0.213
  ms of HBM time on an H100, compute-bound (by 2%; on an H200 0.27 vs 0.17 ms).
  The margin counts the trailing groups' Z as read from L2 by the gradient
  launch, which starts with the groups the tile pairs touched last (34 MB here);
  without it the two are equal (0.221 ms of HBM time). The atomic fallback was
  1.61 GB plus 2.15 GB of fp32 atomic adds at L2, ~0.48 ms, memory-bound.
- 1 group x 16384 rows, D = 4096 (covariance): 834 GFLOP (825 useful, 3 n D^2),
  1.81 GB HBM: compute-bound (0.84 ms vs 0.54 ms on an H100).
- last token, 8 layers x 64 rows, D = 14336 (fused single tile): 2.0 GFLOP (the
  whole 64 x 64 G tile is multiplied: 4 n^2 D, not 3), 73 MB: memory- and
  latency-bound (8 programs; a split over D would use more SMs).
Every bf16/fp16 GEMM is a wgmma with cp.async pipelined operands, no spills, as
compiled for sm_90a (python -m bench.kernel_stats --only decorrelation).

Block configs come from a small named set per kernel (Triton's H100 matmul
configs); one default per dtype and shape class (rules in _configs), the others are
autotuning candidates used only with DECPO_TRITON_AUTOTUNE=1 on a GPU.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from decpo.numerics import bucket_rows, grad_dtype, interpreting
from decpo.ops import in_eager_scope
from decpo.triton_backend import common
from decpo.triton_backend.common import KernelConfig, cast, dot, host_table

PAD = 16  # feature padding of the packed rows: 16-byte aligned rows for cp.async

# ------------------------------------------------------------------ jit helpers


@triton.jit
def _load_rows(base, rows, r_ok, cols, c_ok, stride):
    """Tile base[rows, cols] of a row-major buffer, zero outside the masks."""
    ptrs = base + rows[:, None].to(tl.int64) * stride + cols[None, :]
    return tl.load(ptrs, mask=r_ok[:, None] & c_ok[None, :], other=0.0)


@triton.jit
def _error_tile(g, li, lj, i_ok, j_ok, sqx, OFFDIAG: tl.constexpr):
    """E = G - I (or G with a zero diagonal for offdiag) on the valid part of a tile.
    The diagonal uses sqx = ||z_i||^2 of the unrounded row (1 unless the norm was
    clamped), not the product of the rounded rows: E_ii is then ~0 instead of the
    rounding error of ||round(z)||^2 (~2^-8 in bf16)."""
    diag = li[:, None] == lj[None, :]
    if OFFDIAG:
        e = tl.where(diag, 0.0, g)
    else:
        e = tl.where(diag, sqx[:, None] - 1.0, g)
    return tl.where(i_ok[:, None] & j_ok[None, :], e, 0.0)


@triton.jit
def _operand(x, dtype: tl.constexpr, BOUNDED: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 x as the A operand of a product with a `dtype` B: bf16 for bf16 (the
    tensor cores' fastest type; x is a small deviation, so its rounding is relative
    to it); fp16 for fp16 when BOUNDED (|x| <= 1: E of normalized rows), else fp32
    (TF32 products for fp16 B, whose range cannot hold E of unnormalized rows; IEEE
    for fp32, see _dot2)."""
    if dtype == tl.bfloat16:
        out = cast(x, tl.bfloat16, INTERPRET)
    elif dtype == tl.float16 and BOUNDED:
        out = x.to(tl.float16)
    else:
        out = x
    return out


@triton.jit
def _radial(dz_dot_z, inv, sq):
    """Coefficient of z removed by the normalization's backward, (dz . z) / ||z||^2
    with z the rounded row the products used: the projection is then exact for that
    row, so a radial part of dz (the (c - a) z term of the covariance path, the
    ||z||^2 - 1 rounding of G's diagonal) cancels instead of being amplified. Zero
    where the norm was clamped at eps (the derivative of h / eps has no projection)."""
    return tl.where(inv < 1e6, dz_dot_z / tl.maximum(sq, 1e-30), 0.0)


@triton.jit
def _tf32(x, INTERPRET: tl.constexpr):
    """Under the interpreter, round fp32 to TF32 (10-bit mantissa, nearest) as the
    tensor cores do, so the tests see the GPU's error; identity on the GPU."""
    if INTERPRET:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x


@triton.jit
def _dot2(a, b, acc, INTERPRET: tl.constexpr):
    """acc + a @ b for the gradient products, a from _operand: bf16 x bf16, fp16 x
    fp16, TF32 for fp32 a with fp16 b, IEEE fp32 for fp32."""
    if a.dtype == tl.float32 and b.dtype == tl.float16:
        acc = tl.dot(
            _tf32(a, INTERPRET),
            _tf32(b.to(tl.float32), INTERPRET),
            acc,
            input_precision="ieee" if INTERPRET else "tf32",
        )
    else:
        acc = dot(a, b, acc, INTERPRET)
    return acc


# ------------------------------------------------------------------ kernels


@triton.jit
def _pack_kernel(
    h_ptr,
    rows_ptr,
    z_ptr,
    inv_ptr,
    sq_ptr,
    sqx_ptr,
    S,
    D,
    DP,
    stride_hl,
    stride_hn,
    stride_hd,
    NORMALIZE: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """z[l, r] = round(h[l, rows[r]] / max(||h||, eps)) into the packed (L, S, DP)
    buffer (zero padded), inv = 1 / max(||h||, eps) (1 without normalization),
    sq = ||z||^2 of the rounded row and sqx = ||z||^2 of the exact one."""
    layer = tl.program_id(1).to(tl.int64)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < S
    src = tl.load(rows_ptr + r, mask=r_ok, other=0).to(tl.int64)
    h_rows = h_ptr + layer * stride_hl + src * stride_hn
    inv = tl.full([BLOCK_R], 1.0, tl.float32)
    sqx = tl.zeros([BLOCK_R], tl.float32)
    if NORMALIZE:
        acc = tl.zeros([BLOCK_R], tl.float32)
        for d0 in tl.range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            h = tl.load(
                h_rows[:, None] + ds[None, :] * stride_hd,
                mask=r_ok[:, None] & (ds < D)[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(h * h, 1)
        inv = 1.0 / tl.maximum(tl.sqrt(acc), 1e-6)  # decpo.numerics.EPS
        sqx = acc * inv * inv
    z_rows = z_ptr + (layer * S + r) * DP
    sq = tl.zeros([BLOCK_R], tl.float32)
    for d0 in tl.range(0, DP, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        h = tl.load(
            h_rows[:, None] + ds[None, :] * stride_hd,
            mask=r_ok[:, None] & (ds < D)[None, :],
            other=0.0,
        ).to(tl.float32)
        z = cast(h * inv[:, None], z_ptr.dtype.element_ty, INTERPRET)
        tl.store(z_rows[:, None] + ds[None, :], z, mask=r_ok[:, None] & (ds < DP)[None, :])
        zf = z.to(tl.float32)
        sq += tl.sum(zf * zf, 1)
    tl.store(inv_ptr + layer * S + r, inv, mask=r_ok)
    tl.store(sq_ptr + layer * S + r, sq, mask=r_ok)
    if not NORMALIZE:
        sqx = sq  # z = h exactly
    tl.store(sqx_ptr + layer * S + r, sqx, mask=r_ok)


@triton.jit
def _gram_fused_kernel(
    z_ptr,
    inv_ptr,
    sq_ptr,
    sqx_ptr,
    rows_ptr,
    grad_ptr,
    partial_ptr,
    group_start_ptr,
    group_n_ptr,
    S,
    D,
    DP,
    G,
    stride_gl,
    stride_gn,
    stride_gd,
    scale,
    OFFDIAG: tl.constexpr,
    NORMALIZE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One group of n <= BLOCK_R rows of one layer: loss partial and dh, no atomics."""
    grp = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    start = tl.load(group_start_ptr + grp)
    n = tl.load(group_n_ptr + grp)
    lr = tl.arange(0, BLOCK_R)
    r_ok = lr < n
    r = start + lr
    z_base = z_ptr + layer * S * DP
    g = tl.zeros([BLOCK_R, BLOCK_R], tl.float32)
    for d0 in tl.range(0, DP, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        z = _load_rows(z_base, r, r_ok, ds, ds < DP, DP)
        g = dot(z, tl.trans(z), g, INTERPRET)  # the tile meets itself: loaded once
    sqx = tl.load(sqx_ptr + layer * S + r, mask=r_ok, other=0.0)
    e = _error_tile(g, lr, lr, r_ok, r_ok, sqx, OFFDIAG)
    tl.store(partial_ptr + layer * G + grp, tl.sum(tl.sum(e * e, 1), 0))
    if COMPUTE_GRAD:
        inv = tl.load(inv_ptr + layer * S + r, mask=r_ok, other=0.0)
        if NORMALIZE:  # dz_i . z_i = sum_j E_ij G_ji
            sq = tl.load(sq_ptr + layer * S + r, mask=r_ok, other=1.0)
            radial = _radial(tl.sum(e * g, 1), inv, sq)
        else:
            radial = tl.zeros([BLOCK_R], tl.float32)
        k = 4.0 * scale * inv
        src = tl.load(rows_ptr + r, mask=r_ok, other=0).to(tl.int64)
        out = grad_ptr + layer * stride_gl + src * stride_gn
        e_op = _operand(e, z_ptr.dtype.element_ty, NORMALIZE, INTERPRET)
        for d0 in tl.range(0, DP, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            z = _load_rows(z_base, r, r_ok, ds, ds < DP, DP)
            dz = _dot2(e_op, z, tl.zeros([BLOCK_R, BLOCK_D], tl.float32), INTERPRET)
            dh = (dz - radial[:, None] * z.to(tl.float32)) * k[:, None]
            tl.store(
                out[:, None] + ds[None, :] * stride_gd,
                cast(dh, grad_ptr.dtype.element_ty, INTERPRET),
                mask=r_ok[:, None] & (ds < D)[None, :],
            )


@triton.jit
def _pair_error(
    z_base,
    sqx_base,
    partial_ptr,
    li,
    lj,
    i_ok,
    j_ok,
    ri,
    rj,
    DP,
    SAME: tl.constexpr,
    OFFDIAG: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """G = Z_I Z_J^T of one tile pair (rows ri, rj of one layer's packed Z, DP
    columns; Z_I Z_I^T when SAME) and its error tile E = G - I, masked; stores the
    pair's loss partial (counted twice off the diagonal, for E_JI) and returns (G, E),
    both (BLOCK_R, BLOCK_R) fp32."""
    g = tl.zeros([BLOCK_R, BLOCK_R], tl.float32)
    for d0 in tl.range(0, DP, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        zi = _load_rows(z_base, ri, i_ok, ds, ds < DP, DP)
        if SAME:
            g = dot(zi, tl.trans(zi), g, INTERPRET)
        else:
            zj = _load_rows(z_base, rj, j_ok, ds, ds < DP, DP)
            g = dot(zi, tl.trans(zj), g, INTERPRET)
    sqx = tl.load(sqx_base + ri, mask=i_ok, other=0.0)
    e = _error_tile(g, li, lj, i_ok, j_ok, sqx, OFFDIAG)
    weight = 1.0 if SAME else 2.0
    tl.store(partial_ptr, weight * tl.sum(tl.sum(e * e, 1), 0))
    return g, e


@triton.jit
def _gram_pair_kernel(
    z_ptr,
    sqx_ptr,
    dz_ptr,
    radial_ptr,
    partial_ptr,
    pair_start_ptr,
    pair_n_ptr,
    pair_i_ptr,
    pair_j_ptr,
    S,
    DP,
    P,
    SAME: tl.constexpr,
    OFFDIAG: tl.constexpr,
    NORMALIZE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Tile pair (I, J) of a group larger than one tile (J > I, or I = J when SAME):
    loss partial, dZ_I += E Z_J, dZ_J += E^T Z_I and r += rowsums of E o G. The
    diagonal pairs run first, one per row tile, and store dZ_I = E_II Z_I and r
    (so the fp32 buffer needs no zero fill); the off-diagonal launch adds with
    relaxed atomics (their order is irrelevant: only the sums are read, by a later
    kernel)."""
    pair = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    start = tl.load(pair_start_ptr + pair)
    n = tl.load(pair_n_ptr + pair)
    li = tl.load(pair_i_ptr + pair) * BLOCK_R + tl.arange(0, BLOCK_R)
    lj = tl.load(pair_j_ptr + pair) * BLOCK_R + tl.arange(0, BLOCK_R)
    i_ok = li < n
    j_ok = lj < n
    ri = start + li
    rj = start + lj
    z_base = z_ptr + layer * S * DP
    g, e = _pair_error(
        z_base, sqx_ptr + layer * S, partial_ptr + layer * P + pair, li, lj, i_ok, j_ok,
        ri, rj, DP, SAME, OFFDIAG, INTERPRET, BLOCK_R, BLOCK_D,
    )  # fmt: skip
    if COMPUTE_GRAD:
        eg = e * g
        radial = radial_ptr + layer * S
        if SAME:  # the first writer of these rows: plain stores, no zero fill needed
            tl.store(radial + ri, tl.sum(eg, 1), mask=i_ok)
        else:
            tl.atomic_add(radial + ri, tl.sum(eg, 1), mask=i_ok, sem="relaxed")
            tl.atomic_add(radial + rj, tl.sum(eg, 0), mask=j_ok, sem="relaxed")
        dz_base = dz_ptr + layer * S * DP
        e_op = _operand(e, z_ptr.dtype.element_ty, NORMALIZE, INTERPRET)
        e_t_op = _operand(tl.trans(e), z_ptr.dtype.element_ty, NORMALIZE, INTERPRET)
        for d0 in tl.range(0, DP, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < DP
            zj = _load_rows(z_base, rj, j_ok, ds, d_ok, DP)
            acc = _dot2(e_op, zj, tl.zeros([BLOCK_R, BLOCK_D], tl.float32), INTERPRET)
            ptrs = dz_base + ri[:, None].to(tl.int64) * DP + ds[None, :]
            if SAME:
                tl.store(ptrs, acc, mask=i_ok[:, None] & d_ok[None, :])
            else:
                tl.atomic_add(ptrs, acc, mask=i_ok[:, None] & d_ok[None, :], sem="relaxed")
            if not SAME:
                zi = _load_rows(z_base, ri, i_ok, ds, d_ok, DP)
                acc = _dot2(e_t_op, zi, tl.zeros([BLOCK_R, BLOCK_D], tl.float32), INTERPRET)
                ptrs = dz_base + rj[:, None].to(tl.int64) * DP + ds[None, :]
                tl.atomic_add(ptrs, acc, mask=j_ok[:, None] & d_ok[None, :], sem="relaxed")


@triton.jit
def _gram_error_kernel(
    z_ptr,
    sqx_ptr,
    e_ptr,
    rpart_ptr,
    partial_ptr,
    pair_start_ptr,
    pair_n_ptr,
    pair_i_ptr,
    pair_j_ptr,
    pair_eoff_ptr,
    S,
    DP,
    P,
    E_L,
    T_MAX,
    SAME: tl.constexpr,
    OFFDIAG: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Tile pair (I, J) of a group larger than one tile (J > I, or I = J when SAME),
    deterministic gradient path: loss partial (fp32 E, before rounding), E_IJ stored
    in E's dtype into the group's (ld x ld) block, ld = n rounded up to BLOCK_R (and
    E_JI = E_IJ^T mirrored), and the partial radial sums dz . z: rowsums of E o G
    into slot J of rows I, colsums into slot I of rows J. Every value is written
    once, by one program: no atomics."""
    pair = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    start = tl.load(pair_start_ptr + pair)
    n = tl.load(pair_n_ptr + pair)
    ti = tl.load(pair_i_ptr + pair)
    tj = tl.load(pair_j_ptr + pair)
    eoff = tl.load(pair_eoff_ptr + pair).to(tl.int64)
    ld = tl.cdiv(n, BLOCK_R) * BLOCK_R
    li = ti * BLOCK_R + tl.arange(0, BLOCK_R)
    lj = tj * BLOCK_R + tl.arange(0, BLOCK_R)
    i_ok = li < n
    j_ok = lj < n
    ri = start + li
    rj = start + lj
    z_base = z_ptr + layer * S * DP
    g, e = _pair_error(
        z_base, sqx_ptr + layer * S, partial_ptr + layer * P + pair, li, lj, i_ok, j_ok,
        ri, rj, DP, SAME, OFFDIAG, INTERPRET, BLOCK_R, BLOCK_D,
    )  # fmt: skip
    eg = e * g
    rpart = rpart_ptr + layer * T_MAX * S
    tl.store(rpart + tj * S + ri, tl.sum(eg, 1), mask=i_ok)
    e_base = e_ptr + layer * E_L + eoff
    e_low = cast(e, e_ptr.dtype.element_ty, INTERPRET)
    tl.store(e_base + li[:, None].to(tl.int64) * ld + lj[None, :], e_low)
    if not SAME:
        tl.store(rpart + ti * S + rj, tl.sum(eg, 0), mask=j_ok)
        tl.store(e_base + lj[None, :].to(tl.int64) * ld + li[:, None], e_low)


@triton.jit
def _gram_grad_kernel(
    z_ptr,
    e_ptr,
    inv_ptr,
    sq_ptr,
    rpart_ptr,
    rows_ptr,
    grad_ptr,
    block_start_ptr,
    block_n_ptr,
    block_row_ptr,
    block_eoff_ptr,
    S,
    D,
    DP,
    E_L,
    T_MAX,
    TILE_R,
    stride_gl,
    stride_gn,
    stride_gd,
    scale,
    NORMALIZE: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dh for BLOCK_M rows x BLOCK_N features of a group larger than one tile:
    dz = E Z (E from _gram_error_kernel, K = the group's rows, padded to ld = n
    rounded up to TILE_R, a multiple of BLOCK_K; E is zero there), then the
    normalization's backward in the epilogue, dh = 4 scale (dz - r z) / ||h||,
    r = (dz . z) / ||z||^2 with dz . z summed from the TILE_R-tile partials in a
    fixed order. Each output tile is written once: deterministic. Layers run last
    first and the block table lists the last group first: the groups that
    _gram_error_kernel touched last are still in L2 when this launch starts."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    blk = tl.program_id(1)
    layer = (tl.num_programs(2) - 1 - tl.program_id(2)).to(tl.int64)
    start = tl.load(block_start_ptr + blk)
    n = tl.load(block_n_ptr + blk)
    eoff = tl.multiple_of(tl.load(block_eoff_ptr + blk).to(tl.int64), 16)
    ld = tl.multiple_of(tl.cdiv(n, TILE_R) * TILE_R, 16)
    lr = tl.load(block_row_ptr + blk) + tl.arange(0, BLOCK_M)
    r_ok = lr < n
    r = start + lr
    c_ok = cols < DP
    z_base = z_ptr + layer * S * DP
    e_rows = e_ptr + layer * E_L + eoff + lr[:, None].to(tl.int64) * ld
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in tl.range(0, ld, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        e = tl.load(e_rows + ks[None, :], mask=r_ok[:, None], other=0.0)
        z = _load_rows(z_base, start + ks, ks < n, cols, c_ok, DP)
        acc = _dot2(e, z, acc, INTERPRET)
    inv = tl.load(inv_ptr + layer * S + r, mask=r_ok, other=0.0)
    if NORMALIZE:
        dzz = tl.zeros([BLOCK_M], tl.float32)
        rpart = rpart_ptr + layer * T_MAX * S + r
        for t in range(0, ld // TILE_R):
            dzz += tl.load(rpart + t * S, mask=r_ok, other=0.0)
        sq = tl.load(sq_ptr + layer * S + r, mask=r_ok, other=1.0)
        radial = _radial(dzz, inv, sq)
    else:
        radial = tl.zeros([BLOCK_M], tl.float32)
    k = 4.0 * scale * inv
    z = _load_rows(z_base, r, r_ok, cols, c_ok, DP).to(tl.float32)
    dh = (acc - radial[:, None] * z) * k[:, None]
    src = tl.load(rows_ptr + r, mask=r_ok, other=0).to(tl.int64)
    out = grad_ptr + layer * stride_gl + src * stride_gn
    tl.store(
        out[:, None] + cols[None, :] * stride_gd,
        cast(dh, grad_ptr.dtype.element_ty, INTERPRET),
        mask=r_ok[:, None] & (cols < D)[None, :],
    )


@triton.jit
def _cov_kernel(
    z_ptr,
    m_ptr,
    c_ptr,
    partial_ptr,
    pair_group_ptr,
    pair_a_ptr,
    pair_b_ptr,
    group_start_ptr,
    group_n_ptr,
    S,
    D,
    DP,
    P,
    L,
    SAME: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Column-tile pair (a, b), b > a (b = a when SAME) of a covariance group:
    C_ab = Z_a^T Z_b over the group's rows, M = C - cI in fp32, partial ||M_ab||^2
    (twice off the diagonal) and, for the gradient, M_ab and M_ba = M_ab^T stored
    in M's dtype."""
    pair = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    grp = tl.load(pair_group_ptr + pair)
    ca = tl.load(pair_a_ptr + pair) * BLOCK_C + tl.arange(0, BLOCK_C)
    cb = tl.load(pair_b_ptr + pair) * BLOCK_C + tl.arange(0, BLOCK_C)
    a_ok = ca < DP
    b_ok = cb < DP
    start = tl.load(group_start_ptr + grp)
    n = tl.load(group_n_ptr + grp)
    z_base = z_ptr + layer * S * DP
    acc = tl.zeros([BLOCK_C, BLOCK_C], tl.float32)
    for r0 in tl.range(0, n, BLOCK_K):
        lr = r0 + tl.arange(0, BLOCK_K)
        r_ok = lr < n
        za = _load_rows(z_base, start + lr, r_ok, ca, a_ok, DP)
        if SAME:
            acc = dot(tl.trans(za), za, acc, INTERPRET)
        else:
            zb = _load_rows(z_base, start + lr, r_ok, cb, b_ok, DP)
            acc = dot(tl.trans(za), zb, acc, INTERPRET)
    c = tl.load(c_ptr + grp * L + layer)
    diag = (ca[:, None] == cb[None, :]) & (ca < D)[:, None]
    m = tl.where(diag, acc - c, acc)  # the identity goes before any rounding
    m = tl.where(a_ok[:, None] & b_ok[None, :], m, 0.0)
    weight = 1.0 if SAME else 2.0
    tl.store(partial_ptr + layer * P + pair, weight * tl.sum(tl.sum(m * m, 1), 0))
    if COMPUTE_GRAD:
        out = m_ptr + (grp * L + layer) * DP * DP
        mask = a_ok[:, None] & b_ok[None, :]
        m_low = cast(m, m_ptr.dtype.element_ty, INTERPRET)
        tl.store(out + ca[:, None].to(tl.int64) * DP + cb[None, :], m_low, mask=mask)
        if not SAME:
            tl.store(out + cb[None, :].to(tl.int64) * DP + ca[:, None], m_low, mask=mask)


@triton.jit
def _cov_grad_kernel(
    z_ptr,
    m_ptr,
    c_ptr,
    sq_ptr,
    dz_ptr,
    radial_ptr,
    block_group_ptr,
    block_row_ptr,
    group_start_ptr,
    group_n_ptr,
    S,
    DP,
    L,
    OFFDIAG: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dZ/4 = Z M + (c - a) z for BLOCK_M rows x BLOCK_N columns of a covariance
    group (a = 1, or ||z||^2 for offdiag); r += dz . z over the columns."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    blk = tl.program_id(1)
    layer = tl.program_id(2).to(tl.int64)
    grp = tl.load(block_group_ptr + blk)
    start = tl.load(group_start_ptr + grp)
    n = tl.load(group_n_ptr + grp)
    lr = tl.load(block_row_ptr + blk) + tl.arange(0, BLOCK_M)
    r_ok = lr < n
    r = start + lr
    c_ok = cols < DP
    z_base = z_ptr + layer * S * DP
    m_base = m_ptr + (grp * L + layer) * DP * DP
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in tl.range(0, DP, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < DP
        z = _load_rows(z_base, r, r_ok, ks, k_ok, DP)
        m = _load_rows(m_base, ks, k_ok, cols, c_ok, DP)
        if m.dtype == tl.bfloat16:
            acc = dot(z, m, acc, INTERPRET)
        elif z.dtype == tl.float16:
            acc = tl.dot(
                _tf32(z.to(tl.float32), INTERPRET),
                _tf32(m, INTERPRET),
                acc,
                input_precision="ieee" if INTERPRET else "tf32",
            )
        else:
            acc = dot(z, m, acc, INTERPRET)
    c = tl.load(c_ptr + grp * L + layer)
    if OFFDIAG:
        a = tl.load(sq_ptr + layer * S + r, mask=r_ok, other=0.0)
    else:
        a = tl.full([BLOCK_M], 1.0, tl.float32)
    z = _load_rows(z_base, r, r_ok, cols, c_ok, DP).to(tl.float32)
    dz = acc + (c - a)[:, None] * z
    tl.atomic_add(radial_ptr + layer * S + r, tl.sum(dz * z, 1), mask=r_ok, sem="relaxed")
    tl.store(
        dz_ptr + (layer * S + r)[:, None] * DP + cols[None, :],
        dz,
        mask=r_ok[:, None] & c_ok[None, :],
    )


@triton.jit
def _finish_kernel(
    z_ptr,
    inv_ptr,
    sq_ptr,
    rows_ptr,
    dz_ptr,
    radial_ptr,
    grad_ptr,
    S,
    D,
    DP,
    row0,
    stride_gl,
    stride_gn,
    stride_gd,
    scale,
    NORMALIZE: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """grad[rows[r]] = 4 scale (dz - (dz . z / ||z||^2) z) / max(||h||, eps) for packed
    rows r >= row0 (no projection without normalization or where the norm was
    clamped), in grad's dtype; dz . z was accumulated by the product kernels."""
    layer = tl.program_id(1).to(tl.int64)
    r = row0 + tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < S
    inv = tl.load(inv_ptr + layer * S + r, mask=r_ok, other=0.0)
    if NORMALIZE:
        sq = tl.load(sq_ptr + layer * S + r, mask=r_ok, other=1.0)
        radial = _radial(tl.load(radial_ptr + layer * S + r, mask=r_ok, other=0.0), inv, sq)
    else:
        radial = tl.zeros([BLOCK_R], tl.float32)
    k = 4.0 * scale * inv
    src = tl.load(rows_ptr + r, mask=r_ok, other=0).to(tl.int64)
    out = grad_ptr + layer * stride_gl + src * stride_gn
    for d0 in tl.range(0, DP, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < DP
        dz = _load_rows(dz_ptr + layer * S * DP, r, r_ok, ds, d_ok, DP)
        z = _load_rows(z_ptr + layer * S * DP, r, r_ok, ds, d_ok, DP).to(tl.float32)
        dh = (dz - radial[:, None] * z) * k[:, None]
        tl.store(
            out[:, None] + ds[None, :] * stride_gd,
            cast(dh, grad_ptr.dtype.element_ty, INTERPRET),
            mask=r_ok[:, None] & (ds < D)[None, :],
        )


# ------------------------------------------------------------------ block configs


def _cfg(name: str, warps: int, stages: int, **blocks: int) -> KernelConfig:
    return KernelConfig(name, blocks, num_warps=warps, num_stages=stages)


# Triton's H100 matmul configs (tutorial 03 / 09), adapted to each kernel's tiles.
# Gram: BLOCK_R rows per tile (the square G tile), BLOCK_D feature chunk.
GRAM_CONFIGS = (
    _cfg("r128d64w8s3", 8, 3, BLOCK_R=128, BLOCK_D=64),
    _cfg("r64d64w4s4", 4, 4, BLOCK_R=64, BLOCK_D=64),
    _cfg("r128d32w8s4", 8, 4, BLOCK_R=128, BLOCK_D=32),
)
GRAM_FP32 = (_cfg("r32d32w4s3", 4, 3, BLOCK_R=32, BLOCK_D=32),)
# Covariance C = Z^T Z: BLOCK_C x BLOCK_C output tile, BLOCK_K rows per step.
# Autotuning candidates keep the default's BLOCK_C (the launcher's tile table).
COV_CONFIGS = (
    _cfg("c128k64w8s3", 8, 3, BLOCK_C=128, BLOCK_K=64),
    _cfg("c128k32w8s4", 8, 4, BLOCK_C=128, BLOCK_K=32),
)
COV_FP32 = (_cfg("c64k32w4s3", 4, 3, BLOCK_C=64, BLOCK_K=32),)
# Covariance gradient Z M: BLOCK_M rows x BLOCK_N columns, BLOCK_K features per step;
# candidates keep the default's BLOCK_M (the launcher's row-block table). 128 x 256
# and 128 x 64 with 4 warps spill (fp16's fp32 M operand), so they are not in the set.
COV_GRAD_CONFIGS = (
    _cfg("128x128x64w8s3", 8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
    _cfg("128x128x32w8s4", 8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32),
    _cfg("128x64x64w8s4", 8, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64),
)
COV_GRAD_FP32 = (_cfg("64x64x32w4s3", 4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32),)
# Elementwise passes (pack, finish): rows x feature chunk.
ROW_CONFIGS = (
    _cfg("r16d256w4", 4, 2, BLOCK_R=16, BLOCK_D=256),
    _cfg("r32d128w4", 4, 2, BLOCK_R=32, BLOCK_D=128),
)
# The interpreter: tl.dot needs >= 16 per dimension; small tiles keep it fast.
INTERP = _cfg(
    "interp16", 1, 1, BLOCK_R=16, BLOCK_D=16, BLOCK_C=16, BLOCK_K=16, BLOCK_M=16, BLOCK_N=16
)


def _only(config: KernelConfig, *names: str) -> KernelConfig:
    return KernelConfig(config.name, {k: config.blocks[k] for k in names}, 1, 1)


@dataclass(frozen=True)
class _Configs:
    """(default, candidates) per kernel for one dtype, group sizes and dimension."""

    pack: tuple[KernelConfig, tuple[KernelConfig, ...]]
    fused: tuple[KernelConfig, tuple[KernelConfig, ...]]
    pair: tuple[KernelConfig, tuple[KernelConfig, ...]]
    cov: tuple[KernelConfig, tuple[KernelConfig, ...]]
    cov_grad: tuple[KernelConfig, tuple[KernelConfig, ...]]
    pair_grad: tuple[KernelConfig, tuple[KernelConfig, ...]]

    @property
    def fused_rows(self) -> int:
        """Largest group that the fused single-tile Gram kernel takes."""
        return self.fused[0].blocks["BLOCK_R"]

    @property
    def pair_rows(self) -> int:
        return self.pair[0].blocks["BLOCK_R"]


def _configs(
    dtype: torch.dtype, gram_sizes: list[int], normalize: bool, interpret: bool
) -> _Configs:
    """The default rule. bf16/fp16: 128-wide tiles, 8 warps, 3 stages (Triton's
    128x128x64 H100 config) everywhere, except the fused Gram kernel, which uses
    64-row tiles when every single-tile group has <= 64 rows (the last-token mode:
    no work on padding rows); the gradient product of the covariance path uses
    128 x 128 (x 64) output tiles: M = 32 MB at D = 4096 stays in L2 and the 128-row
    panel of Z is reused across column tiles. fp16 without normalization: the tile
    pairs hold E and E^T in fp32 (TF32 products), so 32-wide feature chunks (4
    stages) keep them in registers. fp32: 32-row Gram tiles and 64-wide covariance
    tiles, 4 warps (IEEE fp32 products on CUDA cores: register-bound)."""
    if interpret:
        pack = _only(INTERP, "BLOCK_R", "BLOCK_D")
        gram = _only(INTERP, "BLOCK_R", "BLOCK_D")
        cov = _only(INTERP, "BLOCK_C", "BLOCK_K")
        cov_grad = _only(INTERP, "BLOCK_M", "BLOCK_N", "BLOCK_K")
        return _Configs(*((c, (c,)) for c in (pack, gram, gram, cov, cov_grad, cov_grad)))
    low = dtype in (torch.bfloat16, torch.float16)
    gram_set = GRAM_CONFIGS if low else GRAM_FP32
    big = gram_set[2] if dtype == torch.float16 and not normalize else gram_set[0]
    small = next(c for c in gram_set if c.blocks["BLOCK_R"] == 64) if low else big
    fused = small if all(s <= 64 for s in gram_sizes if s <= big.blocks["BLOCK_R"]) else gram_set[0]
    wide_ok = normalize or dtype != torch.float16  # 64-wide chunks spill fp32 E and E^T
    cov_set = COV_CONFIGS if low else COV_FP32
    grad_set = COV_GRAD_CONFIGS if low else COV_GRAD_FP32
    return _Configs(
        pack=(ROW_CONFIGS[0], ROW_CONFIGS),
        fused=(fused, tuple(c for c in gram_set if c.blocks["BLOCK_R"] == fused.blocks["BLOCK_R"])),
        pair=(big, tuple(c for c in gram_set if _same_tiles(c, big, wide_ok))),
        cov=(cov_set[0], _sharing(cov_set, "BLOCK_C")),
        cov_grad=(grad_set[0], _sharing(grad_set, "BLOCK_M")),
        pair_grad=(grad_set[0], grad_set),
    )


def _sharing(configs: tuple[KernelConfig, ...], block: str) -> tuple[KernelConfig, ...]:
    """The configs with the first one's `block` size (tile tables depend on it)."""
    return tuple(c for c in configs if c.blocks[block] == configs[0].blocks[block])


def _same_tiles(config: KernelConfig, default: KernelConfig, wide_ok: bool) -> bool:
    """An autotuning candidate for `default`: same row tiles (the launcher's tables
    depend on them), and feature chunks of at most 32 unless wide_ok."""
    rows = config.blocks["BLOCK_R"] == default.blocks["BLOCK_R"]
    return rows and (wide_ok or config.blocks["BLOCK_D"] <= 32)


def _launch(
    kernel: object,
    grid: Callable[[KernelConfig], tuple[int, ...]],
    key: tuple[object, ...],
    picked: tuple[KernelConfig, tuple[KernelConfig, ...]],
    scratch: tuple[str, ...] = (),
    **args: object,
) -> None:
    """common.launch with the default config, or the tuned one (DECPO_TRITON_AUTOTUNE=1
    on a GPU: the trial runs write into fresh copies of the `scratch` outputs).
    Candidates must not change the grid's meaning: configs that share the
    launcher's tile tables (same tile sizes) only, see _configs."""
    default, candidates = picked

    def trial(config: KernelConfig) -> None:
        # Scratch outputs are named without the _ptr suffix.
        trial_args = {
            k: (torch.zeros_like(v) if k.removesuffix("_ptr") in scratch and v is not None else v)
            for k, v in args.items()
        }
        kernel[grid(config)](**trial_args, **config.kwargs())  # type: ignore[index]

    config = common.pick_config(key, default, candidates, trial)
    common.launch(kernel, grid(config), config, candidates, **args)


# ------------------------------------------------------------------ plan and costs


@dataclass(eq=False)
class _Plan:
    """Which group runs where, in packed (bucketed, reordered) row order: groups of the
    fused Gram kernel first, then large Gram groups, then covariance groups. Plans are
    cached per group sizes (_plan) and not changed after they are made; `tables` keeps
    their device-side index tables (_table)."""

    dim: int
    dim_pad: int
    configs: _Configs
    dtype: torch.dtype = torch.bfloat16
    normalize: bool = True
    offdiag: bool = False
    fused: list[int] = field(default_factory=list)  # group sizes, in packed order
    pair: list[int] = field(default_factory=list)
    cov: list[int] = field(default_factory=list)
    tables: dict[tuple[object, ...], torch.Tensor] = field(default_factory=dict)

    @property
    def order(self) -> list[int]:
        return self.fused + self.pair + self.cov


def _table(
    plan: _Plan,
    name: str,
    build: Callable[[], list],
    dtype: torch.dtype,
    where: tuple[torch.device, int],
    transpose: bool = False,
) -> torch.Tensor:
    """host_table(build(), dtype, device, transpose), made once per plan, name and
    (device, stream) and then reused: building the lists and copying them cost more
    host time per call than the last-token case's kernels take on the GPU. Keyed by
    stream as well, so no stream reads a table before its asynchronous copy is done.
    The kernels only read the tables. Kept only for eager calls (decpo.ops.eager_scope)
    and never while the stream is being captured into a CUDA graph: a graph would
    keep reading a kept table that a later eviction frees, and torch.compile's CUDA
    graphs own the memory of the tensors made while they warm up."""
    capturing = where[0].type == "cuda" and torch.cuda.is_current_stream_capturing()
    if capturing or not in_eager_scope():
        return host_table(build(), dtype, where[0], transpose)
    key = (name, dtype, *where)
    table = plan.tables.get(key)
    if table is None:
        table = plan.tables[key] = host_table(build(), dtype, where[0], transpose)
    return table


def _where(device: torch.device) -> tuple[torch.device, int]:
    """(device, current stream id): the key of a device's cached tables."""
    if device.type != "cuda":
        return device, 0
    return device, torch._C._cuda_getCurrentRawStream(device.index)


@functools.lru_cache(maxsize=64)
def _plan(
    sizes: tuple[int, ...],
    dim: int,
    dtype: torch.dtype,
    normalize: bool,
    offdiag: bool,
    interpret: bool,
) -> tuple[_Plan, list[int]]:
    """(plan, original group index of each packed group); groups without a counted
    pair (empty, or one row with offdiag) are left out: zero loss, zero gradient.
    Cached: a training run sees few distinct group sizes, and each plan keeps its
    device tables. Callers must not change what it returns."""
    live = [(g, s) for g, s in enumerate(sizes) if s > (1 if offdiag else 0)]
    configs = _configs(dtype, [s for _, s in live if s <= dim], normalize, interpret)
    plan = _Plan(dim, triton.cdiv(dim, PAD) * PAD, configs, dtype, normalize, offdiag)
    index: dict[str, list[int]] = {"fused": [], "pair": [], "cov": []}
    for g, s in live:
        kind = "cov" if s > dim else ("fused" if s <= configs.fused_rows else "pair")
        getattr(plan, kind).append(s)
        index[kind].append(g)
    return plan, index["fused"] + index["pair"] + index["cov"]


def _starts(sizes: list[int], first: int = 0) -> list[int]:
    out = [first]
    for s in sizes:
        out.append(out[-1] + s)
    return out[:-1]


@functools.lru_cache(maxsize=256)  # per (cached) plan; callers do not change it
def _diag_pairs(plan: _Plan) -> list[tuple[int, int, int, int]]:
    block = plan.configs.pair_rows
    starts = _starts(plan.pair, sum(plan.fused))
    return [
        (start, s, i, i)
        for start, s in zip(starts, plan.pair, strict=True)
        for i in range(triton.cdiv(s, block))
    ]


@functools.lru_cache(maxsize=256)  # per (cached) plan; callers do not change it
def _off_pairs(plan: _Plan) -> list[tuple[int, int, int, int]]:
    block = plan.configs.pair_rows
    starts = _starts(plan.pair, sum(plan.fused))
    out = []
    for start, s in zip(starts, plan.pair, strict=True):
        t = triton.cdiv(s, block)
        out += [(start, s, i, j) for i in range(t) for j in range(i + 1, t)]
    return out


# Memory budget of the stored E blocks (all layers); above it, large Gram groups take
# the atomic path.
E_BUDGET = 512 * 2**20


def _e_dtype(plan: _Plan) -> torch.dtype:
    """E's storage dtype: the operand dtype of the second GEMM (see _operand): bf16 for
    bf16, fp16 for normalized fp16 (|E| <= 1), else fp32 (TF32 products for fp16)."""
    if plan.dtype == torch.bfloat16 or (plan.dtype == torch.float16 and plan.normalize):
        return plan.dtype
    return torch.float32


@functools.lru_cache(maxsize=256)  # per (cached) plan; callers do not change it
def _e_layout(plan: _Plan) -> tuple[list[int], int]:
    """(element offset of each large Gram group's E block, elements per layer): a
    (ld x ld) row-major block per group, ld = n rounded up to the pair tile."""
    block = plan.configs.pair_rows
    offs, total = [], 0
    for s in plan.pair:
        offs.append(total)
        total += (triton.cdiv(s, block) * block) ** 2
    return offs, total


def _stores_e(plan: _Plan, layers: int, compute_grad: bool) -> bool:
    """Whether the large Gram groups take the deterministic E path (E stored, then
    dZ = E Z): with a gradient, and when E of every layer fits E_BUDGET."""
    if not (compute_grad and plan.pair):
        return False
    esize = torch.finfo(_e_dtype(plan)).bits // 8
    return layers * _e_layout(plan)[1] * esize <= E_BUDGET


@functools.lru_cache(maxsize=256)  # per (cached) plan; callers do not change it
def _pair_blocks(plan: _Plan) -> list[tuple[int, int, int, int]]:
    """(start, n, first row, E offset) of every BLOCK_M row block of the gradient GEMM,
    last group first (its Z and E were the last that _gram_error_kernel touched)."""
    block = plan.configs.pair_grad[0].blocks["BLOCK_M"]
    starts = _starts(plan.pair, sum(plan.fused))
    offs, _ = _e_layout(plan)
    out = [
        (start, s, r0, off)
        for start, s, off in zip(starts, plan.pair, offs, strict=True)
        for r0 in range(0, s, block)
    ]
    return out[::-1]


@functools.lru_cache(maxsize=256)  # per (cached) plan; callers do not change it
def _cov_tiles(plan: _Plan, same: bool) -> list[tuple[int, int, int]]:
    t = triton.cdiv(plan.dim_pad, plan.configs.cov[0].blocks["BLOCK_C"])
    if same:
        return [(k, a, a) for k in range(len(plan.cov)) for a in range(t)]
    return [(k, a, b) for k in range(len(plan.cov)) for a in range(t) for b in range(a + 1, t)]


@functools.lru_cache(maxsize=256)  # per (cached) plan; callers do not change it
def _cov_blocks(plan: _Plan) -> list[tuple[int, int]]:
    block = plan.configs.cov_grad[0].blocks["BLOCK_M"]
    return [(k, r0) for k, s in enumerate(plan.cov) for r0 in range(0, s, block)]


def _kernel_costs(
    plan: _Plan, layers: int, dtype: torch.dtype, compute_grad: bool, l2_bytes: float = 40e6
) -> dict[str, dict[str, float]]:
    """FLOPs and bytes of every launch of `plan` (and of the gradient's zero fill),
    from its tiles; all rows of the input selected.

    flops: 2 per multiply-add of every tl.dot as tiled (the padding rows of a
    partial tile included: the tensor cores compute them) plus the elementwise
    passes. tile_bytes: every tile load and store the programs issue (L2 <-> SM
    traffic, re-reads per tile included). bytes: the HBM estimate under a stated L2
    model: a buffer that fits the L2 budget (40 of the 50 MB) is read from HBM once
    per launch however many tiles re-read it, otherwise once per re-reading tile;
    the covariance C kernel streams the group's rows once per wave of concurrent
    programs (132 SMs, one 128-wide tile program each); atomics are counted at L2
    (atomic_bytes, 4 B each) and in HBM as the fp32 buffer's first store and one
    write-back."""
    cfg = plan.configs
    dp, d = plan.dim_pad, plan.dim
    op = torch.finfo(dtype).bits // 8  # packed operand = input dtype
    m_bytes = 2 if dtype == torch.bfloat16 else 4
    g_out = torch.finfo(grad_dtype(dtype)).bits // 8 if compute_grad else 0
    s_all = sum(plan.order)
    out: dict[str, dict[str, float]] = {}

    def add(name: str, flops: float, tile: float, hbm: float, atomic: float = 0.0) -> None:
        values = {"flops": flops, "tile_bytes": tile, "bytes": hbm, "atomic_bytes": atomic}
        out[name] = {k: layers * v for k, v in values.items()}

    # pack: h read twice (norm, then scale: the second read of a 16-row block hits
    # L2), z written, three fp32 row statistics; the gradient's zero fill.
    add(
        "pack",
        4.0 * s_all * d,
        s_all * (2 * d * op + dp * op + 16),
        s_all * (d * op + dp * op + 16),
    )
    if plan.fused:
        br = cfg.fused_rows
        passes = 2 if compute_grad else 1  # G, then E Z with the dh epilogue
        flops = sum(2.0 * br * br * dp * passes + 8.0 * s * d for s in plan.fused)
        io = sum(passes * s * dp * op + s * d * g_out + 16 * s for s in plan.fused)
        add("gram_fused", flops, io, io)
    stores_e = _stores_e(plan, layers, compute_grad)
    if stores_e:
        br = cfg.pair_rows
        e_bytes = torch.finfo(_e_dtype(plan)).bits // 8
        flops = tile = hbm = 0.0
        for s in plan.pair:
            t = triton.cdiv(s, br)
            products = t + t * (t - 1)  # tile loads: diagonal pairs 1, others 2
            z_group = s * dp * op
            flops += 2.0 * br * br * dp * (t + t * (t - 1) // 2)  # G tiles, J >= I
            e_group = (t * br) ** 2 * e_bytes  # E_IJ and its mirror: every tile once
            tile += dp * br * op * products + e_group + 8.0 * s * t
            hbm += z_group * (1 if 2 * z_group <= l2_bytes else t) + e_group + 4.0 * s * t
        add("gram_error", flops, tile, hbm)
        bm = cfg.pair_grad[0].blocks["BLOCK_M"]
        bn = cfg.pair_grad[0].blocks["BLOCK_N"]
        cols = triton.cdiv(dp, bn)
        flops = tile = hbm = 0.0
        # L2 reuse across the two launches: the grad launch starts with the last
        # layer's last groups, whose Z (and E) the error launch touched last; Z of the
        # trailing groups whose Z + E fit the L2 budget together is not re-read from HBM.
        held = 0.0
        for s in reversed(plan.pair):
            ld = triton.cdiv(s, br) * br
            if held + s * dp * op + ld * ld * e_bytes > l2_bytes:
                break
            held += s * dp * op + ld * ld * e_bytes
            hbm -= s * dp * op / layers  # once per call, not per layer
        for s in plan.pair:
            ld = triton.cdiv(s, br) * br
            blocks = triton.cdiv(s, bm)
            z_group, e_group = s * dp * op, ld * ld * e_bytes
            flops += 2.0 * blocks * bm * cols * bn * ld + 4.0 * s * d  # E Z, epilogue
            # per program: its E row panel, Z's K x BLOCK_N panel, the z tile of the
            # epilogue and the dh tile; E (2 MB at n = 1024) and the group's Z stay in L2
            # across the column tiles and row blocks.
            tile += blocks * cols * (bm * ld * e_bytes + ld * bn * op + bm * bn * op)
            tile += s * (d * g_out + 4 * triton.cdiv(s, br) + 12)
            fits = z_group + e_group <= l2_bytes
            hbm += (z_group + e_group) * (1 if fits else blocks) + s * (d * g_out + 12)
            hbm += 4.0 * s * triton.cdiv(s, br)  # radial partials
        add("gram_grad", flops, tile, hbm)
    elif plan.pair:
        br = cfg.pair_rows
        flops = tile = hbm = atomic = 0.0
        for s in plan.pair:
            t = triton.cdiv(s, br)
            products = t + t * (t - 1)  # tile loads: diagonal pairs 1, others 2
            z_group = s * dp * op
            reread = 1 if 2 * z_group <= l2_bytes else t
            flops += 2.0 * br * br * dp * (t + t * (t - 1) // 2)  # G tiles, J >= I
            tile += dp * br * op * products
            hbm += z_group * reread
            if compute_grad:
                flops += 2.0 * br * br * dp * products  # E Z_J and E^T Z_I
                tile += dp * br * op * products
                atomic += 4.0 * (dp + 1) * br * products
                hbm += z_group * reread + 8.0 * s * dp  # dz: stored, then written back
        add("gram_pair", flops, tile, hbm, atomic)
    if plan.cov:
        bc = cfg.cov[0].blocks["BLOCK_C"]
        t = triton.cdiv(dp, bc)
        tiles = t * (t + 1) // 2
        waves = math.ceil(tiles * len(plan.cov) / 132)
        flops = tile = hbm = 0.0
        for s in plan.cov:
            flops += 2.0 * bc * bc * s * tiles
            tile += s * bc * op * (2 * tiles - t)  # diagonal tiles load one panel
            hbm += waves / len(plan.cov) * s * dp * op
            if compute_grad:
                tile += bc * bc * m_bytes * (2 * tiles - t)  # M_ab and its mirror
                hbm += dp * dp * m_bytes
        add("cov", flops, tile, hbm)
        if compute_grad:
            bm = cfg.cov_grad[0].blocks["BLOCK_M"]
            bn = cfg.cov_grad[0].blocks["BLOCK_N"]
            cols = triton.cdiv(dp, bn)
            flops = tile = hbm = 0.0
            m_total = dp * dp * m_bytes
            for s in plan.cov:
                blocks = triton.cdiv(s, bm)
                flops += 2.0 * blocks * bm * cols * bn * dp
                tile += blocks * cols * (bm * dp * op + dp * bn * m_bytes + bm * bn * (op + 4))
                hbm += s * dp * op + m_total * (1 if m_total <= l2_bytes else blocks)
                hbm += s * dp * 4  # dz
            add("cov_grad", flops, tile, hbm)
    if compute_grad and ((plan.pair and not stores_e) or plan.cov):
        rows = (0 if stores_e else sum(plan.pair)) + sum(plan.cov)
        io = rows * (dp * 4 + dp * op + d * g_out + 16)
        add("finish", 4.0 * rows * d, io, io)
    return out


def decorrelation_cost(
    sizes: list[int] | tuple[int, int],
    dim: int,
    dtype: torch.dtype = torch.bfloat16,
    *,
    layers: int = 1,
    normalize: bool = True,
    offdiag: bool = False,
    compute_grad: bool = True,
) -> tuple[float, float]:
    """(FLOPs, HBM bytes) of decorrelation_penalty as this module tiles it on the GPU,
    for groups of `sizes` rows (a list, or (groups, rows per group)) of dimension
    `dim` in each of `layers` layers; loss and gradient when compute_grad. See
    decorrelation_cost_detail for the per-kernel split and the L2 model."""
    detail = decorrelation_cost_detail(
        sizes,
        dim,
        dtype,
        layers=layers,
        normalize=normalize,
        offdiag=offdiag,
        compute_grad=compute_grad,
    )
    total = detail["total"]
    return total["flops"], total["bytes"]


def decorrelation_cost_detail(
    sizes: list[int] | tuple[int, int],
    dim: int,
    dtype: torch.dtype = torch.bfloat16,
    *,
    layers: int = 1,
    normalize: bool = True,
    offdiag: bool = False,
    compute_grad: bool = True,
) -> dict[str, dict[str, float]]:
    """Per kernel and "total": flops, bytes (HBM estimate), tile_bytes, atomic_bytes."""
    if isinstance(sizes, tuple):
        sizes = [sizes[1]] * sizes[0]
    plan, _ = _plan(tuple(sizes), dim, dtype, normalize, offdiag, False)
    per = _kernel_costs(plan, layers, dtype, compute_grad)
    keys = ("flops", "bytes", "tile_bytes", "atomic_bytes")
    per["total"] = {k: sum(v[k] for v in per.values()) for k in keys}
    return per


def headline_costs() -> list[dict[str, float | str]]:
    """FLOPs and HBM bytes of the headline cases (loss + gradient, bf16; groups x rows
    per group): 16 sequences of 1024 tokens, one group each (all tokens); one group
    of 16384 rows (covariance path); last-token mode, 8 layers of 64 rows."""
    cases = [
        ("decorrelation 16x1024 D=4096 bf16 (gram pairs)", (16, 1024), 4096, 1),
        ("decorrelation 1x16384 D=4096 bf16 (covariance)", (1, 16384), 4096, 1),
        ("decorrelation last-token 8x64 D=14336 bf16", (1, 64), 14336, 8),
    ]
    out = []
    for name, sizes, dim, layers in cases:
        detail = decorrelation_cost_detail(sizes, dim, torch.bfloat16, layers=layers)
        groups, n = sizes
        useful = 3.0 * groups * n * dim * min(n, dim) * layers  # docs/design.md: 3 n D min(n, D)
        out.append({"case": name, **detail["total"], "useful_flops": useful})
    return out


# ------------------------------------------------------------------ launcher


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
    backend for the contract. FLOPs and HBM bytes: decorrelation_cost(sizes, D)."""
    n_layers, n, dim = hidden.shape
    device = hidden.device
    where = _where(device)
    if mask is None and segment_ids is None:  # one group of all rows: no device work
        rows, sizes = None, [n] if n else []
    else:
        rows, sizes = bucket_rows(n, mask, segment_ids, device)
    pairs = sum(s * (s - 1) if offdiag else s * s for s in sizes)
    shape, gdtype = hidden.shape, grad_dtype(hidden.dtype)
    if pairs == 0 or n_layers == 0:
        zero = (
            torch.zeros(shape, dtype=gdtype, device=device) if compute_grad else hidden.new_empty(0)
        )
        return torch.zeros((), dtype=torch.float32, device=device), zero
    scale = 1.0 / n_layers / (pairs if reduction == "mean" else 1)
    interpret = interpreting()
    plan, order = _plan(tuple(sizes), dim, hidden.dtype, normalize, offdiag, interpret)
    cfg = plan.configs
    # The kernels write every selected row of a counted group: no zero fill when that
    # is every row.
    alloc = torch.empty if sum(plan.order) == n else torch.zeros
    grad = alloc(shape, dtype=gdtype, device=device) if compute_grad else hidden.new_empty(0)
    # Packed order: fused groups, large Gram groups, covariance groups.
    if rows is None:  # every row, in order (one group)
        rows = torch.arange(n, dtype=torch.int32, device=device)
    elif order == list(range(len(sizes))):  # already in packed order, every group counted
        rows = rows.to(torch.int32)
    else:
        parts = torch.split(rows, sizes)
        rows = torch.cat([parts[g] for g in order]).to(torch.int32)
    n_sel, dp, L = rows.numel(), plan.dim_pad, n_layers  # rows: (S,) int32, contiguous
    dkey = (str(hidden.dtype), dim, normalize, offdiag, compute_grad)

    z = torch.empty((L, n_sel, dp), dtype=hidden.dtype, device=device)
    # Per-row statistics in one allocation: 1 / norm, squared norm of z, of x.
    inv, sq, sqx = torch.empty((3, L, n_sel), dtype=torch.float32, device=device).unbind()
    _launch(
        _pack_kernel,
        lambda c: (triton.cdiv(n_sel, c.blocks["BLOCK_R"]), L),
        ("pack", *dkey),
        cfg.pack,
        ("z", "inv", "sq", "sqx"),
        h_ptr=hidden,
        rows_ptr=rows,
        z_ptr=z,
        inv_ptr=inv,
        sq_ptr=sq,
        sqx_ptr=sqx,
        S=n_sel,
        D=dim,
        DP=dp,
        stride_hl=hidden.stride(0),
        stride_hn=hidden.stride(1),
        stride_hd=hidden.stride(2),
        NORMALIZE=normalize,
        INTERPRET=interpret,
    )
    # The loss: float64 sums of each launch's per-program partials, added at the end.
    sums: list[torch.Tensor] = []
    constant = 0.0
    gstrides = {
        "stride_gl": grad.stride(0) if compute_grad else 0,
        "stride_gn": grad.stride(1) if compute_grad else 0,
        "stride_gd": grad.stride(2) if compute_grad else 0,
    }
    n_fused, n_pair = sum(plan.fused), sum(plan.pair)
    stores_e = _stores_e(plan, L, compute_grad)
    needs_dz = compute_grad and ((plan.pair and not stores_e) or plan.cov)
    # dz: stored by the diagonal tile pairs, then atomically added to by the others
    # (large Gram groups whose E blocks exceed E_BUDGET); written whole by the
    # covariance path.
    # Unused outputs are None: the kernels' COMPUTE_GRAD constexpr drops their code.
    dz = torch.empty((L, n_sel, dp), dtype=torch.float32, device=device) if needs_dz else None
    radial = torch.zeros((L, n_sel), dtype=torch.float32, device=device) if needs_dz else None

    if plan.fused:
        g = len(plan.fused)
        starts = _table(plan, "fused starts", lambda: _starts(plan.fused), torch.int32, where)
        counts = _table(plan, "fused sizes", lambda: plan.fused, torch.int32, where)
        partial = torch.empty((L, g), dtype=torch.float32, device=device)
        _launch(
            _gram_fused_kernel,
            lambda c: (g, L),
            ("fused", max(plan.fused), *dkey),
            cfg.fused,
            ("partial", "grad"),
            z_ptr=z,
            inv_ptr=inv,
            sq_ptr=sq,
            sqx_ptr=sqx,
            rows_ptr=rows,
            grad_ptr=grad if compute_grad else None,
            partial_ptr=partial,
            group_start_ptr=starts,
            group_n_ptr=counts,
            S=n_sel,
            D=dim,
            DP=dp,
            G=g,
            **gstrides,
            scale=scale,
            OFFDIAG=offdiag,
            NORMALIZE=normalize,
            COMPUTE_GRAD=compute_grad,
            INTERPRET=interpret,
        )
        sums.append(partial.sum(dtype=torch.float64))

    if stores_e:
        sums += _gram_error_path(plan, z, inv, sq, sqx, rows, grad, gstrides, scale, dkey, where)
    for same, tiles in ((True, _diag_pairs), (False, _off_pairs)):
        if stores_e or not plan.pair or not tiles(plan):
            continue
        t = _table(plan, f"pairs {same}", lambda f=tiles: f(plan), torch.int32, where, True)
        npairs = t.shape[1]
        partial = torch.empty((L, npairs), dtype=torch.float32, device=device)
        _launch(
            _gram_pair_kernel,
            lambda c, p=npairs: (p, L),
            ("pair", same, max(plan.pair), *dkey),
            cfg.pair,
            ("partial", "dz", "radial"),
            z_ptr=z,
            sqx_ptr=sqx,
            dz_ptr=dz,
            radial_ptr=radial,
            partial_ptr=partial,
            pair_start_ptr=t[0],
            pair_n_ptr=t[1],
            pair_i_ptr=t[2],
            pair_j_ptr=t[3],
            S=n_sel,
            DP=dp,
            P=npairs,
            SAME=same,
            OFFDIAG=offdiag,
            NORMALIZE=normalize,
            COMPUTE_GRAD=compute_grad,
            INTERPRET=interpret,
        )
        sums.append(partial.sum(dtype=torch.float64))

    if plan.cov:
        k = len(plan.cov)
        first = n_fused + n_pair
        starts_l = _starts(plan.cov, first)
        group_start = _table(plan, "cov starts", lambda: starts_l, torch.int32, where)
        group_n = _table(plan, "cov sizes", lambda: plan.cov, torch.int32, where)
        # s = sum ||z||^2 and q = sum ||z||^4 per (group, layer), in float64.
        seg = torch.repeat_interleave(  # each row's group; output_size given: no host sync
            torch.arange(k, device=device), group_n, output_size=sum(plan.cov)
        )
        sq_cov = sq[:, first:].double()  # (L, n_cov)
        s_tot = torch.zeros((L, k), dtype=torch.float64, device=device).index_add_(1, seg, sq_cov)
        q_tot = torch.zeros_like(s_tot).index_add_(1, seg, sq_cov.square())
        c = (s_tot / dim).T.contiguous().float()  # (k, L)
        m_dtype = torch.bfloat16 if hidden.dtype == torch.bfloat16 else torch.float32
        m = torch.empty((k, L, dp, dp), dtype=m_dtype, device=device) if compute_grad else None
        for same in (True, False):
            if not _cov_tiles(plan, same):
                continue
            t = _table(plan, f"cov tiles {same}", lambda s_=same: _cov_tiles(plan, s_),
                       torch.int32, where, True)  # fmt: skip
            npairs = t.shape[1]
            partial = torch.empty((L, npairs), dtype=torch.float32, device=device)
            _launch(
                _cov_kernel,
                lambda c_, p=npairs: (p, L),
                ("cov", same, max(plan.cov), *dkey),
                cfg.cov,
                ("partial", "m"),
                z_ptr=z,
                m_ptr=m,
                c_ptr=c,
                partial_ptr=partial,
                pair_group_ptr=t[0],
                pair_a_ptr=t[1],
                pair_b_ptr=t[2],
                group_start_ptr=group_start,
                group_n_ptr=group_n,
                S=n_sel,
                D=dim,
                DP=dp,
                P=npairs,
                L=L,
                SAME=same,
                COMPUTE_GRAD=compute_grad,
                INTERPRET=interpret,
            )
            sums.append(partial.sum(dtype=torch.float64))
        if offdiag:
            extra = s_tot.square() / dim - q_tot
        else:  # plus sum over groups and layers of (n_g - D), a host constant
            extra = (s_tot - dim).square() / dim
            constant += L * sum(s - dim for s in plan.cov)
        sums.append(extra.sum())
        if compute_grad:
            blocks = _cov_blocks(plan)
            bt = _table(plan, "cov blocks", lambda: blocks, torch.int32, where, True)
            _launch(
                _cov_grad_kernel,
                lambda c_: (triton.cdiv(dp, c_.blocks["BLOCK_N"]), len(blocks), L),
                ("cov_grad", max(plan.cov), *dkey),
                cfg.cov_grad,
                ("dz", "radial"),
                z_ptr=z,
                m_ptr=m,
                c_ptr=c,
                sq_ptr=sq,
                dz_ptr=dz,
                radial_ptr=radial,
                block_group_ptr=bt[0],
                block_row_ptr=bt[1],
                group_start_ptr=group_start,
                group_n_ptr=group_n,
                S=n_sel,
                DP=dp,
                L=L,
                OFFDIAG=offdiag,
                INTERPRET=interpret,
            )

    if needs_dz:
        row0 = n_fused + (n_pair if stores_e else 0)
        rest = n_sel - row0
        _launch(
            _finish_kernel,
            lambda c_: (triton.cdiv(rest, c_.blocks["BLOCK_R"]), L),
            ("finish", *dkey),
            cfg.pack,
            ("grad",),
            z_ptr=z,
            inv_ptr=inv,
            sq_ptr=sq,
            rows_ptr=rows,
            dz_ptr=dz,
            radial_ptr=radial,
            grad_ptr=grad,
            S=n_sel,
            D=dim,
            DP=dp,
            row0=row0,
            **gstrides,
            scale=scale,
            NORMALIZE=normalize,
            INTERPRET=interpret,
        )
    total = sums[0] if len(sums) == 1 else torch.stack(sums).sum()
    loss = ((total + constant if constant else total) * scale).float()
    # An infinite loss is reported as NaN (as the other backends do): x - x is 0 for
    # finite x and NaN otherwise; two launches where isfinite and where took three.
    return loss + (loss - loss), grad


def _gram_error_path(
    plan: _Plan,
    z: torch.Tensor,
    inv: torch.Tensor,
    sq: torch.Tensor,
    sqx: torch.Tensor,
    rows: torch.Tensor,
    grad: torch.Tensor,
    gstrides: dict[str, int],
    scale: float,
    dkey: tuple[object, ...],
    where: tuple[torch.device, int],
) -> list[torch.Tensor]:
    """Large Gram groups, deterministic: the tile pairs store E (and the loss and
    radial partials), then the second GEMM writes dh = E Z with the normalization's
    backward in its epilogue. Returns the loss sums of its launches (float64)."""
    cfg = plan.configs
    L, n_sel, dp = z.shape
    device = z.device
    offs, e_per_layer = _e_layout(plan)
    tile_r = cfg.pair_rows
    t_max = max(triton.cdiv(s, tile_r) for s in plan.pair)
    e = torch.empty((L, e_per_layer), dtype=_e_dtype(plan), device=device)
    rpart = torch.empty((L, t_max, n_sel), dtype=torch.float32, device=device)
    off_of = dict(zip(_starts(plan.pair, sum(plan.fused)), offs, strict=True))
    sums = []
    for same, tiles in ((True, _diag_pairs), (False, _off_pairs)):
        if not tiles(plan):
            continue
        t = _table(plan, f"pairs with E offsets {same}",
                   lambda f=tiles: [(*row, off_of[row[0]]) for row in f(plan)],
                   torch.int32, where, True)  # fmt: skip
        npairs = t.shape[1]
        partial = torch.empty((L, npairs), dtype=torch.float32, device=device)
        _launch(
            _gram_error_kernel,
            lambda c, p=npairs: (p, L),
            ("pair_e", same, max(plan.pair), *dkey),
            cfg.pair,
            ("partial", "e", "rpart"),
            z_ptr=z,
            sqx_ptr=sqx,
            e_ptr=e,
            rpart_ptr=rpart,
            partial_ptr=partial,
            pair_start_ptr=t[0],
            pair_n_ptr=t[1],
            pair_i_ptr=t[2],
            pair_j_ptr=t[3],
            pair_eoff_ptr=t[4],
            S=n_sel,
            DP=dp,
            P=npairs,
            E_L=e_per_layer,
            T_MAX=t_max,
            SAME=same,
            OFFDIAG=plan.offdiag,
            INTERPRET=interpreting(),
        )
        sums.append(partial.sum(dtype=torch.float64))
    blocks = _pair_blocks(plan)
    bt = _table(plan, "pair blocks", lambda: blocks, torch.int32, where, True)
    assert all(tile_r % c.blocks["BLOCK_K"] == 0 for c in cfg.pair_grad[1])
    _launch(
        _gram_grad_kernel,
        lambda c_: (triton.cdiv(dp, c_.blocks["BLOCK_N"]), len(blocks), L),
        ("pair_grad", max(plan.pair), *dkey),
        cfg.pair_grad,
        ("grad",),
        z_ptr=z,
        e_ptr=e,
        inv_ptr=inv,
        sq_ptr=sq,
        rpart_ptr=rpart,
        rows_ptr=rows,
        grad_ptr=grad,
        block_start_ptr=bt[0],
        block_n_ptr=bt[1],
        block_row_ptr=bt[2],
        block_eoff_ptr=bt[3],
        S=n_sel,
        D=plan.dim,
        DP=dp,
        E_L=e_per_layer,
        T_MAX=t_max,
        TILE_R=tile_r,
        **gstrides,
        scale=scale,
        NORMALIZE=plan.normalize,
        INTERPRET=interpreting(),
    )
    return sums


# ------------------------------------------------------------------ compile gate


def _gate_thunk(
    shape: tuple[int, int, int],
    dtype: torch.dtype,
    group: int | None = None,
    normalize: bool = True,
    offdiag: bool = False,
    compute_grad: bool = True,
    e_budget: int | None = None,
) -> Callable[[], None]:
    def thunk() -> None:
        global E_BUDGET
        hidden = torch.randn(shape).to(dtype)
        n = shape[1]
        seg = None if group is None else torch.arange(n) // group
        saved = E_BUDGET
        E_BUDGET = saved if e_budget is None else e_budget
        try:
            decorrelation_penalty(hidden, None, seg, normalize, offdiag, "mean", compute_grad)
        finally:
            E_BUDGET = saved

    return thunk


def gate_cases() -> list[tuple[str, str, Callable[[], None]]]:
    """(case, shape class, thunk) for bench.kernel_stats: each thunk runs the launcher
    on CPU tensors of a representative shape (under common.recording() the launches
    are recorded, not run). Shape classes: gram-small (groups of <= 64 rows, one
    tile: last-token mode, 8 layers), gram-tile (<= 128 rows, one tile), gram-large
    (tile pairs), covariance (n > D); every dtype, with normalize off and offdiag on
    where they change the compiled code, and the no-gradient forward. gram-large runs
    twice: E stored (the default) and E over its budget (the atomic fallback)."""
    shapes = [
        ("last-token 8x64 D=14336", "gram-small", (8, 64, 14336), None, None),
        ("4x100 D=4096", "gram-tile", (1, 400, 4096), 100, None),
        ("4x1024 D=4096", "gram-large", (1, 4096, 4096), 1024, None),
        ("1x4096 D=1024", "covariance", (1, 4096, 1024), None, None),
        ("4x1024 D=4096 atomic", "gram-large", (1, 4096, 4096), 1024, 0),
    ]
    flags = {
        torch.bfloat16: [(True, False), (True, True), (False, False)],
        torch.float16: [(True, False), (False, False)],
        torch.float32: [(True, False)],
    }
    cases = []
    for dtype, variants in flags.items():
        dt = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
        for normalize, offdiag in variants:
            tag = f"{dt}{'' if normalize else ' raw'}{' offdiag' if offdiag else ''}"
            for name, cls, shape, group, budget in shapes:
                thunk = _gate_thunk(shape, dtype, group, normalize, offdiag, e_budget=budget)
                cases.append((f"decorrelation {name} {tag}", cls, thunk))
        for name, cls, shape, group, _ in shapes[2:4]:
            thunk = _gate_thunk(shape, dtype, group, compute_grad=False)
            cases.append((f"decorrelation no-grad {name} {dt}", cls, thunk))
    return cases
