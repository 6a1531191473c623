"""Streamed (host-chunked) construction pieces equal their one-call versions.

Chunk sizes are chosen so they do not divide the problem sizes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest


from factstore_jax.constructions import encoder_decoder as ed
from factstore_jax.constructions import assembly
from factstore_jax.constructions import codes as codes_lib
from factstore_jax.constructions import config as config_lib
from factstore_jax.constructions import verify as verify_lib
from factstore_jax.constructions import decoders, gadgets
from factstore_jax.factsets import (FactSet, _first_copy, many_to_one_map,
                                    sample_sphere)
from factstore_jax.threads import single_threaded_blas
# Import names: ``factstore_jax.decodability`` the package attribute is the
# re-exported function.
from factstore_jax.decodability import decodability

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _factset(n=1000, d=16, p=50, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return FactSet(sample_sphere(k1, n, d), sample_sphere(k2, p, d),
                 many_to_one_map(k3, n, p))


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


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


@pytest.mark.parametrize('num_values', [120, 300])
def test_fixed_code_dim_fails_fast(num_values, monkeypatch):
  # code_dim 2 leaves many of these values undecodable. Over 256 values, a
  # sample of 256 fails it before the full solve; otherwise the first
  # streamed call does. Either way: the full solve's error, naming values
  # the full solve finds undecodable.
  fs = _factset(n=num_values, d=16, p=num_values, seed=1)
  config = config_lib.ConstructionConfig(code_dim=2)
  calls = []
  real = codes_lib.decodability
  def spy(values, **kwargs):
    calls.append(None if kwargs.get('indices') is None
                 else len(kwargs['indices']))
    return real(values, **kwargs)
  monkeypatch.setattr(codes_lib, 'decodability', spy)
  done = []
  with pytest.raises(ed.ConstructionError, match='code_dim=2 leaves') as fast:
    codes_lib.choose_code_dim(jax.random.key(0), fs.values, fs.mapping,
                              config, stream_size=40,
                              progress=lambda stage, d, total: done.append(d))
  assert calls == ([256] if num_values > 256 else [None])
  assert done == []  # no streamed call completed without aborting
  named = [int(i) for i in re.search(r'e\.g\. \[([^\]]*)\]',
                                     str(fast.value)).group(1).split(', ')]
  # Every value named early is undecodable in the full solve too.
  rho = real(decoders.project_values(
      fs.values, decoders.jl_decoder(jax.random.split(jax.random.key(0))[0],
                                     16, 2, fs.values.dtype)),
             indices=np.asarray(named)).rho
  assert named and all(float(r) <= 0 for r in rho)


def test_streamed_bucket_solves_equal_one_call():
  fs = _factset(n=400, d=8)
  targets = jax.random.normal(jax.random.key(3), (fs.keys.shape[0], 4))
  key = jax.random.key(4)
  with single_threaded_blas():
    whole = jax.block_until_ready(jax.jit(
        assembly.build_gadgets, static_argnames='bucket_size')(
            key, fs.keys, targets, bucket_size=6))
    streamed = assembly.build_gadgets_streamed(key, fs.keys, targets, bucket_size=6,
                                         stream_size=30)
    assert whole.maps.shape[0] % 30 != 0
    _assert_trees_equal(whole, streamed)
    mapped = jax.jit(gadgets.solve_buckets, static_argnames='chunk_size')(
        fs.keys, targets, whole.buckets, chunk_size=37)
  np.testing.assert_array_equal(np.asarray(mapped), np.asarray(whole.maps))


@pytest.fixture(scope='module')
def built():
  fs = _factset(n=600, d=16, p=300)
  return fs, ed.construct(0, fs, bucket_size=6)


def test_streamed_verification_equals_one_call(built):
  fs, c = built
  parts = c.structure.gadgets
  whole = verify_lib.verify_structured(parts, c.model, fs, c.codes, chunk_size=64)
  streamed = verify_lib.verify_structured_streamed(parts, c.model, fs, c.codes,
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
  monkeypatch.setattr(verify_lib, 'STREAM_KEYS', 250)
  stages = set()
  streamed = ed.construct(0, fs, bucket_size=6,
                          progress=lambda stage, done, total: stages.add(
                              stage.split()[0]))
  # The certificate certifies; the dense check ('verify') runs only if not.
  assert stages == {'decodability', 'buckets', 'certify', 'assemble'}
  assert streamed.report.check == 'certificate'
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


def _saved(c) -> dict:
  """What the device-split test compares of a construction."""
  return dict(code_dim=c.report.code_dim, num_buckets=c.report.num_buckets,
              min_margin=c.report.min_margin, codes=np.asarray(c.codes),
              maps=np.asarray(c.structure.gadgets.maps),
              w_up=np.asarray(c.model.w_up))


_ONE_DEVICE = textwrap.dedent('''
    import sys
    import numpy as np
    from factstore_jax.constructions import encoder_decoder as ed
    import tests.test_streaming as t

    c = ed.construct(0, t._factset(n=600, d=16, p=300), bucket_size=6)
    np.savez(sys.argv[1], **t._saved(c))
''')


_MULTI_DEVICE = textwrap.dedent('''
    import sys
    import jax
    import numpy as np
    from factstore_jax.constructions import encoder_decoder as ed
    import tests.test_streaming as t

    assert len(jax.local_devices()) == 3, jax.devices()
    from factstore_jax.decodability import decodability
    fs = t._factset(n=600, d=16, p=300)
    ed.STREAM_BUCKETS = 40  # several sharded calls, 40 = 3 * 13 + 1 buckets
    c = ed.construct(0, fs, bucket_size=6)
    r = c.report
    # The same solver on this process's first device only, as the reference.
    from unittest import mock
    from factstore_jax import sharding
    with mock.patch.object(sharding, 'local_mesh',
                           lambda: sharding.batch_mesh(jax.local_devices()[:1])):
      one = decodability(fs.values, num_candidates=64)
    split = decodability(fs.values, num_candidates=64)
    np.savez(sys.argv[1], accuracy=r.accuracy, **t._saved(c),
             rho_one=one.rho, rho_split=split.rho,
             maps_device=len(c.structure.gadgets.maps.devices()))
''')


def test_construct_on_three_devices_equals_one_device(tmp_path, built):
  """Bucket solves and decodability split over 3 CPU devices (subprocess:
  the device count is fixed when JAX starts) give this process's result
  (on CPU: the module's construction of the same fact set)."""
  # Imported here: the subprocess imports this module as tests.test_streaming.
  from conftest import subprocess_env  # pylint: disable=import-outside-toplevel
  env = subprocess_env(device_count=3)
  out = tmp_path / 'three.npz'
  proc = subprocess.run([sys.executable, '-c', _MULTI_DEVICE, str(out)],
                        cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  three = np.load(out)
  assert three['accuracy'] == 1.0 and three['min_margin'] > 0
  assert three['maps_device'] == 1  # gathered back on one device
  # Each value's solve is the same program split or not (the last block is
  # padded with copies of the last value, which converge with it).
  np.testing.assert_allclose(three['rho_split'], three['rho_one'], rtol=1e-6,
                             atol=1e-7)
  if jax.default_backend() == 'cpu':
    one = _saved(built[1])   # the same fact set and bucket_size, built here
  else:  # the one-device reference on the CPU too (GPU rounding differs)
    proc = subprocess.run(
        [sys.executable, '-c', _ONE_DEVICE, str(tmp_path / 'one.npz')],
        cwd=REPO, env=subprocess_env(),
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = np.load(tmp_path / 'one.npz')
  assert three['code_dim'] == one['code_dim']
  assert three['num_buckets'] == one['num_buckets']
  assert float(three['min_margin']) == pytest.approx(float(one['min_margin']),
                                                     rel=1e-5)
  for name in ('codes', 'maps', 'w_up'):
    np.testing.assert_allclose(three[name], one[name], rtol=1e-5, atol=1e-6,
                               err_msg=name)


if __name__ == '__main__':
  pytest.main([__file__, '-q'])
