"""Tests for bucket-local editing of encoder-decoder MLPs (editing.py).

Every edit is checked three ways: the edit's own report (every fact from the
lowest touched bucket upward verified), an independent dense evaluation of
the edited model on the whole edited fact set (factorised and folded), and
bit-identity of the outputs of every fact below the touched buckets (the same
batch of keys evaluated before and after, compared with ``np.array_equal``; a
bucket split widens the hidden layer, so there float rounding is allowed).
Facts above the touched buckets keep their outputs up to float rounding of
the telescoped sum.

One small construction (N = 128, d = 32) is shared by all tests; on a 2-core
CPU nearly all the time is XLA compilation, cached per shape.
"""

from __future__ import annotations

import functools
from unittest import mock

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
from factstore_jax.errors import ConstructionError, FactStoreError

N, D = 128, 32


@functools.lru_cache(maxsize=None)
def _base():
  fs = F.random_factset(jax.random.PRNGKey(3), N, D)
  return fs, ed.construct(0, fs, bucket_size=12)


@jax.jit
def _apply(model, keys):
  return model(keys)


_apply_mlp = jax.jit(M.GatedMLP.__call__)
_dense = jax.jit(storage.evaluate_mlp)
_factorised = jax.jit(lambda model, fs: storage.evaluate_fn(model, fs))


def _members(construction, j) -> np.ndarray:
  b = construction.structure.gadgets.buckets
  return np.asarray(b.index)[j][np.asarray(b.valid)[j]]


def _unit(rng, d=D):
  v = rng.normal(size=d)
  return (v / np.linalg.norm(v)).astype(np.float32)


def _lowest(report) -> int:
  """Lowest bucket whose facts an edit may change (a moved step below bucket
  ``j`` also decides bucket ``j - 1``)."""
  return min(list(report.solved_buckets) +
             [max(j - 1, 0) for j in report.regated_buckets])


def _key_at(construction, t, rng):
  """A random unit-ish key whose projection on the bucket direction is t."""
  g = np.asarray(construction.structure.gadgets.buckets.direction, np.float64)
  r = _unit(rng).astype(np.float64)
  return (r + (t - r @ g) * g / (g @ g)).astype(np.float32)   # any |g|


class _EditTest(parameterized.TestCase):
  """Shared checks of an edited construction."""

  def assert_stores(self, construction, factset):
    rep = construction.report
    self.assertEqual(rep.accuracy, 1.0)
    self.assertGreater(rep.min_margin, 0.0)
    for report in (_factorised(construction.model, factset),
                   _dense(construction.mlp, factset)):
      self.assertAlmostEqual(float(report.accuracy), 1.0, places=6)
      self.assertGreater(float(report.min_margin), 0.0)
    # The report's global margin is the per-bucket minima, not a new pass:
    # certified lower bounds (construct's certificate) for untouched
    # buckets, dense margins for re-verified ones; never above the dense.
    dense = _factorised(construction.model, factset)
    self.assertLessEqual(rep.min_margin, float(dense.min_margin) + 1e-6)
    self.assertGreater(rep.min_margin, 0.25 * float(dense.min_margin))
    self.assertEqual(rep.num_facts, factset.keys.shape[0])
    self.assertEqual(rep.num_values, factset.values.shape[0])
    self.assertEqual(rep.hidden_dim, construction.model.w_gate.shape[1])
    self.assertEqual(int(np.asarray(
        construction.structure.gadgets.buckets.valid).sum()), rep.num_facts)

  def assert_edit_report(self, report, construction):
    self.assertEqual(report.accuracy, 1.0)
    self.assertGreater(report.min_margin, 0.0)
    self.assertTrue((report.margins > 0).all())
    self.assertGreater(report.gate_slack, 0.0)
    n = construction.report.num_buckets
    expected = np.concatenate([_members(construction, j)
                               for j in range(_lowest(report), n)])
    np.testing.assert_array_equal(np.sort(report.facts), np.sort(expected))

  def assert_untouched_identical(self, before, after, report, deleted=(),
                                 exact=True):
    """Facts below the touched buckets keep bit-identical outputs; facts
    above them, outside re-solved buckets, move by float rounding only.

    Both models are evaluated on the *old* keys (same batch); old fact ``o``
    is new fact ``o - #(deleted < o)``. ``exact=False`` (a bucket split: the
    dense weights change shape) allows float rounding below too. Returns
    the old indices of the bit-identical facts.
    """
    fs, c = before
    c2 = after
    solved = set()
    for j in report.solved_buckets:
      solved.update(_members(c2, j).tolist())
    below = set()
    for j in range(_lowest(report)):
      below.update(_members(c2, j).tolist())
    deleted = np.array(sorted(deleted), np.int64)
    old = np.setdiff1d(np.arange(N), deleted)
    new = old - np.searchsorted(deleted, old)
    keep = old[~np.isin(new, list(solved))]
    same = old[np.isin(new, list(below))]
    self.assertGreater(len(keep), N // 2)
    self.assertEqual(len(same) > 0, _lowest(report) > 0)
    out0 = np.asarray(_apply(c.model, fs.keys))
    out1 = np.asarray(_apply(c2.model, fs.keys))
    if exact:
      self.assertTrue(np.array_equal(out0[same], out1[same]))
    # Above the edit: the telescoped sum's rounding (a few ulps of the
    # terms |(M_j - M_{j-1}) x|, which exceed the output by ~10x here).
    np.testing.assert_allclose(out1[keep], out0[keep], atol=1e-4, rtol=0)
    # The folded gated MLP sums through the decoder with FMA, so its
    # outputs move by rounding only.
    fold0 = np.asarray(_apply_mlp(c.mlp, fs.keys))
    fold1 = np.asarray(_apply_mlp(c2.mlp, fs.keys))
    np.testing.assert_allclose(fold1[keep], fold0[keep], atol=1e-4, rtol=0)
    return same


class UpdateTest(_EditTest):

  def test_update_to_existing_value(self):
    fs, c = _base()
    i, v = 17, (int(fs.mapping[17]) + 5) % N
    c2, fs2, rep = E.edit(c, fs, [E.Update(i, v)])
    self.assertEqual(int(fs2.mapping[i]), v)
    np.testing.assert_array_equal(np.delete(fs2.mapping, i),
                                  np.delete(fs.mapping, i))
    self.assertIs(fs2.keys, fs.keys)
    self.assertEqual((rep.num_updated, rep.num_inserted, rep.num_deleted),
                     (1, 0, 0))
    self.assertLen(rep.solved_buckets, 1)
    self.assertEqual(rep.regated_buckets, ())
    self.assertIn(i, rep.facts.tolist())
    self.assert_edit_report(rep, c2)
    self.assert_stores(c2, fs2)
    self.assert_untouched_identical((fs, c), c2, rep)
    # The edited fact decodes to its new value.
    out = _apply(c2.model, fs2.keys[i])
    self.assertEqual(int(jnp.argmax(fs2.values @ out)), v)

  def test_failed_bucket_solve_is_refit_in_float64(self):
    # The edited bucket's solve breaks (NaN maps): the check must see it
    # fail, refit that bucket in float64, and store every fact.
    fs, c = _base()
    i, v = 17, (int(fs.mapping[17]) + 5) % N
    real = E._solve
    broken = lambda *args: real(*args) * jnp.nan
    with mock.patch.object(E, '_solve', broken):
      c2, fs2, rep = E.edit(c, fs, [E.Update(i, v)])
    self.assertEqual(rep.refit_buckets, rep.solved_buckets)
    self.assertLen(rep.refit_buckets, 1)
    self.assert_stores(c2, fs2)
    out = _apply(c2.model, fs2.keys[i])
    self.assertEqual(int(jnp.argmax(fs2.values @ out)), v)

  def test_update_to_current_value_is_noop(self):
    fs, c = _base()
    c2, fs2, rep = E.edit(c, fs, [E.Update(3, int(fs.mapping[3]))])
    self.assertIs(c2, c)
    self.assertEqual(rep.solved_buckets, ())

  def test_update_to_new_value_vector(self):
    fs, c = _base()
    rng = np.random.default_rng(1)
    c2, fs2, rep = E.edit(c, fs, [E.Update(40, _unit(rng))])
    self.assertEqual(rep.new_values, (N,))
    self.assertEqual(int(fs2.mapping[40]), N)
    chex.assert_shape(c2.codes, (N + 1, c.report.code_dim))
    chex.assert_shape(c2.rho, (N + 1,))
    self.assertGreater(float(c2.rho[N]), 0.0)
    self.assertGreater(rep.new_value_margin, 0.0)
    self.assert_stores(c2, fs2)
    self.assert_untouched_identical((fs, c), c2, rep)


class DeleteTest(_EditTest):

  def test_delete(self):
    fs, c = _base()
    c2, fs2, rep = E.edit(c, fs, [E.Delete(50)])
    chex.assert_shape(fs2.keys, (N - 1, D))
    np.testing.assert_array_equal(fs2.keys, np.delete(fs.keys, 50, 0))
    np.testing.assert_array_equal(fs2.mapping, np.delete(fs.mapping, 50))
    self.assertEqual(rep.num_deleted, 1)
    self.assertLen(rep.solved_buckets, 1)
    self.assert_edit_report(rep, c2)
    self.assert_stores(c2, fs2)
    self.assert_untouched_identical((fs, c), c2, rep, deleted=[50])

  def test_delete_whole_bucket_then_insert_there(self):
    fs, c = _base()
    j = 4
    members = _members(c, j)
    c2, fs2, rep = E.edit(c, fs, [E.Delete(int(i)) for i in members])
    self.assertEqual(rep.solved_buckets, (j,))
    self.assertEqual(len(_members(c2, j)), 0)
    self.assertEqual(float(c2.structure.min_margin[j]), np.inf)
    self.assert_stores(c2, fs2)
    self.assert_untouched_identical((fs, c), c2, rep, deleted=members)
    # The emptied window still covers its interval: a new key lands there.
    g = np.asarray(c.structure.gadgets.buckets.direction)
    t = np.asarray(fs.keys)[members] @ g
    key = _key_at(c, float(np.median(t)), np.random.default_rng(2))
    c3, fs3, rep3 = E.edit(c2, fs2, [E.Insert(key, 9)])
    self.assertEqual(rep3.solved_buckets, (j,))
    self.assert_stores(c3, fs3)


class InsertTest(_EditTest):

  def test_insert_inside_bucket(self):
    fs, c = _base()
    j = 6
    members = _members(c, j)
    keys = np.asarray(fs.keys)
    key = 0.5 * (keys[members[1]] + keys[members[2]]) + 0.01 * _unit(
        np.random.default_rng(0))
    c2, fs2, rep = E.edit(c, fs, [E.Insert(key, 11)])
    chex.assert_shape(fs2.keys, (N + 1, D))
    self.assertEqual(int(fs2.mapping[N]), 11)
    np.testing.assert_array_equal(fs2.keys[:N], fs.keys)
    self.assertEqual(rep.solved_buckets, (j,))
    self.assertEqual(rep.regated_buckets, ())
    self.assertIn(N, rep.facts.tolist())
    self.assert_edit_report(rep, c2)
    self.assert_stores(c2, fs2)
    self.assert_untouched_identical((fs, c), c2, rep)

  def test_insert_in_gap_moves_shared_step(self):
    fs, c = _base()
    j = 5
    g = np.asarray(c.structure.gadgets.buckets.direction, np.float64)
    keys = np.asarray(fs.keys, np.float64)
    lo = (keys[_members(c, j)] @ g).max()
    hi = (keys[_members(c, j + 1)] @ g).min()
    key = _key_at(c, lo + 0.3 * (hi - lo), np.random.default_rng(4))
    c2, fs2, rep = E.edit(c, fs, [E.Insert(key, 12)])
    # Closer to the lower bucket: joins it, the step moves into (t, hi).
    self.assertEqual(rep.solved_buckets, (j,))
    self.assertEqual(rep.regated_buckets, (j + 1,))
    old_step = np.asarray(c.structure.gadgets.buckets.step_start)
    new_step = np.asarray(c2.structure.gadgets.buckets.step_start)
    self.assertGreater(new_step[j + 1], old_step[j + 1])
    np.testing.assert_array_equal(np.delete(new_step, j + 1),
                                  np.delete(old_step, j + 1))
    self.assert_edit_report(rep, c2)
    self.assert_stores(c2, fs2)
    same = self.assert_untouched_identical((fs, c), c2, rep)
    # The facts of the bucket below are among the bit-identical ones.
    self.assertTrue(set(_members(c, j - 1)) <= set(same.tolist()))

  def test_insert_into_full_bucket_splits(self):
    fs, c = _base()
    j = 2
    members = _members(c, j)
    b = c.report.bucket_size
    keys = np.asarray(fs.keys)
    rng = np.random.default_rng(5)
    changes = []
    for _ in range(b - len(members) + 1):
      p, q = rng.choice(members, 2, replace=False)
      changes.append(E.Insert(0.5 * (keys[p] + keys[q]) + 0.01 * _unit(rng),
                              int(rng.integers(N))))
    c2, fs2, rep = E.edit(c, fs, changes)
    self.assertEqual(rep.new_buckets, (j + 1,))
    self.assertEqual(rep.solved_buckets, (j, j + 1))
    m = c.report.code_dim
    self.assertEqual(c2.report.num_buckets, c.report.num_buckets + 1)
    self.assertEqual(c2.report.hidden_dim, c.report.hidden_dim + m)
    chex.assert_shape(c2.structure.gadgets.maps,
                      (c.report.num_buckets + 1, m, D))
    self.assert_edit_report(rep, c2)
    self.assert_stores(c2, fs2)
    self.assert_untouched_identical((fs, c), c2, rep, exact=False)

  def test_insert_new_value_vector_grows_codes(self):
    fs, c = _base()
    rng = np.random.default_rng(6)
    value = _unit(rng)
    c2, fs2, rep = E.edit(c, fs, [E.Insert(_unit(rng), value)])
    self.assertEqual(rep.new_values, (N,))
    chex.assert_shape(fs2.values, (N + 1, D))
    np.testing.assert_array_equal(fs2.values[N], value)
    self.assertEqual(int(fs2.mapping[N]), N)
    # The new code is the separator of the projected table, same decoder.
    codes, rho = codes_lib.value_codes(fs2.values, c.model.decoder, indices=[N])
    np.testing.assert_array_equal(c2.codes[N], codes[0])
    np.testing.assert_array_equal(c2.codes[:N], c.codes)
    self.assertGreater(float(rho[0]), 0.0)
    self.assertGreater(rep.new_value_margin, 0.0)
    self.assertLessEqual(c2.report.min_margin, rep.new_value_margin)
    self.assert_stores(c2, fs2)
    self.assert_untouched_identical((fs, c), c2, rep)


class PropertiesTest(_EditTest):

  def test_deterministic(self):
    fs, c = _base()
    changes = [E.Update(7, 8), E.Delete(90),
               E.Insert(_unit(np.random.default_rng(7)), 30)]
    first = E.edit(c, fs, changes)
    again = E.edit(c, fs, changes)
    strip = lambda out: (out[0]._replace(report=None), out[1])  # seconds
    for a, b in zip(jax.tree.leaves(strip(first)),
                    jax.tree.leaves(strip(again))):
      np.testing.assert_array_equal(a, b)
    self.assertEqual(first[0].report._replace(seconds=0),
                     again[0].report._replace(seconds=0))
    np.testing.assert_array_equal(first[2].margins, again[2].margins)

  def test_chunk_size_does_not_change_the_result(self):
    fs, c = _base()
    changes = [E.Update(7, 8), E.Delete(90)]
    whole = E.edit(c, fs, changes)
    chunked = E.edit(c, fs, changes, chunk_size=16)
    for a, b in zip(jax.tree.leaves(whole[0].model),
                    jax.tree.leaves(chunked[0].model)):
      np.testing.assert_array_equal(a, b)
    # The same model; its margins are float32 evaluations batched by the
    # chunk, and XLA's CPU matmuls may round a (16, d) batch differently
    # from a (2048, d) one (they do on AVX-512 hosts): equal to rounding.
    np.testing.assert_allclose(whole[2].margins, chunked[2].margins,
                               rtol=1e-5, atol=1e-6)

  def test_model_equals_assembled_structure(self):
    fs, c = _base()
    c2, _, _ = E.edit(c, fs, [E.Update(7, 8), E.Delete(90)])
    assembled = assembly.prune_dead(assembly.assemble_gadgets(
        c2.structure.gadgets, c2.model.decoder, 'clipped'))
    for a, b in zip(jax.tree.leaves(c2.model), jax.tree.leaves(assembled)):
      np.testing.assert_array_equal(a, b)

  def test_batch_equals_sequential(self):
    fs, c = _base()
    key = _unit(np.random.default_rng(8))
    batch = [E.Update(20, 21), E.Delete(60), E.Insert(key, 22)]
    c_b, fs_b, rep = E.edit(c, fs, batch)
    c_s, fs_s = c, fs
    for change in batch:  # indices stay valid: the delete comes after 20
      c_s, fs_s, _ = E.edit(c_s, fs_s, [change])
    for a, b in zip(fs_b, fs_s):
      np.testing.assert_array_equal(a, b)
    self.assert_stores(c_b, fs_b)
    self.assert_stores(c_s, fs_s)
    np.testing.assert_array_equal(c_b.structure.gadgets.buckets.index,
                                  c_s.structure.gadgets.buckets.index)
    np.testing.assert_allclose(_apply(c_b.model, fs_b.keys),
                               _apply(c_s.model, fs_s.keys), atol=1e-5)
    self.assertEqual(rep.num_inserted + rep.num_updated + rep.num_deleted, 3)

  def test_report_as_dict(self):
    fs, c = _base()
    _, _, rep = E.edit(c, fs, E.Update(7, 8))
    d = rep.as_dict()
    self.assertIsInstance(d['margins'], list)
    self.assertEqual(d['num_updated'], 1)


class ErrorTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('update_index_high', lambda fs: [E.Update(N, 0)], 'out of range'),
      ('update_index_negative', lambda fs: [E.Update(-1, 0)], 'out of range'),
      ('update_index_float', lambda fs: [E.Update(1.0, 0)], 'integer'),
      ('update_value_high', lambda fs: [E.Update(0, N)], 'out of range'),
      ('update_value_bool', lambda fs: [E.Update(0, True)], 'integer'),
      ('update_vector_dim', lambda fs: [E.Update(0, np.ones(D + 1))],
       'shape'),
      ('delete_missing', lambda fs: [E.Delete(N + 3)], 'out of range'),
      ('delete_twice', lambda fs: [E.Delete(2), E.Delete(2)], 'twice'),
      ('update_and_delete', lambda fs: [E.Update(2, 3), E.Delete(2)],
       'both'),
      ('update_twice', lambda fs: [E.Update(2, 3), E.Update(2, 4)], 'twice'),
      ('key_dim', lambda fs: [E.Insert(np.ones(D - 1), 0)], 'shape'),
      ('key_nan', lambda fs: [E.Insert(np.full(D, np.nan), 0)],
       'non-finite'),
      ('key_duplicate', lambda fs: [E.Insert(fs.keys[5], 3)], 'equals'),
      ('keys_identical', lambda fs: [E.Insert(np.ones(D), 3),
                                     E.Insert(np.ones(D), 4)], 'identical'),
      ('not_a_change', lambda fs: [('update', 1, 2)], 'Insert, Update'),
      ('not_a_list', lambda fs: 5, 'list'),
  )
  def test_bad_changes(self, changes, message):
    fs, c = _base()
    with self.assertRaisesRegex(FactStoreError, message):
      E.edit(c, fs, changes(fs))

  def test_bad_construction_or_factset(self):
    fs, c = _base()
    with self.assertRaisesRegex(FactStoreError, 'no bucket structure'):
      E.edit(c._replace(structure=None), fs, [E.Delete(0)])
    relu = c._replace(model=c.model.replace(activation='relu'))
    with self.assertRaisesRegex(FactStoreError, 'clipped'):
      E.edit(relu, fs, [E.Delete(0)])
    short = F.FactSet(fs.keys[1:], fs.values, fs.mapping[1:])
    with self.assertRaisesRegex(FactStoreError, 'keys have shape'):
      E.edit(c, short, [E.Delete(0)])
    with self.assertRaisesRegex(FactStoreError, 'values have shape'):
      E.edit(c, F.FactSet(fs.keys, fs.values[1:], fs.mapping), [E.Delete(0)])

  def test_new_value_not_decodable(self):
    fs, c = _base()
    # A copy of a used value is no strict vertex (rho = 0).
    with self.assertRaisesRegex(ConstructionError, 'not decodable'):
      E.edit(c, fs, [E.Update(0, fs.values[3])])
    # A far-out value would win every fact's argmax: needs a rebuild.
    with self.assertRaisesRegex(ConstructionError, 'outscore'):
      E.edit(c, fs, [E.Update(0, 50.0 * np.asarray(fs.values[3]))])


if __name__ == '__main__':
  import absl.testing.absltest
  absl.testing.absltest.main()
