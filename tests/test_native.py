"""The CMake-built native library: loads, and its row-wise logsumexp-and-gather matches
the float64 reference."""

from __future__ import annotations

import pytest
import torch

from decpo import native_backend
from decpo.native_backend import logprobs as native_logprobs
from decpo.reference import logprobs_from_logits_reference
from tests.helpers import NATIVE_REQUIRED, assert_close

if not native_backend.is_available() and not NATIVE_REQUIRED:
    reason = native_backend.unavailable_reason()
    pytest.skip(f"native library unavailable: {reason}", allow_module_level=True)


def test_library_loads():
    assert native_backend.is_available(), native_backend.unavailable_reason()
    assert native_backend.unavailable_reason() == ""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (37, 513), (64, 1031)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logsumexp_gather_matches_reference(shape, dtype, temperature):
    logits = (torch.randn(shape) * 4).to(dtype)
    targets = torch.randint(0, shape[1], shape[:1])
    targets[torch.rand(shape[0]) < 0.2] = -100
    logp, lse = native_logprobs.logprobs_from_logits(logits, targets, -100, temperature)
    ref = logprobs_from_logits_reference(logits.double(), targets, temperature=temperature)
    assert logp.dtype == torch.float32
    assert_close(logp, ref, dtype if dtype == torch.float32 else torch.float32, "logp")
    valid = targets != -100
    ref_lse = torch.logsumexp(logits.double() / temperature, -1)
    assert_close(lse[valid], ref_lse[valid], torch.float32, "lse")
    assert torch.all(lse[~valid] == 0) and torch.all(logp[~valid] == 0)


def test_strided_rows():
    base = torch.randn(10, 300)
    logits = base[::2, :257]  # row stride 600, unit column stride
    targets = torch.randint(0, 257, (5,))
    logp, _ = native_logprobs.logprobs_from_logits(logits, targets, -100, 1.0)
    ref = logprobs_from_logits_reference(logits.double(), targets)
    assert_close(logp, ref, torch.float32, "logp")


def test_special_values():
    logits = torch.randn(4, 600)
    logits[0, :599] = float("-inf")  # only the last entry is left
    logits[1, 10] = float("nan")
    logits[2, 20] = float("inf")
    logits[3, :512] = float("-inf")  # a whole block of -inf, then finite values
    targets = torch.tensor([599, 3, 4, 550])
    logp, _ = native_logprobs.logprobs_from_logits(logits, targets, -100, 1.0)
    assert logp[0] == 0.0
    assert torch.isnan(logp[1]) and torch.isnan(logp[2])
    torch.testing.assert_close(logp[3], torch.log_softmax(logits[3], -1)[550])


def test_bad_target_is_rejected_before_reading():
    with pytest.raises(ValueError, match="targets"):
        native_logprobs.logprobs_from_logits(torch.randn(3, 5), torch.tensor([0, 5, 1]), -100, 1.0)


def test_kernels_use_the_calling_threads_torch_thread_count():
    """The library's OpenMP runtime is not PyTorch's: library() passes on
    torch.get_num_threads() of the calling thread (the exp probe runs on every thread
    of its team and counts what it computed)."""
    import threading

    from decpo.native_backend.library import library

    x = torch.zeros(64)
    previous = torch.get_num_threads()

    def exps_computed(threads: int) -> int:
        torch.set_num_threads(threads)
        out = torch.zeros(2, dtype=torch.float64)
        library().decpo_exp_probe(x.data_ptr(), 64, 1, 0, out.data_ptr())
        return int(out[1])

    try:
        assert exps_computed(1) == 64
        assert exps_computed(2) == 128
        seen = []  # another thread keeps its own setting
        worker = threading.Thread(target=lambda: seen.append(exps_computed(1)))
        worker.start()
        worker.join()
        assert seen == [64]
        assert torch.get_num_threads() == 2 and exps_computed(2) == 128
    finally:
        torch.set_num_threads(previous)
