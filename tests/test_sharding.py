"""Tests of factstore_jax.sharding: the sharded batched map and its meshes.

The 4-device check runs in a subprocess: this process has already started
JAX with one CPU device, and ``--xla_force_host_platform_device_count`` only
takes effect before JAX starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest


from factstore_jax import sharding
from factstore_jax.errors import FactStoreError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fn(item, steps=3):
  """A few matmul steps plus reductions; float and int outputs."""
  h = item['x'] + jax.random.normal(item['key'], item['x'].shape)
  for _ in range(steps):
    h = jnp.tanh(h @ item['w']) + 0.1 * h
  return {'h': h, 'norm': jnp.linalg.norm(h), 'top': jnp.argmax(h.sum(0))}


def _inputs(b, seed=0):
  """``b`` items: weights, data (numpy) and typed PRNG keys (padded too)."""
  rng = np.random.default_rng(seed)
  return {'w': (rng.standard_normal((b, 32, 32)) / 6).astype(np.float32),
          'x': rng.standard_normal((b, 16, 32)).astype(np.float32),
          'key': jax.random.wrap_key_data(
              rng.integers(0, 2**32, (b, 2), dtype=np.uint32))}


_SCRIPT = textwrap.dedent('''
    import json
    import jax
    import numpy as np
    from jax.sharding import PartitionSpec as P
    from factstore_jax import sharding
    import tests.test_sharding as t

    assert len(jax.devices()) == 4, jax.devices()
    report = {'devices': len(jax.devices())}
    for b in (6, 8):
      inputs = t._inputs(b)
      out = sharding.map_batched(t._fn, inputs, to_host=False)
      host = sharding.map_batched(t._fn, inputs)
      ref = jax.jit(jax.vmap(t._fn))(inputs)
      report[b] = {
          'shapes': {n: list(v.shape) for n, v in host.items()},
          'device_set': {n: len(v.sharding.device_set) for n, v in out.items()},
          'batch_sharded': {n: v.sharding.spec == P('batch')
                            for n, v in out.items()},
          'host_equals_device': all(
              np.array_equal(host[n], np.asarray(out[n])) for n in out),
          'top_equal': bool(np.array_equal(host['top'], ref['top'])),
          'max_err': max(float(np.max(np.abs(host[n] - ref[n])))
                         for n in ('h', 'norm')),
      }
      # Each device maps over its items 1 / 2 at a time (lax.map).
      report[b]['chunked'] = {}
      for chunk in (1, 2):
        got = sharding.map_batched(t._fn, inputs, chunk_size=chunk,
                                to_host=False)
        report[b]['chunked'][chunk] = {
            'device_set': min(len(v.sharding.device_set)
                              for v in got.values()),
            'top_equal': bool(np.array_equal(np.asarray(got['top']),
                                             ref['top'])),
            'max_err': max(float(np.max(np.abs(np.asarray(got[n]) - ref[n])))
                           for n in ('h', 'norm'))}
    report['cache'] = sharding._compiled.cache_info().misses
    print(json.dumps(report))
''')


def test_map_batched_sharded_equals_unsharded():
  # Imported here: the subprocess imports this module as tests.test_sharding.
  from conftest import subprocess_env  # pylint: disable=import-outside-toplevel
  env = subprocess_env(device_count=4)
  proc = subprocess.run([sys.executable, '-c', _SCRIPT], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report['devices'] == 4
  for b in ('6', '8'):
    r = report[b]
    assert r['shapes'] == {'h': [int(b), 16, 32], 'norm': [int(b)],
                           'top': [int(b)]}
    # Every output was computed on all 4 devices.
    assert r['device_set'] == {'h': 4, 'norm': 4, 'top': 4}
    assert r['host_equals_device']
    assert r['top_equal']
    # Float outputs: equal to float32 rounding, not always bit for bit: XLA's
    # CPU code for a per-device batch of 2 reduces in another order than for
    # a batch of 8 (seen: 1 ulp in 'norm' at B = 8, also without sharding).
    assert r['max_err'] <= 1e-5
    for chunk in ('1', '2'):
      c = r['chunked'][chunk]
      assert c['device_set'] == 4 and c['top_equal'] and c['max_err'] <= 1e-5
  # Unpadded outputs stay sharded over the batch axis.
  assert report['8']['batch_sharded'] == {'h': True, 'norm': True,
                                         'top': True}
  # One compiled function per mode (vmap, chunks of 1, of 2), for both
  # batch sizes.
  assert report['cache'] == 3


def test_map_batched_one_device_equals_vmap():
  inputs = _inputs(5, seed=1)
  out = sharding.map_batched(_fn, inputs)
  assert all(isinstance(v, np.ndarray) for v in out.values())
  ref = jax.jit(jax.vmap(_fn))(inputs)
  eager = jax.vmap(_fn)(inputs)
  for n in out:
    # One device: the same program as the unsharded jit, bit for bit.
    np.testing.assert_array_equal(out[n], np.asarray(ref[n]))
    np.testing.assert_allclose(out[n], np.asarray(eager[n]), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize('chunk_size', [1, 2, 5, 8])
def test_map_batched_chunked_equals_vmap(chunk_size):
  # A sequential map, chunk_size items at a time (5 = the whole batch, 8 =
  # more than it): the same results as the vmapped call, with a while loop
  # whose trip count differs per item.
  def fn(item):
    out = _fn(item)
    steps, grown = jax.lax.while_loop(
        lambda c: c[0] < item['steps'], lambda c: (c[0] + 1, c[1] * 1.5),
        (0, out['norm']))
    return {'steps': steps, 'grown': grown, 'h': out['h']}

  inputs = dict(_inputs(5, seed=2), steps=np.arange(5, dtype=np.int32))
  ref = sharding.map_batched(fn, inputs)
  out = sharding.map_batched(fn, inputs, chunk_size=chunk_size)
  np.testing.assert_array_equal(out['steps'], np.arange(5))
  for n in ref:
    np.testing.assert_allclose(out[n], ref[n], rtol=1e-6, atol=1e-6)


def test_map_batched_static_kwargs_and_no_retrace():
  traces = []

  def fn(item, scale):
    traces.append(scale)
    return {'y': item['a'] * scale, 'n': jnp.sum(item['b'])}

  inputs = {'a': np.arange(6, dtype=np.float32).reshape(3, 2),
            'b': np.ones((3, 4), np.int32)}
  for _ in range(3):
    out = sharding.map_batched(fn, inputs, static_kwargs={'scale': 2.0})
  np.testing.assert_array_equal(out['y'], inputs['a'] * 2)
  np.testing.assert_array_equal(out['n'], [4, 4, 4])
  assert traces == [2.0]  # traced once for three calls
  sharding.map_batched(fn, inputs, static_kwargs={'scale': 3.0})
  assert traces == [2.0, 3.0]


def test_map_batched_errors():
  ok = {'a': np.zeros((3, 2))}
  with pytest.raises(FactStoreError, match='disagree on the batch size'):
    sharding.map_batched(_fn, {'a': np.zeros((3, 2)), 'b': np.zeros((4,))})
  with pytest.raises(FactStoreError, match='leading batch axis'):
    sharding.map_batched(_fn, {'a': np.zeros((3, 2)), 'b': np.float32(1)})
  with pytest.raises(FactStoreError, match='no array leaves'):
    sharding.map_batched(_fn, {})
  with pytest.raises(FactStoreError, match='empty batch'):
    sharding.map_batched(_fn, {'a': np.zeros((0, 2))})
  with pytest.raises(FactStoreError, match='hashable'):
    sharding.map_batched(_fn, ok, static_kwargs={'steps': [1]})
  for bad in (0, -1, 1.5, True, '2'):
    with pytest.raises(FactStoreError, match='chunk_size'):
      sharding.map_batched(_fn, ok, chunk_size=bad)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('data',))
  with pytest.raises(FactStoreError, match="needs a 'batch' axis"):
    sharding.map_batched(_fn, ok, mesh=mesh)
  with pytest.raises(FactStoreError, match='no devices'):
    sharding.batch_mesh([])
  assert sharding.batch_mesh().axis_names == ('batch',)
