"""Every host-device synchronization in one forward+backward of each op on CUDA,
with the line that caused it (torch.cuda.set_sync_debug_mode("warn")).

    python -m experiments.gpu_sync_points
"""

from __future__ import annotations

import warnings

import torch

import decpo


def main() -> None:
    torch.manual_seed(0)
    h = torch.randn(8, 64, 14336, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    g = torch.randn(16384, 4096, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    seg = torch.arange(16384, device="cuda") // 1024
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    w = torch.randn(32000, 4096, device="cuda", dtype=torch.bfloat16) / 64
    t = torch.randint(0, 32000, (4096,), device="cuda")
    runs = {
        "decorrelation last token": lambda: decpo.decorrelation_penalty(h).backward(),
        "decorrelation 16 groups": lambda: decpo.decorrelation_penalty(
            g, segment_ids=seg
        ).backward(),
        "decorrelation covariance (1 group, n > D)": lambda: decpo.decorrelation_penalty(
            g
        ).backward(),
        "token_logprobs": lambda: decpo.token_logprobs(x, w, t).sum().backward(),
    }
    for name, run in runs.items():
        run()  # compile first
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
        torch.cuda.set_sync_debug_mode("default")
        print(f"== {name}: {len(caught)} synchronizing calls")
        for w_ in caught:
            print(f"   {w_.filename}:{w_.lineno}: {str(w_.message)[:80]}")


if __name__ == "__main__":
    main()
