// Decorrelation penalty on CPU: loss and gradient of every (layer, group) in one call.
//
// Per group of n selected rows of one layer, Z (n, D) (rows scaled to unit norm
// when normalize), the penalty is P = sum over counted pairs (G_ij - delta_ij)^2 with
// G = Z Z^T, and dP/dz_i = 4 sum_j E_ij z_j with E = G - I (diagonal zeroed for
// offdiag). Two exact paths, as in the torch backend, the cheaper per group:
//
// - Gram, n <= D (gram_direct): R = H H^T on the raw rows (upper tiles only: n^2 D
//   multiply-adds), G = R / (d_i d_j), E in place, then the gradient as one product
//   dh = M H (n^2 D) with the normalization's backward folded into the n x n M. No
//   normalized copy of the rows; the (n, n) matrices are no larger than H. Contiguous
//   rows are read in place; groups of <= 256 rows compute dh = M H in one fused pass
//   (skinny_grad) that writes dh from the register tiles.
// - Covariance, n > D: C = Z^T Z (upper tiles: n D^2), then Y = Z (C - cI) + c Z
//   (n D^2) with c = tr C / D; only (D, D) is held, never (n, n), and
//   P = ||C - cI||_F^2 + (s - D)^2 / D + (n - D) (full) or
//   P = ||C - cI||_F^2 + s^2 / D - sum ||z_i||^4 (offdiag), s = sum ||z_i||^2, a sum of
//   non-negative terms for the full penalty (nothing cancels when n is close to D).
//
// Total 3 n D min(n, D) FLOPs per group, against n D reads and n D writes: at
// D = 4096, n = 512 that is 3.2 GFLOP for 8 MB (bf16), about 400 FLOP per byte, so
// every path is bound by the multiply-add rate, never by memory. On the covariance
// path the rows are read and normalized once into one buffer reused by both products
// and the epilogue; the gradient's epilogue (the normalization's backward, through
// z = h / max(||h||, eps): dh = (y - b z) 4 scale / max(||h||, eps) with
// b = a + [||h|| > eps] (y . z - a ||z||^2), a = 1, ||z||^2 for offdiag) runs on each
// row of Y while it is in cache, and writes dh in the input dtype.
//
// Products: register-tiled GEMMs Y (MR x NR tiles) += A B with A's scalars broadcast
// and B's rows loaded as vectors, over K blocks of KC that keep B's panel in L2.
// bf16 input on a CPU with AVX512_BF16 (the avx512bf16 variant): operands rounded to
// bf16 and multiplied with vdpbf16ps (32 multiply-adds per instruction, fp32
// accumulation; pairs along K interleaved, the layout the instruction reads), E and
// C - cI (and M) rounded only after the identity is subtracted in fp32. Everything
// else: fp32 FMAs on fp32 operands (bf16 input converted as the rows are copied).
//
// Parallelism: OpenMP across (layer, group) units when there are enough to share
// evenly between the threads, otherwise across the output tiles of each product.
// Either way each output element is summed by one thread in a fixed order: the
// results are bitwise the same run to run.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#include "isa.h"
#include "vec_math.h"

namespace decpo::DECPO_ISA {
namespace {

constexpr float kEps = 1e-6f;  // the clamp of the row norm, as in every backend

#if defined(__AVX512F__)
constexpr int W = 16;  // fp32 lanes
constexpr int MR = 6;  // rows of A per register tile (broadcast)
constexpr int NV = 4;  // vectors of B per register tile: 24 accumulators of 32 registers
#elif defined(__AVX2__)
constexpr int W = 8;
constexpr int MR = 6;
constexpr int NV = 2;  // 12 accumulators of 16 registers
#else
constexpr int W = 4;
constexpr int MR = 4;
constexpr int NV = 2;  // SSE: 8 accumulators of 16 registers
#endif
constexpr int NR = W * NV;  // columns per register tile
constexpr int64_t KC = 256;  // K block: an MR x KC panel of A stays in L1
constexpr int64_t NC = 1024;  // column block: B's KC x NC panel stays in L2

#if defined(__AVX512BF16__)
constexpr bool kBf16Dot = true;
#else
constexpr bool kBf16Dot = false;
#endif

static_assert(W == kLanes, "the register tiles use vec_math.h's vectors");

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Y[MR x NR] (+)= A[MR x kc] B[kc x NR], fp32.
void micro_f32(const float* a, int64_t lda, const float* b, int64_t ldb, float* y, int64_t ldy,
               int64_t kc, bool accumulate) {
  vf acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? vload(y + r * ldy + v * W) : vf{};
  }
  for (int64_t k = 0; k < kc; ++k) {
    vf bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = vload(b + k * ldb + v * W);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const vf av = vsplat(a[r * lda + k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = vmadd(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) vstore(y + r * ldy + v * W, acc[r][v]);
  }
}

#if defined(__AVX512BF16__)
// Y[MR x NR] (+)= A B over kc pairs along K: a and b hold bf16 pairs (k even in the
// low half, k + 1 in the high half) as uint32; vdpbf16ps adds both products per lane.
void micro_bf16(const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb, float* y,
                int64_t ldy, int64_t kc, bool accumulate) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = accumulate ? _mm512_loadu_ps(y + r * ldy + v * W) : _mm512_setzero_ps();
    }
  }
  for (int64_t p = 0; p < kc; ++p) {
    __m512i bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_si512(b + p * ldb + v * W);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512i av = _mm512_set1_epi32(static_cast<int>(a[r * lda + p]));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)av, (__m512bh)bv[v]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(y + r * ldy + v * W, acc[r][v]);
  }
}
#endif

// Y (m x n) = A (m x k) B (k x n), fp32 out; m a multiple of MR, n of NR, k >= 1 (in
// units of T: floats, or bf16 pairs). upper: only tiles touching j >= i (Y symmetric;
// the caller mirrors). Each KC x NC block of B is first packed into NR-wide column
// panels (KC rows of NR contiguous values each): the register tile then streams one
// contiguous panel instead of KC rows a whole row stride apart, one page each when
// rows are long (a TLB miss per row at D = 4096).
template <typename T>
void gemm(const T* a, int64_t lda, const T* b, int64_t ldb, float* y, int64_t ldy, int64_t m,
          int64_t n, int64_t k, bool upper, bool parallel) {
  static thread_local T* packed = nullptr;  // this thread's panel buffer, kept
  static thread_local int64_t packed_count = 0;
  const int64_t need = KC * NC;
  if (packed_count < need) {
    std::free(packed);
    packed = static_cast<T*>(std::aligned_alloc(64, sizeof(T) * need));
    packed_count = packed != nullptr ? need : 0;
  }
  T* const panels = packed;
  for (int64_t jc = 0; jc < n; jc += NC) {
    const int64_t nc = (n - jc < NC) ? (n - jc) : NC;
    const int64_t col_tiles = nc / NR;
    const int64_t tiles = (m / MR) * col_tiles;
    for (int64_t pc = 0; pc < k; pc += KC) {
      const int64_t kc = (k - pc < KC) ? (k - pc) : KC;
      if (panels != nullptr) {
#pragma omp parallel for schedule(static) if (parallel)
        for (int64_t ct = 0; ct < col_tiles; ++ct) {
          for (int64_t q = 0; q < kc; ++q) {
            std::memcpy(panels + (ct * kc + q) * NR, b + (pc + q) * ldb + jc + ct * NR,
                        sizeof(T) * NR);
          }
        }
      }
#pragma omp parallel for schedule(dynamic, 4) if (parallel)
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t ir = (t / col_tiles) * MR;
        const int64_t ct = t % col_tiles;
        const int64_t jr = jc + ct * NR;
        if (upper && jr + NR <= ir) continue;
        // Unpacked B (no memory for the panels): the same product, strided.
        const T* bp = panels != nullptr ? panels + ct * kc * NR : b + pc * ldb + jr;
        const int64_t ldbp = panels != nullptr ? NR : ldb;
        if constexpr (std::is_same_v<T, float>) {
          micro_f32(a + ir * lda + pc, lda, bp, ldbp, y + ir * ldy + jr, ldy, kc, pc > 0);
        } else {
#if defined(__AVX512BF16__)
          micro_bf16(a + ir * lda + pc, lda, bp, ldbp, y + ir * ldy + jr, ldy, kc, pc > 0);
#endif
        }
      }
    }
  }
}

// The Gram product as dot products: G[i][j] = sum_k a[i][k] a[j][k] over rows of one
// row-major operand, no transposed copy. A 4 x 4 register tile holds 16 vector
// accumulators (8 loads per 16 multiply-adds), reduced across lanes once per K block
// of KCD elements (four rows of each operand stay in L1) by hsum4's shuffle tree; with
// one chain of adds per accumulator that reduction took about as long as the block's
// own vdpbf16ps (kernel 8 x 64 x 14336 with the tree: 0.94-0.97x the time on
// avx512bf16, 0.90-0.97x on avx512). Only tiles on and above
// the diagonal are computed (the caller mirrors). m: rows (a multiple of 4); k: a
// multiple of the vector width (the padding is zero).
constexpr int64_t KCD = 2048;
#if defined(__AVX512F__)
constexpr int TR = 4;  // 16 accumulators + 8 operands of 32 registers
#else
constexpr int TR = 2;  // 8 accumulators + 6 operands of 16 registers (4 x 4 would spill)
#endif
constexpr int TC = 4;

template <typename T>
inline vf dot_step(vf acc, const T* x, const T* y);

template <>
inline vf dot_step<float>(vf acc, const float* x, const float* y) {
  return vmadd(vload(x), vload(y), acc);
}

// bf16 rows on fp32 FMAs (no bf16 dot product): widened as they are loaded, exactly.
template <>
inline vf dot_step<uint16_t>(vf acc, const uint16_t* x, const uint16_t* y) {
  return vmadd(vload(x), vload(y), acc);
}

#if defined(__AVX512BF16__)
template <>
inline vf dot_step<uint32_t>(vf acc, const uint32_t* x, const uint32_t* y) {
  return (vf)_mm512_dpbf16_ps((__m512)acc, (__m512bh)_mm512_loadu_si512(x),
                              (__m512bh)_mm512_loadu_si512(y));
}
#endif

template <typename T>
void gram_nt(const T* a, int64_t lda, float* g, int64_t ldg, int64_t m, int64_t k, bool parallel) {
  // Square blocks of 4 rows; each is TR x TC register tiles (TR = 2: two of them).
  const int64_t tiles = m / 4;
  const int64_t pairs = tiles * (tiles + 1) / 2;
  for (int64_t pc = 0; pc < k; pc += KCD) {
    const int64_t kc = (k - pc < KCD) ? (k - pc) : KCD;
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
    for (int64_t t = 0; t < pairs; ++t) {
      int64_t ti = 0, rest = t;  // t -> (ti, tj) with tj >= ti
      while (rest >= tiles - ti) rest -= tiles - ti++;
      const int64_t tj = ti + rest;
      for (int half = 0; half < 4 / TR; ++half) {
        const int64_t row0 = 4 * ti + half * TR;
        const T* ra = a + row0 * lda + pc;
        const T* rb = a + 4 * tj * lda + pc;
        vf acc[TR][TC];
#pragma GCC unroll 4
        for (int r = 0; r < TR; ++r) {
#pragma GCC unroll 4
          for (int c = 0; c < TC; ++c) acc[r][c] = vf{};
        }
        for (int64_t q = 0; q < kc; q += W) {
#pragma GCC unroll 4
          for (int r = 0; r < TR; ++r) {
#pragma GCC unroll 4
            for (int c = 0; c < TC; ++c) {
              acc[r][c] = dot_step<T>(acc[r][c], ra + r * lda + q, rb + c * lda + q);
            }
          }
        }
        static_assert(TC == 4, "one hsum4 per row of the register tile");
        for (int r = 0; r < TR; ++r) {
          float sums[TC];
          hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3], sums);
          float* out = g + (row0 + r) * ldg + 4 * tj;
          for (int c = 0; c < TC; ++c) out[c] = pc == 0 ? sums[c] : out[c] + sums[c];
        }
      }
    }
  }
}

// Copies the upper triangle of the leading (n x n) block of y into the lower one.
void mirror(float* y, int64_t ldy, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < i; ++j) y[i * ldy + j] = y[j * ldy + i];
  }
}

inline uint32_t bf16_pair(float lo, float hi) {
  return static_cast<uint32_t>(float_to_bf16(lo)) | (static_cast<uint32_t>(float_to_bf16(hi)) << 16);
}

// out[p][j] = (x[2p][j], x[2p + 1][j]) as bf16 pairs for p < pairs, j < cols; rows
// past `rows` read as 0. x: fp32 with row stride ldx; out: row stride ldo.
void pack_pairs(const float* x, int64_t ldx, int64_t rows, int64_t cols, uint32_t* out,
                int64_t ldo, int64_t pairs, bool parallel) {
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t p = 0; p < pairs; ++p) {
    const float* lo = x + 2 * p * ldx;
    const float* hi = lo + ldx;
    const bool has_hi = 2 * p + 1 < rows;
    uint32_t* o = out + p * ldo;
    for (int64_t j = 0; j < cols; ++j) o[j] = bf16_pair(lo[j], has_hi ? hi[j] : 0.0f);
  }
}

// out[j][i] = x[i][j] for i < rows, j < cols (uint32 or float), blocked for the caches.
template <typename T>
void transpose(const T* x, int64_t ldx, int64_t rows, int64_t cols, T* out, int64_t ldo,
               bool parallel) {
  constexpr int64_t B = 32;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t jb = 0; jb < cols; jb += B) {
    for (int64_t ib = 0; ib < rows; ib += B) {
      const int64_t i_end = (ib + B < rows) ? ib + B : rows;
      const int64_t j_end = (jb + B < cols) ? jb + B : cols;
      for (int64_t j = jb; j < j_end; ++j) {
        for (int64_t i = ib; i < i_end; ++i) out[j * ldo + i] = x[i * ldx + j];
      }
    }
  }
}

// Per-thread workspace, kept between calls: buffer k of a unit reuses slot k when it
// is large enough, so a training loop calling the op with the same shapes allocates
// (and page-faults in) its buffers once, not on every call (fresh multi-MB buffers
// cost as much as the products at small n). Contents are not zeroed: every reader
// reads only what was written (the padding that matters is zeroed where it is made).
// Buffers above kKeepBytes are released after the unit: a one-off huge group does not
// pin its workspace for the life of the thread.
// malloc, not std containers: their inline copies would be shared between variants.
struct Scratch {
  static constexpr int kSlots = 12;  // at most 9 buffers per unit
  static constexpr size_t kKeepBytes = size_t{64} << 20;
  struct Slot {
    void* ptr;
    size_t bytes;
  };
  static Slot* slots() {
    static thread_local Slot cache[kSlots];
    return cache;
  }
  int used = 0;
  bool failed = false;
  template <typename T>
  T* take(int64_t count) {
    const size_t bytes = static_cast<size_t>(count > 0 ? count : 1) * sizeof(T);
    Slot& slot = slots()[used++];
    if (slot.bytes < bytes) {
      std::free(slot.ptr);
      slot.ptr = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
      slot.bytes = slot.ptr != nullptr ? bytes : 0;
      if (slot.ptr == nullptr) failed = true;
    }
    return static_cast<T*>(slot.ptr);
  }
  ~Scratch() {
    for (int i = 0; i < used; ++i) {
      Slot& slot = slots()[i];
      if (slot.bytes > kKeepBytes) {
        std::free(slot.ptr);
        slot = Slot{nullptr, 0};
      }
    }
  }
};

struct Unit {
  int64_t n, dim;
  bool normalize, offdiag;
  float grad_scale;
  bool parallel;
};

template <typename T>
inline float load_elem(const T* p, int64_t j) {
  return to_float(p[j]);
}

// Rows of one group into z (fp32, row stride ldz, zero padding past dim): normalized
// when asked; denom = max(||h||, eps) (1 without normalize), sq = ||z||^2.
template <typename T>
void load_rows(const T* h, int64_t row_stride, const int64_t* rows, int64_t first, const Unit& u,
               float* z, int64_t ldz, float* denom, float* sq) {
#pragma omp parallel for schedule(static) if (u.parallel)
  for (int64_t i = 0; i < u.n; ++i) {
    const T* src = h + (rows != nullptr ? rows[i] : first + i) * row_stride;
    float* zi = z + i * ldz;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < u.dim; ++j) {
      const float x = load_elem(src, j);
      zi[j] = x;
      ss += x * x;
    }
    float d = 1.0f;
    if (u.normalize) {
      d = std::sqrt(ss);
      d = d > kEps ? d : kEps;
      float s2 = 0.0f;
#pragma omp simd reduction(+ : s2)
      for (int64_t j = 0; j < u.dim; ++j) {
        zi[j] = zi[j] / d;
        s2 += zi[j] * zi[j];
      }
      ss = s2;
    }
    for (int64_t j = u.dim; j < ldz; ++j) zi[j] = 0.0f;  // padding: read as K by the products
    denom[i] = d;
    sq[i] = ss;
  }
}

// dh_i = (y_i - b z_i) 4 scale / denom_i with b = a_i + [denom > eps] (y . z - a_i ||z||^2)
// (b = a_i without normalize), written to out rows in T. y = Y + c z first.
template <typename T>
void epilogue(const float* y, int64_t ldy, const float* z, int64_t ldz, const float* denom,
              const float* sq, float c, bool a_is_sq, const Unit& u,
              const int64_t* rows, int64_t first, T* grad) {
#pragma omp parallel for schedule(static) if (u.parallel)
  for (int64_t i = 0; i < u.n; ++i) {
    const float* yi = y + i * ldy;
    const float* zi = z + i * ldz;
    T* out = grad + (rows != nullptr ? rows[i] : first + i) * u.dim;
    const float a = a_is_sq ? sq[i] : 1.0f;
    float b = a;
    if (u.normalize) {
      float yz = 0.0f;
#pragma omp simd reduction(+ : yz)
      for (int64_t j = 0; j < u.dim; ++j) yz += (yi[j] + c * zi[j]) * zi[j];
      if (denom[i] > kEps) b = a + (yz - a * sq[i]);
    }
    const float scale = 4.0f * u.grad_scale / denom[i];
#pragma omp simd
    for (int64_t j = 0; j < u.dim; ++j) {
      store(out, j, ((yi[j] + c * zi[j]) - b * zi[j]) * scale);
    }
  }
}

// dh = M H for a group of n <= kSkinnyRows rows, fused: per block of NR output
// columns, the block's n x NR slice of the input rows is laid out once in an L1/L2
// panel (bf16 pairs along K for vdpbf16ps, else fp32), every MR-row register tile of
// M is multiplied against it, and the accumulators are written straight to dh in the
// input dtype. With n small against D the product is n^2 D multiply-adds for 2 n D
// bytes moved; the generic gemm() path around it (interleave the rows into an n x D
// operand, pack its panels, an fp32 n x D product buffer, a conversion pass) moved
// about 8 n D bytes more, which at n = 64, D = 14336 cost more than the products.
// m_rows: M, n x n in fp32 with row stride ldm (read up to column n).
constexpr int64_t kSkinnyRows = 256;

template <typename T, typename Src>
void skinny_grad(const float* m_rows, int64_t ldm, const Unit& u, Src src, const int64_t* rows,
                 int64_t first, T* grad, Scratch& s) {
  const int64_t n = u.n, dim = u.dim;
  constexpr bool bf16_dot = kBf16Dot && std::is_same_v<T, uint16_t>;
  using Op = std::conditional_t<bf16_dot, uint32_t, float>;
  const int64_t k = bf16_dot ? (n + 1) / 2 : n;  // K in operand units (bf16 pairs or floats)
  const int64_t mp = round_up(n, MR);
  // A = M in the operand type, zero rows past n: (mp, k).
  Op* a = s.take<Op>(mp * k);
  if (s.failed) return;
  for (int64_t i = 0; i < mp; ++i) {
    for (int64_t q = 0; q < k; ++q) {
      if constexpr (bf16_dot) {
        const float lo = i < n ? m_rows[i * ldm + 2 * q] : 0.0f;
        const float hi = i < n && 2 * q + 1 < n ? m_rows[i * ldm + 2 * q + 1] : 0.0f;
        a[i * k + q] = bf16_pair(lo, hi);
      } else {
        a[i * k + q] = i < n ? m_rows[i * ldm + q] : 0.0f;
      }
    }
  }
  // Panels of PC columns (NR-wide column tiles, each k x NR): each input row is read
  // in runs of PC elements, which the prefetcher follows (64 rows read NR elements at a
  // time, 4 KiB apart at D = 14336, stalled on every load); k x PC operands <= 128 KiB.
  const int64_t pc_cols = std::max<int64_t>(NR, std::min<int64_t>(512, 32768 / k / NR * NR));
  const int64_t blocks = (dim + pc_cols - 1) / pc_cols;
  bool no_memory = false;
#pragma omp parallel if (u.parallel)
  {
    static thread_local Op* panel = nullptr;  // this thread's (PC / NR, k, NR) panels, kept
    static thread_local int64_t panel_count = 0;
    if (panel_count < k * pc_cols) {
      std::free(panel);
      panel = static_cast<Op*>(std::aligned_alloc(64, sizeof(Op) * k * pc_cols));
      panel_count = panel != nullptr ? k * pc_cols : 0;
    }
    if (panel == nullptr) {
#pragma omp atomic write
      no_memory = true;
    }
    alignas(64) float tile[MR * NR];  // one register tile of dh in fp32
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      if (panel == nullptr) continue;
      const int64_t j0 = blk * pc_cols;
      const int64_t width = dim - j0 < pc_cols ? dim - j0 : pc_cols;
      const int64_t col_tiles = (width + NR - 1) / NR;
      for (int64_t q = 0; q < k; ++q) {
        if constexpr (bf16_dot) {  // (row 2q, row 2q + 1) pairs
          const uint16_t* lo = reinterpret_cast<const uint16_t*>(src(2 * q)) + j0;
          const uint16_t* hi =
              2 * q + 1 < n ? reinterpret_cast<const uint16_t*>(src(2 * q + 1)) + j0 : nullptr;
          for (int64_t ct = 0; ct < col_tiles; ++ct) {
            Op* pq = panel + (ct * k + q) * NR;
            int64_t j = ct * NR;
            const int64_t end = std::min(width, j + NR);
            for (; j + W <= end; j += W) {  // vload puts each bf16 in its lane's high half
              const vu low = (vu)vload(lo + j) >> 16;
              const vu both = hi != nullptr ? (low | (vu)vload(hi + j)) : low;
              vstore(reinterpret_cast<float*>(pq + j - ct * NR), (vf)both);
            }
            for (; j < end; ++j) {
              pq[j - ct * NR] = lo[j] | (hi != nullptr ? static_cast<uint32_t>(hi[j]) << 16 : 0u);
            }
            for (; j < (ct + 1) * NR; ++j) pq[j - ct * NR] = 0u;
          }
        } else {
          const T* row = src(q) + j0;
          for (int64_t ct = 0; ct < col_tiles; ++ct) {
            Op* pq = panel + (ct * k + q) * NR;
            int64_t j = ct * NR;
            const int64_t end = std::min(width, j + NR);
            for (; j + W <= end; j += W) vstore(pq + j - ct * NR, vload(row + j));
            for (; j < end; ++j) pq[j - ct * NR] = to_float(row[j]);
            for (; j < (ct + 1) * NR; ++j) pq[j - ct * NR] = 0.0f;
          }
        }
      }
      for (int64_t ct = 0; ct < col_tiles; ++ct) {
        const int64_t c0 = ct * NR;  // within the panel
        const int64_t cw = std::min<int64_t>(NR, width - c0);
        for (int64_t ir = 0; ir < mp; ir += MR) {
          if constexpr (bf16_dot) {
#if defined(__AVX512BF16__)
            micro_bf16(a + ir * k, k, panel + ct * k * NR, NR, tile, NR, k, false);
#endif
          } else {
            micro_f32(a + ir * k, k, panel + ct * k * NR, NR, tile, NR, k, false);
          }
          for (int r = 0; r < MR && ir + r < n; ++r) {
            const int64_t i = ir + r;
            T* out = grad + (rows != nullptr ? rows[i] : first + i) * dim + j0 + c0;
            const float* yr = tile + r * NR;
            int64_t j = 0;
            for (; j + W <= cw; j += W) vstore(out + j, vload(yr + j));
            for (; j < cw; ++j) store(out, j, yr[j]);
          }
        }
      }
    }
  }
  if (no_memory) s.failed = true;
}

// The Gram path (n <= D) straight from the input rows, without a normalized copy:
// R = H H^T on the raw rows (bf16 pairs for vdpbf16ps, else fp32), d_i = max(||h_i||,
// eps) = max(sqrt(R_ii), eps) (1 without normalize), G_ij = R_ij / (d_i d_j), E = G - I.
// The gradient dh_i = (y_i - b_i z_i) 4 scale / d_i with y = E Z, z_j = h_j / d_j and
// b_i = [d_i > eps] y_i . z_i = [d_i > eps] (E G)_ii is one product dh = M H with
//   M_ij = (4 scale / d_i) (E_ij / d_j - [i = j] b_i / d_i),
// an n x n matrix formed in fp32 (the projection's subtraction happens there, before
// any rounding). Memory passes per group, for n <= 256 contiguous rows: the rows are
// read once by each product and dh written once (skinny_grad), against about eight
// passes over an fp32 (n x D) copy on an earlier path through Z (normalize, pack,
// Y = E Z, epilogue), which dominated at small n and large D. Measured, bf16 on
// avx512bf16, 8 layers x 64 rows, D = 14336, 2 cores, kernel only: 5.9 ms against
// 7.0 ms with a row copy and the generic gemm() for dh = M H, and 3.6 ms of products
// at PyTorch's best bf16 matmul rate.
template <typename T>
double gram_direct(const T* h, int64_t row_stride, const int64_t* rows, int64_t first,
                   const Unit& u, T* grad, bool* failed) {
  const int64_t n = u.n, dim = u.dim;
  constexpr bool bf16_dot = kBf16Dot && std::is_same_v<T, uint16_t>;
  const int64_t dp = round_up(dim, NR);  // padded columns (even)
  const int64_t gm = round_up(n, 4), mp = round_up(n, MR), np = round_up(n, NR);
  const int64_t op_rows = round_up(n, 12) + 1;  // whole 4 x 4 and MR tiles, as z elsewhere
  auto src = [&](int64_t i) { return h + (rows != nullptr ? rows[i] : first + i) * row_stride; };
  Scratch s;
  float* g = s.take<float>(np * np);
  float* d = s.take<float>(n);
  if (s.failed) return *failed = true, 0.0;
  // The rows in the Gram product's operand layout, zero padded (rows to op_rows,
  // columns to dp): bf16 as they are (pairs along D), or fp32. Rows that already are
  // that layout (contiguous, whole 4-row tiles, no column padding) are read in place,
  // one pass over the group less: fp32 rows, bf16 rows as vdpbf16ps pairs, and bf16
  // rows without a bf16 dot product widened inside the product, as long as skinny_grad
  // (which reads the input itself) makes the gradient: the generic product below
  // takes fp32 rows. Kernel only, bf16 8 x 64 x 14336: avx512 9.1 -> 8.5 ms, avx2 13.1
  // -> 12.0 ms against the fp32 copy.
  using Op = std::conditional_t<bf16_dot, uint32_t, float>;
  // Not on 4-lane SSE: there each widened load is a shuffle on the pipes the multiplies
  // and adds use (6 per 16 of them in the 2 x 4 tile), where a widening copy first is
  // one pass over the group.
  constexpr bool widen_in_gram = !bf16_dot && std::is_same_v<T, uint16_t> && W > 4;
  const bool contiguous = rows == nullptr && n % 4 == 0 && dim == dp;
  const bool in_place =
      contiguous && (bf16_dot ? row_stride % 2 == 0
                              : std::is_same_v<T, float> || (widen_in_gram && n <= kSkinnyRows));
  const Op* x = reinterpret_cast<const Op*>(src(0));
  int64_t ldx = bf16_dot ? row_stride / 2 : row_stride;  // in operand units
  if (!in_place) {
    ldx = bf16_dot ? dp / 2 + 16 : dp + 16;
    Op* copy = s.take<Op>(op_rows * ldx);
    if (s.failed) return *failed = true, 0.0;
    x = copy;
#pragma omp parallel for schedule(static) if (u.parallel)
    for (int64_t i = 0; i < op_rows; ++i) {
      Op* xi = copy + i * ldx;
      if constexpr (bf16_dot) {
        uint16_t* xh = reinterpret_cast<uint16_t*>(xi);
        if (i < n) std::memcpy(xh, src(i), sizeof(uint16_t) * dim);
        for (int64_t j = i < n ? dim : 0; j < 2 * ldx; ++j) xh[j] = 0;
      } else {
        int64_t j = 0;
        if (i < n) {
          const T* si = src(i);
          for (; j + kLanes <= dim; j += kLanes) vstore(xi + j, vload(si + j));
          for (; j < dim; ++j) xi[j] = to_float(si[j]);
        }
        for (; j < ldx; ++j) xi[j] = 0.0f;
      }
    }
  }
  if (widen_in_gram && in_place) {
    gram_nt(reinterpret_cast<const uint16_t*>(src(0)), row_stride, g, np, gm, dp, u.parallel);
  } else {
    gram_nt(x, ldx, g, np, gm, bf16_dot ? dp / 2 : dp, u.parallel);
  }
  mirror(g, np, n);
  for (int64_t i = 0; i < n; ++i) {
    const float r = g[i * np + i];
    float di = 1.0f;
    if (u.normalize) {
      di = std::sqrt(r);
      di = di > kEps ? di : kEps;
    }
    d[i] = di;
  }
  // G in place, then E; b_i = sum_j E_ij G_ij needs G's diagonal: kept per row.
  double p = 0.0;
  float* b = s.take<float>(n);
  if (s.failed) return *failed = true, 0.0;
  for (int64_t i = 0; i < n; ++i) {
    float* gi = g + i * np;
    for (int64_t j = 0; j < n; ++j) gi[j] = gi[j] / (d[i] * d[j]);
    const float g_ii = gi[i];
    gi[i] = u.offdiag ? 0.0f : g_ii - 1.0f;
    double row = 0.0;
    float e_g = gi[i] * g_ii;
    for (int64_t j = 0; j < n; ++j) {
      row += static_cast<double>(gi[j]) * gi[j];
      if (j != i) e_g += gi[j] * gi[j];  // off the diagonal E_ij = G_ij
    }
    p += row;
    b[i] = (u.normalize && d[i] > kEps) ? e_g : 0.0f;
  }
  if (grad == nullptr) return p;
  // M in place of E (rows n..np zero for the padded product rows).
  for (int64_t i = 0; i < n; ++i) {
    float* mi = g + i * np;
    const float scale = 4.0f * u.grad_scale / d[i];
    for (int64_t j = 0; j < n; ++j) mi[j] = mi[j] / d[j] * scale;
    mi[i] -= b[i] / d[i] * scale;
    for (int64_t j = n; j < np; ++j) mi[j] = 0.0f;
  }
  if (n <= kSkinnyRows) {
    skinny_grad(g, np, u, src, rows, first, grad, s);
    return s.failed ? (*failed = true, 0.0) : p;
  }
  const int64_t ldy = dp + 16;
  float* y = s.take<float>(mp * ldy);
  if (s.failed) return *failed = true, 0.0;
  if constexpr (bf16_dot) {
    // A = M as bf16 pairs along K = n; B = the rows interleaved in pairs along K.
    const int64_t kp = (n + 1) / 2;
    uint32_t* ma = s.take<uint32_t>(mp * kp);
    uint32_t* hb = s.take<uint32_t>(kp * ldy);
    if (s.failed) return *failed = true, 0.0;
    for (int64_t i = 0; i < mp; ++i) {
      for (int64_t q = 0; q < kp; ++q) {
        const float lo = i < n ? g[i * np + 2 * q] : 0.0f;
        const float hi = i < n && 2 * q + 1 < n ? g[i * np + 2 * q + 1] : 0.0f;
        ma[i * kp + q] = bf16_pair(lo, hi);
      }
    }
#pragma omp parallel for schedule(static) if (u.parallel)
    for (int64_t q = 0; q < kp; ++q) {
      const uint16_t* lo = reinterpret_cast<const uint16_t*>(src(2 * q));
      const uint16_t* hi = 2 * q + 1 < n ? reinterpret_cast<const uint16_t*>(src(2 * q + 1)) : nullptr;
      uint32_t* o = hb + q * ldy;
      for (int64_t j = 0; j < dim; ++j) {
        o[j] = static_cast<uint32_t>(lo[j]) | (hi != nullptr ? static_cast<uint32_t>(hi[j]) << 16 : 0u);
      }
      for (int64_t j = dim; j < dp; ++j) o[j] = 0u;
    }
    gemm(ma, kp, hb, ldy, y, ldy, mp, dp, kp, false, u.parallel);
  } else {
    // A = M (fp32, row stride np, rows n..mp read as the zeros below); B = the rows.
    float* ma = s.take<float>(mp * np);
    if (s.failed) return *failed = true, 0.0;
    for (int64_t i = 0; i < mp; ++i) {
      for (int64_t j = 0; j < np; ++j) ma[i * np + j] = i < n ? g[i * np + j] : 0.0f;
    }
    gemm(ma, np, x, ldx, y, ldy, mp, dp, n, false, u.parallel);
  }
#pragma omp parallel for schedule(static) if (u.parallel)
  for (int64_t i = 0; i < n; ++i) {
    const float* yi = y + i * ldy;
    T* out = grad + (rows != nullptr ? rows[i] : first + i) * dim;
    int64_t j = 0;
    for (; j + kLanes <= dim; j += kLanes) vstore(out + j, vload(yi + j));
    for (; j < dim; ++j) store(out, j, yi[j]);
  }
  return p;
}

// One (layer, group): returns P (the group's sum over counted pairs), NaN on
// allocation failure (flagged in *failed).
template <typename T>
double group_penalty(const T* h, int64_t row_stride, const int64_t* rows, int64_t first,
                     const Unit& u, T* grad, bool* failed) {
  const int64_t n = u.n, dim = u.dim;
  if (n <= dim) return gram_direct(h, row_stride, rows, first, u, grad, failed);
  constexpr bool bf16_dot = kBf16Dot && std::is_same_v<T, uint16_t>;
  const int64_t dp = round_up(dim, NR);  // padded columns (even)
  // Row strides of long rows get 64 extra bytes: a stride that is a multiple of 4 KiB
  // maps every row of a tile onto the same L1 sets (the transposes ran 5x slower).
  const int64_t ldz = dp + 16;
  Scratch s;
  const int64_t z_rows = round_up(n, 12) + 1;  // whole MR = 6 and 4 x 4 tiles
  float* z = s.take<float>(z_rows * ldz);
  float* denom = s.take<float>(n);
  float* sq = s.take<float>(n);
  if (s.failed) return *failed = true, 0.0;
  load_rows(h, row_stride, rows, first, u, z, ldz, denom, sq);
  // Rows past n feed only output rows that are never read; zeros keep them cheap.
  std::memset(z + n * ldz, 0, sizeof(float) * (z_rows - n) * ldz);

  // Covariance path (n > D): C = Z^T Z (dm x dp), then Y = Z (C - cI), y = Y + c z.
  const int64_t dm = round_up(dim, MR) + 1;
  float* cov = s.take<float>(dm * ldz);
  if (s.failed) return *failed = true, 0.0;
  if (bf16_dot) {
    const int64_t kp = (n + 1) / 2, lda = kp + 16;  // pairs along K = n
    uint32_t* b = s.take<uint32_t>(kp * ldz);
    uint32_t* a = s.take<uint32_t>(dm * lda);
    if (s.failed) return *failed = true, 0.0;
    pack_pairs(z, ldz, n, dp, b, ldz, kp, u.parallel);
    transpose(b, ldz, kp, dim, a, lda, u.parallel);
    gemm(a, lda, b, ldz, cov, ldz, round_up(dim, MR), dp, kp, true, u.parallel);
  } else {
    const int64_t lda = n + 16;
    float* a = s.take<float>(dm * lda);
    if (s.failed) return *failed = true, 0.0;
    transpose(z, ldz, n, dim, a, lda, u.parallel);
    gemm(a, lda, z, ldz, cov, ldz, round_up(dim, MR), dp, n, true, u.parallel);
  }
  mirror(cov, ldz, dim);
  double ssum = 0.0, quad = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    ssum += sq[i];
    quad += static_cast<double>(sq[i]) * sq[i];
  }
  const float c = static_cast<float>(ssum / static_cast<double>(dim));
  double frob = 0.0;
  for (int64_t i = 0; i < dim; ++i) {
    cov[i * ldz + i] -= c;
    for (int64_t j = 0; j < dim; ++j) {
      frob += static_cast<double>(cov[i * ldz + j]) * cov[i * ldz + j];
    }
  }
  const double d = static_cast<double>(dim);
  const double p = frob + (u.offdiag ? ssum * ssum / d - quad : (ssum - d) * (ssum - d) / d + (n - d));
  if (grad != nullptr) {
    const int64_t mp = round_up(n, MR);
    float* y = s.take<float>(mp * ldz);  // all written
    if (s.failed) return *failed = true, 0.0;
    if (bf16_dot) {
      const int64_t kp = (dim + 1) / 2, lda = kp + 16;  // pairs along K = dim
      uint32_t* za = s.take<uint32_t>(mp * lda);
      uint32_t* cb = s.take<uint32_t>(kp * ldz);
      if (s.failed) return *failed = true, 0.0;
#pragma omp parallel for schedule(static) if (u.parallel)
      for (int64_t i = 0; i < mp; ++i) {
        for (int64_t q = 0; q < kp; ++q) {
          za[i * lda + q] = bf16_pair(z[i * ldz + 2 * q], z[i * ldz + 2 * q + 1]);
        }
      }
      pack_pairs(cov, ldz, dim, dp, cb, ldz, kp, u.parallel);
      gemm(za, lda, cb, ldz, y, ldz, mp, dp, kp, false, u.parallel);
    } else {
      gemm(z, ldz, cov, ldz, y, ldz, mp, dp, dim, false, u.parallel);
    }
    epilogue(y, ldz, z, ldz, denom, sq, c, u.offdiag, u, rows, first, grad);
  }
  return p;
}

template <typename T>
int run(const T* hidden, int64_t n_layers, int64_t n_rows, int64_t dim, int64_t layer_stride,
        int64_t row_stride, const int64_t* rows, const int64_t* offsets, int64_t n_groups,
        bool normalize, bool offdiag, float grad_scale, double* p_sum, T* grad) {
  const int64_t units = n_layers * n_groups;
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
#endif
  // Across units when they share evenly (or are many), else inside each product.
  const bool outer = threads > 1 && units >= threads && (units % threads == 0 || units >= 4 * threads);
  double* p_unit = static_cast<double*>(std::calloc(static_cast<size_t>(units > 0 ? units : 1), sizeof(double)));
  if (p_unit == nullptr) return 4;
  bool failed = false;
#pragma omp parallel for schedule(dynamic, 1) if (outer)
  for (int64_t t = 0; t < units; ++t) {
    const int64_t layer = t / n_groups, group = t % n_groups;
    const int64_t first = offsets[group], n = offsets[group + 1] - offsets[group];
    if (n == 0 || (offdiag && n == 1)) continue;
    const Unit u{n, dim, normalize, offdiag, grad_scale, !outer && threads > 1};
    bool unit_failed = false;
    p_unit[t] = group_penalty(hidden + layer * layer_stride, row_stride,
                              rows != nullptr ? rows + first : nullptr, first, u,
                              grad != nullptr ? grad + layer * n_rows * dim : nullptr,
                              &unit_failed);
    if (unit_failed) {
#pragma omp atomic write
      failed = true;
    }
  }
  for (int64_t l = 0; l < n_layers; ++l) {
    double total = 0.0;
    for (int64_t g = 0; g < n_groups; ++g) total += p_unit[l * n_groups + g];
    p_sum[l] = total;
  }
  std::free(p_unit);
  return failed ? 4 : 0;
}

}  // namespace

int decorrelation(const void* hidden, int dtype, int64_t n_layers, int64_t n_rows, int64_t dim,
                  int64_t layer_stride, int64_t row_stride, const int64_t* rows,
                  const int64_t* offsets, int64_t n_groups, bool normalize, bool offdiag,
                  float grad_scale, double* p_sum, void* grad) {
  if (dtype == 0) {
    return run(static_cast<const float*>(hidden), n_layers, n_rows, dim, layer_stride, row_stride,
               rows, offsets, n_groups, normalize, offdiag, grad_scale, p_sum,
               static_cast<float*>(grad));
  }
  return run(static_cast<const uint16_t*>(hidden), n_layers, n_rows, dim, layer_stride,
             row_stride, rows, offsets, n_groups, normalize, offdiag, grad_scale, p_sum,
             static_cast<uint16_t*>(grad));
}

// dst = src * s in the same dtype: fp32 products rounded once (to nearest even for
// bf16, as PyTorch multiplies a bf16 tensor by an fp32 scalar). The backward's scaling
// of the stored gradient by the upstream gradient, in place. One read, one write.
template <typename T>
void scale_impl(const T* src, int64_t n, float s, T* dst) {
  constexpr int64_t kChunk = int64_t{1} << 14;  // elements per OpenMP work item
  const vf vs = vsplat(s);
  // bf16: a product of a bf16 value (low 16 bits zero) and a non-NaN s is finite,
  // +-inf, or a quiet NaN whose low 16 bits are still zero, all of which round to
  // nearest even without vstore's NaN test; two vectors per pack (vload2 /
  // vstore2_finite). On SSE2 the NaN test and the single-vector narrowing made bf16's
  // backward scaling 1.7x fp32's (2.6 against 1.5 ms at 8 x 64 x 14336).
  constexpr bool kBf16 = std::is_same_v<T, uint16_t>;
  const bool pairs = kBf16 && s == s;
#pragma omp parallel for schedule(static) if (n >= 4 * kChunk)
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t end = c + kChunk < n ? c + kChunk : n;
    int64_t j = c;
    if constexpr (kBf16) {
      for (; pairs && j + 2 * kLanes <= end; j += 2 * kLanes) {
        vf a, b;
        vload2(src + j, a, b);
        vstore2_finite(dst + j, a * vs, b * vs);
      }
    }
    for (; j + kLanes <= end; j += kLanes) vstore(dst + j, vload(src + j) * vs);
    for (; j < end; ++j) store(dst, j, to_float(src[j]) * s);
  }
}

void scale(const void* src, int dtype, int64_t n, float s, void* dst) {
  if (dtype == 0) {
    scale_impl(static_cast<const float*>(src), n, s, static_cast<float*>(dst));
  } else {
    scale_impl(static_cast<const uint16_t*>(src), n, s, static_cast<uint16_t*>(dst));
  }
}

}  // namespace decpo::DECPO_ISA
