"""Per-token log-probs in pure PyTorch, tiled so no N x V fp32 buffer is ever held.

token_logprobs: final logits z = softcap tanh(logit_scale (h W^T + b) / softcap) / T
(logit_scale (h W^T + b) / T without a softcap) are produced one (row chunk, vocab chunk)
tile at a time and folded into a running max m and sum-exp s per row (the online
logsumexp), with the target logit gathered from whichever tile holds it.

With a frozen head (hidden needs a gradient, weight and bias do not) the forward
also accumulates E_t = sum_v p_tv W_v online, flash-attention style (rescale the
accumulator when the running max moves), so the gradient is known at the end of
the forward: d logp_t / d h_t = (W_{y_t} - E_t) / T (with a logit scale and softcap
each W_v is weighted by the chain-rule factor dz_v / da_v, in the same pass). The
per-token statistics (entropy, logit sum, argmax match, log sum p^2) are three more
running sums beside the logsumexp: no extra matmul. Two matrix products per tile
(2 N V D each): forward+gradient costs 4 N V D FLOPs, and the backward is one
elementwise multiply by grad_output. When the weight or bias needs a gradient
the backward recomputes each tile (6 N V D in all).

logprobs_from_logits: one pass over each row chunk of the logits in the forward,
one read and one write in the backward.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from decpo.numerics import accumulation_dtype, head_ok, valid_rows

# A fused replacement for the per-tile softmax steps
# (decpo.native_backend.logprobs.online_softmax_tile): (tile, bias chunk, 1/T, softcap,
# logit_scale, local target or -1, m, s_other, s_target, target_logit, stats
# accumulators (3, R) or None) -> rescale, with the tile turned into exp(z - m_new)
# (1 - tanh^2 with a softcap) in place, target column zeroed.
TileEpilogue = Callable[..., torch.Tensor]
# A fused widening of a bf16 weight chunk into an fp32 buffer
# (decpo.native_backend.logprobs.widen_bf16): (src (R, D) bf16, dst (R, D) fp32) ->
# whether every element was finite, or None when it cannot take these layouts.
ChunkWidener = Callable[[torch.Tensor, torch.Tensor], "bool | None"]

# Elements per fp32 logit tile: 2^22 * 4 bytes = 16 MiB (64 MiB on GPUs).
TILE_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 24}
VOCAB_CHUNK = 8192
# Vocabulary chunk of a bf16 head widened to fp32 chunk by chunk: its fp32 copy
# (WIDENED_VOCAB_CHUNK x D, 4 MiB at D = 512) is read by both products of the chunk,
# and at 8192 rows (16 MiB per stream) it left the cache between them. N=256 D=512
# V=32000 forward+backward under the avx512 / avx2 caps, 11 rotated rounds in one
# process: 2048-row chunks took 0.89-0.94 of the time of 8192-row ones (fp32 heads,
# which are not copied, 0.96-1.01). The same holds for a trainable head's backward,
# whose chunk is read by three products: with 8192-row widened chunks there, bf16
# took 1.044 [1.008, 1.085] of fp32's time (N=256 D=512 V=32000 forward+backward, AVX2
# EPYC, 61 alternating rounds, median and 95% interval), with 2048-row ones 0.925
# [0.894, 0.959].
WIDENED_VOCAB_CHUNK = 2048
# |lse| above which exp(x - lse) loses accuracy (fp32 spacing at 1024 is 1.2e-4): the
# logits backward then recomputes those rows in the frame of their max.
LSE_EXACT_LIMIT = 1024.0


def _tile(
    n_rows: int, n_vocab: int, device: torch.device, widened: bool = False
) -> tuple[int, int]:
    budget = TILE_ELEMENTS.get(device.type, 1 << 22)
    vocab_chunk = min(n_vocab, WIDENED_VOCAB_CHUNK if widened else VOCAB_CHUNK)
    return max(1, min(n_rows, budget // vocab_chunk)), vocab_chunk


class _ChunkCaster:
    """weight[v0:v1] in matmul_dtype, converted into one buffer reused for every chunk
    of a call (None: the view itself). A fresh tensor per chunk page-faults its memory
    in every time: on 2 cores, converting a 32000 x 512 bf16 head chunk by chunk took
    13-18 ms that way, most of the gap between bf16-as-fp32-tiles and plain fp32.
    widen: a fused bf16 -> fp32 conversion that also checks finiteness; `widened`
    holds the first row of every chunk it converted, so that once the chunks of all
    casters of a call cover the head, their `finite` flags answer the head check
    without another pass over it (_head_finite)."""

    def __init__(
        self, weight: torch.Tensor, rows: int, matmul_dtype: torch.dtype | None,
        widen: ChunkWidener | None = None,
    ):  # fmt: skip
        self.weight = weight
        self.buffer = (
            None
            if matmul_dtype is None
            else torch.empty((rows, weight.shape[1]), dtype=matmul_dtype, device=weight.device)
        )  # (Vc, D)
        widens = weight.dtype == torch.bfloat16 and matmul_dtype == torch.float32
        self.widen = widen if widens else None
        self.finite = True  # every element widened so far
        self.widened: set[int] = set()  # v0 of every chunk that went through widen

    def __call__(self, v0: int, v1: int) -> torch.Tensor:
        if self.buffer is None:
            return self.weight[v0:v1]
        out = self.buffer[: v1 - v0]  # (v1 - v0, D)
        finite = None if self.widen is None else self.widen(self.weight[v0:v1], out)
        if finite is None:
            self.widen = None
            return out.copy_(self.weight[v0:v1])
        self.finite = self.finite and finite
        self.widened.add(v0)
        return out


def _head_finite(casters: list[_ChunkCaster], chunks: list[tuple[int, int]]) -> torch.Tensor | None:
    """0-dim bool: no NaN or Inf in the weight, when the casters widened every chunk
    between them; else None (the caller checks the head itself)."""
    if any(c.widen is None for c in casters):
        return None
    widened = set().union(*(c.widened for c in casters))
    if any(v0 not in widened for v0, _ in chunks):
        return None
    return torch.tensor(all(c.finite for c in casters), device=casters[0].weight.device)


def _safe_max(m: torch.Tensor) -> torch.Tensor:
    """The running max with -inf replaced by 0, so exp(x - m) stays finite for
    all -inf rows; +inf is kept so that exp(inf - inf) = NaN propagates."""
    return torch.where(m == float("-inf"), torch.zeros_like(m), m)


def _logit_tile(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, v0: int, v1: int,
    inv_t: float, compute_dtype: torch.dtype, softcap: float = 0.0, logit_scale: float = 1.0,
    w_chunk: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Final logits z of vocabulary rows [v0, v1) in the compute dtype: (rows, v1 - v0),
    and t = tanh(logit_scale a / softcap) when softcapping (else None), where
    a = h W^T + b and z = softcap t / T (or logit_scale a / T without a softcap).
    w_chunk: weight[v0:v1] already converted to h's dtype, when the caller has it."""
    logits = (h @ (weight[v0:v1] if w_chunk is None else w_chunk).T).to(compute_dtype)
    if bias is not None:
        logits += bias[v0:v1].to(compute_dtype)
    if softcap:
        t = torch.tanh(logits * (logit_scale / softcap))
        return t * (softcap * inv_t), t
    if logit_scale * inv_t != 1.0:
        logits *= logit_scale * inv_t
    return logits, None


def _target_columns(targets: torch.Tensor, v0: int, v1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(column of each row's target in the tile [v0, v1), clamped into range: (R, 1);
    whether the target lies in the tile: (R,)). No host sync."""
    local = targets - v0
    inside = (local >= 0) & (local < v1 - v0)
    return local.clamp(0, v1 - v0 - 1)[:, None], inside


@dataclasses.dataclass
class _Running:
    """The online-softmax state of R rows over part of the vocabulary (see
    token_logprobs): running max m, sum of exp(z - m) over v != y (s_other) and at
    v = y (s_target), the target's logit (0 until its tile is seen), the statistics
    sums [x, q, sum z] (3, R) or None, and sum_{v != y} exp(z_v - m) c'_v W_v (R, D)
    or None (allocated uninitialized: the fold's first chunk writes it). All (R,)
    unless stated, in the accumulation dtype. The target's own term
    is kept out of the accumulator so that the gradient's W_y - E never subtracts two
    nearly equal low-precision vectors when p_y is close to 1."""

    m: torch.Tensor
    s_other: torch.Tensor
    s_target: torch.Tensor
    target_logit: torch.Tensor
    acc: torch.Tensor | None
    other_w: torch.Tensor | None

    @classmethod
    def start(cls, rows: int, dim: int, like: torch.Tensor, dtype: torch.dtype,
              with_stats: bool, frozen_grad: bool) -> _Running:  # fmt: skip
        def zeros(*shape: int) -> torch.Tensor:
            return like.new_zeros(shape, dtype=dtype)

        return cls(
            like.new_full((rows,), float("-inf"), dtype=dtype), zeros(rows), zeros(rows),
            zeros(rows), zeros(3, rows) if with_stats else None,
            like.new_empty((rows, dim), dtype=dtype) if frozen_grad else None,
        )  # fmt: skip

    def absorb(self, part: _Running) -> None:
        """Folds in the state of a disjoint part of the vocabulary, in place: both sums
        are moved to the common max, exp(m_x - m) (the rescale the sequential fold
        applies when its running max moves)."""
        m = torch.maximum(self.m, part.m)
        m_safe = _safe_max(m)
        own = torch.exp(self.m - m_safe)  # (R,), 0 for a side with no mass yet
        other = torch.exp(part.m - m_safe)
        if self.acc is not None:
            assert part.acc is not None

            def moved(x: _Running, rescale: torch.Tensor) -> torch.Tensor:
                s_x = x.s_other + x.s_target
                shift = torch.where(s_x > 0, s_x * (x.m - m_safe), 0.0)
                return rescale * (x.acc[0] + shift)  # sum e (z - m) in the new frame

            self.acc[0] = moved(self, own) + moved(part, other)
            self.acc[1] = self.acc[1] * own * own + part.acc[1] * other * other  # sum e^2
            self.acc[2] += part.acc[2]  # sum z
        self.s_other = self.s_other * own + part.s_other * other
        self.s_target = self.s_target * own + part.s_target * other
        self.target_logit = self.target_logit + part.target_logit  # one part holds y
        if self.other_w is not None:
            assert part.other_w is not None
            self.other_w.mul_(own[:, None]).addcmul_(part.other_w, other[:, None])
        self.m = m


class _VocabFold:
    """Folds the logit tiles of vocabulary chunks into a fresh _Running state, one row
    chunk per call, with its own chunk and tile buffers (one fold per stream)."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, vocab_chunk: int,
        max_rows: int, tile_dtype: torch.dtype, matmul_dtype: torch.dtype | None,
        widen: ChunkWidener | None, epilogue: TileEpilogue | None, inv_t: float,
        softcap: float, logit_scale: float, frozen_grad: bool, with_stats: bool,
    ):  # fmt: skip
        self.weight, self.bias = weight, bias
        self.epilogue = epilogue
        self.inv_t, self.softcap, self.logit_scale = inv_t, softcap, logit_scale
        self.frozen_grad, self.with_stats = frozen_grad, with_stats
        self.cast_chunk = _ChunkCaster(weight, vocab_chunk, matmul_dtype, widen)
        # The fused epilogue's logit tiles, one buffer for every tile of the call: a
        # fresh (R, Vc) product per tile (8 MiB at 256 x 8192 fp32) page-faults its
        # memory in each time. fp32 N=256, D=512, V=32000 forward+backward: 2-5% faster
        # (median of interleaved calls, 15-21 rounds), the epilogue and both products
        # unchanged.
        self.tile_buffer = None
        if epilogue is not None:
            self.tile_buffer = weight.new_empty(max_rows * vocab_chunk, dtype=tile_dtype)

    def __call__(
        self, h_mm: torch.Tensor, t: torch.Tensor, chunks: list[tuple[int, int]]
    ) -> _Running:
        """The state of h_mm (R, D) in the matmul dtype with targets t (R,) over the
        vocabulary chunks [v0, v1), folded in order."""
        with torch.no_grad():
            return self._fold(h_mm, t, chunks)

    def take(self, h_mm: torch.Tensor, t: torch.Tensor, schedule: _ChunkSchedule) -> None:
        """Folds chunks taken from the schedule one at a time, each into a fresh state
        handed back to it, until none is left (a stream thread's work)."""
        with torch.no_grad():  # a stream thread starts with grad mode on
            while (index := schedule.next_chunk()) is not None:
                schedule.deliver(index, self._fold(h_mm, t, [schedule.chunks[index]]))

    def _fold(self, h_mm: torch.Tensor, t: torch.Tensor, chunks: list[tuple[int, int]]) -> _Running:
        weight, bias, inv_t = self.weight, self.bias, self.inv_t
        softcap, logit_scale = self.softcap, self.logit_scale
        rows, dim = h_mm.shape
        cdt = accumulation_dtype(h_mm.dtype)  # the same as the hidden states'
        state = _Running.start(rows, dim, h_mm, cdt, self.with_stats, self.frozen_grad)
        m, s_other, s_target = state.m, state.s_other, state.s_target
        target_logit, acc, other_w = state.target_logit, state.acc, state.other_w
        for v0, v1 in chunks:
            local, inside = _target_columns(t, v0, v1)
            w_chunk = self.cast_chunk(v0, v1)  # (Vc, D)
            if self.epilogue is not None:
                assert self.tile_buffer is not None
                # (R, Vc), becomes exp(z - m_new) c' in place
                p_tile = torch.mm(
                    h_mm, w_chunk.T, out=self.tile_buffer[: rows * (v1 - v0)].view(-1, v1 - v0)
                )
                rescale = self.epilogue(
                    p_tile, None if bias is None else bias[v0:v1], inv_t, softcap, logit_scale,
                    torch.where(inside, local.squeeze(1), -1), m, s_other, s_target,
                    target_logit, acc,
                )  # fmt: skip
            else:
                tile, tanh_tile = _logit_tile(
                    h_mm, weight, bias, v0, v1, inv_t, cdt, softcap, logit_scale, w_chunk
                )  # (R, Vc)
                target_logit = torch.where(inside, tile.gather(1, local).squeeze(1), target_logit)
                m_new = torch.maximum(m, tile.amax(1))
                m_safe = _safe_max(m_new)
                rescale = torch.exp(m - m_safe)  # (R,)
                if acc is not None:
                    acc[2] += tile.sum(1)
                    s_old = s_other + s_target
                    shift = torch.where(s_old > 0, s_old * (m - m_safe), 0.0)
                e = tile.sub_(m_safe[:, None]).exp_()  # exp(z - m), unnormalized p (in place)
                if acc is not None:
                    z_dev = torch.where(e == 0, 0.0, e * e.log())  # e (z - m), from e
                    acc[0] = rescale * (acc[0] + shift) + z_dev.sum(1)
                    acc[1] = acc[1] * rescale * rescale + (e * e).sum(1)
                p_target = e.gather(1, local).squeeze(1)
                e.scatter_(1, local, torch.where(inside, 0.0, p_target)[:, None])
                s_target = s_target * rescale + torch.where(inside, p_target, 0.0)
                s_other = s_other * rescale + e.sum(1)
                m = m_new
                if other_w is not None and tanh_tile is not None:
                    e.mul_(1.0 - tanh_tile.square_())  # dz / da up to logit_scale / T
                p_tile = e.to(w_chunk.dtype) if other_w is not None else e
            if other_w is not None and v0 == chunks[0][0]:  # other_w is uninitialized
                if p_tile.dtype == other_w.dtype:
                    torch.mm(p_tile, w_chunk, out=other_w)
                else:  # bf16 tiles: the product in bf16
                    other_w.copy_(p_tile @ w_chunk)
            elif other_w is not None:
                other_w.mul_(rescale[:, None])
                if p_tile.dtype == other_w.dtype:
                    other_w.addmm_(p_tile, w_chunk)  # no (R, D) temporary
                else:  # bf16 tiles: the product in bf16, accumulated in fp32
                    other_w += p_tile @ w_chunk
        return _Running(m, s_other, s_target, target_logit, acc, other_w)


class _ChunkSchedule:
    """The vocabulary chunks of one row chunk, handed out one at a time to the stream
    threads that ask, and their states merged in chunk order whichever thread folded
    them: the result does not depend on timing, and a thread slowed by anything else
    on the machine takes fewer chunks instead of holding up the call. Two fixed halves
    of the vocabulary, one per thread, measured that: fp32 N=256 D=512 V=32000
    forward+backward on 2 cores, 12 calls, one thread finished 20-40 ms (of 110-150)
    after the other in most of them, by turns."""

    def __init__(self, chunks: list[tuple[int, int]]):
        self.chunks = chunks
        self._lock = threading.Lock()
        self._taken = 0  # chunks handed out
        self._merged = 0  # chunks [0, _merged) are folded into state
        self._pending: dict[int, _Running] = {}
        self.state: _Running | None = None

    def next_chunk(self) -> int | None:
        with self._lock:
            if self._taken == len(self.chunks):
                return None
            self._taken += 1
            return self._taken - 1

    def deliver(self, index: int, state: _Running) -> None:
        with self._lock:
            self._pending[index] = state
            while self._merged in self._pending:
                part = self._pending.pop(self._merged)
                if self.state is None:
                    self.state = part
                else:
                    self.state.absorb(part)
                self._merged += 1


# Chunks per stream thread when the vocabulary is scheduled across threads: enough
# that the wait for the last chunk is short next to the call, not so many that the
# products get small. Forward+backward on 2 cores, the schedule against two fixed
# halves, median of same-round ratios (alternating calls in one process): fp32 N=256
# D=512 V=32000 (avx512 caps) 0.95-0.96 with 4 or 8 chunks per thread; bf16 Llama-2-7B
# N=512 (bf16 products) 0.98 with 2, 0.985 with 4, 1.06 with 8 (2048-row chunks at
# D = 4096); fp32 Llama-2-7B N=512 0.985 and bf16 Llama-3-8B N=256 1.01 with 4.
CHUNKS_PER_STREAM = 4


def _stream_chunk(n_vocab: int, vocab_chunk: int, streams: int) -> int:
    """The vocabulary chunk for `streams` threads: at most vocab_chunk, small enough
    for CHUNKS_PER_STREAM chunks per thread, a multiple of 256 rows (4096 for V =
    32000 on 2 threads)."""
    if streams == 1:
        return vocab_chunk
    share = -(-n_vocab // (CHUNKS_PER_STREAM * streams))
    return max(1, min(vocab_chunk, -(-share // 256) * 256))


def default_streams(
    n_vocab: int, vocab_chunk: int, dim: int, device: torch.device, tile_dtype: torch.dtype
) -> int:
    """How many threads fold the vocabulary at once: on CPU, one per PyTorch thread (up
    to one whole vocabulary chunk each) for fp32 or float64 products, and for bf16
    products when D >= 2048; else 1.

    A row chunk of a frozen head costs two products of 2 R Vc D FLOPs per vocabulary
    chunk, h W_c^T with K = D and P W_c with K = Vc. With small R (N=256) and K = 512
    MKL's two-thread sgemm runs h W_c^T at 115-123 GFLOP/s on 2 cores, against 67-75
    GFLOP/s for the same product on one thread, so threads that each fold vocabulary
    chunks with single-threaded products (_ChunkSchedule), their states merged at the
    end (moved to the common max), beat one two-threaded fold. Forward+backward, median
    of 9-15 interleaved calls, 2 streams / 1 (measured with two fixed halves of the
    vocabulary), on 2 cores: fp32 N=256 D=512 V=32000 0.92 (avx512; avx2 0.93,
    baseline 0.94, bf16 weights widened to fp32 tiles 0.90), Llama-2-7B N=512 0.85,
    N=2048 D=512 0.98. oneDNN's bf16 products (AVX512_BF16) scale across threads by
    themselves at small K and lose on one: bf16 tiles at N=256 D=512 1.14; at large K
    they gain a little (Llama-3-8B N=256 0.92, Qwen2.5-7B N=256 0.97, Llama-2-7B N=512
    1.01)."""
    if device.type != "cpu":
        return 1
    if tile_dtype in (torch.float32, torch.float64) or (
        tile_dtype == torch.bfloat16 and dim >= 2048
    ):
        return max(1, min(torch.get_num_threads(), n_vocab // vocab_chunk))
    return 1


_POOL_LOCK = threading.Lock()
_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _single_threaded() -> None:
    torch.set_num_threads(1)  # per thread: the caller's setting is left alone


def _stream_pool(streams: int) -> ThreadPoolExecutor:
    """Threads that run one fold each with single-threaded PyTorch ops, kept for the
    life of the process (a forked child makes its own: the parent's threads are not
    in it)."""
    key = (os.getpid(), streams)
    with _POOL_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = ThreadPoolExecutor(
                streams, thread_name_prefix="decpo-vocab", initializer=_single_threaded
            )
    return pool


def token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
    bias: torch.Tensor | None, ignore_index: int, temperature: float, softcap: float,
    logit_scale: float, frozen_grad: bool, with_stats: bool,
    epilogue: TileEpilogue | None = None, matmul_dtype: torch.dtype | None = None,
    widen: ChunkWidener | None = None, streams: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Forward for hidden (N, D), weight (V, D), targets (N,).

    Final logits z = c(logit_scale (h W^T + b)) / T with c(x) = softcap tanh(x / softcap)
    (the identity when softcap == 0). epilogue: a fused implementation of the per-tile
    softmax steps (the native CPU library's); None runs them as torch ops.
    matmul_dtype: the dtype the matmuls run in (None: the inputs'); each weight chunk
    is converted as it is used, never the whole head (the native backend passes fp32
    for bf16 inputs on CPUs without bf16 dot products, where bf16 matmuls crawl).
    widen: a fused bf16 -> fp32 chunk conversion that also checks the head for NaN and
    Inf (the native backend's), used in place of a conversion plus a separate pass.
    streams: how many threads fold the vocabulary at once, each running
    single-threaded matmuls on the chunks it takes as it comes free, the chunks'
    states merged in chunk order (_ChunkSchedule; the same bits on every call at a
    given thread count) (None: default_streams; 1: one pass in the calling thread).

    Returns logp (N,), lse (N,) = logsumexp_v z in fp32 (float64 for float64 input; 0
    at ignored rows); if frozen_grad, d logp / d hidden (N, D) in hidden's dtype (else
    an empty tensor); if with_stats, (N, 4) columns [entropy, logit_sum, argmax_match,
    log_sum_p2] (else empty), 0 at ignored rows. Ignored rows are compacted away first
    and cost nothing.

    Statistics, accumulated online beside the logsumexp (sums rescaled when the
    running max m moves): s = sum_v e_v with e_v = exp(z_v - m); x = sum_v e_v (z_v - m);
    q = sum_v e_v^2; then entropy = log s - x / s, log_sum_p2 = log q - 2 log s.
    """
    n, dim = hidden.shape
    n_vocab = weight.shape[0]
    cdt = accumulation_dtype(hidden.dtype)
    inv_t = 1.0 / temperature
    logp = hidden.new_zeros(n, dtype=cdt)
    lse = hidden.new_zeros(n, dtype=cdt)
    grad = hidden.new_zeros((n, dim)) if frozen_grad else hidden.new_empty(0)
    stats = hidden.new_zeros((n, 4), dtype=cdt) if with_stats else hidden.new_empty(0, dtype=cdt)
    rows = valid_rows(targets, ignore_index)
    h_all = hidden if rows is None else hidden[rows]  # (M, D) valid rows
    t_all = targets if rows is None else targets[rows]  # (M,)
    m_rows = h_all.shape[0]
    if m_rows == 0:
        return logp, lse, grad, stats

    widened = matmul_dtype is not None and matmul_dtype != weight.dtype
    row_chunk, vocab_chunk = _tile(m_rows, n_vocab, hidden.device, widened)
    tile_dtype = hidden.dtype if matmul_dtype is None else matmul_dtype
    if streams is None:
        streams = default_streams(n_vocab, vocab_chunk, dim, hidden.device, tile_dtype)
    streams = max(1, min(streams, n_vocab))
    vocab_chunk = _stream_chunk(n_vocab, vocab_chunk, streams)
    chunks = [(v0, min(v0 + vocab_chunk, n_vocab)) for v0 in range(0, n_vocab, vocab_chunk)]
    streams = min(streams, len(chunks))
    fold_args = (
        weight, bias, vocab_chunk, min(row_chunk, m_rows), tile_dtype, matmul_dtype, widen,
        epilogue, inv_t, softcap, logit_scale, frozen_grad, with_stats,
    )  # fmt: skip
    folds = [_VocabFold(*fold_args) for _ in range(streams)]
    out_logp, out_lse, out_grad, out_stats = [], [], [], []
    for r0 in range(0, m_rows, row_chunk):
        h = h_all[r0 : r0 + row_chunk]  # (R, D)
        h_mm = h if matmul_dtype is None else h.to(matmul_dtype)  # (R, D)
        t = t_all[r0 : r0 + row_chunk]  # (R,)
        if streams == 1:
            state = folds[0](h_mm, t, chunks)
        else:
            schedule = _ChunkSchedule(chunks)
            pool = _stream_pool(streams)
            for future in [pool.submit(fold.take, h_mm, t, schedule) for fold in folds]:
                future.result()
            assert schedule.state is not None
            state = schedule.state
        m, s_other, s_target = state.m, state.s_other, state.s_target
        target_logit = state.target_logit
        s = s_other + s_target
        log_s = torch.log(s)
        row_lse = _safe_max(m) + log_s
        out_logp.append(target_logit - row_lse)
        out_lse.append(row_lse)
        if state.other_w is not None:
            # d logp / d h = sum_v (1[v = y] - p_v) dz_v/da_v W_v
            #             = (c_y s_other W_y - other_w) logit_scale / (s T)
            w_target = weight[t].to(cdt)  # (R, D)
            c_target = s_other
            if softcap:
                c_target = s_other * (1.0 - (target_logit * (temperature / softcap)).square())
            scale = (logit_scale * inv_t) / s
            grad_rows = (c_target[:, None] * w_target - state.other_w) * scale[:, None]
            out_grad.append(grad_rows.to(hidden.dtype))
        if state.acc is not None:
            acc = state.acc
            out_stats.append(
                torch.stack(
                    [
                        log_s - acc[0] / s,  # entropy
                        acc[2],  # sum of the final logits
                        (target_logit >= m).to(cdt),  # target is a (tied) argmax
                        torch.log(acc[1]) - 2.0 * log_s,  # log sum_v p_v^2
                    ],
                    dim=1,
                )
            )

    weight_finite = _head_finite([fold.cast_chunk for fold in folds], chunks)
    head_finite = head_ok(weight, bias, weight_finite=weight_finite)
    out_logp = [torch.where(head_finite, x, float("nan")) for x in out_logp]
    if rows is None:
        logp, lse = torch.cat(out_logp), torch.cat(out_lse)
        if frozen_grad:
            grad = torch.cat(out_grad)
        if with_stats:
            stats = torch.cat(out_stats)
    else:
        logp[rows] = torch.cat(out_logp)
        lse[rows] = torch.cat(out_lse)
        if frozen_grad:
            grad[rows] = torch.cat(out_grad)
        if with_stats:
            stats[rows] = torch.cat(out_stats)
    return logp, lse, grad, stats


def token_logprobs_backward(
    grad_logp: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
    bias: torch.Tensor | None, lse: torch.Tensor, ignore_index: int, temperature: float,
    softcap: float, logit_scale: float, need_hidden: bool, need_weight: bool, need_bias: bool,
    matmul_dtype: torch.dtype | None = None, widen: ChunkWidener | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Recompute-in-backward for a trainable head: (d hidden, d weight, d bias), each
    an empty tensor when not needed; matmul_dtype and widen as in token_logprobs (the
    head check is the forward's, so only the widening is used here). Vocabulary
    chunks outside, row chunks inside, so d weight is accumulated per chunk in fp32 and
    every tile is computed once.

    d logp_t / d a_tv = (1[v = y_t] - p_tv) dz_tv / da_tv with a = h W^T + b and
    dz / da = logit_scale (1 - tanh^2) / T (logit_scale / T without a softcap).
    """
    n, dim = hidden.shape
    n_vocab = weight.shape[0]
    cdt = accumulation_dtype(hidden.dtype)
    inv_t = 1.0 / temperature
    # Rows with an ignored target contribute nothing.
    rows = valid_rows(targets, ignore_index)
    h_all = hidden if rows is None else hidden[rows]
    t_all = targets if rows is None else targets[rows]
    g_all = (grad_logp if rows is None else grad_logp[rows]).to(cdt)
    lse_all = lse if rows is None else lse[rows]
    m_rows = h_all.shape[0]
    dz_da = logit_scale * inv_t

    d_hidden = hidden.new_zeros((m_rows, dim), dtype=cdt) if need_hidden else None
    d_weight = weight.new_zeros(weight.shape) if need_weight else weight.new_empty(0)
    d_bias = bias.new_zeros(bias.shape) if (need_bias and bias is not None) else weight.new_empty(0)
    widened = matmul_dtype is not None and matmul_dtype != weight.dtype
    row_chunk, vocab_chunk = _tile(max(m_rows, 1), n_vocab, hidden.device, widened)
    cast_chunk = _ChunkCaster(weight, vocab_chunk, matmul_dtype, widen)
    for v0 in range(0, n_vocab, vocab_chunk):
        v1 = min(v0 + vocab_chunk, n_vocab)
        dw = weight.new_zeros((v1 - v0, dim), dtype=cdt) if need_weight else None
        db = weight.new_zeros(v1 - v0, dtype=cdt) if need_bias else None
        w_chunk = cast_chunk(v0, v1)  # (Vc, D)
        for r0 in range(0, m_rows, row_chunk):
            r1 = min(r0 + row_chunk, m_rows)
            h = h_all[r0:r1] if matmul_dtype is None else h_all[r0:r1].to(matmul_dtype)
            tile, tanh_tile = _logit_tile(
                h, weight, bias, v0, v1, inv_t, cdt, softcap, logit_scale, w_chunk
            )  # (R, Vc)
            g = g_all[r0:r1]
            # d a = g * (onehot - p) * dz/da
            tile.sub_(lse_all[r0:r1, None]).exp_().mul_(-g[:, None])
            local, inside = _target_columns(t_all[r0:r1], v0, v1)
            tile.scatter_add_(1, local, torch.where(inside, g, 0.0)[:, None])
            if tanh_tile is not None:
                tile.mul_(1.0 - tanh_tile.square_())
            tile.mul_(dz_da)
            if d_hidden is not None:
                d_hidden[r0:r1] += (tile.to(w_chunk.dtype) @ w_chunk).to(cdt)
            if dw is not None:
                dw += (tile.T.to(h.dtype) @ h).to(cdt)
            if db is not None:
                db += tile.sum(0)
        if dw is not None:
            d_weight[v0:v1] = dw.to(weight.dtype)
        if db is not None:
            d_bias[v0:v1] = db.to(d_bias.dtype)

    if d_hidden is None:
        d_hidden_out = hidden.new_empty(0)
    elif rows is None:
        d_hidden_out = d_hidden.to(hidden.dtype)
    else:
        d_hidden_out = hidden.new_zeros((n, dim))
        d_hidden_out[rows] = d_hidden.to(hidden.dtype)
    return d_hidden_out, d_weight, d_bias


def logprobs_from_logits(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward for logits (N, V): (logp, lse), fp32 (float64 for float64 input), one
    pass over each row chunk. Ignored rows give 0 whatever their logits hold."""
    n, n_vocab = logits.shape
    cdt = accumulation_dtype(logits.dtype)
    inv_t = 1.0 / temperature
    logp = logits.new_empty(n, dtype=cdt)
    lse = logits.new_empty(n, dtype=cdt)
    row_chunk = max(1, TILE_ELEMENTS.get(logits.device.type, 1 << 22) // max(n_vocab, 1))
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    for r0 in range(0, n, row_chunk):
        r1 = min(r0 + row_chunk, n)
        # In the frame of the row's max, subtracted before scaling by 1/T: logits far
        # from 0 (an offset of 1e6, say) keep their differences exact, and logp never
        # subtracts two large nearly equal numbers.
        x = logits[r0:r1].to(cdt)  # (R, V)
        m = _safe_max(x.amax(1))
        x = x - m[:, None]
        if inv_t != 1.0:
            x = x * inv_t
        log_s = torch.log(torch.exp(x).sum(1))
        row_lse = m * inv_t + log_s
        target_logit = x.gather(1, safe_targets[r0:r1, None]).squeeze(1)
        ok = valid[r0:r1]
        logp[r0:r1] = torch.where(ok, target_logit - log_s, torch.zeros_like(row_lse))
        lse[r0:r1] = torch.where(ok, row_lse, torch.zeros_like(row_lse))
    return logp, lse


def logprobs_from_logits_backward(
    grad_logp: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
    ignore_index: int, temperature: float,
) -> torch.Tensor:  # fmt: skip
    """d logits = g * (onehot - softmax) / T in the logits' dtype; zero at ignored rows."""
    n, n_vocab = logits.shape
    cdt = accumulation_dtype(logits.dtype)
    inv_t = 1.0 / temperature
    out = torch.empty((n, n_vocab), dtype=logits.dtype, device=logits.device)
    row_chunk = max(1, TILE_ELEMENTS.get(logits.device.type, 1 << 22) // max(n_vocab, 1))
    valid = targets != ignore_index
    g_all = torch.where(valid, grad_logp.to(cdt), grad_logp.new_zeros((), dtype=cdt))
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    for r0 in range(0, n, row_chunk):
        r1 = min(r0 + row_chunk, n)
        g = g_all[r0:r1, None] * inv_t  # (R, 1)
        x = logits[r0:r1].to(cdt)
        row_lse = lse[r0:r1]
        far = row_lse.abs() > LSE_EXACT_LIMIT
        if bool(far.any()):
            # lse is too large to subtract in this precision: rows far from 0 work in
            # the frame of their max, as the forward does.
            m = torch.where(far, _safe_max(x.amax(1)), 0.0)
            x = x - m[:, None]
            if inv_t != 1.0:
                x = x * inv_t
            log_s = torch.where(far, torch.log(torch.exp(x).sum(1)), row_lse)
            p = torch.exp(x - log_s[:, None])
        else:
            if inv_t != 1.0:
                x = x * inv_t
            p = torch.exp(x - row_lse[:, None])
        d = -p * g
        d.scatter_add_(1, safe_targets[r0:r1, None], g)
        # Ignored rows: exact zeros even where their logits are NaN or Inf.
        out[r0:r1] = torch.where(valid[r0:r1, None], d, d.new_zeros(())).to(out.dtype)
    return out
