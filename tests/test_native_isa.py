"""The native library's instruction-set variants and the CPU-capability decisions:
every variant this CPU runs (forced through select_isa, as DECPO_NATIVE_ISA does)
matches the float64 references, and bf16 token_logprobs takes the fp32-tile path
exactly where the CPU has no bf16 dot product (both branches forced)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import decpo
from decpo import numerics
from decpo.native_backend import decorrelation as native_decorrelation
from decpo.native_backend import library
from decpo.native_backend import logprobs as native_logprobs
from decpo.reference import (
    decorrelation_penalty_reference,
    logprobs_from_logits_reference,
    token_logprobs_reference,
)
from tests.helpers import NATIVE_REQUIRED, assert_close, rel_err

if not library.is_available() and not NATIVE_REQUIRED:
    pytest.skip(
        f"native library unavailable: {library.unavailable_reason()}", allow_module_level=True
    )


@pytest.fixture(params=library.ISAS)
def isa(request):
    """Runs the test on one kernel variant (skipped where this CPU cannot run it)."""
    if not library.isa_runs(request.param):
        pytest.skip(f"this CPU or library cannot run the {request.param} variant")
    previous = library.select_isa(request.param)
    yield request.param
    library.select_isa(previous)


def test_features_and_active_variant():
    features = library.cpu_features()
    assert set(features) == {"avx2", "avx512", "avx512_bf16", "amx_bf16"}
    assert not features["avx512"] or features["avx2"]
    best = [isa for isa in library.ISAS if library.isa_runs(isa)][-1]
    assert library.active_isa() == best
    assert library.isa_runs("baseline")


def test_select_isa_refuses_unknown_names():
    with pytest.raises(ValueError, match="isa='sse9'"):
        library.select_isa("sse9")


def test_environment_variable_forces_the_variant():
    code = "from decpo.native_backend import library as L; print(L.active_isa())"
    env = {**os.environ, library.ISA_ENV: "baseline"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "baseline"
    env[library.ISA_ENV] = "pentium"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "DECPO_NATIVE_ISA=pentium" in out.stderr


def test_exp_rate_is_measured(isa):
    assert library.exp_rate(seconds=0.01) > 1e6
    assert library.exp_rate(seconds=0.01, bf16=True) > 1e6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 3), (19, 1000), (8, 4099)])
def test_logprobs_from_logits_every_variant(isa, shape, dtype):
    """Forward and backward; V not a multiple of any vector width (scalar tails)."""
    torch.manual_seed(1)
    logits = (torch.randn(shape) * 3).to(dtype)
    targets = torch.randint(0, shape[1], shape[:1])
    targets[0] = -100
    x = logits.clone().requires_grad_(True)
    out = decpo.logprobs_from_logits(x, targets, temperature=0.8, backend="native")
    upstream = torch.randn(shape[0])
    out.backward(upstream)
    x64 = logits.double().requires_grad_(True)
    ref = logprobs_from_logits_reference(x64, targets, temperature=0.8)
    ref.backward(upstream.double())
    check = dtype if dtype == torch.float32 else torch.float32  # fp32 math on bf16 input
    assert_close(out, ref, check, f"{isa} logp")
    assert_close(x.grad, x64.grad, dtype, f"{isa} d logits")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_bf16_logits_gradient_within_half_an_ulp_every_variant(isa, temperature):
    """The bf16 backward's exp (vexp_bf16, ~3e-6 relative) is rounded to bf16 next:
    every element within half a bf16 ulp of the exact gradient plus 2e-5 relative (an
    exact exp rounds to within half an ulp), across p from 1 down to underflow and at
    -inf logits (exactly 0), with and without a temperature (two code paths)."""
    torch.manual_seed(7)
    n, v = 24, 3000
    scale = torch.logspace(-1, 1.7, n)[:, None]  # spreads 0.1-50: p near 1/V to p ~ 1
    logits = (torch.randn(n, v) * scale).to(torch.bfloat16)
    logits[3, :100] = float("-inf")
    logits[5, 7] = 120.0  # one dominant logit: p ~ 1 there, the rest underflow
    targets = torch.randint(0, v, (n,))
    upstream = torch.randn(n)
    x = logits.clone().requires_grad_(True)
    decpo.logprobs_from_logits(x, targets, temperature=temperature, backend="native").backward(
        upstream
    )
    x64 = logits.double().requires_grad_(True)
    logprobs_from_logits_reference(x64, targets, temperature=temperature).backward(
        upstream.double()
    )
    exact = x64.grad
    got = x.grad.double()
    # Half an ulp of bf16 (8 significant bits) at each exact value; 0 stays 0.
    half_ulp = torch.where(
        exact != 0, torch.exp2(torch.floor(torch.log2(exact.abs())) - 8), torch.zeros_like(exact)
    )
    bound = half_ulp + 2e-5 * exact.abs() + 1e-37
    worst = ((got - exact).abs() / bound).max()
    assert worst <= 1.0, f"{isa}: an element {worst:.3f}x past half an ulp + 2e-5"
    assert (got[3, :100] == 0).all()


def test_logprobs_special_values_every_variant(isa):
    logits = torch.randn(4, 600)
    logits[0, :599] = float("-inf")
    logits[1, 10] = float("nan")
    logits[2, 20] = float("inf")
    logits[3, :512] = float("-inf")
    targets = torch.tensor([599, 3, 4, 550])
    logp = decpo.logprobs_from_logits(logits, targets, backend="native")
    assert logp[0] == 0.0
    assert torch.isnan(logp[1]) and torch.isnan(logp[2])
    torch.testing.assert_close(logp[3], torch.log_softmax(logits[3], -1)[550])


def _eager_penalty(h: torch.Tensor, segment_ids: torch.Tensor | None) -> torch.Tensor:
    """PyTorch at the input dtype (normalize and Gram in bf16 for bf16 input)."""
    return decorrelation_penalty_reference(h, segment_ids=segment_ids).float()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_blocks_in_one_pass_every_variant(isa, temperature):
    """Rows of several 1024-element blocks: later blocks are summed in one pass in the
    running max's frame and redone in two passes when their max jumps far above it
    (row 1), after all -inf blocks (row 2); +inf and NaN in a later block give NaN."""
    torch.manual_seed(6)
    logits = torch.randn(6, 3500) * 3
    logits[1, 2500] = 150.0  # 150 above the running max: beyond the one-pass slack
    logits[1, 1200] = 40.0  # within it
    logits[2, :2048] = float("-inf")
    logits[3, 3100] = float("inf")
    logits[4, 1500] = float("nan")
    logits[5, :1024] -= 200.0  # the first block far below the rest
    targets = torch.tensor([5, 2500, 3000, 7, 8, 2000])
    x = logits.clone().requires_grad_(True)
    logp = decpo.logprobs_from_logits(x, targets, temperature=temperature, backend="native")
    logp.backward(torch.ones(6))
    x64 = logits.double().requires_grad_(True)
    ref = logprobs_from_logits_reference(x64, targets, temperature=temperature)
    ref.backward(torch.ones(6, dtype=torch.float64))
    finite = [0, 1, 2, 5]
    assert torch.isnan(logp[3]) and torch.isnan(logp[4])
    assert_close(logp[finite], ref[finite], torch.float32, f"{isa} logp")
    assert_close(x.grad[finite], x64.grad[finite], torch.float32, f"{isa} d logits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "layers,n,dim,groups",
    # groups=0: no segment_ids, rows read in place (whole 4-row tiles, D a multiple of
    # every variant's tile width); n=260 <= D: the Gram path's generic product.
    [(2, 40, 70, 2), (1, 150, 33, 1), (3, 97, 64, 3), (1, 9, 300, 1), (2, 8, 128, 0),
     (1, 260, 320, 1)],
)  # fmt: skip
@pytest.mark.parametrize("offdiag", [False, True])
def test_decorrelation_every_variant(isa, dtype, layers, n, dim, groups, offdiag):
    """Gram (n <= D) and covariance (n > D) groups, several layers, unsorted groups."""
    torch.manual_seed(2)
    hidden = torch.randn(layers, n, dim).to(dtype)
    segment_ids = torch.randint(0, groups, (n,)) if groups else None
    h = hidden.clone().requires_grad_(True)
    loss = decpo.decorrelation_penalty(
        h, segment_ids=segment_ids, offdiag=offdiag, backend="native"
    )
    loss.backward(torch.tensor(1.3))
    h64 = hidden.double().requires_grad_(True)
    ref = decorrelation_penalty_reference(h64, segment_ids=segment_ids, offdiag=offdiag)
    (ref * 1.3).backward()
    eager = None if offdiag else _eager_penalty(hidden, segment_ids)
    assert_close(loss, ref, dtype, f"{isa} penalty", eager=eager)
    assert h.grad.dtype == dtype
    assert_close(h.grad, h64.grad, dtype, f"{isa} d hidden")


def test_decorrelation_mask_without_normalize(isa):
    torch.manual_seed(3)
    hidden = torch.randn(50, 40) * 0.2
    mask = torch.rand(50) < 0.7
    h = hidden.clone().requires_grad_(True)
    loss = decpo.decorrelation_penalty(
        h, mask=mask, normalize=False, reduction="sum", backend="native"
    )
    loss.backward()
    h64 = hidden.double().requires_grad_(True)
    ref = decorrelation_penalty_reference(h64, mask=mask, normalize=False, reduction="sum")
    ref.backward()
    assert_close(loss, ref, torch.float32, "penalty")
    assert_close(h.grad, h64.grad, torch.float32, "d hidden")
    assert torch.all(h.grad[~mask] == 0)


def test_decorrelation_bitwise_run_to_run():
    hidden = torch.randn(4, 300, 96, dtype=torch.bfloat16, requires_grad=True)
    grads = []
    for _ in range(2):
        hidden.grad = None
        decpo.decorrelation_penalty(hidden, backend="native").backward()
        grads.append(hidden.grad.clone())
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("n,dim", [(300, 280), (64, 2048), (300, 200)])
def test_every_variant_runs_every_product_natively(monkeypatch, isa, n, dim):
    """Every variant, baseline included, runs the penalty on the native kernels whatever
    the product's size (no call reaches the torch backend), against float64."""
    from decpo.torch_backend import decorrelation as torch_decorrelation

    calls = []
    real = torch_decorrelation.decorrelation_penalty

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch_decorrelation, "decorrelation_penalty", spy)
    torch.manual_seed(4)
    hidden = torch.randn(n, dim).to(torch.bfloat16)
    h64 = hidden.double().requires_grad_(True)
    ref = decorrelation_penalty_reference(h64)
    ref.backward()
    h = hidden.clone().requires_grad_(True)
    loss = decpo.decorrelation_penalty(h, backend="native")
    loss.backward()
    assert not calls, isa
    assert_close(loss, ref, torch.bfloat16, f"{isa} penalty")
    assert_close(h.grad, h64.grad, torch.bfloat16, f"{isa} d hidden")


@pytest.mark.parametrize("bf16_dot", [True, False])
def test_bf16_token_logprobs_follows_the_capability(monkeypatch, bf16_dot):
    """No bf16 dot product (forced): bf16 inputs are multiplied as fp32 tiles, at least
    as accurately; with one: bf16 matmuls. Frozen and trainable head against float64."""
    features = {"avx2": True, "avx512": True, "avx512_bf16": bf16_dot, "amx_bf16": False}
    monkeypatch.setattr(library, "cpu_features", lambda: features)
    monkeypatch.setattr(library, "active_isa", lambda: "avx512bf16")
    expected = None if bf16_dot else torch.float32
    assert native_logprobs.matmul_dtype(torch.bfloat16) == expected
    assert native_logprobs.matmul_dtype(torch.float32) is None

    seen = []
    real_tile = native_logprobs.online_softmax_tile

    def spy(tile, *args, **kwargs):
        seen.append(tile.dtype)
        return real_tile(tile, *args, **kwargs)

    monkeypatch.setattr(native_logprobs, "online_softmax_tile", spy)
    torch.manual_seed(4)
    n, dim, vocab = 24, 48, 301
    hidden = torch.randn(n, dim).to(torch.bfloat16)
    weight = (torch.randn(vocab, dim) / dim**0.5).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (n,))
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    logp = decpo.token_logprobs(h, w, targets, backend="native")
    upstream = torch.randn(n)
    logp.backward(upstream)
    assert seen and all(d == (torch.bfloat16 if bf16_dot else torch.float32) for d in seen)
    h64 = hidden.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    ref = token_logprobs_reference(h64, w64, targets)
    ref.backward(upstream.double())
    assert_close(logp, ref, torch.bfloat16, "logp")
    assert_close(h.grad, h64.grad, torch.bfloat16, "d hidden")
    assert_close(w.grad, w64.grad, torch.bfloat16, "d weight")
    if not bf16_dot:  # fp32 tiles: no worse than PyTorch's own bf16 product
        eager = torch.log_softmax((hidden @ weight.T).float(), -1).gather(1, targets[:, None])
        assert rel_err(logp, ref) <= rel_err(eager.squeeze(1), ref) * 1.05 + 1e-6


def test_widen_bf16_every_variant(isa):
    """The fused widening: exact fp32 copies of a strided bf16 chunk (vector body and
    tail) and the finiteness flag, which one NaN or +-inf anywhere clears."""
    torch.manual_seed(7)
    weight = (torch.randn(9, 70) * 5).to(torch.bfloat16)
    src = weight[:, 3:40]  # (9, 37), row stride 70
    dst = torch.full((9, 37), 7.0)
    assert native_logprobs.widen_bf16(src, dst) is True
    assert torch.equal(dst, src.float())
    for bad in (float("nan"), float("inf"), float("-inf")):
        for row, col in ((0, 0), (4, 16), (8, 36)):
            poisoned = src.clone()
            poisoned[row, col] = bad
            assert native_logprobs.widen_bf16(poisoned, dst) is False, (isa, bad, row, col)
            torch.testing.assert_close(dst, poisoned.float(), rtol=0, atol=0, equal_nan=True)
    assert native_logprobs.widen_bf16(src.float(), dst) is None  # not bf16: not taken
    assert native_logprobs.widen_bf16(src.t(), dst.t()) is None  # not unit column stride


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_fp32_tiles_check_the_head_while_widening(monkeypatch, bad):
    """bf16 head on a CPU without bf16 dot products: the widening pass answers the head
    check (no separate pass over the head), and a non-finite weight still makes every
    log-prob NaN."""
    features = {"avx2": True, "avx512": True, "avx512_bf16": False, "amx_bf16": False}
    monkeypatch.setattr(library, "cpu_features", lambda: features)
    passes = []
    real_all_finite = numerics.all_finite

    def counting_all_finite(t: torch.Tensor) -> torch.Tensor:
        passes.append(tuple(t.shape))
        return real_all_finite(t)

    monkeypatch.setattr(numerics, "all_finite", counting_all_finite)
    torch.manual_seed(8)
    n, dim, vocab = 6, 32, 20000  # three vocabulary chunks
    hidden = torch.randn(n, dim).to(torch.bfloat16)
    weight = (torch.randn(vocab, dim) / dim**0.5).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (n,))
    logp = decpo.token_logprobs(hidden, weight, targets, backend="native")
    assert torch.isfinite(logp).all() and passes == []
    weight[17000, 5] = bad
    logp = decpo.token_logprobs(hidden, weight, targets, backend="native")
    assert torch.isnan(logp).all() and passes == []


def test_bf16_gradient_rounds_like_pytorch_every_variant(isa):
    """The bf16 backward of logprobs_from_logits is PyTorch's round-to-nearest-even of
    the fp32 path's gradient (the same fp32 values: the bf16 logits widen exactly),
    NaN rows included: checks each variant's vector bf16 load and store. Its exps are
    the bf16-accurate ones (vexp_bf16, ~3e-6 relative), so an element may round to
    the neighbouring bf16 value, but only where the fp32 gradient lies within 2e-5 of
    the midpoint between the two."""
    torch.manual_seed(5)
    logits = (torch.randn(64, 3000) * 4).to(torch.bfloat16)
    logits[3, 7] = float("nan")
    logits[5, 9] = float("inf")
    targets = torch.randint(0, 3000, (64,))
    grad = torch.randn(64)
    _, lse_bf16 = native_logprobs.logprobs_from_logits(logits, targets, -100, 1.0)
    _, lse_fp32 = native_logprobs.logprobs_from_logits(logits.float(), targets, -100, 1.0)
    got = native_logprobs.logprobs_from_logits_backward(grad, logits, targets, lse_bf16, -100, 1.0)
    want32 = native_logprobs.logprobs_from_logits_backward(
        grad, logits.float(), targets, lse_fp32, -100, 1.0
    )
    want = want32.to(torch.bfloat16)
    same = (got.view(torch.int16) == want.view(torch.int16)) | (got.isnan() & want.isnan())
    assert bool(got[3].isnan().all()) and bool(got[5].isnan().all())
    steps = (got.view(torch.int16).int() - want.view(torch.int16).int()).abs()[~same]
    assert bool((steps == 1).all()), f"{isa}: elements more than one bf16 step apart"
    midpoint = (got.float() + want.float())[~same] / 2
    off = (want32[~same] - midpoint).abs() / want32[~same].abs()
    assert bool((off <= 2e-5).all()), f"{isa}: a rounding differs {off.max():.2g} from a tie"
    assert (~same).float().mean() < 0.01, f"{isa}: {int((~same).sum())} elements differ"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_gradient_streams_the_same_bits_every_variant(isa, dtype):
    """A gradient of 16 MiB or more is written with streaming stores after a scalar
    lead-in to the store alignment (V odd: every row starts at another alignment); its
    rows are bitwise the rows of a small call, which writes with plain stores."""
    torch.manual_seed(9)
    vocab = 16381
    rows = (16 << 20) // (vocab * (4 if dtype == torch.float32 else 2)) + 3
    logits = (torch.randn(rows, vocab) * 3).to(dtype)
    logits[1, 5] = float("nan")  # a NaN row takes the careful path inside the large call
    targets = torch.randint(0, vocab, (rows,))
    targets[2] = -100
    grad = torch.randn(rows)
    _, lse = native_logprobs.logprobs_from_logits(logits, targets, -100, 1.0)
    large = native_logprobs.logprobs_from_logits_backward(grad, logits, targets, lse, -100, 1.0)
    small = torch.cat([
        native_logprobs.logprobs_from_logits_backward(
            grad[i : i + 8], logits[i : i + 8], targets[i : i + 8], lse[i : i + 8], -100, 1.0
        )
        for i in range(0, 64, 8)
    ])  # fmt: skip
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    same = (large[:64].view(bits) == small.view(bits)) | (large[:64].isnan() & small.isnan())
    assert bool(same.all()), f"{isa}: {int((~same).sum())} elements differ"
    assert bool(large[1].isnan().all()) and not bool(large[2].any())
    x64 = logits[-4:].double().requires_grad_(True)
    logprobs_from_logits_reference(x64, targets[-4:]).backward(grad[-4:].double())
    assert_close(large[-4:], x64.grad, dtype, f"{isa} streamed rows")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decorrelation_backward_scales_natively_every_variant(isa, dtype):
    """The backward scales the stored gradient by the upstream gradient in one native
    pass, with the bits of PyTorch's multiply by an fp32 scalar (an odd element count
    over the threads: vector body and scalar tails); other upstream dtypes are left to
    PyTorch."""
    torch.manual_seed(10)
    hidden = torch.randn(2, 40, 1001).to(dtype)  # 80080 elements
    x = hidden.clone().requires_grad_(True)
    (decpo.decorrelation_penalty(x, backend="native") * 0.37).backward()
    _, stored = native_decorrelation.decorrelation_penalty(
        hidden, None, None, True, False, "mean", True
    )
    want = stored * torch.tensor(0.37)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert x.grad.dtype == dtype and torch.equal(x.grad.view(bits), want.view(bits)), isa
    for upstream in (-2.5, -0.0):  # -0.0: every product's sign flips, as in PyTorch
        scaled = native_decorrelation.decorrelation_penalty_backward(stored, torch.tensor(upstream))
        assert torch.equal(scaled.view(bits), (stored * torch.tensor(upstream)).view(bits))
    # NaN and +-inf in the gradient, or as the upstream gradient, stay what PyTorch makes
    # of them (bf16 pairs round without a NaN test: a NaN product must stay NaN).
    special = stored.clone()
    special.view(-1)[[3, 500, 70001]] = torch.tensor(
        [float("nan"), float("inf"), -float("inf")]
    ).to(dtype)
    payload_nan = torch.tensor([0x7FFFFFFF], dtype=torch.int32).view(torch.float32)[0]
    for upstream in (
        torch.tensor(3.0),
        torch.tensor(0.0),
        torch.tensor(float("inf")),
        payload_nan,
    ):  # low bits set: rounding it like a number gives -0
        scaled = native_decorrelation.decorrelation_penalty_backward(special, upstream)
        want = special * upstream
        torch.testing.assert_close(scaled, want, rtol=0, atol=0, equal_nan=True, msg=isa)
    double = torch.tensor(0.5, dtype=torch.float64)
    assert native_decorrelation.decorrelation_penalty_backward(stored, double) is None
