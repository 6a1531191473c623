"""Statistics for the experiments: binomial intervals and bootstrap fits.

* :func:`wilson_interval` and :func:`clopper_pearson_interval`: confidence
  intervals of a success rate from ``k`` successes in ``n`` trials (Wilson's
  score interval; the exact, conservative Clopper-Pearson interval).
* :func:`linear_fit_r2` and :func:`bootstrap_linear_fit`: least squares
  ``y = a x + c`` with ``R^2``, and percentile bootstrap intervals of
  ``a``, ``c`` and ``R^2`` from resampling the points (or whole groups of
  points, e.g. every row of one seed) with a fixed numpy seed.

Host-side numpy (and ``scipy.stats``, which JAX itself depends on); nothing
here is traced.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Sequence

import numpy as np
import scipy.stats

from factstore_jax.errors import FactStoreError


class BinomialCI(NamedTuple):
  successes: int
  trials: int
  rate: float      # successes / trials (nan for 0 trials)
  low: float       # lower end of the interval
  high: float      # upper end of the interval
  confidence: float


def _check_counts(successes, trials, confidence) -> tuple[int, int]:
  for name, v in (('successes', successes), ('trials', trials)):
    if (not isinstance(v, numbers.Integral) or isinstance(v, bool)) and not (
        isinstance(v, np.integer)):
      raise FactStoreError(f'{name} must be an int; got {v!r}')
  successes, trials = int(successes), int(trials)
  if trials < 0 or not 0 <= successes <= trials:
    raise FactStoreError(
        f'need 0 <= successes <= trials; got {successes} of {trials}')
  if not 0 < confidence < 1:
    raise FactStoreError(f'confidence must be in (0, 1); got {confidence!r}')
  return successes, trials


def wilson_interval(successes: int, trials: int,
                    confidence: float = 0.95) -> BinomialCI:
  """Wilson score interval of a binomial rate.

  Args:
    successes: ``k``, an int in ``[0, n]``.
    trials: ``n >= 0`` (``n = 0`` gives the uninformative ``[0, 1]``).
    confidence: two-sided level, in ``(0, 1)``.

  Returns:
    :class:`BinomialCI`; ``low``/``high`` clipped to ``[0, 1]`` (exactly 0
    for ``k = 0`` and 1 for ``k = n``).
  """
  k, n = _check_counts(successes, trials, confidence)
  if n == 0:
    return BinomialCI(0, 0, float('nan'), 0.0, 1.0, confidence)
  z = float(scipy.stats.norm.ppf(0.5 + confidence / 2))
  p = k / n
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  low = 0.0 if k == 0 else max(0.0, centre - half)
  high = 1.0 if k == n else min(1.0, centre + half)
  return BinomialCI(k, n, p, low, high, confidence)


def clopper_pearson_interval(successes: int, trials: int,
                             confidence: float = 0.95) -> BinomialCI:
  """Exact (Clopper-Pearson) interval of a binomial rate, from beta quantiles.

  Args and Returns as :func:`wilson_interval`. Guaranteed coverage of at
  least ``confidence``; for ``k = 0`` the upper end is
  ``1 - (alpha / 2)^(1/n)`` (about ``3.7 / n`` at 95%).
  """
  k, n = _check_counts(successes, trials, confidence)
  if n == 0:
    return BinomialCI(0, 0, float('nan'), 0.0, 1.0, confidence)
  alpha = 1 - confidence
  low = 0.0 if k == 0 else float(scipy.stats.beta.ppf(alpha / 2, k, n - k + 1))
  high = 1.0 if k == n else float(
      scipy.stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
  return BinomialCI(k, n, k / n, low, high, confidence)


def format_ci(ci: BinomialCI, digits: int = 3) -> str:
  """``'k/n = rate [low, high]'``, e.g. ``'20/20 = 1.000 [0.839, 1.000]'``."""
  return (f'{ci.successes}/{ci.trials} = {ci.rate:.{digits}f} '
          f'[{ci.low:.{digits}f}, {ci.high:.{digits}f}]')


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> dict:
  """Mean, std and Student-t interval of the mean of independent values
  (e.g. one per seed).

  Returns ``dict(n, mean, std, low, high)``; ``mean`` is ``nan`` for no
  values, ``std`` and the interval below two.
  """
  if not 0 < confidence < 1:
    raise FactStoreError(f'confidence must be in (0, 1), got {confidence}')
  v = np.asarray(values, np.float64).ravel()
  out = dict(n=int(v.size), mean=math.nan, std=math.nan, low=math.nan,
             high=math.nan)
  if v.size:
    out['mean'] = float(v.mean())
  if v.size >= 2:
    sd = float(v.std(ddof=1))
    half = float(scipy.stats.t.ppf(0.5 + confidence / 2, v.size - 1)) * (
        sd / math.sqrt(v.size))
    out.update(std=sd, low=out['mean'] - half, high=out['mean'] + half)
  return out


def format_mean_interval(m: dict, digits: int = 4) -> str:
  """``'mean [low, high]'`` of a :func:`mean_interval` (the mean alone
  below two values), e.g. ``'0.9306 [0.8208, 1.0405]'``."""
  if m['n'] < 2:
    return f"{m['mean']:.{digits}f}"
  return (f"{m['mean']:.{digits}f} [{m['low']:.{digits}f}, "
          f"{m['high']:.{digits}f}]")


# ---------------------------------------------------------------------------
# Linear fits with bootstrap intervals.
# ---------------------------------------------------------------------------


class LinearFit(NamedTuple):
  slope: float
  intercept: float
  r2: float           # coefficient of determination of y


class BootstrapFit(NamedTuple):
  fit: LinearFit                   # on all points
  slope_ci: tuple[float, float]
  intercept_ci: tuple[float, float]
  r2_ci: tuple[float, float]
  num_points: int
  num_boot: int                    # resamples whose fit was defined
  confidence: float
  seed: int


def _as_xy(x, y) -> tuple[np.ndarray, np.ndarray]:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.ndim != 1 or x.shape != y.shape:
    raise FactStoreError(
        f'x and y must be 1-D of the same length; got {x.shape}, {y.shape}')
  if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
    raise FactStoreError('x and y must be finite')
  return x, y


def linear_fit_r2(x: Sequence[float], y: Sequence[float]) -> LinearFit:
  """Least squares ``y = slope x + intercept`` and its ``R^2``.

  Args:
    x, y: ``(n,)`` finite numbers, at least two distinct ``x``.

  Returns:
    :class:`LinearFit`; ``R^2 = 1 - SS_res / SS_tot`` (1.0 when ``y`` is
    constant and fitted exactly).
  """
  x, y = _as_xy(x, y)
  if x.size < 2 or np.ptp(x) == 0:
    raise FactStoreError('a linear fit needs at least two distinct x')
  return _fit(x, y)


def _fit(x: np.ndarray, y: np.ndarray) -> LinearFit:
  xm, ym = x.mean(), y.mean()
  sxx = float(np.sum((x - xm) ** 2))
  slope = float(np.sum((x - xm) * (y - ym))) / sxx
  intercept = float(ym - slope * xm)
  ss_tot = float(np.sum((y - ym) ** 2))
  ss_res = float(np.sum((y - slope * x - intercept) ** 2))
  r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
  return LinearFit(slope, intercept, r2)


def _resampling_units(shape, groups, num_boot, confidence) -> list:
  """Checks the bootstrap settings; returns the index arrays resampled as
  units (one per point, or one per group label)."""
  if not isinstance(num_boot, numbers.Integral) or num_boot < 10:
    raise FactStoreError(f'num_boot must be an int >= 10; got {num_boot!r}')
  if not 0 < confidence < 1:
    raise FactStoreError(f'confidence must be in (0, 1); got {confidence!r}')
  if groups is None:
    return [np.array([i]) for i in range(int(np.prod(shape)))]
  labels = np.asarray(groups)
  if labels.shape != tuple(shape):
    raise FactStoreError(
        f'groups must have shape {tuple(shape)}; got {labels.shape}')
  return [np.flatnonzero(labels == g) for g in np.unique(labels)]


def bootstrap_linear_fit(x: Sequence[float], y: Sequence[float], *,
                         groups: Sequence | None = None,
                         num_boot: int = 2000, seed: int = 0,
                         confidence: float = 0.95) -> BootstrapFit:
  """Linear fit with percentile bootstrap intervals of slope, intercept, R^2.

  Each resample draws ``n`` points (or, with ``groups``, as many groups as
  there are, each bringing all its points) with replacement, from
  ``numpy.random.default_rng(seed)``; resamples with fewer than two distinct
  ``x`` are skipped.

  Args:
    x, y: ``(n,)`` finite numbers, at least two distinct ``x``.
    groups: optional ``(n,)`` labels resampled as units (a cluster bootstrap,
      e.g. the seed, when rows of one seed are not independent).
    num_boot: resamples, ``>= 10``.
    seed: numpy seed (the result is a pure function of the inputs).
    confidence: two-sided level in ``(0, 1)``.

  Returns:
    :class:`BootstrapFit`.
  """
  fit = linear_fit_r2(x, y)
  x, y = _as_xy(x, y)
  members = _resampling_units(x.shape, groups, num_boot, confidence)
  rng = np.random.default_rng(seed)
  stats = []
  for _ in range(num_boot):
    pick = rng.integers(0, len(members), size=len(members))
    idx = np.concatenate([members[i] for i in pick])
    xb, yb = x[idx], y[idx]
    if np.ptp(xb) == 0:
      continue
    stats.append(_fit(xb, yb))
  if not stats:
    raise FactStoreError('no bootstrap resample had two distinct x')
  arr = np.asarray(stats)
  q = [(1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100]
  ci = lambda col: tuple(float(v) for v in np.percentile(arr[:, col], q))
  return BootstrapFit(fit=fit, slope_ci=ci(0), intercept_ci=ci(1),
                      r2_ci=ci(2), num_points=int(x.size),
                      num_boot=len(stats), confidence=confidence, seed=seed)


class LawComparison(NamedTuple):
  """Linear fits of one ``y`` against several candidate predictors."""
  names: tuple[str, ...]
  fits: dict                  # name -> LinearFit on all points
  r2_ci: dict                 # name -> (low, high) percentile interval
  best: str                   # the predictor with the highest R^2
  # name -> (low, high) interval of R^2(best) - R^2(name), from the same
  # resamples (a paired bootstrap); above 0: best fits better than name.
  r2_gap_ci: dict
  num_points: int
  num_boot: int
  confidence: float
  seed: int


def compare_linear_laws(xs: dict, y: Sequence[float], *,
                        groups: Sequence | None = None, num_boot: int = 2000,
                        seed: int = 0,
                        confidence: float = 0.95) -> LawComparison:
  """Which predictor ``x`` explains ``y`` best through ``y = a x + c``?

  Every predictor is fitted on the same bootstrap resamples (points, or
  whole ``groups``, drawn with replacement by
  ``numpy.random.default_rng(seed)``), so the interval of the difference of
  ``R^2`` between the best predictor and each other one is paired.

  Args:
    xs: ``{name: (n,) finite predictor}`` (at least one, each with two
      distinct values).
    y: ``(n,)`` finite responses.
    groups: optional ``(n,)`` labels resampled as units.
    num_boot: resamples (``>= 10``); those where some predictor has fewer
      than two distinct values are skipped.
    seed: numpy seed.
    confidence: two-sided level in ``(0, 1)``.

  Returns:
    :class:`LawComparison`.
  """
  if not xs:
    raise FactStoreError('compare_linear_laws needs at least one predictor')
  names = tuple(xs)
  fits = {k: linear_fit_r2(xs[k], y) for k in names}
  data = {k: _as_xy(xs[k], y)[0] for k in names}
  y = np.asarray(y, np.float64)
  members = _resampling_units(y.shape, groups, num_boot, confidence)
  rng = np.random.default_rng(seed)
  r2 = []
  for _ in range(num_boot):
    pick = rng.integers(0, len(members), size=len(members))
    idx = np.concatenate([members[i] for i in pick])
    if any(np.ptp(data[k][idx]) == 0 for k in names):
      continue
    r2.append([_fit(data[k][idx], y[idx]).r2 for k in names])
  if not r2:
    raise FactStoreError('no bootstrap resample had two distinct x')
  r2 = np.asarray(r2)
  q = [(1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100]
  interval = lambda v: tuple(float(t) for t in np.percentile(v, q))
  best = max(names, key=lambda k: fits[k].r2)
  b = names.index(best)
  return LawComparison(
      names=names, fits=fits,
      r2_ci={k: interval(r2[:, i]) for i, k in enumerate(names)},
      best=best,
      r2_gap_ci={k: interval(r2[:, b] - r2[:, i])
                 for i, k in enumerate(names) if k != best},
      num_points=int(y.size), num_boot=int(r2.shape[0]),
      confidence=confidence, seed=seed)


def law_verdict(comparison: LawComparison) -> str:
  """One sentence: which law the data support, by the paired intervals."""
  c = comparison
  fit = c.fits[c.best]
  lo, hi = c.r2_ci[c.best]
  head = (f'{c.best} fits best (R² {fit.r2:.3f}, '
          f'{c.confidence:.0%} CI [{lo:.3f}, {hi:.3f}]; {c.num_points} '
          'points)')
  beaten = [k for k, (g_lo, _) in c.r2_gap_ci.items() if g_lo > 0]
  tied = [k for k in c.r2_gap_ci if k not in beaten]
  if not tied:
    return head + '; it beats ' + ', '.join(beaten) + ' (R² gap CI above 0).'
  return (head + '; not distinguishable from ' + ', '.join(tied) +
          ' (R² gap CI contains 0)' +
          (f', better than {", ".join(beaten)}.' if beaten else '.'))
