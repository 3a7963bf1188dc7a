"""Triton kernels for per-token log-probs (DESIGN section 1).

token_logprobs, forward: one program per block of BLOCK_N valid tokens walks the
vocabulary in BLOCK_V tiles. Each logit tile (BLOCK_N, BLOCK_V) is a tl.dot over D
in BLOCK_D chunks (bf16 operands, fp32 accumulation) and never leaves the chip; a
running max m and sums s_other (v != y) and s_target (v = y) per token give the
logsumexp online, and the target logit is picked from whichever tile holds it.
With a frozen head the same pass accumulates sum_{v != y} exp(logit_v - m) W_v into
an fp32 (M, D) buffer, rescaled when m moves (flash-attention style), so the
gradient d logp / d h = (s_other W_y - that) / (s T) is finished in the epilogue:
forward + gradient cost 4 M V D FLOPs and the backward is elementwise. Keeping the
target's own term out of the accumulator avoids subtracting two nearly equal
vectors when p_y is close to 1.

FLOPs and bytes (frozen head): 4 M V D FLOPs; bytes ~ (M D + V D (M / BLOCK_N)) x 2
for the operands plus M D x 8 x (V / BLOCK_V) for the accumulator's read-modify-
write, which is why BLOCK_V is as wide as registers allow (at M = 8192, D = 4096,
V = 128256, BLOCK_V = 128 the accumulator moves ~270 GB against 17 TFLOP of work:
tune BLOCK_V up on the GPU). Trainable head: the backward recomputes logit tiles,
once per row block for d hidden and once per vocabulary tile for d weight and
d bias (8 M V D in all), each written by exactly one program: no atomics, so the
results are bit-identical run to run.

logprobs_from_logits: the forward reads each logit once (online logsumexp and
gather); the backward reads it once more and writes the gradient once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from decpo.torch_backend.logprobs import _all_finite, _valid_rows
from decpo.triton_backend.common import cast, dot, interpreting

# ------------------------------------------------------------------ kernels


@triton.jit
def _token_logprobs_fwd_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, logp_ptr, lse_ptr, acc_ptr, grad_ptr,
    M, V, D,
    stride_hm, stride_hd, stride_wv, stride_wd,
    inv_t,
    HAS_BIAS: tl.constexpr, FROZEN_GRAD: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=0)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s_other = tl.zeros([BLOCK_N], tl.float32)
    s_target = tl.zeros([BLOCK_N], tl.float32)
    tgt_logit = tl.zeros([BLOCK_N], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        cols64 = cols.to(tl.int64)
        logits = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            h = tl.load(
                h_ptr + rows64[:, None] * stride_hm + ds[None, :] * stride_hd,
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            )  # (BLOCK_N, BLOCK_D)
            wt = tl.load(
                w_ptr + cols64[None, :] * stride_wv + ds[:, None] * stride_wd,
                mask=col_ok[None, :] & d_ok[:, None],
                other=0.0,
            )  # (BLOCK_D, BLOCK_V)
            logits = dot(h, wt, logits, INTERPRET)
        if HAS_BIAS:
            logits += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        logits = tl.where(col_ok[None, :], logits * inv_t, float("-inf"))
        is_t = cols[None, :] == tgt[:, None]
        tgt_logit += tl.sum(tl.where(is_t, logits, 0.0), 1)
        m_new = tl.maximum(m, tl.max(logits, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far
        rescale = tl.exp(m - m_safe)
        p = tl.exp(logits - m_safe[:, None])
        s_target = s_target * rescale + tl.sum(tl.where(is_t, p, 0.0), 1)
        p = tl.where(is_t, 0.0, p)
        s_other = s_other * rescale + tl.sum(p, 1)
        m = m_new
        if FROZEN_GRAD:
            p_low = cast(p, w_ptr.dtype.element_ty, INTERPRET)
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                d_ok = ds < D
                w = tl.load(
                    w_ptr + cols64[:, None] * stride_wv + ds[None, :] * stride_wd,
                    mask=col_ok[:, None] & d_ok[None, :],
                    other=0.0,
                )  # (BLOCK_V, BLOCK_D)
                a_ptrs = acc_ptr + rows64[:, None] * D + ds[None, :]
                a_mask = row_ok[:, None] & d_ok[None, :]
                acc = tl.load(a_ptrs, mask=a_mask, other=0.0) * rescale[:, None]
                tl.store(a_ptrs, dot(p_low, w, acc, INTERPRET), mask=a_mask)
    s = s_other + s_target
    lse = tl.where(m == float("-inf"), 0.0, m) + tl.log(s)
    tl.store(logp_ptr + rows, tgt_logit - lse, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    if FROZEN_GRAD:
        scale = inv_t / s
        tgt64 = tgt.to(tl.int64)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            mask = row_ok[:, None] & d_ok[None, :]
            acc = tl.load(acc_ptr + rows64[:, None] * D + ds[None, :], mask=mask, other=0.0)
            w_y = tl.load(
                w_ptr + tgt64[:, None] * stride_wv + ds[None, :] * stride_wd, mask=mask, other=0.0
            ).to(tl.float32)
            grad = (s_other[:, None] * w_y - acc) * scale[:, None]
            tl.store(
                grad_ptr + rows64[:, None] * D + ds[None, :],
                cast(grad, grad_ptr.dtype.element_ty, INTERPRET),
                mask=mask,
            )


@triton.jit
def _dlogits_tile(
    h_ptr, w_ptr, b_ptr, rows64, row_ok, cols, col_ok, tgt, g, lse,
    D, stride_hm, stride_hd, stride_wv, stride_wd, inv_t,
    HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """d logp / d raw logit on one tile: g (1[v = y] - p_v) / T, fp32 (BLOCK_N, BLOCK_V)."""
    cols64 = cols.to(tl.int64)
    logits = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        h = tl.load(
            h_ptr + rows64[:, None] * stride_hm + ds[None, :] * stride_hd,
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        wt = tl.load(
            w_ptr + cols64[None, :] * stride_wv + ds[:, None] * stride_wd,
            mask=col_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        logits = dot(h, wt, logits, INTERPRET)
    if HAS_BIAS:
        logits += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    p = tl.exp(logits * inv_t - lse[:, None])
    onehot = cols[None, :] == tgt[:, None]
    dl = (tl.where(onehot, 1.0, 0.0) - p) * (g * inv_t)[:, None]
    return tl.where(row_ok[:, None] & col_ok[None, :], dl, 0.0)


@triton.jit
def _token_logprobs_bwd_hidden_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, g_ptr, lse_ptr, dh_ptr,
    M, V, D,
    stride_hm, stride_hd, stride_wv, stride_wd,
    inv_t,
    HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """d hidden (M, D) fp32 for a trainable head: this program owns BLOCK_N rows."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        dl = _dlogits_tile(h_ptr, w_ptr, b_ptr, rows64, row_ok, cols, col_ok, tgt, g, lse,
                           D, stride_hm, stride_hd, stride_wv, stride_wd, inv_t,
                           HAS_BIAS, INTERPRET, BLOCK_N, BLOCK_V, BLOCK_D)  # fmt: skip
        dl_low = cast(dl, w_ptr.dtype.element_ty, INTERPRET)
        cols64 = cols.to(tl.int64)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            w = tl.load(
                w_ptr + cols64[:, None] * stride_wv + ds[None, :] * stride_wd,
                mask=col_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            ptrs = dh_ptr + rows64[:, None] * D + ds[None, :]
            mask = row_ok[:, None] & d_ok[None, :]
            acc = tl.load(ptrs, mask=mask, other=0.0)
            tl.store(ptrs, dot(dl_low, w, acc, INTERPRET), mask=mask)


@triton.jit
def _token_logprobs_bwd_weight_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, g_ptr, lse_ptr, dw_ptr, db_ptr,
    M, V, D,
    stride_hm, stride_hd, stride_wv, stride_wd,
    inv_t,
    HAS_BIAS: tl.constexpr, NEED_WEIGHT: tl.constexpr, NEED_BIAS: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """d weight (V, D) fp32 and d bias (V,) fp32: this program owns BLOCK_V vocab rows."""
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    cols64 = cols.to(tl.int64)
    db = tl.zeros([BLOCK_V], tl.float32)
    for r0 in range(0, M, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        row_ok = rows < M
        rows64 = rows.to(tl.int64)
        tgt = tl.load(t_ptr + rows, mask=row_ok, other=0)
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        dl = _dlogits_tile(h_ptr, w_ptr, b_ptr, rows64, row_ok, cols, col_ok, tgt, g, lse,
                           D, stride_hm, stride_hd, stride_wv, stride_wd, inv_t,
                           HAS_BIAS, INTERPRET, BLOCK_N, BLOCK_V, BLOCK_D)  # fmt: skip
        if NEED_BIAS:
            db += tl.sum(dl, 0)
        if NEED_WEIGHT:
            dl_t = tl.trans(cast(dl, h_ptr.dtype.element_ty, INTERPRET))  # (BLOCK_V, BLOCK_N)
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                d_ok = ds < D
                h = tl.load(
                    h_ptr + rows64[:, None] * stride_hm + ds[None, :] * stride_hd,
                    mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0,
                )
                ptrs = dw_ptr + cols64[:, None] * D + ds[None, :]
                mask = col_ok[:, None] & d_ok[None, :]
                acc = tl.load(ptrs, mask=mask, other=0.0)
                tl.store(ptrs, dot(dl_t, h, acc, INTERPRET), mask=mask)
    if NEED_BIAS:
        tl.store(db_ptr + cols, db, mask=col_ok)


@triton.jit
def _logits_fwd_kernel(
    x_ptr, t_ptr, logp_ptr, lse_ptr,
    N, V, stride_xn, inv_t, ignore_index,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=0)
    valid = row_ok & (tgt != ignore_index)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    tgt_logit = tl.zeros([BLOCK_N], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = valid[:, None] & (cols < V)[None, :]
        x = (
            tl.load(
                x_ptr + rows64[:, None] * stride_xn + cols[None, :], mask=mask, other=float("-inf")
            ).to(tl.float32)
            * inv_t
        )
        tgt_logit += tl.sum(tl.where(cols[None, :] == tgt[:, None], x, 0.0), 1)
        m_new = tl.maximum(m, tl.max(x, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), 1)
        m = m_new
    lse = tl.where(m == float("-inf"), 0.0, m) + tl.log(s)
    tl.store(logp_ptr + rows, tl.where(valid, tgt_logit - lse, 0.0), mask=row_ok)
    tl.store(lse_ptr + rows, tl.where(valid, lse, 0.0), mask=row_ok)


@triton.jit
def _logits_bwd_kernel(
    x_ptr, t_ptr, g_ptr, lse_ptr, dx_ptr,
    N, V, stride_xn, inv_t, ignore_index,
    INTERPRET: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=0)
    valid = row_ok & (tgt != ignore_index)
    g = tl.where(valid, tl.load(g_ptr + rows, mask=row_ok, other=0.0), 0.0) * inv_t
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    mask = row_ok[:, None] & (cols < V)[None, :]
    x = tl.load(
        x_ptr + rows64[:, None] * stride_xn + cols[None, :], mask=mask & valid[:, None], other=0.0
    ).to(tl.float32)
    p = tl.exp(x * inv_t - lse[:, None])
    d = tl.where(cols[None, :] == tgt[:, None], 1.0 - p, -p) * g[:, None]
    d = tl.where(valid[:, None], d, 0.0)  # ignored rows: exact zeros whatever they hold
    tl.store(
        dx_ptr + rows64[:, None] * V + cols[None, :],
        cast(d, dx_ptr.dtype.element_ty, INTERPRET),
        mask=mask,
    )


# ------------------------------------------------------------------ launchers


# Blocks: tl.dot needs every dimension >= 16. On the GPU, 64 tokens x 128 vocabulary
# columns x 64 features keeps the fp32 logit tile (32 KiB) and the bf16 operand tiles
# in registers and shared memory with room for pipelining; the interpreter runs the
# smallest legal tiles, which are also the fastest to simulate.
def _blocks() -> tuple[int, int, int, int]:
    if interpreting():
        return 16, 16, 16, 1  # BLOCK_N, BLOCK_V, BLOCK_D, num_warps
    return 64, 128, 64, 8


def token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
    bias: torch.Tensor | None, ignore_index: int, temperature: float, frozen_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Forward for hidden (N, D), weight (V, D), targets (N,): (logp, lse, grad or empty).
    Ignored rows are compacted away before the launch."""
    n, dim = hidden.shape
    n_vocab = weight.shape[0]
    bias = bias.contiguous() if bias is not None else None  # the kernels read it unit-stride
    logp = hidden.new_zeros(n, dtype=torch.float32)
    lse = hidden.new_zeros(n, dtype=torch.float32)
    grad = hidden.new_zeros((n, dim)) if frozen_grad else hidden.new_empty(0)
    rows = _valid_rows(targets, ignore_index)
    h = hidden if rows is None else hidden[rows]  # (M, D)
    t = (targets if rows is None else targets[rows]).contiguous()  # (M,)
    m_rows = h.shape[0]
    if m_rows == 0:
        return logp, lse, grad
    out_logp = torch.empty(m_rows, dtype=torch.float32, device=h.device)
    out_lse = torch.empty_like(out_logp)
    acc = (
        torch.zeros((m_rows, dim), dtype=torch.float32, device=h.device)
        if frozen_grad
        else out_logp
    )
    out_grad = (
        torch.empty((m_rows, dim), dtype=hidden.dtype, device=h.device) if frozen_grad else out_logp
    )
    block_n, block_v, block_d, warps = _blocks()
    _token_logprobs_fwd_kernel[(triton.cdiv(m_rows, block_n),)](
        h, weight, bias if bias is not None else weight, t, out_logp, out_lse, acc, out_grad,
        m_rows, n_vocab, dim,
        h.stride(0), h.stride(1), weight.stride(0), weight.stride(1),
        1.0 / temperature,
        HAS_BIAS=bias is not None, FROZEN_GRAD=frozen_grad, INTERPRET=interpreting(),
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    head_finite = _all_finite(weight) if bias is None else _all_finite(weight) & _all_finite(bias)
    out_logp = torch.where(head_finite, out_logp, float("nan"))
    if rows is None:
        return out_logp, out_lse, (out_grad if frozen_grad else grad)
    logp[rows] = out_logp
    lse[rows] = out_lse
    if frozen_grad:
        grad[rows] = out_grad
    return logp, lse, grad


def token_logprobs_backward(
    grad_logp: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
    bias: torch.Tensor | None, lse: torch.Tensor, ignore_index: int, temperature: float,
    need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Trainable head: (d hidden, d weight, d bias) by recomputing logit tiles."""
    n, dim = hidden.shape
    n_vocab = weight.shape[0]
    bias = bias.contiguous() if bias is not None else None  # the kernels read it unit-stride
    rows = _valid_rows(targets, ignore_index)
    h = hidden if rows is None else hidden[rows]
    t = (targets if rows is None else targets[rows]).contiguous()
    g = (grad_logp if rows is None else grad_logp[rows]).float().contiguous()
    row_lse = (lse if rows is None else lse[rows]).contiguous()
    m_rows = h.shape[0]
    block_n, block_v, block_d, warps = _blocks()
    common = dict(HAS_BIAS=bias is not None, INTERPRET=interpreting(), BLOCK_N=block_n,
                  BLOCK_V=block_v, BLOCK_D=block_d, num_warps=warps)  # fmt: skip
    strides = (h.stride(0), h.stride(1), weight.stride(0), weight.stride(1))
    b = bias if bias is not None else weight
    d_hidden = hidden.new_empty(0)
    if need_hidden:
        dh = torch.zeros((m_rows, dim), dtype=torch.float32, device=h.device)
        if m_rows:
            _token_logprobs_bwd_hidden_kernel[(triton.cdiv(m_rows, block_n),)](
                h, weight, b, t, g, row_lse, dh, m_rows, n_vocab, dim, *strides,
                1.0 / temperature, **common,
            )  # fmt: skip
        if rows is None:
            d_hidden = dh.to(hidden.dtype)
        else:
            d_hidden = hidden.new_zeros((n, dim))
            d_hidden[rows] = dh.to(hidden.dtype)
    need_bias = need_bias and bias is not None
    dw = torch.zeros((n_vocab, dim) if need_weight else (1, 1), dtype=torch.float32,
                     device=h.device)  # fmt: skip
    db = torch.zeros(n_vocab if need_bias else 1, dtype=torch.float32, device=h.device)
    if (need_weight or need_bias) and m_rows:
        _token_logprobs_bwd_weight_kernel[(triton.cdiv(n_vocab, block_v),)](
            h, weight, b, t, g, row_lse, dw, db, m_rows, n_vocab, dim, *strides,
            1.0 / temperature, NEED_WEIGHT=need_weight, NEED_BIAS=need_bias, **common,
        )  # fmt: skip
    d_weight = dw.to(weight.dtype) if need_weight else weight.new_empty(0)
    d_bias = db.to(bias.dtype) if need_bias else weight.new_empty(0)
    return d_hidden, d_weight, d_bias


def _logit_blocks(n_vocab: int) -> tuple[int, int, int]:
    if interpreting():
        return 4, 64, 1
    # One row per program up to BLOCK_V = 4096 columns per step: long contiguous reads.
    return 1, min(4096, triton.next_power_of_2(n_vocab)), 8


def logprobs_from_logits(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward for logits (N, V): (logp, lse) fp32, one read of each logit."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    n, n_vocab = logits.shape
    logp = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    if n == 0:
        return logp, lse
    block_n, block_v, warps = _logit_blocks(n_vocab)
    _logits_fwd_kernel[(triton.cdiv(n, block_n),)](
        logits, targets.contiguous(), logp, lse, n, n_vocab, logits.stride(0),
        1.0 / temperature, ignore_index, BLOCK_N=block_n, BLOCK_V=block_v, num_warps=warps,
    )  # fmt: skip
    return logp, lse


def logprobs_from_logits_backward(
    grad_logp: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
    ignore_index: int, temperature: float,
) -> torch.Tensor:  # fmt: skip
    """d logits (N, V) contiguous in the logits' dtype: one read and one write."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    n, n_vocab = logits.shape
    out = torch.empty((n, n_vocab), dtype=logits.dtype, device=logits.device)
    if n == 0:
        return out
    block_n, block_v, warps = _logit_blocks(n_vocab)
    block_v = min(block_v, 1024) if not interpreting() else block_v
    _logits_bwd_kernel[(triton.cdiv(n, block_n), triton.cdiv(n_vocab, block_v))](
        logits, targets.contiguous(), grad_logp.float().contiguous(), lse.contiguous(), out,
        n, n_vocab, logits.stride(0), 1.0 / temperature, ignore_index,
        INTERPRET=interpreting(), BLOCK_N=block_n, BLOCK_V=block_v, num_warps=warps,
    )  # fmt: skip
    return out
