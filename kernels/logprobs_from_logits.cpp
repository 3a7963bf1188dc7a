// Row-wise logsumexp-and-gather over logits (DESIGN section 1, "from materialized logits").
//
// One pass per row: the row is read in blocks of BLOCK elements; each block's max and
// sum of exponentials are merged into a running (max, sum) pair, the online logsumexp:
//   m' = max(m, m_b);  s' = s * exp(m - m') + s_b * exp(m_b - m').
// Bytes: N * V * sizeof(dtype) read once; FLOPs ~ 3 N V plus N V exps, so the pass is
// bound by memory bandwidth or exp throughput, never by arithmetic.
// NaN and +Inf propagate: a NaN element makes its block sum NaN; +Inf gives
// exp(inf - inf) = NaN. Rows whose elements are all -Inf give lse = -Inf.
#include <cmath>
#include <cstring>
#include <limits>

#include "decpo_native.h"

namespace {

constexpr int64_t BLOCK = 512;

inline float bf16_to_float(uint16_t bits) {
  uint32_t word = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &word, sizeof(out));
  return out;
}

struct Loader {
  const void* base;
  int dtype;
  inline float operator()(int64_t row_offset, int64_t j) const {
    if (dtype == 0) return static_cast<const float*>(base)[row_offset + j];
    return bf16_to_float(static_cast<const uint16_t*>(base)[row_offset + j]);
  }
};

// Online logsumexp of one row, each element scaled by inv_t.
float row_logsumexp(const Loader& load, int64_t off, int64_t n_vocab, float inv_t) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float m = neg_inf;
  float s = 0.0f;
  float block[BLOCK];
  for (int64_t start = 0; start < n_vocab; start += BLOCK) {
    const int64_t len = (n_vocab - start < BLOCK) ? (n_vocab - start) : BLOCK;
    float m_b = neg_inf;
    for (int64_t j = 0; j < len; ++j) {
      block[j] = load(off, start + j) * inv_t;
      m_b = block[j] > m_b ? block[j] : m_b;  // NaN never wins: caught by the sum below
    }
    const float m_new = m > m_b ? m : m_b;
    // All -inf so far: keep exp() arguments finite (exp(-inf - 0) = 0).
    const float m_safe = (m_new == neg_inf) ? 0.0f : m_new;
    float s_b = 0.0f;
    for (int64_t j = 0; j < len; ++j) s_b += std::exp(block[j] - m_safe);
    s = s * std::exp(m - m_safe) + s_b;
    m = m_new;
  }
  return (m == neg_inf ? 0.0f : m) + std::log(s);
}

}  // namespace

DECPO_API int decpo_abi_version(void) { return 1; }

DECPO_API int decpo_logprobs_from_logits_fwd(const void* logits, int dtype, int64_t n_rows,
                                             int64_t n_vocab, int64_t row_stride,
                                             const int64_t* targets, int64_t ignore_index,
                                             float inv_temperature, float* logp, float* lse) {
  if (dtype != 0 && dtype != 1) return 1;
  // Validate every target before touching memory so a bad one never reads out of bounds.
  for (int64_t i = 0; i < n_rows; ++i) {
    const int64_t y = targets[i];
    if (y != ignore_index && (y < 0 || y >= n_vocab)) return 2;
  }
  const Loader load{logits, dtype};
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n_rows; ++i) {
    const int64_t y = targets[i];
    if (y == ignore_index) {
      logp[i] = 0.0f;
      lse[i] = 0.0f;
      continue;
    }
    const int64_t off = i * row_stride;
    const float row_lse = row_logsumexp(load, off, n_vocab, inv_temperature);
    lse[i] = row_lse;
    logp[i] = load(off, y) * inv_temperature - row_lse;
  }
  return 0;
}
