// The exported C ABI: CPU capability detection, the choice of kernel variant, and the
// argument checks shared by every variant (so a bad target is refused the same way
// whichever variant would run).
#include <atomic>
#include <cstddef>

#ifdef __linux__
#include <sys/mman.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

#include "decpo_native.h"
#include "isa.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#define DECPO_X86 1
#else
#define DECPO_X86 0
#endif

namespace {

using decpo::KernelTable;

// DECPO_X86_VARIANTS is defined by CMakeLists.txt when the x86 variants are built.
#ifdef DECPO_X86_VARIANTS
constexpr int kCompiled = 0xF;
#else
constexpr int kCompiled = 1 << decpo::kBaseline;
#endif

const KernelTable* table_for(int isa) {
#define DECPO_TABLE(ns)                                                                     \
  static const KernelTable ns##_table = {decpo::ns::logits_fwd, decpo::ns::logits_bwd,     \
                                         decpo::ns::softmax_tile, decpo::ns::decorrelation, \
                                         decpo::ns::exp_probe, decpo::ns::widen_bf16,      \
                                         decpo::ns::scale};                                 \
  return &ns##_table
  switch (isa) {
#ifdef DECPO_X86_VARIANTS
    case decpo::kAvx2: {
      DECPO_TABLE(avx2);
    }
    case decpo::kAvx512: {
      DECPO_TABLE(avx512);
    }
    case decpo::kAvx512Bf16: {
      DECPO_TABLE(avx512bf16);
    }
#endif
    default: {
      DECPO_TABLE(baseline);
    }
  }
#undef DECPO_TABLE
}

int detect_features() {
  int features = 0;
#if DECPO_X86
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
  const bool osxsave = c & (1u << 27), avx = c & (1u << 28), fma = c & (1u << 12);
  const bool f16c = c & (1u << 29), movbe = c & (1u << 22);
  if (!osxsave || !avx) return 0;
  unsigned xcr0_lo, xcr0_hi;
  __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const bool ymm_state = (xcr0_lo & 0x6u) == 0x6u;
  const bool zmm_state = (xcr0_lo & 0xE0u) == 0xE0u;
  const bool tile_state = (xcr0_lo & (3u << 17)) == (3u << 17);
  unsigned a7 = 0, b7 = 0, c7 = 0, d7 = 0, a71 = 0, b71 = 0, c71 = 0, d71 = 0;
  __get_cpuid_count(7, 0, &a7, &b7, &c7, &d7);
  __get_cpuid_count(7, 1, &a71, &b71, &c71, &d71);
  unsigned ae = 0, be = 0, ce = 0, de = 0;
  __get_cpuid(0x80000001u, &ae, &be, &ce, &de);
  const bool avx2 = b7 & (1u << 5), bmi1 = b7 & (1u << 3), bmi2 = b7 & (1u << 8);
  const bool lzcnt = ce & (1u << 5);
  if (ymm_state && avx2 && fma && f16c && movbe && bmi1 && bmi2 && lzcnt) features |= 1;
  const unsigned v4_bits = (1u << 16) | (1u << 17) | (1u << 28) | (1u << 30) | (1u << 31);
  if ((features & 1) && zmm_state && (b7 & v4_bits) == v4_bits) features |= 2;
  if ((features & 2) && (a71 & (1u << 5))) features |= 4;
  if (tile_state && (d7 & (1u << 22)) && (d7 & (1u << 24))) features |= 8;
#endif
  return features;
}

bool cpu_runs(int isa, int features) {
  switch (isa) {
    case decpo::kBaseline:
      return true;
    case decpo::kAvx2:
      return features & 1;
    case decpo::kAvx512:
      return features & 2;
    case decpo::kAvx512Bf16:
      return features & 4;
    default:
      return false;
  }
}

int best_isa() {
  const int features = detect_features();
  for (int isa = decpo::kIsaCount - 1; isa > 0; --isa) {
    if ((kCompiled & (1 << isa)) && cpu_runs(isa, features)) return isa;
  }
  return decpo::kBaseline;
}

std::atomic<int> g_active{best_isa()};

const KernelTable& active() { return *table_for(g_active.load(std::memory_order_relaxed)); }

// A large output written once (the N x V gradient of logprobs_from_logits, the scaled
// decorrelation gradient; usually fresh allocations) spends more time in first-touch
// page faults than in the kernel: 4 KiB pages cost ~180 ms per 262 MB on one core, as
// long as the exps themselves.
// Asking for transparent huge pages (where the system allows them on request) cuts
// the faults 512-fold. Only whole 2 MiB pages inside the buffer are advised.
void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  if (bytes < 4 * kHuge) return;
  const uintptr_t start = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > start) madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

bool targets_ok(const int64_t* targets, int64_t n_rows, int64_t n_vocab, int64_t ignore_index) {
  for (int64_t i = 0; i < n_rows; ++i) {
    const int64_t y = targets[i];
    if (y != ignore_index && (y < 0 || y >= n_vocab)) return false;
  }
  return true;
}

}  // namespace

DECPO_API int decpo_abi_version(void) { return 12; }

DECPO_API int decpo_cpu_features(void) { return detect_features(); }

DECPO_API int decpo_compiled_isas(void) { return kCompiled; }

DECPO_API int decpo_active_isa(void) { return g_active.load(); }

DECPO_API int decpo_set_num_threads(int n) {
  if (n < 1) return 3;
#ifdef _OPENMP
  omp_set_num_threads(n);  // the calling thread's setting: other threads keep theirs
#endif
  return 0;
}

DECPO_API int decpo_select_isa(int isa) {
  if (isa == -1) isa = best_isa();
  if (isa < 0 || isa >= decpo::kIsaCount || !(kCompiled & (1 << isa)) ||
      !cpu_runs(isa, detect_features())) {
    return 3;
  }
  g_active.store(isa);
  return 0;
}

DECPO_API int decpo_logprobs_from_logits_fwd(const void* logits, int dtype, int64_t n_rows,
                                             int64_t n_vocab, int64_t row_stride,
                                             const int64_t* targets, int64_t ignore_index,
                                             float inv_temperature, float* logp, float* lse) {
  if (dtype != 0 && dtype != 1) return 1;
  // Every target is checked before any data is read, so a bad one never reads out of bounds.
  if (!targets_ok(targets, n_rows, n_vocab, ignore_index)) return 2;
  active().logits_fwd(logits, dtype, n_rows, n_vocab, row_stride, targets, ignore_index,
                      inv_temperature, logp, lse);
  return 0;
}

DECPO_API int decpo_logprobs_from_logits_bwd(const float* grad_logp, const void* logits,
                                             int dtype, int64_t n_rows, int64_t n_vocab,
                                             int64_t row_stride, const int64_t* targets,
                                             int64_t ignore_index, float inv_temperature,
                                             const float* lse, void* grad_logits) {
  if (dtype != 0 && dtype != 1) return 1;
  if (!targets_ok(targets, n_rows, n_vocab, ignore_index)) return 2;
  advise_huge_pages(grad_logits, static_cast<size_t>(n_rows * n_vocab) * (dtype == 0 ? 4 : 2));
  active().logits_bwd(grad_logp, logits, dtype, n_rows, n_vocab, row_stride, targets,
                      ignore_index, inv_temperature, lse, grad_logits);
  return 0;
}

DECPO_API int decpo_online_softmax_tile(void* tile, int dtype, int64_t n_rows, int64_t n_cols,
                                        int64_t row_stride, const float* bias,
                                        float inv_temperature, float softcap, float logit_scale,
                                        const int64_t* local_targets, float* m, float* s_other,
                                        float* s_target, float* target_logit, float* stats,
                                        float* rescale) {
  if (dtype != 0 && dtype != 1) return 1;
  for (int64_t i = 0; i < n_rows; ++i) {
    if (local_targets[i] >= n_cols) return 2;
  }
  active().softmax_tile(tile, dtype, n_rows, n_cols, row_stride, bias, inv_temperature, softcap,
                        logit_scale, local_targets, m, s_other, s_target, target_logit, stats,
                        rescale);
  return 0;
}

DECPO_API int decpo_decorrelation_penalty(const void* hidden, int dtype, int64_t n_layers,
                                          int64_t n_rows, int64_t dim, int64_t layer_stride,
                                          int64_t row_stride, const int64_t* rows,
                                          const int64_t* offsets, int64_t n_groups,
                                          int normalize, int offdiag, float grad_scale,
                                          double* p_sum, void* grad) {
  if (dtype != 0 && dtype != 1) return 1;
  return active().decorrelation(hidden, dtype, n_layers, n_rows, dim, layer_stride, row_stride, rows,
                                offsets, n_groups, normalize != 0, offdiag != 0, grad_scale,
                                p_sum, grad);
}

DECPO_API int decpo_widen_bf16(const uint16_t* src, int64_t n_rows, int64_t n_cols,
                               int64_t src_stride, float* dst, int64_t dst_stride,
                               int* all_finite) {
  *all_finite = active().widen_bf16(src, n_rows, n_cols, src_stride, dst, dst_stride) ? 1 : 0;
  return 0;
}

DECPO_API void decpo_advise_huge_pages(void* data, int64_t bytes) {
  advise_huge_pages(data, static_cast<size_t>(bytes));
}

DECPO_API int decpo_scale(const void* src, int dtype, int64_t n, float scale, void* dst) {
  if (dtype != 0 && dtype != 1) return 1;
  if (dst != src) advise_huge_pages(dst, static_cast<size_t>(n) * (dtype == 0 ? 4 : 2));
  active().scale(src, dtype, n, scale, dst);
  return 0;
}

DECPO_API void decpo_exp_probe(const float* x, int64_t n, int64_t reps, int bf16_exp,
                               double* out) {
  active().exp_probe(x, n, reps, bf16_exp != 0, out);
}
