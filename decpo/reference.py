"""Pure-PyTorch references, shared by tests and benchmarks.

Two kinds:
- *_reference: the formulas of docs/design.md ("The math") written as plainly as
  possible, run in float64 (callers pass float64 tensors), differentiable through
  autograd. They hold the full N x N Gram and N x V logits, so keep shapes small.
- eager_*: what a user writes in PyTorch at the input dtype, with autograd. Tests
  use them to measure PyTorch's own rounding error at a dtype; benchmarks use them
  (and torch.compile of them) as baselines. The log-prob ones are the references
  with the logits formed at the input dtype and the softmax taken in fp32.
"""

from __future__ import annotations

import torch

from decpo.numerics import EPS


def decorrelation_penalty_reference(
    hidden: torch.Tensor,
    mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    normalize: bool = True,
    offdiag: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """P for hidden (N, D) or (L, N, D) via the full Gram matrix of each group."""
    if hidden.dim() == 3:
        return torch.stack(
            [
                decorrelation_penalty_reference(h, mask, segment_ids, normalize, offdiag, reduction)
                for h in hidden
            ]
        ).mean()
    n = hidden.shape[0]
    cpu = torch.device("cpu")  # the grouping is done on the host, whatever the default device
    keep = torch.ones(n, dtype=torch.bool, device=cpu) if mask is None else mask.cpu()
    seg = torch.zeros(n, dtype=torch.long, device=cpu) if segment_ids is None else segment_ids.cpu()
    total = hidden.new_zeros(())
    pairs = 0
    for group in torch.unique(seg[keep]).tolist():
        rows = torch.nonzero(keep & (seg == group)).squeeze(1).to(hidden.device)
        h = hidden[rows]
        z = h / h.norm(dim=1, keepdim=True).clamp_min(EPS) if normalize else h
        err = z @ z.T - torch.eye(len(rows), dtype=z.dtype, device=z.device)
        if offdiag:
            err = err - torch.diag(torch.diagonal(err))
            pairs += len(rows) * (len(rows) - 1)
        else:
            pairs += len(rows) ** 2
        total = total + err.square().sum()
    if pairs == 0:
        return total
    return total / pairs if reduction == "mean" else total


def final_logits_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> torch.Tensor:
    """z = softcap tanh(logit_scale (h W^T + b) / softcap) / T, full (..., V) logits."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits / temperature if temperature != 1.0 else logits


def token_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """log_softmax of the final logits at targets through full logits; 0 at ignore_index.
    With return_stats, also TokenStats' fields by name (entropy, logit_sum,
    argmax_match, log_sum_p2), 0 at ignore_index."""
    z = final_logits_reference(hidden, weight, bias, temperature, softcap, logit_scale)
    picked = logprobs_from_logits_reference(z, targets, ignore_index)
    if not return_stats:
        return picked
    logp = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    z_target = z.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    stats = {
        "entropy": -(logp.exp() * logp).sum(-1),
        "logit_sum": z.sum(-1),
        "argmax_match": (z_target >= z.amax(-1)).to(z.dtype),
        "log_sum_p2": torch.logsumexp(2 * logp, dim=-1),
    }
    return picked, {k: torch.where(valid, v, torch.zeros_like(v)) for k, v in stats.items()}


def logprobs_from_logits_reference(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, temperature: float = 1.0
) -> torch.Tensor:
    """log_softmax(logits / T) at targets in the logits' dtype; 0 at ignore_index."""
    valid = targets != ignore_index
    logp = torch.log_softmax(logits / temperature, dim=-1)
    picked = logp.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def eager_decorrelation_penalty(hidden: torch.Tensor) -> torch.Tensor:
    """The penalty as a user writes it: fp32, normalize, full Gram, mean over pairs."""
    z = torch.nn.functional.normalize(hidden.float(), dim=-1, eps=EPS)
    gram = z @ z.transpose(-1, -2)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return (gram - eye).square().mean()


def eager_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> torch.Tensor:
    """hidden @ weight.T at the input dtype (scale and softcap there too, as the model
    code does), then fp32 log_softmax and gather."""
    logits = final_logits_reference(hidden, weight, bias, 1.0, softcap, logit_scale)
    return eager_logprobs_from_logits(logits, targets, ignore_index, temperature)


def eager_logprobs_from_logits(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, temperature: float = 1.0
) -> torch.Tensor:
    """float log_softmax then gather, as TRL and most trainers do."""
    return logprobs_from_logits_reference(logits.float(), targets, ignore_index, temperature)
