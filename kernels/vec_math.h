// Small, branch-free helpers that GCC auto-vectorizes inside `#pragma omp simd` loops:
// bf16 <-> fp32 conversion and an exp() accurate to about 1 ulp (Cephes polynomial).
// Built without -ffast-math, so NaN and Inf are handled explicitly here.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__SSE2__)
#include <emmintrin.h>  // SSE2, part of x86-64: the baseline variant's bf16 loads and stores
#endif
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "isa.h"

// Inside the variant's namespace: each variant gets its own copy of these inline
// functions (one shared out-of-line copy would run one variant's instructions in all).
namespace decpo::DECPO_ISA {

// a * b + c, fused where the variant has FMA (one rounding, and half the
// instructions of the exp polynomial below). Contraction is never left to the
// compiler (-ffp-contract=off): the same expression rounds the same way wherever it
// appears in one variant, so exp(x / T - lse) is bitwise the same in forward and backward.
inline float madd(float a, float b, float c) {
#if defined(__FMA__)
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

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
  const float n = madd(xc, 1.44269504088896341f, 12582912.0f) - 12582912.0f;
  float r = madd(n, -0.693359375f, xc);
  r = madd(n, 2.12194440e-4f, r);
  float y = 1.9875691500e-4f;
  y = madd(y, r, 1.3981999507e-3f);
  y = madd(y, r, 8.3334519073e-3f);
  y = madd(y, r, 4.1665795894e-2f);
  y = madd(y, r, 1.6666665459e-1f);
  y = madd(y, r, 5.0000001201e-1f);
  y = madd(y * r, r, r) + 1.0f;
  const float scale = bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  float result = y * scale;
  result = x < kLo ? 0.0f : result;
  result = x > kHi ? std::numeric_limits<float>::infinity() : result;
  return (x != x) ? x : result;
}

// ---- Explicit vectors (GCC vector extensions): the row kernels are written with
// these so that every variant is vectorized at its own width, whatever the
// auto-vectorizer decides (GCC 12 leaves exp_approx's loops scalar for AVX2 and SSE).
// GCC 12 warns about the AVX-512 intrinsics' own _mm512_undefined_ps (a false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX2__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float vf __attribute__((vector_size(kLanes * 4)));
typedef int32_t vi __attribute__((vector_size(kLanes * 4)));
typedef uint32_t vu __attribute__((vector_size(kLanes * 4)));
typedef uint16_t vh __attribute__((vector_size(kLanes * 2)));
typedef float vf_unaligned __attribute__((vector_size(kLanes * 4), aligned(4)));
typedef uint16_t vh_unaligned __attribute__((vector_size(kLanes * 2), aligned(2)));

// x in every lane: one broadcast (vbroadcastss from memory where x is loaded). Not
// vf{} + x, an addition to zero (+0 for x = -0) that the compiler must keep: an extra
// scalar add and register broadcast per splat, 12 of the 26 instructions per K step
// of the AVX2 fp32 register tile. (A lane-by-lane loop compiles to insert chains.)
inline vf vsplat(float x) {
#if defined(__AVX512F__)
  return (vf)_mm512_set1_ps(x);
#elif defined(__AVX2__)
  return (vf)_mm256_set1_ps(x);
#elif defined(__SSE2__)
  return (vf)_mm_set1_ps(x);
#else
  return vf{x, x, x, x};
#endif
}

inline vf vmadd(vf a, vf b, vf c) {
#if defined(__AVX512F__)
  return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
  return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}

inline vf vload(const float* p) { return *reinterpret_cast<const vf_unaligned*>(p); }
// bf16 -> fp32: the 16 bits become the high half of each lane. Written per variant:
// GCC's __builtin_convertvector on these widths splits into halves and re-joins them
// (5 instructions where 2 do).
inline vf vload(const uint16_t* p) {
#if defined(__AVX512F__)
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return (vf)_mm512_slli_epi32(wide, 16);
#elif defined(__AVX2__)
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return (vf)_mm256_slli_epi32(wide, 16);
#elif defined(__SSE2__)  // interleaving zeros below each value puts it in a lane's high half
  const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return (vf)_mm_unpacklo_epi16(_mm_setzero_si128(), h);
#else
  const vh h = *reinterpret_cast<const vh_unaligned*>(p);
  return (vf)(__builtin_convertvector(h, vu) << 16);
#endif
}
inline void vstore(float* p, vf x) { *reinterpret_cast<vf_unaligned*>(p) = x; }
#if !defined(__AVX512BF16__)
// bf16 rounding to nearest even of finite lanes (and +-inf), the result in each
// lane's high half.
inline vu round_high_half(vu bits) { return bits + 0x7FFFu + ((bits >> 16) & 1u); }

// Stores the high halves of the lanes of hi (bf16 values rounded in place): an
// arithmetic shift keeps them in int16 range, so the signed pack of SSE2 / AVX2
// moves the bits unchanged.
inline void store_high_halves(uint16_t* p, vu hi) {
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16((__m512i)(hi >> 16)));
#elif defined(__AVX2__)
  const __m256i v = _mm256_srai_epi32((__m256i)hi, 16);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(v, v), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
#elif defined(__SSE2__)
  const __m128i v = _mm_srai_epi32((__m128i)hi, 16);
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi32(v, v));
#else
  *reinterpret_cast<vh_unaligned*>(p) = __builtin_convertvector(hi >> 16, vh);
#endif
}
#endif

// fp32 -> bf16, round to nearest even, NaN kept quiet (as float_to_bf16).
inline void vstore(uint16_t* p, vf x) {
#if defined(__AVX512BF16__)
  // One instruction; it also flushes fp32 denormals (below 1.2e-38) to zero.
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh((__m512)x));
#else
  // Rounded in place (the result in each lane's high half), a NaN made quiet.
  const vu bits = (vu)x;
  store_high_halves(p, (x != x) ? (bits | 0x00400000u) : round_high_half(bits));
#endif
}

// vstore for lanes known to be finite (or +-inf): the rounding without the NaN test,
// three vector ops fewer per store where the CPU has no bf16 conversion instruction.
inline void vstore_finite(float* p, vf x) { vstore(p, x); }
inline void vstore_finite(uint16_t* p, vf x) {
#if defined(__AVX512BF16__)
  vstore(p, x);
#else
  store_high_halves(p, round_high_half((vu)x));
#endif
}

// Two vectors at a time, for passes that write each element back where it came from:
// vload2 may hand out the 2 kLanes elements in any order, and vstore2_finite puts them
// back in the order vload2 took them. Without a bf16 conversion instruction, zeros
// interleaved below the bf16 values (unpack) widen 2 kLanes of them with 1 load and 2
// shuffles, and the signed pack narrows two rounded vectors with 1 shuffle, inverting
// the unpack's per-128-bit-lane order (against 2 widening loads with shifts and 2 narrowing
// shuffles, plus AVX2's lane permute, one vector at a time).
inline void vload2(const float* p, vf& a, vf& b) {
  a = vload(p);
  b = vload(p + kLanes);
}
inline void vstore2_finite(float* p, vf a, vf b) {
  vstore(p, a);
  vstore(p + kLanes, b);
}
#if defined(__AVX512F__) && !defined(__AVX512BF16__)
inline void vload2(const uint16_t* p, vf& a, vf& b) {
  const __m512i x = _mm512_loadu_si512(p);
  a = (vf)_mm512_unpacklo_epi16(_mm512_setzero_si512(), x);
  b = (vf)_mm512_unpackhi_epi16(_mm512_setzero_si512(), x);
}
#elif defined(__AVX2__) && !defined(__AVX512F__)
inline void vload2(const uint16_t* p, vf& a, vf& b) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  a = (vf)_mm256_unpacklo_epi16(_mm256_setzero_si256(), x);
  b = (vf)_mm256_unpackhi_epi16(_mm256_setzero_si256(), x);
}
#elif defined(__SSE2__) && !defined(__AVX2__)
inline void vload2(const uint16_t* p, vf& a, vf& b) {
  const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  a = (vf)_mm_unpacklo_epi16(_mm_setzero_si128(), x);
  b = (vf)_mm_unpackhi_epi16(_mm_setzero_si128(), x);
}
#else  // a bf16 conversion instruction, or no x86 vectors: one vector at a time
inline void vload2(const uint16_t* p, vf& a, vf& b) {
  a = vload(p);
  b = vload(p + kLanes);
}
#endif
#if defined(__SSE2__) && !defined(__AVX512BF16__)
// Two vectors rounded to nearest even in the high half, arithmetic-shifted into int16
// range and narrowed by one signed pack: 2 kLanes bf16 in vload2's order. kStream:
// stored with a non-temporal store (p aligned to its width) instead of a plain one.
template <bool kStream>
inline void store_bf16_pair(uint16_t* p, vf a, vf b) {
  const vi sa = (vi)round_high_half((vu)a) >> 16;
  const vi sb = (vi)round_high_half((vu)b) >> 16;
#if defined(__AVX512F__)
  const __m512i x = _mm512_packs_epi32((__m512i)sa, (__m512i)sb);
  kStream ? _mm512_stream_si512(reinterpret_cast<__m512i*>(p), x) : _mm512_storeu_si512(p, x);
#elif defined(__AVX2__)
  const __m256i x = _mm256_packs_epi32((__m256i)sa, (__m256i)sb);
  __m256i* q = reinterpret_cast<__m256i*>(p);
  kStream ? _mm256_stream_si256(q, x) : _mm256_storeu_si256(q, x);
#else
  const __m128i x = _mm_packs_epi32((__m128i)sa, (__m128i)sb);
  __m128i* q = reinterpret_cast<__m128i*>(p);
  kStream ? _mm_stream_si128(q, x) : _mm_storeu_si128(q, x);
#endif
}
#endif

inline void vstore2_finite(uint16_t* p, vf a, vf b) {
#if defined(__AVX512BF16__) || !defined(__SSE2__)
  vstore_finite(p, a);
  vstore_finite(p + kLanes, b);
#else
  store_bf16_pair<false>(p, a, b);
#endif
}

// vstore2_finite with non-temporal stores, for a large output written once: the
// lines go to memory without being read first (a plain store reads each line it
// misses, 1.5x the traffic) and without evicting the inputs from the caches. p must
// be aligned to kStreamAlign bytes (one full vector store of fp32, two of bf16).
constexpr int64_t kStreamAlign = kLanes * 4;
inline void vstream2_finite(float* p, vf a, vf b) {
#if defined(__AVX512F__)
  _mm512_stream_ps(p, (__m512)a);
  _mm512_stream_ps(p + kLanes, (__m512)b);
#elif defined(__AVX2__)
  _mm256_stream_ps(p, (__m256)a);
  _mm256_stream_ps(p + kLanes, (__m256)b);
#elif defined(__SSE2__)
  _mm_stream_ps(p, (__m128)a);
  _mm_stream_ps(p + kLanes, (__m128)b);
#else
  vstore2_finite(p, a, b);
#endif
}
inline void vstream2_finite(uint16_t* p, vf a, vf b) {
#if defined(__AVX512BF16__)
  const __m256i lo = (__m256i)_mm512_cvtneps_pbh((__m512)a);
  const __m256i hi = (__m256i)_mm512_cvtneps_pbh((__m512)b);
  _mm512_stream_si512(reinterpret_cast<__m512i*>(p),
                      _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
#elif defined(__SSE2__)
  store_bf16_pair<true>(p, a, b);
#else
  vstore2_finite(p, a, b);
#endif
}
// Orders the streaming stores before anything that follows (another thread's reads).
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Lane-wise max; a NaN in b is not taken (the sums that follow catch it).
inline vf vmax(vf a, vf b) {
#if defined(__AVX512F__)
  return (vf)_mm512_max_ps((__m512)b, (__m512)a);
#else
  return b > a ? b : a;
#endif
}

inline float hmax(vf x) {
  float m = x[0];
  for (int i = 1; i < kLanes; ++i) m = x[i] > m ? x[i] : m;
  return m;
}
inline float hsum(vf x) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += x[i];
  return s;
}

// out[i] = the lane sum of the i-th of four vectors, as a tree: each vector folded in
// halves down to 4 lanes, then a 4 x 4 transpose and three adds. Four hsum chains of
// kLanes dependent adds cost ~4 kLanes add latencies (about 250 cycles at 16 lanes);
// this is a few shuffles and adds deep.
inline void hsum4(vf a, vf b, vf c, vf d, float* out) {
#if defined(__SSE2__)
  const vf in[4] = {a, b, c, d};
  __m128 q[4];
  for (int i = 0; i < 4; ++i) {
#if defined(__AVX512F__)
    const __m512 v = (__m512)in[i];
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    q[i] = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
#elif defined(__AVX2__)
    const __m256 v = (__m256)in[i];
    q[i] = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
#else
    q[i] = (__m128)in[i];
#endif
  }
  _MM_TRANSPOSE4_PS(q[0], q[1], q[2], q[3]);
  _mm_storeu_ps(out, _mm_add_ps(_mm_add_ps(q[0], q[1]), _mm_add_ps(q[2], q[3])));
#else
  out[0] = hsum(a);
  out[1] = hsum(b);
  out[2] = hsum(c);
  out[3] = hsum(d);
#endif
}

// P(r) of the Cephes expf polynomial, exp(r) ~ 1 + r + r^2 P(r) on |r| <= ln2 / 2
// (degree 5, Horner; the same coefficients as exp_approx).
inline vf cephes_p(vf r) {
  vf y = vsplat(1.9875691500e-4f);
  y = vmadd(y, r, vsplat(1.3981999507e-3f));
  y = vmadd(y, r, vsplat(8.3334519073e-3f));
  y = vmadd(y, r, vsplat(4.1665795894e-2f));
  y = vmadd(y, r, vsplat(1.6666665459e-1f));
  return vmadd(y, r, vsplat(5.0000001201e-1f));
}

// exp(x) lane-wise. AVX-512 (14 vector ops, against ~27 for the AVX2 form below,
// which the exp-bound log-softmax passes feel directly): no clamping selects, the
// polynomial folded into 7 FMAs and 2^n applied by vscalefps, with one masked op for
// the underflow. Lanes below -87.33654 (and -inf) give 0, lanes above 88.72 (and +inf)
// +inf, NaN stays NaN. Accuracy about 1 ulp, as exp_approx.
#if defined(__AVX512F__)
inline vf vexp(vf x) {
  const __m512 xv = (__m512)x;
  // Lanes to compute: x >= lo, or NaN (unordered), which then propagates.
  const __mmask16 live = _mm512_cmp_ps_mask(xv, _mm512_set1_ps(-87.33654f), _CMP_NLT_UQ);
  // Clamp from above only (vminps returns its second operand, x, for a NaN x):
  // exp(89) overflows in vscalefps to +inf, as exp(+inf) must.
  const __m512 xc = _mm512_min_ps(_mm512_set1_ps(89.0f), xv);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693359375f), xc);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  // exp(r) = 1 + r (1 + r P(r)).
  const vf vr = (vf)r;
  const vf y = vmadd(vmadd(cephes_p(vr), vr, vsplat(1.0f)), vr, vsplat(1.0f));
  return (vf)_mm512_maskz_scalef_ps(live, (__m512)y, n);
}
#elif defined(__AVX2__) || defined(__SSE2__)
// exp(x) lane-wise on AVX2 and SSE2: exp_approx's clamps and range reduction, with
// the chain of dependent operations cut from ~60 cycles to ~40, because these passes
// are bound by that latency, not by the operation count (the out-of-order window
// holds two or three exps in flight: ~15 cycles per AVX2 vector for ~27 operations).
// The polynomial in Estrin's form (depth 3 against Horner's 6), the clamps as
// max / min, 2^n from the rounded value's low bits, and the special lanes (x < lo
// and -inf: 0, x > hi and +inf: +inf, NaN: NaN) chosen by one select at the end, off
// the chain. About 1 ulp, as exp_approx (the rounding differs from it by Estrin's
// order of operations).
inline vf vexp(vf x) {
#if defined(__AVX2__)
  const __m256 xv = (__m256)x;
  const __m256 lo = _mm256_set1_ps(-87.33654f), hi = _mm256_set1_ps(88.0f);
  // max / min return their second operand, x, for a NaN x: it flows on, replaced below.
  const vf xc = (vf)_mm256_min_ps(hi, _mm256_max_ps(lo, xv));
  const vf special = (vf)_mm256_max_ps(_mm256_setzero_ps(),
                                       _mm256_mul_ps(xv, _mm256_set1_ps(INFINITY)));
  const __m256 outside = _mm256_or_ps(_mm256_cmp_ps(xv, lo, _CMP_NGE_UQ),
                                      _mm256_cmp_ps(xv, hi, _CMP_NLE_UQ));
#else
  const __m128 xv = (__m128)x;
  const __m128 lo = _mm_set1_ps(-87.33654f), hi = _mm_set1_ps(88.0f);
  const vf xc = (vf)_mm_min_ps(hi, _mm_max_ps(lo, xv));
  const vf special = (vf)_mm_max_ps(_mm_setzero_ps(), _mm_mul_ps(xv, _mm_set1_ps(INFINITY)));
  const __m128 outside = _mm_or_ps(_mm_cmpnge_ps(xv, lo), _mm_cmpnle_ps(xv, hi));
#endif
  // t = x log2(e) + 1.5 * 2^23 holds n = round(x log2(e)) in its low mantissa bits.
  const vf t = vmadd(xc, vsplat(1.44269504088896341f), vsplat(12582912.0f));
  const vf n = t - 12582912.0f;
  vf r = vmadd(n, vsplat(-0.693359375f), xc);
  r = vmadd(n, vsplat(2.12194440e-4f), r);
  // P(r) = (p0 r + p1) r^4 + (p2 r + p3) r^2 + (p4 r + p5), cephes_p's coefficients.
  const vf r2 = r * r;
  const vf p01 = vmadd(vsplat(1.9875691500e-4f), r, vsplat(1.3981999507e-3f));
  const vf p23 = vmadd(vsplat(8.3334519073e-3f), r, vsplat(4.1665795894e-2f));
  const vf p45 = vmadd(vsplat(1.6666665459e-1f), r, vsplat(5.0000001201e-1f));
  const vf p = vmadd(vmadd(p01, r2, p23), r2, p45);
  const vf y = vmadd(p * r, r, r) + 1.0f;
  // 2^n: (bits(t) << 23) is n << 23 (t's exponent bits shift out), plus the bias.
  const vf result = y * (vf)(((vu)t << 23) + (127u << 23));
#if defined(__AVX2__)
  return (vf)_mm256_blendv_ps((__m256)result, (__m256)special, outside);
#else
  return (vf)_mm_or_ps(_mm_and_ps(outside, (__m128)special),
                       _mm_andnot_ps(outside, (__m128)result));
#endif
}
#else
// exp_approx, lane-wise, with the same operations (so the same results).
inline vf vexp(vf x) {
  const vf lo = vsplat(-87.33654f), hi = vsplat(88.0f);
  vf xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const vf n = vmadd(xc, vsplat(1.44269504088896341f), vsplat(12582912.0f)) - 12582912.0f;
  vf r = vmadd(n, vsplat(-0.693359375f), xc);
  r = vmadd(n, vsplat(2.12194440e-4f), r);
  const vf y = vmadd(cephes_p(r) * r, r, r) + 1.0f;
  const vi e = __builtin_convertvector(n, vi) + 127;
  vf result = y * (vf)(e << 23);
  result = x < lo ? vsplat(0.0f) : result;
  result = x > hi ? vsplat(std::numeric_limits<float>::infinity()) : result;
  return (x != x) ? x : result;
}
#endif

// exp(x) for results rounded to bf16 next (half a bf16 ulp is 2^-9 = 2e-3 relative):
// about 3e-6 relative error (7e-6 on SSE2, whose n ln2 is a rounded product), from a
// degree-4 minimax polynomial on |r| <= ln2 / 2 and a one-step range reduction, in
// about half the vector ops of vexp (AVX2 15 against ~27, SSE2 ~21 against ~35,
// AVX-512 10 against 14). Lanes below -87.33654 and -inf give 0 (as vexp); x must
// not be NaN or +inf (the callers pass finite arguments or -inf), and x above 88
// gives exp(88) off AVX-512. Rounded to bf16 the result is the correctly rounded
// exp except within that error of a rounding boundary (a few values in 10^4): at
// most half an ulp plus 7e-6, against half an ulp for an exact exp.
inline vf exp_bf16_poly(vf r) {
  // exp(r) ~ 1 + r (c1 + c2 r + c3 r^2 + c4 r^3), Estrin: (1 + c1 r) + r^2 ((c2 + c3 r) + c4 r^2).
  const vf r2 = r * r;
  const vf lo = vmadd(vsplat(0.99996686f), r, vsplat(1.0f));
  const vf hi = vmadd(vsplat(0.0415137f), r2, vmadd(vsplat(0.16787447f), r, vsplat(0.50003016f)));
  return vmadd(hi, r2, lo);
}
#if defined(__AVX512F__)
inline vf vexp_bf16(vf x) {
  const __m512 xv = (__m512)x;
  const __mmask16 live = _mm512_cmp_ps_mask(xv, _mm512_set1_ps(-87.33654f), _CMP_NLT_UQ);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xv, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vf r = (vf)_mm512_fmadd_ps(n, _mm512_set1_ps(-0.693147180559945f), xv);
  return (vf)_mm512_maskz_scalef_ps(live, (__m512)exp_bf16_poly(r), n);
}
#elif defined(__AVX2__) || defined(__SSE2__)
inline vf vexp_bf16(vf x) {
#if defined(__AVX2__)
  const vf xc = (vf)_mm256_min_ps(_mm256_set1_ps(88.0f),
                                  _mm256_max_ps(_mm256_set1_ps(-87.33654f), (__m256)x));
  const vf live = (vf)_mm256_cmp_ps((__m256)x, _mm256_set1_ps(-87.33654f), _CMP_NLT_UQ);
#else
  const vf xc = (vf)_mm_min_ps(_mm_set1_ps(88.0f), _mm_max_ps(_mm_set1_ps(-87.33654f), (__m128)x));
  const vf live = (vf)_mm_cmpnlt_ps((__m128)x, _mm_set1_ps(-87.33654f));
#endif
  // t = x log2(e) + 1.5 * 2^23 holds n = round(x log2(e)) in its low mantissa bits.
  const vf t = vmadd(xc, vsplat(1.44269504088896341f), vsplat(12582912.0f));
  const vf n = t - 12582912.0f;
  const vf r = vmadd(n, vsplat(-0.693147180559945f), xc);
  const vf result = exp_bf16_poly(r) * (vf)(((vu)t << 23) + (127u << 23));
  return (vf)((vu)result & (vu)live);
}
#else
inline vf vexp_bf16(vf x) { return vexp(x); }
#endif

#pragma GCC diagnostic pop

}  // namespace decpo::DECPO_ISA
