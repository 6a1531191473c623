"""Tests of the sweep runner: sharded batched map, results table, resume.

The 4-device check runs in a subprocess: this process has already started
JAX with one CPU device, and ``--xla_force_host_platform_device_count`` only
takes effect before JAX starts.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from factstore_jax import sweep
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


# ---------------------------------------------------------------------------
# map_batched.
# ---------------------------------------------------------------------------

_SCRIPT = textwrap.dedent('''
    import json
    import jax
    import numpy as np
    from jax.sharding import PartitionSpec as P
    from factstore_jax import sweep
    import tests.test_sweep as t

    assert len(jax.devices()) == 4, jax.devices()
    report = {'devices': len(jax.devices())}
    for b in (6, 8):
      inputs = t._inputs(b)
      out = sweep.map_batched(t._fn, inputs, to_host=False)
      host = sweep.map_batched(t._fn, inputs)
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
        got = sweep.map_batched(t._fn, inputs, chunk_size=chunk,
                                to_host=False)
        report[b]['chunked'][chunk] = {
            'device_set': min(len(v.sharding.device_set)
                              for v in got.values()),
            'top_equal': bool(np.array_equal(np.asarray(got['top']),
                                             ref['top'])),
            'max_err': max(float(np.max(np.abs(np.asarray(got[n]) - ref[n])))
                           for n in ('h', 'norm'))}
    report['cache'] = sweep._compiled.cache_info().misses
    print(json.dumps(report))
''')


def test_map_batched_sharded_equals_unsharded():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join(
                 [REPO] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
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
  out = sweep.map_batched(_fn, inputs)
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
  ref = sweep.map_batched(fn, inputs)
  out = sweep.map_batched(fn, inputs, chunk_size=chunk_size)
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
    out = sweep.map_batched(fn, inputs, static_kwargs={'scale': 2.0})
  np.testing.assert_array_equal(out['y'], inputs['a'] * 2)
  np.testing.assert_array_equal(out['n'], [4, 4, 4])
  assert traces == [2.0]  # traced once for three calls
  sweep.map_batched(fn, inputs, static_kwargs={'scale': 3.0})
  assert traces == [2.0, 3.0]


def test_map_batched_errors():
  ok = {'a': np.zeros((3, 2))}
  with pytest.raises(FactStoreError, match='disagree on the batch size'):
    sweep.map_batched(_fn, {'a': np.zeros((3, 2)), 'b': np.zeros((4,))})
  with pytest.raises(FactStoreError, match='leading batch axis'):
    sweep.map_batched(_fn, {'a': np.zeros((3, 2)), 'b': np.float32(1)})
  with pytest.raises(FactStoreError, match='no array leaves'):
    sweep.map_batched(_fn, {})
  with pytest.raises(FactStoreError, match='empty batch'):
    sweep.map_batched(_fn, {'a': np.zeros((0, 2))})
  with pytest.raises(FactStoreError, match='hashable'):
    sweep.map_batched(_fn, ok, static_kwargs={'steps': [1]})
  for bad in (0, -1, 1.5, True, '2'):
    with pytest.raises(FactStoreError, match='chunk_size'):
      sweep.map_batched(_fn, ok, chunk_size=bad)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('data',))
  with pytest.raises(FactStoreError, match="needs a 'batch' axis"):
    sweep.map_batched(_fn, ok, mesh=mesh)
  with pytest.raises(FactStoreError, match='no devices'):
    sweep.batch_mesh([])
  assert sweep.batch_mesh().axis_names == ('batch',)


# ---------------------------------------------------------------------------
# ResultsTable.
# ---------------------------------------------------------------------------


def test_format_and_parse_values():
  cases = [(3, '3'), (np.int64(3), '3'), (0.1, '0.1'),
           (np.float32(0.5), '0.5'), (jnp.asarray(2), '2'), (True, 'True'),
           (np.bool_(False), 'False'), ('abc', 'abc'), (None, ''),
           (1e-300, '1e-300'), (float('inf'), 'inf')]
  for value, text in cases:
    assert sweep.format_value(value) == text, value
  for value in (3, 0.1, 1 / 3, True, 'abc', None, 1e-300, -2):
    assert sweep.parse_value(sweep.format_value(value)) == value
  with pytest.raises(FactStoreError, match='scalars'):
    sweep.format_value(np.zeros(2))
  with pytest.raises(FactStoreError, match='got list'):
    sweep.format_value([1])


def test_table_round_trip_and_key_matching(tmp_path):
  path = tmp_path / 'r.csv'
  table = sweep.ResultsTable(path, ('n', 'lr', 'name'))
  assert len(table) == 0 and table.rows() == [] and not path.exists()
  table.append({'n': 4, 'lr': 0.1, 'name': 'a', 'acc': 1 / 3})
  table.append({'n': np.int32(8), 'lr': np.float64(1e-3), 'name': 'b',
                'acc': 0.5, 'extra': 'x'})
  table.append({'n': 16, 'lr': 0.1, 'name': 'a', 'acc': float('nan')})
  assert table.columns == ['n', 'lr', 'name', 'acc', 'extra']

  again = sweep.ResultsTable(path, ('n', 'lr', 'name'))
  rows = again.rows()
  assert rows[:2] == [
      {'n': 4, 'lr': 0.1, 'name': 'a', 'acc': 1 / 3, 'extra': None},
      {'n': 8, 'lr': 1e-3, 'name': 'b', 'acc': 0.5, 'extra': 'x'}]
  assert np.isnan(rows[2]['acc'])
  assert again.columns == table.columns
  for t in (table, again):
    assert t.is_done({'n': 4, 'lr': 0.1, 'name': 'a', 'other': 1})
    assert t.is_done({'n': np.int64(8), 'lr': 0.001, 'name': 'b'})
    assert not t.is_done({'n': 4.0, 'lr': 0.1, 'name': 'a'})  # 4 != 4.0
    assert not t.is_done({'n': 4, 'lr': 0.1, 'name': 'b'})
    assert t.get({'n': 8, 'lr': 1e-3, 'name': 'b'})['acc'] == 0.5
    assert t.get({'n': 9, 'lr': 1e-3, 'name': 'b'}) is None
  np.testing.assert_array_equal(again.column('n', int), [4, 8, 16])
  with open(path, newline='') as f:
    assert next(csv.reader(f)) == ['n', 'lr', 'name', 'acc', 'extra']


def test_table_append_is_atomic(tmp_path, monkeypatch):
  path = tmp_path / 'r.csv'
  table = sweep.ResultsTable(path, 'seed')
  for seed in range(3):
    table.append({'seed': seed, 'acc': seed / 10})
  before = path.read_bytes()

  class Crash(Exception):
    pass

  class CrashingWriter(csv.DictWriter):
    """Writes the header and two rows, then dies mid-file."""
    calls = 0

    def writerow(self, row):
      CrashingWriter.calls += 1
      if CrashingWriter.calls > 2:
        raise Crash()
      return super().writerow(row)

  monkeypatch.setattr(sweep.csv, 'DictWriter', CrashingWriter)
  with pytest.raises(Crash):
    table.append({'seed': 3, 'acc': 0.3, 'new': 1})
  monkeypatch.undo()
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ['r.csv']  # no temp file left
  # The table in memory is unchanged too and still appends normally.
  assert len(table) == 3 and 'new' not in table.columns
  table.append({'seed': 3, 'acc': 0.3})
  assert [r['seed'] for r in sweep.ResultsTable(path, 'seed').rows()] == [
      0, 1, 2, 3]


def test_table_errors(tmp_path):
  with pytest.raises(FactStoreError, match='key_fields is empty'):
    sweep.ResultsTable(tmp_path / 'a.csv', ())
  with pytest.raises(FactStoreError, match='duplicate key_fields'):
    sweep.ResultsTable(tmp_path / 'a.csv', ('n', 'n'))
  table = sweep.ResultsTable(tmp_path / 'a.csv', ('n', 'seed'))
  with pytest.raises(FactStoreError, match=r"lacks key field\(s\) \['seed'\]"):
    table.is_done({'n': 1})
  with pytest.raises(FactStoreError, match='lacks key field'):
    table.append({'n': 1, 'acc': 0.5})
  table.append({'n': 1, 'seed': 0})
  with pytest.raises(FactStoreError, match='exists'):
    table.append({'n': 1, 'seed': 0, 'acc': 1.0})
  with pytest.raises(FactStoreError, match='scalars'):
    table.append({'n': 2, 'seed': 0, 'acc': np.zeros(3)})
  with pytest.raises(FactStoreError, match='no column'):
    table.column('acc')
  bad = tmp_path / 'bad.csv'
  bad.write_text('n,acc\n1,0.5\n')
  with pytest.raises(FactStoreError, match=r"lacks key field\(s\) \['seed'\]"):
    sweep.ResultsTable(bad, ('n', 'seed'))
  bad.write_text('n,acc\n1,0.5\n1,0.7\n')
  with pytest.raises(FactStoreError, match='duplicate rows'):
    sweep.ResultsTable(bad, 'n')
  bad.write_text('n,acc\n1,0.5,9\n')
  with pytest.raises(FactStoreError, match='3 values for 2 columns'):
    sweep.ResultsTable(bad, 'n')
  empty = tmp_path / 'empty.csv'
  empty.write_text('')
  assert sweep.ResultsTable(empty, 'n').rows() == []


# ---------------------------------------------------------------------------
# run_sweep.
# ---------------------------------------------------------------------------

CONFIGS = [{'n': n, 'seed': s, 'lr': 0.01} for n in (4, 8) for s in range(3)]


def _result(config):
  return {'acc': config['n'] / (config['seed'] + 3),
          'tag': f"s{config['seed']}"}


class Compute:
  """Counts the configs it computes; raises at config number ``fail_at``."""

  def __init__(self, fail_at=None):
    self.fail_at = fail_at
    self.seen = []
    self.calls = 0

  def __call__(self, group):
    self.calls += 1
    out = []
    for config in group:
      if len(self.seen) == self.fail_at:
        raise RuntimeError('killed')
      self.seen.append((config['n'], config['seed']))
      out.append(_result(config))
    return out


def test_run_sweep_resume_equals_clean_run(tmp_path):
  clean = sweep.run_sweep(CONFIGS, Compute(),
                          sweep.ResultsTable(tmp_path / 'clean.csv',
                                             ('n', 'seed')), progress=False)
  assert clean == [{**c, **_result(c)} for c in CONFIGS]

  path = tmp_path / 'r.csv'
  failing = Compute(fail_at=2)
  with pytest.raises(RuntimeError, match='killed'):
    sweep.run_sweep(CONFIGS, failing, sweep.ResultsTable(path, ('n', 'seed')),
                    progress=False)
  # The two configs finished before the crash are on disk.
  on_disk = sweep.ResultsTable(path, ('n', 'seed')).rows()
  assert on_disk == clean[:2]

  working = Compute()
  rows = sweep.run_sweep(CONFIGS, working,
                         sweep.ResultsTable(path, ('n', 'seed')),
                         progress=False)
  assert working.seen == [(c['n'], c['seed']) for c in CONFIGS[2:]]
  assert rows == clean
  assert sweep.ResultsTable(path, ('n', 'seed')).rows() == clean
  assert (tmp_path / 'r.csv').read_bytes() == (
      tmp_path / 'clean.csv').read_bytes()

  # Everything done: nothing computed, rows in the order asked.
  idle = Compute()
  table = sweep.ResultsTable(path, ('n', 'seed'))
  assert sweep.run_sweep(CONFIGS[::-1], idle, table,
                         progress=False) == clean[::-1]
  assert idle.calls == 0


def test_run_sweep_batches_and_progress(tmp_path, capsys):
  path = tmp_path / 'r.csv'
  table = sweep.ResultsTable(path, ('n', 'seed'))
  table.append({**CONFIGS[0], **_result(CONFIGS[0])})
  compute = Compute()
  rows = sweep.run_sweep(CONFIGS, compute, table, batch_size=2, desc='demo')
  assert compute.calls == 3  # 5 pending configs in groups of 2, 2, 1
  assert rows == [{**c, **_result(c)} for c in CONFIGS]
  err = capsys.readouterr().err
  assert 'demo' in err and '6/6' in err


def test_run_sweep_errors(tmp_path):
  table = sweep.ResultsTable(tmp_path / 'r.csv', ('n', 'seed'))
  run = lambda configs, compute, **kw: sweep.run_sweep(
      configs, compute, table, progress=False, **kw)
  with pytest.raises(FactStoreError, match='lacks key field'):
    run([{'n': 1}], Compute())
  with pytest.raises(FactStoreError, match='duplicate configs 0 and 2'):
    run([{'n': 1, 'seed': 0}, {'n': 2, 'seed': 0}, {'n': 1, 'seed': 0}],
        Compute())
  with pytest.raises(FactStoreError, match='batch_size'):
    run(CONFIGS, Compute(), batch_size=0)
  with pytest.raises(FactStoreError, match='config 0 must be a dict'):
    run([(1, 0)], Compute())
  with pytest.raises(FactStoreError, match='not a dict'):
    run(CONFIGS[:1], lambda group: [0.5])
  with pytest.raises(FactStoreError, match='list of dicts'):
    run(CONFIGS[:1], lambda group: {'acc': 0.5})
  with pytest.raises(FactStoreError, match=r'2 result\(s\) for 1 config'):
    run(CONFIGS[:1], lambda group: [{}, {}])
  with pytest.raises(FactStoreError, match="changes 'seed'"):
    run(CONFIGS[:1], lambda group: [{'seed': 7}])
  assert len(table) == 0  # no bad result reached the file
  assert not (tmp_path / 'r.csv').exists()


def test_expose_cpu_cores_adds_the_flag_once(monkeypatch):
  from factstore_jax.threads import expose_cpu_cores
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1, 2},
                      raising=False)
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_enable_fast_math=false')
  assert expose_cpu_cores() == 3
  assert os.environ['XLA_FLAGS'] == ('--xla_cpu_enable_fast_math=false '
                                     '--xla_force_host_platform_device_count=3')
  assert expose_cpu_cores() == 3  # already there: unchanged
  assert os.environ['XLA_FLAGS'].count('device_count') == 1
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=5')
  assert expose_cpu_cores() == 5
  assert os.environ['XLA_FLAGS'] == '--xla_force_host_platform_device_count=5'
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0},
                      raising=False)
  monkeypatch.delenv('XLA_FLAGS')
  assert expose_cpu_cores() == 1 and 'XLA_FLAGS' not in os.environ
