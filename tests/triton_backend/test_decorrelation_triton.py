"""The Triton decorrelation kernels, path by path, against float64 (under the
interpreter where there is no GPU, tests/conftest.py sets TRITON_INTERPRET=1; on one
with DECPO_TEST_DEVICE=cuda) and
against eager PyTorch at the same dtype. Interpreter tiles are 16 wide, so groups of
<= 16 rows take the fused single-tile Gram kernel, 17..D rows the tile-pair kernels
(E stored, then dZ = E Z; with atomics when E exceeds its budget), and > D rows the
covariance path (two column tiles once Dp > 16)."""

from __future__ import annotations

import pytest
import torch

import decpo
from decpo.numerics import bucket_rows, interpreting
from decpo.reference import decorrelation_penalty_reference
from tests.helpers import assert_close

pytest.importorskip("triton")

from decpo.triton_backend import common
from decpo.triton_backend import decorrelation as dec


def _sizes(n: int, mask, segment_ids) -> list[int]:
    _rows, sizes = bucket_rows(n, mask, segment_ids, torch.get_default_device())
    return sizes


def _paths(hidden, mask, segment_ids, normalize, offdiag) -> set[str]:
    sizes = _sizes(hidden.shape[-2], mask, segment_ids)
    plan, _ = dec._plan(tuple(sizes), hidden.shape[-1], hidden.dtype, normalize, offdiag, True)
    return {k for k in ("fused", "pair", "cov") if getattr(plan, k)}


def _run(hidden, dtype, upstream, **options):
    h = hidden.detach().to(dtype).clone().requires_grad_(True)
    loss = decpo.decorrelation_penalty(h, backend="triton", **options)
    (loss * upstream).backward()
    return loss.detach(), h.grad


def _check(hidden, dtype, expect: set[str], upstream=-1.7, **options):
    """Triton vs float64 on the same rounded input, and no worse than eager PyTorch
    (the reference formula run in `dtype` with autograd)."""
    kinds = _paths(
        hidden.to(dtype),
        options.get("mask"),
        options.get("segment_ids"),
        options.get("normalize", True),
        options.get("offdiag", False),
    )
    # The paths follow the tile size: 16 under the interpreter, 64-128 on a GPU
    # (DECPO_TEST_DEVICE=cuda), where these small shapes mostly take one tile.
    if interpreting():
        assert kinds == expect, kinds
    loss, grad = _run(hidden, dtype, upstream, **options)
    h64 = hidden.detach().to(dtype).double().requires_grad_(True)
    ref = decorrelation_penalty_reference(h64, **options)
    (ref * upstream).backward()
    he = hidden.detach().to(dtype).requires_grad_(True)
    eager = decorrelation_penalty_reference(he, **options)
    (eager * upstream).backward()
    assert_close(loss, ref, dtype, "penalty", eager=eager)
    assert grad.dtype == dtype
    assert_close(grad, h64.grad, dtype, "d hidden", eager=he.grad)


LOW = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", [*LOW, torch.float32])
@pytest.mark.parametrize("offdiag", [False, True])
def test_fused_single_tile_gram(dtype, offdiag):
    # Groups of 1 (offdiag: no pairs), 5, 13 and 16 rows, D prime: one tile each.
    n, d = 35, 37
    seg = torch.tensor([0] * 5 + [1] * 13 + [2] * 16 + [3])[torch.randperm(35)]
    _check(torch.randn(n, d), dtype, {"fused"}, segment_ids=seg, offdiag=offdiag)


@pytest.mark.parametrize("dtype", [*LOW, torch.float32])
@pytest.mark.parametrize("offdiag", [False, True])
def test_tile_pairs_with_atomics(dtype, offdiag):
    # 41 rows, D = 53: three 16-row tiles, diagonal and off-diagonal pairs.
    _check(torch.randn(41, 53), dtype, {"pair"}, offdiag=offdiag, upstream=0.37)


@pytest.mark.parametrize("dtype", [*LOW, torch.float32])
@pytest.mark.parametrize("offdiag", [False, True])
def test_tile_pairs_atomic_fallback(dtype, offdiag, monkeypatch):
    # E over its budget: the tile pairs accumulate dZ with atomics, as before.
    monkeypatch.setattr(dec, "E_BUDGET", 0)
    with common.recording() as launches:
        dec.decorrelation_penalty(torch.randn(1, 41, 53), None, None, True, offdiag, "mean", True)
    if interpreting():  # GPU tiles hold these 41 rows in one tile: no pairs
        assert "_gram_pair_kernel" in {launch.kernel.fn.__name__ for launch in launches}
    _check(torch.randn(41, 53), dtype, {"pair"}, offdiag=offdiag, upstream=0.37)
    seg = torch.tensor([0] * 7 + [1] * 20 + [2] * 40)
    _check(torch.randn(67, 29) * 0.3, dtype, {"fused", "pair", "cov"}, segment_ids=seg,
           normalize=False)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_tile_pairs_bit_identical_run_to_run(dtype):
    # The stored-E path writes every E tile, radial partial and output tile once,
    # summed in a fixed order: loss and gradient are bit-identical run to run.
    seg = torch.tensor([0] * 41 + [1] * 35 + [2] * 5)  # two multi-tile groups, one fused
    hidden = torch.randn(2, 81, 53)
    with common.recording() as launches:
        dec.decorrelation_penalty(hidden.to(dtype), None, seg, True, False, "mean", True)
    names = {launch.kernel.fn.__name__ for launch in launches}
    if interpreting():  # on a GPU's larger tiles every group here fits one tile (fused)
        assert {"_gram_error_kernel", "_gram_grad_kernel"} <= names
    assert "_gram_pair_kernel" not in names and "_finish_kernel" not in names
    first = _run(hidden, dtype, 0.37, segment_ids=seg)
    again = _run(hidden, dtype, 0.37, segment_ids=seg)
    assert torch.equal(first[0], again[0])
    assert torch.equal(first[1], again[1])


@pytest.mark.parametrize("dtype", [*LOW, torch.float32])
@pytest.mark.parametrize("offdiag", [False, True])
def test_covariance_path(dtype, offdiag):
    # n = 71 > D = 23: Dp = 32, two 16-wide column tiles, a (0, 1) and two diagonal
    # tile pairs; row blocks of 16 with a ragged last one.
    _check(torch.randn(71, 23), dtype, {"cov"}, offdiag=offdiag)


@pytest.mark.parametrize("dtype", LOW)
def test_covariance_near_n_equal_d(dtype):
    # n = D + 1: Z C - Z would cancel if C were rounded before the identity is taken out.
    _check(torch.randn(30, 29), dtype, {"cov"})


@pytest.mark.parametrize("dtype", [*LOW, torch.float32])
def test_unnormalized_every_path(dtype):
    seg = torch.tensor([0] * 7 + [1] * 20 + [2] * 40)  # fused, pairs (D = 29), covariance
    hidden = torch.randn(67, 29) * 0.3
    _check(hidden, dtype, {"fused", "pair", "cov"}, segment_ids=seg, normalize=False)
    _check(hidden, dtype, {"fused", "pair", "cov"}, segment_ids=seg, normalize=False,
           offdiag=True, upstream=2.3)  # fmt: skip


@pytest.mark.parametrize("dtype", LOW)
def test_mask_segments_and_layers(dtype):
    # (L, N, D) with a mask and unsorted, non-contiguous ids: every path in one call.
    n = 60
    seg = torch.randint(0, 2, (n,)) * 5 - 4
    seg[:6] = 50  # a small group
    mask = torch.rand(n) > 0.15
    hidden = torch.randn(2, n, 19)
    kinds = _paths(hidden, mask, seg, True, False)
    assert "cov" in kinds and "fused" in kinds
    _check(hidden, dtype, kinds, mask=mask, segment_ids=seg, reduction="sum", upstream=-0.6)
    _check(hidden, dtype, kinds, mask=mask, segment_ids=seg, offdiag=True)


@pytest.mark.parametrize("dtype", LOW)
def test_awkward_sizes(dtype):
    _check(torch.randn(1, 7), dtype, {"fused"})  # N = 1
    _check(torch.randn(2, 1, 5), dtype, {"fused"})  # one row per layer
    _check(torch.randn(17, 3), dtype, {"cov"})  # prime n > prime D, D < 16
    _check(torch.randn(2, 19, 31), dtype, {"pair"}, offdiag=True)  # prime n, D; L = 2


def test_no_grad_pass_and_zero_rows():
    hidden = torch.randn(40, 21)
    hidden[3] = 0.0
    hidden[30] *= 1e-9  # norm below eps: no projection in the backward
    seg = torch.arange(40) // 20  # two groups of 20 (pairs)
    _check(hidden, torch.float32, {"pair"}, segment_ids=seg)
    with torch.no_grad():
        loss = decpo.decorrelation_penalty(hidden.bfloat16(), backend="triton")
    ref = decorrelation_penalty_reference(hidden.bfloat16().double())
    assert_close(loss, ref, torch.bfloat16, "no-grad penalty")


def test_gate_cases_record_every_kernel():
    kernels = set()
    cases = dec.gate_cases()
    assert {cls for _, cls, _ in cases} == {"gram-small", "gram-tile", "gram-large", "covariance"}
    for _case, _cls, thunk in cases[:5]:  # bf16: every shape class, and the atomic fallback
        with common.recording() as launches:
            thunk()
        for launch in launches:
            kernels.add(launch.kernel.fn.__name__)
            assert launch.config in launch.candidates
    # Under the interpreter's 16-row tiles no gate case is a single-tile group.
    assert kernels >= {"_pack_kernel", "_gram_error_kernel", "_gram_grad_kernel", "_cov_kernel",
                       "_cov_grad_kernel", "_finish_kernel", "_gram_pair_kernel"}  # fmt: skip


def test_costs_count_the_tiled_work():
    for row in dec.headline_costs():
        # ~4/3: a single-tile group multiplies its whole G tile (2 n^2 D, not n^2 D).
        assert row["useful_flops"] <= row["flops"] <= 1.4 * row["useful_flops"], row
        assert row["bytes"] > 0
    # Covariance path: 3 n D^2 plus the diagonal tiles' symmetric overhead.
    flops, nbytes = dec.decorrelation_cost([16384], 4096)
    assert 3 * 16384 * 4096**2 <= flops <= 3.1 * 16384 * 4096**2
    assert nbytes >= 2 * 16384 * 4096 * 2  # read h, write dh at least


def test_device_tables_kept_for_eager_calls_only():
    """The launcher keeps a plan's index tables across eager calls (one host copy per
    plan, not per call) and builds fresh ones for calls through the custom op, which
    torch.compile's CUDA graphs may run."""
    dec._plan.cache_clear()
    device = torch.get_default_device()
    h = torch.randn(2, 8, 16, device=device)
    seg = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2], device=device)
    sizes, dim = (2, 3, 3), h.shape[-1]
    torch.ops.decpo.decorrelation_penalty(h, None, seg, True, False, "mean", "triton", True)
    plan, _ = dec._plan(sizes, dim, h.dtype, True, False, interpreting())
    assert plan.tables == {}
    first = decpo.decorrelation_penalty(h, segment_ids=seg, backend="triton")
    kept = dict(plan.tables)
    assert kept
    second = decpo.decorrelation_penalty(h, segment_ids=seg, backend="triton")
    assert plan.tables.keys() == kept.keys()
    assert all(plan.tables[k] is table for k, table in kept.items())
    assert torch.equal(first, second)
