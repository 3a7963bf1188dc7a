// Row-wise log-softmax-and-gather over materialized logits (docs/design.md, "logprobs_from_logits").
//
// Forward, one read of each row: the row is consumed in blocks of BLOCK elements
// whose max and sum of exponentials are merged into a running (max, sum), the
// online logsumexp: m' = max(m, m_b); s' = s exp(m - m') + s_b exp(m_b - m').
// Backward, one read and one write of each row: d logit_v = g (1[v = y] - p_v) / T.
// Bytes per element: 2 (bf16) read forward; 2 read + 2 written backward. FLOPs per
// element ~ 15 for exp plus a few, far below what the bytes allow on 2 cores
// (~16 GFLOP/s of exp per core with AVX-512 vs ~10 GB/s), so both passes are
// bound by memory bandwidth and exp throughput, never by anything else.
// NaN and +Inf propagate: a NaN element makes its block sum NaN, +Inf gives
// exp(inf - inf) = NaN. Rows that are all -Inf give lse = -Inf.
#include <cmath>
#include <limits>

#include "decpo_native.h"
#include "vec_math.h"

namespace {

using decpo::exp_approx;
using decpo::to_float;

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

// Online logsumexp of one row of n elements, each scaled by inv_t.
template <typename T>
DECPO_MULTIVERSION ShiftedLse row_logsumexp(const T* row, int64_t n, float inv_t) {
  float m = kNegInf;
  float s = 0.0f;
  float block[BLOCK];
  for (int64_t start = 0; start < n; start += BLOCK) {
    const int64_t len = (n - start < BLOCK) ? (n - start) : BLOCK;
    float m_b = kNegInf;
#pragma omp simd reduction(max : m_b)
    for (int64_t j = 0; j < len; ++j) {
      block[j] = to_float(row[start + j]);
      m_b = block[j] > m_b ? block[j] : m_b;  // NaN never wins here; the sum catches it
    }
    const float m_new = m > m_b ? m : m_b;
    // All -inf so far: keep exp() arguments finite (exp(-inf - 0) = 0).
    const float m_safe = (m_new == kNegInf) ? 0.0f : m_new;
    float s_b = 0.0f;
#pragma omp simd reduction(+ : s_b)
    for (int64_t j = 0; j < len; ++j) s_b += exp_approx((block[j] - m_safe) * inv_t);
    s = s * exp_approx((m - m_safe) * inv_t) + s_b;
    m = m_new;
  }
  return {m == kNegInf ? 0.0f : m, std::log(s)};
}

template <typename T>
DECPO_MULTIVERSION void row_backward(const T* row, T* out, int64_t n, int64_t y, float g,
                                     float inv_t, float lse) {
  // d logit_v = g (1[v = y] - p_v) / T with p_v = exp((logit_v - m) / T - log_s); g
  // carries 1/T. m = 0 and log_s = lse unless lse is too large for that to be exact.
  float m = 0.0f;
  float log_s = lse;
  if (std::fabs(lse) > kLseExactLimit) {
    const ShiftedLse shifted = row_logsumexp(row, n, inv_t);
    m = shifted.m;
    log_s = shifted.log_s;
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    decpo::store(out, j, -g * exp_approx((to_float(row[j]) - m) * inv_t - log_s));
  }
  const float p_y = exp_approx((to_float(row[y]) - m) * inv_t - log_s);
  decpo::store(out, y, g - g * p_y);
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
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n_rows; ++i) {
    T* out = grad_logits + i * n_vocab;
    const int64_t y = targets[i];
    if (y == ignore_index) {
      for (int64_t j = 0; j < n_vocab; ++j) out[j] = T(0);
      continue;
    }
    row_backward(logits + i * row_stride, out, n_vocab, y, grad_logp[i] * inv_t, inv_t, lse[i]);
  }
}

bool targets_ok(const int64_t* targets, int64_t n_rows, int64_t n_vocab, int64_t ignore_index) {
  for (int64_t i = 0; i < n_rows; ++i) {
    const int64_t y = targets[i];
    if (y != ignore_index && (y < 0 || y >= n_vocab)) return false;
  }
  return true;
}

}  // namespace

DECPO_API int decpo_abi_version(void) { return 4; }

DECPO_API int decpo_logprobs_from_logits_fwd(const void* logits, int dtype, int64_t n_rows,
                                             int64_t n_vocab, int64_t row_stride,
                                             const int64_t* targets, int64_t ignore_index,
                                             float inv_temperature, float* logp, float* lse) {
  if (dtype != 0 && dtype != 1) return 1;
  // Every target is checked before any data is read, so a bad one never reads out of bounds.
  if (!targets_ok(targets, n_rows, n_vocab, ignore_index)) return 2;
  if (dtype == 0) {
    forward(static_cast<const float*>(logits), n_rows, n_vocab, row_stride, targets,
            ignore_index, inv_temperature, logp, lse);
  } else {
    forward(static_cast<const uint16_t*>(logits), n_rows, n_vocab, row_stride, targets,
            ignore_index, inv_temperature, logp, lse);
  }
  return 0;
}

DECPO_API int decpo_logprobs_from_logits_bwd(const float* grad_logp, const void* logits,
                                             int dtype, int64_t n_rows, int64_t n_vocab,
                                             int64_t row_stride, const int64_t* targets,
                                             int64_t ignore_index, float inv_temperature,
                                             const float* lse, void* grad_logits) {
  if (dtype != 0 && dtype != 1) return 1;
  if (!targets_ok(targets, n_rows, n_vocab, ignore_index)) return 2;
  if (dtype == 0) {
    backward(grad_logp, static_cast<const float*>(logits), n_rows, n_vocab, row_stride, targets,
             ignore_index, inv_temperature, lse, static_cast<float*>(grad_logits));
  } else {
    backward(grad_logp, static_cast<const uint16_t*>(logits), n_rows, n_vocab, row_stride,
             targets, ignore_index, inv_temperature, lse, static_cast<uint16_t*>(grad_logits));
  }
  return 0;
}
