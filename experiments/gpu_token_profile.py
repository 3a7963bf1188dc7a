# ruff: noqa: E501
"""Where the GPU time of token_logprobs goes: per-kernel CUDA times of one frozen-head
forward (which computes the gradient) under torch.profiler, the in-place rescale of q,
and each GEMM 2 config timed alone (with the target-term epilogue as in the frozen
forward, and without as in the trainable backward), against a cuBLAS product of the
same shape.

    python -m experiments.gpu_token_profile [--n 8192 --d 4096 --v 128256]
    python -m experiments.gpu_token_profile --sweep   # GEMM 1 / GEMM 2 block configs
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import triton
from triton.testing import do_bench

import decpo
from decpo.triton_backend import common
from decpo.triton_backend import logprobs as tlp


def _calls(n: int, d: int, v: int) -> tuple[torch.Tensor, torch.Tensor, Callable, Callable]:
    """(head, targets, forward+backward, forward without grad) on random bf16 inputs."""
    torch.manual_seed(0)
    h = torch.randn(n, d, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    w = (torch.randn(v, d, device="cuda") / d**0.5).bfloat16()
    t = torch.randint(0, v, (n,), device="cuda")
    ones = torch.ones(n, device="cuda")

    def step() -> None:
        h.grad = None
        decpo.token_logprobs(h, w, t).backward(ones)

    def forward_only() -> None:
        with torch.no_grad():
            decpo.token_logprobs(h, w, t)

    return w, t, step, forward_only


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--v", type=int, default=128256)
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    if args.sweep:
        sweep(args.n, args.d, args.v)
        return
    n, d, v = args.n, args.d, args.v
    w, t, step, forward_only = _calls(n, d, v)
    step()
    print(f"fwd+bwd {do_bench(step, warmup=50, rep=300, return_mode='median'):.2f} ms; "
          f"fwd (no grad) {do_bench(forward_only, warmup=50, rep=300, return_mode='median'):.2f} ms")  # fmt: skip
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60)
    )

    # GEMM 2 alone, each config: out (C, D) = A (C, V_padded) W (V, D).
    tile_v = tlp._tile_v(w.dtype)
    chunk = tlp.chunk_rows(n, v, 2, tile_v)
    n_t = triton.cdiv(v, tile_v)
    q = torch.rand(chunk, n_t * tile_v, device="cuda").bfloat16()
    scale = torch.rand(chunk, n_t, device="cuda")
    coef = torch.rand(chunk, device="cuda")
    out = torch.empty(chunk, d, device="cuda", dtype=torch.bfloat16)
    flops = 2 * chunk * n_t * tile_v * d
    w_padded = torch.nn.functional.pad(w, (0, 0, 0, q.shape[1] - v))  # (V_padded, D)
    ref = do_bench(lambda: torch.mm(q, w_padded), warmup=25, rep=200, return_mode="median")
    print(f"cuBLAS (C, Vp) @ (Vp, D): {ref:.2f} ms, {flops / ref / 1e9:.0f} TFLOP/s")
    rescale = do_bench(lambda: tlp._launch_rescale(q, scale, chunk, tile_v), warmup=25, rep=200,
                       return_mode="median")  # fmt: skip
    print(f"rescale q in place: {rescale:.3f} ms, "
          f"{2 * q.numel() * q.element_size() / rescale / 1e9:.2f} TB/s")  # fmt: skip
    for config in tlp._GEMM2:
        for target_term in (True, False):
            args = dict(q_ptr=q, w_ptr=w, t_ptr=t[:chunk], coef_ptr=coef if target_term else None,
                        out_ptr=out, M=chunk, V=v, D=d, KP=q.shape[1], stride_qm=q.stride(0),
                        stride_wv=w.stride(0), stride_wd=w.stride(1), stride_om=out.stride(0),
                        TARGET_TERM=target_term, INTERPRET=False, GROUP_M=8)  # fmt: skip
            grid = (triton.cdiv(chunk, config.blocks["BLOCK_M"])
                    * triton.cdiv(d, config.blocks["BLOCK_N"]),)  # fmt: skip
            ms = do_bench(lambda c=config, a=args, g=grid: common.launch(tlp._grad_kernel, g, c, **a),
                          warmup=25, rep=200, return_mode="median")  # fmt: skip
            print(f"GEMM 2 {config.name:<14} target term={target_term!s:<5} {ms:7.2f} ms "
                  f"{flops / ms / 1e9:5.0f} TFLOP/s")  # fmt: skip


def sweep(n: int, d: int, v: int) -> None:
    """Forward (no grad: GEMM 1 alone) and forward+backward (GEMM 1 storing q, then
    GEMM 2) with each candidate block config as the default, the other GEMM fixed."""
    from decpo.triton_backend.common import KernelConfig as K

    _w, _t, step, forward_only = _calls(n, d, v)
    base1, base2 = tlp._GEMM1, tlp._GEMM2

    def configs(axes: tuple[str, str, str], *shapes: tuple[int, ...]) -> list:
        """KernelConfigs from (block, block, block, warps, stages) tuples, named like
        m128v128d64w8s3."""
        letters = [a.removeprefix("BLOCK_").lower() for a in axes]
        out = []
        for *blocks, warps, stages in shapes:
            name = "".join(f"{x}{b}" for x, b in zip(letters, blocks, strict=True))
            out.append(K(f"{name}w{warps}s{stages}", dict(zip(axes, blocks, strict=True)),
                         warps, stages))  # fmt: skip
        return out

    gemm1 = configs(("BLOCK_M", "BLOCK_V", "BLOCK_D"), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4),
                    (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 128, 8, 2),
                    (128, 256, 64, 8, 4))  # fmt: skip
    gemm2 = configs(("BLOCK_M", "BLOCK_N", "BLOCK_K"), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4),
                    (256, 128, 64, 8, 3), (128, 256, 128, 8, 2), (256, 128, 64, 8, 4))  # fmt: skip
    for c in gemm1:
        tlp._GEMM1 = (c, *base1[1:])
        try:
            fwd = do_bench(forward_only, warmup=25, rep=150, return_mode="median")
            both = do_bench(step, warmup=25, rep=150, return_mode="median")
            print(f"GEMM 1 {c.name:<18} fwd {fwd:7.2f} ms  fwd+bwd {both:7.2f} ms", flush=True)
        except Exception as exc:  # a config that does not compile (shared memory) is skipped
            print(f"GEMM 1 {c.name:<18} failed: {type(exc).__name__}: {str(exc)[:120]}")
    tlp._GEMM1 = base1
    for c in gemm2:
        tlp._GEMM2 = (c, *base2[1:])
        try:
            both = do_bench(step, warmup=25, rep=150, return_mode="median")
            print(f"GEMM 2 {c.name:<18} fwd+bwd {both:7.2f} ms", flush=True)
        except Exception as exc:
            print(f"GEMM 2 {c.name:<18} failed: {type(exc).__name__}: {str(exc)[:120]}")
    tlp._GEMM2 = base2


if __name__ == "__main__":
    main()
