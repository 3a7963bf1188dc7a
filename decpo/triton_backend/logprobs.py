"""Triton kernels for per-token log-probs: tensor-core GEMMs with fused epilogues.

token_logprobs(hidden (N, D), weight (V, D), targets (N,)): ignored tokens are
compacted away first (they cost nothing), then the M valid rows are processed in
chunks of C rows. Final logits z = f(h W^T + b) with f = logit_scale, optional
softcap (cap tanh(x / cap)) and 1 / temperature.

Frozen head (the LoRA case), forward + gradient in the forward, 4 C V D FLOPs:
  GEMM 1 `_logits_kernel`, 2-D grid over (row tiles x vocabulary tiles) in grouped
      order (GROUP_M row tiles share each weight tile while it is in L2). Its
      epilogue turns the fp32 logit tile into per-tile partials (max m_t, sum of
      exp(z - m_t) over v != y, and the statistics sums) and stores
      q = exp(z - m_t) f'(a) (0 at the target) in the weight's dtype: a value in
      [0, 1] that needs no global max, so the logits never exist in memory.
  combine `_combine_kernel`: per row, lse from the partials, logp = z_y - lse, the
      statistics, and the per-(row, tile) factor exp(m_t - lse) f'-scale.
  rescale `_rescale_kernel`: q *= its tile's factor in place (fp32 product, one
      rounding), so that q holds p_v f'(a_v): one more read and write of q.
  GEMM 2 `_grad_kernel`, 2-D grid over (row tiles x D tiles), K = vocabulary:
      acc = sum_{v != y} p_v f'(a_v) W_v with q as stored as its A operand;
      epilogue d logp / d h = (1 - p_y) f'(a_y) W_y - acc. The target's own term
      stays out of the sum (no cancellation when p_y ~ 1). Scaling q as GEMM 2 loads
      it instead redoes the product once per D tile (16 times at D = 4096) and puts
      the A operand through registers: on an H100 GEMM 2 ran at 548 TFLOP/s that
      way against 681 on q as stored, ~20% of GEMM 2 for a pass of ~5% of it.
Forward only (reference model): GEMM 1 without the store + combine, 2 C V D FLOPs.
Trainable head (backward, lse known): GEMM 1 recomputes each tile and stores
      G = g (1[v = y] - p) f'(a) (6 C V D FLOPs in all with GEMMs 2 and 3); GEMM 2
      gives d hidden = G W; GEMM 3 `_dweight_kernel`, a grid over (vocabulary x D)
      tiles, gives d weight = G^T h and d bias = column sums of G; every output tile
      is written by one program (accumulated across chunks), no atomics.
No kernel uses atomics: results are bit-identical run to run.

Why two GEMMs rather than one online pass: an online pass keeps sum_v p_v W_v per
row, a (BLOCK_M, D) fp32 accumulator. It stays on chip only while BLOCK_M x D x 4 B
fits in shared memory next to the operand tiles (D <= 256 at BLOCK_M = 128); at
D = 4096 it is read and written once per vocabulary tile (~270 GB at N = 8192,
V = 128256). Storing q costs 2 bytes written and read per logit (4.2 GB there), and
recomputing a logit would cost 2 D FLOPs (~28 bytes' worth of H100 bandwidth).
Language models have D >= 768, so the two-GEMM structure is used for every shape.

Chunk size: C = budget / (V_padded x element size) rows (budget DECPO_TRITON_CHUNK_MB,
default 1024 MiB, so at most that much scratch; 4096 rows at V = 128256 bf16); the
N x V logits are never allocated. HBM traffic and FLOPs of this tiling:
`token_logprobs_cost` (bench/cases.py's `tiled_cost`, which bench.kernel_stats
--roofline prints for every GPU case).

logprobs_from_logits: the forward reads each logit once (online logsumexp and
gather); the backward reads it once more and writes the gradient once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from decpo.numerics import head_ok, interpreting, valid_rows
from decpo.triton_backend.common import (
    KernelConfig,
    cast,
    dot,
    launch,
    launch_tuned,
)

N_STATS = 4  # entropy, logit sum, target is argmax, log sum p^2

# ------------------------------------------------------------------ kernels


@triton.jit
def _grouped_tile(pid, n_a, n_b, GROUP_A: tl.constexpr):
    """Program id -> (tile a, tile b), GROUP_A consecutive a-tiles per b-column so the
    b-operand tile is reused from L2 (Triton's matmul tutorial ordering)."""
    width = GROUP_A * n_b
    first = (pid // width) * GROUP_A
    size = tl.minimum(n_a - first, GROUP_A)
    return first + (pid % width) % size, (pid % width) // size


@triton.jit
def _logit_tile(
    h_ptr,
    w_ptr,
    rows,
    cols,
    D,
    stride_hm,
    stride_hd,
    stride_wv,
    stride_wd,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """fp32 (BLOCK_M, BLOCK_V) tile of h W^T: a K-loop of tensor-core dots."""
    ks = tl.arange(0, BLOCK_D)
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hm + ks[None, :] * stride_hd
    w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * stride_wv + ks[:, None] * stride_wd
    acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    for k in range(0, tl.cdiv(D, BLOCK_D)):
        k_left = D - k * BLOCK_D
        h = tl.load(h_ptrs, mask=ks[None, :] < k_left, other=0.0)  # (BLOCK_M, BLOCK_D)
        w = tl.load(w_ptrs, mask=ks[:, None] < k_left, other=0.0)  # (BLOCK_D, BLOCK_V)
        acc = dot(h, w, acc, INTERPRET)
        h_ptrs += BLOCK_D * stride_hd
        w_ptrs += BLOCK_D * stride_wd
    return acc


@triton.jit
def _final_logits(
    a,
    b_ptr,
    cols,
    col_ok,
    logit_scale,
    softcap,
    inv_t,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """(z, f'(a) / (logit_scale inv_t)) for raw logits a: z = f(a + b) with f the
    logit scale, the softcap and 1/T; the derivative factor is 1 without a softcap."""
    if HAS_BIAS:
        a += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    x = a * logit_scale
    if SOFTCAP:
        t = 2.0 / (1.0 + tl.exp(-2.0 * x / softcap)) - 1.0  # tanh(x / softcap)
        x = softcap * t
        slope = 1.0 - t * t
    else:
        slope = tl.full(a.shape, 1.0, tl.float32)
    return x * inv_t, slope


@triton.heuristics({"HAS_BIAS": lambda args: args["b_ptr"] is not None})
@triton.jit
def _logits_kernel(
    # pointers
    h_ptr,
    w_ptr,
    b_ptr,
    t_ptr,
    q_ptr,
    part_ptr,
    zy_ptr,
    g_ptr,
    lse_ptr,
    # shapes
    M,
    V,
    D,
    NT,
    # strides
    stride_hm,
    stride_hd,
    stride_wv,
    stride_wd,
    stride_qm,
    stride_pk,
    # scalars
    logit_scale,
    softcap,
    inv_t,
    # flags
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    MODE: tl.constexpr,
    STATS: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """GEMM 1 with its epilogue. MODE 0: partials only (forward without gradient);
    MODE 1: partials and q (frozen-head forward); MODE 2: G for the backward (needs
    g and lse). Partials, fp32 (K, M, NT) with K = 2 (+3 with STATS): tile max,
    sum exp(z - max) over v != y (, sum e z, sum e^2, sum z)."""
    pid_m, pid_v = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), NT, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < M
    col_ok = cols < V
    a = _logit_tile(
        h_ptr,
        w_ptr,
        tl.where(row_ok, rows, 0),
        tl.where(col_ok, cols, 0),
        D,
        stride_hm,
        stride_hd,
        stride_wv,
        stride_wd,
        INTERPRET,
        BLOCK_M,
        BLOCK_V,
        BLOCK_D,
    )
    z, slope = _final_logits(a, b_ptr, cols, col_ok, logit_scale, softcap, inv_t, HAS_BIAS, SOFTCAP)
    z = tl.where(col_ok[None, :], z, float("-inf"))
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    is_t = cols[None, :] == tgt[:, None]  # (BLOCK_M, BLOCK_V)
    rows64 = rows.to(tl.int64)
    q_ptrs = q_ptr + rows64[:, None] * stride_qm + cols[None, :]
    if MODE == 2:
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        p = tl.exp(z - lse[:, None])
        d = tl.where(is_t, 1.0 - p, -p) * slope * (g * (logit_scale * inv_t))[:, None]
        d = tl.where(row_ok[:, None] & col_ok[None, :], d, 0.0)
        tl.store(q_ptrs, cast(d, q_ptr.dtype.element_ty, INTERPRET), mask=row_ok[:, None])
    else:
        has_t = (tgt >= pid_v * BLOCK_V) & (tgt < pid_v * BLOCK_V + BLOCK_V)
        tl.store(zy_ptr + rows, tl.sum(tl.where(is_t, z, 0.0), 1), mask=row_ok & has_t)
        n_nan = tl.sum((z != z).to(tl.int32), 1)
        m = tl.max(z, 1)
        m = tl.where(n_nan > 0, float("nan"), m)
        m_safe = tl.where(m == float("-inf"), 0.0, m)  # a fully masked tile
        e = tl.exp(z - m_safe[:, None])  # 0 at masked columns
        e_other = tl.where(is_t, 0.0, e)
        p_ptrs = part_ptr + rows64 * NT + pid_v
        tl.store(p_ptrs, m, mask=row_ok)
        tl.store(p_ptrs + stride_pk, tl.sum(e_other, 1), mask=row_ok)
        if STATS:
            finite = z != float("-inf")  # masked entries out; NaN stays in
            tl.store(p_ptrs + 2 * stride_pk, tl.sum(tl.where(finite, e * z, 0.0), 1), mask=row_ok)
            tl.store(p_ptrs + 3 * stride_pk, tl.sum(e * e, 1), mask=row_ok)
            tl.store(p_ptrs + 4 * stride_pk, tl.sum(tl.where(finite, z, 0.0), 1), mask=row_ok)
        if MODE == 1:
            q = e_other * slope
            tl.store(q_ptrs, cast(q, q_ptr.dtype.element_ty, INTERPRET), mask=row_ok[:, None])


@triton.jit
def _combine_kernel(
    # pointers
    part_ptr,
    zy_ptr,
    logp_ptr,
    lse_ptr,
    coef_ptr,
    stats_ptr,
    # shapes and strides
    M,
    NT,
    stride_pk,
    # scalars
    grad_scale,
    softcap,
    inv_t,
    # flags
    SOFTCAP: tl.constexpr,
    FROZEN_GRAD: tl.constexpr,
    STATS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Per row: lse, logp, statistics; with FROZEN_GRAD the A-operand factors
    exp(m_t - lse) grad_scale (written over the tile maxima) and the target's
    coefficient (1 - p_y) f'(a_y) grad_scale."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < M
    base = part_ptr + rows.to(tl.int64)[:, None] * NT
    mx = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s_other = tl.zeros([BLOCK_R], tl.float32)
    sez = tl.zeros([BLOCK_R], tl.float32)
    se2 = tl.zeros([BLOCK_R], tl.float32)
    sz = tl.zeros([BLOCK_R], tl.float32)
    n_nan = tl.zeros([BLOCK_R], tl.int32)
    for t0 in range(0, NT, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        mask = row_ok[:, None] & (ts < NT)[None, :]
        m_t = tl.load(base + ts[None, :], mask=mask, other=float("-inf"))
        n_nan += tl.sum((m_t != m_t).to(tl.int32), 1)
        new = tl.maximum(mx, tl.max(tl.where(m_t == m_t, m_t, float("-inf")), 1))
        new_safe = tl.where(new == float("-inf"), 0.0, new)
        w = tl.exp(m_t - new_safe[:, None])  # (BLOCK_R, BLOCK_T), 0 for masked tiles
        w = tl.where(m_t == m_t, w, 0.0)
        r = tl.exp(mx - new_safe)
        s_t = tl.load(base + stride_pk + ts[None, :], mask=mask, other=0.0)
        s_other = s_other * r + tl.sum(w * s_t, 1)
        if STATS:
            sez = sez * r + tl.sum(
                w * tl.load(base + 2 * stride_pk + ts[None, :], mask=mask, other=0.0), 1
            )
            se2 = se2 * r * r + tl.sum(
                w * w * tl.load(base + 3 * stride_pk + ts[None, :], mask=mask, other=0.0), 1
            )
            sz += tl.sum(tl.load(base + 4 * stride_pk + ts[None, :], mask=mask, other=0.0), 1)
        mx = new
    zy = tl.load(zy_ptr + rows, mask=row_ok, other=0.0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    e_y = tl.exp(zy - mx_safe)
    s = s_other + e_y
    lse = mx_safe + tl.log(s)
    lse = tl.where(n_nan > 0, float("nan"), lse)
    tl.store(logp_ptr + rows, zy - lse, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    if STATS:
        out = stats_ptr + rows.to(tl.int64) * 4
        tl.store(out, lse - sez / s, mask=row_ok)  # entropy: lse - E_p[z]
        tl.store(out + 1, sz, mask=row_ok)  # logit sum
        tl.store(out + 2, (zy >= mx).to(tl.float32), mask=row_ok)  # target is argmax
        tl.store(out + 3, tl.log(se2) - 2.0 * tl.log(s), mask=row_ok)  # log sum p^2
    if FROZEN_GRAD:
        slope_y = tl.full([BLOCK_R], 1.0, tl.float32)
        if SOFTCAP:
            t_y = zy / (softcap * inv_t)
            slope_y = 1.0 - t_y * t_y
        tl.store(coef_ptr + rows, (s_other / s) * slope_y * grad_scale, mask=row_ok)
        for t0 in range(0, NT, BLOCK_T):
            ts = t0 + tl.arange(0, BLOCK_T)
            mask = row_ok[:, None] & (ts < NT)[None, :]
            m_t = tl.load(base + ts[None, :], mask=mask, other=float("-inf"))
            factor = tl.exp(m_t - lse[:, None]) * grad_scale
            tl.store(base + ts[None, :], tl.where(m_t > float("-inf"), factor, 0.0), mask=mask)


@triton.jit
def _rescale_kernel(
    # pointers
    q_ptr,
    f_ptr,
    # shapes
    M,
    NT,
    # strides
    stride_qm,
    # flags
    INTERPRET: tl.constexpr,
    BLOCK_R: tl.constexpr,
    TILE_V: tl.constexpr,
):
    """q (M, NT * TILE_V) *= f (M, NT), one factor per (row, vocabulary tile), in
    place: the product in fp32, rounded once to q's dtype. Grid (row blocks, tiles)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    tile = tl.program_id(1)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    f = tl.load(f_ptr + rows64 * NT + tile, mask=row_ok, other=0.0)  # (BLOCK_R,)
    cols = tile * TILE_V + tl.arange(0, TILE_V)
    ptrs = q_ptr + rows64[:, None] * stride_qm + cols[None, :]  # (BLOCK_R, TILE_V)
    q = tl.load(ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(ptrs, cast(q * f[:, None], q_ptr.dtype.element_ty, INTERPRET), mask=row_ok[:, None])


@triton.jit
def _grad_kernel(
    # pointers
    q_ptr,
    w_ptr,
    t_ptr,
    coef_ptr,
    out_ptr,
    # shapes
    M,
    V,
    D,
    KP,
    # strides
    stride_qm,
    stride_wv,
    stride_wd,
    stride_om,
    # flags
    TARGET_TERM: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """GEMM 2: out (M, D) = A W over K = KP (the padded vocabulary) with A as stored:
    q after the rescale, whose epilogue (TARGET_TERM) gives coef W_y - A W
    (frozen-head forward), or G (trainable-head backward)."""
    pid_m, pid_n = _grouped_tile(
        tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(D, BLOCK_N), GROUP_M
    )
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dcols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    d_ok = dcols < D
    rows64 = tl.where(row_ok, rows, 0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    q_ptrs = q_ptr + rows64[:, None] * stride_qm + ks[None, :]
    # The W tile's columns (D) are its contiguous axis: left unclamped (masked instead)
    # so that the compiler sees BLOCK_N consecutive addresses and issues 16-byte
    # cp.async copies. A clamp (tl.where(d_ok, dcols, 0)) hides that: on an H100 this
    # GEMM then ran at 52 TFLOP/s against cuBLAS's 768 on the same shape.
    w_ptrs = w_ptr + ks.to(tl.int64)[:, None] * stride_wv + dcols[None, :] * stride_wd
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(0, tl.cdiv(KP, BLOCK_K)):
        a = tl.load(q_ptrs)  # (BLOCK_M, BLOCK_K); rows past M read row 0, masked at the store
        w_ok = (ks[:, None] < V - k * BLOCK_K) & d_ok[None, :]
        w = tl.load(w_ptrs, mask=w_ok, other=0.0)  # (BLOCK_K, BLOCK_N)
        acc = dot(a, w, acc, INTERPRET)
        q_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wv
    if TARGET_TERM:
        tgt = tl.load(t_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
        w_y = tl.load(
            w_ptr + tgt[:, None] * stride_wv + dcols[None, :] * stride_wd,
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc = coef[:, None] * w_y - acc
    tl.store(
        out_ptr + rows64[:, None] * stride_om + dcols[None, :],
        cast(acc, out_ptr.dtype.element_ty, INTERPRET),
        mask=row_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def _dweight_kernel(
    # pointers
    g_ptr,
    h_ptr,
    dw_ptr,
    db_ptr,
    # shapes
    M,
    V,
    D,
    # strides
    stride_gm,
    stride_hm,
    stride_hd,
    # flags
    ACCUMULATE: tl.constexpr,
    NEED_WEIGHT: tl.constexpr,
    NEED_BIAS: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """GEMM 3: d weight (V, D) fp32 (+)= G^T h over the chunk's M rows; d bias (V,)
    (+)= column sums of G, by the programs of the first D tile. One program per
    output tile: no atomics."""
    pid_v, pid_n = _grouped_tile(
        tl.program_id(0), tl.cdiv(V, BLOCK_V), tl.cdiv(D, BLOCK_N), GROUP_M
    )
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    dcols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < V
    d_ok = dcols < D
    ks = tl.arange(0, BLOCK_K)
    g_ptrs = g_ptr + ks.to(tl.int64)[:, None] * stride_gm + cols[None, :]
    # Unclamped columns, masked: contiguous to the compiler (see _grad_kernel).
    h_ptrs = h_ptr + ks.to(tl.int64)[:, None] * stride_hm + dcols[None, :] * stride_hd
    acc = tl.zeros([BLOCK_V, BLOCK_N], tl.float32)
    db = tl.zeros([BLOCK_V], tl.float32)
    for k in range(0, tl.cdiv(M, BLOCK_K)):
        k_ok = ks[:, None] < M - k * BLOCK_K
        g = tl.load(g_ptrs, mask=k_ok, other=0.0)  # (BLOCK_K, BLOCK_V), zero-padded past V
        if NEED_WEIGHT:
            h = tl.load(h_ptrs, mask=k_ok & d_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
            acc = dot(tl.trans(g), h, acc, INTERPRET)
        if NEED_BIAS:
            db += tl.sum(g.to(tl.float32), 0)
        g_ptrs += BLOCK_K * stride_gm
        h_ptrs += BLOCK_K * stride_hm
    if NEED_WEIGHT:
        out = dw_ptr + cols.to(tl.int64)[:, None] * D + dcols[None, :]
        mask = col_ok[:, None] & d_ok[None, :]
        if ACCUMULATE:
            acc += tl.load(out, mask=mask, other=0.0)
        tl.store(out, acc, mask=mask)
    if NEED_BIAS:  # noqa: SIM102 (a constexpr condition and a runtime one)
        if pid_n == 0:
            if ACCUMULATE:
                db += tl.load(db_ptr + cols, mask=col_ok, other=0.0)
            tl.store(db_ptr + cols, db, mask=col_ok)


@triton.jit
def _logits_fwd_kernel(
    # pointers
    x_ptr,
    t_ptr,
    logp_ptr,
    lse_ptr,
    m_ptr,
    ls_ptr,
    # shapes, strides, scalars
    N,
    V,
    stride_xn,
    inv_t,
    ignore_index,
    # flags and blocks
    FRAME: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """logp and lse per row, in the frame of the row's raw maximum m: every logit is
    used as (x - m) / T, so logits far from zero (1e6) keep fp32 accuracy. With FRAME
    it also stores m and log sum exp((x - m) / T) separately for the backward."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=0)
    valid = row_ok & (tgt != ignore_index)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    tgt_raw = tl.zeros([BLOCK_N], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = valid[:, None] & (cols < V)[None, :]
        x_ptrs = x_ptr + rows64[:, None] * stride_xn + cols[None, :]
        x = tl.load(x_ptrs, mask=mask, other=float("-inf")).to(tl.float32)
        tgt_raw += tl.sum(tl.where(cols[None, :] == tgt[:, None], x, 0.0), 1)
        m_new = tl.maximum(m, tl.max(x, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp((m - m_safe) * inv_t) + tl.sum(tl.exp((x - m_safe[:, None]) * inv_t), 1)
        m = m_new
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    log_s = tl.log(s)
    logp = (tgt_raw - m_safe) * inv_t - log_s
    tl.store(logp_ptr + rows, tl.where(valid, logp, 0.0), mask=row_ok)
    tl.store(lse_ptr + rows, tl.where(valid, m_safe * inv_t + log_s, 0.0), mask=row_ok)
    if FRAME:
        tl.store(m_ptr + rows, m_safe, mask=row_ok)
        tl.store(ls_ptr + rows, log_s, mask=row_ok)


@triton.jit
def _logits_bwd_kernel(
    # pointers
    x_ptr,
    t_ptr,
    g_ptr,
    lse_ptr,
    m_ptr,
    ls_ptr,
    dx_ptr,
    # shapes, strides, scalars
    N,
    V,
    stride_xn,
    inv_t,
    ignore_index,
    # flags and blocks
    FRAME: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """d logits = g (1[v = y] - p) / T; with FRAME, p = exp((x - m) / T - log s) from
    the row frame the forward kernel stores (logits far from zero), else
    p = exp(x / T - lse)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=0)
    valid = row_ok & (tgt != ignore_index)
    g = tl.where(valid, tl.load(g_ptr + rows, mask=row_ok, other=0.0), 0.0) * inv_t
    mask = row_ok[:, None] & (cols < V)[None, :]
    x_ptrs = x_ptr + rows64[:, None] * stride_xn + cols[None, :]
    x = tl.load(x_ptrs, mask=mask & valid[:, None], other=0.0).to(tl.float32)
    if FRAME:
        m = tl.load(m_ptr + rows, mask=row_ok, other=0.0)
        log_s = tl.load(ls_ptr + rows, mask=row_ok, other=0.0)
        p = tl.exp((x - m[:, None]) * inv_t - log_s[:, None])
    else:
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        p = tl.exp(x * inv_t - lse[:, None])
    d = tl.where(cols[None, :] == tgt[:, None], 1.0 - p, -p) * g[:, None]
    d = tl.where(valid[:, None], d, 0.0)  # ignored rows: exact zeros whatever they hold
    out = dx_ptr + rows64[:, None] * V + cols[None, :]
    tl.store(out, cast(d, dx_ptr.dtype.element_ty, INTERPRET), mask=mask)


# ------------------------------------------------------------------ block configs

# GEMM 1 / GEMM 3 (M x V tiles, K = D) and GEMM 2 (M x D tiles, K = V). The named
# sets start from Triton's H100 matmul configs. GEMM 1: 128 x 128 x 64 on 8 warps (the
# fp32 logit tile is 64 registers a thread, leaving room for the softmax epilogue);
# with the statistics or the softcap in the epilogue, 64 x 128 on 4 warps (the
# 8-warp tile spills there: bench.kernel_stats). A 128 x 256 tile on 4 stages ran the
# forward in 15.0 ms against 17.2 on an H100 at Llama-3-8B N = 8192 (forward+backward
# 31.6 against 33.6; experiments/gpu_token_profile.py --sweep, Triton 3.6), but spills
# 60-360 bytes under Triton 3.9, so the compile gate keeps it out. GEMM 2: 128 x 256 output tiles
# (K = V is long, so the tile area sets the traffic: each wave of 132 programs
# re-reads W once; 4 waves at M = 4096, D = 4096). Under the interpreter the
# smallest legal tiles (16) run fastest.
_GEMM1 = (  # every candidate keeps BLOCK_V = 128: the partials' layout depends on it
    KernelConfig("m128v128d64", {"BLOCK_M": 128, "BLOCK_V": 128, "BLOCK_D": 64}, 8, 3),
    KernelConfig("m64v128d64", {"BLOCK_M": 64, "BLOCK_V": 128, "BLOCK_D": 64}, 4, 4),
    KernelConfig("m128v128d32", {"BLOCK_M": 128, "BLOCK_V": 128, "BLOCK_D": 32}, 8, 4),
)
_GEMM2 = (
    KernelConfig("m128n256k64", {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, 8, 3),
    KernelConfig("m128n128k64", {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, 8, 3),
    KernelConfig("m64n128k64", {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, 4, 4),
)
_GEMM3 = (
    KernelConfig("v128n128k64", {"BLOCK_V": 128, "BLOCK_N": 128, "BLOCK_K": 64}, 8, 3),
    KernelConfig("v64n128k64", {"BLOCK_V": 64, "BLOCK_N": 128, "BLOCK_K": 64}, 4, 4),
)
_FP32 = {  # fp32 operands: IEEE fp32 dots (no tensor cores), smaller tiles
    "gemm1": KernelConfig("fp32-m64v64d32", {"BLOCK_M": 64, "BLOCK_V": 64, "BLOCK_D": 32}, 4, 2),
    "gemm2": KernelConfig("fp32-m64n64k32", {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, 4, 2),
    "gemm3": KernelConfig("fp32-v64n64k32", {"BLOCK_V": 64, "BLOCK_N": 64, "BLOCK_K": 32}, 4, 2),
}
_INTERPRET = {
    "gemm1": KernelConfig("interp", {"BLOCK_M": 16, "BLOCK_V": 16, "BLOCK_D": 16}, 1, 1),
    "gemm2": KernelConfig("interp", {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, 1, 1),
    "gemm3": KernelConfig("interp", {"BLOCK_V": 16, "BLOCK_N": 16, "BLOCK_K": 16}, 1, 1),
    "rescale": KernelConfig("interp", {"BLOCK_R": 16}, 1, 1),
}
_COMBINE = KernelConfig("r8t128", {"BLOCK_R": 8, "BLOCK_T": 128}, 4, 1)
# The rescale streams q: 16 rows x one vocabulary tile (128 wide in bf16: 4 KiB).
_RESCALE = KernelConfig("r16", {"BLOCK_R": 16}, 4, 1)
_GROUP_M = 16  # row tiles per L2 group: 16 x 128 rows x D=4096 x 2 B = 16 MiB of hidden


def _configs(
    gemm: str, dtype: torch.dtype, heavy_epilogue: bool = False
) -> tuple[KernelConfig, tuple[KernelConfig, ...]]:
    """(default, autotuning candidates) for one GEMM and operand dtype."""
    if interpreting():
        return _INTERPRET[gemm], (_INTERPRET[gemm],)
    if dtype == torch.float32:
        return _FP32[gemm], (_FP32[gemm],)
    named = {"gemm1": _GEMM1, "gemm2": _GEMM2, "gemm3": _GEMM3}[gemm]
    if heavy_epilogue:
        return named[1], named[1:2]
    return named[0], named


def chunk_rows(n_rows: int, n_vocab: int, elem_bytes: int, block_v: int = 256) -> int:
    """Rows per chunk: the q / G scratch (C x V_padded) within DECPO_TRITON_CHUNK_MB
    (default 1024 MiB), a multiple of 128 rows, at least 128."""
    budget = float(os.environ.get("DECPO_TRITON_CHUNK_MB", "1024")) * 2**20
    padded = triton.cdiv(n_vocab, block_v) * block_v
    rows = max(128, int(budget // (padded * elem_bytes)) // 128 * 128)
    return min(rows, max(n_rows, 1))


# ------------------------------------------------------------------ cost model


def token_logprobs_cost(
    n_rows: int,
    n_vocab: int,
    dim: int,
    dtype: torch.dtype = torch.bfloat16,
    *,
    frozen_grad: bool = True,
    trainable_head: bool = False,
    l2_bytes: float = 50e6,
    sms: int = 132,
) -> dict[str, float]:
    """FLOPs and HBM bytes of this tiling for M valid rows, with the default configs.

    Traffic model (H100: 50 MB of L2, 132 SMs):
    - GEMM 1 (K = D): a group of GROUP_M row tiles (GROUP_M x 128 rows x D x 2 B <=
      l2 / 2) stays in L2 while the vocabulary tiles stream past it, so W is read
      once per group and the hidden rows once.
    - GEMM 2 (K = V): the 132 programs of a wave share each q and W slice through L2,
      so W is read once per wave and q once; more waves, more W reads: the output
      tile area (128 x 256) sets the count.
    - scratch q (or G) written once and read once per chunk; partials small; the
      frozen head's rescale reads and writes q once more.
    - trainable head: the backward recomputes GEMM 1 (writing G), runs GEMM 2 and
      GEMM 3 (K = rows of the chunk; d weight read-modified-written in fp32 per chunk).
    """
    e = torch.finfo(dtype).bits // 8
    g1, g2, g3 = _GEMM1[0].blocks, _GEMM2[0].blocks, _GEMM3[0].blocks
    bv = g1["BLOCK_V"]
    chunk = chunk_rows(n_rows, n_vocab, e, bv)
    chunks = [min(chunk, n_rows - r0) for r0 in range(0, n_rows, chunk)]
    vp = math.ceil(n_vocab / bv) * bv
    w_bytes = n_vocab * dim * e
    h_bytes = n_rows * dim * e
    group_rows = max(g1["BLOCK_M"], min(_GROUP_M * g1["BLOCK_M"], int(l2_bytes / 2 // (dim * e))))
    gemm1 = sum(math.ceil(c / group_rows) for c in chunks) * w_bytes + h_bytes
    partials = n_rows * (vp // bv) * 4 * 4  # max and sum written and read; factors
    nvd = 2.0 * n_rows * n_vocab * dim
    out = {"flops": nvd, "bytes": float(gemm1 + partials + n_rows * 4 * 3), "chunk_rows": chunk}

    def gemm2() -> float:
        waves = sum(
            math.ceil(math.ceil(c / g2["BLOCK_M"]) * math.ceil(dim / g2["BLOCK_N"]) / sms)
            for c in chunks
        )
        return waves * w_bytes + n_rows * vp * e + h_bytes  # W per wave, q once, output

    if frozen_grad or trainable_head:
        out["flops"] += nvd
        out["bytes"] += n_rows * vp * e + gemm2()  # q written; GEMM 2
    if frozen_grad:
        out["bytes"] += 2 * n_rows * vp * e  # the rescale: q read and written
    if trainable_head:
        out["flops"] += 2 * nvd  # GEMM 1 again in the backward (G), GEMM 3
        out["bytes"] += gemm1  # GEMM 1 again (G written: counted with q above)
        tiles3 = math.ceil(n_vocab / g3["BLOCK_V"]) * math.ceil(dim / g3["BLOCK_N"])
        # GEMM 3: G and h streamed once per wave-band; d weight fp32 read + written per chunk
        out["bytes"] += n_rows * vp * e + h_bytes * math.ceil(tiles3 / sms) / 8
        out["bytes"] += len(chunks) * n_vocab * dim * 4 * 2
    return out


# ------------------------------------------------------------------ launchers


def _padding(dim: int, dtype: torch.dtype) -> int:
    """Zero columns that make a 2-byte row a multiple of 16 bytes. Triton issues
    cp.async (asynchronous copies into shared memory, which the tensor-core pipeline
    needs) only for 16-byte-aligned rows; with D % 8 != 0 the launchers pad the
    (already copied) hidden rows and copy the head once per call (V D 2 bytes, ~3% of
    the GEMM time at V = 128256). Real language models have D % 64 == 0."""
    if torch.finfo(dtype).bits != 16:
        return 0
    return -dim % 8


def _launch_gemm1(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    t: torch.Tensor,
    q: torch.Tensor,
    part: torch.Tensor,
    zy: torch.Tensor,
    g: torch.Tensor | None,
    lse: torch.Tensor | None,
    scal: tuple[float, float, float],
    mode: int,
    stats: bool,
) -> None:
    m_rows, dim = h.shape
    n_vocab = weight.shape[0]
    default, candidates = _configs("gemm1", weight.dtype, stats or bool(scal[1]))
    n_t = q.shape[1] // default.blocks["BLOCK_V"] if q.numel() else part.shape[-1]
    args = dict(
        h_ptr=h,
        w_ptr=weight,
        b_ptr=bias,
        t_ptr=t,
        q_ptr=q,
        part_ptr=part,
        zy_ptr=zy,
        g_ptr=g,
        lse_ptr=lse,
        M=m_rows,
        V=n_vocab,
        D=dim,
        NT=n_t,
        stride_hm=h.stride(0),
        stride_hd=h.stride(1),
        stride_wv=weight.stride(0),
        stride_wd=weight.stride(1),
        stride_qm=q.stride(0) if q.dim() == 2 else 0,
        stride_pk=part.stride(0),
        logit_scale=scal[0],
        softcap=scal[1] or 1.0,
        inv_t=scal[2],
        SOFTCAP=bool(scal[1]),
        MODE=mode,
        STATS=stats,
        INTERPRET=interpreting(),
        GROUP_M=_GROUP_M,
    )
    # The tile width fixes the partials' layout, so candidates share BLOCK_V.
    candidates = tuple(c for c in candidates if c.blocks["BLOCK_V"] == default.blocks["BLOCK_V"])

    def grid(c: KernelConfig) -> tuple[int]:
        return (triton.cdiv(m_rows, c.blocks["BLOCK_M"]) * n_t,)

    launch_tuned(
        _logits_kernel,
        ("gemm1", mode, stats, m_rows, n_vocab, dim, weight.dtype),
        default,
        candidates,
        grid,
        **args,
    )


def _launch_rescale(q: torch.Tensor, factors: torch.Tensor, m_rows: int, tile_v: int) -> None:
    """q[:m_rows] (C, NT * tile_v) *= factors (C, NT) per vocabulary tile, in place."""
    n_t = q.shape[1] // tile_v
    config = _INTERPRET["rescale"] if interpreting() else _RESCALE
    launch(
        _rescale_kernel,
        (triton.cdiv(m_rows, config.blocks["BLOCK_R"]), n_t),
        config,
        q_ptr=q,
        f_ptr=factors,
        M=m_rows,
        NT=n_t,
        stride_qm=q.stride(0),
        INTERPRET=interpreting(),
        TILE_V=tile_v,
    )


def _launch_gemm2(
    a: torch.Tensor,
    weight: torch.Tensor,
    t: torch.Tensor | None,
    coef: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    m_rows = out.shape[0]
    n_vocab, dim = weight.shape
    default, candidates = _configs("gemm2", weight.dtype)
    # A is read in whole BLOCK_K steps without a column mask: q and G are padded to
    # whole GEMM 1 tiles, which every candidate's BLOCK_K divides.
    assert all(a.shape[1] % c.blocks["BLOCK_K"] == 0 for c in candidates), a.shape
    args = dict(
        q_ptr=a,
        w_ptr=weight,
        t_ptr=t,
        coef_ptr=coef,
        out_ptr=out,
        M=m_rows,
        V=n_vocab,
        D=dim,
        KP=a.shape[1],
        stride_qm=a.stride(0),
        stride_wv=weight.stride(0),
        stride_wd=weight.stride(1),
        stride_om=out.stride(0),
        TARGET_TERM=coef is not None,
        INTERPRET=interpreting(),
        GROUP_M=8,
    )

    def grid(c: KernelConfig) -> tuple[int]:
        return (triton.cdiv(m_rows, c.blocks["BLOCK_M"]) * triton.cdiv(dim, c.blocks["BLOCK_N"]),)

    launch_tuned(
        _grad_kernel,
        ("gemm2", coef is None, m_rows, n_vocab, dim, weight.dtype),
        default,
        candidates,
        grid,
        **args,
    )


def _launch_gemm3(
    g: torch.Tensor,
    h: torch.Tensor,
    dw: torch.Tensor,
    db: torch.Tensor,
    n_vocab: int,
    accumulate: bool,
    need_weight: bool,
    need_bias: bool,
) -> None:
    m_rows, dim = h.shape
    default, candidates = _configs("gemm3", h.dtype)
    args = dict(
        g_ptr=g,
        h_ptr=h,
        dw_ptr=dw,
        db_ptr=db,
        M=m_rows,
        V=n_vocab,
        D=dim,
        stride_gm=g.stride(0),
        stride_hm=h.stride(0),
        stride_hd=h.stride(1),
        ACCUMULATE=accumulate,
        NEED_WEIGHT=need_weight,
        NEED_BIAS=need_bias,
        INTERPRET=interpreting(),
        GROUP_M=8,
    )

    # G is zero-padded to whole GEMM 1 tiles: a BLOCK_V dividing that width reads no
    # column past it, so the G loads need no column mask (and stay vectorizable).
    assert all(g.shape[1] % c.blocks["BLOCK_V"] == 0 for c in candidates), g.shape

    def grid(c: KernelConfig) -> tuple[int]:
        return (triton.cdiv(n_vocab, c.blocks["BLOCK_V"]) * triton.cdiv(dim, c.blocks["BLOCK_N"]),)

    launch_tuned(
        _dweight_kernel,
        ("gemm3", accumulate, m_rows, n_vocab, dim, h.dtype),
        default,
        candidates,
        grid,
        **args,
    )


def _tile_v(dtype: torch.dtype) -> int:
    return _configs("gemm1", dtype)[0].blocks["BLOCK_V"]


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    temperature: float,
    softcap: float,
    logit_scale: float,
    frozen_grad: bool,
    with_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward for hidden (N, D), weight (V, D), targets (N,): (logp (N,), lse (N,),
    d logp / d hidden (N, D) or empty, stats (N, 4) or empty), fp32 but the gradient
    (hidden's dtype). softcap 0 means none."""
    n, dim = hidden.shape
    n_vocab = weight.shape[0]
    device = hidden.device
    bias = bias.contiguous() if bias is not None else None  # read unit-stride
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    logp = hidden.new_zeros(n, dtype=torch.float32)
    lse = hidden.new_zeros(n, dtype=torch.float32)
    grad = hidden.new_zeros((n, dim)) if frozen_grad else hidden.new_empty(0)
    stats = (
        hidden.new_zeros((n, N_STATS), dtype=torch.float32) if with_stats else hidden.new_empty(0)
    )
    rows = valid_rows(targets, ignore_index)
    h = (hidden if rows is None else hidden[rows]).contiguous()  # (M, D)
    t = (targets if rows is None else targets[rows]).contiguous()  # (M,)
    m_rows = h.shape[0]
    if m_rows == 0:
        return logp, lse, grad, stats
    if pad := _padding(dim, weight.dtype):
        h = torch.nn.functional.pad(h, (0, pad))  # (M, D + pad)
        weight = torch.nn.functional.pad(weight, (0, pad))  # (V, D + pad)
    inv_t = 1.0 / temperature
    scal = (float(logit_scale), float(softcap), inv_t)
    tile_v = _tile_v(weight.dtype)
    n_t = triton.cdiv(n_vocab, tile_v)
    out_logp = torch.empty(m_rows, dtype=torch.float32, device=device)
    out_lse = torch.empty_like(out_logp)
    out_grad = (
        torch.empty((m_rows, dim + pad), dtype=hidden.dtype, device=device) if frozen_grad else None
    )
    out_stats = torch.empty((m_rows, N_STATS), dtype=torch.float32, device=device)
    chunk = chunk_rows(m_rows, n_vocab, weight.element_size(), tile_v)
    n_parts = 5 if with_stats else 2
    part = torch.empty((n_parts, chunk, n_t), dtype=torch.float32, device=device)  # (K, C, NT)
    zy = torch.empty(chunk, dtype=torch.float32, device=device)
    coef = torch.empty(chunk, dtype=torch.float32, device=device)
    q = (
        torch.empty((chunk, n_t * tile_v), dtype=weight.dtype, device=device)  # (C, V_padded)
        if frozen_grad
        else torch.empty(0, dtype=weight.dtype, device=device)
    )
    for r0 in range(0, m_rows, chunk):
        r1 = min(r0 + chunk, m_rows)
        h_c, t_c = h[r0:r1], t[r0:r1]  # (C, D), (C,)
        _launch_gemm1(
            h_c,
            weight,
            bias,
            t_c,
            q,
            part,
            zy,
            None,
            None,
            scal,
            mode=1 if frozen_grad else 0,
            stats=with_stats,
        )
        launch(
            _combine_kernel,
            (triton.cdiv(r1 - r0, _COMBINE.blocks["BLOCK_R"]),),
            _COMBINE,
            part_ptr=part,
            zy_ptr=zy,
            logp_ptr=out_logp[r0:],
            lse_ptr=out_lse[r0:],
            coef_ptr=coef,
            stats_ptr=out_stats[r0:],
            M=r1 - r0,
            NT=n_t,
            stride_pk=part.stride(0),
            grad_scale=logit_scale * inv_t,
            softcap=softcap or 1.0,
            inv_t=inv_t,
            SOFTCAP=bool(softcap),
            FROZEN_GRAD=frozen_grad,
            STATS=with_stats,
        )
        if frozen_grad:
            assert out_grad is not None
            _launch_rescale(q, part[0], r1 - r0, tile_v)  # part[0]: the factors now
            _launch_gemm2(q, weight, t_c, coef, out_grad[r0:r1])
    head_finite = head_ok(weight, bias)
    out_logp = torch.where(head_finite, out_logp, float("nan"))
    if frozen_grad and pad:
        assert out_grad is not None
        out_grad = out_grad[:, :dim]
    if rows is None:
        return (
            out_logp,
            out_lse,
            out_grad if frozen_grad else grad,
            out_stats if with_stats else stats,
        )
    logp[rows] = out_logp
    lse[rows] = out_lse
    if frozen_grad:
        grad[rows] = out_grad
    if with_stats:
        stats[rows] = out_stats
    return logp, lse, grad, stats


def token_logprobs_backward(
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
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Trainable head: (d hidden, d weight, d bias) from G tiles recomputed per chunk
    (GEMM 1 in MODE 2), then GEMM 2 (d hidden) and GEMM 3 (d weight, d bias)."""
    n, dim = hidden.shape
    n_vocab = weight.shape[0]
    device = hidden.device
    bias = bias.contiguous() if bias is not None else None
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    need_bias = need_bias and bias is not None
    rows = valid_rows(targets, ignore_index)
    h = (hidden if rows is None else hidden[rows]).contiguous()  # (M, D)
    t = (targets if rows is None else targets[rows]).contiguous()
    g = (grad_logp if rows is None else grad_logp[rows]).float().contiguous()
    row_lse = (lse if rows is None else lse[rows]).contiguous()
    m_rows = h.shape[0]
    if pad := _padding(dim, weight.dtype):
        h = torch.nn.functional.pad(h, (0, pad))  # (M, D + pad)
        weight = torch.nn.functional.pad(weight, (0, pad))  # (V, D + pad)
    dim_k = dim + pad
    dh = torch.zeros((m_rows, dim_k), dtype=torch.float32, device=device) if need_hidden else None
    dw = torch.zeros(
        (n_vocab, dim_k) if need_weight else (1, 1), dtype=torch.float32, device=device
    )
    db = torch.zeros(n_vocab if need_bias else 1, dtype=torch.float32, device=device)
    scal = (float(logit_scale), float(softcap), 1.0 / temperature)
    tile_v = _tile_v(weight.dtype)
    n_t = triton.cdiv(n_vocab, tile_v)
    chunk = chunk_rows(m_rows, n_vocab, weight.element_size(), tile_v)
    gbuf = torch.empty(
        (min(chunk, max(m_rows, 1)), n_t * tile_v), dtype=weight.dtype, device=device
    )  # (C, V_padded)
    dummy = torch.empty((1, 1, 1), dtype=torch.float32, device=device)
    for i, r0 in enumerate(range(0, m_rows, chunk)):
        r1 = min(r0 + chunk, m_rows)
        h_c = h[r0:r1]  # (C, D)
        _launch_gemm1(
            h_c,
            weight,
            bias,
            t[r0:r1],
            gbuf,
            dummy,
            dummy,
            g[r0:r1],
            row_lse[r0:r1],
            scal,
            mode=2,
            stats=False,
        )
        if need_hidden:
            assert dh is not None
            _launch_gemm2(gbuf, weight, None, None, dh[r0:r1])
        if need_weight or need_bias:
            _launch_gemm3(gbuf, h_c, dw, db, n_vocab, i > 0, need_weight, need_bias)
    d_hidden = hidden.new_empty(0)
    if need_hidden:
        assert dh is not None
        if rows is None:
            d_hidden = dh[:, :dim].to(hidden.dtype)
        else:
            d_hidden = hidden.new_zeros((n, dim))
            d_hidden[rows] = dh[:, :dim].to(hidden.dtype)
    d_weight = dw[:, :dim].to(weight.dtype) if need_weight else weight.new_empty(0)
    d_bias = db.to(bias.dtype) if need_bias and bias is not None else weight.new_empty(0)
    return d_hidden, d_weight, d_bias


_LOGITS_FWD = KernelConfig("row4096", {"BLOCK_N": 1, "BLOCK_V": 4096}, 8, 1)
_LOGITS_BWD = KernelConfig("row1024", {"BLOCK_N": 1, "BLOCK_V": 1024}, 8, 1)
_LOGITS_INTERP = KernelConfig("interp", {"BLOCK_N": 4, "BLOCK_V": 64}, 1, 1)


def _logit_config(n_vocab: int, backward: bool) -> KernelConfig:
    """One row per program, BLOCK_V columns per step (long contiguous reads): the op
    is bandwidth-bound (2 + 4 bytes a logit forward, read + write backward)."""
    if interpreting():
        return _LOGITS_INTERP
    config = _LOGITS_BWD if backward else _LOGITS_FWD
    width = min(config.blocks["BLOCK_V"], triton.next_power_of_2(n_vocab))
    return KernelConfig(config.name, {"BLOCK_N": 1, "BLOCK_V": width}, config.num_warps, 1)


def _launch_logits_fwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    temperature: float,
    frame: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    n, n_vocab = logits.shape
    logp = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    config = _logit_config(n_vocab, backward=False)
    launch(
        _logits_fwd_kernel,
        (triton.cdiv(n, config.blocks["BLOCK_N"]),),
        config,
        x_ptr=logits,
        t_ptr=targets,
        logp_ptr=logp,
        lse_ptr=lse,
        m_ptr=frame[0] if frame else None,
        ls_ptr=frame[1] if frame else None,
        N=n,
        V=n_vocab,
        stride_xn=logits.stride(0),
        inv_t=1.0 / temperature,
        ignore_index=ignore_index,
        FRAME=frame is not None,
    )
    return logp, lse


def logprobs_from_logits(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward for logits (N, V): (logp, lse) fp32, one read of each logit."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if logits.shape[0] == 0:
        empty = torch.empty(0, dtype=torch.float32, device=logits.device)
        return empty, empty.clone()
    return _launch_logits_fwd(logits, targets.contiguous(), ignore_index, temperature)


# Beyond this |lse| an fp32 lse is off by up to ulp/2 >= 6e-5 relative in every p:
# the backward then re-derives each row's frame (max and log-sum) in one more read.
_FRAME_LSE = 1024.0


def logprobs_from_logits_backward(
    grad_logp: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    temperature: float,
) -> torch.Tensor:
    """d logits (N, V) contiguous in the logits' dtype: one read and one write (one
    more read when some row's |lse| > 1024: logits far from zero)."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    n, n_vocab = logits.shape
    out = torch.empty((n, n_vocab), dtype=logits.dtype, device=logits.device)
    if n == 0:
        return out
    targets = targets.contiguous()
    frame = None
    if bool(lse.abs().max() > _FRAME_LSE):  # one host sync, no extra pass normally
        frame = (torch.empty_like(lse), torch.empty_like(lse))
        _launch_logits_fwd(logits, targets, ignore_index, temperature, frame)
    config = _logit_config(n_vocab, backward=True)
    grid = (
        triton.cdiv(n, config.blocks["BLOCK_N"]),
        triton.cdiv(n_vocab, config.blocks["BLOCK_V"]),
    )
    launch(
        _logits_bwd_kernel,
        grid,
        config,
        x_ptr=logits,
        t_ptr=targets,
        g_ptr=grad_logp.float().contiguous(),
        lse_ptr=lse.contiguous(),
        m_ptr=frame[0] if frame else None,
        ls_ptr=frame[1] if frame else None,
        dx_ptr=out,
        N=n,
        V=n_vocab,
        stride_xn=logits.stride(0),
        inv_t=1.0 / temperature,
        ignore_index=ignore_index,
        FRAME=frame is not None,
        INTERPRET=interpreting(),
    )
    return out


# ------------------------------------------------------------------ compile gate


def gate_cases() -> list[tuple[str, str, Callable[[], None]]]:
    """Launcher calls at representative shapes, for bench.kernel_stats: every kernel
    variant the launchers can launch (dtype x flags x aligned / unaligned shapes)."""
    cases: list[tuple[str, str, Callable[[], None]]] = []
    shapes = {"aligned": (512, 4096, 32000), "unaligned": (300, 4095, 50257)}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for cls, (n, d, v) in shapes.items():
            if dtype == torch.float32 and cls == "unaligned":
                continue

            def fwd(n=n, d=d, v=v, dtype=dtype) -> None:
                h = torch.empty(n, d, dtype=dtype)  # values unused: launches are recorded
                w = torch.zeros(v, d, dtype=dtype)
                t = torch.randint(0, v, (n,))
                b = torch.zeros(v, dtype=dtype)
                for frozen, stats, softcap, bias in (
                    (True, True, 30.0, b),
                    (False, False, 0.0, None),
                    (True, False, 0.0, None),
                ):
                    token_logprobs(h, w, t, bias, -100, 1.0, softcap, 1.0, frozen, stats)

            def bwd(n=n, d=d, v=v, dtype=dtype) -> None:
                h = torch.empty(n, d, dtype=dtype)
                w = torch.zeros(v, d, dtype=dtype)
                t = torch.randint(0, v, (n,))
                b = torch.zeros(v, dtype=dtype)
                g = torch.empty(n)
                lse = torch.zeros(n)
                token_logprobs_backward(g, h, w, t, b, lse, -100, 1.0, 30.0, 1.0, True, True, True)

            def logits(n=n, v=v, dtype=dtype) -> None:
                x = torch.empty(n, v, dtype=dtype)
                t = torch.randint(0, v, (n,))
                _, lse = logprobs_from_logits(x, t, -100, 1.0)
                for offset in (0.0, 1e6):  # lse far from zero: the row-frame backward
                    lse = torch.full((n,), offset)
                    logprobs_from_logits_backward(torch.empty(n), x, t, lse, -100, 1.0)

            name = str(dtype).removeprefix("torch.")
            cases.append((f"token_logprobs fwd {name}", cls, fwd))
            cases.append((f"token_logprobs bwd {name}", cls, bwd))
            cases.append((f"logprobs_from_logits {name}", cls, logits))
    return cases
