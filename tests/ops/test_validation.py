"""Bad input at the public boundary: a TypeError or ValueError that names the argument."""

from __future__ import annotations

import pytest
import torch

import decpo
from tests.helpers import backends

H = torch.randn(6, 4)
W = torch.randn(9, 4)
T = torch.randint(0, 9, (6,))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"hidden": H.long()}, TypeError, "hidden"),
        ({"hidden": [[1.0]]}, TypeError, "hidden"),
        ({"hidden": torch.randn(4)}, ValueError, "hidden"),
        ({"hidden": torch.randn(2, 3, 4, 5)}, ValueError, "hidden"),
        ({"hidden": torch.randn(3, 0)}, ValueError, "hidden"),
        ({"mask": torch.ones(6)}, TypeError, "mask"),
        ({"mask": torch.ones(5, dtype=torch.bool)}, ValueError, "mask"),
        ({"segment_ids": torch.zeros(6)}, TypeError, "segment_ids"),
        ({"segment_ids": torch.zeros(7, dtype=torch.long)}, ValueError, "segment_ids"),
        ({"reduction": "max"}, ValueError, "reduction"),
        ({"normalize": 1}, TypeError, "normalize"),
        ({"offdiag": "yes"}, TypeError, "offdiag"),
        ({"backend": "cuda"}, ValueError, "backend"),
    ],
)
def test_decorrelation_rejects(kwargs, exc, match):
    args = {"hidden": H} | kwargs
    hidden = args.pop("hidden")
    with pytest.raises(exc, match=match):
        decpo.decorrelation_penalty(hidden, **args)


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((H.int(), W, T), {}, TypeError, "hidden"),
        ((H, W.long(), T), {}, TypeError, "weight"),
        ((H, W, T.float()), {}, TypeError, "targets"),
        ((H, W, T.bool()), {}, TypeError, "targets"),
        ((H, W[:, :3], T), {}, ValueError, "weight"),
        ((H, W[0], T), {}, ValueError, "weight"),
        ((H, W[:0], T[:0]), {}, ValueError, "weight"),
        ((H, W, T[:5]), {}, ValueError, "targets"),
        ((H, W.double(), T), {}, ValueError, "dtypes"),
        ((H, W, T), {"bias": torch.zeros(8)}, ValueError, "bias"),
        ((H, W, T), {"bias": torch.zeros(9, dtype=torch.float64)}, ValueError, "dtypes"),
        ((H, W, T), {"temperature": 0.0}, ValueError, "temperature"),
        ((H, W, T), {"temperature": float("nan")}, ValueError, "temperature"),
        ((H, W, T), {"ignore_index": 1.5}, TypeError, "ignore_index"),
        ((H, W, torch.tensor([0, 1, 2, 9, 3, 4])), {}, ValueError, "targets"),
        ((H, W, torch.tensor([0, 1, 2, -1, 3, 4])), {}, ValueError, "targets"),
        ((H, W, T), {"backend": "jax"}, ValueError, "backend"),
    ],
)
def test_token_logprobs_rejects(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        decpo.token_logprobs(*args, **kwargs)


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((H.long(), T), {}, TypeError, "logits"),
        ((H, T.double()), {}, TypeError, "targets"),
        ((H, T[:2]), {}, ValueError, "targets"),
        ((torch.randn(6, 0), T), {}, ValueError, "logits"),
        ((H, torch.tensor([0, 1, 2, 4, 3, 0])), {}, ValueError, "targets"),
        ((H, T.clamp(max=3)), {"temperature": -1.0}, ValueError, "temperature"),
    ],
)
def test_logprobs_from_logits_rejects(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        decpo.logprobs_from_logits(*args, **kwargs)


def test_targets_check_counts_ignore_index_as_valid():
    targets = T.clone()
    targets[2] = -100
    decpo.token_logprobs(H, W, targets)
    targets[2] = -7
    decpo.token_logprobs(H, W, targets, ignore_index=-7)
    with pytest.raises(ValueError, match="targets"):
        decpo.token_logprobs(H, W, targets)


def test_devices_must_match():
    meta = torch.empty(6, 4, device="meta")
    with pytest.raises(ValueError, match="device"):
        decpo.token_logprobs(meta, W, T)
    with pytest.raises(ValueError, match="device"):
        decpo.decorrelation_penalty(H, mask=torch.ones(6, dtype=torch.bool, device="meta"))


# ---------------------------------------------------------------- hostile numerics


def test_zero_features_raise_value_error_naming_hidden():
    with pytest.raises(ValueError, match="hidden"):
        decpo.token_logprobs(torch.randn(3, 0), torch.randn(5, 0), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden"):
        decpo.decorrelation_penalty(torch.randn(3, 0))


@pytest.mark.parametrize("ignore_index", [2**63, -(2**63) - 1, 2**70])
def test_an_ignore_index_beyond_int64_raises_value_error(ignore_index):
    with pytest.raises(ValueError, match="ignore_index"):
        decpo.token_logprobs(H, W, T, ignore_index=ignore_index)
    with pytest.raises(ValueError, match="ignore_index"):
        decpo.logprobs_from_logits(torch.randn(6, 9), T, ignore_index=ignore_index)


@pytest.mark.parametrize("backend", backends("token_logprobs"))
def test_a_minus_inf_bias_masks_its_vocabulary_entry(backend):
    """A vocabulary mask as a -inf bias entry: softmax gives it p = 0, every row stays
    finite (a target at the masked entry gets -inf), gradients match float64."""
    torch.manual_seed(0)
    h = torch.randn(7, 5, requires_grad=True)
    w, b = torch.randn(13, 5), torch.randn(13)
    b[[0, 6]] = float("-inf")
    t = torch.randint(1, 13, (7,))
    t[t == 6] = 5
    t[3] = 0  # the masked entry itself
    out = decpo.token_logprobs(h, w, t, bias=b, backend=backend)
    h64 = h.detach().double().requires_grad_()
    ref = torch.log_softmax(h64 @ w.double().T + b.double(), -1).gather(1, t[:, None])[:, 0]
    assert out[3] == float("-inf")
    keep = torch.arange(7) != 3
    torch.testing.assert_close(out[keep].double(), ref[keep].detach(), rtol=1e-5, atol=1e-5)
    g = torch.randn(7)
    g[3] = 0.0
    out[keep].mul(g[keep]).sum().backward()
    ref[keep].mul(g[keep].double()).sum().backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    poisoned = b.clone()
    poisoned[2] = float("nan")
    assert decpo.token_logprobs(h, w, t, bias=poisoned, backend=backend).isnan().all()


@pytest.mark.parametrize("backend", backends("logprobs_from_logits"))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logits_far_from_zero_keep_their_accuracy(backend, temperature):
    """Logits offset by 1e6: log-probs and gradients as accurate as float64 gives from
    the same fp32 inputs (eager fp32 keeps ~1e-6 at T = 1)."""
    torch.manual_seed(0)
    x = (torch.randn(16, 1000) * 3 + 1e6).requires_grad_()
    t = torch.randint(0, 1000, (16,))
    out = decpo.logprobs_from_logits(x, t, temperature=temperature, backend=backend)
    x64 = x.detach().double().requires_grad_()
    ref = torch.log_softmax(x64 / temperature, -1).gather(1, t[:, None])[:, 0]
    assert (out.double() - ref).abs().max() < 2e-5
    g = torch.randn(16)
    (out * g).sum().backward()
    (ref * g.double()).sum().backward()
    assert (x.grad.double() - x64.grad).norm() / x64.grad.norm() < 1e-5


def test_double_backward_of_the_penalty_raises_a_clear_error():
    h = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(decpo.decorrelation_penalty(h), h)  # first order is fine
    assert torch.isfinite(g).all()
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(decpo.decorrelation_penalty(h), h, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.gradgradcheck(lambda a: decpo.decorrelation_penalty(a), (h,))


def test_double_backward_of_frozen_head_token_logprobs_raises_a_clear_error():
    h = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w, t = torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 9, (6,))
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(decpo.token_logprobs(h, w, t).sum(), h, create_graph=True)
    (g,) = torch.autograd.grad(decpo.token_logprobs(h, w, t).sum(), h)
    assert torch.isfinite(g).all()


def test_double_backward_through_the_other_backward_ops_is_an_error_not_a_number():
    """logprobs_from_logits and trainable-head token_logprobs: their backward ops have
    no autograd formula, so a second derivative raises instead of being wrong."""
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 7, (4,))
    w = torch.randn(7, 7, dtype=torch.float64, requires_grad=True)
    for f in (lambda a: decpo.logprobs_from_logits(a, t), lambda a: decpo.token_logprobs(a, w, t)):
        (g,) = torch.autograd.grad(f(x).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="autograd"):
            g.sum().backward()
