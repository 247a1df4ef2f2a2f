"""Tests for stats.py: Student t quantiles against a printed table, the incomplete beta against closed
forms, and the two intervals worked by hand."""
import math

import pytest

import stats


def test_t_quantile_matches_the_table():
    """Student t quantiles (two-sided 95%) from a printed table: 12.706 (1 dof), 3.182 (3), 2.228 (10), 2.042 (30)."""
    for dof, want in ((1, 12.7062), (3, 3.1824), (10, 2.2281), (30, 2.0423)):
        assert stats.t_quantile(dof, 0.95) == pytest.approx(want, abs=2e-4)


@pytest.mark.parametrize("x", [0.05, 0.3, 0.5, 0.77, 0.99])
def test_betainc_closed_forms(x):
    """I_x(1, 1) = x, I_x(a, 1) = x^a, I_x(1, b) = 1 - (1 - x)^b, and the symmetry I_x(a, b) = 1 - I_{1-x}(b, a)."""
    assert stats.betainc(1, 1, x) == pytest.approx(x, abs=1e-10)
    assert stats.betainc(2.5, 1, x) == pytest.approx(x ** 2.5, abs=1e-10)
    assert stats.betainc(1, 3.5, x) == pytest.approx(1 - (1 - x) ** 3.5, abs=1e-10)
    assert stats.betainc(2, 5, x) == pytest.approx(1 - stats.betainc(5, 2, 1 - x), abs=1e-10)


def test_intervals_by_hand():
    """Values 1, 2, 3: mean 2, sd 1, half-width t(2 dof) x 1 / sqrt(3) = 4.3027 / 1.732 = 2.484. Times (2, 4)
    against (1, 1): ratios 2 and 4, log ratios ln 2 and ln 4, their mean ln 2.828 (the geometric mean), sd
    ln 2 / sqrt(2), half-width t(1 dof) x sd / sqrt(2) = 12.706 x ln 2 / 2."""
    mean, half = stats.t_interval([1.0, 2.0, 3.0])
    assert mean == 2 and half == pytest.approx(2.4841, abs=2e-4)
    assert math.isnan(stats.t_interval([5.0])[1])
    speedup, (low, high) = stats.ratio_interval([2.0, 4.0], [1.0, 1.0])
    h = 12.7062 * math.log(2) / 2
    assert speedup == pytest.approx(math.sqrt(8))
    assert (low, high) == (pytest.approx(math.sqrt(8) * math.exp(-h), rel=1e-4), pytest.approx(math.sqrt(8) * math.exp(h), rel=1e-4))
