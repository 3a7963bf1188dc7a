"""Where the GPU time of decorrelation_penalty goes: wall time per call and the CUDA
kernels of one forward+backward under torch.profiler, for the benchmark cases.

    python -m experiments.gpu_decorrelation_profile
"""

from __future__ import annotations

import torch
from triton.testing import do_bench

import decpo

CASES = {  # name: (hidden shape, groups)
    "last token 8 layers x 64 D=14336": ((8, 64, 14336), 1),
    "16 groups x 1024 D=4096": ((16384, 4096), 16),
}


def main() -> None:
    for name, (shape, groups) in CASES.items():
        torch.manual_seed(0)
        h = torch.randn(*shape, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
        n = shape[-2]
        seg = torch.arange(n, device="cuda") // (n // groups) if groups > 1 else None

        def step(h=h, seg=seg) -> None:
            h.grad = None
            decpo.decorrelation_penalty(h, segment_ids=seg).backward()

        step()
        ms = do_bench(step, warmup=25, rep=200, return_mode="median")
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            step()
            torch.cuda.synchronize()
        print(f"== {name}: fwd+bwd {ms:.3f} ms (do_bench median)")
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14,
                                          max_name_column_width=50)  # fmt: skip
        print(table)


if __name__ == "__main__":
    main()
