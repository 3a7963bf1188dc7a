"""Helpers shared by the Triton kernels."""

from __future__ import annotations

import os

import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def dot(a, b, acc, INTERPRET: tl.constexpr):
    """acc + a @ b with fp32 accumulation. Under the interpreter, bf16/fp16 operands
    are upcast first: Triton 3.x's interpreter multiplies their raw bit patterns
    (triton-lang/triton#11584). On the GPU the operands stay in their dtype (tensor
    cores); fp32 operands use IEEE fp32 products, not TF32, so fp32 inputs keep fp32
    accuracy."""
    if INTERPRET:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """x.to(dtype) rounding to nearest even. Triton 3.x's interpreter truncates fp32 ->
    bfloat16 (a biased error of up to 2^-8); round the bits first there. The GPU
    rounds to nearest even by itself."""
    if INTERPRET:  # noqa: SIM102 (nested constexpr conditions compile everywhere)
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(dtype)
