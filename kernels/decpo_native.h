// decpo native CPU kernels: a plain C ABI over raw pointers, called through ctypes.
// Conventions: row-major 2-D blocks with an explicit row stride (in elements);
// targets are int64; results are fp32. Functions return 0 on success, 1 for an
// unknown dtype code, 2 when a target is outside [0, V) and not ignore_index
// (checked before any data is read, so a bad target never reads out of bounds).
//
// Every kernel is compiled once per instruction set (dispatch.cpp): avx512bf16
// (x86-64-v4 + AVX512_BF16 dot products), avx512 (x86-64-v4), avx2 (x86-64-v3) and
// baseline (x86-64, or the build target elsewhere). The best one the CPU runs is
// active after loading; decpo_select_isa forces another, so one machine can measure
// and test what a CPU with less would run.
#pragma once
#include <cstdint>

#define DECPO_API extern "C" __attribute__((visibility("default")))

// ABI version, bumped when a signature changes or a function is added; the loader checks it.
DECPO_API int decpo_abi_version(void);

// CPU capability bits, from cpuid and the OS-enabled register state (xgetbv):
// 1 = x86-64-v3 (AVX2, FMA, F16C, BMI1/2), 2 = x86-64-v4 (AVX-512 F/BW/CD/DQ/VL),
// 4 = AVX512_BF16 (bf16 dot products), 8 = AMX-BF16 (tiles; used by PyTorch's
// oneDNN matmuls, not by these kernels).
DECPO_API int decpo_cpu_features(void);

// How many OpenMP threads the kernels called from this thread use (n >= 1; else 3).
// The library's OpenMP runtime is not PyTorch's, so the Python loader passes on
// PyTorch's per-thread setting (torch.set_num_threads) through this.
DECPO_API int decpo_set_num_threads(int n);

// Instruction-set variants: 0 = baseline, 1 = avx2, 2 = avx512, 3 = avx512bf16.
// decpo_compiled_isas: bitmask (1 << isa) of the variants built into this library.
DECPO_API int decpo_compiled_isas(void);
// The variant the kernels run now (the best supported one after loading).
DECPO_API int decpo_active_isa(void);
// Run variant `isa` from now on (-1: the best this CPU supports). Returns 0, or 3
// when the variant is not built or this CPU cannot run it (nothing changes then).
DECPO_API int decpo_select_isa(int isa);

// Row-wise log-softmax-and-gather over a block of logits (N, V):
//   lse_i  = logsumexp_v(logits_iv * inv_temperature)
//   logp_i = logits_{i, y_i} * inv_temperature - lse_i   (0 and lse 0 where y_i == ignore_index)
// One read of each row (online logsumexp), OpenMP over rows. dtype: 0 = fp32, 1 = bf16.
DECPO_API int decpo_logprobs_from_logits_fwd(const void* logits, int dtype, int64_t n_rows,
                                             int64_t n_vocab, int64_t row_stride,
                                             const int64_t* targets, int64_t ignore_index,
                                             float inv_temperature, float* logp, float* lse);

// Its backward, one read and one write per row: grad_logits (N, V), contiguous, in the
// logits' dtype: g_i (1[v = y_i] - softmax_iv) / T, zero rows where y_i == ignore_index.
DECPO_API int decpo_logprobs_from_logits_bwd(const float* grad_logp, const void* logits,
                                             int dtype, int64_t n_rows, int64_t n_vocab,
                                             int64_t row_stride, const int64_t* targets,
                                             int64_t ignore_index, float inv_temperature,
                                             const float* lse, void* grad_logits);

// Fused epilogue of one logit tile for token_logprobs (see online_softmax_tile.cpp):
// tile (R, Vc) with row stride, fp32 or bf16, holds h W_chunk^T on entry and, on exit,
// the unnormalized probabilities exp(z - m') times (1 - tanh^2) when softcapping, with
// the target column zeroed. z = softcap tanh(logit_scale (tile + bias) / softcap) / T,
// or logit_scale (tile + bias) / T when softcap <= 0. bias: Vc floats or NULL.
// local_targets: (R,) column of each row's target in this chunk, or -1. m, s_other,
// s_target, target_logit: (R,) running state, updated. stats: NULL or (3, R) running
// [sum e (z - m), sum e^2, sum z], updated. rescale: (R,) out, exp(m_old - m_new), for
// the caller's other accumulators.
DECPO_API int decpo_online_softmax_tile(void* tile, int dtype, int64_t n_rows, int64_t n_cols,
                                        int64_t row_stride, const float* bias,
                                        float inv_temperature, float softcap, float logit_scale,
                                        const int64_t* local_targets, float* m, float* s_other,
                                        float* s_target, float* target_logit, float* stats,
                                        float* rescale);

// Decorrelation penalty of every (layer, group) of hidden (L, N, D) (see
// decorrelation.cpp): hidden fp32 or bf16 (dtype 0 / 1) with strides layer_stride and
// row_stride (unit stride along D). rows: the selected row indices sorted by group,
// group g = rows[offsets[g] .. offsets[g + 1]), n_groups + 1 offsets; rows NULL means
// row r of the single group is row r (offsets still give its size). normalize: rows
// scaled to unit norm first; offdiag: only pairs i != j count. p_sum: (L,) doubles out,
// sum over groups of sum over counted pairs (G_ij - delta_ij)^2. grad: NULL, or
// (L, N, D) contiguous in the input dtype, rows of the groups written with
// grad_scale * dP/dh (other rows untouched). Returns 0, 1 for a bad dtype, 4 when
// an allocation fails.
DECPO_API int decpo_decorrelation_penalty(const void* hidden, int dtype, int64_t n_layers,
                                          int64_t n_rows, int64_t dim, int64_t layer_stride,
                                          int64_t row_stride, const int64_t* rows,
                                          const int64_t* offsets, int64_t n_groups,
                                          int normalize, int offdiag, float grad_scale,
                                          double* p_sum, void* grad);

// dst (n_rows, n_cols) fp32 = src bf16, exactly (bf16 widens without rounding); sets
// *all_finite to 1 when no element is NaN or +-inf, else 0. Returns 0.
DECPO_API int decpo_widen_bf16(const uint16_t* src, int64_t n_rows, int64_t n_cols,
                               int64_t src_stride, float* dst, int64_t dst_stride,
                               int* all_finite);

// dst = src * scale over n contiguous elements, both fp32 (0) or both bf16 (1): fp32
// products, rounded once to nearest even for bf16 (the decorrelation backward's scaling
// of the stored gradient). dst may be src. Returns 0, or 1 for a bad dtype.
DECPO_API int decpo_scale(const void* src, int dtype, int64_t n, float scale, void* dst);

// Asks the OS for transparent huge pages over the whole 2 MiB pages inside a buffer
// of at least 8 MiB not yet written (Linux; elsewhere, or smaller, nothing): what the
// kernels do for their large outputs, exported for the benchmarks' fresh-page rate.
DECPO_API void decpo_advise_huge_pages(void* data, int64_t bytes);

// The exp-throughput probe behind the log-prob floors: every OpenMP thread sums the
// kernels' vectorized exp over x (n floats, n a multiple of 64, kept in L1) reps
// times: the 1-ulp exp, or with bf16_exp the bf16-accurate one that a bf16 gradient
// is computed with. out[0] = the sum (so nothing is optimized away), out[1] = exps
// computed.
DECPO_API void decpo_exp_probe(const float* x, int64_t n, int64_t reps, int bf16_exp, double* out);
