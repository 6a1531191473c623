"""The measure-zero stress experiment: its families and its --quick grid.

The --quick run (12 constructions at d = 8, N = 16, about 50 s of CPU,
mostly compilation) asserts what the construction promises near degeneracy:
it never returns an MLP that a dense check finds wrong, and every value an
InfeasibleFactSetError names is undecodable by an independent solve.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import free_address, subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'experiments'))

import measure_zero as mz  # pylint: disable=wrong-import-position


def test_ray_exit_on_a_cube():
  # The hull of the 8 cube corners (+-1)^3, centroid 0: the ray along e_1
  # leaves at t = 1, along (1, 1, 0)/sqrt(2) at t = sqrt(2).
  corners = np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1)
                      for c in (-1, 1)], float)
  assert mz.ray_exit(corners, np.array([1.0, 0, 0])) == pytest.approx(1.0)
  assert mz.ray_exit(corners + 5, np.array([1.0, 1, 0]) / np.sqrt(2)
                     ) == pytest.approx(np.sqrt(2))
  assert mz.in_hull_of_others(np.vstack([corners, [0.5, 0.5, 0.5]]), 8)
  assert not mz.in_hull_of_others(np.vstack([corners, [1.01, 0, 0]]), 8)
  assert not mz.in_hull_of_others(corners, 0)


@pytest.mark.parametrize('family', mz.FAMILIES)
def test_families_degrade_with_eps(family):
  """Only eps moves the points; the degenerate quantity scales with eps."""
  big = mz.make_trial(family, 16, 64, 1e-2, seed=3)
  small = mz.make_trial(family, 16, 64, 1e-4, seed=3)
  for t in (big, small):
    keys, values, mapping = (np.asarray(a) for a in t.factset)
    assert keys.shape == (64, 16) and values.shape == (64, 16)
    assert keys.dtype == np.float32 and mapping.min() >= 0
  if family in ('near_duplicate_keys', 'many_to_one_gaps'):
    assert big.min_key_gap == pytest.approx(1e-2, rel=0.5)
    assert small.min_key_gap == pytest.approx(1e-4, rel=0.5)
  if family == 'many_to_one_gaps':
    counts = np.bincount(np.asarray(small.factset.mapping), minlength=64)
    assert sorted(set(counts.tolist())) == [0, 4]
  if family == 'near_duplicate_values':
    v = np.asarray(small.factset.values, np.float64)
    assert np.linalg.norm(v[1] - v[0]) == pytest.approx(1e-4, rel=0.05)
  if family == 'hull_exterior':
    # Value 0 leaves the hull by a relative eps (measured on float32 data).
    assert 1 - big.lp_ratio == pytest.approx(1e-2, rel=0.01)
    assert 0 < 1 - small.lp_ratio < 2e-4
  if family == 'hull_interior':
    assert big.lp_ratio > 1 and small.lp_ratio > 1
    assert mz.in_hull_of_others(np.asarray(small.factset.values), 0)
  if family == 'low_rank_keys':
    s_big = np.linalg.svd(np.asarray(big.factset.keys), compute_uv=False)
    s_small = np.linalg.svd(np.asarray(small.factset.keys), compute_uv=False)
    assert s_small[2] < 0.02 * s_big[2]
  # Same seed, same base points: keys away from the perturbation agree.
  if family in ('near_duplicate_values', 'hull_exterior', 'hull_interior'):
    np.testing.assert_array_equal(np.asarray(big.factset.keys),
                                  np.asarray(small.factset.keys))


def test_make_trial_rejects_bad_input():
  with pytest.raises(ValueError, match='unknown family'):
    mz.make_trial('nope', 8, 16, 0.1, 0)
  with pytest.raises(ValueError, match='multiple of 8'):
    mz.make_trial('low_rank_keys', 8, 20, 0.1, 0)
  with pytest.raises(ValueError, match='eps must be > 0'):
    mz.make_trial('low_rank_keys', 8, 16, 0.0, 0)


def _script(*flags):
  return [sys.executable, os.path.join(ROOT, 'experiments', 'measure_zero.py'),
          *flags]


def _read(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_quick_grid_never_silently_wrong_on_two_processes(tmp_path):
  # The grid's trials dealt over two jax.distributed processes, as the
  # default grid runs on a 2-core CPU; process 0 merges and reports.
  address = free_address()
  procs = [subprocess.Popen(
      _script('--quick', f'--out_dir={tmp_path}',
              f'--coordinator_address={address}', '--num_processes=2',
              f'--process_id={i}'),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=subprocess_env()) for i in (0, 1)]
  for proc in procs:
    try:
      _, err = proc.communicate(timeout=600)
    finally:
      proc.kill()
    assert proc.returncode == 0, err[-3000:]
  rows = _read(tmp_path / 'rows.csv')
  assert len(rows) == len(mz.FAMILIES) * 2
  shards = [_read(tmp_path / f'rows.p{i}.csv') for i in (0, 1)]
  assert [len(s) for s in shards] == [len(rows) // 2] * 2
  assert sorted(json.dumps(r, sort_keys=True) for s in shards for r in s) == (
      sorted(json.dumps(r, sort_keys=True) for r in rows))
  outcomes = [r['outcome'] for r in rows]
  assert 'silently_wrong' not in outcomes and 'crash' not in outcomes
  for r in rows:
    if r['outcome'] == 'stored':
      assert float(r['dense_accuracy']) == 1.0
      assert float(r['dense_min_margin']) > 0
      assert float(r['folded_min_margin']) > 0
      assert float(r['certified_min_margin']) > 0
    if r['outcome'] == 'infeasible':
      # Every named value is used and not certified decodable.
      assert int(r['named_unused']) == 0 and int(r['num_named']) >= 1
      assert float(r['named_max_rho']) <= mz.ATOL
  by_cell = {(r['family'], float(r['epsilon'])): r for r in rows}
  # Generic end of every path: the expected outcome.
  for family in mz.FAMILIES:
    assert by_cell[(family, 1e-2)]['outcome'] == mz.EXPECTED[family], family
  # Strictly inside the hull: always refused, naming value 0 (an LP agrees).
  for eps in (1e-2, 1e-6):
    r = by_cell[('hull_interior', eps)]
    assert r['outcome'] == 'infeasible' and json.loads(r['named']) == [0]
    assert int(r['named_in_hull']) == 1
  blob = json.loads((tmp_path / 'summary.json').read_text())
  assert blob['silently_wrong'] == 0 and blob['trials'] == len(rows)
  assert blob['config']['seeds'] == [0]
  assert 'measure_zero.py --quick' in blob['config']['command']
  assert all(0 <= c['wilson'][0] <= c['success_rate'] <= c['wilson'][1]
             for c in blob['cells'])
  assert 'Silently wrong MLPs: 0 of 12' in (tmp_path / 'summary.md'
                                            ).read_text()
  assert (tmp_path / 'success_vs_eps.png').stat().st_size > 0
  # --merge_only reports the finished trials again and computes nothing.
  report = (tmp_path / 'summary.json').read_text()
  (tmp_path / 'summary.json').unlink()
  proc = subprocess.run(_script('--quick', f'--out_dir={tmp_path}',
                                '--merge_only'),
                        capture_output=True, text=True, env=subprocess_env(),
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _read(tmp_path / 'rows.csv') == rows
  again = json.loads((tmp_path / 'summary.json').read_text())
  assert again['cells'] == json.loads(report)['cells']
  assert again['config']['command'].endswith('--merge_only')


@pytest.mark.slow
@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    'construct stores near-duplicate keys (gap ~1e-6, a few float32 ulps) '
    'only through float32 rounding: the returned MLP passes the dense '
    'float32 check (margin 0.40) but the same weights evaluated in float64 '
    'misstore (min margin -1.26); measure_zero default grid, '
    'near_duplicate_keys eps=1e-6 seeds 1, 2, 10 and many_to_one_gaps '
    'eps=1e-6 seeds 1, 10'))
def test_near_duplicate_keys_store_in_exact_arithmetic():
  from factstore_jax import construct, storage  # pylint: disable=g-import-not-at-top
  seed = 1   # run_trial's key is its seed
  trial = mz.make_trial('near_duplicate_keys', 16, 64, 1e-6, seed=seed)
  keys, values, mapping = trial.factset
  c = construct(seed, trial.factset)
  dense = storage.evaluate_mlp(c.model.as_mlp(), trial.factset)
  if not (float(dense.accuracy) == 1.0 and float(dense.min_margin) > 0):
    # Not an AssertionError, so the xfail above does not absorb it.
    pytest.fail(f'the float32 storage the reproducer needs is gone: {dense}')
  # The same MLP in float64 must store the facts too.
  assert mz._dense_f64(c.model, keys, values, np.asarray(mapping)) > 0  # pylint: disable=protected-access


def test_merge_only_without_finished_trials_is_an_error(tmp_path):
  proc = subprocess.run(_script('--quick', f'--out_dir={tmp_path}',
                                '--merge_only'),
                        capture_output=True, text=True, env=subprocess_env(),
                        timeout=300)
  assert proc.returncode != 0
  assert 'no finished trial of the grid' in proc.stderr, proc.stderr[-2000:]
  assert not (tmp_path / 'summary.json').exists()
