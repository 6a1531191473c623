r"""Sweep benchmark: many small fact sets in one vmapped call vs a Python loop.

``--num_sets`` (32) random fact sets at ``d = --dim`` (64), ``N = P =
--num_facts`` (512; tied spherical, random permutation), one GD training each
(gated MLP of width ``--width`` = 32, exactly ``--steps`` = 500 full-batch
steps, early stopping off so both sides do identical work):

* ``vmapped``: one :func:`factstore_jax.sharding.map_batched` call (``jit`` of
  ``vmap``, batch axis sharded over all devices);
* ``mapped``: one ``map_batched(..., chunk_size=1)`` call (each device maps
  over its items one at a time, ``lax.map``);
* ``loop``: a Python loop of single jitted calls of the same function.

Two workloads: ``gd`` (the training above: compute-bound, each call already
keeps the cores busy) and ``ridge`` (a Hebbian-ridge MLP of width
``--ridge_width`` built and evaluated on every key: a short call whose
fixed per-call cost matters, as in a capacity search's rounds).

All are compiled before timing; each is timed ``--repeats`` times (best).
The accuracies must agree. Prints and writes
``benchmarks/results/sweep.json``.

``--multiprocess`` instead times ``experiments/capacity_scaling.py`` on a
tiny grid of closed-form and GD cells (``--mp_grid``) as one process pinned
to one core (``taskset -c 0``) and as two ``jax.distributed`` processes
pinned to cores 0 and 1, checks that both give the same rows (all columns
but ``seconds``), and writes ``benchmarks/results/sweep_multiprocess.json``
with both times, their ratio and the CPU time other processes used
meanwhile. Both runs compile from scratch: JAX writes its persistent
compilation cache from process 0 only, and process 1's programs (on its own
device) have other cache keys, so a warm cache would favour the one-process
run. The grid has several seeds per cell so that compute, which the split
halves, outweighs compiling, which each process does for its own cells.

  python benchmarks/sweep.py
  python benchmarks/sweep.py --multiprocess
"""

from __future__ import annotations

import csv
import os
import resource
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from factstore_jax import factsets, sharding, storage, training
from factstore_jax.baselines import hebbian

import common  # benchmarks/common.py

flags.DEFINE_integer('num_sets', 32, 'Fact sets.')
flags.DEFINE_integer('dim', 64, 'd.')
flags.DEFINE_integer('num_facts', 512, 'N = P.')
flags.DEFINE_integer('width', 32, 'Hidden width.')
flags.DEFINE_integer('steps', 500, 'GD steps per fact set.')
flags.DEFINE_integer('repeats', 3, 'Timed runs of each side (best).')
flags.DEFINE_integer('ridge_width', 128, 'Width of the ridge workload.')
flags.DEFINE_string('out', 'benchmarks/results/sweep.json', 'JSON output.')
flags.DEFINE_bool('multiprocess', False,
                  'Time capacity_scaling.py on --mp_grid as 1 process on one '
                  'core vs 2 jax.distributed processes on two cores.')
flags.DEFINE_string(
    'mp_grid', '--dims=16 --alphas=0.25 --seeds=0,1,2,3 '
    '--methods=encoder_decoder,gd --geometries=isotropic,anisotropic '
    '--max_steps=2000 --learning_rate=0.01 --patience=1000 --rel_tol=0.25',
    'capacity_scaling.py flags (space-separated) of the --multiprocess grid.')
flags.DEFINE_list('mp_cores', ['0', '1'],
                  'Cores of the --multiprocess processes (taskset -c).')
flags.DEFINE_string('mp_out', 'benchmarks/results/sweep_multiprocess.json',
                    'JSON output of --multiprocess.')
FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(item, *, width, config):
  key, fs = item
  return training.train_mlp(key, fs, width, config=config).accuracy


def _ridge(item, *, width):
  key, fs = item
  mlp = hebbian.hebbian_mlp(key, fs, width, readout='ridge')
  return storage.evaluate_mlp(mlp, fs).accuracy


def compare(fn, static, keys, sets, stacked) -> dict:
  """Best-of-repeats seconds: one vmapped call, one mapped call, a loop."""
  def vmapped():
    return sharding.map_batched(fn, (keys, stacked), static_kwargs=static)

  def mapped():
    return sharding.map_batched(fn, (keys, stacked), static_kwargs=static,
                             chunk_size=1)

  single = jax.jit(lambda k, fs: fn((k, fs), **static))

  def loop():
    return np.array([float(single(k, fs)) for k, fs in zip(keys, sets)])

  acc_v, acc_m, acc_l = vmapped(), mapped(), loop()  # compile all three
  times = {'vmapped': [], 'mapped': [], 'loop': []}
  for _ in range(FLAGS.repeats):
    for name, run in (('vmapped', vmapped), ('mapped', mapped),
                      ('loop', loop)):
      t0 = time.perf_counter()
      jax.block_until_ready(run())
      times[name].append(time.perf_counter() - t0)
  best = {k: min(v) for k, v in times.items()}
  return dict(seconds=times, best_seconds=best,
              speedup=best['loop'] / best['vmapped'],
              mapped_speedup=best['loop'] / best['mapped'],
              max_accuracy_difference=float(max(
                  np.max(np.abs(np.asarray(acc) - np.asarray(acc_l)))
                  for acc in (acc_v, acc_m))),
              mean_accuracy=float(jnp.mean(jnp.asarray(acc_v))))


def _cpu_seconds() -> tuple[float, float] | None:
  """``(busy seconds of all cores, CPU seconds of this process's finished
  children)``; ``None`` without ``/proc/stat``."""
  try:
    with open('/proc/stat') as f:
      fields = [int(x) for x in f.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  busy = (sum(fields[:3]) + sum(fields[5:7])) / os.sysconf('SC_CLK_TCK')
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  return busy, children.ru_utime + children.ru_stime


def _loadavg() -> list[float] | None:
  try:
    with open('/proc/loadavg') as f:
      return [float(x) for x in f.read().split()[:3]]
  except (OSError, ValueError):
    return None


def run_grid(out_dir: str, num_processes: int, env: dict) -> dict:
  """Runs capacity_scaling.py on ``--mp_grid`` as ``num_processes`` pinned
  processes; returns wall seconds and the other processes' CPU use."""
  script = os.path.join(ROOT, 'experiments', 'capacity_scaling.py')
  extra = [[]]
  if num_processes > 1:
    with socket.socket() as s:
      s.bind(('127.0.0.1', 0))
      address = f'127.0.0.1:{s.getsockname()[1]}'
    extra = [[f'--coordinator_address={address}',
              f'--num_processes={num_processes}', f'--process_id={i}']
             for i in range(num_processes)]
  logs = [open(os.path.join(os.path.dirname(out_dir),
                            f'{os.path.basename(out_dir)}.{i}.log'), 'w+')
          for i in range(num_processes)]
  load0, cpu0 = _loadavg(), _cpu_seconds()
  t0 = time.perf_counter()
  procs = [subprocess.Popen(
      ['taskset', '-c', FLAGS.mp_cores[i], sys.executable, script,
       f'--out_dir={out_dir}', *shlex.split(FLAGS.mp_grid), *extra[i]],
      stdout=subprocess.DEVNULL, stderr=logs[i], env=env)
           for i in range(num_processes)]
  # Reaped one at a time: each one's CPU seconds (RUSAGE_CHILDREN counts
  # reaped children only).
  process_cpu = []
  for p in procs:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    process_cpu.append(after.ru_utime + after.ru_stime - before.ru_utime -
                       before.ru_stime)
  seconds = time.perf_counter() - t0
  cpu1 = _cpu_seconds()
  for p, log in zip(procs, logs):
    log.seek(0)
    err = log.read()
    log.close()
    if p.returncode:
      raise RuntimeError(f'capacity_scaling.py exited {p.returncode}: '
                         f'{err[-2000:]}')
  out = dict(seconds=seconds, process_cpu_seconds=process_cpu,
             loadavg_before=load0, loadavg_after=_loadavg())
  if cpu0 and cpu1:
    ours = cpu1[1] - cpu0[1]
    foreign = max(0.0, (cpu1[0] - cpu0[0]) - ours)
    out.update(own_cpu_seconds=ours, foreign_cpu_seconds=foreign,
               foreign_cores=foreign / seconds)
  return out


def _rows(path: str) -> list[dict]:
  with open(path, newline='') as f:
    return [{k: v for k, v in r.items() if k != 'seconds'}
            for r in csv.DictReader(f)]


def multiprocess() -> None:
  """``--multiprocess``: one pinned process against two."""
  if len(FLAGS.mp_cores) < 2:
    raise app.UsageError('--mp_cores needs two cores')
  tmp = tempfile.mkdtemp(prefix='sweep_multiprocess_')
  try:
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
    env.pop('XLA_FLAGS', None)  # one CPU device per process
    env.pop('JAX_COMPILATION_CACHE_DIR', None)  # both compile from scratch
    one = run_grid(os.path.join(tmp, 'one'), 1, env)
    two = run_grid(os.path.join(tmp, 'two'), 2, env)
    rows_one = _rows(os.path.join(tmp, 'one', 'rows.csv'))
    rows_two = _rows(os.path.join(tmp, 'two', 'rows.csv'))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  same = rows_one == rows_two
  out = dict(grid=shlex.split(FLAGS.mp_grid), cores=FLAGS.mp_cores[:2],
             compilation_cache=False, one_process=one,
             two_processes=two, speedup=one['seconds'] / two['seconds'],
             # Each process is pinned to one core and CPU-bound: on a quiet
             # machine its wall time is about its CPU time.
             cpu_bound_speedup=(one['process_cpu_seconds'][0] /
                                max(two['process_cpu_seconds'])),
             rows=len(rows_one), rows_identical=same,
             machine=common.machine_info(),
             note=('foreign_cores: cores busy with other processes during '
                   'the run (of the machine\'s cores); with any, the ratio '
                   'is not the one a quiet machine gives'))
  common.write_json(FLAGS.mp_out, out)
  print(f"capacity_scaling {FLAGS.mp_grid}: 1 process on core "
        f"{FLAGS.mp_cores[0]} {one['seconds']:.1f} s, 2 processes on cores "
        f"{','.join(FLAGS.mp_cores[:2])} {two['seconds']:.1f} s: "
        f"{out['speedup']:.2f}x (CPU seconds of the slowest process: "
        f"{out['cpu_bound_speedup']:.2f}x); rows identical: {same} ({len(rows_one)} "
        f"rows); other processes used {one.get('foreign_cores', float('nan')):.2f}"
        f" / {two.get('foreign_cores', float('nan')):.2f} cores meanwhile",
        flush=True)
  if not same:
    raise SystemExit('rows differ between 1 and 2 processes')


def main(argv):
  del argv
  if FLAGS.multiprocess:
    multiprocess()
    return
  config = training.TrainConfig(max_steps=FLAGS.steps, early_stop=False)
  keys = jax.random.split(jax.random.key(0), FLAGS.num_sets)
  sets = [factsets.random_factset(jax.random.key(100 + i), FLAGS.num_facts,
                                  FLAGS.dim, tied=True)
          for i in range(FLAGS.num_sets)]
  stacked = factsets.stack_factsets(sets)
  common.wait_for_quiet(120.0, 0.1)
  out = dict(config=dict(num_sets=FLAGS.num_sets, dim=FLAGS.dim,
                         num_facts=FLAGS.num_facts, width=FLAGS.width,
                         steps=FLAGS.steps, ridge_width=FLAGS.ridge_width),
             machine=common.machine_info())
  workloads = {
      'ridge': (_ridge, dict(width=FLAGS.ridge_width)),
      'gd': (_train, dict(width=FLAGS.width, config=config)),
  }
  for name, (fn, static) in workloads.items():
    out[name] = r = compare(fn, static, keys, sets, stacked)
    b = r['best_seconds']
    print(f"{name}: {FLAGS.num_sets} fact sets (d={FLAGS.dim}, "
          f"N={FLAGS.num_facts}): vmapped {b['vmapped']:.2f} s "
          f"({r['speedup']:.1f}x the loop), mapped (chunk_size=1) "
          f"{b['mapped']:.2f} s ({r['mapped_speedup']:.1f}x), loop "
          f"{b['loop']:.2f} s; accuracies differ by at most "
          f"{r['max_accuracy_difference']:.3g}", flush=True)
    common.write_json(FLAGS.out, out)


if __name__ == '__main__':
  app.run(main)
