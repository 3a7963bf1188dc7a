// The per-instruction-set kernel table. Each kernel source is compiled once per
// variant (CMakeLists.txt) with DECPO_ISA set to the variant's name, which becomes
// the namespace of its definitions, so the variants live side by side in one
// library; dispatch.cpp holds one table per variant and calls through the active one.
#pragma once
#include <cstdint>

#ifndef DECPO_ISA
#define DECPO_ISA baseline
#endif

namespace decpo {

enum Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kIsaCount = 4 };

struct KernelTable {
  void (*logits_fwd)(const void* logits, int dtype, int64_t n_rows, int64_t n_vocab,
                     int64_t row_stride, const int64_t* targets, int64_t ignore_index,
                     float inv_t, float* logp, float* lse);
  void (*logits_bwd)(const float* grad_logp, const void* logits, int dtype, int64_t n_rows,
                     int64_t n_vocab, int64_t row_stride, const int64_t* targets,
                     int64_t ignore_index, float inv_t, const float* lse, void* grad_logits);
  void (*softmax_tile)(void* tile, int dtype, int64_t n_rows, int64_t n_cols, int64_t row_stride,
                       const float* bias, float inv_t, float softcap, float logit_scale,
                       const int64_t* local_targets, float* m, float* s_other, float* s_target,
                       float* target_logit, float* stats, float* rescale);
  int (*decorrelation)(const void* hidden, int dtype, int64_t n_layers, int64_t n_rows, int64_t dim,
                       int64_t layer_stride, int64_t row_stride, const int64_t* rows,
                       const int64_t* offsets, int64_t n_groups, bool normalize, bool offdiag,
                       float grad_scale, double* p_sum, void* grad);
  void (*exp_probe)(const float* x, int64_t n, int64_t reps, bool bf16_exp, double* out);
  bool (*widen_bf16)(const uint16_t* src, int64_t n_rows, int64_t n_cols, int64_t src_stride,
                     float* dst, int64_t dst_stride);
  void (*scale)(const void* src, int dtype, int64_t n, float s, void* dst);
};

#define DECPO_DECLARE_VARIANT(isa)                                                           \
  namespace isa {                                                                            \
  void logits_fwd(const void*, int, int64_t, int64_t, int64_t, const int64_t*, int64_t, float, \
                  float*, float*);                                                           \
  void logits_bwd(const float*, const void*, int, int64_t, int64_t, int64_t, const int64_t*,  \
                  int64_t, float, const float*, void*);                                      \
  void softmax_tile(void*, int, int64_t, int64_t, int64_t, const float*, float, float, float,   \
                    const int64_t*, float*, float*, float*, float*, float*, float*);           \
  int decorrelation(const void*, int, int64_t, int64_t, int64_t, int64_t, int64_t,              \
                    const int64_t*,                                                          \
                    const int64_t*, int64_t, bool, bool, float, double*, void*);              \
  void exp_probe(const float*, int64_t, int64_t, bool, double*);                             \
  bool widen_bf16(const uint16_t*, int64_t, int64_t, int64_t, float*, int64_t);              \
  void scale(const void*, int, int64_t, float, void*);                                       \
  }

DECPO_DECLARE_VARIANT(baseline)
DECPO_DECLARE_VARIANT(avx2)
DECPO_DECLARE_VARIANT(avx512)
DECPO_DECLARE_VARIANT(avx512bf16)

}  // namespace decpo
