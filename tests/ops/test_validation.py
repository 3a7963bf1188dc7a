"""Bad input at the public boundary: a TypeError or ValueError that names the argument."""

from __future__ import annotations

import pytest
import torch

import decpo

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
