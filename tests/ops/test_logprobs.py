"""token_logprobs and logprobs_from_logits against float64 references."""

from __future__ import annotations

import random
import time

import pytest
import torch

import decpo
from decpo.reference import (
    eager_logprobs_from_logits,
    eager_token_logprobs,
    final_logits_reference,
    logprobs_from_logits_reference,
    token_logprobs_reference,
)
from decpo.torch_backend import logprobs as torch_impl
from tests.helpers import assert_close, backends, rel_err, skip_unless_runs, upstream_like

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


BACKENDS = backends("token_logprobs")
LOGITS_BACKENDS = backends("logprobs_from_logits")


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiny tiles so that small shapes exercise every chunking loop."""
    monkeypatch.setattr(torch_impl, "VOCAB_CHUNK", 16)
    monkeypatch.setattr(torch_impl, "WIDENED_VOCAB_CHUNK", 16)
    monkeypatch.setattr(torch_impl, "TILE_ELEMENTS", {"cpu": 64})


def _targets(shape, vocab, ignore_frac=0.2):
    t = torch.randint(0, vocab, shape)
    t[torch.rand(shape) < ignore_frac] = -100
    return t


def _check_token_logprobs(
    lead, dim, vocab, dtype, *, bias=False, temperature=1.0, train_weight=False,
    train_bias=False, backend="torch", softcap=None, logit_scale=1.0, hidden_scale=1.0,
):  # fmt: skip
    skip_unless_runs(backend, dtype)
    hidden = (torch.randn(*lead, dim) * hidden_scale / dim**0.25).to(dtype).requires_grad_(True)
    weight = (torch.randn(vocab, dim) / dim**0.25).to(dtype).requires_grad_(train_weight)
    b = (torch.randn(vocab) * 0.5).to(dtype).requires_grad_(train_bias) if bias else None
    targets = _targets(tuple(lead), vocab)

    cap = {"softcap": softcap, "logit_scale": logit_scale}
    out = decpo.token_logprobs(
        hidden, weight, targets, bias=b, temperature=temperature, backend=backend, **cap
    )
    assert out.shape == targets.shape and out.dtype == torch.float32
    assert torch.all(out[targets == -100] == 0)
    upstream = upstream_like(out)
    (out * upstream).sum().backward()

    leaves = [hidden, weight] + ([b] if b is not None else [])
    leaves64 = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    h64, w64 = leaves64[:2]
    b64 = leaves64[2] if b is not None else None
    ref = token_logprobs_reference(h64, w64, targets, b64, temperature=temperature, **cap)
    (ref * upstream.double()).sum().backward()

    eager_leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
    eh, ew = eager_leaves[:2]
    eb = eager_leaves[2] if b is not None else None
    eager = eager_token_logprobs(eh, ew, targets, eb, temperature=temperature, **cap)
    (eager * upstream).sum().backward()

    assert_close(out, ref, dtype, "logp", eager=eager)
    for name, ours, ref_leaf, eager_leaf in zip(
        ["d hidden", "d weight", "d bias"], leaves, leaves64, eager_leaves, strict=False
    ):
        if ours.requires_grad:
            assert ours.grad.dtype == ours.dtype
            assert_close(ours.grad, ref_leaf.grad, dtype, name, eager=eager_leaf.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "lead,dim,vocab", [((1,), 13, 5), ((37,), 13, 101), ((2, 17), 11, 67), ((5, 1), 2, 1)]
)
def test_token_logprobs_frozen_head(lead, dim, vocab, dtype, backend, small_tiles):
    _check_token_logprobs(lead, dim, vocab, dtype, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_token_logprobs_bias_temperature(dtype, backend, small_tiles):
    _check_token_logprobs((3, 13), 7, 53, dtype, bias=True, temperature=0.7, backend=backend)
    _check_token_logprobs((29,), 5, 37, dtype, bias=True, temperature=2.5, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("train_bias", [False, True])
def test_token_logprobs_trainable_head(dtype, train_bias, backend, small_tiles):
    _check_token_logprobs(
        (2, 19), 7, 71, dtype, bias=True, train_weight=True, train_bias=train_bias,
        temperature=1.3, backend=backend,
    )  # fmt: skip
    _check_token_logprobs(
        (23,), 6, 41, dtype, bias=True, train_weight=False, train_bias=True, backend=backend
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_default_tiles_with_vocab_above_one_chunk(backend):
    # V above one 8192-column chunk and not a multiple of it.
    _check_token_logprobs((9,), 8, 8209, torch.float32, bias=True, backend=backend)
    _check_token_logprobs((9,), 8, 8209, torch.bfloat16, backend=backend)


def test_token_logprobs_gradcheck_float64(small_tiles):
    hidden = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    targets = _targets((2, 7), 19)
    for train_weight in (False, True):
        weight = torch.randn(19, 5, dtype=torch.float64, requires_grad=train_weight)
        bias = torch.randn(19, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda h, w, b: decpo.token_logprobs(h, w, targets, bias=b, temperature=0.9),
            (hidden, weight, bias),
        )
        assert torch.autograd.gradcheck(
            lambda h, w: decpo.token_logprobs(h, w, targets), (hidden, weight)
        )


def test_token_logprobs_all_ignored_and_empty():
    hidden = torch.randn(4, 6, requires_grad=True)
    weight = torch.randn(9, 6)
    out = decpo.token_logprobs(hidden, weight, torch.full((4,), -100))
    out.sum().backward()
    assert torch.equal(out, torch.zeros(4)) and torch.equal(hidden.grad, torch.zeros(4, 6))
    empty = decpo.token_logprobs(torch.randn(0, 6), weight, torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0,)


def test_token_logprobs_reference_pass_saves_nothing():
    hidden = torch.randn(5, 4, requires_grad=True)
    with torch.no_grad():
        out = decpo.token_logprobs(hidden, torch.randn(7, 4), torch.randint(0, 7, (5,)))
    assert not out.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_nan_in_gives_nan_out(backend):
    hidden = torch.randn(4, 6)
    weight = torch.randn(9, 6)
    targets = torch.randint(0, 9, (4,))
    hidden[1, 0] = float("nan")
    out = decpo.token_logprobs(hidden, weight, targets, backend=backend)
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2, 3]]).all()
    hidden[2, 3] = float("inf")
    assert torch.isnan(decpo.token_logprobs(hidden, weight, targets, backend=backend)[2])
    weight[3, 1] = float("inf")
    out = decpo.token_logprobs(torch.randn(4, 6), weight, targets, backend=backend)
    assert torch.isnan(out).all()
    bias = torch.zeros(9)
    bias[2] = float("nan")
    out = decpo.token_logprobs(torch.randn(4, 6), weight.clamp(-9, 9), targets, bias=bias)
    assert torch.isnan(out).all()


def test_token_logprobs_compile_fullgraph():
    def f(h, w, t):
        logp, stats = decpo.token_logprobs(
            torch.tanh(h), w, t, softcap=3.0, logit_scale=0.5, return_stats=True
        )
        return logp.sum() + stats.entropy.sum()

    compiled = torch.compile(f, fullgraph=True)  # inductor
    h = torch.randn(3, 5, 8, requires_grad=True)
    w = torch.randn(21, 8)
    t = _targets((3, 5), 21)
    out = compiled(h, w, t)
    out.backward()
    grad = h.grad.clone()
    h.grad = None
    expected = f(h, w, t)
    expected.backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad, h.grad)


def test_token_logprobs_opcheck():
    h, w, t = torch.randn(6, 4), torch.randn(11, 4), _targets((6,), 11)
    op = torch.ops.decpo.token_logprobs.default
    for frozen_grad in (False, True):
        for softcap, stats in ((0.0, False), (4.0, True)):
            torch.library.opcheck(
                op, (h, w, t, None, -100, 1.0, softcap, 0.7, "torch", frozen_grad, stats),
                test_utils=("test_schema", "test_faketensor"),
            )  # fmt: skip


# ------------------------------------------- softcap, logit scale, per-token stats


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("train_weight", [False, True])
def test_token_logprobs_softcap_and_scale(dtype, train_weight, backend, small_tiles):
    # hidden_scale 4: logits of a few tens, so tanh saturates on some of them.
    _check_token_logprobs(
        (3, 11), 7, 53, dtype, bias=True, temperature=0.8, softcap=5.0, logit_scale=1.7,
        hidden_scale=4.0, train_weight=train_weight, backend=backend,
    )  # fmt: skip
    _check_token_logprobs(
        (29,), 5, 37, dtype, logit_scale=1 / 8, hidden_scale=4.0, train_weight=train_weight,
        backend=backend,
    )  # fmt: skip
    _check_token_logprobs((1,), 13, 5, dtype, softcap=30.0, backend=backend)


def test_token_logprobs_softcap_gradcheck_float64(small_tiles):
    hidden = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True) * 2
    targets = _targets((2, 5), 23)
    for train_weight in (False, True):
        weight = torch.randn(23, 4, dtype=torch.float64, requires_grad=train_weight)
        bias = torch.randn(23, dtype=torch.float64, requires_grad=train_weight)
        assert torch.autograd.gradcheck(
            lambda h, w, b: decpo.token_logprobs(
                h, w, targets, bias=b, temperature=1.3, softcap=2.5, logit_scale=0.6
            ),
            (hidden.detach().requires_grad_(True), weight, bias),
        )


def _stats_inputs(lead, dim, vocab, dtype, scale=1.0):
    hidden = (torch.randn(*lead, dim) * scale / dim**0.25).to(dtype)
    weight = (torch.randn(vocab, dim) / dim**0.25).to(dtype)
    bias = (torch.randn(vocab) * 0.5).to(dtype)
    return hidden, weight, bias, _targets(tuple(lead), vocab)


def _eager_stats(hidden, weight, bias, targets, temperature, softcap, logit_scale):
    """The statistics as PyTorch computes them at the input dtype (full logits)."""
    z = final_logits_reference(hidden, weight, bias, 1.0, softcap, logit_scale).float()
    z = z / temperature
    logp = torch.log_softmax(z, -1)
    valid = targets != -100
    stats = {
        "entropy": -(logp.exp() * logp).sum(-1),
        "logit_sum": z.sum(-1),
        "log_sum_p2": torch.logsumexp(2 * logp, -1),
    }
    return {k: v * valid for k, v in stats.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "lead,dim,vocab,cap",
    [
        ((37,), 13, 101, {}),
        ((2, 17), 11, 67, {"softcap": 4.0, "logit_scale": 1.5, "temperature": 0.7}),
        ((1,), 2, 1, {}),
        ((9,), 8, 8209, {"logit_scale": 0.25}),
    ],
)
def test_token_logprobs_stats(lead, dim, vocab, cap, dtype, backend, request):
    skip_unless_runs(backend, dtype)
    if vocab < 8192:
        request.getfixturevalue("small_tiles")
    if backend == "triton" and vocab > 1031:
        # The interpreter's 16-wide vocabulary tiles: 1031 is already 65 of them (and
        # the Triton GEMM pipeline has its own multi-chunk tests in tests/triton_backend).
        vocab = 1031
    hidden, weight, bias, targets = _stats_inputs(lead, dim, vocab, dtype, scale=3.0)
    h = hidden.clone().requires_grad_(True)
    logp, stats = decpo.token_logprobs(
        h, weight, targets, bias=bias, return_stats=True, backend=backend, **cap
    )
    plain = decpo.token_logprobs(h, weight, targets, bias=bias, backend=backend, **cap)
    assert isinstance(stats, decpo.TokenStats)
    torch.testing.assert_close(logp, plain, rtol=0, atol=0)  # same numbers with stats on
    _, ref = token_logprobs_reference(
        hidden.double(), weight.double(), targets, bias.double(), **cap, return_stats=True
    )
    eager = _eager_stats(hidden, weight, bias, targets, cap.get("temperature", 1.0),
                         cap.get("softcap"), cap.get("logit_scale", 1.0))  # fmt: skip
    ignored = targets == -100
    for name in ("entropy", "logit_sum", "log_sum_p2", "argmax_match"):
        value = getattr(stats, name)
        assert value.shape == targets.shape and value.dtype == torch.float32, name
        assert not value.requires_grad, name
        assert torch.all(value[ignored] == 0), name
        if name == "argmax_match":
            # Exact where the float64 argmax margin exceeds the dtype's rounding.
            z = final_logits_reference(hidden.double(), weight.double(), bias.double(),
                                       **cap)  # fmt: skip
            top2 = z.topk(min(2, vocab), -1).values
            margin = (top2[..., 0] - top2[..., -1]) if vocab > 1 else torch.ones(lead)
            clear = (margin > 0.05) | (vocab == 1)
            assert torch.equal(value[clear], ref[name].float()[clear]), name
            assert set(value.unique().tolist()) <= {0.0, 1.0}
        else:
            floor = 1e-3 * vocab if name == "logit_sum" else 1e-3
            assert_close(value, ref[name], dtype, name, eager=eager[name], floor=floor)
    # The gradient is unaffected by asking for the statistics.
    upstream = upstream_like(logp)
    logp.backward(upstream)
    h2 = hidden.clone().requires_grad_(True)
    decpo.token_logprobs(h2, weight, targets, bias=bias, backend=backend, **cap).backward(upstream)
    torch.testing.assert_close(h.grad, h2.grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_stats_peaked_and_tied(backend):
    # A near one-hot distribution (entropy ~ 0, log sum p^2 ~ 0) and an exact tie at the
    # maximum (counts as a match).
    weight = torch.eye(4) * 60.0
    hidden = torch.tensor([[1.0, 0, 0, 0], [0.0, 1, 0, 0], [1.0, 1, 0, 0]])
    targets = torch.tensor([0, 2, 1])
    _, stats = decpo.token_logprobs(hidden, weight, targets, return_stats=True, backend=backend)
    _, ref = token_logprobs_reference(hidden.double(), weight.double(), targets, return_stats=True)
    torch.testing.assert_close(stats.entropy.double(), ref["entropy"], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(stats.log_sum_p2.double(), ref["log_sum_p2"], atol=1e-6, rtol=1e-4)
    assert stats.argmax_match.tolist() == [1.0, 0.0, 1.0]
    torch.testing.assert_close(stats.logit_sum, torch.tensor([60.0, 60.0, 120.0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_stats_nan_propagates(backend):
    hidden = torch.randn(3, 6)
    hidden[1, 2] = float("nan")
    _, stats = decpo.token_logprobs(
        hidden, torch.randn(9, 6), torch.tensor([1, 2, -100]), return_stats=True, backend=backend
    )
    assert torch.isnan(stats.entropy[1]) and torch.isnan(stats.logit_sum[1])
    assert torch.isfinite(stats.entropy[0]) and stats.entropy[2] == 0


def test_token_logprobs_bad_softcap_and_scale():
    h, w, t = torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="softcap"):
        decpo.token_logprobs(h, w, t, softcap=0.0)
    with pytest.raises(ValueError, match="logit_scale"):
        decpo.token_logprobs(h, w, t, logit_scale=float("inf"))
    with pytest.raises(TypeError, match="logit_scale"):
        decpo.token_logprobs(h, w, t, logit_scale="2")


# ---------------------------------------------------------- logprobs_from_logits


@pytest.mark.parametrize("backend", LOGITS_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (37, 101), (3, 5, 67), (4, 2053)])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_from_logits(shape, dtype, temperature, backend, small_tiles):
    skip_unless_runs(backend, dtype)
    logits = (torch.randn(shape) * 3).to(dtype).requires_grad_(True)
    targets = _targets(shape[:-1], shape[-1])
    out = decpo.logprobs_from_logits(logits, targets, temperature=temperature, backend=backend)
    upstream = upstream_like(out)
    (out * upstream).sum().backward()

    l64 = logits.detach().double().requires_grad_(True)
    ref = logprobs_from_logits_reference(l64, targets, temperature=temperature)
    (ref * upstream.double()).sum().backward()
    le = logits.detach().clone().requires_grad_(True)
    eager = eager_logprobs_from_logits(le, targets, temperature=temperature)
    (eager * upstream).sum().backward()

    assert out.dtype == torch.float32
    assert_close(out, ref, dtype, "logp", eager=eager)
    assert logits.grad.dtype == dtype
    assert_close(logits.grad, l64.grad, dtype, "d logits", eager=le.grad)


@pytest.mark.parametrize("backend", LOGITS_BACKENDS)
def test_logprobs_from_logits_strided_input(backend):
    base = torch.randn(6, 40, 3)
    logits = base[::2, :37, 1].requires_grad_(False)  # strides (240, 3): no unit stride
    targets = _targets((3,), 37)
    leaf = logits.clone().requires_grad_(True)
    out = decpo.logprobs_from_logits(logits.detach().requires_grad_(True), targets, backend=backend)
    ref = logprobs_from_logits_reference(leaf.double(), targets)
    assert_close(out, ref, torch.float32, "logp")


def test_logprobs_from_logits_gradcheck_float64():
    logits = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    targets = _targets((4,), 9)
    assert torch.autograd.gradcheck(
        lambda x: decpo.logprobs_from_logits(x, targets, temperature=1.7), (logits,)
    )


@pytest.mark.parametrize("backend", LOGITS_BACKENDS)
def test_logprobs_from_logits_special_values(backend):
    logits = torch.randn(5, 6)
    logits[0, 2] = float("-inf")  # a masked-out vocabulary entry is fine
    logits[1] = float("-inf")
    logits[1, 4] = 0.0  # only one entry left: logp = 0 there
    logits[2, 1] = float("nan")
    logits[3, 0] = float("inf")
    targets = torch.tensor([1, 4, 3, 2, 0])
    out = decpo.logprobs_from_logits(logits, targets, backend=backend)
    ref = torch.log_softmax(logits[0], -1)[1]
    torch.testing.assert_close(out[0], ref)
    assert out[1] == 0.0
    assert torch.isnan(out[2]) and torch.isnan(out[3])
    assert torch.isfinite(out[4])


@pytest.mark.parametrize("backend", LOGITS_BACKENDS)
def test_logprobs_from_logits_ignored_rows_are_never_read(backend):
    logits = torch.randn(3, 5, requires_grad=True)
    with torch.no_grad():
        logits[1] = float("nan")
    targets = torch.tensor([2, -100, 4])
    out = decpo.logprobs_from_logits(logits, targets, backend=backend)
    out.sum().backward()
    assert out[1] == 0 and torch.isfinite(out).all()
    assert torch.equal(logits.grad[1], torch.zeros(5)) and torch.isfinite(logits.grad).all()


def test_logprobs_from_logits_compile_and_opcheck():
    def f(x, t):
        return decpo.logprobs_from_logits(x * 2, t).sum()

    x = torch.randn(4, 3, 10, requires_grad=True)
    t = _targets((4, 3), 10)
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, t)
    out.backward()
    grad = x.grad.clone()
    x.grad = None
    f(x, t).backward()
    torch.testing.assert_close(grad, x.grad)
    torch.library.opcheck(
        torch.ops.decpo.logprobs_from_logits.default,
        (x.detach().reshape(12, 10), t.reshape(12), -100, 1.0, "torch"),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize("backend", LOGITS_BACKENDS)
def test_results_are_bit_identical_run_to_run(backend):
    hidden = torch.randn(2, 19, 24, dtype=torch.bfloat16)
    weight = torch.randn(67, 24, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(67, dtype=torch.bfloat16, requires_grad=True)
    targets = _targets((2, 19), 67)
    results = []
    for _ in range(2):
        h = hidden.clone().requires_grad_(True)
        weight.grad = bias.grad = None
        out = decpo.token_logprobs(h, weight, targets, bias=bias, backend=backend)
        out.backward(torch.linspace(-1, 2, out.numel()).reshape(out.shape))
        results.append((out, h.grad, weight.grad, bias.grad))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", LOGITS_BACKENDS)
def test_token_logprobs_strided_bias_and_weight(backend):
    hidden = torch.randn(7, 16)
    weight = torch.randn(16, 80).T  # (80, 16), column-major
    bias = torch.randn(160)[::2]  # stride 2
    targets = torch.randint(0, 80, (7,))
    out = decpo.token_logprobs(hidden, weight, targets, bias=bias, backend=backend)
    ref = token_logprobs_reference(hidden.double(), weight.double(), targets, bias.double())
    assert_close(out, ref, torch.float32, "logp")


def _fold_inputs(dtype=torch.float32, n=37, dim=13, vocab=101):
    hidden = torch.randn(n, dim).to(dtype)
    weight = (torch.randn(vocab, dim) / dim**0.25).to(dtype)
    bias = torch.randn(vocab) * 0.5
    bias[: vocab // 3] = float("-inf")  # the first of three streams sees only masked logits
    targets = torch.randint(vocab // 3, vocab, (n,))
    targets[::5] = -100
    return hidden, weight, bias, targets


@pytest.mark.parametrize("epilogue", ["torch", "native"])
@pytest.mark.parametrize("streams", [2, 3])
def test_token_logprobs_vocab_streams_merge_like_one_fold(streams, epilogue, small_tiles):
    """The vocabulary folded by several threads, the states merged at the end, gives
    what one fold gives (float64 reference), with a softcap, logit scale, temperature,
    bias, statistics, ignored rows, and a stream whose every logit is masked."""
    if epilogue == "native":
        skip_unless_runs("native", torch.float32)
        from decpo.native_backend.logprobs import online_softmax_tile as fused
    else:
        fused = None
    hidden, weight, bias, targets = _fold_inputs()
    # ignore_index, temperature, softcap, logit_scale, frozen_grad, with_stats
    args = (-100, 0.8, 30.0, 0.5, True, True)

    def run(h, w, b, **kw):
        return torch_impl.token_logprobs(h, w, targets, b, *args, **kw)

    ref = run(hidden.double(), weight.double(), bias.double(), streams=1)
    one = run(hidden, weight, bias, epilogue=fused, streams=1)
    many = run(hidden, weight, bias, epilogue=fused, streams=streams)
    for name, r, o, m in zip(["logp", "lse", "d hidden", "stats"], ref, one, many, strict=True):
        assert torch.isfinite(m).all(), name
        err_one, err_many = rel_err(o, r), rel_err(m, r)
        assert err_many <= 2 * err_one + 1e-6, f"{name}: {err_many:.2e} vs one fold {err_one:.2e}"


@pytest.mark.parametrize("epilogue", ["torch", "native"])
def test_token_logprobs_vocab_streams_give_the_same_bits_whatever_the_timing(
    epilogue, small_tiles, monkeypatch
):
    """The threads take vocabulary chunks as they come free, but the chunks' states are
    merged in chunk order: the same bits on every call whichever thread folded which
    chunk (here each chunk is delayed at random), and for any number of threads with
    the same chunks (here capped by VOCAB_CHUNK; by default the chunk size depends on
    the thread count)."""
    if epilogue == "native":
        skip_unless_runs("native", torch.float32)
        from decpo.native_backend.logprobs import online_softmax_tile as fused
    else:
        fused = None
    hidden, weight, bias, targets = _fold_inputs()
    fold = torch_impl._VocabFold._fold
    delays = random.Random(0)

    def slow_fold(self, h_mm, t, chunks):
        time.sleep(delays.random() * 2e-3)
        return fold(self, h_mm, t, chunks)

    monkeypatch.setattr(torch_impl._VocabFold, "_fold", slow_fold)
    args = (hidden, weight, targets, bias, -100, 0.8, 30.0, 0.5, True, True)
    outs = [torch_impl.token_logprobs(*args, epilogue=fused, streams=n) for n in (2, 2, 3, 3, 4)]
    for out in outs[1:]:
        for name, a, b in zip(["logp", "lse", "d hidden", "stats"], outs[0], out, strict=True):
            assert torch.equal(a, b), name


def test_token_logprobs_vocab_schedule_gives_a_slow_thread_fewer_chunks(monkeypatch):
    """A thread slowed by something else on the machine takes fewer chunks, so the
    call does not wait for it: the first thread to start is made 20x slower here."""
    hidden, weight, _, targets = _fold_inputs(vocab=64 * 16)
    monkeypatch.setattr(torch_impl, "VOCAB_CHUNK", 16)  # 64 chunks
    fold = torch_impl._VocabFold._fold
    taken: dict[int, int] = {}
    slow: list[int] = []

    def timed_fold(self, h_mm, t, chunks):
        if not slow:
            slow.append(id(self))
        time.sleep(2e-2 if id(self) == slow[0] else 1e-3)
        taken[id(self)] = taken.get(id(self), 0) + 1
        return fold(self, h_mm, t, chunks)

    monkeypatch.setattr(torch_impl._VocabFold, "_fold", timed_fold)
    torch_impl.token_logprobs(
        hidden, weight, targets, None, -100, 1.0, 0.0, 1.0, True, False, streams=2
    )
    assert sum(taken.values()) == 64
    assert taken[slow[0]] <= 8, taken


@pytest.mark.parametrize("bad_row", [0, -1])
def test_token_logprobs_vocab_streams_see_a_nan_in_any_part(bad_row, small_tiles):
    """bf16 heads widened chunk by chunk answer the head check from the widening: a
    NaN in either stream's part of the head makes every log-prob NaN."""
    skip_unless_runs("native", torch.bfloat16)
    from decpo.native_backend.logprobs import online_softmax_tile, widen_bf16

    hidden, weight, _, targets = _fold_inputs(torch.bfloat16)
    weight[bad_row, 3] = float("nan")
    logp = torch_impl.token_logprobs(
        hidden, weight, targets, None, -100, 1.0, 0.0, 1.0, True, False,
        epilogue=online_softmax_tile, matmul_dtype=torch.float32, widen=widen_bf16, streams=2,
    )[0]  # fmt: skip
    assert torch.isnan(logp[targets != -100]).all()


def test_default_streams_follow_threads_and_tile_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch_impl.default_streams(32000, 8192, 512, cpu, torch.float32) == 2
        assert torch_impl.default_streams(32000, 8192, 512, cpu, torch.float64) == 2
        assert torch_impl.default_streams(8192, 8192, 512, cpu, torch.float32) == 1  # 1 chunk
        assert torch_impl.default_streams(32000, 8192, 512, cpu, torch.bfloat16) == 1
        assert torch_impl.default_streams(128256, 8192, 4096, cpu, torch.bfloat16) == 2
        assert torch_impl.default_streams(32000, 8192, 4096, cpu, torch.float16) == 1
        assert torch_impl.default_streams(32000, 8192, 512, cuda, torch.float32) == 1
        torch.set_num_threads(1)
        assert torch_impl.default_streams(32000, 8192, 512, cpu, torch.float32) == 1
    finally:
        torch.set_num_threads(previous)
