// Fused epilogue of one (rows x vocabulary chunk) logit tile for token_logprobs on CPU.
//
// PyTorch's bf16 matmul produces the tile T = h W_chunk^T (R, Vc); this pass turns it,
// in place, into the unnormalized probabilities that the second matmul p @ W_chunk
// needs (DESIGN section 1, frozen head), and folds the tile into each row's running
// online-softmax state:
//   x_v = (T_v + b_v) / temperature
//   m'  = max(m, max_v x_v),       rescale = exp(m - m')
//   p_v = exp(x_v - m') for v != y, 0 at the target column y
//   s_other'  = s_other * rescale + sum_{v != y} p_v
//   s_target' = s_target * rescale + exp(x_y - m')      (if y is in this chunk)
//   target_logit = x_y                                   (if y is in this chunk)
// Two passes over each row while it sits in L1/L2 (max, then exp and store), instead
// of the ~8 full-tile passes of the same steps written with torch ops. The target's
// own probability is kept out of p so that W_y - E = (s_other W_y - p W) / s never
// subtracts two nearly equal low-precision vectors.
#include <cmath>
#include <limits>

#include "decpo_native.h"
#include "vec_math.h"

namespace {

using decpo::exp_approx;
using decpo::to_float;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// p_j = exp(x_j - m) stored over row[lo, hi), returning their sum.
template <typename T>
inline float exp_store(T* row, int64_t lo, int64_t hi, const float* bias, float inv_t,
                       float m) {
  float sum = 0.0f;
  if (bias != nullptr) {
#pragma omp simd reduction(+ : sum)
    for (int64_t j = lo; j < hi; ++j) {
      const float p = exp_approx((to_float(row[j]) + bias[j]) * inv_t - m);
      sum += p;
      decpo::store(row, j, p);
    }
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t j = lo; j < hi; ++j) {
      const float p = exp_approx(to_float(row[j]) * inv_t - m);
      sum += p;
      decpo::store(row, j, p);
    }
  }
  return sum;
}

template <typename T>
DECPO_MULTIVERSION void tile_row(T* row, int64_t n, const float* bias, float inv_t, int64_t y,
                                 float* m, float* s_other, float* s_target, float* target_logit,
                                 float* rescale_out) {
  float m_b = kNegInf;
  if (bias != nullptr) {
#pragma omp simd reduction(max : m_b)
    for (int64_t j = 0; j < n; ++j) {
      const float x = (to_float(row[j]) + bias[j]) * inv_t;
      m_b = x > m_b ? x : m_b;
    }
  } else {
#pragma omp simd reduction(max : m_b)
    for (int64_t j = 0; j < n; ++j) {
      const float x = to_float(row[j]) * inv_t;
      m_b = x > m_b ? x : m_b;
    }
  }
  const float x_y =
      (y >= 0) ? (to_float(row[y]) + (bias != nullptr ? bias[y] : 0.0f)) * inv_t : 0.0f;
  const float m_new = *m > m_b ? *m : m_b;
  // A row still all -inf keeps exp() arguments finite; +inf stays and gives NaN.
  const float m_safe = (m_new == kNegInf) ? 0.0f : m_new;
  const float rescale = exp_approx(*m - m_safe);
  // The target column is left out of the sum (so s_other has no cancellation) by
  // splitting the row around it, and its stored probability is zero.
  float s_b;
  float p_y = 0.0f;
  if (y >= 0) {
    s_b = exp_store(row, 0, y, bias, inv_t, m_safe) + exp_store(row, y + 1, n, bias, inv_t, m_safe);
    p_y = exp_approx(x_y - m_safe);
    decpo::store(row, y, 0.0f);
    *target_logit = x_y;
  } else {
    s_b = exp_store(row, 0, n, bias, inv_t, m_safe);
  }
  *s_other = *s_other * rescale + s_b;
  *s_target = *s_target * rescale + p_y;
  *m = m_new;
  *rescale_out = rescale;
}

template <typename T>
void tile(T* tile_data, int64_t n_rows, int64_t n_cols, int64_t row_stride, const float* bias,
          float inv_t, const int64_t* local_targets, float* m, float* s_other, float* s_target,
          float* target_logit, float* rescale) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n_rows; ++i) {
    tile_row(tile_data + i * row_stride, n_cols, bias, inv_t, local_targets[i], m + i,
             s_other + i, s_target + i, target_logit + i, rescale + i);
  }
}

}  // namespace

DECPO_API int decpo_online_softmax_tile(void* tile_data, int dtype, int64_t n_rows,
                                        int64_t n_cols, int64_t row_stride, const float* bias,
                                        float inv_temperature, const int64_t* local_targets,
                                        float* m, float* s_other, float* s_target,
                                        float* target_logit, float* rescale) {
  for (int64_t i = 0; i < n_rows; ++i) {
    if (local_targets[i] >= n_cols) return 2;
  }
  if (dtype == 0) {
    tile(static_cast<float*>(tile_data), n_rows, n_cols, row_stride, bias, inv_temperature,
         local_targets, m, s_other, s_target, target_logit, rescale);
  } else if (dtype == 1) {
    tile(static_cast<uint16_t*>(tile_data), n_rows, n_cols, row_stride, bias, inv_temperature,
         local_targets, m, s_other, s_target, target_logit, rescale);
  } else {
    return 1;
  }
  return 0;
}
