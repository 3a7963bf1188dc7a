"""CPU benchmarks of the public ops against eager PyTorch (pytest-benchmark).

Run: make bench   (python -m pytest bench --benchmark-enable -q)
Each case times forward+backward with a random upstream gradient. The full suite
(providers, modes, GPU, peak memory) is issue 8; this file keeps the baseline honest.
"""

from __future__ import annotations

import pytest
import torch

import decpo
from decpo.reference import (
    eager_decorrelation_penalty,
    eager_logprobs_from_logits,
    eager_token_logprobs,
)


def _fwd_bwd(fn, leaf, *args):
    def run():
        leaf.grad = None
        out = fn(leaf, *args)
        out.backward(torch.ones_like(out))

    return run


@pytest.mark.parametrize("provider", ["decpo", "eager"])
def test_token_logprobs(benchmark, provider):
    n, d, v = 2048, 512, 32000
    hidden = torch.randn(n, d, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(v, d) / d**0.5).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,))
    fn = decpo.token_logprobs if provider == "decpo" else eager_token_logprobs
    benchmark.group = f"token_logprobs fwd+bwd N={n} D={d} V={v} bf16 frozen head"
    benchmark.pedantic(_fwd_bwd(fn, hidden, weight, targets), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("provider", ["decpo", "eager"])
def test_logprobs_from_logits(benchmark, provider):
    n, v = 4096, 32000
    logits = torch.randn(n, v, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    fn = decpo.logprobs_from_logits if provider == "decpo" else eager_logprobs_from_logits
    benchmark.group = f"logprobs_from_logits fwd+bwd N={n} V={v} bf16"
    benchmark.pedantic(_fwd_bwd(fn, logits, targets), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("provider", ["decpo", "eager"])
def test_decorrelation_penalty(benchmark, provider):
    n, d = 8192, 512
    hidden = torch.randn(n, d, dtype=torch.bfloat16, requires_grad=True)
    fn = decpo.decorrelation_penalty if provider == "decpo" else eager_decorrelation_penalty
    benchmark.group = f"decorrelation_penalty loss+grad N={n} D={d} bf16 (one group)"
    benchmark.pedantic(_fwd_bwd(fn, hidden), rounds=3, warmup_rounds=1)
