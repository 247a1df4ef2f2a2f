"""
stats.py: the statistics of the benchmark: the confidence interval of a mean over held-out windows,
and of a speedup measured as paired ratios, without SciPy.

What it teaches: one run's figure means little on a shared machine, so every time bench.py reports
comes with the 95% interval of its mean over windows (Student's t: a handful of windows, variance
unknown). A speedup is a ratio of two times taken on the same window, so it is averaged on the log
scale (the geometric mean of the paired ratios) and its interval comes from the log ratios.
Follows: Numerical Recipes (3rd ed.) 6.4 for the incomplete beta function behind the t quantiles.
"""

import math


def t_interval(values, confidence=0.95):
    """(mean, half-width) of the `confidence` t-interval of the mean of `values` (nan half-width for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile(n - 1, confidence) * sd / math.sqrt(n)


def ratio_interval(baseline, contender, confidence=0.95):
    """(speedup, [low, high]): the geometric mean over windows of the paired ratio baseline / contender
    (times of the same windows, in the same order), with the `confidence` interval of that mean."""
    log_ratio = [math.log(b / c) for b, c in zip(baseline, contender)]
    mean, half = t_interval(log_ratio, confidence)
    return math.exp(mean), [math.exp(mean - half), math.exp(mean + half)]


def t_quantile(dof, confidence):
    """Two-sided Student t quantile, by bisection on the regularized incomplete beta."""
    target = (1 - confidence) / 2  # upper-tail mass

    def upper_tail(t):  # P(T > t) = I_{dof/(dof+t^2)}(dof/2, 1/2) / 2
        return 0.5 * betainc(dof / 2, 0.5, dof / (dof + t * t))

    lo, hi = 0.0, 1e3
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if upper_tail(mid) > target else (lo, mid)
    return (lo + hi) / 2


def betainc(a, b, x):
    """Regularized incomplete beta I_x(a, b) by its continued fraction (Numerical Recipes 6.4)."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):
        return 1 - betainc(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x)) / a
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1 + num * d
        d = 1 / (d if abs(d) > 1e-30 else 1e-30)
        c = 1 + num / c
        c = c if abs(c) > 1e-30 else 1e-30
        f *= c * d
        if abs(1 - c * d) < 1e-12:
            break
    return front * (f - 1)
