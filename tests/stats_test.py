"""Host-side statistics against scipy and hand computations."""

import math
import warnings

import jax
import numpy as np
import pytest
from scipy import stats as sps

from jaxprune import stats

RNG = np.random.default_rng(0)
X = RNG.normal(size=30)
Y = -0.7 * X + 0.5 * RNG.normal(size=30)


def test_pearson_and_kendall_match_scipy():
    p = stats.pearson(X, Y)
    ref = sps.pearsonr(X, Y)
    assert p.stat == pytest.approx(ref.statistic) and p.pvalue == pytest.approx(ref.pvalue)
    assert p.n == 30 and p.ci_low < p.stat < p.ci_high
    k = stats.kendall(X, Y)
    ref = sps.kendalltau(X, Y)
    assert k.stat == pytest.approx(ref.statistic) and k.pvalue == pytest.approx(ref.pvalue)
    assert k.ci_low < k.stat < k.ci_high


def test_fisher_z_ci_by_hand():
    # r = -0.73, n = 30 (the paper's VGG11 Fig. 2): z = atanh(r), half-width 1.959964 / sqrt(27).
    z, half = math.atanh(-0.73), 1.959963984540054 / math.sqrt(27)
    ci = stats.fisher_z_ci(-0.73, 30)
    assert ci.low == pytest.approx(math.tanh(z - half), rel=1e-12)
    assert ci.high == pytest.approx(math.tanh(z + half), rel=1e-12)
    assert ci.low == pytest.approx(-0.8628, abs=1e-3) and ci.high == pytest.approx(
        -0.5025, abs=1e-3
    )
    assert np.isnan(stats.fisher_z_ci(0.5, 3).low)
    # A perfect correlation (a 2-point stability quick run can give one): the interval is the point.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tuple(stats.fisher_z_ci(-1.0, 10)) == (-1.0, -1.0)
    # Sanity check of the notes: r = -0.73 with n = 30 gives p ~ 4.7e-6 (paper: 4.4e-6).
    t = -0.73 * math.sqrt(28 / (1 - 0.73**2))
    assert 2 * sps.t.sf(abs(t), 28) == pytest.approx(4.7e-6, rel=0.05)


def test_mean_ci_matches_scipy_t_interval():
    x = RNG.normal(loc=85.0, scale=0.7, size=(8, 3))  # (seeds, configs)
    m = stats.mean_ci(x, axis=0)
    lo, hi = sps.t.interval(0.95, 7, loc=x.mean(0), scale=sps.sem(x, axis=0))
    np.testing.assert_allclose(m.mean, x.mean(0))
    np.testing.assert_allclose(m.low, lo)
    np.testing.assert_allclose(m.high, hi)
    one = stats.mean_ci(x[:, 0])
    assert isinstance(one.mean, float) and one.n == 8 and one.low == pytest.approx(lo[0])
    assert np.isnan(stats.mean_ci(x[:1, 0]).low)


def test_bootstrap_ci_reproducible_and_by_hand():
    x = RNG.normal(size=(10, 4))  # (seeds, epochs)
    a = stats.bootstrap_mean_ci(x, seed=3, num_resamples=500)
    b = stats.bootstrap_mean_ci(x, seed=3, num_resamples=500)
    np.testing.assert_array_equal(a.low, b.low)
    idx = np.random.default_rng(3).integers(0, 10, size=(500, 10))
    means = x[idx].mean(1)
    np.testing.assert_allclose(a.low, np.quantile(means, 0.025, axis=0))
    np.testing.assert_allclose(a.high, np.quantile(means, 0.975, axis=0))
    assert np.all(a.low < a.mean) and np.all(a.mean < a.high)
    # Along another axis, and seeded from a jax key.
    t = stats.bootstrap_mean_ci(x.T, seed=3, axis=1, num_resamples=500)
    np.testing.assert_allclose(t.low, a.low)
    k1 = stats.bootstrap_mean_ci(x[:, 0], seed=jax.random.key(5))
    k2 = stats.bootstrap_mean_ci(x[:, 0], seed=jax.random.key(5))
    assert k1.low == k2.low and isinstance(k1.low, float)


def test_bootstrap_width_matches_normal_theory():
    x = RNG.normal(scale=2.0, size=400)
    ci = stats.bootstrap_mean_ci(x, seed=0, num_resamples=2000)
    assert ci.high - ci.low == pytest.approx(2 * 1.96 * x.std() / math.sqrt(400), rel=0.1)


def test_ttests_match_scipy():
    a, b = RNG.normal(0.0, 1.0, 12), RNG.normal(0.8, 2.0, 9)
    w = stats.welch_ttest(a, b)
    ref = sps.ttest_ind(a, b, equal_var=False)
    assert w.statistic == pytest.approx(ref.statistic) and w.pvalue == pytest.approx(ref.pvalue)
    va, vb = a.var(ddof=1) / 12, b.var(ddof=1) / 9  # Welch-Satterthwaite df by hand
    assert w.df == pytest.approx((va + vb) ** 2 / (va**2 / 11 + vb**2 / 8))
    s = stats.ttest(a, b, equal_var=True)
    ref = sps.ttest_ind(a, b)
    assert s.pvalue == pytest.approx(ref.pvalue) and s.df == 19


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="same number"):
        stats.pearson([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least 3"):
        stats.kendall([1, 2], [2, 1])
    with pytest.raises(ValueError, match=">= 2"):
        stats.ttest([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="confidence"):
        stats.mean_ci([1.0, 2.0], confidence=95)


def _fisher_z(r, n, confidence):
    half = sps.norm.ppf(0.5 + confidence / 2) / math.sqrt(n - 3)
    return math.tanh(math.atanh(r) - half), math.tanh(math.atanh(r) + half)


@pytest.mark.parametrize("confidence", [0.95, 0.8])
def test_pearson_and_kendall_intervals_are_fisher_z(confidence):
    """Both CIs are tanh(atanh(c) -+ z_{(1+conf)/2} / sqrt(n - 3)) around scipy's coefficient c
    (the module docstring: pingouin's interval, applied to Kendall tau too), on data with ties so
    tau-b differs from tau-a; p-values are scipy's."""
    x = np.round(X, 0)  # 30 points, many tied x values
    y = np.round(Y, 1)
    for fn, ref_fn in ((stats.pearson, sps.pearsonr), (stats.kendall, sps.kendalltau)):
        c = fn(x, y, confidence=confidence)
        ref = ref_fn(x, y)
        assert c.n == 30
        assert c.stat == pytest.approx(ref.statistic, rel=1e-12)
        assert c.pvalue == pytest.approx(ref.pvalue, rel=1e-9)
        low, high = _fisher_z(ref.statistic, 30, confidence)
        assert c.ci_low == pytest.approx(low, rel=1e-12) and c.ci_high == pytest.approx(high, rel=1e-12)
    # The ties matter: tau-a differs from tau-b, so a kendall reporting tau-a would fail above.
    conc = sum(np.sign((x[i] - x[j]) * (y[i] - y[j])) for i in range(30) for j in range(i))
    assert stats.kendall(x, y).stat != pytest.approx(conc / (30 * 29 / 2), rel=1e-3)
    # Three points: the coefficient and p-value exist, the interval does not (n - 3 = 0).
    three = stats.pearson([1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert three.stat == pytest.approx(0.5) and math.isnan(three.ci_low) and math.isnan(three.ci_high)
    assert three.pvalue == pytest.approx(sps.pearsonr([1.0, 2.0, 3.0], [1.0, 3.0, 2.0]).pvalue)
