"""Tests of the telescoped construction's knobs: bucket fill, patched
stragglers, dead-step pruning and the float error bound of the telescoped sum.

Small fact sets (N = 256, d = 32), shared through caches: on a 2-core CPU most
of the time is XLA compilation, one per shape.
"""

from __future__ import annotations

import functools

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from factstore_jax import factsets as F
from factstore_jax import mlp as M
from factstore_jax import storage
from factstore_jax.constructions import bucket_edits as E
from factstore_jax.constructions import encoder_decoder as ed
from factstore_jax.constructions import assembly
from factstore_jax.constructions import codes as codes_lib
from factstore_jax.constructions import verify as verify_lib
from factstore_jax.constructions import decoders, gadgets
from factstore_jax.decodability import decodability
from factstore_jax.errors import ConstructionError, FactStoreError

N, D = 256, 32
_dense_eval = jax.jit(storage.evaluate_mlp)

FACTSETS = {
    'tied': lambda: F.random_factset(jax.random.PRNGKey(100), N, D),
    'many_to_one': lambda: F.random_factset(
        jax.random.PRNGKey(101), N, D, 64, tied=False, mapping='many_to_one'),
    'spiked': lambda: F.random_factset(jax.random.PRNGKey(102), N, D,
                                       embedding='spiked', beta=2.0),
}


@functools.lru_cache(maxsize=None)
def _fs(name):
  return FACTSETS[name]()


@functools.lru_cache(maxsize=None)
def _cached(name, **overrides):
  return ed.construct(0, _fs(name), **overrides)


@functools.lru_cache(maxsize=None)
def _float64_patched():
  """One float64 construction (full buckets, patched stragglers) for the
  float64 checks of the fill and the patch tests: (fact set, construction).
  Call it with x64 enabled."""
  fs = F.random_factset(jax.random.PRNGKey(101), N, D, 64, tied=False,
                        mapping='many_to_one', dtype=jnp.float64)
  return fs, ed.construct(0, fs, code_dim=8, patch=0.1, fill=1.0)


def assert_stores(test, c, fs):
  r = c.report
  test.assertEqual(r.accuracy, 1.0)
  test.assertGreater(r.min_margin, 0.0)
  dense = _dense_eval(c.mlp, fs)
  test.assertEqual(float(dense.accuracy), 1.0)
  test.assertGreater(float(dense.min_margin), 0.0)
  test.assertEqual(r.num_params, M.num_params(c.model))
  test.assertEqual(r.num_params_gated_mlp, M.num_params(c.mlp))


class FillTest(parameterized.TestCase):

  @parameterized.parameters(('tied', 0.5), ('many_to_one', 0.8),
                            ('spiked', 1.0), ('tied', 1.0))
  def test_exact_across_fill(self, name, fill):
    c = _cached(name, fill=fill)
    assert_stores(self, c, _fs(name))
    r = c.report
    self.assertEqual(r.fill, fill)
    if r.retries == 0:
      self.assertEqual(r.num_buckets, gadgets.num_buckets(N, D, fill))

  def test_fuller_buckets_cost_fewer_params_and_larger_maps(self):
    half, full = _cached('tied', fill=0.5), _cached('tied', fill=1.0)
    self.assertEqual(half.report.code_dim, full.report.code_dim)
    self.assertGreater(half.report.num_buckets, full.report.num_buckets)
    self.assertGreater(half.report.num_params, full.report.num_params)
    self.assertLess(half.report.max_map_norm, full.report.max_map_norm)

  def test_float64(self):
    with jax.enable_x64(True):
      fs, c = _float64_patched()   # fill 1.0
      self.assertEqual(c.report.fill, 1.0)
      self.assertEqual(c.model.w_up.dtype, jnp.float64)
      assert_stores(self, c, fs)
      # float64 rounding: the telescoped codes are exact to ~1e-12.
      self.assertLess(c.report.code_error, 1e-9)

  def test_batched_fill_matches_single(self):
    fss = [F.random_factset(jax.random.PRNGKey(200 + s), 128, 16)
           for s in range(2)]
    bc = ed.construct_batched(7, F.stack_factsets(fss), fill=0.6,
                              code_dim=16)
    self.assertTrue(np.all(np.asarray(bc.report.accuracy) == 1.0))
    for b, fs in enumerate(fss):
      key = jax.random.split(jax.random.key(7), 2)[b]
      model, _, _, parts = ed.construct_fixed(
          key, fs, code_dim=16, bucket_size=bc.report.bucket_size, fill=0.6)
      self.assertEqual(parts.maps.shape[0],
                       gadgets.num_buckets(128, bc.report.bucket_size, 0.6))
      chex.assert_trees_all_close(jax.tree.map(lambda a: a[b], bc.model),
                                  model, atol=1e-5, rtol=1e-5)


class PatchTest(parameterized.TestCase):

  def test_patched_stragglers(self):
    fs = _fs('tied')
    m = 10
    c = _cached('tied', code_dim=m, patch=0.1)
    r = c.report
    s = r.patched_values
    self.assertGreater(s, 0)
    self.assertEqual(r.code_dim, m + s)
    assert_stores(self, c, fs)
    # The bulk decoder is the construction's JL decoder at m.
    np.testing.assert_array_equal(
        c.model.decoder[:, :m], codes_lib.construction_decoder(jax.random.key(0), D, m))
    # Stragglers: exactly the used values undecodable at m, each with its
    # own unit column (its full-space separator) and the code e_{m+k}.
    proj = decoders.project_values(fs.values, c.model.decoder[:, :m])
    rho_m = np.asarray(decodability(proj).rho)
    stragglers = np.flatnonzero(rho_m <= 0)
    self.assertLen(stragglers, s)
    codes = np.asarray(c.codes)
    np.testing.assert_array_equal(codes[stragglers, :m], 0.0)
    np.testing.assert_array_equal(codes[stragglers, m:], np.eye(s))
    others = np.setdiff1d(np.arange(N), stragglers)
    np.testing.assert_array_equal(codes[others, m:], 0.0)
    sep = np.asarray(decodability(fs.values, indices=stragglers).separators)
    np.testing.assert_allclose(np.asarray(c.model.decoder[:, m:]).T, sep,
                               atol=1e-6)
    self.assertTrue(np.all(np.asarray(c.rho)[stragglers] > 0))

  def test_patched_coordinates_live_only_near_their_keys(self):
    fs = _fs('tied')
    c = _cached('tied', code_dim=10, patch=0.1)
    r = c.report
    m = 10
    # Dead steps were dropped: fewer neurons than (cuts x coordinates).
    self.assertLess(r.hidden_dim, r.num_buckets * r.code_dim)
    coord = np.argmax(np.asarray(c.model.routing), axis=1)      # (h,)
    owner = np.asarray(verify_lib.bucket_of_key(c.structure.gadgets.buckets, N))
    codes = np.asarray(c.codes)
    mapping = np.asarray(fs.mapping)
    for k in range(r.patched_values):
      value = int(np.flatnonzero(codes[:, m + k])[0])
      buckets = np.unique(owner[mapping == value])
      # At most the step below and the step above each such bucket.
      self.assertLessEqual(int(np.sum(coord == m + k)), 2 * len(buckets))
      self.assertGreater(int(np.sum(coord == m + k)), 0)

  def test_patched_many_to_one_float64(self):
    with jax.enable_x64(True):
      fs, c = _float64_patched()   # code_dim 8, patch 0.1
      self.assertGreater(c.report.patched_values, 0)
      self.assertEqual(c.model.decoder.dtype, jnp.float64)
      assert_stores(self, c, fs)

  def test_patch_zero_raises_like_before(self):
    with self.assertRaisesRegex(ConstructionError, 'code_dim=10 leaves'):
      ed.construct(0, _fs('tied'), code_dim=10, patch=0.0)

  def test_too_many_stragglers_raise(self):
    with self.assertRaisesRegex(ConstructionError, 'code_dim=8 leaves'):
      ed.construct(0, _fs('tied'), code_dim=8, patch=0.1)

  def test_searched_code_dim_does_not_patch(self):
    r = _cached('tied').report
    self.assertEqual(r.patched_values, 0)

  def test_edit_a_patched_construction(self):
    fs = _fs('tied')
    c = _cached('tied', code_dim=10, patch=0.1)
    straggler = int(np.flatnonzero(np.asarray(c.codes)[:, 10])[0])
    i = int(np.flatnonzero(np.asarray(fs.mapping) != straggler)[0])
    c2, fs2, rep = E.edit(c, fs, [E.Update(i, straggler), E.Delete(3)])
    self.assertEqual(rep.accuracy, 1.0)
    assert_stores(self, c2, fs2)
    self.assertEqual(int(fs2.mapping[i - (i > 3)]), straggler)


class BoundTest(parameterized.TestCase):

  @parameterized.parameters('tied', 'spiked')
  def test_code_error_within_telescope_bound(self, name):
    fs = _fs(name)
    c = _cached(name, fill=1.0)
    parts = c.structure.gadgets
    owner = np.asarray(verify_lib.bucket_of_key(parts.buckets, N))
    code = np.asarray(c.model.encode(fs.keys), np.float64)
    maps = np.asarray(parts.maps, np.float64)
    exact = np.einsum('imd,id->im', maps[owner],
                      np.asarray(fs.keys, np.float64))
    bound = gadgets.telescope_error_bound(parts.maps, fs.keys, owner)
    chex.assert_shape(bound, code.shape)
    self.assertTrue(np.all(np.abs(code - exact) <= bound))
    # Not vacuous: far below the codes' size and the margins.
    self.assertLess(bound.max(), 1e-2 * np.abs(code).max())
    self.assertLess(bound.max(), c.report.min_margin)

  def test_bound_grows_with_the_cut_index(self):
    parts = _cached('tied', fill=1.0).structure.gadgets
    n = parts.maps.shape[0]
    x = np.ones((n, D), np.float32)
    bound = gadgets.telescope_error_bound(parts.maps, x, np.arange(n))
    self.assertTrue(np.all(np.diff(bound.max(axis=1)) >= 0))


def _dependent_factset():
  """6 keys in d = 6 with k_2 ∝ k_0 + k_1 and k_5 ∝ k_3 - k_4, one bucket.

  The identity decoder's codes are not linear in the keys, so no exact map
  of the whole bucket exists (float64 lstsq misses too).
  """
  rng = np.random.default_rng(0)
  k = rng.normal(size=(6, 6))
  k[2], k[5] = k[0] + k[1], k[3] - k[4]
  k /= np.linalg.norm(k, axis=1, keepdims=True)
  return F.make_factset(k, rng.normal(size=(6, 6)), np.arange(6))


class SplitGuardTest(parameterized.TestCase):

  def test_dependent_keys_are_split_not_rebuilt(self):
    fs = _dependent_factset()
    c = ed.construct(0, fs, code_dim=6)
    r = c.report
    assert_stores(self, c, fs)
    self.assertGreaterEqual(r.split_buckets, 1)
    self.assertEqual(r.retries, 0)          # no global rebuild was needed
    self.assertEqual(r.num_buckets, 1 + r.split_buckets)
    # The repaired structure still supports bucket-local edits.
    c2, fs2, rep = E.edit(c, fs, [E.Delete(2)])
    self.assertEqual(rep.accuracy, 1.0)
    self.assertEqual(fs2.keys.shape[0], 5)
    assert_stores(self, c2, fs2)

  def test_split_bucket_places_a_step_in_the_widest_gap(self):
    keys = jnp.asarray(np.random.default_rng(1).normal(size=(40, 8)),
                       jnp.float32)
    # Jitted, as the construction runs it (eager, each primitive of the
    # direction draws and sorts would compile on its own).
    make = jax.jit(gadgets.make_buckets, static_argnums=2)
    buckets = make(jax.random.PRNGKey(0), keys, 16)
    j = 1
    split = gadgets.split_bucket(buckets, keys, j)
    n = buckets.index.shape[0]
    self.assertEqual(split.index.shape, (n + 1, 16))
    before = set(np.asarray(buckets.index[j])[np.asarray(buckets.valid[j])])
    lo = np.asarray(split.index[j])[np.asarray(split.valid[j])]
    hi = np.asarray(split.index[j + 1])[np.asarray(split.valid[j + 1])]
    self.assertEqual(set(lo) | set(hi), before)
    self.assertTrue(len(lo) and len(hi))
    t = np.asarray(keys, np.float64) @ np.asarray(buckets.direction, np.float64)
    start, width = float(split.step_start[j + 1]), float(split.step_width[j + 1])
    self.assertLess(t[lo].max(), start)
    self.assertGreater(t[hi].min(), start + width)
    gaps = np.diff(np.sort(t[list(before)]))
    np.testing.assert_allclose(width, 0.5 * gaps.max(), rtol=1e-5)
    # Other buckets and their steps are unchanged, shifted by one above j.
    np.testing.assert_array_equal(split.index[:j], buckets.index[:j])
    np.testing.assert_array_equal(split.index[j + 2:], buckets.index[j + 1:])
    np.testing.assert_array_equal(split.step_start[j + 2:],
                                  buckets.step_start[j + 1:])
    with self.assertRaisesRegex(ValueError, 'cannot split'):
      one = make(jax.random.PRNGKey(0), keys[:1], 16)
      gadgets.split_bucket(one, keys[:1], 0)


class PruneTest(parameterized.TestCase):

  def test_prune_dead_keeps_the_function(self):
    rng = np.random.default_rng(0)
    h, m = 12, 3
    w_up = rng.normal(size=(D, h)).astype(np.float32)
    w_up[:, [2, 5, 6]] = 0.0
    model = M.EncoderDecoder(
        w_gate=jnp.asarray(rng.normal(size=(D, h)), jnp.float32),
        b_gate=jnp.asarray(rng.normal(size=h), jnp.float32),
        w_up=jnp.asarray(w_up),
        routing=jnp.asarray(np.eye(m)[np.arange(h) % m], jnp.float32),
        decoder=jnp.asarray(rng.normal(size=(D, m)), jnp.float32))
    pruned = assembly.prune_dead(model)
    self.assertEqual(pruned.w_up.shape, (D, h - 3))
    self.assertEqual(pruned.routing.shape, (h - 3, m))
    x = jnp.asarray(rng.normal(size=(5, D)), jnp.float32)
    np.testing.assert_allclose(pruned(x), model(x), rtol=1e-6, atol=1e-6)
    self.assertIs(assembly.prune_dead(pruned), pruned)

  def test_prune_keeps_whole_relu_steps(self):
    rng = np.random.default_rng(1)
    h, m = 8, 2
    w_up = rng.normal(size=(D, h)).astype(np.float32)
    w_up[:, 2:4] = 0.0   # one whole step (window 2): dropped
    w_up[:, 4] = 0.0     # half a step: kept
    model = M.EncoderDecoder(
        w_gate=jnp.zeros((D, h)), b_gate=jnp.ones(h),
        w_up=jnp.asarray(w_up), routing=jnp.ones((h, m)),
        decoder=jnp.ones((D, m)), activation='relu', window=2)
    self.assertEqual(assembly.prune_dead(model).w_up.shape, (D, h - 2))


class AssembleLiveTest(parameterized.TestCase):
  """assemble_live builds only the live steps: bitwise the pruned assembly."""

  @parameterized.parameters('clipped', 'relu')
  def test_equals_the_pruned_assembly(self, activation):
    fs = F.random_factset(jax.random.PRNGKey(4), 64, D)
    targets = jax.random.normal(jax.random.PRNGKey(5), (64, 6))
    parts = assembly.build_gadgets(jax.random.PRNGKey(6), fs.keys, targets,
                                   bucket_size=8, activation=activation)
    maps = np.asarray(parts.maps).copy()
    maps[3] = maps[2]          # a whole dead cut
    maps[5, 1] = maps[4, 1]    # one dead coordinate of a cut
    maps[6, 2, :5] = maps[5, 2, :5]   # partly equal: stays live
    decoder = jax.random.normal(jax.random.PRNGKey(7), (D, 6))
    for p in (parts, parts._replace(maps=jnp.asarray(maps))):
      want = assembly.prune_dead(assembly.assemble_gadgets(p, decoder,
                                                           activation))
      got = assembly.assemble_live(p, decoder, activation)
      chex.assert_trees_all_equal(got, want)
    k = parts.sign.shape[0]
    n, m = maps.shape[:2]
    self.assertEqual(got.w_up.shape, (D, (n * m - m - 1) * k))
    self.assertEqual(got.window, k)


class ConfigTest(parameterized.TestCase):

  @parameterized.parameters(({'fill': 0.0}, 'fill'), ({'fill': 1.5}, 'fill'),
                            ({'patch': -0.1}, 'patch'),
                            ({'patch': 2.0}, 'patch'))
  def test_bad_config(self, overrides, field):
    with self.assertRaisesRegex(FactStoreError, field):
      ed.construct(0, _fs('tied'), **overrides)


if __name__ == '__main__':
  import absl.testing.absltest
  absl.testing.absltest.main()
