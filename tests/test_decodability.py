"""Tests for factstore_jax.decodability: rho, separators and certificates.

``rho_i = max_{|u| <= 1} min_{j != i} <u, (v_i - v_j) / |v_i - v_j|>``.
"""

from __future__ import annotations

import importlib

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Import names, not the module: ``factstore_jax.decodability`` (the package
# attribute) is the *function* re-exported by ``factstore_jax/__init__.py``.
from factstore_jax.decodability import (Decodability, decodability,
                                        settled, undecodable_values,
                                        used_values)
from factstore_jax.errors import FactStoreError
from factstore_jax import factsets

TOL = 1e-3


def _sphere(seed, p, d):
  x = np.random.default_rng(seed).normal(size=(p, d))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _brute_force_scores(values, separators, rows=None):
  """``S[r, j] = <u_r, (v_i - v_j) / |v_i - v_j|>`` (``i = rows[r]``) in float64.

  ``separators`` has one row per entry of ``rows`` (default: all values);
  the entry ``j = i`` is ``+inf``.
  """
  v = np.asarray(values, np.float64)
  u = np.asarray(separators, np.float64)
  rows = np.arange(len(v)) if rows is None else np.asarray(rows)
  diff = v[rows][:, None, :] - v[None, :, :]
  norm = np.linalg.norm(diff, axis=-1)
  self_pair = rows[:, None] == np.arange(len(v))[None, :]
  norm = np.where(self_pair, 1.0, norm)
  scores = np.einsum('rd,rjd->rj', u, diff / norm[..., None])
  return np.where(self_pair, np.inf, scores)


def _grid_rho_2d(values, num_angles=200_000):
  """``max_{|u| = 1} min_j <u, w_ij>`` by a dense grid over the unit circle."""
  theta = np.linspace(0.0, 2 * np.pi, num_angles, endpoint=False)
  u = np.stack([np.cos(theta), np.sin(theta)], axis=1)
  v = np.asarray(values, np.float64)
  out = []
  for i in range(len(v)):
    diff = v[i] - np.delete(v, i, axis=0)
    w = diff / np.linalg.norm(diff, axis=1, keepdims=True)
    out.append((u @ w.T).min(axis=1).max())
  return np.array(out)


def _orthonormal_rho(p):
  # The min-norm point of the hull of {(e_i - e_j)/sqrt(2)}_{j != i} puts
  # weight 1/(P-1) on each: |x|^2 = (1 + 1/(P-1)) / 2 = P / (2 (P-1)).
  return np.sqrt(p / (2.0 * (p - 1)))


class OrthonormalTest(parameterized.TestCase):

  @parameterized.parameters(2, 5, 8)
  def test_exact_value(self, p):
    result = decodability(jnp.eye(p), tol=1e-5)
    chex.assert_shape(result.rho, (p,))
    chex.assert_shape(result.separators, (p, p))
    exact = _orthonormal_rho(p)
    np.testing.assert_allclose(result.rho, exact, atol=2e-5)
    np.testing.assert_allclose(result.dual_bound, exact, atol=2e-5)
    self.assertTrue(np.all(np.asarray(result.decodable)))
    # The separator of e_i is (e_i - mean of the others) normalised.
    expected_u = np.eye(p) - (1 - np.eye(p)) / (p - 1)
    expected_u /= np.linalg.norm(expected_u, axis=1, keepdims=True)
    np.testing.assert_allclose(result.separators, expected_u, atol=1e-3)

  @parameterized.parameters(12, 14, 16, 20, 24, 40)
  def test_exact_value_with_ties(self, p):
    # Regression: a duplicated initial competitor once kept another out.
    result = decodability(jnp.eye(p))
    self.assertLessEqual(float(jnp.max(result.gap)), TOL + 1e-6)
    np.testing.assert_allclose(result.rho, _orthonormal_rho(p), atol=TOL)

  def test_p128_tends_to_inverse_sqrt2(self):
    result = decodability(jnp.eye(128))
    exact = _orthonormal_rho(128)
    self.assertLessEqual(float(jnp.max(result.gap)), TOL + 1e-6)
    # Certified: rho <= exact <= dual_bound, both within tol.
    self.assertTrue(np.all(np.asarray(result.rho) <= exact + 1e-6))
    self.assertTrue(np.all(np.asarray(result.dual_bound) >= exact - 1e-6))
    np.testing.assert_allclose(result.rho, exact, atol=TOL)
    np.testing.assert_allclose(result.rho, 1 / np.sqrt(2), atol=3e-3)


class UndecodableTest(parameterized.TestCase):

  def _simplex_with_midpoint(self):
    # 5 generic points in R^4 are the vertices of a simplex; value 5 is the
    # midpoint of the edge (v_0, v_1), so it is not a strict vertex.
    v = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    return np.concatenate([v, 0.5 * (v[0:1] + v[1:2])], axis=0)

  def test_midpoint_not_decodable(self):
    values = self._simplex_with_midpoint()
    result = decodability(values)
    rho = np.asarray(result.rho)
    self.assertLessEqual(rho[5], 0.0)
    self.assertFalse(bool(result.decodable[5]))
    self.assertTrue(np.all(rho[:5] > 0.05))
    self.assertEqual(undecodable_values(result), [5])

  def test_undecodable_values_filters_by_mapping(self):
    result = decodability(self._simplex_with_midpoint())
    self.assertEqual(undecodable_values(result, np.array([0, 5, 2, 5])), [5])
    self.assertEqual(undecodable_values(result, np.array([0, 1, 2, 3, 4])), [])

  def test_exact_duplicates_not_decodable(self):
    v = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    values = np.concatenate([v, v[2:3]], axis=0)   # value 5 == value 2
    result = decodability(values)
    rho = np.asarray(result.rho)
    self.assertLessEqual(rho[2], 0.0)
    self.assertLessEqual(rho[5], 0.0)
    self.assertEqual(undecodable_values(result), [2, 5])
    self.assertEqual(undecodable_values(result, np.array([0, 1, 5])), [5])
    self.assertTrue(np.all(rho[[0, 1, 3, 4]] > 0.05))

  def test_used_values(self):
    np.testing.assert_array_equal(used_values(np.array([3, 1, 3, 0, 1])),
                                  [0, 1, 3])
    np.testing.assert_array_equal(used_values(jnp.array([2, 2])), [2])

  @parameterized.named_parameters(
      ('one_dim', np.ones(4)), ('single_value', np.ones((1, 3))),
      ('three_dim', np.ones((2, 3, 4))))
  def test_bad_shape(self, values):
    with pytest.raises(FactStoreError, match='shape'):
      decodability(values)

  @parameterized.parameters(dict(max_outer=0), dict(max_inner=0))
  def test_no_iterations(self, **kwargs):
    with pytest.raises(FactStoreError, match='must be >= 1'):
      decodability(np.eye(3, dtype=np.float32), **kwargs)

  @parameterized.parameters(-0.1, 1.0)
  def test_bad_rel_tol(self, rel_tol):
    with pytest.raises(FactStoreError, match='rel_tol'):
      decodability(np.eye(3, dtype=np.float32), rel_tol=rel_tol)


class CertificateTest(chex.TestCase):
  """Certificates on a random sphere table, P = 256, d = 16."""

  P, D = 256, 16

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.values = _sphere(0, cls.P, cls.D)
    cls.result = decodability(cls.values, tol=TOL)

  def test_types_and_shapes(self):
    r = self.result
    self.assertIsInstance(r, Decodability)
    chex.assert_shape((r.rho, r.dual_bound, r.gap, r.decodable),
                      [(self.P,)] * 4)
    chex.assert_shape(r.separators, (self.P, self.D))
    self.assertEqual(r.decodable.dtype, jnp.bool_)
    np.testing.assert_allclose(r.rho_min, np.min(r.rho))

  def test_gap_and_bounds(self):
    r = self.result
    rho, dual, gap = (np.asarray(a) for a in (r.rho, r.dual_bound, r.gap))
    np.testing.assert_allclose(gap, dual - rho, atol=1e-7)
    self.assertLessEqual(gap.max(), TOL + 1e-6)
    self.assertTrue(np.all(rho <= dual + 1e-6))
    # Every point of a generic sphere table is a strict vertex.
    self.assertTrue(np.all(rho > 0))
    np.testing.assert_array_equal(r.decodable, rho > 1e-6)

  def test_separators_unit_norm(self):
    norms = np.linalg.norm(np.asarray(self.result.separators, np.float64),
                           axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)

  def test_brute_force_primal(self):
    # rho_i is the margin its separator achieves against *all* competitors,
    # recomputed here in float64 without the solver's Gram shortcuts.
    scores = _brute_force_scores(self.values, self.result.separators)
    np.testing.assert_allclose(scores.min(axis=1), self.result.rho, atol=1e-5)

  def test_translation_and_scale_invariance(self):
    shift = np.linspace(-2.0, 3.0, self.D).astype(np.float32)
    moved = decodability(3.0 * self.values + shift, tol=TOL)
    # Both runs are certified within tol of the same true rho.
    np.testing.assert_allclose(moved.rho, self.result.rho, atol=TOL + 1e-5)
    np.testing.assert_allclose(moved.dual_bound, self.result.dual_bound,
                               atol=TOL + 1e-5)
    tiny = decodability(1e-3 * self.values, tol=TOL)
    np.testing.assert_allclose(tiny.rho, self.result.rho, atol=TOL + 1e-5)

  def test_rotation_equivariance(self):
    q = np.linalg.qr(np.random.default_rng(2).normal(size=(self.D, self.D)))[0]
    rotated = decodability(self.values @ q.astype(np.float32), tol=TOL)
    np.testing.assert_allclose(rotated.rho, self.result.rho, atol=TOL + 1e-5)
    np.testing.assert_allclose(rotated.separators,
                               np.asarray(self.result.separators) @ q,
                               atol=2e-2)

  def test_indices_give_same_rows(self):
    idx = np.array([5, 0, 200, 17, 255])
    part = decodability(self.values, tol=TOL, indices=idx)
    chex.assert_shape(part.rho, (5,))
    chex.assert_shape(part.separators, (5, self.D))
    # Same problems solved against all competitors; the solver path may
    # differ by rounding, so rows agree within the certified tolerance.
    np.testing.assert_allclose(part.rho, np.asarray(self.result.rho)[idx],
                               atol=TOL + 1e-6)
    np.testing.assert_allclose(part.dual_bound,
                               np.asarray(self.result.dual_bound)[idx],
                               atol=TOL + 1e-6)
    np.testing.assert_allclose(part.separators,
                               np.asarray(self.result.separators)[idx],
                               atol=2e-2)
    # The subset's own separators certify its own rho values.
    sub = _brute_force_scores(self.values, part.separators, rows=idx)
    np.testing.assert_allclose(sub.min(axis=1), part.rho, atol=1e-5)

  def test_floor_keeps_bounds(self):
    floor = 0.5
    r = decodability(self.values, tol=TOL, floor=floor)
    rho, dual = np.asarray(r.rho), np.asarray(r.dual_bound)
    full_rho = np.asarray(self.result.rho)
    self.assertTrue(np.any(full_rho < floor))   # the floor matters here
    self.assertTrue(np.all(rho <= dual + 1e-6))
    # Values above the floor are still solved to tol.
    above = dual > floor
    self.assertLessEqual(np.max(dual[above] - rho[above]), TOL + 1e-6)
    # rho is still a valid lower bound of the true (full-solve) value.
    self.assertTrue(np.all(rho <= np.asarray(self.result.dual_bound) + 1e-6))

  def test_rel_tol_certifies_a_fraction_of_optimal(self):
    rel = 0.05
    r = decodability(self.values, tol=TOL, rel_tol=rel)
    rho, dual = np.asarray(r.rho), np.asarray(r.dual_bound)
    # Looser than tol on these values (rho ~ 0.6): the relative bound is
    # what closed them, and it holds for every value.
    self.assertGreater(np.max(dual - rho), TOL)
    self.assertTrue(np.all(rho >= (1 - rel) * dual - 1e-6))
    np.testing.assert_array_equal(
        settled(r, TOL, rel), np.ones(self.P, bool))
    self.assertFalse(np.all(settled(r, TOL)))
    # Still a valid certificate: rho is achieved by the separators, and the
    # dual bound is above the tight solve's rho.
    scores = _brute_force_scores(self.values, r.separators)
    np.testing.assert_allclose(scores.min(axis=1), rho, atol=1e-5)
    self.assertTrue(np.all(dual >= np.asarray(self.result.rho) - 1e-6))


class BruteForce2DTest(parameterized.TestCase):

  @parameterized.parameters(0, 1, 2)
  def test_matches_grid_search(self, seed):
    values = np.random.default_rng(seed).normal(size=(6, 2)).astype(np.float32)
    result = decodability(values, tol=1e-4)
    grid = _grid_rho_2d(values)
    rho = np.asarray(result.rho)
    vertex = grid > 1e-3
    interior = grid < -1e-3
    self.assertTrue(np.any(vertex))
    np.testing.assert_allclose(rho[vertex], grid[vertex], atol=1e-3)
    np.testing.assert_array_equal(np.asarray(result.decodable)[vertex], True)
    # Points inside the hull: no unit direction separates them; the library
    # reports rho <= 0 and not decodable.
    self.assertTrue(np.all(rho[interior] <= 0))
    np.testing.assert_array_equal(np.asarray(result.decodable)[interior], False)


class VmapTest(chex.TestCase):

  def test_vmap_matches_loop(self):
    tables = jnp.stack([_sphere(s, 64, 8) for s in range(3)])
    batched = jax.vmap(lambda v: decodability(v, tol=TOL).rho)(tables)
    looped = jnp.stack([decodability(v, tol=TOL).rho for v in tables])
    chex.assert_shape(batched, (3, 64))
    np.testing.assert_allclose(batched, looped, atol=2e-3)


def test_open_values_go_on_in_blocks_of_their_own(monkeypatch):
  """Outside jit, values open after the first round continue from their
  state in new blocks: the result is the one of mixed blocks, bit for bit."""
  dec = importlib.import_module('factstore_jax.decodability')
  values = _sphere(3, 512, 6)
  calls = []
  solver = dec._decodability

  def spy(*args, **kwargs):
    calls.append((len(args) > 2 and args[2] is not None, kwargs['max_outer']))
    return solver(*args, **kwargs)

  monkeypatch.setattr(dec, '_decodability', spy)
  monkeypatch.setattr(dec, '_COMPACT_MIN_BLOCKS', 10**9)
  # A small pool leaves many values open after the first round (84 of 512).
  opts = dict(chunk_size=8, num_candidates=8, pool_size=32)
  mixed = decodability(values, **opts)
  # (Values still open after every round are re-solved from scratch with a
  # tighter tolerance: the same calls after either path.)
  retries = calls[1:]
  assert calls[0] == (False, 20) and all(c == (False, 20) for c in retries)
  calls.clear()
  monkeypatch.setattr(dec, '_COMPACT_MIN_BLOCKS', 16)
  compact = decodability(values, **opts)
  # First round on all 64 blocks, then the open values from their state.
  assert calls == [(False, 1), (True, 19)] + retries
  for name in Decodability._fields:
    np.testing.assert_array_equal(getattr(compact, name), getattr(mixed, name))


def test_stalled_signs_are_resolved_with_a_tighter_tol(monkeypatch):
  """Strongly spiked unit values are all strict vertices (rho > 0), but at
  tol 1e-3 some certificates stall at rho <= 0 with the dual bound above
  tol; outside jit those values are re-solved at 10x tighter tol and keep
  the better bounds."""
  dec = importlib.import_module('factstore_jax.decodability')
  values = factsets.sample_spiked(jax.random.key(0), 128, 8, 1000.0)
  monkeypatch.setattr(dec, 'TIGHTEN_RETRIES', 0)
  stalled = decodability(values)
  open_ = ~dec.settled(stalled, 1e-3) & (np.asarray(stalled.rho) <= 1e-6)
  assert open_.sum() > 0           # the case exercises the stall
  monkeypatch.setattr(dec, 'TIGHTEN_RETRIES', 2)
  fixed = decodability(values)
  rho, dual = np.asarray(fixed.rho), np.asarray(fixed.dual_bound)
  # No sign is left unknown: each value is certified decodable or its dual
  # bound is within tol (rho in [0, tol], reported either way) ...
  assert np.all((rho > 1e-6) | (dual <= 1e-3))
  # ... and stalled values came out certified decodable.
  assert np.sum(rho[open_] > 0) >= 1
  # Bounds only tighten, and still bracket each value's rho.
  assert np.all(np.asarray(fixed.rho) >= np.asarray(stalled.rho))
  assert np.all(np.asarray(fixed.dual_bound) <=
                np.asarray(stalled.dual_bound) + 1e-7)
  assert np.all(np.asarray(fixed.rho) <= np.asarray(fixed.dual_bound) + 1e-6)


def test_open_values_are_resolved_with_a_larger_active_set(monkeypatch):
  """Orthonormal values: every other value is in each optimum's support, so
  an active set of 2 cannot close the gap; outside jit the open values are
  re-solved with K doubled (padded to a power of two) until certified."""
  dec = importlib.import_module('factstore_jax.decodability')
  p = 12
  values = jnp.eye(p)
  ks = []
  solver = dec._decodability

  def spy(*args, **kwargs):
    ks.append((kwargs['num_candidates'], int(args[1].shape[0])))
    return solver(*args, **kwargs)

  monkeypatch.setattr(dec, '_decodability', spy)
  r = decodability(values, num_candidates=2, pool_size=4, tol=1e-4)
  # rho_i = |e_i - mean_{j != i} e_j| / sqrt(2) for every value.
  want = np.sqrt((1 + 1 / (p - 1)) / 2)
  np.testing.assert_allclose(np.asarray(r.rho), want, atol=1e-4)
  assert np.all(np.asarray(r.gap) <= 1e-4)
  # The retries ran, with K doubled up to min(P - 1, d + 1), on
  # power-of-two counts of values.
  assert ks[0] == (2, p) and len(ks) > 1
  assert [k for k, _ in ks[1:]] == [min(4 * 2**i, p - 1)
                                    for i in range(len(ks) - 1)]
  assert all(n == 16 for _, n in ks[1:])   # 12 open values, padded
