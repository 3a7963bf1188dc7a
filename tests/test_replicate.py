"""The replication's paired statistics (experiments/replicate.py) on hand-computed values."""

from __future__ import annotations

import math

import pytest

from experiments import replicate


@pytest.mark.parametrize(
    ("t", "df", "p"),
    [
        (1.0, 1, 0.5),  # Cauchy: P(|T| >= 1) = 1 - 2 atan(1) / (pi / 2) / 2 = 0.5
        (1.0, 2, 1 - 1 / math.sqrt(3)),  # df 2: P(|T| < t) = t / sqrt(2 + t^2)
        (-1.0, 2, 1 - 1 / math.sqrt(3)),
        (2.7764451051977934, 4, 0.05),  # the t table's 97.5% point for 4 degrees of freedom
        (2.5705818356363146, 5, 0.05),
        (0.0, 3, 1.0),
    ],
)
def test_t_test_p(t, df, p):
    assert replicate.t_test_p(t, df) == pytest.approx(p, rel=1e-9, abs=1e-12)


def test_paired_differences():
    stats = replicate.paired([1.0, 2.0, 4.0], [0.0, 1.0, 1.0])
    # differences 1, 1, 3: mean 5/3, std sqrt(4/3), t = (5/3) / (sqrt(4/3) / sqrt(3)) = 2.5
    assert stats["diffs"] == [1.0, 1.0, 3.0] and stats["higher"] == 3
    assert stats["mean"] == pytest.approx(5 / 3) and stats["std"] == pytest.approx(math.sqrt(4 / 3))
    assert stats["p"] == pytest.approx(replicate.t_test_p(2.5, 2))
    assert replicate.paired([1.0, 1.0], [1.0, 1.0])["p"] == 1.0  # no difference at all
