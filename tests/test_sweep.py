"""Tests of the sweep runner: the results table and resumable sweeps."""

from __future__ import annotations

import csv
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from factstore_jax import sweep
from factstore_jax.errors import FactStoreError

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


def test_table_update_rewrites_the_named_rows_once(tmp_path, monkeypatch):
  path = tmp_path / 'r.csv'
  table = sweep.ResultsTable(path, ('n', 'seed'))
  for seed in range(3):
    table.append({'n': 4, 'seed': seed, 'acc': seed / 10})
  writes = []
  write = table._write
  monkeypatch.setattr(table, '_write',
                      lambda *a: (writes.append(1), write(*a)))
  table.update([({'n': 4, 'seed': 1, 'other': 'x'}, {'acc': 0.9, 'note': 'y'}),
                ({'n': 4, 'seed': 2}, {'acc': 0.7}),
                ({'n': 4, 'seed': 2}, {'note': 'z'})])
  assert len(writes) == 1  # one rewrite for the three changes
  assert table.columns == ['n', 'seed', 'acc', 'note']
  for t in (table, sweep.ResultsTable(path, ('n', 'seed'))):
    assert [r['acc'] for r in t.rows()] == [0.0, 0.9, 0.7]
    assert [r['note'] for r in t.rows()] == [None, 'y', 'z']
  table.update([])  # nothing to change: nothing written
  table.update([({'n': 4, 'seed': 0}, {'acc': 0.0})])  # same value
  assert len(writes) == 1
  before = path.read_bytes()
  # A bad pair anywhere in the batch: nothing written, the table unchanged.
  with pytest.raises(FactStoreError, match='no row with key'):
    table.update([({'n': 4, 'seed': 0}, {'acc': 0.5}),
                  ({'n': 4, 'seed': 7}, {'acc': 1.0})])
  with pytest.raises(FactStoreError, match=r"key field\(s\) \['seed'\]"):
    table.update([({'n': 4, 'seed': 0}, {'acc': 0.5}),
                  ({'n': 4, 'seed': 0}, {'seed': 5})])
  assert path.read_bytes() == before and len(writes) == 1
  assert [r['acc'] for r in table.rows()] == [0.0, 0.9, 0.7]
  assert [r['seed'] for r in sweep.ResultsTable(path, ('n', 'seed')).rows()
          ] == [0, 1, 2]


def test_recorded_seconds_of_a_matching_row_else_none(tmp_path):
  table = sweep.ResultsTable(tmp_path / 'r.csv', ('n', 'seed'))
  table.append({'n': 4, 'seed': 0, 'steps': 100, 'seconds': 12.5})
  table.append({'n': 4, 'seed': 1, 'steps': 100})  # no seconds
  assert sweep.recorded_seconds(table, {'n': 4, 'seed': 0, 'x': 1}) == 12.5
  assert sweep.recorded_seconds(table, {'n': 4, 'seed': 0},
                                {'steps': 100}) == 12.5
  assert sweep.recorded_seconds(table, {'n': 4, 'seed': 0},
                                {'steps': 200}) is None  # another budget
  assert sweep.recorded_seconds(table, {'n': 4, 'seed': 0},
                                {'other': 1}) is None    # column absent
  assert sweep.recorded_seconds(table, {'n': 4, 'seed': 1}) is None
  assert sweep.recorded_seconds(table, {'n': 8, 'seed': 0}) is None
  empty = sweep.ResultsTable(tmp_path / 'absent.csv', ('n', 'seed'))
  assert sweep.recorded_seconds(empty, {'n': 4, 'seed': 0}) is None


def test_reference_rows_reads_a_file_once(tmp_path):
  path = str(tmp_path / 'r.csv')
  sweep.ResultsTable(path, ('n',)).append({'n': 4, 'seconds': 3.0})
  first = sweep.reference_rows(path, ('n',))
  assert first.get({'n': 4})['seconds'] == 3.0
  sweep.ResultsTable(path, ('n',)).append({'n': 8, 'seconds': 5.0})
  again = sweep.reference_rows(path, ('n',))
  assert again is first and len(again) == 1  # not read a second time
  assert len(sweep.reference_rows(str(tmp_path / 'absent.csv'), ('n',))) == 0


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


# ---------------------------------------------------------------------------
# Releasing compiled programs (the memory-map limit).
# ---------------------------------------------------------------------------


def _cached_program():
  f = jax.jit(lambda x: x + 1)
  f(jnp.ones(3))
  assert f._cache_size() == 1
  return f


def test_release_compiled_clears_jax_caches_past_the_fraction(monkeypatch):
  f = _cached_program()
  monkeypatch.setattr(sweep, 'memory_maps', lambda: (30_000, 65_530))
  assert not sweep.release_compiled()          # 46% < 50%: kept
  assert f._cache_size() == 1
  assert sweep.release_compiled(0.4)           # 46% >= 40%: cleared
  assert f._cache_size() == 0
  f = _cached_program()
  monkeypatch.setattr(sweep, 'memory_maps', lambda: (40_000, 65_530))
  assert sweep.release_compiled()
  assert f._cache_size() == 0
  # Where the system does not say (not Linux) nothing is cleared.
  f = _cached_program()
  monkeypatch.setattr(sweep, 'memory_maps', lambda: None)
  assert not sweep.release_compiled(1e-9)
  assert f._cache_size() == 1


@pytest.mark.parametrize('fraction', [0, -0.5, 1.5, float('nan')])
def test_release_compiled_rejects_a_bad_fraction(fraction):
  with pytest.raises(FactStoreError, match=r'fraction must be in \(0, 1\]'):
    sweep.release_compiled(fraction)


@pytest.mark.skipif(not sys.platform.startswith('linux'),
                    reason='memory maps are read from /proc (Linux)')
def test_release_compiled_gives_back_memory_maps():
  # Compiled programs hold memory maps; clearing the caches returns them.
  fns = [jax.jit(lambda x, k=k: x * k) for k in range(40)]
  before = sweep.memory_maps()
  for n, f in enumerate(fns):
    f(jnp.ones(n + 1))
  grown = sweep.memory_maps()
  assert before[1] == grown[1] > 0
  assert grown[0] > before[0] + 40
  assert sweep.release_compiled(1e-9)
  assert sweep.memory_maps()[0] < grown[0] - 40


def test_run_sweep_releases_compiled_programs_after_each_group(
    tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(sweep, 'release_compiled',
                      lambda: calls.append(len(table)) or False)
  table = sweep.ResultsTable(tmp_path / 'r.csv', 'n')
  sweep.run_sweep([{'n': n} for n in range(5)],
                  lambda g: [{'sq': c['n'] ** 2} for c in g], table,
                  batch_size=2, progress=False)
  # After each of the 3 groups, with its rows already on disk.
  assert calls == [2, 4, 5]
  assert [r['sq'] for r in table.rows()] == [0, 1, 4, 9, 16]
