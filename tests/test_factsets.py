"""Tests for factstore_jax.factsets."""

from __future__ import annotations

import functools
import os

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from factstore_jax import factsets as F
from factstore_jax.errors import FactStoreError

N, D = 256, 8


def _key(seed: int = 0):
  return jax.random.PRNGKey(seed)


def _second_moment(x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x.T @ x / x.shape[0]


def _good():
  """A small valid fact set as numpy arrays."""
  rng = np.random.default_rng(0)
  keys = rng.normal(size=(6, 3))
  values = rng.normal(size=(4, 3))
  mapping = np.array([0, 1, 2, 3, 0, 1])
  return keys, values, mapping


# ----------------------------------------------------------------------------
# Samplers.
# ----------------------------------------------------------------------------


class SamplerTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ('sphere', F.sample_sphere, {}, True),
      ('gaussian', F.sample_gaussian, {}, False),
      ('uniform', F.sample_uniform, {}, False),
      ('spiked', F.sample_spiked, {'beta': 2.0}, True),
      ('power_law', F.sample_power_law, {'exponent': 1.5}, True),
      ('power_law_raw', F.sample_power_law, {'normalize': False}, False),
      ('clustered', F.sample_clustered, {'num_clusters': 4}, True),
      ('clustered_raw', F.sample_clustered, {'normalize': False}, False),
  )
  def test_shape_dtype_norm(self, sampler, kwargs, unit):
    static = tuple(k for k in ('normalize', 'num_clusters') if k in kwargs)
    fn = self.variant(functools.partial(sampler, **kwargs),
                      static_argnums=(1, 2), static_argnames=static)
    x = fn(_key(), N, D)
    chex.assert_shape(x, (N, D))
    chex.assert_type(x, jnp.float32)
    chex.assert_tree_all_finite(x)
    norms = np.linalg.norm(np.asarray(x), axis=1)
    if unit:
      np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    else:
      self.assertGreater(np.abs(norms - 1.0).max(), 1e-3)

  def test_gaussian_scale(self):
    x = np.asarray(F.sample_gaussian(_key(), 2048, D, 3.0))
    self.assertAlmostEqual(x.std(), 3.0, delta=0.15)

  def test_uniform_in_cube(self):
    x = np.asarray(F.sample_uniform(_key(), N, D))
    self.assertLessEqual(np.abs(x).max(), 1.0)
    self.assertGreater(np.abs(x).max(), 0.9)

  @chex.variants(with_jit=True, without_jit=True)
  def test_spike_increases_variance_along_u(self):
    x = F.sample_sphere(_key(0), 2048, D)
    u = F.sample_sphere(_key(1), 1, D)[0]
    y = self.variant(F.spike)(x, 4.0, u)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
    var_x = float(jnp.mean((x @ u) ** 2))
    var_y = float(jnp.mean((y @ u) ** 2))
    self.assertAlmostEqual(var_x, 1.0 / D, delta=0.03)
    self.assertGreater(var_y, 3.0 * var_x)

  def test_spike_zero_beta_is_identity_on_sphere(self):
    x = F.sample_sphere(_key(0), N, D)
    u = F.sample_sphere(_key(1), 1, D)[0]
    np.testing.assert_allclose(F.spike(x, 0.0, u), x, atol=1e-6)

  def test_spiked_has_a_top_direction(self):
    x = F.sample_spiked(_key(), 2048, D, 4.0)
    w = np.linalg.eigvalsh(_second_moment(x))
    self.assertGreater(w[-1], 3.0 / D)  # isotropic would be 1 / D

  def test_power_law_spectrum_decreasing(self):
    exponent = 1.5
    x = F.sample_power_law(_key(), 2048, D, exponent, normalize=False)
    w = np.sort(np.linalg.eigvalsh(_second_moment(x)))[::-1]
    target = np.asarray(F.power_law_spectrum(D, exponent))
    self.assertTrue(np.all(np.diff(target) < 0))
    np.testing.assert_allclose(w, target, rtol=0.15)
    self.assertAlmostEqual(float(w.sum()), 1.0, delta=0.05)
    iso = np.linalg.eigvalsh(_second_moment(F.sample_sphere(_key(), 2048, D)))
    self.assertLess(iso.max() / iso.min(), 1.3)
    self.assertGreater(w[0] / w[-1], 10.0)

  def test_clustered_points_near_centres(self):
    x = np.asarray(F.sample_clustered(_key(), N, D, num_clusters=2,
                                      spread=0.1))
    cos = x @ x.T
    # Two tight clusters: every pair is either very close or far apart.
    self.assertGreater(np.mean(cos > 0.9), 0.3)

  def test_random_orthogonal(self):
    q = F.random_orthogonal(_key(), D)
    np.testing.assert_allclose(q.T @ q, np.eye(D), atol=1e-5)

  @parameterized.parameters(F.sample_sphere, F.sample_gaussian,
                            F.sample_uniform, F.sample_power_law,
                            F.sample_clustered)
  def test_deterministic_per_key(self, sampler):
    a = sampler(_key(3), N, D)
    b = sampler(_key(3), N, D)
    c = sampler(_key(4), N, D)
    np.testing.assert_array_equal(a, b)
    self.assertFalse(np.allclose(a, c))


# ----------------------------------------------------------------------------
# Maps and random fact sets.
# ----------------------------------------------------------------------------


class MapTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_permutation_map(self):
    f = self.variant(F.permutation_map, static_argnums=1)(_key(), 50)
    chex.assert_type(f, jnp.int32)
    np.testing.assert_array_equal(np.sort(f), np.arange(50))

  def test_identity_map(self):
    f = F.identity_map(7)
    chex.assert_type(f, jnp.int32)
    np.testing.assert_array_equal(f, np.arange(7))

  @chex.variants(with_jit=True, without_jit=True)
  def test_many_to_one_covers_all_values(self):
    fn = self.variant(F.many_to_one_map, static_argnums=(1, 2))
    for seed in range(5):
      f = np.asarray(fn(_key(seed), 40, 13))
      self.assertEqual(f.shape, (40,))
      self.assertEqual(f.dtype, np.int32)
      self.assertEqual(set(f.tolist()), set(range(13)))

  def test_many_to_one_deterministic(self):
    a = F.many_to_one_map(_key(1), 40, 13)
    np.testing.assert_array_equal(a, F.many_to_one_map(_key(1), 40, 13))
    self.assertFalse(np.array_equal(a, F.many_to_one_map(_key(2), 40, 13)))

  def test_many_to_one_too_many_values(self):
    with pytest.raises(FactStoreError, match=r'p <= n.*p = 5 > n = 4'):
      F.many_to_one_map(_key(), 4, 5)


class RandomFactSetTest(chex.TestCase):

  @parameterized.parameters(*F.EMBEDDINGS)
  def test_embeddings_tied(self, embedding):
    fs = F.random_factset(_key(), 32, D, embedding=embedding, beta=2.0)
    self.assertIsInstance(fs, F.FactSet)
    self.assertEqual((fs.num_facts, fs.num_values, fs.dim), (32, 32, D))
    chex.assert_type(fs.mapping, jnp.int32)
    np.testing.assert_array_equal(fs.values, fs.keys)
    F.validate_factset(*fs)

  def test_untied_many_to_one(self):
    fs = F.random_factset(_key(), 32, D, 8, tied=False,
                          mapping='many_to_one', embedding='spiked', beta=1.0)
    chex.assert_shape((fs.keys, fs.values, fs.mapping),
                      ((32, D), (8, D), (32,)))
    self.assertFalse(np.allclose(fs.values, fs.keys[:8]))
    self.assertEqual(set(np.asarray(fs.mapping).tolist()), set(range(8)))

  def test_tied_many_to_one_uses_first_keys(self):
    fs = F.random_factset(_key(), 32, D, 8, mapping='many_to_one')
    np.testing.assert_array_equal(fs.values, fs.keys[:8])

  def test_identity(self):
    fs = F.random_factset(_key(), 16, D, mapping='identity')
    np.testing.assert_array_equal(fs.mapping, np.arange(16))

  def test_deterministic(self):
    a = F.random_factset(_key(5), 32, D, embedding='spiked', tied=False)
    b = F.random_factset(_key(5), 32, D, embedding='spiked', tied=False)
    c = F.random_factset(_key(6), 32, D, embedding='spiked', tied=False)
    chex.assert_trees_all_equal(a, b)
    self.assertFalse(np.allclose(a.keys, c.keys))

  def test_jit(self):
    fn = jax.jit(F.random_factset, static_argnums=(1, 2, 3),
                 static_argnames=('embedding', 'mapping', 'tied'))
    a = fn(_key(), 32, D, 8, embedding='uniform', mapping='many_to_one')
    b = F.random_factset(_key(), 32, D, 8, embedding='uniform',
                         mapping='many_to_one')
    chex.assert_trees_all_close(a, b, atol=1e-6)

  def test_bad_embedding(self):
    with pytest.raises(FactStoreError, match=r"unknown embedding 'cube'"):
      F.random_factset(_key(), 8, 4, embedding='cube')

  def test_bad_mapping(self):
    with pytest.raises(FactStoreError, match=r"unknown mapping 'random'"):
      F.random_factset(_key(), 8, 4, mapping='random')

  def test_permutation_needs_equal_sizes(self):
    with pytest.raises(FactStoreError,
                       match=r"'permutation' needs num_values == num_facts"):
      F.random_factset(_key(), 8, 4, 4)

  def test_identity_needs_equal_sizes(self):
    with pytest.raises(FactStoreError,
                       match=r"'identity' needs num_values == num_facts"):
      F.random_factset(_key(), 8, 4, 4, mapping='identity')

  def test_many_to_one_needs_fewer_values(self):
    with pytest.raises(FactStoreError,
                       match=r"'many_to_one' needs num_values < num_facts"):
      F.random_factset(_key(), 8, 4, mapping='many_to_one')

  def test_nonpositive_sizes(self):
    with pytest.raises(FactStoreError, match=r'sizes must be positive'):
      F.random_factset(_key(), 0, 4)

  def test_float64_needs_x64(self):
    if jax.config.read('jax_enable_x64'):
      pytest.skip('x64 enabled')
    with pytest.raises(FactStoreError, match=r'enable jax_enable_x64'):
      F.random_factset(_key(), 8, 4, dtype=jnp.float64)


# ----------------------------------------------------------------------------
# Validation and make_factset.
# ----------------------------------------------------------------------------


class ValidationTest(parameterized.TestCase):

  def test_valid(self):
    F.validate_factset(*_good())

  def test_duplicate_values_allowed(self):
    keys, values, mapping = _good()
    values[3] = values[1]
    F.validate_factset(keys, values, mapping)

  def test_keys_ndim(self):
    _, values, mapping = _good()
    with pytest.raises(FactStoreError,
                       match=r'keys must have shape \(N, d\).*got shape \(6,\)'):
      F.validate_factset(np.zeros(6), values, mapping)

  def test_values_ndim(self):
    keys, _, mapping = _good()
    with pytest.raises(FactStoreError, match=r'values must have shape \(P, d\)'):
      F.validate_factset(keys, np.zeros((1, 4, 3)), mapping)

  def test_mapping_ndim(self):
    keys, values, _ = _good()
    with pytest.raises(FactStoreError, match=r'mapping must have shape \(N\)'):
      F.validate_factset(keys, values, np.zeros((6, 1), np.int32))

  def test_batched_ndim(self):
    with pytest.raises(FactStoreError,
                       match=r'keys must have shape \(B, N, d\)'):
      F.validate_factset(*_good(), batched=True)

  def test_batch_size_mismatch(self):
    keys, values, mapping = _good()
    with pytest.raises(FactStoreError, match=r'batch sizes differ'):
      F.validate_factset(np.stack([keys, keys]), values[None], mapping[None],
                         batched=True)

  def test_empty_keys(self):
    _, values, _ = _good()
    with pytest.raises(FactStoreError, match=r'keys is empty: N = 0'):
      F.validate_factset(np.zeros((0, 3)), values, np.zeros(0, np.int32))

  def test_empty_values(self):
    keys, _, mapping = _good()
    with pytest.raises(FactStoreError, match=r'values is empty: P = 0'):
      F.validate_factset(keys, np.zeros((0, 3)), mapping)

  def test_empty_dim(self):
    with pytest.raises(FactStoreError, match=r'keys is empty: d = 0'):
      F.validate_factset(np.zeros((2, 0)), np.zeros((2, 0)), np.arange(2))

  def test_dim_mismatch(self):
    keys, _, mapping = _good()
    with pytest.raises(FactStoreError,
                       match=r'keys have dimension d = 3 but values have '
                       r'dimension 5'):
      F.validate_factset(keys, np.ones((4, 5)), mapping)

  def test_mapping_length(self):
    keys, values, _ = _good()
    with pytest.raises(FactStoreError,
                       match=r'mapping has length 5 but there are N = 6 keys'):
      F.validate_factset(keys, values, np.arange(5))

  def test_mapping_dtype(self):
    keys, values, mapping = _good()
    with pytest.raises(FactStoreError,
                       match=r'mapping must have an integer dtype, got '
                       r'float64'):
      F.validate_factset(keys, values, mapping.astype(np.float64))

  def test_keys_dtype(self):
    keys, values, mapping = _good()
    with pytest.raises(FactStoreError, match=r'keys must hold real numbers'):
      F.validate_factset(keys.astype(np.complex64), values, mapping)

  def test_nan_keys(self):
    keys, values, mapping = _good()
    keys[4, 1] = np.nan
    with pytest.raises(FactStoreError,
                       match=r'keys contain a non-finite entry \(nan\) in '
                       r'row 4'):
      F.validate_factset(keys, values, mapping)

  def test_inf_values(self):
    keys, values, mapping = _good()
    values[2, 0] = -np.inf
    with pytest.raises(FactStoreError,
                       match=r'values contain a non-finite entry \(-inf\) in '
                       r'row 2'):
      F.validate_factset(keys, values, mapping)

  def test_mapping_out_of_range(self):
    keys, values, mapping = _good()
    mapping[3] = 4
    with pytest.raises(FactStoreError,
                       match=r'mapping\[3\] = 4 is out of range \[0, P\) '
                       r'with P = 4'):
      F.validate_factset(keys, values, mapping)

  def test_mapping_negative(self):
    keys, values, mapping = _good()
    mapping[5] = -1
    with pytest.raises(FactStoreError, match=r'mapping\[5\] = -1 is out of'):
      F.validate_factset(keys, values, mapping)

  def test_conflicting_duplicate_keys(self):
    keys, values, mapping = _good()
    keys[5] = keys[2]
    with pytest.raises(FactStoreError,
                       match=r'keys 2 and 5 are identical but map to '
                       r'different values 2 and 1'):
      F.validate_factset(keys, values, mapping)

  def test_conflict_reported_before_plain_duplicate(self):
    keys, values, mapping = _good()
    keys[4] = keys[0]  # same value 0: a plain duplicate
    keys[5] = keys[2]  # different values: a conflict
    with pytest.raises(FactStoreError, match=r'keys 2 and 5 are identical'):
      F.validate_factset(keys, values, mapping)

  def test_duplicate_keys_same_value(self):
    keys, values, mapping = _good()
    keys[4] = keys[0]
    with pytest.raises(FactStoreError,
                       match=r'keys 0 and 4 are duplicate keys.*remove '
                       r'duplicates'):
      F.validate_factset(keys, values, mapping)

  def test_signed_zero_keys_are_duplicates(self):
    keys = np.array([[0.0, 1.0], [-0.0, 1.0]])
    with pytest.raises(FactStoreError, match=r'keys 0 and 1 are identical'):
      F.validate_factset(keys, np.eye(2), np.array([0, 1]))

  def test_batched_error_names_factset(self):
    keys, values, mapping = _good()
    bad = mapping.copy()
    bad[0] = 9
    with pytest.raises(FactStoreError, match=r'factset 1: mapping\[0\] = 9'):
      F.validate_factset(np.stack([keys, keys]), np.stack([values, values]),
                         np.stack([mapping, bad]), batched=True)

  def test_make_factset(self):
    fs = F.make_factset(*_good())
    chex.assert_type((fs.keys, fs.values, fs.mapping),
                     (jnp.float32, jnp.float32, jnp.int32))
    self.assertEqual((fs.num_facts, fs.num_values, fs.dim), (6, 4, 3))

  def test_make_factset_validates(self):
    keys, values, mapping = _good()
    with pytest.raises(FactStoreError, match=r'mapping has length'):
      F.make_factset(keys, values, mapping[:2])

  def test_make_factset_float64_needs_x64(self):
    if jax.config.read('jax_enable_x64'):
      pytest.skip('x64 enabled')
    with pytest.raises(FactStoreError, match=r'enable jax_enable_x64'):
      F.make_factset(*_good(), dtype=jnp.float64)

  def test_make_factset_float64_with_x64(self):
    with jax.enable_x64(True):
      fs = F.make_factset(*_good(), dtype=jnp.float64)
      chex.assert_type(fs.keys, jnp.float64)

  def test_make_factset_int_dtype(self):
    with pytest.raises(FactStoreError, match=r'must be a float dtype'):
      F.make_factset(*_good(), dtype=jnp.int32)

  def test_make_factset_overflow(self):
    keys, values, mapping = _good()
    keys[1, 0] = 1e6
    with pytest.raises(FactStoreError,
                       match=r'keys overflow float16'):
      F.make_factset(keys, values, mapping, dtype=jnp.float16)


# ----------------------------------------------------------------------------
# Whitening.
# ----------------------------------------------------------------------------


class WhitenTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_whiten_second_moment_identity(self):
    x = F.sample_power_law(_key(), 1024, D, 2.0)
    y = self.variant(F.whiten)(x)
    chex.assert_shape(y, (1024, D))
    np.testing.assert_allclose(_second_moment(y), np.eye(D), atol=1e-3)

  def test_whiten_rank_deficient_is_finite(self):
    x = F.sample_sphere(_key(), 4, D)  # n < d: singular second moment
    chex.assert_tree_all_finite(F.whiten(x))

  @chex.variants(with_jit=True, without_jit=True)
  def test_whiten_factset_values(self):
    fs = F.random_factset(_key(), 1024, D, embedding='spiked', beta=3.0,
                          tied=False)
    out = self.variant(functools.partial(F.whiten_factset, which='values'))(fs)
    np.testing.assert_allclose(_second_moment(out.values), np.eye(D),
                               atol=1e-3)
    np.testing.assert_array_equal(out.keys, fs.keys)
    np.testing.assert_array_equal(out.mapping, fs.mapping)

  def test_whiten_factset_keys(self):
    fs = F.random_factset(_key(), 1024, D, embedding='spiked', beta=3.0,
                          tied=False)
    out = F.whiten_factset(fs, 'keys')
    np.testing.assert_allclose(_second_moment(out.keys), np.eye(D), atol=1e-3)
    np.testing.assert_array_equal(out.values, fs.values)

  @chex.variants(with_jit=True, without_jit=True)
  def test_whiten_both_tied_keeps_tie(self):
    fs = F.random_factset(_key(), 1024, D, 256, embedding='spiked', beta=3.0,
                          mapping='many_to_one')
    out = self.variant(functools.partial(F.whiten_factset, which='both'))(fs)
    np.testing.assert_allclose(out.values, out.keys[:256], atol=1e-6)
    np.testing.assert_allclose(_second_moment(out.values), np.eye(D),
                               atol=1e-3)

  def test_whiten_both_untied(self):
    fs = F.random_factset(_key(), 1024, D, embedding='spiked', beta=3.0,
                          tied=False)
    out = F.whiten_factset(fs, 'both')
    np.testing.assert_allclose(_second_moment(out.keys), np.eye(D), atol=1e-3)
    np.testing.assert_allclose(_second_moment(out.values), np.eye(D),
                               atol=1e-3)

  def test_whiten_bad_which(self):
    fs = F.random_factset(_key(), 32, D)
    with pytest.raises(FactStoreError, match=r"unknown which 'all'"):
      F.whiten_factset(fs, 'all')


# ----------------------------------------------------------------------------
# Stacking.
# ----------------------------------------------------------------------------


class StackTest(chex.TestCase):

  def test_round_trip(self):
    sets = [F.random_factset(_key(i), 32, D) for i in range(3)]
    stacked = F.stack_factsets(sets)
    chex.assert_shape(stacked, ((3, 32, D), (3, 32, D), (3, 32)))
    self.assertEqual((stacked.num_facts, stacked.num_values, stacked.dim),
                     (32, 32, D))
    F.validate_factset(*stacked, batched=True)
    for a, b in zip(sets, F.unstack_factsets(stacked)):
      chex.assert_trees_all_equal(a, b)

  def test_vmap_over_stack(self):
    stacked = F.stack_factsets([F.random_factset(_key(i), 32, D)
                                for i in range(2)])
    out = jax.vmap(F.whiten_factset)(stacked)
    chex.assert_shape(out.values, (2, 32, D))

  def test_shape_mismatch(self):
    sets = [F.random_factset(_key(0), 32, D),
            F.random_factset(_key(1), 32, D),
            F.random_factset(_key(2), 32, D, 8, mapping='many_to_one')]
    with pytest.raises(FactStoreError,
                       match=r'factset 2 has values shape \(8, 8\) but '
                       r'factset 0 has \(32, 8\)'):
      F.stack_factsets(sets)

  def test_dtype_mismatch(self):
    a = F.random_factset(_key(0), 32, D)
    b = a._replace(keys=a.keys.astype(jnp.bfloat16))
    with pytest.raises(FactStoreError, match=r'factset 1 has keys dtype'):
      F.stack_factsets([a, b])

  def test_empty(self):
    with pytest.raises(FactStoreError, match=r'at least one fact set'):
      F.stack_factsets([])

  def test_unstack_unbatched(self):
    with pytest.raises(FactStoreError, match=r'needs stacked keys'):
      F.unstack_factsets(F.random_factset(_key(), 32, D))


# ----------------------------------------------------------------------------
# File I/O.
# ----------------------------------------------------------------------------


@pytest.fixture(name='fs')
def _fs():
  return F.random_factset(_key(), 32, D, 8, mapping='many_to_one',
                          tied=False)


@pytest.mark.parametrize('ext', ['.npz', '.safetensors'])
def test_save_load_round_trip(tmp_path, fs, ext):
  path = tmp_path / f'facts{ext}'
  F.save_factset(path, fs)
  assert os.listdir(tmp_path) == [path.name]
  loaded = F.load_factset(path)
  chex.assert_trees_all_equal(loaded, fs)
  assert loaded.mapping.dtype == jnp.int32


@pytest.mark.parametrize('ext', ['.npz', '.safetensors'])
def test_save_load_stacked(tmp_path, fs, ext):
  stacked = F.stack_factsets([fs, fs])
  path = tmp_path / f'facts{ext}'
  F.save_factset(str(path), stacked)
  chex.assert_trees_all_equal(F.load_factset(str(path)), stacked)


@pytest.mark.parametrize('ext', ['.npz', '.safetensors'])
def test_save_overwrites_atomically(tmp_path, fs, ext):
  path = tmp_path / f'facts{ext}'
  F.save_factset(path, fs)
  other = F.random_factset(_key(9), 32, D, 8, mapping='many_to_one')
  F.save_factset(path, other)
  assert os.listdir(tmp_path) == [path.name]
  chex.assert_trees_all_equal(F.load_factset(path), other)


def test_save_failure_leaves_nothing(tmp_path, fs, monkeypatch):
  path = tmp_path / 'facts.npz'
  F.save_factset(path, fs)
  before = path.read_bytes()

  def boom(*args, **kwargs):
    raise OSError('disk full')

  monkeypatch.setattr(np, 'savez', boom)
  other = F.random_factset(_key(9), 32, D, 8, mapping='many_to_one')
  with pytest.raises(FactStoreError, match=r'facts\.npz: could not write.*'
                     r'disk full'):
    F.save_factset(path, other)
  assert os.listdir(tmp_path) == [path.name]
  assert path.read_bytes() == before


def test_save_invalid_factset_writes_nothing(tmp_path, fs):
  bad = fs._replace(mapping=fs.mapping.at[0].set(99))
  with pytest.raises(FactStoreError, match=r'mapping\[0\] = 99'):
    F.save_factset(tmp_path / 'facts.npz', bad)
  assert not os.listdir(tmp_path)


def test_save_unknown_extension(tmp_path, fs):
  with pytest.raises(FactStoreError, match=r"facts\.pt: unknown file "
                     r"extension '\.pt'"):
    F.save_factset(tmp_path / 'facts.pt', fs)


def test_save_missing_directory(tmp_path, fs):
  with pytest.raises(FactStoreError, match=r'nope.*does not exist'):
    F.save_factset(tmp_path / 'nope' / 'facts.npz', fs)


def test_load_array_npy(tmp_path):
  x = np.arange(12, dtype=np.float32).reshape(3, 4)
  np.save(tmp_path / 'x.npy', x)
  np.testing.assert_array_equal(F.load_array(tmp_path / 'x.npy'), x)


def test_load_array_npz(tmp_path):
  x, y = np.ones((2, 3)), np.arange(4)
  np.savez(tmp_path / 'one.npz', x=x)
  np.savez(tmp_path / 'two.npz', x=x, y=y)
  np.testing.assert_array_equal(F.load_array(tmp_path / 'one.npz'), x)
  np.testing.assert_array_equal(F.load_array(tmp_path / 'two.npz', 'y'), y)
  with pytest.raises(FactStoreError, match=r'two\.npz: holds 2 arrays.*'
                     r'pass name='):
    F.load_array(tmp_path / 'two.npz')
  with pytest.raises(FactStoreError, match=r"has no array named 'z'"):
    F.load_array(tmp_path / 'two.npz', 'z')


def test_load_array_safetensors(tmp_path):
  x, y = np.ones((2, 3), np.float32), np.arange(4, dtype=np.int32)
  safetensors.numpy.save_file({'x': x}, str(tmp_path / 'one.safetensors'))
  safetensors.numpy.save_file({'x': x, 'y': y},
                              str(tmp_path / 'two.safetensors'))
  np.testing.assert_array_equal(F.load_array(tmp_path / 'one.safetensors'), x)
  np.testing.assert_array_equal(
      F.load_array(tmp_path / 'two.safetensors', name='y'), y)
  with pytest.raises(FactStoreError, match=r'holds 2 arrays'):
    F.load_array(tmp_path / 'two.safetensors')
  with pytest.raises(FactStoreError, match=r"has no array named 'z'"):
    F.load_array(tmp_path / 'two.safetensors', 'z')


@pytest.mark.parametrize('name', ['x.npy', 'x.npz', 'x.safetensors'])
def test_load_array_missing_file(tmp_path, name):
  with pytest.raises(FactStoreError, match=rf'{name}: no such file'):
    F.load_array(tmp_path / name)


@pytest.mark.parametrize('name', ['x.npy', 'x.npz', 'x.safetensors'])
def test_load_array_unreadable_file(tmp_path, name):
  (tmp_path / name).write_bytes(b'this is not an array file')
  with pytest.raises(FactStoreError, match=rf'{name}: could not read'):
    F.load_array(tmp_path / name)


def test_load_array_unknown_extension(tmp_path):
  (tmp_path / 'x.csv').write_text('1,2\n')
  with pytest.raises(FactStoreError, match=r"x\.csv: unknown file extension"):
    F.load_array(tmp_path / 'x.csv')


def test_load_factset_unknown_extension(tmp_path):
  np.save(tmp_path / 'x.npy', np.ones(3))
  with pytest.raises(FactStoreError, match=r"x\.npy: unknown file extension"):
    F.load_factset(tmp_path / 'x.npy')


def test_load_factset_missing_file(tmp_path):
  with pytest.raises(FactStoreError, match=r'facts\.npz: no such file'):
    F.load_factset(tmp_path / 'facts.npz')


def test_load_factset_unreadable(tmp_path):
  (tmp_path / 'facts.safetensors').write_bytes(b'\x00' * 3)
  with pytest.raises(FactStoreError, match=r'facts\.safetensors: could not'):
    F.load_factset(tmp_path / 'facts.safetensors')


@pytest.mark.parametrize('missing', ['keys', 'values', 'mapping'])
def test_load_factset_missing_array(tmp_path, missing):
  keys, values, mapping = _good()
  arrays = {'keys': keys, 'values': values, 'mapping': mapping}
  del arrays[missing]
  np.savez(tmp_path / 'facts.npz', **arrays)
  with pytest.raises(FactStoreError, match=rf"missing array '{missing}'"):
    F.load_factset(tmp_path / 'facts.npz')


def test_load_factset_validates(tmp_path):
  keys, values, mapping = _good()
  keys[3] = keys[1]
  safetensors.numpy.save_file(
      {'keys': keys, 'values': values, 'mapping': mapping},
      str(tmp_path / 'facts.safetensors'))
  with pytest.raises(FactStoreError, match=r'facts\.safetensors: keys 1 and 3 '
                     r'are identical'):
    F.load_factset(tmp_path / 'facts.safetensors')
