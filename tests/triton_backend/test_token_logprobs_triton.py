"""The Triton token_logprobs GEMM pipeline under the interpreter, against float64:
several chunks and L2 groups, per-token statistics, softcap and logit scale, the
trainable-head backward, and bit-identical results run to run."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import TOL, assert_close, generator, rel_err, upstream_like

pytest.importorskip("triton")

from decpo.triton_backend import logprobs as tlp

DTYPES = [torch.float32, torch.bfloat16]


def _reference(h, w, b, t, ignore_index, temperature, softcap, scale):
    """float64 logp, stats (N, 4) and the final logits."""
    a = h.double() @ w.double().T
    if b is not None:
        a = a + b.double()
    x = a * scale
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    z = x / temperature  # (N, V)
    logsm = torch.log_softmax(z, -1)
    valid = t != ignore_index
    safe_t = torch.where(valid, t, 0)
    logp = torch.where(valid, logsm.gather(1, safe_t[:, None])[:, 0], 0.0)
    p = logsm.exp()
    z_y = z.gather(1, safe_t[:, None])[:, 0]
    stats = torch.stack(
        [
            -(p * logsm).sum(-1),
            z.sum(-1),
            (z_y >= z.max(-1).values).double(),
            torch.logsumexp(2 * logsm, -1),
        ],
        1,
    )
    return logp, torch.where(valid[:, None], stats, 0.0)


def _inputs(n, d, v, dtype, seed=0, ignore_frac=0.2, bias=True):
    g = generator(seed)
    h = torch.randn(n, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) / d**0.5 * 3).to(dtype)
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < ignore_frac] = -100
    return h, w, b, t


@pytest.fixture
def small_chunks(monkeypatch):
    """128-row chunks of 8 row tiles in L2 groups of 3: several chunks, several
    groups, and a short last group."""
    monkeypatch.setenv("DECPO_TRITON_CHUNK_MB", "0.05")
    monkeypatch.setattr(tlp, "_GROUP_M", 3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap, scale, temperature", [(0.0, 1.0, 1.0), (5.0, 0.7, 1.3)])
def test_forward_stats_and_frozen_grad(dtype, softcap, scale, temperature, small_chunks):
    h, w, b, t = _inputs(290, 24, 101, dtype)
    assert tlp.chunk_rows(290, 101, w.element_size(), 16) == 128
    logp, _lse, grad, stats = tlp.token_logprobs(
        h, w, t, b, -100, temperature, softcap, scale, True, True
    )
    h64 = h.double().requires_grad_(True)
    ref_logp, ref_stats = _reference(h64, w, b, t, -100, temperature, softcap, scale)
    assert_close(logp, ref_logp.detach(), dtype, "logp")
    for i, what in enumerate(["entropy", "logit sum", "argmax", "log sum p^2"]):
        if what == "argmax" and dtype != torch.float32:
            # ties broken by rounding: agree on all but a few tokens
            assert (stats[:, i] != ref_stats[:, i]).sum() <= 3
            continue
        assert_close(stats[:, i], ref_stats[:, i], dtype, what)
    g = upstream_like(ref_logp)
    (ref_grad,) = torch.autograd.grad(ref_logp, h64, g.double())
    assert_close(grad.double() * g.double()[:, None], ref_grad, dtype, "d hidden")
    assert (grad[t == -100] == 0).all() and (stats[t == -100] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [0.0, 4.0])
def test_trainable_head_backward(dtype, softcap, small_chunks):
    h, w, b, t = _inputs(290, 24, 101, dtype, seed=1)
    logp, lse, _, _ = tlp.token_logprobs(h, w, t, b, -100, 1.0, softcap, 1.0, False, False)
    h64, w64, b64 = (x.double().requires_grad_(True) for x in (h, w, b))
    ref_logp, _ = _reference(h64, w64, b64, t, -100, 1.0, softcap, 1.0)
    assert_close(logp, ref_logp.detach(), dtype, "logp")
    g = upstream_like(ref_logp)
    ref = torch.autograd.grad(ref_logp, (h64, w64, b64), g.double())
    got = tlp.token_logprobs_backward(g, h, w, t, b, lse, -100, 1.0, softcap, 1.0, True, True, True)
    for x, r, what in zip(got, ref, ["d hidden", "d weight", "d bias"], strict=True):
        assert_close(x, r, dtype, what)


def test_forward_only_matches_frozen_forward():
    h, w, b, t = _inputs(40, 24, 50, torch.bfloat16, seed=2)
    a = tlp.token_logprobs(h, w, t, b, -100, 1.0, 0.0, 1.0, False, False)
    f = tlp.token_logprobs(h, w, t, b, -100, 1.0, 0.0, 1.0, True, False)
    assert torch.equal(a[0], f[0]) and torch.equal(a[1], f[1])


@pytest.mark.parametrize("frozen", [True, False])
def test_bit_identical_run_to_run(frozen, small_chunks):
    h, w, b, t = _inputs(200, 24, 70, torch.bfloat16, seed=3)
    runs = []
    for _ in range(2):
        out = tlp.token_logprobs(h, w, t, b, -100, 1.0, 0.0, 1.0, frozen, True)
        if not frozen:
            out = out + tlp.token_logprobs_backward(
                torch.ones(200), h, w, t, b, out[1], -100, 1.0, 0.0, 1.0, True, True, True
            )
        runs.append(out)
    for x, y in zip(*runs, strict=True):
        assert torch.equal(x, y)


def test_masked_vocabulary_bias_is_finite():
    """A -inf bias entry is a masked vocabulary entry: finite log-probs elsewhere."""
    h, w, b, t = _inputs(20, 16, 40, torch.float32, seed=4, ignore_frac=0.0)
    b[::3] = float("-inf")
    t = torch.where(t % 3 == 0, torch.where(t + 1 < 40, t + 1, t - 2), t)  # unmasked, < V
    logp, _, grad, _stats = tlp.token_logprobs(h, w, t, b, -100, 1.0, 0.0, 1.0, True, True)
    ref_logp, _ = _reference(h, w, b, t, -100, 1.0, 0.0, 1.0)
    assert torch.isfinite(logp).all() and torch.isfinite(grad).all()
    assert rel_err(logp, ref_logp) <= TOL[torch.float32]


def test_cost_model_headline():
    """The headline shape's predicted traffic and FLOPs, from the tiling: compute-bound
    on an H100 (989 TFLOP/s bf16, 3.35 TB/s) with the memory time under half the
    tensor-core time (0.37 of it: the in-place rescale of q adds 4.2 GB to 17)."""
    c = tlp.token_logprobs_cost(8192, 128256, 4096, torch.bfloat16, frozen_grad=True)
    assert c["flops"] == pytest.approx(4 * 8192 * 128256 * 4096)
    assert c["chunk_rows"] == 4096  # 1 GiB of bf16 q scratch at V = 128256
    assert c["bytes"] / 3.35e12 < c["flops"] / 989e12 / 2
    fwd = tlp.token_logprobs_cost(8192, 128256, 4096, torch.bfloat16, frozen_grad=False)
    assert fwd["flops"] == pytest.approx(2 * 8192 * 128256 * 4096)
    assert fwd["bytes"] < c["bytes"] / 2
