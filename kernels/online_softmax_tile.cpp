// Fused epilogue of one (rows x vocabulary chunk) logit tile for token_logprobs on CPU.
//
// PyTorch's bf16 matmul produces the tile A = h W_chunk^T (R, Vc); this pass turns it,
// in place, into what the second matmul p @ W_chunk of the frozen-head gradient needs,
// and folds the tile into each row's running online-softmax state:
//   a_v = A_v + b_v
//   z_v = softcap tanh(logit_scale a_v / softcap) / T   (logit_scale a_v / T if no softcap)
//   m'  = max(m, max_v z_v),       rescale = exp(m - m')
//   e_v = exp(z_v - m')
//   stored: e_v (1 - tanh^2) with a softcap, e_v without (the chain-rule factor
//           dz_v / da_v up to the constant logit_scale / T), 0 at the target column y
//   s_other'  = s_other * rescale + sum_{v != y} e_v
//   s_target' = s_target * rescale + e_y                 (if y is in this chunk)
//   target_logit = z_y                                   (if y is in this chunk)
// With statistics (stats != NULL: three (R,) arrays x, q, zsum):
//   x'    = rescale (x + s (m - m')) + sum_v e_v (z_v - m')   [s = s_other + s_target]
//   q'    = q rescale^2 + sum_v e_v^2
//   zsum' = zsum + sum_v z_v
// so that entropy = log s - x / s and log sum p^2 = log q - 2 log s at the end.
// Two passes over each row while it sits in L1/L2 (max, then exp and store), instead
// of the ~8 full-tile passes of the same steps written with torch ops. The target's
// own probability is kept out of the stored row so that W_y - E = (s_other W_y - p W) / s
// never subtracts two nearly equal low-precision vectors.
#include <cmath>
#include <limits>

#include "isa.h"
#include "vec_math.h"

namespace {

using namespace decpo::DECPO_ISA;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Transform {
  const float* bias;
  float pre;   // logit_scale / softcap with a softcap, logit_scale / T without
  float post;  // softcap / T (softcap only)
};

template <bool SOFTCAP, typename T>
inline float final_logit(const T* row, int64_t j, const Transform& f) {
  const float a = to_float(row[j]) + (f.bias != nullptr ? f.bias[j] : 0.0f);
  if constexpr (SOFTCAP) {
    return std::tanh(a * f.pre) * f.post;
  } else {
    return a * f.pre;
  }
}

struct Sums {
  float s = 0.0f;   // sum e
  float x = 0.0f;   // sum e (z - m)
  float q = 0.0f;   // sum e^2
  float zs = 0.0f;  // sum z
};

// Over row[lo, hi): e_j = exp(z_j - m), stored times the chain-rule factor; sums.
template <bool SOFTCAP, bool STATS, typename T>
inline void exp_store(T* row, int64_t lo, int64_t hi, const Transform& f, float m, Sums& out) {
  float s = 0.0f, x = 0.0f, q = 0.0f, zs = 0.0f;
#pragma omp simd reduction(+ : s, x, q, zs)
  for (int64_t j = lo; j < hi; ++j) {
    const float a = to_float(row[j]) + (f.bias != nullptr ? f.bias[j] : 0.0f);
    float z, factor = 1.0f;
    if constexpr (SOFTCAP) {
      const float t = std::tanh(a * f.pre);
      z = t * f.post;
      factor = 1.0f - t * t;
    } else {
      z = a * f.pre;
    }
    const float e = exp_approx(z - m);
    s += e;
    if constexpr (STATS) {
      x += (e == 0.0f) ? 0.0f : e * (z - m);  // z = -inf: exactly 0, not NaN
      q += e * e;
      zs += z;
    }
    decpo::DECPO_ISA::store(row, j, SOFTCAP ? e * factor : e);
  }
  out.s += s;
  out.x += x;
  out.q += q;
  out.zs += zs;
}

// The same two steps with explicit vectors, for tiles without a softcap (the usual
// case; tanh has no vector form here, so softcapped tiles take the scalar loops
// above). GCC leaves those loops scalar for bf16 tiles (the conversion on store
// defeats its vectorizer): 0.17 G elements/s on two AVX-512 cores, ~20x below the
// vector exp rate, which made this epilogue as slow as the tile's matmul.
template <typename T>
inline float vec_row_max(const T* row, int64_t n, const Transform& f) {
  const vf vpre = vsplat(f.pre);
  vf m0 = vsplat(kNegInf), m1 = m0;
  int64_t j = 0;
  if (f.bias == nullptr) {
    for (; j + 2 * kLanes <= n; j += 2 * kLanes) {
      m0 = vmax(m0, vload(row + j) * vpre);
      m1 = vmax(m1, vload(row + j + kLanes) * vpre);
    }
  }
  for (; j + kLanes <= n; j += kLanes) {
    vf a = vload(row + j);
    if (f.bias != nullptr) a += vload(f.bias + j);
    m0 = vmax(m0, a * vpre);
  }
  float m_b = hmax(vmax(m0, m1));
  for (; j < n; ++j) {
    const float z = final_logit<false>(row, j, f);
    m_b = z > m_b ? z : m_b;
  }
  return m_b;
}

template <bool STATS, typename T>
inline void vec_exp_store(T* row, int64_t lo, int64_t hi, const Transform& f, float m,
                          Sums& out) {
  const vf vpre = vsplat(f.pre), vm = vsplat(m), zero{};
  vf s{}, x{}, q{}, zs{};
  int64_t j = lo;
  for (; j + kLanes <= hi; j += kLanes) {
    vf a = vload(row + j);
    if (f.bias != nullptr) a += vload(f.bias + j);
    const vf z = a * vpre;
    const vf e = vexp(z - vm);
    s += e;
    if constexpr (STATS) {
      x += (e == zero) ? zero : e * (z - vm);  // z = -inf: exactly 0, not NaN
      q += e * e;
      zs += z;
    }
    vstore(row + j, e);
  }
  Sums tail;
  exp_store<false, STATS>(row, j, hi, f, m, tail);
  out.s += hsum(s) + tail.s;
  out.x += hsum(x) + tail.x;
  out.q += hsum(q) + tail.q;
  out.zs += hsum(zs) + tail.zs;
}

// Row max of the final logits, then exp, store and sums over [lo, hi).
template <bool SOFTCAP, typename T>
inline float row_max(const T* row, int64_t n, const Transform& f) {
  if constexpr (!SOFTCAP) {
    return vec_row_max(row, n, f);
  } else {
    float m_b = kNegInf;
#pragma omp simd reduction(max : m_b)
    for (int64_t j = 0; j < n; ++j) {
      const float z = final_logit<SOFTCAP>(row, j, f);
      m_b = z > m_b ? z : m_b;
    }
    return m_b;
  }
}

template <bool SOFTCAP, bool STATS, typename T>
inline void row_exp_store(T* row, int64_t lo, int64_t hi, const Transform& f, float m,
                          Sums& out) {
  if constexpr (!SOFTCAP) {
    vec_exp_store<STATS>(row, lo, hi, f, m, out);
  } else {
    exp_store<SOFTCAP, STATS>(row, lo, hi, f, m, out);
  }
}

template <bool SOFTCAP, bool STATS, typename T>
void tile_row(T* row, int64_t n, const Transform& f, int64_t y, float* m,
                                 float* s_other, float* s_target, float* target_logit,
                                 float* stat_x, float* stat_q, float* stat_zs,
                                 float* rescale_out) {
  const float m_b = row_max<SOFTCAP>(row, n, f);
  const float z_y = (y >= 0) ? final_logit<SOFTCAP>(row, y, f) : 0.0f;
  const float m_old = *m;
  const float m_new = m_old > m_b ? m_old : m_b;
  // A row still all -inf keeps exp() arguments finite; +inf stays and gives NaN.
  const float m_safe = (m_new == kNegInf) ? 0.0f : m_new;
  const float rescale = exp_approx(m_old - m_safe);
  // The target column is left out of s_other (no cancellation) by splitting the row
  // around it; its stored value is zero.
  Sums sums;
  float e_y = 0.0f;
  if (y >= 0) {
    row_exp_store<SOFTCAP, STATS>(row, 0, y, f, m_safe, sums);
    row_exp_store<SOFTCAP, STATS>(row, y + 1, n, f, m_safe, sums);
    e_y = exp_approx(z_y - m_safe);
    decpo::DECPO_ISA::store(row, y, 0.0f);
    *target_logit = z_y;
  } else {
    row_exp_store<SOFTCAP, STATS>(row, 0, n, f, m_safe, sums);
  }
  if constexpr (STATS) {
    const float s_old = *s_other + *s_target;
    const float shift = s_old > 0.0f ? s_old * (m_old - m_safe) : 0.0f;
    const float x_y = (e_y == 0.0f) ? 0.0f : e_y * (z_y - m_safe);
    *stat_x = rescale * (*stat_x + shift) + sums.x + x_y;
    *stat_q = *stat_q * rescale * rescale + sums.q + e_y * e_y;
    *stat_zs = *stat_zs + sums.zs + (y >= 0 ? z_y : 0.0f);
  }
  *s_other = *s_other * rescale + sums.s;
  *s_target = *s_target * rescale + e_y;
  *m = m_new;
  *rescale_out = rescale;
}

template <bool SOFTCAP, bool STATS, typename T>
void tile(T* tile_data, int64_t n_rows, int64_t n_cols, int64_t row_stride, const Transform& f,
          const int64_t* local_targets, float* m, float* s_other, float* s_target,
          float* target_logit, float* stats, float* rescale) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n_rows; ++i) {
    float* sx = STATS ? stats + i : nullptr;
    float* sq = STATS ? stats + n_rows + i : nullptr;
    float* sz = STATS ? stats + 2 * n_rows + i : nullptr;
    tile_row<SOFTCAP, STATS>(tile_data + i * row_stride, n_cols, f, local_targets[i], m + i,
                             s_other + i, s_target + i, target_logit + i, sx, sq, sz,
                             rescale + i);
  }
}

template <typename T>
void dispatch(T* data, int64_t n_rows, int64_t n_cols, int64_t row_stride, const Transform& f,
              bool softcap, const int64_t* local_targets, float* m, float* s_other,
              float* s_target, float* target_logit, float* stats, float* rescale) {
  const bool with_stats = stats != nullptr;
  if (softcap && with_stats) {
    tile<true, true>(data, n_rows, n_cols, row_stride, f, local_targets, m, s_other, s_target,
                     target_logit, stats, rescale);
  } else if (softcap) {
    tile<true, false>(data, n_rows, n_cols, row_stride, f, local_targets, m, s_other, s_target,
                      target_logit, stats, rescale);
  } else if (with_stats) {
    tile<false, true>(data, n_rows, n_cols, row_stride, f, local_targets, m, s_other, s_target,
                      target_logit, stats, rescale);
  } else {
    tile<false, false>(data, n_rows, n_cols, row_stride, f, local_targets, m, s_other,
                       s_target, target_logit, stats, rescale);
  }
}

}  // namespace

namespace decpo::DECPO_ISA {

// local_targets are checked by the caller (dispatch.cpp).
void softmax_tile(void* tile_data, int dtype, int64_t n_rows, int64_t n_cols, int64_t row_stride,
                  const float* bias, float inv_temperature, float softcap, float logit_scale,
                  const int64_t* local_targets, float* m, float* s_other, float* s_target,
                  float* target_logit, float* stats, float* rescale) {
  const bool has_softcap = softcap > 0.0f;
  Transform f{bias, has_softcap ? logit_scale / softcap : logit_scale * inv_temperature,
              has_softcap ? softcap * inv_temperature : 1.0f};
  if (dtype == 0) {
    dispatch(static_cast<float*>(tile_data), n_rows, n_cols, row_stride, f, has_softcap,
             local_targets, m, s_other, s_target, target_logit, stats, rescale);
  } else {
    dispatch(static_cast<uint16_t*>(tile_data), n_rows, n_cols, row_stride, f, has_softcap,
             local_targets, m, s_other, s_target, target_logit, stats, rescale);
  }
}

// A bf16 weight chunk widened to fp32 for the fp32 tile products (CPUs without a bf16
// dot product), with the head's finiteness check in the same pass: x - x is 0 for
// finite x and NaN for NaN and +-inf, and a sum of them stays 0 only if every element
// is finite. One read of the chunk, one write, against PyTorch's conversion plus a
// separate aminmax pass over the whole head (8-16 ms per call on SSE-class kernels at
// 32000 x 512).
bool widen_bf16(const uint16_t* src, int64_t n_rows, int64_t n_cols, int64_t src_stride,
                float* dst, int64_t dst_stride) {
  bool finite = true;
#pragma omp parallel for schedule(static) reduction(&& : finite)
  for (int64_t i = 0; i < n_rows; ++i) {
    const uint16_t* s = src + i * src_stride;
    float* d = dst + i * dst_stride;
    vf acc = vf{};
    int64_t j = 0;
    for (; j + kLanes <= n_cols; j += kLanes) {
      const vf x = vload(s + j);
      vstore(d + j, x);
      acc += x - x;
    }
    float tail = 0.0f;
    for (; j < n_cols; ++j) {
      d[j] = to_float(s[j]);
      tail += d[j] - d[j];
    }
    finite = finite && (hsum(acc) + tail == 0.0f);
  }
  return finite;
}

}  // namespace decpo::DECPO_ISA
