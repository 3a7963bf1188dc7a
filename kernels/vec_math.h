// Small, branch-free helpers that GCC auto-vectorizes inside `#pragma omp simd` loops:
// bf16 <-> fp32 conversion and an exp() accurate to about 1 ulp (Cephes polynomial).
// Built without -ffast-math, so NaN and Inf are handled explicitly here.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace decpo {

// Row kernels are compiled for several ISAs; the loader picks the best at run time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DECPO_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define DECPO_MULTIVERSION
#endif

inline float bits_to_float(uint32_t bits) {
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline uint32_t float_to_bits(float value) {
  uint32_t out;
  std::memcpy(&out, &value, sizeof(out));
  return out;
}

inline float to_float(float x) { return x; }
inline float to_float(uint16_t bf16) { return bits_to_float(static_cast<uint32_t>(bf16) << 16); }

// fp32 -> bf16 with round-to-nearest-even; NaN stays a quiet NaN.
inline uint16_t float_to_bf16(float x) {
  const uint32_t bits = float_to_bits(x);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return (x != x) ? static_cast<uint16_t>(0x7FC0u | (bits >> 16)) : static_cast<uint16_t>(rounded);
}

inline void store(float* out, int64_t j, float x) { out[j] = x; }
inline void store(uint16_t* out, int64_t j, float x) { out[j] = float_to_bf16(x); }

// exp(x) for x <= 88 (all callers pass x <= ~0): 0 below -87.3 (and for -inf),
// NaN for NaN. Range reduction x = n ln2 + r, |r| <= ln2 / 2, then a degree-6
// polynomial for exp(r) and 2^n through the exponent bits.
inline float exp_approx(float x) {
  constexpr float kLo = -87.33654f;
  constexpr float kHi = 88.0f;
  const float xc = x < kLo ? kLo : (x > kHi ? kHi : x);
  // Round to nearest through the 1.5 * 2^23 trick: plain adds, so the loop vectorizes.
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const float scale = bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  float result = y * scale;
  result = x < kLo ? 0.0f : result;
  result = x > kHi ? std::numeric_limits<float>::infinity() : result;
  return (x != x) ? x : result;
}

}  // namespace decpo
