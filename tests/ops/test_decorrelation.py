"""decorrelation_penalty against the float64 Gram-matrix reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import decpo
from decpo.reference import decorrelation_penalty_reference
from decpo.torch_backend import decorrelation as torch_impl
from tests.helpers import TOL, assert_close, backends, generator, rel_err, skip_unless_runs

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


BACKENDS = backends("decorrelation_penalty")


def _check(hidden, dtype, upstream=-1.7, backend="torch", **options):
    """Value and gradient of decpo against the float64 reference on the same rounded input."""
    skip_unless_runs(backend, dtype)
    h = hidden.detach().to(dtype).clone().requires_grad_(True)
    loss = decpo.decorrelation_penalty(h, backend=backend, **options)
    assert loss.dim() == 0
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    (loss * upstream).backward()

    h64 = h.detach().double().requires_grad_(True)
    ref = decorrelation_penalty_reference(h64, **options)
    (ref * upstream).backward()
    assert_close(loss, ref, dtype, "penalty")
    assert h.grad.dtype == dtype
    assert_close(h.grad, h64.grad, dtype, "d hidden")


# (N, D): N = 1, primes, both paths (n <= D: Gram; n > D: covariance).
SHAPES = [(1, 7), (2, 3), (13, 7), (7, 13), (31, 5), (17, 17), (64, 29)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("offdiag", [False, True])
def test_matches_reference(shape, dtype, normalize, offdiag, backend):
    hidden = torch.randn(shape) * (1.0 if normalize else 0.3)
    _check(hidden, dtype, normalize=normalize, offdiag=offdiag, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mask_and_unsorted_segments(dtype, reduction, backend):
    n, d = 53, 11
    hidden = torch.randn(n, d)
    # Unsorted, non-contiguous ids; groups of sizes on both sides of D, one of size 1.
    segment_ids = torch.randint(0, 3, (n,)) * 7 - 5
    segment_ids[17] = 100
    mask = torch.rand(n) > 0.2
    mask[17] = True
    kw = {"mask": mask, "segment_ids": segment_ids, "reduction": reduction, "backend": backend}
    _check(hidden, dtype, **kw)
    _check(hidden, dtype, offdiag=True, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [5, 23])
def test_layers(dtype, n, backend):
    hidden = torch.randn(3, n, 13)
    segment_ids = torch.arange(n) % 2
    _check(hidden, dtype, segment_ids=segment_ids, backend=backend)
    _check(hidden, dtype, mask=torch.arange(n) % 3 != 0, offdiag=True, backend=backend)


def test_covariance_path_streams_row_chunks(monkeypatch):
    monkeypatch.setattr(torch_impl, "ROW_CHUNK", 4)
    monkeypatch.setattr(torch_impl, "KEEP_BYTES", 0)
    hidden = torch.randn(2, 37, 6)
    _check(hidden, torch.float32)
    _check(hidden, torch.float32, offdiag=True, mask=torch.arange(37) % 5 != 1)


def test_covariance_path_is_accurate_near_n_equal_d():
    # n = D + 1: ||C||_F^2 - 2 s + n would cancel catastrophically in fp32.
    hidden = torch.randn(129, 128)
    _check(hidden, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend):
    base = torch.randn(9, 40)
    _check(base.T, torch.float32, backend=backend)  # (40, 9), strided
    # (17, 2, 8) -> L=17, strided in every dimension
    _check(torch.randn(3, 17, 8).transpose(0, 1)[:, :2], torch.float32, backend=backend)
    _check(torch.randn(2, 30, 12, dtype=torch.bfloat16)[:, ::2, ::3], torch.bfloat16,
           backend=backend)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_selections_give_zero_and_zero_gradient(backend):
    hidden = torch.randn(6, 4, requires_grad=True)
    for kwargs in (
        {"mask": torch.zeros(6, dtype=torch.bool)},
        {"offdiag": True, "segment_ids": torch.arange(6)},  # groups of one row: no pairs
    ):
        hidden.grad = None
        loss = decpo.decorrelation_penalty(hidden, backend=backend, **kwargs)
        loss.backward()
        assert loss.item() == 0.0
        assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    empty = torch.randn(0, 4, requires_grad=True)
    loss = decpo.decorrelation_penalty(empty, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and empty.grad.shape == (0, 4)


def test_gradcheck_float64():
    for shape, options in [
        ((5, 7), {}),
        ((9, 4), {}),
        ((9, 4), {"offdiag": True}),
        ((2, 6, 3), {"normalize": False}),
        ((8, 5), {"segment_ids": torch.tensor([3, 1, 3, 0, 1, 1, 3, 3])}),
    ]:
        h = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda x, o=options: decpo.decorrelation_penalty(x, **o), (h,)
        )


def test_no_grad_pass_computes_no_gradient():
    hidden = torch.randn(10, 4, requires_grad=True)
    with torch.no_grad():
        loss = decpo.decorrelation_penalty(hidden)
    assert not loss.requires_grad
    ref = decorrelation_penalty_reference(hidden.detach().double())
    assert rel_err(loss, ref) < TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_in_give_nan_out(backend):
    for bad in (float("nan"), float("inf")):
        for normalize in (True, False):
            for n in (4, 40):  # both paths
                hidden = torch.randn(n, 8)
                hidden[1, 2] = bad
                loss = decpo.decorrelation_penalty(hidden, normalize=normalize, backend=backend)
                assert torch.isnan(loss), (bad, normalize, n, loss)
    # A NaN row that the mask leaves out is never read.
    hidden = torch.randn(5, 8)
    hidden[2] = float("nan")
    mask = torch.tensor([True, True, False, True, True])
    assert torch.isfinite(decpo.decorrelation_penalty(hidden, mask=mask, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rows_and_tiny_norms(backend):
    hidden = torch.randn(7, 5)
    hidden[2] = 0.0  # a padding row: z = 0, its penalty terms are (0 - 1)^2 on the diagonal
    hidden[4] *= 1e-9  # norm below eps: z = h / eps, no projection in the backward
    _check(hidden, torch.float32, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_scaling_in_place_and_retained(dtype, backend):
    """Without retain_graph the backward scales the stored gradient in place; with it,
    every backward scales a copy, so running the graph again gives the same gradient.
    Both are bitwise the out-of-place product."""
    skip_unless_runs(backend, dtype)
    hidden = torch.randn(2, 9, 40).to(dtype)
    h = hidden.clone().requires_grad_(True)
    loss = decpo.decorrelation_penalty(h, backend=backend) * -1.7
    # Two backwards on the retained graph, then the last one that frees it.
    grads = [torch.autograd.grad(loss, h, retain_graph=retain)[0] for retain in (True, True, False)]
    h = hidden.clone().requires_grad_(True)
    (decpo.decorrelation_penalty(h, backend=backend) * -1.7).backward()
    grads.append(h.grad)
    for g in grads[1:]:
        assert torch.equal(g, grads[0])


def test_compile_fullgraph():
    def step(h, w):
        return decpo.decorrelation_penalty(torch.tanh(h @ w)) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    h = torch.randn(12, 6)
    w = torch.randn(6, 5, requires_grad=True)
    loss = compiled(h, w)
    loss.backward()
    grad = w.grad.clone()
    w.grad = None
    step(h, w).backward()
    torch.testing.assert_close(loss, step(h, w))
    torch.testing.assert_close(grad, w.grad)


def test_custom_op_opcheck():
    hidden = torch.randn(2, 9, 5)
    op = torch.ops.decpo.decorrelation_penalty.default
    for compute_grad in (False, True):
        args = (hidden, None, torch.arange(9) % 2, True, False, "mean", "torch", compute_grad)
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_path_matches_the_custom_op(backend):
    """Eager calls skip the dispatcher (decpo.ops.eager_call): the same loss and
    gradient bits as the custom op, with upstream scaling, a retained graph and a
    second backward, and under no_grad."""
    skip_unless_runs(backend, torch.bfloat16)
    gen = generator(5)
    hidden = torch.randn(2, 9, 16, generator=gen).to(torch.bfloat16)
    seg = torch.tensor([1, 0, 1, 1, 0, 2, 2, 0, 1])
    results = []
    for eager in (True, False):
        h = hidden.clone().requires_grad_(True)
        if eager:
            loss = decpo.decorrelation_penalty(h, segment_ids=seg, backend=backend)
            assert type(loss.grad_fn).__name__ == "_EagerDecorrelationBackward"
        else:
            loss, _ = torch.ops.decpo.decorrelation_penalty(h, None, seg, True, False, "mean",
                                                            backend, True)  # fmt: skip
        assert loss.requires_grad
        (loss * 0.3).backward(retain_graph=True)
        first = h.grad.clone()
        (loss * -2.0).backward()
        results.append((loss.detach(), first, h.grad))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():
        h = hidden.clone().requires_grad_(True)
        loss = decpo.decorrelation_penalty(h, segment_ids=seg, backend=backend)
    assert loss.grad_fn is None and torch.equal(loss, results[0][0])


def test_eager_call_only_for_plain_eager_tensors():
    """FakeTensorMode, tensor subclasses and torch.compile take the custom op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from decpo.ops import eager_call

    plain = torch.randn(3, 4)
    assert eager_call(plain, None)
    with torch.device("meta"):  # a torch-function mode: the implementation runs under it
        assert eager_call(plain)
    with FakeTensorMode():
        fake = torch.randn(2, 3, 4, requires_grad=True)
        assert not eager_call(fake)
        loss = decpo.decorrelation_penalty(fake, backend="torch")
        loss.backward()
        assert loss.shape == () and fake.grad.shape == fake.shape

    class Sub(torch.Tensor):
        pass

    assert not eager_call(plain.as_subclass(Sub))
    seen = []

    @torch.compile(backend="eager", fullgraph=True)
    def traced(h):
        seen.append(eager_call(h))
        return decpo.decorrelation_penalty(h, backend="torch")

    traced(plain)
    assert seen == [False]


# ------------------------------------------------------------------ properties

rows = st.integers(1, 12)
dims = st.integers(1, 12)


@settings(max_examples=40, deadline=None)
@given(n=rows, d=dims, seed=st.integers(0, 2**31 - 1), offdiag=st.booleans())
def test_invariant_to_row_scaling_when_normalized(n, d, seed, offdiag):
    g = generator(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    scales = torch.rand(n, 1, generator=g, dtype=torch.float64) * 100 + 0.01
    a = decpo.decorrelation_penalty(hidden, offdiag=offdiag)
    b = decpo.decorrelation_penalty(hidden * scales, offdiag=offdiag)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(d=st.integers(1, 16), k=st.integers(1, 16), seed=st.integers(0, 2**31 - 1))
def test_zero_for_orthonormal_rows(d, k, seed):
    k = min(k, d)
    g = generator(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    hidden = q[:k]  # k orthonormal rows
    for normalize in (True, False):
        loss = decpo.decorrelation_penalty(hidden, normalize=normalize)
        assert abs(loss.item()) < 1e-12


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 20), d=dims, seed=st.integers(0, 2**31 - 1))
def test_invariant_to_row_permutation_and_group_relabeling(n, d, seed):
    g = generator(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    seg = torch.randint(0, 3, (n,), generator=g)
    perm = torch.randperm(n, generator=g)
    a = decpo.decorrelation_penalty(hidden, segment_ids=seg, reduction="sum")
    b = decpo.decorrelation_penalty(hidden[perm], segment_ids=seg[perm] * 5 + 9, reduction="sum")
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # Groups add up: the sum over groups equals the grouped sum.
    parts = sum(
        decpo.decorrelation_penalty(hidden[seg == s], reduction="sum") for s in seg.unique()
    )
    torch.testing.assert_close(a, parts, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("k", [1, 5, 128, 129, 300])
def test_symmetric_product_matches_matmul(k):
    a = torch.randn(2, 7, k, dtype=torch.float64)
    torch.testing.assert_close(torch_impl._symmetric_product(a), a.transpose(1, 2) @ a)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_gradient_survives_loss_scaling(backend):
    # ~1/pairs per entry is below fp16's smallest subnormal: the stored gradient must
    # not be rounded to fp16 before grad_output (the loss scale) multiplies it.
    # D = 8: the covariance path (fewer rows under the Triton interpreter: it is slow).
    hidden = torch.randn(4100 if backend == "torch" else 700, 8)
    _check(hidden, torch.float16, upstream=65536.0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_zero_rows_and_large_unnormalized_values(backend):
    hidden = torch.randn(20, 24)
    hidden[3] = 0.0
    _check(hidden, torch.float16, backend=backend)
    big = torch.randn(18, 64) * 40  # |G_ij| up to ~1e5: beyond fp16's range
    # A small upstream gradient keeps the final fp16 gradient representable; the
    # intermediate Gram entries are not, and must not overflow inside the kernels.
    _check(big, torch.float16, normalize=False, backend=backend, upstream=1e-3)


def test_fake_matches_real_strides():
    hidden = torch.randn(8, 3, 16).transpose(0, 1)  # (3, 8, 16), permuted layout
    torch.library.opcheck(
        torch.ops.decpo.decorrelation_penalty.default,
        (hidden, None, None, True, False, "mean", "torch", True),
        test_utils=("test_faketensor",),
    )
