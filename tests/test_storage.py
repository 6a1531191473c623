"""Tests for factstore_jax.storage: logits, margins, accuracy, chunking."""

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

# A hand-built example in 2D with three values e_1, e_2, -e_1.
VALUES = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], np.float32)
OUTPUTS = np.array([[2.0, 1.0],    # -> value 0: scores (2, 1, -2), margin 1
                    [0.5, 3.0],    # -> value 1: scores (.5, 3, -.5), margin 2.5
                    [1.0, 0.0],    # -> value 2: scores (1, 0, -1), margin -2
                    [0.0, 0.0]],   # -> value 1: all scores 0, margin 0
                   np.float32)
MAPPING = np.array([0, 1, 2, 1], np.int32)
EXPECTED_MARGINS = np.array([1.0, 2.5, -2.0, 0.0])
EXPECTED_NORMS = np.array([np.sqrt(5.0), np.sqrt(9.25), 1.0, 0.0])
# A zero output has margin 0 and normalised margin 0 (norm clamped, not NaN).
EXPECTED_NORMALIZED = np.array([1.0 / np.sqrt(5.0), 2.5 / np.sqrt(9.25), -2.0,
                                0.0])


def _random_problem(n=100, p=37, d=12, seed=0):
  rng = np.random.default_rng(seed)
  outputs = rng.normal(size=(n, d)).astype(np.float32)
  values = rng.normal(size=(p, d)).astype(np.float32)
  mapping = rng.integers(0, p, size=n).astype(np.int32)
  return jnp.asarray(outputs), jnp.asarray(values), jnp.asarray(mapping)


def _numpy_margins(outputs, values, mapping):
  scores = np.asarray(outputs, np.float64) @ np.asarray(values, np.float64).T
  idx = np.arange(len(mapping))
  target = scores[idx, mapping]
  scores[idx, mapping] = -np.inf
  return target - scores.max(axis=1)


class HandBuiltTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_logits(self):
    out = self.variant(storage.logits)(OUTPUTS, VALUES)
    chex.assert_shape(out, (4, 3))
    np.testing.assert_allclose(out, OUTPUTS @ VALUES.T)
    np.testing.assert_allclose(out[0], [2.0, 1.0, -2.0])
    # Extra leading axes are kept.
    out3 = self.variant(storage.logits)(OUTPUTS.reshape(2, 2, 2), VALUES)
    chex.assert_shape(out3, (2, 2, 3))

  @chex.variants(with_jit=True, without_jit=True)
  def test_margins(self):
    gamma = self.variant(storage.margins)(OUTPUTS, VALUES, MAPPING)
    chex.assert_shape(gamma, (4,))
    np.testing.assert_allclose(gamma, EXPECTED_MARGINS, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_evaluate_outputs_report(self):
    fn = self.variant(functools.partial(storage.evaluate_outputs, chunk_size=3))
    report = fn(OUTPUTS, VALUES, MAPPING)
    # Margin 0 (a tie) does not count as stored: accuracy = 2/4.
    np.testing.assert_allclose(report.accuracy, 0.5)
    np.testing.assert_allclose(report.min_margin, -2.0, atol=1e-6)
    np.testing.assert_allclose(report.margins, EXPECTED_MARGINS, atol=1e-6)
    np.testing.assert_allclose(report.normalized_margins, EXPECTED_NORMALIZED,
                               atol=1e-6)
    np.testing.assert_allclose(report.min_normalized_margin, -2.0, atol=1e-6)
    chex.assert_tree_all_finite(report.normalized_margins)

  def test_all_stored(self):
    outputs = VALUES * 3.0  # each output points at its own value
    report = storage.evaluate_outputs(outputs, VALUES, np.arange(3))
    self.assertEqual(float(report.accuracy), 1.0)
    # Scores 3 vs 0 (orthogonal) or -3: margins 3, 3, 3.
    np.testing.assert_allclose(report.margins, [3.0, 3.0, 3.0])
    np.testing.assert_allclose(report.normalized_margins, [1.0, 1.0, 1.0])

  def test_single_value_margin_is_inf(self):
    values = np.array([[1.0, 2.0]], np.float32)
    gamma = storage.margins(OUTPUTS, values, np.zeros(4, np.int32))
    self.assertTrue(np.all(np.isposinf(np.asarray(gamma))))

  def test_normalized_is_scale_invariant(self):
    outputs, values, mapping = _random_problem()
    r1 = storage.evaluate_outputs(outputs, values, mapping)
    r2 = storage.evaluate_outputs(7.0 * outputs, values, mapping)
    np.testing.assert_allclose(r2.margins, 7.0 * np.asarray(r1.margins),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r2.normalized_margins, r1.normalized_margins,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r1.accuracy, r2.accuracy)


class RandomTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_margins_match_numpy(self):
    outputs, values, mapping = _random_problem()
    gamma = self.variant(storage.margins)(outputs, values, mapping)
    np.testing.assert_allclose(gamma, _numpy_margins(outputs, values, mapping),
                               rtol=1e-5, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(1, 3, 7, 64, 99, 100, 2048)
  def test_chunked_equals_unchunked(self, chunk_size):
    # N = 100: chunk sizes 3, 7, 64, 99 do not divide N.
    outputs, values, mapping = _random_problem()
    fn = self.variant(functools.partial(storage.evaluate_outputs,
                                        chunk_size=chunk_size))
    report = fn(outputs, values, mapping)
    chex.assert_shape((report.margins, report.normalized_margins),
                      ((100,), (100,)))
    chex.assert_shape((report.accuracy, report.min_margin), ((), ()))
    gamma = storage.margins(outputs, values, mapping)
    chex.assert_trees_all_close(report.margins, gamma, atol=1e-5, rtol=1e-5)
    norms = jnp.linalg.norm(outputs, axis=1)
    chex.assert_trees_all_close(report.normalized_margins, gamma / norms,
                                atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(report.accuracy, np.mean(np.asarray(gamma) > 0),
                               atol=1e-7)
    np.testing.assert_allclose(report.min_margin, np.min(gamma), atol=1e-5)
    np.testing.assert_allclose(report.min_normalized_margin,
                               np.min(np.asarray(gamma / norms)), atol=1e-5)

  def test_jit_equals_eager(self):
    outputs, values, mapping = _random_problem(seed=3)
    eager = storage.evaluate_outputs(outputs, values, mapping, chunk_size=16)
    jitted = jax.jit(functools.partial(storage.evaluate_outputs,
                                       chunk_size=16))(outputs, values,
                                                       mapping)
    chex.assert_trees_all_close(eager, jitted, atol=1e-6, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_evaluate_fn_and_mlp(self):
    _, values, mapping = _random_problem(d=8, seed=1)
    keys = jax.random.normal(jax.random.PRNGKey(0), (100, 8))
    params = M.init_mlp(jax.random.PRNGKey(1), 8, 32, activation='silu')
    direct = storage.margins(params(keys), values, mapping)
    by_mlp = self.variant(functools.partial(storage.evaluate_mlp,
                                            chunk_size=7))(
                                                params,
                                                F.FactSet(keys, values,
                                                          mapping))
    chex.assert_trees_all_close(by_mlp.margins, direct, atol=1e-5, rtol=1e-5)
    by_fn = storage.evaluate_fn(lambda k: params(k),
                                F.FactSet(keys, values, mapping), chunk_size=33)
    chex.assert_trees_all_close(by_fn, by_mlp, atol=1e-5, rtol=1e-5)

  def test_compute_dtype(self):
    _, values, mapping = _random_problem(d=8, seed=2)
    keys = jax.random.normal(jax.random.PRNGKey(3), (100, 8))
    params = M.init_mlp(jax.random.PRNGKey(4), 8, 32, activation='silu')
    default = storage.evaluate_mlp(params, F.FactSet(keys, values, mapping))
    chex.assert_trees_all_equal(
        storage.evaluate_mlp(params, F.FactSet(keys, values, mapping),
                             compute_dtype='float32'), default)
    # bfloat16: the forward pass as run in bf16, margins in float32.
    low = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    outputs = low(keys.astype(jnp.bfloat16))
    self.assertEqual(outputs.dtype, jnp.bfloat16)
    expected = storage.margins(outputs.astype(jnp.float32), values, mapping)
    report = storage.evaluate_mlp(params, F.FactSet(keys, values, mapping),
                                  compute_dtype='bfloat16')
    self.assertEqual(report.margins.dtype, jnp.float32)
    chex.assert_trees_all_close(report.margins, expected, atol=1e-5)
    # bf16 rounding (8 bits) moves the margins: the check is not a no-op.
    self.assertGreater(float(jnp.max(jnp.abs(report.margins
                                             - default.margins))), 1e-3)
    # Under jit XLA may keep fused bf16 elementwise work in float32, as it
    # would in a deployed jitted model; the result stays within bf16 rounding.
    jitted = jax.jit(storage.evaluate_mlp, static_argnames='compute_dtype')(
        params, F.FactSet(keys, values, mapping), compute_dtype='bfloat16')
    chex.assert_trees_all_close(jitted.margins, expected, atol=0.1)

  def test_bad_compute_dtype(self):
    _, values, mapping = _random_problem(d=8)
    params = M.init_mlp(jax.random.PRNGKey(4), 8, 4, activation='relu', gate_bias=True)
    with self.assertRaisesRegex(ValueError, r"compute_dtype must be None.*'int8'"):
      storage.evaluate_mlp(params,
                           F.FactSet(jnp.zeros((100, 8)), values, mapping),
                           compute_dtype='int8')

  def test_perfect_mlp_lookup(self):
    # fn(i) = v_f(i) exactly (a lookup table indexed by the key's id): every
    # fact is stored when values are distinct unit vectors (1 against < 1).
    rng = np.random.default_rng(5)
    values = rng.normal(size=(20, 6)).astype(np.float32)
    values /= np.linalg.norm(values, axis=1, keepdims=True)
    mapping = rng.integers(0, 20, size=30).astype(np.int32)
    table = jnp.asarray(values[mapping])
    index = jnp.arange(30)
    report = storage.evaluate_fn(lambda i: table[i],
                                 F.FactSet(index, values, mapping),
                                 chunk_size=8)
    self.assertEqual(float(report.accuracy), 1.0)
    self.assertGreater(float(report.min_margin), 0.0)


class FractionTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_all_true_is_exactly_one(self):
    # XLA turns a division by a constant into a product with its reciprocal
    # (under jit, on CPU too): 41 * fl(1/41) = 0.99999994, so jnp.mean of 41
    # trues is not 1. These totals all do that on CPU.
    for total in (41, 47, 55, 61, 82, 83, 94, 97, 4095, 65_537):
      got = self.variant(jax.vmap(lambda c, t=total: storage.fraction(c, t)))(
          jnp.full((2,), total, jnp.float32))
      self.assertEqual(got.dtype, jnp.float32)
      np.testing.assert_array_equal(got, 1.0, err_msg=str(total))

  @chex.variants(with_jit=True, without_jit=True)
  def test_partial_counts(self):
    correct = jnp.arange(30) % 10 == 3
    accuracy = self.variant(storage.accuracy)
    chex.assert_shape(accuracy(correct), ())
    np.testing.assert_allclose(float(accuracy(correct)), 0.1, rtol=2e-7)
    self.assertEqual(float(accuracy(correct | True)), 1.0)
    self.assertEqual(float(accuracy(correct & False)), 0.0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_report_of_41_stored_facts_is_one(self):
    table = jnp.eye(41)
    report = self.variant(storage.evaluate_outputs)(table, table,
                                                    jnp.arange(41))
    self.assertEqual(float(report.accuracy), 1.0)
