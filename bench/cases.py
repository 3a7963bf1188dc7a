"""CPU benchmark cases shared by the pytest-benchmark suite and the fresh-process
peak-memory probe: each case builds its inputs once and returns a callable that runs
forward + backward (or forward only) for one provider."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import decpo
from decpo.reference import (
    eager_decorrelation_penalty,
    eager_logprobs_from_logits,
    eager_token_logprobs,
)


@dataclass(frozen=True)
class Case:
    op: str
    shape: str
    providers: tuple[str, ...]
    target: str  # the DESIGN section 5 target this case checks


CASES = {
    "logprobs_from_logits": Case(
        "logprobs_from_logits", "N=4096 V=32000 bf16",
        ("decpo-native", "decpo-torch", "eager", "compile"),
        ">= 3x eager (fwd+bwd) at <= 1/4 of its peak memory",
    ),
    "token_logprobs": Case(
        "token_logprobs", "N=2048 D=512 V=32000 bf16 frozen head",
        ("decpo-native", "decpo-torch", "eager", "compile", "cce-torch_compile"),
        ">= 1.3x eager, no N x V fp32 buffer; goal: faster than torch.compile of eager "
        "and than Cut Cross-Entropy's torch_compile",
    ),
    "decorrelation_penalty": Case(
        "decorrelation_penalty", "N=8192 D=512 bf16 one group", ("decpo", "eager", "compile"),
        ">= 20x eager, no N x N buffer",
    ),
}  # fmt: skip


def _fwd_bwd(fn: Callable[..., torch.Tensor], leaf: torch.Tensor, *args) -> Callable[[], None]:
    upstream: list[torch.Tensor] = []

    def run() -> None:
        leaf.grad = None
        out = fn(leaf, *args)
        if not upstream:
            upstream.append(torch.randn_like(out) if out.dim() else torch.ones_like(out))
        out.backward(upstream[0])

    run.leaf = leaf  # type: ignore[attr-defined]  # lets the memory probe drop .grad
    return run


def available(provider: str) -> str:
    """'' when the provider can run here, else why not."""
    if provider.startswith("cce"):
        try:
            import cut_cross_entropy  # noqa: F401
        except ImportError as exc:
            return f"cut-cross-entropy not installed ({exc})"
    if provider == "decpo-native":
        from decpo import native

        return native.unavailable_reason()
    return ""


def build(case: str, provider: str) -> Callable[[], None]:
    """Inputs for `case` and a callable running provider's forward + backward once."""
    torch.manual_seed(0)
    if case == "logprobs_from_logits":
        n, v = 4096, 32000
        logits = torch.randn(n, v, dtype=torch.bfloat16, requires_grad=True)
        targets = torch.randint(0, v, (n,))
        fns = {
            "decpo-native": lambda x, t: decpo.logprobs_from_logits(x, t, backend="native"),
            "decpo-torch": lambda x, t: decpo.logprobs_from_logits(x, t, backend="torch"),
            "eager": eager_logprobs_from_logits,
            "compile": torch.compile(eager_logprobs_from_logits),
        }
        return _fwd_bwd(fns[provider], logits, targets)
    if case == "token_logprobs":
        n, d, v = 2048, 512, 32000
        hidden = torch.randn(n, d, dtype=torch.bfloat16, requires_grad=True)
        weight = (torch.randn(v, d) / d**0.5).to(torch.bfloat16)
        targets = torch.randint(0, v, (n,))
        fns = {
            "decpo-native": lambda h, w, t: decpo.token_logprobs(h, w, t, backend="native"),
            "decpo-torch": lambda h, w, t: decpo.token_logprobs(h, w, t, backend="torch"),
            "eager": eager_token_logprobs,
            "compile": torch.compile(eager_token_logprobs),
        }
        if provider == "cce-torch_compile":
            from cut_cross_entropy import linear_cross_entropy

            def cce(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return -linear_cross_entropy(h, w, t, reduction="none", impl="torch_compile")

            fns[provider] = cce
        return _fwd_bwd(fns[provider], hidden, weight, targets)
    if case == "decorrelation_penalty":
        n, d = 8192, 512
        hidden = torch.randn(n, d, dtype=torch.bfloat16, requires_grad=True)
        fns = {
            "decpo": decpo.decorrelation_penalty,
            "eager": eager_decorrelation_penalty,
            "compile": torch.compile(eager_decorrelation_penalty),
        }
        return _fwd_bwd(fns[provider], hidden)
    raise ValueError(f"unknown case {case!r}; known: {sorted(CASES)}")
