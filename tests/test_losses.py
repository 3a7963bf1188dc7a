"""dpo_loss against the formulas of DESIGN section 1, written out in float64."""

from __future__ import annotations

import math

import pytest
import torch

import decpo


def _logps(batch=7, dtype=torch.float32):
    torch.manual_seed(1)
    return [(-torch.rand(batch, dtype=torch.float64) * 50).to(dtype) for _ in range(4)]


def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def _expected(loss_type, pc, pr, rc, rr, beta, eps, gamma):
    u = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        return -(1 - eps) * _logsigmoid(beta * u) - eps * _logsigmoid(-beta * u)
    if loss_type == "ipo":
        return (u - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return max(0.0, 1 - beta * u)
    if loss_type == "simpo":
        x = beta * (pc - pr) - gamma
        return -(1 - eps) * _logsigmoid(x) - eps * _logsigmoid(-x)
    return -pc


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "simpo", "sft"])
@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_formulas(loss_type, beta):
    pc, pr, rc, rr = _logps()
    eps = 0.1 if loss_type in ("sigmoid", "simpo") else 0.0
    out = decpo.dpo_loss(
        pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps, gamma=0.3
    )
    assert isinstance(out, decpo.DPOLossOutput)
    losses, chosen, rejected = out
    expected = [
        _expected(loss_type, *(float(x[i]) for x in (pc, pr, rc, rr)), beta, eps, 0.3)
        for i in range(len(pc))
    ]
    torch.testing.assert_close(
        losses.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6
    )
    if loss_type == "simpo":
        torch.testing.assert_close(chosen, beta * pc)
        torch.testing.assert_close(rejected, beta * pr)
    else:
        torch.testing.assert_close(chosen, beta * (pc - rc))
        torch.testing.assert_close(rejected, beta * (pr - rr))


def test_gradients_and_detached_rewards():
    pc, pr, rc, rr = _logps(dtype=torch.float64)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    losses, chosen, rejected = decpo.dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert not chosen.requires_grad and not rejected.requires_grad
    assert torch.autograd.gradcheck(
        lambda a, b: decpo.dpo_loss(a, b, rc, rr, beta=0.5, label_smoothing=0.2).losses, (pc, pr)
    )
    losses.sum().backward()
    # d/d pi_c of -logsigmoid(beta u) = -beta sigmoid(-beta u)
    u = (pc - pr) - (rc - rr)
    torch.testing.assert_close(pc.grad, -0.5 * torch.sigmoid(-0.5 * u.detach()))


def test_bf16_inputs_compute_in_fp32():
    pc, pr, rc, rr = _logps(dtype=torch.bfloat16)
    losses = decpo.dpo_loss(pc, pr, rc, rr).losses
    assert losses.dtype == torch.float32


def test_simpo_and_sft_need_no_reference():
    pc, pr, _, _ = _logps()
    assert decpo.dpo_loss(pc, pr, None, None, loss_type="simpo").losses.shape == pc.shape
    torch.testing.assert_close(decpo.dpo_loss(pc, pr, None, None, loss_type="sft").losses, -pc)


def test_bad_inputs():
    pc, pr, rc, rr = _logps()
    with pytest.raises(ValueError, match="loss_type"):
        decpo.dpo_loss(pc, pr, rc, rr, loss_type="kto")
    with pytest.raises(ValueError, match="beta"):
        decpo.dpo_loss(pc, pr, rc, rr, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        decpo.dpo_loss(pc, pr, rc, rr, label_smoothing=0.7)
    with pytest.raises(ValueError, match="label_smoothing"):
        decpo.dpo_loss(pc, pr, rc, rr, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="reference_chosen_logps"):
        decpo.dpo_loss(pc, pr, None, rr)
    with pytest.raises(ValueError, match="policy_rejected_logps"):
        decpo.dpo_loss(pc, pr[:3], rc, rr)
    with pytest.raises(TypeError, match="policy_chosen_logps"):
        decpo.dpo_loss(pc.long(), pr, rc, rr)
    with pytest.raises(TypeError, match="policy_chosen_logps"):
        decpo.dpo_loss([1.0], pr, rc, rr)


def test_nan_in_gives_nan_out():
    pc, pr, rc, rr = _logps()
    pc[2] = float("nan")
    for loss_type in ("sigmoid", "ipo", "hinge", "simpo", "sft"):
        losses = decpo.dpo_loss(pc, pr, rc, rr, loss_type=loss_type).losses
        assert torch.isnan(losses[2]) and torch.isfinite(losses[[0, 1, 3]]).all(), loss_type


def test_sequence_logprobs():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, float("nan"), -6.0], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[True, True, False], [True, False, True], [False, False, False]])
    out = decpo.sequence_logprobs(logps, mask)
    assert out.sum.tolist() == [-3.0, -10.0, 0.0]
    assert out.mean.tolist() == [-1.5, -5.0, 0.0]
    assert out.count.tolist() == [2, 2, 0]
    with pytest.raises(ValueError, match="mask"):
        decpo.sequence_logprobs(logps, mask[:2])
