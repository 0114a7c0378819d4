"""Host-side statistics over runs: correlations, intervals and tests (numpy / scipy).

Results come back from the device as (S, ...) arrays; these functions reduce them on the host and
return NamedTuples of Python floats or numpy arrays. The choices follow the paper's analysis code
(notes §2): Pearson r and Kendall tau with scipy's p-values, pingouin-style Fisher-z intervals on
the coefficient, seaborn-style percentile bootstrap of the mean (1000 resamples), two-sample
t-tests.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
from scipy import stats as sps

ArrayLike = np.ndarray | jax.Array | list | tuple | float


class Correlation(NamedTuple):
    stat: float  # Pearson r or Kendall tau
    pvalue: float  # two-sided
    n: int
    ci_low: float  # Fisher-z interval (see fisher_z_ci), NaN for n <= 3
    ci_high: float


class Interval(NamedTuple):
    low: float | np.ndarray
    high: float | np.ndarray


class MeanCI(NamedTuple):
    mean: float | np.ndarray
    low: float | np.ndarray
    high: float | np.ndarray
    sem: (
        float | np.ndarray
    )  # standard error of the mean (ddof = 1); for bootstrap, the sd of resamples
    n: int


class TTest(NamedTuple):
    statistic: float
    pvalue: float  # two-sided
    df: float


def _pair(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same number of points, got {x.size} and {y.size}")
    if x.size < 3:
        raise ValueError(f"a correlation needs at least 3 points, got {x.size}")
    return x, y


def fisher_z_ci(r: float, n: int, confidence: float = 0.95) -> Interval:
    """tanh(atanh(r) +- z_{(1+c)/2} / sqrt(n - 3)): the parametric interval pingouin reports (the
    paper applies it to Kendall tau too). NaN for n <= 3."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if n <= 3:
        return Interval(float("nan"), float("nan"))
    with np.errstate(divide="ignore"):  # |r| = 1: z = +-inf, and the interval is the point (r, r)
        z = np.arctanh(np.clip(r, -1.0, 1.0))
    half = sps.norm.ppf(0.5 + confidence / 2) / np.sqrt(n - 3)
    return Interval(float(np.tanh(z - half)), float(np.tanh(z + half)))


def pearson(x: ArrayLike, y: ArrayLike, confidence: float = 0.95) -> Correlation:
    """Pearson r with scipy's two-sided p-value and a Fisher-z interval."""
    x, y = _pair(x, y)
    res = sps.pearsonr(x, y)
    ci = fisher_z_ci(float(res.statistic), x.size, confidence)
    return Correlation(float(res.statistic), float(res.pvalue), x.size, *ci)


def kendall(x: ArrayLike, y: ArrayLike, confidence: float = 0.95) -> Correlation:
    """Kendall tau-b with scipy's two-sided p-value and (as pingouin in the paper) a Fisher-z CI."""
    x, y = _pair(x, y)
    res = sps.kendalltau(x, y)
    ci = fisher_z_ci(float(res.statistic), x.size, confidence)
    return Correlation(float(res.statistic), float(res.pvalue), x.size, *ci)


def _rng(seed: int | jax.Array | np.random.Generator) -> np.random.Generator:
    """A numpy Generator from an int seed, a jax key (its key data seeds it) or a Generator."""
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, jax.Array):
        if jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key):
            seed = jax.random.key_data(seed)
        return np.random.default_rng(np.asarray(seed, np.uint32).ravel().tolist())
    return np.random.default_rng(int(seed))


def bootstrap_mean_ci(
    x: ArrayLike,
    seed: int | jax.Array | np.random.Generator,
    axis: int = 0,
    num_resamples: int = 1000,
    confidence: float = 0.95,
) -> MeanCI:
    """Percentile bootstrap CI of the mean along `axis` (seaborn's ci=95 with 1000 resamples).

    The same resample indices are used for every position of the other axes, so a (S, E) curve gets
    a per-epoch band from one set of seed resamples. Reproducible from `seed` (int or jax key).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    x = np.moveaxis(np.asarray(x, np.float64), axis, 0)
    n = x.shape[0]
    if n < 1:
        raise ValueError("bootstrap_mean_ci needs at least one sample along `axis`")
    idx = _rng(seed).integers(0, n, size=(num_resamples, n))
    means = x[idx].mean(axis=1)  # (B, ...)
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1.0 - alpha], axis=0)
    return MeanCI(_scalar(x.mean(0)), _scalar(low), _scalar(high), _scalar(means.std(0)), n)


def mean_ci(x: ArrayLike, axis: int = 0, confidence: float = 0.95) -> MeanCI:
    """Mean and t-interval mean +- t_{n-1,(1+c)/2} s / sqrt(n) along `axis` (e.g. over seeds)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    x = np.asarray(x, np.float64)
    n = x.shape[axis]
    mean = x.mean(axis)
    if n < 2:
        nan = np.full_like(mean, np.nan)
        return MeanCI(_scalar(mean), _scalar(nan), _scalar(nan), _scalar(nan), n)
    sem = x.std(axis, ddof=1) / np.sqrt(n)
    half = sps.t.ppf(0.5 + confidence / 2, n - 1) * sem
    return MeanCI(_scalar(mean), _scalar(mean - half), _scalar(mean + half), _scalar(sem), n)


def ttest(a: ArrayLike, b: ArrayLike, equal_var: bool = False) -> TTest:
    """Two-sample t-test of mean(a) = mean(b): Welch by default; equal_var=True is Student's test
    (the paper's Table F1)."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    if a.size < 2 or b.size < 2:
        raise ValueError(f"each sample needs >= 2 values, got {a.size} and {b.size}")
    res = sps.ttest_ind(a, b, equal_var=equal_var)
    return TTest(float(res.statistic), float(res.pvalue), float(res.df))


def welch_ttest(a: ArrayLike, b: ArrayLike) -> TTest:
    return ttest(a, b, equal_var=False)


def _scalar(x: np.ndarray) -> float | np.ndarray:
    return float(x) if np.ndim(x) == 0 else x
