"""Preference losses on sequence log-probs (docs/design.md, "Preference losses")."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from decpo import checks
from decpo.numerics import accumulation_dtype

LOSS_TYPES = (
    "sigmoid",
    "ipo",
    "hinge",
    "simpo",
    "sft",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
)
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
_REFERENCE_FREE = ("simpo", "sft")
_SMOOTHED = ("sigmoid", "simpo", "exo_pair", "robust", "aot", "aot_unpaired")
# The f-DPO reparameterization only cancels log Z(x) in the chosen - rejected difference.
_F_DIVERGENCE_LOSSES = (
    "sigmoid",
    "sigmoid_norm",
    "hinge",
    "ipo",
    "exo_pair",
    "robust",
    "discopop",
    "sft",
)
_SORTED = ("aot", "aot_unpaired")


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


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _f_scores(logratios: torch.Tensor, f_divergence_type: str, coef: float) -> torch.Tensor:
    """f'(pi / ref) of the f-DPO paper, from log(pi / ref); reverse_kl is the identity."""
    if f_divergence_type == "forward_kl":  # f'(t) = 1 - 1/t
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":  # f'(t) = log(2t / (t + 1))
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence" and abs(coef - 1.0) >= 1e-6:
        # f'(t) = (t^(a - 1) - 1) / (a - 1); the exponent is clamped at 80 as in TRL
        t = torch.clamp((coef - 1.0) * logratios, max=80.0)
        return (torch.exp(t) - 1.0) * (1.0 / (coef - 1.0))
    return logratios  # reverse_kl, and alpha_divergence's limit at a = 1


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None,
    reference_rejected_logps: torch.Tensor | None,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
    loss_weights: Sequence[float] | None = None,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    bco_running_mean: float = 0.0,
    use_weighting: bool = False,
    chosen_wpo_logps: torch.Tensor | None = None,
    rejected_wpo_logps: torch.Tensor | None = None,
) -> DPOLossOutput:
    """Per-pair preference losses from sequence log-probs, shape (B,) each.

    The loss types and their arguments are TRL 1.16's (DPOConfig, DPOTrainer): the
    mean of the returned losses equals TRL's DPO loss on the same log-probs. Let
    lc = pi_c - ref_c and lr = pi_r - ref_r (log-ratios), sc = f'(lc), sr = f'(lr)
    (f_divergence_type; reverse_kl gives sc = lc), d = sc - sr, eps = label_smoothing:
      sigmoid:      -(1 - eps) logsigmoid(beta d) - eps logsigmoid(-beta d)   (DPO, cDPO).
                    TRL 1.16 ignores label_smoothing here; decpo keeps cDPO (eps = 0 is TRL)
      hinge:        relu(1 - beta d)
      ipo:          (d' - 1 / (2 beta))^2 with d' = sc / chosen_lengths - sr / rejected_lengths
                    when the lengths are given (TRL's per-token form), else d' = d (pass
                    length-averaged log-probs for TRL's form)
      exo_pair:     q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps), q_w = sigmoid(beta d),
                    q_l = sigmoid(-beta d); needs 0 < eps
      nca_pair:     -logsigmoid(beta lc) - logsigmoid(-beta lc) / 2 - logsigmoid(-beta lr) / 2
      robust:       (-(1 - eps) logsigmoid(beta d) + eps logsigmoid(-beta d)) / (1 - 2 eps);
                    needs eps < 0.5
      bco_pair:     -logsigmoid(beta lc - m) - logsigmoid(-(beta lr - m)) with m = bco_running_mean,
                    the running mean of the rewards, state the caller keeps (TRL 1.16: m = 0, the
                    default)
      sppo_hard:    (lc - 1 / (2 beta))^2 + (lr + 1 / (2 beta))^2
      aot:          the sigmoid loss (with eps) on sorted(pi_c - pi_r) - sorted(ref_c - ref_r)
      aot_unpaired: the sigmoid loss (with eps) on sorted(lc) - sorted(lr)
                    (both sort over dim 0, the batch: only the mean over pairs is meaningful)
      apo_zero:     1 - sigmoid(beta lc) + sigmoid(beta lr)
      apo_down:     sigmoid(beta lc) + 1 - sigmoid(beta (lc - lr))
      discopop:     (1 - s) (-logsigmoid(beta d)) + s exp(-beta d),
                    s = sigmoid(beta d / discopop_tau)
      sigmoid_norm: -logsigmoid(beta (sc / chosen_lengths - sr / rejected_lengths));
                    needs the lengths
      sft:          with chosen_lengths: -sum(pi_c) / sum(chosen_lengths) for every pair (TRL's
                    token-mean NLL over the batch, from summed log-probs); without: -pi_c (pass
                    length-averaged log-probs for a per-sequence token-mean NLL)
      simpo:        -(1 - eps) logsigmoid(beta (pi_c - pi_r) - gamma) - eps logsigmoid(-(...));
                    pass length-averaged policy log-probs; references are ignored (may be None)
    Lengths (chosen_lengths, rejected_lengths, (B,)) are token counts, clamped at 1 where
    they divide a score. f_divergence_type other than reverse_kl applies to sigmoid,
    sigmoid_norm, hinge, ipo, exo_pair, robust, discopop and sft only (as in TRL).

    loss_type may be a list: the losses are then sum_k loss_weights[k] * loss_k
    (loss_weights defaults to 1.0 each), whose mean is TRL's combined loss.

    use_weighting (WPO): each pair's loss is multiplied by exp(chosen_wpo_logps) *
    exp(rejected_wpo_logps) (detached), where *_wpo_logps is the per-sequence mean over
    the scored tokens of (log p(y_t) - log sum_v p_v^2) (see wpo_log_weights; the
    log sum p^2 statistic is TokenStats.log_sum_p2 of token_logprobs). Fallback when
    they are not passed: the policy's mean token log-probs pi / lengths (chosen_lengths
    and rejected_lengths then required; pi summed), i.e. the weights without the
    log sum p^2 alignment. Not allowed with aot, aot_unpaired (they sort the pairs).

    LD-DPO (TRL's ld_alpha): compute the four sequence log-probs with ld_logprobs and
    pass them here.

    Rewards are beta * (policy - reference), or beta * policy when no reference enters
    the loss (simpo; sft without references); they are detached, as in TRL.
    Computed in fp32 (float64 for float64 input). Bad arguments raise ValueError or
    TypeError naming the argument.
    """
    if isinstance(loss_type, str):
        loss_types: tuple = (loss_type,)
    elif isinstance(loss_type, (list, tuple)):
        loss_types = tuple(loss_type)
    else:
        raise TypeError(f"loss_type must be a str or a list of str, got {type(loss_type).__name__}")
    if not loss_types:
        raise ValueError("loss_type must name at least one loss type, got an empty list")
    for name in loss_types:
        checks.choice("loss_type", name, LOSS_TYPES)
    if loss_weights is None:
        weights = [1.0] * len(loss_types)
    else:
        if not isinstance(loss_weights, (list, tuple)):
            raise TypeError(
                f"loss_weights must be a list of numbers, got {type(loss_weights).__name__}"
            )
        if len(loss_weights) != len(loss_types):
            raise ValueError(
                f"loss_weights must have one weight per loss type: got {len(loss_weights)} "
                f"weights for {len(loss_types)} loss types"
            )
        weights = [_number("loss_weights", w) for w in loss_weights]
    beta = checks.positive_float("beta", beta)
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a number, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    if label_smoothing and not any(t in _SMOOTHED for t in loss_types):
        raise ValueError(f"label_smoothing applies to loss_type in {_SMOOTHED}, not {loss_type!r}")
    if "robust" in loss_types and label_smoothing >= 0.5:
        raise ValueError(
            f"label_smoothing must be < 0.5 for loss_type 'robust', got {label_smoothing}"
        )
    if "exo_pair" in loss_types and label_smoothing == 0.0:
        raise ValueError(
            "label_smoothing must be > 0 for loss_type 'exo_pair' (the EXO paper recommends 1e-3)"
        )
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(f"gamma must be a number, got {type(gamma).__name__}")
    discopop_tau = checks.positive_float("discopop_tau", discopop_tau)
    checks.choice("f_divergence_type", f_divergence_type, F_DIVERGENCE_TYPES)
    if f_divergence_type != "reverse_kl" and not all(t in _F_DIVERGENCE_LOSSES for t in loss_types):
        raise ValueError(
            f"f_divergence_type={f_divergence_type!r} applies to loss_type in "
            f"{_F_DIVERGENCE_LOSSES} only, got {loss_type!r}"
        )
    alpha_coef = _number("f_alpha_divergence_coef", f_alpha_divergence_coef)
    bco_mean = _number("bco_running_mean", bco_running_mean)
    checks.flag("use_weighting", use_weighting)
    if use_weighting and any(t in _SORTED for t in loss_types):
        raise ValueError("use_weighting is not supported with loss_type 'aot' or 'aot_unpaired'")

    reference_free = all(t in _REFERENCE_FREE for t in loss_types)
    named = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "reference_chosen_logps": reference_chosen_logps,
        "reference_rejected_logps": reference_rejected_logps,
    }
    for name, value in named.items():
        if value is None:
            if name.startswith("policy") or not reference_free:
                raise ValueError(f"{name} is required for loss_type={loss_type!r}")
            continue
        checks.floating(name, value)
    optional = {
        "chosen_lengths": chosen_lengths,
        "rejected_lengths": rejected_lengths,
        "chosen_wpo_logps": chosen_wpo_logps,
        "rejected_wpo_logps": rejected_wpo_logps,
    }
    for name, value in optional.items():
        if value is not None:
            (checks.floating if "wpo" in name else checks.tensor)(name, value)
    lengths_needed = [t for t in loss_types if t == "sigmoid_norm"]
    if use_weighting and chosen_wpo_logps is None and rejected_wpo_logps is None:
        lengths_needed.append("use_weighting without chosen_wpo_logps (the fallback)")
    for name in ("chosen_lengths", "rejected_lengths"):
        if optional[name] is None and lengths_needed:
            raise ValueError(f"{name} is required for {lengths_needed[0]}")
    if "ipo" in loss_types and (chosen_lengths is None) != (rejected_lengths is None):
        missing = "chosen_lengths" if chosen_lengths is None else "rejected_lengths"
        raise ValueError(f"{missing} is required with the other length for loss_type 'ipo'")
    if use_weighting and (chosen_wpo_logps is None) != (rejected_wpo_logps is None):
        missing = "chosen_wpo_logps" if chosen_wpo_logps is None else "rejected_wpo_logps"
        raise ValueError(f"{missing} is required with the other WPO log-weight")
    present = {k: v for k, v in {**named, **optional}.items() if v is not None}
    shape = policy_chosen_logps.shape
    for name, value in present.items():
        if value.shape != shape:
            raise ValueError(
                f"{name} has shape {tuple(value.shape)}, expected {tuple(shape)} "
                "(the shape of policy_chosen_logps)"
            )
    checks.same_device(**present)

    cdt = accumulation_dtype(policy_chosen_logps.dtype)
    pi_c, pi_r = policy_chosen_logps.to(cdt), policy_rejected_logps.to(cdt)
    zero = torch.zeros((), dtype=cdt, device=pi_c.device)
    has_reference = reference_chosen_logps is not None and reference_rejected_logps is not None
    if not reference_free or (has_reference and "simpo" not in loss_types):
        ref_c, ref_r = reference_chosen_logps.to(cdt), reference_rejected_logps.to(cdt)
    else:
        ref_c = ref_r = zero

    eps = float(label_smoothing)
    chosen_lr, rejected_lr = pi_c - ref_c, pi_r - ref_r
    chosen_scores = _f_scores(chosen_lr, f_divergence_type, alpha_coef)
    rejected_scores = _f_scores(rejected_lr, f_divergence_type, alpha_coef)
    delta = chosen_scores - rejected_scores
    len_c = None if chosen_lengths is None else chosen_lengths.to(cdt)
    len_r = None if rejected_lengths is None else rejected_lengths.to(cdt)

    def smoothed(x: torch.Tensor) -> torch.Tensor:
        return -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)

    losses = None
    for name, weight in zip(loss_types, weights, strict=True):
        if name == "sigmoid":
            per_pair = smoothed(beta * delta)
        elif name == "hinge":
            per_pair = torch.relu(1 - beta * delta)
        elif name == "ipo":
            d = delta
            if len_c is not None:
                d = chosen_scores / len_c.clamp(min=1.0) - rejected_scores / len_r.clamp(min=1.0)
            per_pair = (d - 1 / (2 * beta)) ** 2
        elif name == "exo_pair":
            x = beta * delta
            per_pair = torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps)) + torch.sigmoid(
                -x
            ) * (F.logsigmoid(-x) - math.log(eps))
        elif name == "nca_pair":
            cr, rr = beta * chosen_lr, beta * rejected_lr
            per_pair = -F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rr)
        elif name == "robust":
            clean = -(1 - eps) * F.logsigmoid(beta * delta)
            flipped = -eps * F.logsigmoid(-beta * delta)
            per_pair = (clean - flipped) / (1 - 2 * eps)
        elif name == "bco_pair":
            cr, rr = beta * chosen_lr, beta * rejected_lr
            per_pair = -F.logsigmoid(cr - bco_mean) - F.logsigmoid(-(rr - bco_mean))
        elif name == "sppo_hard":
            per_pair = (chosen_lr - 0.5 / beta) ** 2 + (rejected_lr + 0.5 / beta) ** 2
        elif name == "aot":
            d = torch.sort(pi_c - pi_r, dim=0)[0] - torch.sort(ref_c - ref_r, dim=0)[0]
            per_pair = smoothed(beta * d)
        elif name == "aot_unpaired":
            d = torch.sort(chosen_lr, dim=0)[0] - torch.sort(rejected_lr, dim=0)[0]
            per_pair = smoothed(beta * d)
        elif name == "apo_zero":
            per_pair = 1 - torch.sigmoid(beta * chosen_lr) + torch.sigmoid(beta * rejected_lr)
        elif name == "apo_down":
            per_pair = torch.sigmoid(beta * chosen_lr) + (
                1 - torch.sigmoid(beta * (chosen_lr - rejected_lr))
            )
        elif name == "discopop":
            logits = delta * beta
            s = torch.sigmoid(logits / discopop_tau)
            per_pair = -F.logsigmoid(logits) * (1 - s) + torch.exp(-logits) * s
        elif name == "sigmoid_norm":
            d = chosen_scores / len_c.clamp(min=1.0) - rejected_scores / len_r.clamp(min=1.0)
            per_pair = -F.logsigmoid(beta * d)
        elif name == "simpo":
            per_pair = smoothed(beta * (pi_c - pi_r) - gamma)
        else:  # sft
            if len_c is None:
                per_pair = -pi_c
            else:
                per_pair = (-(pi_c.sum() / len_c.sum())).expand(pi_c.shape)
        per_pair = per_pair if len(loss_types) == 1 and weight == 1.0 else weight * per_pair
        losses = per_pair if losses is None else losses + per_pair

    if use_weighting:
        if chosen_wpo_logps is not None:
            log_wc, log_wr = chosen_wpo_logps.to(cdt), rejected_wpo_logps.to(cdt)
        else:
            log_wc, log_wr = pi_c / len_c.clamp(min=1.0), pi_r / len_r.clamp(min=1.0)
        losses = losses * (torch.exp(log_wc.detach()) * torch.exp(log_wr.detach()))

    if "simpo" in loss_types and reference_free:
        ref_c = ref_r = zero
    chosen_rewards = (beta * (pi_c - ref_c)).detach()
    rejected_rewards = (beta * (pi_r - ref_r)).detach()
    return DPOLossOutput(losses, chosen_rewards, rejected_rewards)


def wpo_log_weights(
    token_logps: torch.Tensor, log_sum_sq_probs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """WPO's per-sequence log-weight (WPO paper, Eq. 2, as in TRL's use_weighting): the
    mean over the scored tokens (mask) of log p(y_t) - log sum_v p_v^2, detached. Pass
    it as dpo_loss's chosen_wpo_logps / rejected_wpo_logps. log_sum_sq_probs is the
    per-token statistic TokenStats.log_sum_p2."""
    checks.floating("log_sum_sq_probs", log_sum_sq_probs)
    if log_sum_sq_probs.shape != token_logps.shape:
        raise ValueError(
            f"log_sum_sq_probs must have the shape of token_logps {tuple(token_logps.shape)}, "
            f"got {tuple(log_sum_sq_probs.shape)}"
        )
    return sequence_logprobs(token_logps - log_sum_sq_probs, mask).mean.detach()


def ld_logprobs(
    chosen_token_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_token_logps: torch.Tensor,
    rejected_mask: torch.Tensor,
    ld_alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LD-DPO's length-desensitized sequence log-probs (TRL's ld_alpha), for chosen and
    rejected (B,) each: per pair, with s = min(chosen length, rejected length) scored
    tokens, the sum over each response's first s scored tokens plus ld_alpha times the
    sum over its remaining scored tokens. Token log-probs (B, T) with masks (B, T) (the
    chosen and rejected T may differ). Apply it to the policy and to the reference
    token log-probs and pass the four results to dpo_loss. ld_alpha in [0, 1]; 1 is DPO."""
    ld_alpha = _number("ld_alpha", ld_alpha)
    if not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"ld_alpha must be in [0, 1], got {ld_alpha}")
    chosen = sequence_logprobs(chosen_token_logps, chosen_mask)
    rejected = sequence_logprobs(rejected_token_logps, rejected_mask)
    if chosen.count.shape != rejected.count.shape:
        raise ValueError(
            f"rejected_token_logps must have the batch shape of chosen_token_logps "
            f"{tuple(chosen.count.shape)}, got {tuple(rejected.count.shape)}"
        )
    shared = torch.minimum(chosen.count, rejected.count).unsqueeze(-1)
    out = []
    for logps, mask in ((chosen_token_logps, chosen_mask), (rejected_token_logps, rejected_mask)):
        mask = mask.bool()
        pos = mask.long().cumsum(-1)
        head = torch.where(mask & (pos <= shared), logps, 0.0).sum(-1)
        tail = torch.where(mask & (pos > shared), logps, 0.0).sum(-1)
        out.append(head + ld_alpha * tail)
    return out[0], out[1]
