"""Numerics shared by every backend: one definition of each rule, imported by all.

- Accumulation: fp32 for every floating input except float64, which stays float64
  (`accumulation_dtype`). Outputs of the ops come out in this dtype too.
- The decorrelation penalty's stored gradient keeps the input dtype, except fp16,
  which is stored in fp32 (`grad_dtype`).
- Rows whose target is ignore_index are dropped before any matrix product
  (`valid_rows`); the decorrelation penalty reads only selected rows, grouped by
  segment (`bucket_rows`).
- A NaN or Inf in the LM head poisons every log-prob; a -inf bias entry masks its
  vocabulary entry (`head_ok`, built on the one-pass `all_finite`).
- Triton kernels run in the CPU interpreter when TRITON_INTERPRET=1 (`interpreting`).
"""

from __future__ import annotations

import os

import torch

# Row norms are clamped to at least EPS before dividing: z = h / max(||h||, EPS).
EPS = 1e-6


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 input, else float32: the dtype sums are carried and
    results returned in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of decorrelation_penalty's stored, pre-scaled gradient: the input's, except
    fp32 for fp16, whose range would flush entries of size ~1/pairs to zero before
    grad_output (a loss scale, say) multiplies them."""
    return torch.float32 if dtype == torch.float16 else dtype


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """0-dim bool: no NaN or Inf in t. One pass (isfinite().all() takes several)."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    lo, hi = torch.aminmax(t)
    return (lo > float("-inf")) & (hi < float("inf"))


def head_ok(
    weight: torch.Tensor, bias: torch.Tensor | None, weight_finite: torch.Tensor | None = None
) -> torch.Tensor:
    """0-dim bool, no host sync: the head may be used. A NaN or Inf in the weight makes
    every log-prob NaN, even for rows where it would only meet a -inf logit (which
    softmax would otherwise absorb); a -inf bias entry masks its vocabulary entry
    (p = 0, as a -inf logit does in logprobs_from_logits), while NaN or +inf in the
    bias still poison every row (amax keeps NaN). weight_finite: the weight's check,
    when a pass over it already made it (0-dim bool)."""
    ok = all_finite(weight) if weight_finite is None else weight_finite
    if bias is not None:
        ok = ok & (bias.amax() < float("inf"))
    return ok


def valid_rows(targets: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """Indices of the rows whose target is not ignore_index, or None when every row
    is valid (one host sync)."""
    valid = targets != ignore_index
    if bool(valid.all()):
        return None
    return valid.nonzero().squeeze(1)


def bucket_rows(
    n: int, mask: torch.Tensor | None, segment_ids: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, list[int]]:
    """The selected rows sorted by group (stable, on the device) and each group's size:
    the one host sync of the decorrelation penalty, none per group."""
    rows = torch.arange(n, device=device) if mask is None else mask.nonzero().squeeze(1)
    if segment_ids is None:
        return rows, ([rows.numel()] if rows.numel() else [])
    seg_sorted, order = torch.sort(segment_ids[rows], stable=True)
    counts = torch.unique_consecutive(seg_sorted, return_counts=True)[1]
    return rows[order], counts.tolist()
