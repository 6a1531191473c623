"""Binomial intervals and bootstrap linear fits (factstore_jax.stats)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from factstore_jax import stats
from factstore_jax.errors import FactStoreError

CASES = [(0, 20), (1, 20), (19, 20), (20, 20), (7, 31), (500, 1000),
         (3, 2048)]


@pytest.mark.parametrize('k,n', CASES)
def test_intervals_match_scipy(k, n):
  ref = scipy.stats.binomtest(k, n)
  wilson = stats.wilson_interval(k, n)
  exact = stats.clopper_pearson_interval(k, n)
  w_ref = ref.proportion_ci(0.95, method='wilson')
  e_ref = ref.proportion_ci(0.95, method='exact')
  np.testing.assert_allclose([wilson.low, wilson.high],
                             [w_ref.low, w_ref.high], atol=1e-9)
  np.testing.assert_allclose([exact.low, exact.high],
                             [e_ref.low, e_ref.high], atol=1e-9)
  for ci in (wilson, exact):
    assert ci.low <= k / n <= ci.high and ci.rate == k / n
    assert (ci.successes, ci.trials) == (k, n)


def _coverage(interval, n, p):
  """Exact coverage probability of an interval method at rate p."""
  pmf = scipy.stats.binom.pmf(np.arange(n + 1), n, p)
  covered = [interval(k, n).low <= p <= interval(k, n).high
             for k in range(n + 1)]
  return float(np.sum(pmf[covered]))


@pytest.mark.parametrize('p', [0.02, 0.3, 0.9])
def test_coverage(p):
  # Clopper-Pearson guarantees >= 95%; Wilson is close to nominal.
  assert _coverage(stats.clopper_pearson_interval, 40, p) >= 0.95
  assert _coverage(stats.wilson_interval, 40, p) >= 0.90


def test_interval_width_shrinks_with_trials_and_grows_with_confidence():
  widths = [stats.wilson_interval(n // 10, n) for n in (20, 200, 2000)]
  w = [c.high - c.low for c in widths]
  assert w[0] > w[1] > w[2]
  lo = stats.clopper_pearson_interval(5, 50, confidence=0.8)
  hi = stats.clopper_pearson_interval(5, 50, confidence=0.99)
  assert hi.low < lo.low and hi.high > lo.high


def test_zero_trials_and_bad_input():
  ci = stats.wilson_interval(0, 0)
  assert (ci.low, ci.high) == (0.0, 1.0) and np.isnan(ci.rate)
  with pytest.raises(FactStoreError, match='successes <= trials'):
    stats.wilson_interval(5, 3)
  with pytest.raises(FactStoreError, match='confidence'):
    stats.clopper_pearson_interval(1, 3, confidence=1.0)
  with pytest.raises(FactStoreError, match='must be an int'):
    stats.wilson_interval(1.5, 3)
  assert stats.format_ci(stats.wilson_interval(20, 20)).startswith(
      '20/20 = 1.000 [0.8')


def test_linear_fit_r2_exact_and_noisy():
  x = np.linspace(0, 1, 11)
  fit = stats.linear_fit_r2(x, 2 * x - 1)
  np.testing.assert_allclose([fit.slope, fit.intercept, fit.r2], [2, -1, 1],
                             atol=1e-12)
  y = np.random.default_rng(0).normal(size=11)
  ref = scipy.stats.linregress(x, y)
  fit = stats.linear_fit_r2(x, y)
  np.testing.assert_allclose([fit.slope, fit.intercept, fit.r2],
                             [ref.slope, ref.intercept, ref.rvalue**2],
                             rtol=1e-10)
  with pytest.raises(FactStoreError, match='two distinct x'):
    stats.linear_fit_r2([1, 1], [0, 2])
  with pytest.raises(FactStoreError, match='same length'):
    stats.linear_fit_r2([1, 2], [0, 2, 3])


def test_bootstrap_recovers_known_slope_and_is_deterministic():
  rng = np.random.default_rng(1)
  x = rng.uniform(0, 10, 200)
  y = 3.0 * x + 1.0 + rng.normal(0, 2.0, 200)
  boot = stats.bootstrap_linear_fit(x, y, num_boot=500, seed=7)
  assert boot.slope_ci[0] < 3.0 < boot.slope_ci[1]
  assert boot.intercept_ci[0] < 1.0 < boot.intercept_ci[1]
  assert boot.r2_ci[0] < boot.fit.r2 < boot.r2_ci[1]
  assert boot.slope_ci[1] - boot.slope_ci[0] < 0.3
  assert boot == stats.bootstrap_linear_fit(x, y, num_boot=500, seed=7)
  other = stats.bootstrap_linear_fit(x, y, num_boot=500, seed=8)
  assert other.slope_ci != boot.slope_ci


def test_bootstrap_without_signal_has_low_r2():
  rng = np.random.default_rng(2)
  x, y = rng.normal(size=100), rng.normal(size=100)
  boot = stats.bootstrap_linear_fit(x, y, num_boot=300)
  assert boot.slope_ci[0] < 0 < boot.slope_ci[1]
  assert boot.r2_ci[1] < 0.2


def test_group_bootstrap_is_wider_when_groups_share_an_offset():
  # Five groups, each with a common random offset: resampling points
  # ignores the correlation and understates the intercept's uncertainty.
  rng = np.random.default_rng(3)
  groups = np.repeat(np.arange(5), 40)
  x = np.tile(np.linspace(0, 1, 40), 5)
  y = 2 * x + rng.normal(0, 1.0, 5)[groups] + rng.normal(0, 0.05, 200)
  points = stats.bootstrap_linear_fit(x, y, num_boot=400)
  clustered = stats.bootstrap_linear_fit(x, y, groups=groups, num_boot=400)
  width = lambda ci: ci[1] - ci[0]
  assert width(clustered.intercept_ci) > 3 * width(points.intercept_ci)
  with pytest.raises(FactStoreError, match='groups must have shape'):
    stats.bootstrap_linear_fit(x, y, groups=groups[:3])
  with pytest.raises(FactStoreError, match='num_boot'):
    stats.bootstrap_linear_fit(x, y, num_boot=2)


def _synthetic_rho_law(law, seed=0, noise=0.05):
  """Costs W*/N generated from a known law of rho, with relative noise."""
  rng = np.random.default_rng(seed)
  rho = np.exp(rng.uniform(np.log(0.02), np.log(0.6), 120))
  truth = {'inv_rho2': 1 / rho**2, 'log_inv_rho': np.log(1 / rho)}[law]
  y = (2.0 * truth / truth.std() + 5.0) * (1 + noise * rng.normal(size=120))
  xs = {'inv_rho2': 1 / rho**2, 'log_inv_rho': np.log(1 / rho),
        'inv_rho': 1 / rho}
  return xs, y


@pytest.mark.parametrize('law', ['inv_rho2', 'log_inv_rho'])
def test_compare_linear_laws_recovers_the_generating_law(law):
  xs, y = _synthetic_rho_law(law)
  comp = stats.compare_linear_laws(xs, y, num_boot=400, seed=0)
  assert comp.best == law
  assert comp.fits[law].r2 > 0.9
  assert comp.r2_ci[law][0] > 0.85
  # The other laws are worse, and the paired intervals say so.
  for other, (lo, _) in comp.r2_gap_ci.items():
    assert lo > 0, (other, comp.r2_gap_ci)
  text = stats.law_verdict(comp)
  assert text.startswith(f'{law} fits best') and 'beats' in text
  assert comp == stats.compare_linear_laws(xs, y, num_boot=400, seed=0)


def test_compare_linear_laws_reports_a_tie_without_signal():
  rng = np.random.default_rng(5)
  x1, x2 = rng.normal(size=60), rng.normal(size=60)
  y = rng.normal(size=60)
  comp = stats.compare_linear_laws({'a': x1, 'b': x2}, y, num_boot=300)
  other = 'b' if comp.best == 'a' else 'a'
  lo, hi = comp.r2_gap_ci[other]
  assert lo <= 0 <= hi
  assert 'not distinguishable from' in stats.law_verdict(comp)
  with pytest.raises(FactStoreError, match='at least one predictor'):
    stats.compare_linear_laws({}, y)


def test_mean_interval_is_the_t_interval():
  values = [0.91, 0.95, 0.97, 0.93]
  got = stats.mean_interval(values, 0.9)
  want = scipy.stats.t.interval(0.9, 3, loc=np.mean(values),
                                scale=scipy.stats.sem(values))
  assert got['n'] == 4 and got['mean'] == pytest.approx(np.mean(values))
  assert got['std'] == pytest.approx(np.std(values, ddof=1))
  assert (got['low'], got['high']) == pytest.approx(want)
  one = stats.mean_interval([2.0])
  assert one['mean'] == 2.0 and np.isnan(one['low']) and np.isnan(one['std'])
  assert np.isnan(stats.mean_interval([])['mean'])
  with pytest.raises(FactStoreError, match='confidence'):
    stats.mean_interval(values, 1.0)


def test_format_mean_interval():
  m = stats.mean_interval([0.91, 0.95, 0.97, 0.93])
  assert stats.format_mean_interval(m) == (
      f"{m['mean']:.4f} [{m['low']:.4f}, {m['high']:.4f}]")
  assert stats.format_mean_interval(stats.mean_interval([0.5]), 2) == '0.50'
