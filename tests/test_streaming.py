"""Streamed (host-chunked) construction pieces equal their one-call versions.

Chunk sizes are chosen so they do not divide the problem sizes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from factstore_jax.constructions import encoder_decoder as ed
from factstore_jax.constructions import gadgets
from factstore_jax.factsets import (FactSet, _first_copy, many_to_one_map,
                                    sample_sphere)
from factstore_jax.threads import single_threaded_blas
# Import names: ``factstore_jax.decodability`` the package attribute is the
# re-exported function.
from factstore_jax.decodability import _top_k_indices, decodability


def _factset(n=1000, d=16, p=50, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return FactSet(sample_sphere(k1, n, d), sample_sphere(k2, p, d),
                 many_to_one_map(k3, n, p))


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_top_k_blocked_equals_top_k_with_ties():
  y = jnp.round(jax.random.normal(jax.random.key(1), (3, 20001)) * 20) / 20
  y = y.at[0, :5000].set(-jnp.inf).at[1, 7:30000:3].set(jnp.inf)
  for row in y:
    for k in (5, 64):
      np.testing.assert_array_equal(
          np.asarray(_top_k_indices(row, k)),
          np.asarray(jax.lax.top_k(row, k)[1]))


def test_streamed_decodability_equals_one_call():
  values = sample_sphere(jax.random.key(2), 150, 6)
  whole = decodability(values, chunk_size=32)
  seen = []
  streamed = decodability(values, chunk_size=32, stream_size=50,
                          progress=lambda done, total: seen.append(done))
  _assert_trees_equal(whole, streamed)
  assert seen == [64, 128, 150]
  stopped = decodability(values, chunk_size=32, stream_size=50,
                         abort=lambda rows, part: rows[0] >= 64)
  assert stopped is None


def test_streamed_bucket_solves_equal_one_call():
  fs = _factset(n=400, d=8)
  targets = jax.random.normal(jax.random.key(3), (fs.keys.shape[0], 4))
  key = jax.random.key(4)
  with single_threaded_blas():
    whole = jax.block_until_ready(ed._build_gadgets_jit(
        key, fs.keys, targets, bucket_size=6))
    streamed = ed.build_gadgets_streamed(key, fs.keys, targets, bucket_size=6,
                                         stream_size=30)
    assert whole.maps.shape[0] % 30 != 0
    _assert_trees_equal(whole, streamed)
    mapped = jax.jit(gadgets.solve_buckets, static_argnames='chunk_size')(
        fs.keys, targets, whole.buckets, chunk_size=37)
  np.testing.assert_array_equal(np.asarray(mapped), np.asarray(whole.maps))


@pytest.fixture(scope='module')
def built():
  fs = _factset(n=600, d=16, p=300)
  return fs, ed.construct(fs, 0, bucket_size=6)


def test_streamed_verification_equals_one_call(built):
  fs, c = built
  parts, decoder = c.structure.gadgets, c.model.decoder
  whole = ed.verify_structured(parts, decoder, fs, c.codes, chunk_size=64)
  streamed = ed.verify_structured_streamed(parts, decoder, fs, c.codes,
                                           chunk_size=64, stream_size=150)
  # Equal on CPU; a GPU picks matmul kernels per call shape (seen: 1 ulp).
  for x, y in zip(jax.tree.leaves(whole), jax.tree.leaves(streamed)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6,
                               atol=1e-7)
  assert float(streamed[0].storage.accuracy) == 1.0


def test_streamed_construct_equals_one_call(built, monkeypatch):
  fs, whole = built
  monkeypatch.setattr(ed, 'STREAM_VALUES', 100)
  monkeypatch.setattr(ed, 'STREAM_BUCKETS', 45)
  monkeypatch.setattr(ed, 'STREAM_KEYS', 250)
  stages = set()
  streamed = ed.construct(fs, 0, bucket_size=6,
                          progress=lambda stage, done, total: stages.add(
                              stage.split()[0]))
  assert stages == {'decodability', 'buckets', 'verify', 'assemble'}
  _assert_trees_equal((whole.model, whole.codes, whole.rho, whole.structure),
                      (streamed.model, streamed.codes, streamed.rho,
                       streamed.structure))
  a, b = whole.report.as_dict(), streamed.report.as_dict()
  a.pop('seconds'), b.pop('seconds')
  assert a == b


def test_first_copy_matches_unique():
  rng = np.random.default_rng(0)
  keys = rng.integers(-1, 2, size=(500, 3)).astype(np.float32)
  keys[keys == 0] = np.where(rng.random(int((keys == 0).sum())) < 0.5, 0.0,
                             -0.0)
  rows = np.ascontiguousarray(keys.astype(np.float64) + 0.0)
  _, first, inverse = np.unique(rows, axis=0, return_index=True,
                                return_inverse=True)
  np.testing.assert_array_equal(_first_copy(keys), first[inverse.reshape(-1)])


if __name__ == '__main__':
  pytest.main([__file__, '-q'])
