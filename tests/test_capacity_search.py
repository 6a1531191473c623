"""Tests for the capacity search and scaling fits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from factstore_jax import capacity
from factstore_jax.errors import FactStoreError


def step_oracle(threshold_width, calls):
  def evaluate(widths):
    calls.append(list(widths))
    return [1.0 if w >= threshold_width else 0.5 for w in widths]
  return evaluate


@pytest.mark.parametrize('true_width', [1, 2, 7, 33, 64, 100, 257])
@pytest.mark.parametrize('batch', [1, 3])
@pytest.mark.parametrize('start', [1, 16, 300])
def test_finds_exact_width_without_retesting(true_width, batch, start):
  calls = []
  result = capacity.search_width(step_oracle(true_width, calls), start=start,
                                 max_width=300, batch=batch)
  assert result.width == true_width
  flat = [w for call in calls for w in call]
  assert len(flat) == len(set(flat)), 'a width was tested twice'
  assert all(len(call) <= batch for call in calls)
  assert result.rounds == len(calls)
  assert result.tested[true_width] == 1.0
  if true_width > 1:
    assert result.tested[true_width - 1] < 1.0


def test_logarithmic_number_of_tests():
  calls = []
  capacity.search_width(step_oracle(1000, calls), start=8, max_width=4096)
  assert len(calls) <= 2 * math.ceil(math.log2(4096)) + 2


def test_none_passes():
  result = capacity.search_width(step_oracle(10**6, []), start=4,
                                 max_width=50)
  assert result.width is None
  assert max(result.tested) == 50


def test_rel_tol_stops_early():
  exact, loose = [], []
  a = capacity.search_width(step_oracle(500, exact), start=8, max_width=4096)
  b = capacity.search_width(step_oracle(500, loose), start=8, max_width=4096,
                            rel_tol=0.1)
  assert a.width == 500
  assert 500 <= b.width <= 500 / 0.9
  assert len(loose) < len(exact)


def test_threshold_below_one():
  evaluate = lambda ws: [min(1.0, w / 100) for w in ws]
  result = capacity.search_width(evaluate, start=10, max_width=200,
                                 threshold=0.9)
  assert result.width == 90


@pytest.mark.parametrize('kwargs, match', [
    (dict(start=0, max_width=10), 'outside'),
    (dict(start=5, max_width=10, min_width=6), 'outside'),
    (dict(start=5, max_width=4, min_width=6), 'min_width <= max_width'),
    (dict(start=5, max_width=10, batch=0), 'batch'),
    (dict(start=5, max_width=10, growth=1.0), 'growth'),
])
def test_errors(kwargs, match):
  with pytest.raises(FactStoreError, match=match):
    capacity.search_width(step_oracle(3, []), **kwargs)
  with pytest.raises(FactStoreError, match='returned'):
    capacity.search_width(lambda ws: [0.0], start=2, max_width=100, batch=3)


def test_fits_recover_known_laws():
  n = np.array([256, 512, 1024, 2048, 4096])
  fit = capacity.loglog_slope(n, 3.0 * n**1.25)
  np.testing.assert_allclose(fit.params[0], 1.25)
  np.testing.assert_allclose(fit.r2, 1.0)
  w = 0.7 * n * (np.log2(n) + 2.5)
  fit = capacity.fit_n_log_n(n, w)
  np.testing.assert_allclose(fit.params, (0.7, 2.5), rtol=1e-9)
  fit = capacity.linear_fit([1, 2, 3], [2, 4, 6.5])
  assert fit.params[0] == pytest.approx(2.25)
  assert 0.9 < fit.r2 < 1.0
  with pytest.raises(FactStoreError, match='distinct'):
    capacity.loglog_slope([4, 4], [1, 2])
  assert capacity.info_floor(1024, 1024) == pytest.approx(1024 * 10 / 32)


def test_lockstep_searches_match_single_searches():
  truths = [5, 40, 77]
  calls = []

  def evaluate(members, widths):
    calls.append(len(widths))
    return [1.0 if w >= truths[m] else 0.0 for m, w in zip(members, widths)]

  results = capacity.search_widths(evaluate, [16, 16, 16], max_width=128,
                                   batch=2)
  assert [r.width for r in results] == truths
  for truth, result in zip(truths, results):
    single = capacity.search_width(step_oracle(truth, []), start=16,
                                   max_width=128, batch=2)
    assert set(single.tested) == set(result.tested)
  assert len(calls) == max(r.rounds for r in results)
