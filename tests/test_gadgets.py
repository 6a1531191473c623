"""Tests of the step placement in constructions/gadgets.py (ramps, rooms,
projection rounding). Bucket maps, telescoping and splits are tested in
test_telescoped.py."""

from __future__ import annotations

import functools
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from factstore_jax import factsets as F
from factstore_jax.constructions import encoder_decoder as ed
from factstore_jax.constructions import gadgets

U32 = 2.0 ** -24


class RampTest(parameterized.TestCase):

  def test_small_rooms_give_the_symmetric_ramp_bitwise(self):
    lo = jnp.array([0.0, 1.0, -3.0], jnp.float32)
    hi = jnp.array([0.5, 1.25, -2.0], jnp.float32)
    room = jnp.full((3,), 1e-3, jnp.float32)
    start, width = gadgets.ramp(lo, hi, room, room, 0.25)
    gap = hi - lo
    np.testing.assert_array_equal(start, lo + 0.25 * gap)
    np.testing.assert_array_equal(width, (1.0 - 2.0 * 0.25) * gap)

  def test_rooms_narrow_each_side_and_are_capped(self):
    lo, hi = np.array([0.0, 0.0, 0.0]), np.array([1.0, 1.0, 1.0])
    room_lo = np.array([0.3, 0.1, 0.9])
    room_hi = np.array([0.1, 0.4, 0.9])
    start, width = gadgets.ramp(lo, hi, room_lo, room_hi, 0.25)
    np.testing.assert_allclose(start, [0.3, 0.25, gadgets.MAX_SLACK])
    np.testing.assert_allclose(start + width,
                               [0.75, 0.6, 1.0 - gadgets.MAX_SLACK])
    self.assertTrue(np.all(width > 0))

  def test_traced_equals_host_and_empty_gap_keeps_slack(self):
    lo = np.array([0.0, 2.0, 5.0], np.float32)
    hi = np.array([1.0, 2.0, 5.5], np.float32)   # middle gap is empty
    room = np.array([0.4, 7.0, 0.01], np.float32)
    host = gadgets.ramp(lo, hi, room, room[::-1], 0.25)
    traced = jax.jit(gadgets.ramp, static_argnums=4)(
        jnp.asarray(lo), jnp.asarray(hi), jnp.asarray(room),
        jnp.asarray(room[::-1]), 0.25)
    for h, t in zip(host, traced):
      np.testing.assert_allclose(h, t, rtol=1e-6)
    np.testing.assert_array_equal(host[0][1], 2.0)
    np.testing.assert_array_equal(host[1][1], 0.0)


class RoomTest(parameterized.TestCase):

  @parameterized.parameters(2, 8, 32)
  def test_projection_rounding_of_sparse_directions_is_gamma_k(self, k):
    g = np.asarray(gadgets.directions(jax.random.PRNGKey(k), 64)[
        gadgets.SPARSE_SUPPORTS.index(k)], np.float64)
    self.assertEqual(np.count_nonzero(g), k)
    self.assertEqual(gadgets.projection_rounding(g, U32),
                     k * U32 / (1 - k * U32))
    traced = jax.jit(gadgets.projection_rounding, static_argnums=1)(
        jnp.asarray(g, jnp.float32), U32)
    np.testing.assert_allclose(traced, k * U32 / (1 - k * U32), rtol=1e-6)

  def test_projection_rounding_of_a_dense_direction_adds_the_weights(self):
    g = np.asarray(gadgets.directions(jax.random.PRNGKey(0), 64)[-1],
                   np.float64)
    gamma = 64 * U32 / (1 - 64 * U32)
    self.assertAlmostEqual(gadgets.projection_rounding(g, U32),
                           U32 + gamma * (1 + U32), delta=1e-20)

  def test_flat_room_is_the_largest_bound_beyond_the_distance(self):
    g = np.array([1.0, -1.0, 0.0, 0.0], np.float32)
    keys = np.array([[[100.0, 100.0, 5.0, 0.0], [1.0, 0.5, 0.0, 0.0]]],
                    np.float32)                              # (1, 2, 4)
    t = np.array([[0.0, 0.5]])
    c = 2 * U32 / (1 - 2 * U32)
    room = gadgets.flat_room(keys, t, np.array([0.0]), g)
    np.testing.assert_allclose(room, [gadgets.ROOM_SAFETY * c * 200.0],
                               rtol=1e-6)
    far = gadgets.flat_room(keys, t, np.array([1.0]), g)   # all far: 0
    np.testing.assert_array_equal(far, [0.0])


def _offset_factset(offset: float, n: int = 4096, d: int = 64):
  """Keys ``offset + N(0, 1/d)``: the projection on a +-1 direction spreads
  like the noise while its float32 rounding bound grows with ``offset``."""
  rng = np.random.default_rng(0)
  keys = (offset + rng.normal(size=(n, d)) / np.sqrt(d)).astype(np.float32)
  values = F.sample_sphere(jax.random.PRNGKey(5), 256, d)
  return F.make_factset(keys, values, rng.integers(0, 256, n))


@functools.lru_cache(maxsize=None)
def _offset_built():
  fs = _offset_factset(60.0)
  return fs, ed.construct(0, fs, bucket_size=64)


class DenseKeysTest(absltest.TestCase):
  """Keys whose projections' float32 bounds exceed ``slack * gap`` at some
  cuts: symmetric ramps would leave keys on a ramp in float32; the narrowed
  ramps let the certificate prove every step."""

  def test_certified_with_narrowed_ramps(self):
    fs, c = _offset_built()
    report = c.report
    self.assertEqual(report.check, 'certificate')
    self.assertEqual(report.accuracy, 1.0)
    self.assertGreater(report.min_margin, 0.0)
    # Some ramps left more than the slack flat on a side.
    buckets = c.structure.gadgets.buckets
    t = np.asarray(fs.keys, np.float64) @ np.asarray(buckets.direction,
                                                       np.float64)
    index, valid = np.asarray(buckets.index), np.asarray(buckets.valid)
    start = np.asarray(buckets.step_start, np.float64)
    width = np.asarray(buckets.step_width, np.float64)
    narrowed = 0
    for j in range(1, index.shape[0]):
      lo, hi = t[index[j - 1][valid[j - 1]]].max(), t[index[j][valid[j]]].min()
      narrowed += (start[j] - lo > 0.26 * (hi - lo) or
                   hi - start[j] - width[j] > 0.26 * (hi - lo))
    self.assertGreater(narrowed, 0)

  def test_symmetric_ramps_are_not_certified(self):
    """Without the rooms (the ramps every cut had before) the step check
    fails on the same fact set and construct falls back to the dense
    check."""
    fs, _ = _offset_built()
    jax.clear_caches()   # make_buckets is traced with the constant inlined
    try:
      with mock.patch.object(gadgets, 'ROOM_SAFETY', 0.0):
        c = ed.construct(0, fs, bucket_size=64)
    finally:
      jax.clear_caches()
    self.assertEqual(c.report.check, 'dense')
    self.assertEqual(c.report.accuracy, 1.0)


if __name__ == '__main__':
  absltest.main()
