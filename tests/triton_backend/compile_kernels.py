"""Compile every decpo Triton kernel ahead of time for an NVIDIA GPU (default sm_90,
the H200's Hopper), without a GPU: Triton's own ptxas turns each kernel into a cubin.
The interpreter runs the kernels' arithmetic in CI; this catches what only the GPU
compiler sees (types, layouts, constexpr misuse).

    python tests/triton_backend/compile_kernels.py [ARCH]   # run without TRITON_INTERPRET
"""

from __future__ import annotations

import inspect
import itertools
import os
import sys

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET=1"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from decpo.triton_backend import decorrelation as dec  # noqa: E402
from decpo.triton_backend import logprobs as lp  # noqa: E402

INT32_PTRS = {"rows_ptr", "pair_start_ptr", "pair_n_ptr", "pair_i_ptr", "pair_j_ptr",
              "pair_group_ptr", "pair_a_ptr", "pair_b_ptr", "group_start_ptr", "group_n_ptr",
              "block_group_ptr", "block_row_ptr"}  # fmt: skip
DATA_PTRS = {"h_ptr", "w_ptr", "b_ptr", "x_ptr", "dx_ptr", "z_ptr"}


def signature(kernel, dtype: str, grad_dtype: str) -> dict[str, str]:
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if (name.isupper() and len(name) > 2) or name.startswith("BLOCK"):  # not M, V, D, DP
            sig[name] = "constexpr"
        elif name in DATA_PTRS:
            sig[name] = f"*{dtype}"
        elif name == "grad_ptr":
            sig[name] = f"*{grad_dtype}"
        elif name == "m_ptr":  # the covariance path's C - cI: bf16 for bf16, else fp32
            sig[name] = "*bf16" if dtype == "bf16" else "*fp32"
        elif name == "t_ptr":
            sig[name] = "*i64"
        elif name in INT32_PTRS:
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name.startswith("stride") or name == "ignore_index":
            sig[name] = "i64"
        elif name in ("inv_t", "scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_all(arch: int) -> int:
    target = GPUTarget("cuda", arch, 32)
    blocks = {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 64, "BLOCK_R": 64, "BLOCK_C": 64,
              "BLOCK_M": 64, "BLOCK_K": 64}  # fmt: skip
    logit_blocks = {"BLOCK_N": 1, "BLOCK_V": 4096}
    jobs = []
    for dtype in ("bf16", "fp16", "fp32"):
        for flags in itertools.product([False, True], repeat=2):
            jobs.append(
                (
                    lp._token_logprobs_fwd_kernel,
                    dtype,
                    dtype,
                    {"HAS_BIAS": flags[0], "FROZEN_GRAD": flags[1]},
                    blocks,
                )
            )
            jobs.append(
                (
                    lp._token_logprobs_bwd_weight_kernel,
                    dtype,
                    dtype,
                    {"HAS_BIAS": True, "NEED_WEIGHT": flags[0], "NEED_BIAS": flags[1]},
                    blocks,
                )
            )
        jobs.append(
            (lp._token_logprobs_bwd_hidden_kernel, dtype, dtype, {"HAS_BIAS": True}, blocks)
        )
        jobs.append((lp._logits_fwd_kernel, dtype, dtype, {}, logit_blocks))
        jobs.append((lp._logits_bwd_kernel, dtype, dtype, {}, {"BLOCK_N": 1, "BLOCK_V": 1024}))
        grad = "fp32" if dtype == "fp16" else dtype
        # Decorrelation (the launched variants are compiled by bench.kernel_stats; this
        # list only checks that every flag combination compiles).
        for normalize in (False, True):
            jobs.append((dec._pack_kernel, dtype, grad, {"NORMALIZE": normalize}, blocks))
            jobs.append((dec._finish_kernel, dtype, grad, {"NORMALIZE": normalize}, blocks))
        for normalize, offdiag, compute_grad in itertools.product([False, True], repeat=3):
            flags = {"NORMALIZE": normalize, "OFFDIAG": offdiag, "COMPUTE_GRAD": compute_grad}
            jobs.append((dec._gram_fused_kernel, dtype, grad, flags, blocks))
        for same, offdiag in itertools.product([False, True], repeat=2):
            flags = {"SAME": same, "OFFDIAG": offdiag, "NORMALIZE": True, "COMPUTE_GRAD": True}
            jobs.append((dec._gram_pair_kernel, dtype, grad, flags, blocks))
            cov = dec._cov_kernel if offdiag else dec._cov_grad_kernel
            flags = {"SAME": same, "COMPUTE_GRAD": True, "OFFDIAG": offdiag}
            jobs.append((cov, dtype, grad, flags, blocks))
        jobs.append((dec._gram_pair_kernel, dtype, grad,
                     {"SAME": False, "OFFDIAG": False, "NORMALIZE": False, "COMPUTE_GRAD": False},
                     blocks))  # fmt: skip
    failures = 0
    for kernel, dtype, grad_dtype, flags, blk in jobs:
        sig = signature(kernel, dtype, grad_dtype)
        constexprs = {k: v for k, v in (blk | flags | {"INTERPRET": False}).items() if k in sig}
        try:
            triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                           target=target)  # fmt: skip
        except Exception as exc:  # report every failing variant, then fail
            failures += 1
            print(f"FAIL {kernel.fn.__name__} {dtype} {flags}: {str(exc)[:2000]}")
    print(f"compiled {len(jobs) - failures}/{len(jobs)} kernel variants for sm_{arch}")
    return failures


if __name__ == "__main__":
    sys.exit(1 if compile_all(int(sys.argv[1]) if len(sys.argv) > 1 else 90) else 0)
