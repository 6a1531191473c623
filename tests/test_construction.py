"""Tests for the closed-form encoder-decoder construction.

See docs/design.md, "The closed-form encoder–decoder".

Every construction is checked twice: by the library's own report and by an
independent dense evaluation of the folded gated MLP
(``storage.evaluate_mlp(c.model.as_mlp(), ...)``).

Sizes are small and shapes are shared between tests on purpose: on a 2-core
CPU almost all the time goes to XLA compilation, which is cached per shape.
"""

from __future__ import annotations

import functools
import math
from unittest import mock

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from factstore_jax import factsets as F
from factstore_jax import mlp as M
from factstore_jax import storage
from factstore_jax.constructions import encoder_decoder as ed
from factstore_jax.constructions import assembly
from factstore_jax.constructions import codes as codes_lib
from factstore_jax.constructions import config as config_lib
from factstore_jax.constructions import verify as verify_lib
from factstore_jax.constructions import gadgets
from factstore_jax.decodability import decodability
from factstore_jax.errors import (ConstructionError, FactStoreError,
                                  InfeasibleFactSetError)

N, D = 256, 32          # main single-construction shapes
NB, DB, B = 128, 16, 3  # batched / fixed-core shapes
SEEDS = (0, 1, 2)

_dense_eval = jax.jit(storage.evaluate_mlp)


# ----------------------------------------------------------------------------
# Fact sets and cached constructions.
# ----------------------------------------------------------------------------


def _gaussian_scale3(key):
  keys = F.sample_gaussian(key, N, D, scale=3.0)
  mapping = F.permutation_map(jax.random.fold_in(key, 1), N)
  return F.FactSet(keys, keys, mapping)


CASES = {
    # name: (fact set from a PRNG key, construct overrides)
    'sphere': (lambda k: F.random_factset(k, N, D), {}),
    'spiked_1.5': (lambda k: F.random_factset(k, N, D, embedding='spiked',
                                              beta=1.5), {}),
    'spiked_3': (lambda k: F.random_factset(k, N, D, embedding='spiked',
                                            beta=3.0), {}),
    'gaussian_scale3': (_gaussian_scale3, {}),
    'many_to_one_untied': (lambda k: F.random_factset(
        k, N, D, 64, tied=False, mapping='many_to_one'), {}),
    'clustered': (lambda k: F.random_factset(k, N, D, embedding='clustered'),
                  {}),
    'relu': (lambda k: F.random_factset(k, N, D), {'activation': 'relu'}),
    'user_dims': (lambda k: F.random_factset(k, N, D),
                  {'code_dim': 24, 'bucket_size': 12}),
    'identity_decoder': (lambda k: F.random_factset(k, N, D),
                         {'code_dim': 2 * D}),
}


@functools.lru_cache(maxsize=None)
def _factset(case, seed):
  return CASES[case][0](jax.random.PRNGKey(100 + seed))


@functools.lru_cache(maxsize=None)
def _construction(case, seed):
  return ed.construct(seed, _factset(case, seed), **CASES[case][1])


def _member(tree, b):
  return jax.tree.map(lambda a: a[b], tree)


@functools.lru_cache(maxsize=None)
def _small_factsets():
  return tuple(F.random_factset(jax.random.PRNGKey(200 + s), NB, DB)
               for s in range(B))


@functools.lru_cache(maxsize=None)
def _batched():
  return ed.construct_batched(7, F.stack_factsets(_small_factsets()))


@functools.lru_cache(maxsize=None)
def _fixed(b):
  """``construct_fixed`` of small member b with the key construct_batched uses."""
  bc = _batched()
  key = jax.random.split(jax.random.key(7), B)[b]
  return ed.construct_fixed(key, _small_factsets()[b], code_dim=bc.report.code_dim,
                            bucket_size=bc.report.bucket_size)


# ----------------------------------------------------------------------------
# Exact storage.
# ----------------------------------------------------------------------------


class StorageTest(parameterized.TestCase):

  @parameterized.product(case=tuple(CASES), seed=SEEDS)
  def test_stores_every_fact(self, case, seed):
    fs = _factset(case, seed)
    c = _construction(case, seed)
    report = c.report
    self.assertEqual(report.accuracy, 1.0)
    self.assertGreater(report.min_margin, 0.0)
    self.assertGreater(report.min_normalized_margin, 0.0)
    # Independent dense check of the folded gated MLP.
    dense = _dense_eval(c.model.as_mlp(), fs)
    self.assertEqual(float(dense.accuracy), 1.0)
    self.assertGreater(float(dense.min_margin), 0.0)
    if report.check == 'certificate':
      # A lower bound (never above the dense margin) that is not loose.
      self.assertLessEqual(report.min_margin, float(dense.min_margin) + 1e-6)
      self.assertGreater(report.min_margin, 0.25 * float(dense.min_margin))
      self.assertLess(report.code_error, 0.05)   # a certified bound
    else:
      self.assertEqual(case, 'relu')   # the clipped gate is certified
      # The relu ramps lose a little to cancellation in float32, so the
      # folded MLP and the factorised one the report's dense check runs
      # round differently: their margins may differ by up to the measured
      # output difference times the largest value difference (measured:
      # outputs 3.2e-3 apart; margins 3e-4 apart under the tests' XLA
      # settings, 7e-5 at XLA's default optimisation level).
      dy = np.linalg.norm(np.asarray(c.model(fs.keys)) -
                          np.asarray(c.model.as_mlp()(fs.keys)), axis=1)
      vals = np.asarray(fs.values)
      spread = 2 * np.linalg.norm(vals, axis=1).max()
      self.assertLess(dy.max(), 1e-2)
      self.assertLessEqual(abs(float(dense.min_margin) - report.min_margin),
                           dy.max() * spread + 1e-6)
      self.assertLess(report.code_error, 1e-3)
    # The margin guarantee: every margin >= rho(VD) * |vd_f(i) - vd_j| > 0.
    self.assertGreater(report.rho_projected, 0.0)

  def test_user_dims_are_used(self):
    for seed in SEEDS:
      c = _construction('user_dims', seed)
      self.assertEqual(c.report.code_dim, 24)
      self.assertEqual(c.model.code_dim, 24)
      self.assertEqual(c.report.bucket_size, 12)
      chex.assert_shape(c.codes, (N, 24))
      chex.assert_shape(c.model.decoder, (D, 24))

  def test_identity_decoder_path(self):
    for seed in SEEDS:
      c = _construction('identity_decoder', seed)
      self.assertEqual(c.report.code_dim, D)
      np.testing.assert_array_equal(c.model.decoder, np.eye(D))
      # With D = I the codes are the separators of the raw value table.
      rho = decodability(_factset('identity_decoder', seed).values).rho
      np.testing.assert_allclose(c.rho, rho, atol=1e-5)

  def test_many_to_one_shapes(self):
    c = _construction('many_to_one_untied', 0)
    self.assertEqual(c.report.num_values, 64)
    self.assertEqual(c.report.num_facts, N)
    chex.assert_shape(c.codes, (64, c.report.code_dim))
    chex.assert_shape(c.rho, (64,))

  def test_relu_uses_two_neurons_per_step(self):
    c = _construction('relu', 0)
    r = c.report
    self.assertEqual(c.model.activation, 'relu')
    self.assertEqual(c.model.window, 2)
    self.assertEqual(r.hidden_dim, 2 * r.code_dim * r.num_buckets)


class ReportTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    self.fs = _factset('sphere', 0)
    self.c = _construction('sphere', 0)

  def test_parameter_counts(self):
    r, model = self.c.report, self.c.model
    self.assertEqual(r.num_params, M.num_params(model))
    self.assertEqual(r.num_params_gated_mlp, M.num_params(model.as_mlp()))
    self.assertEqual(r.num_params_gated_mlp, M.num_params(self.c.mlp))
    self.assertAlmostEqual(r.params_per_fact, r.num_params / N)
    self.assertAlmostEqual(r.bits_per_param, N * math.log2(N) / r.num_params)
    m, h = r.code_dim, r.hidden_dim
    # Factorised: w_gate, w_up (d, h), b_gate (h,), routing (h, m), D (d, m).
    self.assertEqual(r.num_params, 2 * D * h + h + h * m + D * m)
    # Folded: w_gate, w_up (d, h), b_gate (h,), w_down (h, d).
    self.assertEqual(r.num_params_gated_mlp, 2 * D * h + h + h * D)

  def test_report_fields(self):
    r, model = self.c.report, self.c.model
    self.assertEqual((r.num_facts, r.num_values, r.dim), (N, N, D))
    self.assertEqual(r.hidden_dim, model.w_gate.shape[1])
    # One clipped step per (cut, code coordinate); only the steps of
    # patched coordinates away from their keys are dead (and pruned).
    self.assertLessEqual(r.patched_values, int(config_lib.ConstructionConfig().patch
                                                * N))
    if not r.patched_values:
      self.assertEqual(r.hidden_dim, r.code_dim * r.num_buckets)
    self.assertLessEqual(r.hidden_dim, r.code_dim * r.num_buckets)
    self.assertLessEqual(r.bucket_size, D)
    self.assertEqual(r.fill, config_lib.ConstructionConfig().fill)
    maps = np.asarray(self.c.structure.gadgets.maps, np.float64)
    self.assertAlmostEqual(
        r.max_map_norm, max(np.linalg.norm(a, 2) for a in maps), places=3)
    self.assertGreaterEqual(r.num_buckets, math.ceil(N / r.bucket_size))
    self.assertEqual(r.check, 'certificate')
    self.assertIn(r.float32_bound, ('worst-case', 'sampled'))
    self.assertLess(r.code_error, 0.05)   # the certified bound
    self.assertGreater(r.min_gap, 0.0)
    used = np.unique(np.asarray(self.fs.mapping))
    self.assertAlmostEqual(r.rho_projected,
                           float(np.asarray(self.c.rho)[used].min()), places=6)
    as_dict = r.as_dict()
    self.assertEqual(as_dict['num_params'], r.num_params)
    self.assertIsInstance(as_dict['accuracy'], float)
    chex.assert_shape(self.c.codes, (N, r.code_dim))
    chex.assert_shape(self.c.rho, (N,))
    chex.assert_shape(model.decoder, (D, r.code_dim))
    chex.assert_shape(model.routing, (r.hidden_dim, r.code_dim))

  @chex.variants(with_jit=True, without_jit=True)
  def test_call_equals_as_mlp(self):
    model = self.c.model
    keys = self.fs.keys
    direct = self.variant(lambda mdl, x: mdl(x))(model, keys)
    folded = self.variant(M.GatedMLP.__call__)(model.as_mlp(), keys)
    chex.assert_shape(direct, (N, D))
    chex.assert_trees_all_close(direct, folded, atol=1e-5, rtol=1e-5)
    # Also off the keys (random inputs), where many windows are partial.
    x = jax.random.normal(jax.random.PRNGKey(0), (64, D))
    chex.assert_trees_all_close(self.variant(lambda mdl, x: mdl(x))(model, x),
                                model.as_mlp()(x), atol=1e-4,
                                rtol=1e-4)

  def test_encode_hits_codes(self):
    codes = self.c.model.encode(self.fs.keys)
    target = np.asarray(self.c.codes)[np.asarray(self.fs.mapping)]
    np.testing.assert_allclose(codes, target, atol=1e-4)
    # Codes are the unit separators of the projected table.
    np.testing.assert_allclose(np.linalg.norm(np.asarray(self.c.codes), axis=1),
                               1.0, atol=1e-5)


class RouteTest(chex.TestCase):
  """``route``: ``hidden @ routing`` with each window summed first."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(1, 2, 3, 4)
  def test_equals_matmul_for_any_routing(self, window):
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    hidden = jax.random.normal(k1, (2, 5, 12))
    routing = jax.random.normal(k2, (12, 3))
    out = self.variant(M.route, static_argnums=2)(hidden, routing, window)
    chex.assert_shape(out, (2, 5, 3))
    np.testing.assert_allclose(out, hidden @ routing, rtol=1e-5, atol=1e-5)

  def test_cancelling_window_adds_exact_zero(self):
    # A construction-style routing (each window of 2 shares one 0/1 row):
    # a window whose neurons are (a, -a) leaves the code bit-identical to
    # the same hidden vector with that window silent, for any a.
    rng = np.random.default_rng(0)
    routing = jnp.asarray(np.repeat(np.eye(8, dtype=np.float32)[:4], 2, 0))
    routing = jnp.tile(routing, (4, 1))                          # (32, 8)
    silent = rng.normal(size=(64, 32)).astype(np.float32)
    silent[:, 8:] = 0.0        # only window block 0 is active
    pairs = rng.normal(size=(64, 12)).astype(np.float32) * 1e3
    cancel = silent.copy()
    cancel[:, 8::2], cancel[:, 9::2] = pairs, -pairs
    want = np.asarray(M.route(jnp.asarray(silent), routing, 2))
    got = np.asarray(M.route(jnp.asarray(cancel), routing, 2))
    self.assertTrue(np.array_equal(got, want))
    # In-place edits of those windows' weights leave it unchanged too.
    cancel[:, 8::2], cancel[:, 9::2] = 2 * pairs, -2 * pairs
    self.assertTrue(np.array_equal(
        np.asarray(M.route(jnp.asarray(cancel), routing, 2)), want))

  def test_construction_sets_window(self):
    c = _construction('sphere', 0)
    self.assertEqual(c.model.window, 1)  # clipped: one neuron per step
    self.assertEqual(c.model.routing.shape[0] % c.model.window, 0)


class DeterminismTest(parameterized.TestCase):

  def test_same_key_same_weights(self):
    fs = _factset('sphere', 0)
    first = _construction('sphere', 0).model
    again = ed.construct(0, fs).model
    typed_key = ed.construct(jax.random.key(0), fs).model
    for other in (again, typed_key):
      chex.assert_trees_all_equal_structs(first, other)
      for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(other)):
        np.testing.assert_array_equal(a, b)

  def test_different_key_different_weights(self):
    fs = _factset('sphere', 0)
    first = _construction('sphere', 0)
    other = ed.construct(1, fs)
    self.assertFalse(np.array_equal(first.model.decoder, other.model.decoder))
    if first.model.w_gate.shape == other.model.w_gate.shape:
      self.assertFalse(np.array_equal(first.model.w_gate, other.model.w_gate))
    self.assertEqual(other.report.accuracy, 1.0)

  def test_config_object_equals_overrides(self):
    fs = _factset('sphere', 0)
    by_config = ed.construct(0, fs, config_lib.ConstructionConfig(code_dim=24,
                                                          bucket_size=12))
    by_overrides = _construction('user_dims', 0)
    # Same fact set? ('user_dims' and 'sphere' use the same generator.)
    np.testing.assert_array_equal(_factset('user_dims', 0).keys, fs.keys)
    for a, b in zip(jax.tree.leaves(by_config.model),
                    jax.tree.leaves(by_overrides.model)):
      np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------
# Gadget structure, verification.
# ----------------------------------------------------------------------------


class StepTest(parameterized.TestCase):

  @parameterized.parameters(0, 1, 2)
  def test_steps_are_exact_and_telescope(self, b):
    model, _, _, parts = _fixed(b)
    fs = _small_factsets()[b]
    self.assertEqual(model.activation, 'clipped')
    n, m = parts.maps.shape[:2]
    np.testing.assert_array_equal(parts.sign, [1.0])
    owner = np.asarray(verify_lib.bucket_of_key(parts.buckets, NB))
    # Buckets partition the keys and follow the projection in order.
    members = np.asarray(parts.buckets.index)[np.asarray(parts.buckets.valid)]
    np.testing.assert_array_equal(np.sort(members), np.arange(NB))
    t = np.asarray(fs.keys @ parts.buckets.direction)
    for j in range(1, n):
      self.assertLess(t[owner == j - 1].max(), t[owner == j].min())
    # Dense hidden activations at every key, ordered (cut, coordinate).
    x = fs.keys
    gate = np.asarray(M.clipped(x @ model.w_gate + model.b_gate))
    hidden = np.asarray(x @ model.w_up) * gate
    gate = gate.reshape(NB, n, m)
    hidden = hidden.reshape(NB, n, m)
    below = np.arange(n)[None, :] <= owner[:, None]      # (N, n)
    # Cuts at or below the key's bucket are exactly on, the rest exactly off.
    np.testing.assert_array_equal(gate[below], 1.0)
    np.testing.assert_array_equal(gate[~below], 0.0)
    np.testing.assert_array_equal(hidden[~below], 0.0)
    # The telescoped sum is the key's own bucket map, up to rounding.
    maps = np.asarray(parts.maps)
    own = np.einsum('imd,id->im', maps[owner], np.asarray(x))
    np.testing.assert_allclose(hidden.sum(axis=1), own, atol=1e-5)
    # Up-weights are the differences of consecutive maps.
    up = np.asarray(model.w_up).reshape(DB, n, m)
    np.testing.assert_array_equal(up[:, 0], maps[0].T)
    np.testing.assert_array_equal(up[:, 1:],
                                  np.transpose(maps[1:] - maps[:-1], (2, 0, 1)))

  def test_steps_of_construct(self):
    # Same check on a model from construct(): the on-steps are a prefix.
    c = _construction('sphere', 1)
    r = c.report
    gate = np.asarray(M.clipped(_factset('sphere', 1).keys @ c.model.w_gate +
                                c.model.b_gate))
    gate = gate.reshape(N, r.num_buckets, r.code_dim)
    self.assertTrue(np.all((gate == 1.0) | (gate == 0.0)))
    on = gate[..., 0] == 1.0
    owner = np.asarray(verify_lib.bucket_of_key(c.structure.gadgets.buckets, N))
    np.testing.assert_array_equal(
        on, np.arange(r.num_buckets)[None, :] <= owner[:, None])

  @parameterized.parameters(0, 1, 2)
  def test_verify_dense_vs_structured(self, b):
    model, codes, _, parts = _fixed(b)
    fs = _small_factsets()[b]
    dense = verify_lib.verify(model, fs, codes)
    fast, steps_ok, slack = verify_lib.verify_structured(parts, model, fs, codes)
    self.assertTrue(bool(np.all(np.asarray(steps_ok))))
    # Ramps fill the middle half of each gap: keys sit >= 0.5 from (0, 1).
    self.assertGreater(float(slack), 0.45)
    self.assertLess(float(slack), 0.55)
    self.assertEqual(float(dense.storage.accuracy), 1.0)
    self.assertEqual(float(fast.storage.accuracy), 1.0)
    self.assertGreater(float(fast.storage.min_margin), 0.0)
    np.testing.assert_allclose(dense.storage.margins, fast.storage.margins,
                               atol=1e-4)
    np.testing.assert_allclose(dense.storage.normalized_margins,
                               fast.storage.normalized_margins, atol=1e-4)
    self.assertLess(float(dense.code_error), 1e-4)
    self.assertLess(float(fast.code_error), 1e-4)

  def test_structured_check_rejects_a_flipped_step(self):
    model, codes, _, parts = _fixed(0)
    fs = _small_factsets()[0]
    # Move cut 2's ramp onto the keys of bucket 1: some keys now see a step
    # strictly inside (0, 1) or on the wrong side.
    buckets = parts.buckets
    t = np.asarray(fs.keys @ buckets.direction)
    owner = np.asarray(verify_lib.bucket_of_key(buckets, NB))
    start = np.asarray(buckets.step_start).copy()
    start[2] = np.median(t[owner == 1])
    moved = buckets._replace(step_start=jnp.asarray(start))
    scale, bias, sign = gadgets.step_gate_params(moved, 'clipped')
    bad = parts._replace(buckets=moved, scale=scale, bias=bias, sign=sign)
    bad_model = assembly.assemble_gadgets(bad, model.decoder, 'clipped')
    check, steps_ok, _ = verify_lib.verify_structured(bad, bad_model, fs, codes)
    self.assertFalse(bool(np.all(np.asarray(steps_ok))))
    self.assertLess(float(check.storage.accuracy), 1.0)

  def test_assemble_gadgets_round_trip(self):
    model, _, _, parts = _fixed(0)
    again = assembly.assemble_gadgets(parts, model.decoder, 'clipped')
    for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(again)):
      np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------
# Infeasible and bad inputs.
# ----------------------------------------------------------------------------


def _midpoint_factset(use_midpoint=True):
  """Untied sphere values where value 2 = mean(values 0, 1)."""
  fs = F.random_factset(jax.random.PRNGKey(300), N, D, tied=False)
  values = np.array(fs.values)
  values[2] = 0.5 * (values[0] + values[1])
  mapping = np.array(fs.mapping)
  if use_midpoint:
    assert 2 in mapping
  else:
    mapping[mapping == 2] = 3   # value 2 unused
  return F.FactSet(fs.keys, jnp.asarray(values), jnp.asarray(mapping))


class InfeasibleTest(parameterized.TestCase):

  def test_midpoint_value_raises(self):
    with pytest.raises(InfeasibleFactSetError, match=r'\[2\]') as info:
      ed.construct(0, _midpoint_factset())
    self.assertIn(2, info.value.undecodable)
    self.assertEqual(info.value.undecodable, [2])
    self.assertIsInstance(info.value, FactStoreError)
    self.assertIsInstance(info.value, ValueError)

  def test_batched_midpoint_member_raises(self):
    fs = _midpoint_factset()
    stacked = F.stack_factsets([_midpoint_factset(use_midpoint=False), fs])
    with pytest.raises(InfeasibleFactSetError,
                       match=r'\[\(1, 2\)\]') as info:
      ed.construct_batched(0, stacked, code_dim=D)
    self.assertEqual(info.value.undecodable, [2])

  def test_a_stalled_certificate_is_re_solved_not_refused(self):
    # The first solve reports a used value at rho < 0 (as a stalled
    # certificate would); it is decodable, so construct re-solves it,
    # takes the new code and stores every fact instead of refusing.
    fs = F.random_factset(jax.random.PRNGKey(300), N, D, tied=False)
    v = int(fs.mapping[0])
    solve = codes_lib.value_codes

    def stalled(values, decoder, **kw):
      out = solve(values, decoder, **kw)
      if out is None or kw.get('indices') is not None:
        return out
      codes, rho = out
      return codes.at[v].set(0.0), rho.at[v].set(-0.01)

    with mock.patch.object(codes_lib, 'value_codes', stalled):
      c = ed.construct(0, fs, code_dim=D)
    self.assertEqual(c.report.accuracy, 1.0)
    self.assertGreater(float(c.rho[v]), 0.0)
    dense = _dense_eval(c.model.as_mlp(), fs)
    self.assertEqual(float(dense.accuracy), 1.0)
    self.assertGreater(float(dense.min_margin), 0.0)

  def test_batched_stall_on_a_decodable_value_is_a_construction_error(self):
    fs = F.random_factset(jax.random.PRNGKey(300), N, D, tied=False)
    stacked = F.stack_factsets([fs, fs])
    rho = ed._batched_rho

    def stalled(*args, **kw):
      return rho(*args, **kw).at[1, int(fs.mapping[0])].set(-0.01)

    with mock.patch.object(ed, '_batched_rho', stalled):
      with pytest.raises(ConstructionError, match='decodable on their own'):
        ed.construct_batched(0, stacked, code_dim=D)

  def test_unused_midpoint_is_fine(self):
    # Only the values the map uses need to be decodable.
    fs = _midpoint_factset(use_midpoint=False)
    c = ed.construct(0, fs)
    self.assertEqual(c.report.accuracy, 1.0)
    dense = _dense_eval(c.model.as_mlp(), fs)
    self.assertEqual(float(dense.accuracy), 1.0)
    self.assertGreater(float(dense.min_margin), 0.0)


def _tiny():
  rng = np.random.default_rng(0)
  keys = rng.normal(size=(6, 4)).astype(np.float32)
  values = rng.normal(size=(5, 4)).astype(np.float32)
  mapping = np.array([0, 1, 2, 3, 4, 0], np.int32)
  return keys, values, mapping


class BadInputTest(parameterized.TestCase):

  def test_nan_key(self):
    keys, values, mapping = _tiny()
    keys[3, 1] = np.nan
    with pytest.raises(FactStoreError, match='keys contain a non-finite'):
      ed.construct(0, F.FactSet(keys, values, mapping))

  def test_inf_value(self):
    keys, values, mapping = _tiny()
    values[2, 0] = np.inf
    with pytest.raises(FactStoreError, match='values contain a non-finite'):
      ed.construct(0, F.FactSet(keys, values, mapping))

  def test_dimension_mismatch(self):
    keys, values, mapping = _tiny()
    with pytest.raises(FactStoreError, match='dimension'):
      ed.construct(0, F.FactSet(keys, values[:, :3], mapping))

  def test_mapping_length_mismatch(self):
    keys, values, mapping = _tiny()
    with pytest.raises(FactStoreError, match='mapping has length 5'):
      ed.construct(0, F.FactSet(keys, values, mapping[:5]))

  def test_mapping_out_of_range(self):
    keys, values, mapping = _tiny()
    mapping[4] = 5
    with pytest.raises(FactStoreError, match=r'mapping\[4\] = 5 is out of range'):
      ed.construct(0, F.FactSet(keys, values, mapping))

  def test_negative_mapping(self):
    keys, values, mapping = _tiny()
    mapping[0] = -1
    with pytest.raises(FactStoreError, match='out of range'):
      ed.construct(0, F.FactSet(keys, values, mapping))

  def test_duplicate_key_two_values(self):
    keys, values, mapping = _tiny()
    keys[5] = keys[1]      # mapping[5] = 0 but mapping[1] = 1
    with pytest.raises(FactStoreError,
                       match='identical but map to different values'):
      ed.construct(0, F.FactSet(keys, values, mapping))

  def test_empty_keys(self):
    _, values, _ = _tiny()
    with pytest.raises(FactStoreError, match='empty'):
      ed.construct(0, F.FactSet(np.zeros((0, 4), np.float32), values,
                             np.zeros((0,), np.int32)))

  def test_empty_values(self):
    keys, _, mapping = _tiny()
    with pytest.raises(FactStoreError, match='empty'):
      ed.construct(0, F.FactSet(keys, np.zeros((0, 4), np.float32), mapping))

  def test_bucket_size_larger_than_dim(self):
    with pytest.raises(FactStoreError, match='bucket_size'):
      ed.construct(0, F.FactSet(*_tiny()), bucket_size=5)

  def test_bucket_size_zero(self):
    with pytest.raises(FactStoreError, match='bucket_size'):
      ed.construct(0, F.FactSet(*_tiny()), bucket_size=0)

  def test_bad_activation(self):
    with pytest.raises(FactStoreError, match="activation.*'silu'"):
      ed.construct(0, F.FactSet(*_tiny()), activation='silu')

  def test_code_dim_below_one(self):
    with pytest.raises(FactStoreError, match='code_dim must be >= 1'):
      ed.construct(0, F.FactSet(*_tiny()), code_dim=0)

  def test_bad_slack(self):
    with pytest.raises(FactStoreError, match='slack'):
      ed.construct(0, F.FactSet(*_tiny()), slack=0.5)

  def test_unknown_override(self):
    with pytest.raises(TypeError):
      ed.construct(0, F.FactSet(*_tiny()), no_such_field=1)

  def test_batched_bad_member(self):
    keys, values, mapping = _tiny()
    bad = keys.copy()
    bad[0, 0] = np.nan
    stacked = F.FactSet(np.stack([keys, bad]), np.stack([values, values]),
                        np.stack([mapping, mapping]))
    with pytest.raises(FactStoreError, match='factset 1: keys contain'):
      ed.construct_batched(0, stacked)

  def test_errors_hierarchy(self):
    self.assertTrue(issubclass(InfeasibleFactSetError, FactStoreError))
    self.assertTrue(issubclass(ConstructionError, FactStoreError))
    self.assertTrue(issubclass(FactStoreError, ValueError))
    err = InfeasibleFactSetError(range(25))
    self.assertEqual(err.undecodable, list(range(25)))
    self.assertIn('+5 more', str(err))


# ----------------------------------------------------------------------------
# Batched construction: vmapped vs looped.
# ----------------------------------------------------------------------------


class BatchedTest(chex.TestCase):

  def test_every_member_stores(self):
    bc = _batched()
    chex.assert_shape((bc.report.accuracy, bc.report.min_margin, bc.report.code_error,
                       bc.report.rho_projected), [(B,)] * 4)
    np.testing.assert_array_equal(bc.report.accuracy, 1.0)
    self.assertTrue(np.all(np.asarray(bc.report.min_margin) > 0))
    self.assertTrue(np.all(np.asarray(bc.report.code_error) < 1e-4))
    self.assertTrue(np.all(np.asarray(bc.report.rho_projected) > 0))
    chex.assert_shape(bc.codes, (B, NB, bc.report.code_dim))
    chex.assert_shape(bc.model.decoder, (B, DB, bc.report.code_dim))
    self.assertEqual(bc.report.num_params, M.num_params(_member(bc.model, 0)))
    self.assertEqual(B * bc.report.num_params, M.num_params(bc.model))
    for b, fs in enumerate(_small_factsets()):
      dense = _dense_eval(_member(bc.model, b).as_mlp(), fs)
      self.assertEqual(float(dense.accuracy), 1.0)
      self.assertGreater(float(dense.min_margin), 0.0)

  def test_vmapped_gadgets_match_loop(self):
    # Deterministic linear algebra (sort, Cholesky, triangular solves): vmapped and
    # looped builds agree to rounding.
    bc = _batched()
    fss = _small_factsets()
    keys = jnp.stack([fs.keys for fs in fss])
    targets = jnp.stack([bc.codes[b][fs.mapping] for b, fs in enumerate(fss)])
    dir_keys = jax.random.split(jax.random.PRNGKey(11), B)
    # Both jitted, as construct_batched and construct_fixed run them (eager,
    # every primitive would compile on its own).
    build = jax.jit(functools.partial(assembly.build_gadgets,
                                      bucket_size=bc.report.bucket_size))
    batched = jax.jit(jax.vmap(build))(dir_keys, keys, targets)
    for b in range(B):
      single = build(dir_keys[b], keys[b], targets[b])
      np.testing.assert_array_equal(batched.buckets.index[b],
                                    single.buckets.index)
      np.testing.assert_array_equal(batched.buckets.valid[b],
                                    single.buckets.valid)
      np.testing.assert_allclose(batched.buckets.direction[b],
                                 single.buckets.direction, atol=1e-6)
      np.testing.assert_allclose(batched.maps[b], single.maps, atol=1e-5,
                                 rtol=1e-5)
      # Ramps are differences of projections t = <g, k> (|t| <= ~1), whose
      # rounding may differ between the builds (it does on a GPU); the gate
      # scale 1 / width and bias -start / width amplify it by 1 / width.
      ramps = batched.buckets, single.buckets
      np.testing.assert_allclose(ramps[0].step_start[b], ramps[1].step_start,
                                 atol=1e-6)
      np.testing.assert_allclose(ramps[0].step_width[b], ramps[1].step_width,
                                 atol=1e-6)
      scale, start = np.asarray(single.scale), np.asarray(
          single.buckets.step_start)[:, None]
      slack = 1e-6 * (np.abs(scale) + (1 + np.abs(start)) * scale ** 2)
      np.testing.assert_array_less(
          np.abs(np.asarray(batched.scale[b]) - scale), 1e-5 * np.abs(scale)
          + slack + 1e-12)
      np.testing.assert_array_less(
          np.abs(np.asarray(batched.bias[b]) - np.asarray(single.bias)),
          1e-5 * np.abs(np.asarray(single.bias)) + slack + 1e-12)
      np.testing.assert_array_equal(batched.sign[b], single.sign)
      # The looped gadget is exact on its own keys.
      model = assembly.assemble_gadgets(single, jnp.eye(bc.report.code_dim, DB).T,
                                  'clipped')
      np.testing.assert_allclose(model.encode(keys[b]), targets[b], atol=1e-4)

  def test_members_match_construct_fixed(self):
    # Member b of construct_batched is construct_fixed(split(key, B)[b], fs_b):
    # the codes are solved member by member with the same program, the
    # bucket solves are vmapped, so the two agree to float tolerance.
    bc = _batched()
    for b, fs in enumerate(_small_factsets()):
      model, codes, rho, _ = _fixed(b)
      batched_model = _member(bc.model, b)
      np.testing.assert_array_equal(batched_model.decoder, model.decoder)
      np.testing.assert_allclose(bc.codes[b], codes, atol=1e-6)
      np.testing.assert_allclose(bc.rho[b], rho, atol=1e-6)
      np.testing.assert_allclose(batched_model(fs.keys), model(fs.keys),
                                 atol=1e-5)
      for m in (model, batched_model):
        dense = _dense_eval(m.as_mlp(), fs)
        self.assertEqual(float(dense.accuracy), 1.0)
        self.assertGreater(float(dense.min_margin), 0.0)

  def test_member_with_a_broken_bucket_is_refit(self):
    # Member 1's bucket 1 comes back NaN (as a singular solve would): the
    # batched check must flag that member only and refit it in float64.
    real = ed._build_members

    def broken(member_keys, factsets, **kwargs):
      model, codes, rho, parts = real(member_keys, factsets, **kwargs)
      parts = parts._replace(maps=parts.maps.at[1, 1].set(jnp.nan))
      model = jax.vmap(lambda p, dec: assembly.assemble_jit(
          p, dec, kwargs['activation']))(parts, model.decoder)
      return model, codes, rho, parts
    with mock.patch.object(ed, '_build_members', broken):
      bc = ed.construct_batched(7, F.stack_factsets(_small_factsets()))
    np.testing.assert_array_equal(
        np.asarray(bc.report.repaired_buckets) > 0, np.arange(B) == 1)
    np.testing.assert_array_equal(bc.report.accuracy, np.ones(B))
    self.assertTrue((np.asarray(bc.report.min_margin) > 0).all())
    for b, fs in enumerate(_small_factsets()):
      dense = _dense_eval(_member(bc.model, b).as_mlp(), fs)
      self.assertEqual(float(dense.accuracy), 1.0)

  def test_projected_rho_vmapped_vs_looped(self):
    # bc.rho was computed inside one vmapped program; recompute each member's
    # projected decodability on its own.
    bc = _batched()
    for b, fs in enumerate(_small_factsets()):
      looped = decodability(fs.values @ bc.model.decoder[b]).rho
      np.testing.assert_allclose(bc.rho[b], looped, atol=2e-3)


class BucketSolveTest(parameterized.TestCase):

  @parameterized.parameters(jnp.float32, jnp.float64)
  def test_min_norm_map_of_padded_bucket(self, dtype):
    b, d, m, n_valid = 12, 20, 5, 9
    with jax.enable_x64(dtype == jnp.float64):
      keys = jax.random.normal(jax.random.key(0), (b, d), dtype)
      targets = jax.random.normal(jax.random.key(1), (b, m), dtype)
      valid = jnp.arange(b) < n_valid
      # Padding rows hold garbage: it must not reach the map. (Jitted, as
      # solve_buckets runs it.)
      maps = jax.jit(gadgets.solve_bucket)(keys, targets, valid)
    self.assertEqual(maps.dtype, dtype)
    k64 = np.asarray(keys[:n_valid], np.float64)
    expected = (np.linalg.pinv(k64) @ np.asarray(targets[:n_valid])).T
    tol = 1e-4 if dtype == jnp.float32 else 1e-12
    np.testing.assert_allclose(maps, expected, atol=tol)

  def test_nan_bucket_is_refit(self):
    # A bucket whose solve failed (NaN maps, as a singular Gram gives) has
    # NaN margins: construct must count them as failing and refit them.
    fs = _factset('sphere', 0)
    real = assembly.build_gadgets_streamed

    def broken(*args, **kwargs):
      parts = real(*args, **kwargs)
      return parts._replace(maps=parts.maps.at[1].set(jnp.nan))
    with mock.patch.object(ed, 'build_gadgets_streamed', broken):
      c = ed.construct(0, fs)
    self.assertEqual(c.report.repaired_buckets, 1)
    self.assertEqual(c.report.accuracy, 1.0)
    self.assertGreater(c.report.min_margin, 0.0)
    self.assertTrue(np.isfinite(np.asarray(c.model.w_up)).all())

  def test_failed_refit_rebuilds_with_a_new_direction(self):
    # A broken bucket that the float64 refit cannot mend (refit and split
    # mocked to do nothing): construct must rebuild with a new direction and
    # half the bucket size, and give up after max_retries rebuilds.
    fs = _factset('sphere', 0)
    real, sizes = assembly.build_gadgets_streamed, []

    def broken_first(*args, **kwargs):
      parts = real(*args, **kwargs)
      sizes.append(kwargs['bucket_size'])
      if len(sizes) == 1:
        parts = parts._replace(maps=parts.maps.at[1].set(jnp.nan))
      return parts
    with mock.patch.object(ed, 'build_gadgets_streamed', broken_first), \
        mock.patch.object(ed, 'refit_buckets', lambda parts, *a: parts), \
        mock.patch.object(ed, 'split_unsolved',
                          lambda parts, *a, **k: (parts, 0)):
      c = ed.construct(0, fs)
      self.assertEqual(sizes, [sizes[0], sizes[0] // 2])
      self.assertEqual(c.report.accuracy, 1.0)
      self.assertGreater(c.report.min_margin, 0.0)
      sizes.clear()
      with self.assertRaisesRegex(ConstructionError,
                                  'could not certify storage.*0 rebuild'):
        ed.construct(0, fs, max_retries=0)
      self.assertLen(sizes, 1)


@pytest.mark.slow
class LargeTest(parameterized.TestCase):
  """Larger fact sets (run with --runslow)."""

  @parameterized.parameters('clipped', 'relu')
  def test_large_sphere(self, activation):
    fs = F.random_factset(jax.random.PRNGKey(400), 2048, 64)
    c = ed.construct(0, fs, activation=activation)
    self.assertEqual(c.report.accuracy, 1.0)
    self.assertGreater(c.report.min_margin, 0.0)
    dense = _dense_eval(c.model.as_mlp(), fs)
    self.assertEqual(float(dense.accuracy), 1.0)
    self.assertGreater(float(dense.min_margin), 0.0)
    self.assertEqual(c.report.num_params, M.num_params(c.model))
