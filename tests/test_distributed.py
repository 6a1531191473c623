"""Multi-process sweeps (jax.distributed): the work split, shard files and
merge in one process with the peers simulated, then real runs of
``experiments/capacity_scaling.py`` as two local CPU processes."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import free_address, subprocess_env

from factstore_jax import distributed, sweep
from factstore_jax.errors import FactStoreError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = ('n', 'seed')
CONFIGS = [{'n': n, 'seed': s} for n in (4, 8, 16) for s in range(3)]


def _result(config):
  return {'acc': config['n'] / (config['seed'] + 3), 'tag': f"s{config['seed']}"}


class Compute:
  """Records the groups it is given."""

  def __init__(self):
    self.groups = []

  def __call__(self, group):
    self.groups.append([(c['n'], c['seed']) for c in group])
    return [_result(c) for c in group]


class Peers:
  """Simulated peers that started together: the k-th ``all_gather`` of each
  simulated process returns the k-th value of the first one to run, once
  per process (they read the same files before anyone wrote)."""

  def __init__(self, num_processes):
    self.num_processes = num_processes
    self.seen = []
    self.calls = 0

  def start(self):
    self.calls = 0

  def __call__(self, value):
    if self.calls == len(self.seen):
      self.seen.append(np.asarray(value))
    value = self.seen[self.calls]
    self.calls += 1
    return np.stack([value] * self.num_processes)


def _as(monkeypatch, process_id, num_processes, gathered=None):
  """Makes this process act as ``process_id`` of ``num_processes``
  (``gathered``: what all_gather returns; by default each its own value)."""
  info = distributed.ProcessInfo(process_id, num_processes, '127.0.0.1:1')
  monkeypatch.setattr(distributed, 'process_info', lambda: info)
  monkeypatch.setattr(distributed, 'barrier', lambda name, **kw: None)
  monkeypatch.setattr(
      distributed, 'all_gather',
      gathered or (lambda v: np.stack([np.asarray(v)] * num_processes)))


def _simulate(monkeypatch, path, **kwargs):
  """``run_sweep(CONFIGS, ...)`` as process 1, then as process 0 (which
  merges) of two simulated peers. Returns ``({pid: Compute}, process 0's
  rows, whether the merged file existed before process 0 ran)``."""
  computed, peers = {}, Peers(2)
  for pid in (1, 0):
    existed = path.exists()
    peers.start()
    with monkeypatch.context() as m:
      _as(m, pid, 2, gathered=peers)
      computed[pid] = Compute()
      rows = sweep.run_sweep(CONFIGS, computed[pid],
                             sweep.ResultsTable(path, KEY), progress=False,
                             **kwargs)
  return computed, rows, existed


# ---------------------------------------------------------------------------
# Split, shards and merge (peers simulated).
# ---------------------------------------------------------------------------


def test_owner_deals_in_snake_order():
  assert [sweep.owner(i, 2) for i in range(8)] == [0, 1, 1, 0, 0, 1, 1, 0]
  assert [sweep.owner(i, 3) for i in range(7)] == [0, 1, 2, 2, 1, 0, 0]
  for n in (1, 2, 5):
    counts = np.bincount([sweep.owner(i, n) for i in range(10 * n)])
    assert counts.tolist() == [10] * n


def test_deal_keeps_an_affinity_on_one_process_while_balanced():
  # No shared affinity: the snake order.
  assert sweep.deal(list(range(8)), 2) == [sweep.owner(i, 2) for i in range(8)]
  # Two cells under two geometries: each cell's groups on one process.
  assert sweep.deal(['ed', 'gd', 'ed', 'gd'], 2) == [0, 1, 0, 1]
  assert sweep.deal([1, 2, 3, 1, 2, 3], 3) == [0, 1, 2, 0, 1, 2]
  # Whole classes in snake order while they fit: (16, ED), (16, GD),
  # (48, ED), (48, GD), (64, ED), (64, GD) under two geometries.
  cells = [(d, m) for d in (16, 48, 64) for m in ('ed', 'gd')] * 2
  owners = sweep.deal(cells, 2)
  assert owners[:6] == owners[6:] == [0, 1, 1, 0, 0, 1]
  # No process takes more than ceil(groups / processes): a class that does
  # not fit is split over the next processes.
  assert sweep.deal(['a', 'a'], 2) == [0, 1]
  assert sweep.deal(['a'] * 3 + ['b'], 2) == [0, 0, 1, 1]
  assert sweep.deal(['a'] * 6, 3) == [0, 0, 1, 1, 2, 2]
  for n in (1, 2, 3, 5):
    for classes in (1, 4, 7):
      owners = sweep.deal([i % classes for i in range(24)], n)
      counts = np.bincount(owners, minlength=n)
      assert counts.max() == -(-24 // n) and counts.sum() == 24


def test_deal_by_cost_places_the_costliest_classes_first():
  # Two sizes of GD and closed-form cells under two geometries; the big GD
  # cell alone is near half the cost: it gets a process to itself, the
  # three other classes go whole to the other one.
  cells = ['gd576', 'ed576', 'gd288', 'ed288'] * 2
  costs = [150, 60, 60, 50] * 2
  owners = sweep.deal(cells, 2, costs)
  assert owners == [0, 1, 1, 1] * 2
  # Counting groups instead splits them 4 : 4 but 320 : 320 is not
  # reachable whole; by count process 0 gets 420 of 640.
  by_count = sweep.deal(cells, 2)
  load = lambda o, p: sum(c for c, q in zip(costs, o) if q == p)
  assert max(load(owners, 0), load(owners, 1)) == 340
  assert max(load(by_count, 0), load(by_count, 1)) > 340
  # A class within an even share stays whole, even past the share (a split
  # would compile its programs twice), and so does one past the share as
  # long as it does not take a process 1.5x past it.
  assert sweep.deal(['x', 'y', 'z', 'z'], 2, [10, 9, 1, 1]) == [0, 1, 1, 1]
  assert sweep.deal(['ed', 'ed', 'gd', 'gd'], 2, [50, 50, 28, 28]) == [
      0, 0, 1, 1]
  # A class costlier than an even share fills the least loaded process up
  # to it and goes on to the next one.
  assert sweep.deal(['a'] * 4 + ['b'], 2, [10, 10, 10, 10, 5]) == [
      0, 0, 1, 1, 0]
  assert sweep.deal(['a'] * 6, 3, [1] * 6) == [0, 0, 1, 1, 2, 2]
  # Zero costs: classes go to the process with fewest groups.
  assert sweep.deal(['a', 'b', 'c', 'd'], 2, [0] * 4) == [0, 1, 0, 1]
  assert sweep.deal([1, 2, 3], 1, [5, 0, 1]) == [0, 0, 0]


@pytest.mark.parametrize('costs', [[1, 2], [1, -1, 1], [1, float('nan'), 1],
                                   [1, float('inf'), 1]])
def test_deal_rejects_bad_costs(costs):
  with pytest.raises(FactStoreError, match='costs must be 3 finite'):
    sweep.deal(['a', 'b', 'c'], 2, costs)


@pytest.mark.parametrize('bad', [-1.0, float('nan'), 'big', None, True])
def test_run_sweep_checks_every_cost_before_computing(tmp_path, bad):
  compute = Compute()
  with pytest.raises(FactStoreError, match='cost must return a finite'):
    sweep.run_sweep(CONFIGS, compute,
                    sweep.ResultsTable(tmp_path / 'rows.csv', KEY),
                    progress=False,
                    cost=lambda c: bad if c['n'] == 16 else 1.0)
  assert compute.groups == [] and not (tmp_path / 'rows.csv').exists()


def _dealt(tmp_path, monkeypatch, **kwargs):
  """``_simulate`` with one config per group and ``kwargs`` (affinity,
  cost); checks its rows and merged file are the one-process run's."""
  clean = tmp_path / 'clean' / 'rows.csv'
  clean.parent.mkdir()
  expected = sweep.run_sweep(CONFIGS, Compute(), sweep.ResultsTable(clean, KEY),
                             batch_size=1, progress=False)
  path = tmp_path / 'rows.csv'
  computed, rows, _ = _simulate(monkeypatch, path, batch_size=1, **kwargs)
  assert rows == expected
  assert path.read_bytes() == clean.read_bytes()
  return computed


def test_cost_changes_the_owner_never_the_rows(tmp_path, monkeypatch):
  computed = _dealt(tmp_path, monkeypatch, affinity=lambda c: c['n'],
                    cost=lambda c: c['n'] ** 2)
  # n = 16 (3 x 256) is more than 1.5 x the share (half of 3 x (16 + 64 +
  # 256)): one group fills process 0 to within a group of the share, the
  # other two go whole to process 1; n = 8 and n = 4 then go whole to
  # process 0 (496 : 512).
  assert computed[0].groups == [[(4, 0)], [(4, 1)], [(4, 2)], [(8, 0)],
                                [(8, 1)], [(8, 2)], [(16, 0)]]
  assert computed[1].groups == [[(16, 1)], [(16, 2)]]


def test_affinity_changes_the_owner_never_the_rows(tmp_path, monkeypatch):
  computed = _dealt(tmp_path, monkeypatch, affinity=lambda c: c['seed'])
  # Seed 0 on process 0, seed 1 on process 1; seed 2 fills their room
  # (at most 5 groups each) in snake order: 2 on process 1, 1 on process 0.
  assert computed[0].groups == [[(4, 0)], [(8, 0)], [(16, 0)], [(16, 2)]]
  assert computed[1].groups == [[(4, 1)], [(4, 2)], [(8, 1)], [(8, 2)],
                                [(16, 1)]]


def test_shard_paths(tmp_path):
  path = tmp_path / 'rows.csv'
  assert sweep.shard_path(path, 3) == str(tmp_path / 'rows.p3.csv')
  for name in ('rows.p10.csv', 'rows.p2.csv', 'rows.px.csv', 'other.p0.csv',
               'rows.p1.csv.tmp', 'rows.csv'):
    (tmp_path / name).write_text('')
  assert sweep.shard_paths(path) == [str(tmp_path / 'rows.p2.csv'),
                                     str(tmp_path / 'rows.p10.csv')]


def test_two_processes_split_the_groups_and_merge_to_the_one_process_file(
    tmp_path, monkeypatch):
  clean = tmp_path / 'clean' / 'rows.csv'
  clean.parent.mkdir()
  one = Compute()
  expected = sweep.run_sweep(CONFIGS, one, sweep.ResultsTable(clean, KEY),
                             batch_size=2, progress=False)

  path = tmp_path / 'rows.csv'
  # Process 1 finishes first; process 0 merges.
  computed, rows, existed = _simulate(monkeypatch, path, batch_size=2)
  assert not existed  # only process 0 writes the merged file
  # Groups of the one-process run, dealt 0, 1, 1, 0, 0.
  assert computed[0].groups == [one.groups[i] for i in (0, 3, 4)]
  assert computed[1].groups == [one.groups[i] for i in (1, 2)]
  assert rows == expected
  assert path.read_bytes() == clean.read_bytes()
  for pid in (0, 1):
    shard = sweep.ResultsTable(sweep.shard_path(path, pid), KEY).rows()
    assert [(r['n'], r['seed']) for r in shard] == [
        k for g in computed[pid].groups for k in g]

  # Everything done: a re-run on three processes computes nothing.
  peers = Peers(3)
  for pid in (2, 1, 0):
    peers.start()
    with monkeypatch.context() as m:
      _as(m, pid, 3, gathered=peers)
      idle = Compute()
      assert sweep.run_sweep(CONFIGS, idle, sweep.ResultsTable(path, KEY),
                             batch_size=2, progress=False) == expected
      assert idle.groups == []


def test_resume_reads_every_shard_and_one_process_merges_them(tmp_path):
  path = tmp_path / 'rows.csv'
  table = sweep.ResultsTable(path, KEY)
  table.append({**CONFIGS[0], **_result(CONFIGS[0])})
  # Shards of an earlier run (process 1's row also reached rows.csv: kept once).
  for pid, indices in ((0, (4, 2)), (1, (0, 7))):
    shard = sweep.ResultsTable(sweep.shard_path(path, pid), KEY)
    for i in indices:
      shard.append({**CONFIGS[i], **_result(CONFIGS[i]), 'seconds': pid})
  compute = Compute()
  rows = sweep.run_sweep(CONFIGS, compute, sweep.ResultsTable(path, KEY),
                         progress=False)
  done = {(CONFIGS[i]['n'], CONFIGS[i]['seed']) for i in (0, 2, 4, 7)}
  assert [k for g in compute.groups for k in g] == [
      (c['n'], c['seed']) for c in CONFIGS if (c['n'], c['seed']) not in done]
  merged = sweep.ResultsTable(path, KEY).rows()
  assert len(merged) == len(CONFIGS)
  # rows.csv's row first, then the shards' in config order, then the rest.
  assert [(r['n'], r['seed']) for r in merged[:4]] == [
      (CONFIGS[i]['n'], CONFIGS[i]['seed']) for i in (0, 2, 4, 7)]
  assert merged[0]['seconds'] is None  # the file's row won over the shard's
  assert [r['seconds'] for r in merged[1:4]] == [0, 0, 1]
  assert rows == [sweep.ResultsTable(path, KEY).get(c) for c in CONFIGS]


def test_merge_only_computes_nothing(tmp_path, monkeypatch):
  path = tmp_path / 'rows.csv'
  shard = sweep.ResultsTable(sweep.shard_path(path, 1), KEY)
  for c in CONFIGS[3:5]:
    shard.append({**c, **_result(c)})
  boom = lambda group: pytest.fail('merge_only computed')
  with monkeypatch.context() as m:
    _as(m, 1, 2)
    sweep.run_sweep(CONFIGS, boom, sweep.ResultsTable(path, KEY),
                    merge_only=True, progress=False)
  assert not path.exists()
  rows = sweep.run_sweep(CONFIGS, boom, sweep.ResultsTable(path, KEY),
                         merge_only=True, progress=False)
  assert rows == [{**c, **_result(c)} for c in CONFIGS[3:5]]
  assert sweep.ResultsTable(path, KEY).rows() == rows
  assert sweep.merge_shards(sweep.ResultsTable(path, KEY)) == 0


def test_processes_with_different_grids_refuse(tmp_path, monkeypatch):
  def disagree(value):
    value = np.asarray(value)
    return np.stack([value, value + 1])
  _as(monkeypatch, 0, 2, gathered=disagree)
  with pytest.raises(distributed.DistributedError,
                     match=r'process 0 of 2 \(coordinator 127.0.0.1:1\): '
                     'the processes were given different configs'):
    sweep.run_sweep(CONFIGS, Compute(),
                    sweep.ResultsTable(tmp_path / 'r.csv', KEY),
                    progress=False)


def test_process_table_is_a_shard_under_distributed(tmp_path, monkeypatch):
  path = tmp_path / 'grid.csv'
  assert sweep.process_table(path, KEY).path == str(path)
  _as(monkeypatch, 1, 2)
  assert sweep.process_table(path, KEY).path == str(tmp_path / 'grid.p1.csv')


def test_initialize_arguments():
  # No arguments: one process, nothing started (JAX stays uninitialised).
  assert distributed.initialize_distributed() == distributed.ProcessInfo(
      0, 1, None)
  assert distributed.process_info().num_processes == 1
  with pytest.raises(FactStoreError, match='num_processes, process_id '
                     'missing.*distributed_auto'):
    distributed.initialize_distributed('127.0.0.1:1234')
  with pytest.raises(FactStoreError, match='host:port'):
    distributed.initialize_distributed('localhost', 2, 0)
  with pytest.raises(FactStoreError, match='port in 1..65535'):
    distributed.initialize_distributed('localhost:0', 2, 0)
  with pytest.raises(FactStoreError, match='process_id must be < '):
    distributed.initialize_distributed('localhost:1234', 2, 2)
  with pytest.raises(FactStoreError, match='num_processes must be an int'):
    distributed.initialize_distributed('localhost:1234', 0, 0)
  with pytest.raises(FactStoreError, match='timeout_s'):
    distributed.initialize_distributed('localhost:1234', 2, 0, timeout_s=0)


# ---------------------------------------------------------------------------
# Real processes.
# ---------------------------------------------------------------------------

# Closed-form and GD cells, one group each (one seed): process 0 computes
# groups 0 and 3, process 1 groups 1 and 2.
GRID = ['--dims=16', '--alphas=0.125', '--seeds=0',
        '--methods=gd,hebbian_ridge', '--geometries=isotropic,anisotropic',
        '--max_steps=200', '--learning_rate=0.01', '--patience=100',
        '--rel_tol=0.5']


_STARTED = []


@pytest.fixture(autouse=True)
def _end_started_processes():
  """Kills (by pid) what a test started and left running."""
  yield
  while _STARTED:
    proc = _STARTED.pop()
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def _start(out_dir, *flags):
  env = subprocess_env()  # one device per process
  proc = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, 'experiments', 'capacity_scaling.py'),
       f'--out_dir={out_dir}', *GRID, *flags],
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
  _STARTED.append(proc)
  return proc


def _start_two(out_dir, *flags):
  address = free_address()
  return [_start(out_dir, f'--coordinator_address={address}',
                 '--num_processes=2', f'--process_id={i}', *flags)
          for i in (0, 1)]


def _finish(proc, timeout=300):
  _, err = proc.communicate(timeout=timeout)
  return proc.returncode, err


def _rows(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def _drop_seconds(rows):
  return [{k: v for k, v in r.items() if k != 'seconds'} for r in rows]


def test_two_processes_give_the_one_process_rows(tmp_path):
  # The two processes run first: the one-process run then finds every
  # program in the persistent compilation cache (process 0 compiled each
  # method's widths on device 0). The other way round, process 1 (device
  # 1) misses the cache and compiles its half again.
  procs = _start_two(tmp_path / 'two')
  for proc in procs:
    rc, err = _finish(proc)
    assert rc == 0, err[-2000:]
  one = _start(tmp_path / 'one')
  rc, err = _finish(one)
  assert rc == 0, err[-2000:]
  expected = _rows(tmp_path / 'one' / 'rows.csv')
  assert len(expected) == 4
  merged = _rows(tmp_path / 'two' / 'rows.csv')
  # Same keys, same order, same values (accuracies bit for bit); only the
  # timings differ.
  assert _drop_seconds(merged) == _drop_seconds(expected)
  shards = [_rows(tmp_path / 'two' / f'rows.p{i}.csv') for i in (0, 1)]
  assert [len(s) for s in shards] == [2, 2]
  assert sorted(r['method'] + r['geometry'] for s in shards for r in s) == (
      sorted(r['method'] + r['geometry'] for r in expected))
  # Only process 0 wrote the report.
  assert (tmp_path / 'two' / 'summary.md').exists()


def test_a_killed_process_loses_no_finished_row(tmp_path):
  procs = _start_two(tmp_path, '--distributed_heartbeat_timeout=3')
  shard1 = tmp_path / 'rows.p1.csv'
  deadline = time.monotonic() + 100
  while not (shard1.exists() and len(_rows(shard1)) >= 1):
    assert procs[1].poll() is None, procs[1].stderr.read()[-2000:]
    assert time.monotonic() < deadline, 'process 1 finished no row'
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGKILL)
  procs[1].wait()
  # Its peer gone, process 0 ends on its own (JAX's heartbeat timeout, or
  # our barrier), not successfully.
  rc, _ = _finish(procs[0], timeout=60)
  assert rc != 0
  finished = {}
  for path in sweep.shard_paths(tmp_path / 'rows.csv'):
    for r in _rows(path):
      finished[(r['geometry'], r['method'])] = r
  assert 1 <= len(finished) < 4
  # Rerun on one process: it computes only the rest.
  rc, err = _finish(_start(tmp_path))
  assert rc == 0, err[-2000:]
  merged = _rows(tmp_path / 'rows.csv')
  keys = [(r['geometry'], r['method']) for r in merged]
  assert len(keys) == len(set(keys)) == 4
  for r in merged:
    if (r['geometry'], r['method']) in finished:
      assert r == finished[(r['geometry'], r['method'])]  # not recomputed


def test_unreachable_coordinator_is_one_clean_line(tmp_path):
  address = free_address()  # nothing listens there
  start = time.monotonic()
  proc = _start(tmp_path, f'--coordinator_address={address}',
                '--num_processes=2', '--process_id=1',
                '--distributed_timeout=3')
  rc, err = _finish(proc, timeout=60)
  assert time.monotonic() - start < 60
  assert rc == 1
  lines = [line for line in err.splitlines() if line.startswith('factstore:')]
  assert len(lines) == 1, err[-2000:]
  assert address in lines[0] and 'process 1 of 2' in lines[0]
  assert 'within 3 s' in lines[0] and 'Traceback' not in err
  assert not os.path.exists(tmp_path / 'rows.csv')


def test_some_distributed_flags_without_auto_is_a_usage_error(tmp_path):
  proc = _start(tmp_path, '--coordinator_address=127.0.0.1:1234')
  rc, err = _finish(proc, timeout=60)
  assert rc != 0
  assert 'num_processes, process_id missing' in err
