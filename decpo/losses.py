"""Preference losses on sequence log-probs (DESIGN section 1, "Preference losses")."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from decpo import checks

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo", "sft")
_NEEDS_REFERENCE = ("sigmoid", "ipo", "hinge")
_SMOOTHED = ("sigmoid", "simpo")


class SequenceLogprobs(NamedTuple):
    """Per-sequence reductions of token log-probs: sum (DPO), mean (SimPO, SFT), count."""

    sum: torch.Tensor
    mean: torch.Tensor
    count: torch.Tensor


def sequence_logprobs(token_logps: torch.Tensor, mask: torch.Tensor) -> SequenceLogprobs:
    """Sum and mean over the last dimension of token log-probs (..., T) where mask
    (..., T) is true (the scored response tokens; positions outside it contribute 0).
    One pass over the (small) token log-probs; no pass over the vocabulary. A
    sequence with no scored token has sum 0 and mean 0."""
    checks.floating("token_logps", token_logps)
    checks.tensor("mask", mask)
    if mask.shape != token_logps.shape:
        raise ValueError(
            f"mask must have the shape of token_logps {tuple(token_logps.shape)}, "
            f"got {tuple(mask.shape)}"
        )
    mask = mask.bool()
    total = torch.where(mask, token_logps, 0.0).sum(-1)
    count = mask.sum(-1)
    return SequenceLogprobs(total, total / count.clamp_min(1), count)


class DPOLossOutput(NamedTuple):
    """Per-pair losses and the implicit rewards (detached), all (B,) fp32."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None,
    reference_rejected_logps: torch.Tensor | None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
) -> DPOLossOutput:
    """Per-pair preference losses from sequence log-probs, shape (B,) each.

    With u = (pi_c - pi_r) - (ref_c - ref_r):
      sigmoid: -(1 - eps) logsigmoid(beta u) - eps logsigmoid(-beta u)   (DPO)
      ipo:     (u - 1 / (2 beta))^2
      hinge:   relu(1 - beta u)
      simpo:   -(1 - eps) logsigmoid(beta (pi_c - pi_r) - gamma) - eps logsigmoid(-(...));
               pass length-averaged policy log-probs; reference arguments are ignored
               (may be None)
      sft:     -pi_c (pass length-averaged log-probs for the per-token NLL)
    Rewards are beta * (policy - reference), or beta * policy when no reference
    enters the loss (simpo; sft without references); they are detached, as in TRL.
    Computed in fp32 (float64 for float64 input).
    """
    checks.choice("loss_type", loss_type, LOSS_TYPES)
    beta = checks.positive_float("beta", beta)
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a number, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    if label_smoothing and loss_type not in _SMOOTHED:
        raise ValueError(f"label_smoothing applies to loss_type in {_SMOOTHED}, not {loss_type!r}")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(f"gamma must be a number, got {type(gamma).__name__}")

    named = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "reference_chosen_logps": reference_chosen_logps,
        "reference_rejected_logps": reference_rejected_logps,
    }
    uses_reference = loss_type in _NEEDS_REFERENCE or (
        loss_type == "sft" and reference_chosen_logps is not None
    )
    for name, value in named.items():
        if value is None:
            if name.startswith("policy") or (uses_reference and loss_type != "sft"):
                raise ValueError(f"{name} is required for loss_type={loss_type!r}")
            continue
        checks.floating(name, value)
    present = {k: v for k, v in named.items() if v is not None}
    shape = policy_chosen_logps.shape
    for name, value in present.items():
        if value.shape != shape:
            raise ValueError(
                f"{name} has shape {tuple(value.shape)}, expected {tuple(shape)} "
                "(the shape of policy_chosen_logps)"
            )
    checks.same_device(**present)

    cdt = torch.float64 if policy_chosen_logps.dtype == torch.float64 else torch.float32
    pi_c, pi_r = policy_chosen_logps.to(cdt), policy_rejected_logps.to(cdt)
    if uses_reference and reference_rejected_logps is not None:
        ref_c, ref_r = reference_chosen_logps.to(cdt), reference_rejected_logps.to(cdt)
    else:
        ref_c = ref_r = torch.zeros((), dtype=cdt, device=pi_c.device)

    eps = float(label_smoothing)
    if loss_type == "sigmoid":
        u = (pi_c - pi_r) - (ref_c - ref_r)
        losses = -(1 - eps) * F.logsigmoid(beta * u) - eps * F.logsigmoid(-beta * u)
    elif loss_type == "ipo":
        u = (pi_c - pi_r) - (ref_c - ref_r)
        losses = (u - 1.0 / (2.0 * beta)).square()
    elif loss_type == "hinge":
        u = (pi_c - pi_r) - (ref_c - ref_r)
        losses = torch.relu(1.0 - beta * u)
    elif loss_type == "simpo":
        x = beta * (pi_c - pi_r) - gamma
        losses = -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)
    else:  # sft
        losses = -pi_c

    if loss_type == "simpo":
        ref_c = ref_r = torch.zeros((), dtype=cdt, device=pi_c.device)
    chosen_rewards = (beta * (pi_c - ref_c)).detach()
    rejected_rewards = (beta * (pi_r - ref_r)).detach()
    return DPOLossOutput(losses, chosen_rewards, rejected_rewards)
