// Row-wise log-softmax-and-gather over materialized logits (docs/design.md, "logprobs_from_logits").
//
// Forward, one read of each row: the row is consumed in blocks of BLOCK elements
// whose max and sum of exponentials are merged into a running (max, sum), the
// online logsumexp: m' = max(m, m_b); s' = s exp(m - m') + s_b exp(m_b - m'). After
// the first block, each block is summed in one pass in the frame of the running max
// (row_logsumexp_impl says when it is redone in two).
// Backward, one read and one write of each row: d logit_v = g (1[v = y] - p_v) / T.
// Bytes per element: 2 (bf16) read forward; 2 read + 2 written backward; one exp
// per element each way (vexp, vec_math.h: 14 vector ops per kLanes elements on
// AVX-512, ~27 on AVX2 and SSE, where the chain's latency is the bound; a bf16
// gradient, rounded to 8 bits, takes vexp_bf16's 3e-6-accurate exp in about half
// the ops). On 2 AVX-512 cores the exps, not the bytes, bound both passes (8.7-9.2
// G exp/s against ~40 GB/s); bench/cases.py counts both, with the exp rates measured
// on the machine (decpo.native_backend.library.exp_rate).
// Measured (bf16, N=4096, V=32000, 2 cores, avx512bf16): forward 18-19 ms (20-27 ms
// with a separate max pass per block), backward 20-21 ms into a reused output and
// 35-37 ms into a fresh one (the OS zeroes the new pages). Outputs of 16 MiB or more
// are written with streaming stores: fp32 backward into a reused output 26.1 -> 23.4 ms
// (avx512bf16) and 22.8 -> 19.3 ms (avx512), where a plain store's read of each line
// made it memory-bound; bf16 and fresh outputs unchanged (exps and page zeroing bound).
// NaN and +Inf propagate: a NaN element makes its block sum NaN, +Inf gives
// exp(inf - inf) = NaN. Rows that are all -Inf give lse = -Inf.
#include <cmath>
#include <limits>
#include <type_traits>

#include "isa.h"
#include "vec_math.h"

namespace {

using namespace decpo::DECPO_ISA;

constexpr int64_t BLOCK = 1024;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// |lse| above which exp(x / T - lse) loses accuracy in fp32 (spacing 1.2e-4 at 1024):
// the backward then recomputes the row in the frame of its max.
constexpr float kLseExactLimit = 1024.0f;

// Logsumexp of one row in the frame of its max m (raw, unscaled; 0 for all -inf
// rows): lse = m inv_t + log_s. The max is subtracted before scaling by inv_t, so
// logits far from 0 (an offset of 1e6) keep their differences exact.
struct ShiftedLse {
  float m;
  float log_s;
};

// (x - m) inv_t, the argument of every exp. kScaled = false when inv_t == 1, where the
// product is exact and skipped: the same bits with one vector op fewer per element
// (these passes are bound by the ~20 vector ops per exp, not by memory).
template <bool kScaled>
inline vf shifted(vf x, vf m, vf inv_t) {
  return kScaled ? (x - m) * inv_t : x - m;
}

// Slack of the one-pass blocks: a block whose max lies at most this far (scaled)
// above the running max is summed in the running max's frame, each term at most
// e^64 and a block's sum at most 1024 e^64 ~ 6e30, far from fp32's 3.4e38.
constexpr float kOnePassSlack = 64.0f;

// Max and sum of exp((x - m) inv_t) of one block, in the frame of m: two passes (the
// block's max first, then one exp per element, the block in L1 for the second pass).
template <bool kScaled, typename T>
float block_sum_two_pass(const T* block, int64_t len, float inv_t, float* m_b_out) {
  const vf vinv_t = vsplat(inv_t);
  // Four independent maxima: one chain would wait on each comparison's latency.
  vf vmax0 = vsplat(kNegInf), vmax1 = vmax0, vmax2 = vmax0, vmax3 = vmax0;
  int64_t j = 0;
  for (; j + 4 * kLanes <= len; j += 4 * kLanes) {
    vmax0 = vmax(vmax0, vload(block + j));
    vmax1 = vmax(vmax1, vload(block + j + kLanes));
    vmax2 = vmax(vmax2, vload(block + j + 2 * kLanes));
    vmax3 = vmax(vmax3, vload(block + j + 3 * kLanes));
  }
  for (; j + kLanes <= len; j += kLanes) vmax0 = vmax(vmax0, vload(block + j));
  float m_b = hmax(vmax(vmax(vmax0, vmax1), vmax(vmax2, vmax3)));
  for (; j < len; ++j) {
    const float x = to_float(block[j]);
    m_b = x > m_b ? x : m_b;
  }
  *m_b_out = m_b;
  // All -inf: keep exp() arguments finite (exp(-inf - 0) = 0).
  const float m_safe = m_b == kNegInf ? 0.0f : m_b;
  const vf vm = vsplat(m_safe);
  vf acc0 = vf{}, acc1 = vf{};  // two chains: the adds never wait on each other
  j = 0;
  for (; j + 2 * kLanes <= len; j += 2 * kLanes) {
    acc0 += vexp(shifted<kScaled>(vload(block + j), vm, vinv_t));
    acc1 += vexp(shifted<kScaled>(vload(block + j + kLanes), vm, vinv_t));
  }
  for (; j + kLanes <= len; j += kLanes) acc0 += vexp(shifted<kScaled>(vload(block + j), vm, vinv_t));
  float s_b = hsum(acc0 + acc1);
  for (; j < len; ++j) s_b += exp_approx((to_float(block[j]) - m_safe) * inv_t);
  return s_b;
}

// Online logsumexp of one row of n elements, each scaled by inv_t, in blocks of BLOCK.
// The first block is summed in the frame of its own max (two passes over it, in L1).
// Every later block is summed in ONE pass in the frame of the running max m, its max
// taken in the same pass (one vmaxps per vector on values already in registers,
// against a second load, widening and max: about 3 of ~20-27 vector ops per element):
// accepted when the block's max lies at most kOnePassSlack above m (then m moves to
// it), else (a new max far above, +inf, all -inf so far) the block is redone in two
// passes. NaN propagates through the sums either way.
template <bool kScaled, typename T>
ShiftedLse row_logsumexp_impl(const T* row, int64_t n, float inv_t) {
  float m = kNegInf;
  float s = 0.0f;
  const vf vinv_t = vsplat(inv_t);
  for (int64_t start = 0; start < n; start += BLOCK) {
    const int64_t len = (n - start < BLOCK) ? (n - start) : BLOCK;
    const T* block = row + start;
    float m_b = kNegInf, s_b = 0.0f;
    bool done = false;
    if (std::isfinite(m)) {  // one pass in the frame of m
      const vf vm = vsplat(m);
      vf acc0 = vf{}, acc1 = vf{};
      vf vmax0 = vsplat(kNegInf), vmax1 = vmax0;
      int64_t j = 0;
      for (; j + 2 * kLanes <= len; j += 2 * kLanes) {
        const vf x0 = vload(block + j), x1 = vload(block + j + kLanes);
        vmax0 = vmax(vmax0, x0);
        vmax1 = vmax(vmax1, x1);
        acc0 += vexp(shifted<kScaled>(x0, vm, vinv_t));
        acc1 += vexp(shifted<kScaled>(x1, vm, vinv_t));
      }
      for (; j + kLanes <= len; j += kLanes) {
        const vf x0 = vload(block + j);
        vmax0 = vmax(vmax0, x0);
        acc0 += vexp(shifted<kScaled>(x0, vm, vinv_t));
      }
      m_b = hmax(vmax(vmax0, vmax1));
      s_b = hsum(acc0 + acc1);
      for (; j < len; ++j) {
        const float x = to_float(block[j]);
        m_b = x > m_b ? x : m_b;
        s_b += exp_approx((x - m) * inv_t);
      }
      if (m_b <= m) {
        s += s_b;
        done = true;
      } else if ((m_b - m) * inv_t <= kOnePassSlack) {  // false for +inf and NaN
        s = (s + s_b) * exp_approx((m - m_b) * inv_t);
        m = m_b;
        done = true;
      }
    }
    if (!done) {
      s_b = block_sum_two_pass<kScaled>(block, len, inv_t, &m_b);
      const float m_new = m > m_b ? m : m_b;
      // All -inf so far: keep exp() arguments finite (exp(-inf - 0) = 0).
      const float m_safe = (m_new == kNegInf) ? 0.0f : m_new;
      const float b_safe = (m_b == kNegInf) ? 0.0f : m_b;
      s = s * exp_approx((m - m_safe) * inv_t) + s_b * exp_approx((b_safe - m_safe) * inv_t);
      m = m_new;
    }
  }
  return {m == kNegInf ? 0.0f : m, std::log(s)};
}

template <typename T>
ShiftedLse row_logsumexp(const T* row, int64_t n, float inv_t) {
  return inv_t == 1.0f ? row_logsumexp_impl<false>(row, n, inv_t)
                       : row_logsumexp_impl<true>(row, n, inv_t);
}

// Outputs of at least this many bytes are written with streaming stores (the
// backward's N x V gradient is read next by the head's matmul, long after a buffer
// this large has left the caches).
constexpr int64_t kStreamMinBytes = int64_t{16} << 20;

template <typename T>
void row_backward(const T* row, T* out, int64_t n, int64_t y, float g, float inv_t, float lse,
                  bool stream) {
  // d logit_v = g (1[v = y] - p_v) / T with p_v = exp((logit_v - m) / T - log_s); g
  // carries 1/T. m = 0 and log_s = lse unless lse is too large for that to be exact.
  float m = 0.0f;
  float log_s = lse;
  if (std::fabs(lse) > kLseExactLimit) {
    const ShiftedLse shifted = row_logsumexp(row, n, inv_t);
    m = shifted.m;
    log_s = shifted.log_s;
  }
  const vf vm = vsplat(m), vinv_t = vsplat(inv_t), vlog_s = vsplat(log_s), vg = vsplat(-g);
  int64_t j = 0;
  // A finite lse and g: every logit is finite or -inf (NaN or +inf would have made lse
  // NaN or +inf), so each g p_v is finite and the store needs no NaN test.
  const bool finite = std::isfinite(lse) && std::isfinite(g);
  // With finite lse and g every exp argument is finite or -inf, and a bf16 gradient is
  // rounded to 8 bits: the exp it needs is vexp_bf16's (3e-6 against 2e-3 for the
  // rounding, half vexp's ops). SSE2, N=4096 V=32000 on 2 cores, into a reused output:
  // bf16 took 1.15x fp32's time with vexp.
  const auto ex = [](vf x) {
    if constexpr (std::is_same_v<T, uint16_t>) {
      return vexp_bf16(x);
    } else {
      return vexp(x);
    }
  };
  if (m == 0.0f && inv_t == 1.0f && finite) {  // the usual case: p_v = exp(logit_v - lse)
    // Elements before the first kStreamAlign-aligned one: fewer than 2 kLanes.
    const int64_t lead = static_cast<int64_t>(
        (kStreamAlign - reinterpret_cast<uintptr_t>(out) % kStreamAlign) % kStreamAlign / sizeof(T));
    if (stream && n >= lead + 2 * kLanes) {
      vf a, b;  // one plain store of the first 2 kLanes covers the lead-in
      vload2(row, a, b);
      vstore2_finite(out, vg * ex(a - vlog_s), vg * ex(b - vlog_s));
      for (j = lead; j + 2 * kLanes <= n; j += 2 * kLanes) {
        vload2(row + j, a, b);
        vstream2_finite(out + j, vg * ex(a - vlog_s), vg * ex(b - vlog_s));
      }
      stream_fence();  // before the plain stores below, which may share a line
    }
    for (; j + 2 * kLanes <= n; j += 2 * kLanes) {
      vf a, b;
      vload2(row + j, a, b);
      vstore2_finite(out + j, vg * ex(a - vlog_s), vg * ex(b - vlog_s));
    }
    for (; j + kLanes <= n; j += kLanes) vstore_finite(out + j, vg * ex(vload(row + j) - vlog_s));
    if (j < n) {  // the last < kLanes through the vector exp too: the same bits at any alignment
      T in[kLanes] = {}, res[kLanes];
      for (int64_t k = j; k < n; ++k) in[k - j] = row[k];
      vstore_finite(res, vg * ex(vload(in) - vlog_s));
      for (int64_t k = j; k < n; ++k) out[k] = res[k - j];
      j = n;
    }
  } else if (m == 0.0f && inv_t == 1.0f) {  // NaN / inf rows: outputs NaN, inf or 0 only
    for (; j + kLanes <= n; j += kLanes) vstore(out + j, vg * vexp(vload(row + j) - vlog_s));
  } else if (finite) {  // a temperature, or a row recomputed in the frame of its max
    for (; j + kLanes <= n; j += kLanes) {
      vstore_finite(out + j, vg * ex(shifted<true>(vload(row + j), vm, vinv_t) - vlog_s));
    }
  } else {
    for (; j + kLanes <= n; j += kLanes) {
      vstore(out + j, vg * vexp(shifted<true>(vload(row + j), vm, vinv_t) - vlog_s));
    }
  }
  for (; j < n; ++j) store(out, j, -g * exp_approx((to_float(row[j]) - m) * inv_t - log_s));
  const float p_y = exp_approx((to_float(row[y]) - m) * inv_t - log_s);
  store(out, y, g - g * p_y);
}

template <typename T>
void forward(const T* logits, int64_t n_rows, int64_t n_vocab, int64_t row_stride,
             const int64_t* targets, int64_t ignore_index, float inv_t, float* logp, float* lse) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n_rows; ++i) {
    const int64_t y = targets[i];
    if (y == ignore_index) {
      logp[i] = 0.0f;
      lse[i] = 0.0f;
      continue;
    }
    const T* row = logits + i * row_stride;
    const ShiftedLse shifted = row_logsumexp(row, n_vocab, inv_t);
    lse[i] = shifted.m * inv_t + shifted.log_s;
    logp[i] = (to_float(row[y]) - shifted.m) * inv_t - shifted.log_s;
  }
}

template <typename T>
void backward(const float* grad_logp, const T* logits, int64_t n_rows, int64_t n_vocab,
              int64_t row_stride, const int64_t* targets, int64_t ignore_index, float inv_t,
              const float* lse, T* grad_logits) {
  const bool stream = n_rows * n_vocab * static_cast<int64_t>(sizeof(T)) >= kStreamMinBytes;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n_rows; ++i) {
    T* out = grad_logits + i * n_vocab;
    const int64_t y = targets[i];
    if (y == ignore_index) {
      for (int64_t j = 0; j < n_vocab; ++j) out[j] = T(0);
      continue;
    }
    row_backward(logits + i * row_stride, out, n_vocab, y, grad_logp[i] * inv_t, inv_t, lse[i],
                 stream);
  }
}

}  // namespace

namespace decpo::DECPO_ISA {

// Targets are checked by the caller (dispatch.cpp) before any data is read.
void logits_fwd(const void* logits, int dtype, int64_t n_rows, int64_t n_vocab, int64_t row_stride,
                const int64_t* targets, int64_t ignore_index, float inv_t, float* logp,
                float* lse) {
  if (dtype == 0) {
    forward(static_cast<const float*>(logits), n_rows, n_vocab, row_stride, targets,
            ignore_index, inv_t, logp, lse);
  } else {
    forward(static_cast<const uint16_t*>(logits), n_rows, n_vocab, row_stride, targets,
            ignore_index, inv_t, logp, lse);
  }
}

void logits_bwd(const float* grad_logp, const void* logits, int dtype, int64_t n_rows,
                int64_t n_vocab, int64_t row_stride, const int64_t* targets, int64_t ignore_index,
                float inv_t, const float* lse, void* grad_logits) {
  if (dtype == 0) {
    backward(grad_logp, static_cast<const float*>(logits), n_rows, n_vocab, row_stride, targets,
             ignore_index, inv_t, lse, static_cast<float*>(grad_logits));
  } else {
    backward(grad_logp, static_cast<const uint16_t*>(logits), n_rows, n_vocab, row_stride,
             targets, ignore_index, inv_t, lse, static_cast<uint16_t*>(grad_logits));
  }
}

namespace {

template <bool kBf16Exp>
void exp_probe_impl(const float* x, int64_t n, int64_t reps, double* out) {
  double total = 0.0, count = 0.0;
#pragma omp parallel reduction(+ : total, count)
  {
    vf acc0 = vf{}, acc1 = vf{};
    for (int64_t r = 0; r < reps; ++r) {
      for (int64_t j = 0; j + 2 * kLanes <= n; j += 2 * kLanes) {
        if constexpr (kBf16Exp) {
          acc0 += vexp_bf16(vload(x + j));
          acc1 += vexp_bf16(vload(x + j + kLanes));
        } else {
          acc0 += vexp(vload(x + j));
          acc1 += vexp(vload(x + j + kLanes));
        }
      }
    }
    total += hsum(acc0 + acc1);
    count += static_cast<double>(n / (2 * kLanes) * 2 * kLanes) * static_cast<double>(reps);
  }
  out[0] = total;
  out[1] = count;
}

}  // namespace

void exp_probe(const float* x, int64_t n, int64_t reps, bool bf16_exp, double* out) {
  bf16_exp ? exp_probe_impl<true>(x, n, reps, out) : exp_probe_impl<false>(x, n, reps, out);
}

}  // namespace decpo::DECPO_ISA
