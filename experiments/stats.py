"""The statistics the report prints about seeds: mean and sample standard deviation, the paired
t-test of two variants over the seeds both ran, and Holm's correction for testing several claims.

The t distribution comes from scipy.stats (the analysis extra: pip install -e ".[analysis]"),
imported where a test is computed, so that the grid runner and constant.py need the core install
only. scipy has no Holm-Bonferroni step-down (scipy.stats.false_discovery_control controls the
false discovery rate, not the family-wise error), so holm() is written out here.
"""
from __future__ import annotations

import math

# Two-sided 95 % critical values of Student's t, by degrees of freedom, as the report prints them:
# scipy.stats.t.ppf(0.975, df) to 3 decimals (tests/test_grid.py checks each). A comparison on more
# seeds than the table covers gets no test (paired_t: None).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    n = len(xs)
    m = sum(xs) / n
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0)


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom (scipy.stats.t's survival function)."""
    from scipy import stats
    return float(2 * stats.t.sf(abs(t), df))


def holm(pvalues: list[float], alpha: float = 0.05) -> list[bool]:
    """Holm-Bonferroni: which of the hypotheses are rejected with the family-wise error kept at
    `alpha` (the smallest p against alpha/m, the next against alpha/(m-1), ..., stopping at the first
    that is not below)."""
    out, m = [False] * len(pvalues), len(pvalues)
    for rank, i in enumerate(sorted(range(m), key=lambda i: pvalues[i])):
        if pvalues[i] >= alpha / (m - rank):
            break
        out[i] = True
    return out


def paired_t(a: dict[int, float], b: dict[int, float]) -> dict | None:
    """Paired t-test over the seeds both have (scipy.stats.ttest_rel): mean difference a - b, t,
    its two-sided p, and whether |t| exceeds the two-sided 95 % critical value (None with fewer
    than 2 shared seeds, or df above the table). Differences with no spread at all give t = inf
    (p = 0), or t = 0 (p = 1) when they are all 0, where ttest_rel would divide by 0."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2 or len(seeds) - 1 not in T975:
        return None
    d = [a[s] - b[s] for s in seeds]
    m, sd = mean_std(d)
    if sd == 0:
        t = math.inf if m != 0 else 0.0
        p = t_two_sided_p(t, len(d) - 1)
    else:
        from scipy import stats
        test = stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds])
        t, p = float(test.statistic), float(test.pvalue)
    return {"n": len(d), "mean_diff": m, "t": t, "critical": T975[len(d) - 1], "significant": abs(t) > T975[len(d) - 1],
            "p": p}
