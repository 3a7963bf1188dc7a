"""dpo_loss against the formulas of docs/design.md ("Preference losses"), written out in
float64."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import decpo
from decpo.losses import ld_logprobs, wpo_log_weights


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


# --- parity with TRL 1.16's DPOTrainer -------------------------------------------------

TRL_LOSS_TYPES = [
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]  # fmt: skip
# label_smoothing each loss type is tested with (TRL 1.16 reads it in these four only)
SMOOTHING = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.1, "aot_unpaired": 0.1}
F_DIVERGENCE_LOSSES = [
    "sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft",
]  # fmt: skip


def _trl_trainer():
    pytest.importorskip(
        "trl",
        minversion="1.16",
        reason="TRL >= 1.16 is not installed: the parity tests compare with its DPOTrainer",
    )
    module = pytest.importorskip(
        "trl.trainer.dpo_trainer",
        reason="TRL is not installed: the parity tests compare with TRL 1.16's DPOTrainer",
    )
    return module.DPOTrainer


class _StubModel(torch.nn.Module):
    """Stands in for TRL's fused-LM-head model: returns the given per-token log-probs
    (0 outside the completion, as TRL's labels=-100 give)."""

    def __init__(self, token_logps, shift_mask, log_sum_sq_probs=None):
        super().__init__()
        self.is_gradient_checkpointing = False
        self.token_logps, self.shift_mask, self.lss = token_logps, shift_mask, log_sum_sq_probs

    def forward(self, **kwargs):
        zeros = torch.zeros_like(self.token_logps.detach())
        return SimpleNamespace(
            log_probs=self.token_logps * self.shift_mask.to(self.token_logps.dtype),
            entropy=zeros,
            mean_logits=zeros,
            is_top1=zeros.bool(),
            log_sum_sq_probs=self.lss,
        )


def _pairs(dtype, batch=6, length=14, seed=0):
    """Per-token policy and reference log-probs (2B, L-1), chosen rows first as in TRL,
    a completion mask (2B, L) with a prompt of 1-4 tokens and 1-9 completion tokens,
    and a per-token log sum p^2 (<= 0)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * batch, length, dtype=torch.long)
    for row in range(2 * batch):
        start = int(torch.randint(1, 5, (), generator=g))
        mask[row, start : start + int(torch.randint(1, 10, (), generator=g))] = 1
    shape = (2 * batch, length - 1)
    policy = (-torch.rand(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    ref = (policy.double() + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    lss = (-torch.rand(shape, generator=g, dtype=torch.float64) * 2).to(dtype)
    return policy.requires_grad_(True), ref, mask, lss


def _trl_loss(policy, ref, mask, lss, *, loss_type, beta, label_smoothing=0.0, loss_weights=None,
              discopop_tau=0.05, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
              use_weighting=False, ld_alpha=None):  # fmt: skip
    """TRL 1.16's DPOTrainer._compute_loss on the given per-token log-probs, with a stub
    trainer carrying the DPOConfig fields the loss reads."""
    trainer_cls = _trl_trainer()
    shift = mask[:, 1:]
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    model = _StubModel(policy, shift, lss if use_weighting else None)
    stub = SimpleNamespace(
        model=model,
        ref_model=_StubModel(ref, shift),
        accelerator=SimpleNamespace(
            device=policy.device, gather_for_metrics=lambda x: x, gather=lambda x: x
        ),
        aux_loss_enabled=False,
        precompute_ref_logps=False,
        beta=beta,
        loss_types=loss_types,
        loss_weights=loss_weights or [1.0] * len(loss_types),
        ld_alpha=ld_alpha,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        label_smoothing=label_smoothing,
        use_weighting=use_weighting,
        args=SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros_like(mask),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
    }
    return trainer_cls._compute_loss(stub, model, inputs, False)


def _decpo_loss(policy, ref, mask, lss, *, use_weighting=False, ld_alpha=None, **kwargs):
    """decpo's loss on the same per-token log-probs: sequence sums (LD-DPO's when
    ld_alpha is set), completion lengths and WPO log-weights, then the mean of dpo_loss."""
    shift = mask[:, 1:]
    b = shift.shape[0] // 2
    if ld_alpha is None:
        pol, rf = (decpo.sequence_logprobs(x, shift).sum for x in (policy, ref))
        pc, pr, rc, rr = pol[:b], pol[b:], rf[:b], rf[b:]
    else:
        pc, pr = ld_logprobs(policy[:b], shift[:b], policy[b:], shift[b:], ld_alpha)
        rc, rr = ld_logprobs(ref[:b], shift[:b], ref[b:], shift[b:], ld_alpha)
    lengths = shift.sum(-1)
    extra = {}
    if use_weighting:
        w = wpo_log_weights(policy, lss, shift)
        extra = {"chosen_wpo_logps": w[:b], "rejected_wpo_logps": w[b:]}
    out = decpo.dpo_loss(
        pc, pr, rc, rr, chosen_lengths=lengths[:b], rejected_lengths=lengths[b:],
        use_weighting=use_weighting, **extra, **kwargs,
    )  # fmt: skip
    return out.losses.mean()


def _check_parity(dtype, trl_dtype=None, rtol=None, atol=None, seed=0, **kwargs):
    """Loss value and gradient w.r.t. the per-token policy log-probs, decpo vs TRL."""
    trl_dtype = trl_dtype or dtype
    policy, ref, mask, lss = _pairs(dtype, seed=seed)
    trl_policy = policy.detach().to(trl_dtype).requires_grad_(True)
    expected = _trl_loss(trl_policy, ref.to(trl_dtype), mask, lss.to(trl_dtype), **kwargs)
    expected.backward()
    got = _decpo_loss(policy, ref, mask, lss, **kwargs)
    got.backward()
    assert got.dtype == dtype
    if rtol is None:
        rtol, atol = (1e-10, 1e-12) if dtype == trl_dtype == torch.float64 else (2e-5, 1e-6)
    torch.testing.assert_close(got, expected.to(dtype), rtol=rtol, atol=atol)
    assert trl_policy.grad is not None and trl_policy.grad.abs().sum() > 0
    torch.testing.assert_close(policy.grad, trl_policy.grad.to(dtype), rtol=rtol, atol=atol)


_DTYPES = [torch.float64, torch.float32]


@pytest.mark.parametrize("dtype", _DTYPES, ids=["fp64", "fp32"])
@pytest.mark.parametrize("beta", [0.1, 1.0])
@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_trl_parity_each_loss_type(loss_type, beta, dtype):
    eps = SMOOTHING.get(loss_type, 0.0)
    # TRL computes exo_pair's log(eps) and log(1 - eps) in fp32 even for float64 input
    rtol = 1e-6 if loss_type == "exo_pair" and dtype == torch.float64 else None
    _check_parity(dtype, rtol=rtol, atol=rtol and 1e-8, loss_type=loss_type, beta=beta,
                  label_smoothing=eps)  # fmt: skip


@pytest.mark.parametrize("dtype", _DTYPES, ids=["fp64", "fp32"])
@pytest.mark.parametrize(
    ("loss_type", "loss_weights", "eps"),
    [
        (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], 0.0),  # MPO
        (["sigmoid", "sft"], None, 0.0),  # RPO-style
        (["exo_pair", "robust", "aot", "aot_unpaired"], [0.5, 1.5, 1.0, -0.25], 0.2),
        (["ipo", "sigmoid_norm", "apo_zero", "apo_down"], [1.0, 2.0, 0.5, 0.3], 0.0),
        (["hinge", "nca_pair", "sppo_hard", "discopop"], [0.1, 1.0, 0.01, 3.0], 0.0),
    ],
)
def test_trl_parity_loss_type_lists_with_weights(loss_type, loss_weights, eps, dtype):
    rtol = 1e-6 if "exo_pair" in loss_type and dtype == torch.float64 else None
    _check_parity(dtype, rtol=rtol, atol=rtol and 1e-8, loss_type=loss_type,
                  loss_weights=loss_weights, beta=0.3, label_smoothing=eps)  # fmt: skip


@pytest.mark.parametrize("dtype", _DTYPES, ids=["fp64", "fp32"])
@pytest.mark.parametrize(("loss_type", "eps"), [("robust", 0.0), ("robust", 0.3),
    ("exo_pair", 0.05), ("exo_pair", 0.5), ("aot", 0.4), ("aot_unpaired", 0.25)])  # fmt: skip
def test_trl_parity_label_smoothing(loss_type, eps, dtype):
    rtol = 1e-6 if loss_type == "exo_pair" and dtype == torch.float64 else None
    _check_parity(dtype, rtol=rtol, atol=rtol and 1e-8, loss_type=loss_type, beta=0.5,
                  label_smoothing=eps, seed=3)  # fmt: skip


@pytest.mark.parametrize("dtype", _DTYPES, ids=["fp64", "fp32"])
@pytest.mark.parametrize("tau", [0.05, 0.5, 3.0])
def test_trl_parity_discopop_tau(tau, dtype):
    _check_parity(dtype, loss_type="discopop", beta=0.2, discopop_tau=tau, seed=5)


@pytest.mark.parametrize("dtype", _DTYPES, ids=["fp64", "fp32"])
@pytest.mark.parametrize(
    ("f_divergence_type", "coef"),
    [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5),
     ("alpha_divergence", 0.2), ("alpha_divergence", 1.0)],
)  # fmt: skip
@pytest.mark.parametrize("loss_type", F_DIVERGENCE_LOSSES)
def test_trl_parity_f_divergences(loss_type, f_divergence_type, coef, dtype):
    # TRL 1.16's alpha_divergence has no float64 path (its clamp table lacks float64):
    # decpo in float64 is compared with TRL in fp32
    trl_dtype = torch.float32 if f_divergence_type == "alpha_divergence" else None
    rtol = None
    if loss_type == "exo_pair" and dtype == torch.float64:
        rtol = 1e-6
    if trl_dtype is not None and dtype == torch.float64:
        rtol = 2e-5
    _check_parity(dtype, trl_dtype=trl_dtype, rtol=rtol, atol=rtol and 1e-6,
                  loss_type=loss_type, beta=0.5, label_smoothing=SMOOTHING.get(loss_type, 0.0),
                  f_divergence_type=f_divergence_type, f_alpha_divergence_coef=coef)  # fmt: skip


@pytest.mark.parametrize("dtype", _DTYPES, ids=["fp64", "fp32"])
@pytest.mark.parametrize(
    "loss_type", ["sigmoid", "ipo", "bco_pair", "discopop", "apo_down", ["sigmoid", "nca_pair"]]
)
def test_trl_parity_wpo_weighting(loss_type, dtype):
    _check_parity(dtype, loss_type=loss_type, beta=0.4, use_weighting=True, seed=7)


@pytest.mark.parametrize("loss_type", ["sft", "hinge", ["sigmoid", "sft"]])
def test_wpo_weighting_where_trl_fails(loss_type):
    """TRL 1.16 scales the per-pair loss in place (per_sequence_loss *= weights), which
    raises for sft (an expanded tensor) and breaks hinge's backward (relu's output):
    decpo applies the same weights out of place."""
    policy, ref, mask, lss = _pairs(torch.float64, seed=7)
    shift = mask[:, 1:]
    pol, rf = (decpo.sequence_logprobs(x, shift).sum for x in (policy, ref))
    lengths, w = shift.sum(-1), wpo_log_weights(policy, lss, shift)
    args = (pol[:6], pol[6:], rf[:6], rf[6:])
    common = {
        "loss_type": loss_type,
        "chosen_lengths": lengths[:6],
        "rejected_lengths": lengths[6:],
    }
    plain = decpo.dpo_loss(*args, **common).losses
    weighted = decpo.dpo_loss(*args, **common, use_weighting=True, chosen_wpo_logps=w[:6],
                              rejected_wpo_logps=w[6:]).losses  # fmt: skip
    torch.testing.assert_close(weighted, plain * torch.exp(w[:6]) * torch.exp(w[6:]))
    weighted.sum().backward()
    assert policy.grad is not None and torch.isfinite(policy.grad).all()
    # the fallback without log sum p^2: the policy's mean token log-probs
    fallback = decpo.dpo_loss(*args, **common, use_weighting=True).losses
    mean = pol / lengths
    torch.testing.assert_close(fallback, plain * torch.exp(mean[:6]) * torch.exp(mean[6:]))


@pytest.mark.parametrize("dtype", _DTYPES, ids=["fp64", "fp32"])
@pytest.mark.parametrize("ld_alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "apo_zero", "aot"])
def test_trl_parity_ld_dpo(loss_type, ld_alpha, dtype):
    _check_parity(dtype, loss_type=loss_type, beta=0.1, ld_alpha=ld_alpha, seed=11)


def test_trl_parity_ld_dpo_with_wpo_and_f_divergence():
    _check_parity(torch.float64, loss_type=["sigmoid", "ipo"], beta=0.2, ld_alpha=0.3,
                  use_weighting=True, f_divergence_type="js_divergence", seed=13)  # fmt: skip


def test_bad_arguments_name_the_argument():
    pc, pr, rc, rr = _logps()
    lengths = torch.full_like(pc, 5.0)
    cases = [
        ({"loss_type": ["sigmoid", "kto"]}, "loss_type"),
        ({"loss_type": []}, "loss_type"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "loss_weights"),
        ({"loss_weights": [float("nan")]}, "loss_weights"),
        ({"loss_type": "discopop", "discopop_tau": 0.0}, "discopop_tau"),
        ({"f_divergence_type": "kl"}, "f_divergence_type"),
        ({"loss_type": "nca_pair", "f_divergence_type": "forward_kl"}, "f_divergence_type"),
        ({"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": math.inf},
         "f_alpha_divergence_coef"),
        ({"loss_type": "exo_pair"}, "label_smoothing"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, "label_smoothing"),
        ({"loss_type": ["hinge", "nca_pair"], "label_smoothing": 0.1}, "label_smoothing"),
        ({"loss_type": "aot", "use_weighting": True}, "use_weighting"),
        ({"loss_type": "sigmoid_norm"}, "chosen_lengths"),
        ({"loss_type": "sigmoid_norm", "chosen_lengths": lengths}, "rejected_lengths"),
        ({"loss_type": "ipo", "rejected_lengths": lengths}, "chosen_lengths"),
        ({"loss_type": "sigmoid_norm", "chosen_lengths": lengths[:3], "rejected_lengths": lengths},
         "chosen_lengths"),
        ({"use_weighting": True}, "chosen_lengths"),
        ({"use_weighting": True, "chosen_wpo_logps": pc}, "rejected_wpo_logps"),
        ({"loss_type": "bco_pair", "bco_running_mean": float("nan")}, "bco_running_mean"),
        ({"loss_type": "apo_zero", "beta": -1.0}, "beta"),
    ]  # fmt: skip
    for kwargs, name in cases:
        with pytest.raises(ValueError, match=name):
            decpo.dpo_loss(pc, pr, rc, rr, **kwargs)
    with pytest.raises(ValueError, match="reference_chosen_logps"):
        decpo.dpo_loss(pc, pr, None, None, loss_type=["simpo", "apo_down"])
    with pytest.raises(TypeError, match="loss_type"):
        decpo.dpo_loss(pc, pr, rc, rr, loss_type=3)
    with pytest.raises(TypeError, match="use_weighting"):
        decpo.dpo_loss(pc, pr, rc, rr, use_weighting=1)
    with pytest.raises(ValueError, match="ld_alpha"):
        ld_logprobs(pc[None], torch.ones(1, 7, dtype=torch.bool), pr[None],
                    torch.ones(1, 7, dtype=torch.bool), 1.5)  # fmt: skip


def test_bco_running_mean_shifts_the_rewards():
    pc, pr, rc, rr = _logps(dtype=torch.float64)
    m, beta = 0.7, 0.2
    got = decpo.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="bco_pair", bco_running_mean=m)
    cr, rj = beta * (pc - rc), beta * (pr - rr)
    expected = -torch.nn.functional.logsigmoid(cr - m) - torch.nn.functional.logsigmoid(m - rj)
    torch.testing.assert_close(got.losses, expected)


def test_ld_logprobs_splits_at_the_shared_length():
    chosen = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-1.0, -1.0, 0.0, 0.0]])
    cmask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    rejected = torch.tensor([[-5.0, -6.0, -7.0], [-2.0, -2.0, -2.0]])
    rmask = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    c, r = ld_logprobs(chosen, cmask, rejected, rmask, 0.25)
    # pair 0 shares 1 token: chosen -2 + 0.25 (-3 - 4); pair 1 shares 2: rejected -4 + 0.25 (-2)
    assert c.tolist() == [-2.0 + 0.25 * -7.0, -2.0]
    assert r.tolist() == [-5.0, -4.0 + 0.25 * -2.0]


@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_new_loss_types_bf16_and_nan(loss_type):
    pc, pr, rc, rr = _logps(dtype=torch.bfloat16)
    lengths = torch.arange(1.0, 8.0)
    kwargs = {"loss_type": loss_type, "label_smoothing": SMOOTHING.get(loss_type, 0.0),
              "chosen_lengths": lengths, "rejected_lengths": lengths.flip(0)}  # fmt: skip
    losses = decpo.dpo_loss(pc, pr, rc, rr, **kwargs).losses
    assert losses.dtype == torch.float32 and torch.isfinite(losses).all()
    pc = pc.float()
    pc[2] = float("nan")
    losses = decpo.dpo_loss(pc, pr, rc, rr, **kwargs).losses
    if loss_type in ("sft", "aot", "aot_unpaired"):  # batch-level: one NaN reaches the mean
        assert torch.isnan(losses.mean())
    else:
        assert torch.isnan(losses[2]) and torch.isfinite(losses[[0, 1, 3]]).all()


def test_wpo_log_weights_from_token_logprobs_stats():
    torch.manual_seed(0)
    h = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 8, dtype=torch.float64)
    targets = torch.randint(0, 11, (2, 6))
    targets[:, :2] = -100
    logp, stats = decpo.token_logprobs(h, w, targets, return_stats=True, backend="torch")
    mask = targets != -100
    got = wpo_log_weights(logp, stats.log_sum_p2, mask)
    assert logp.requires_grad
    probs = torch.softmax(h.detach() @ w.T, -1)
    aligned = torch.log(torch.gather(probs, -1, targets.clamp(min=0)[..., None])[..., 0])
    aligned = aligned - torch.log(probs.square().sum(-1))
    torch.testing.assert_close(got, (aligned * mask).sum(-1) / mask.sum(-1))
    assert not got.requires_grad
