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
run. The script deals each cell (its geometries share compiled programs)
to one process (``sweep.deal``), so no program is compiled twice. The grid
has several seeds per cell so that compute outweighs compiling.
``--mp_repeats`` runs several pairs in alternating order (a drift of this
machine's speed, +-20% between runs, then favours neither side) and reports
each pair's ratio and that of the summed times.

  python benchmarks/sweep.py
  python benchmarks/sweep.py --multiprocess --mp_repeats=2
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
    'mp_grid', '--dims=48 --alphas=0.25 --seeds=0,1,2,3,4,5,6,7 '
    '--methods=encoder_decoder,gd --geometries=isotropic,anisotropic '
    '--max_steps=3000 --learning_rate=0.01 --patience=1000 --rel_tol=0.25',
    'capacity_scaling.py flags (space-separated) of the --multiprocess grid.')
flags.DEFINE_integer('mp_repeats', 1,
                     'Pairs of --multiprocess runs; the order alternates '
                     '(1 then 2 processes, 2 then 1, ...) so that a drift '
                     'of the machine\'s speed does not favour either.')
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
    ones, twos, same = [], [], True
    for r in range(FLAGS.mp_repeats):
      for n in ((1, 2) if r % 2 == 0 else (2, 1)):
        out_dir = os.path.join(tmp, f'{n}.{r}')
        (ones if n == 1 else twos).append(run_grid(out_dir, n, env))
      rows_one = _rows(os.path.join(tmp, f'1.{r}', 'rows.csv'))
      same &= rows_one == _rows(os.path.join(tmp, f'2.{r}', 'rows.csv'))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  one_s = [o['seconds'] for o in ones]
  two_s = [t['seconds'] for t in twos]
  speedups = [o / t for o, t in zip(one_s, two_s)]
  out = dict(grid=shlex.split(FLAGS.mp_grid), cores=FLAGS.mp_cores[:2],
             compilation_cache=False, repeats=FLAGS.mp_repeats,
             one_process=ones[0], two_processes=twos[0],
             one_process_runs=ones, two_process_runs=twos,
             speedups=speedups,
             # The ratio of the summed times: each pair weighs as it ran.
             speedup=sum(one_s) / sum(two_s),
             # Each process is pinned to one core and CPU-bound: on a quiet
             # machine its wall time is about its CPU time.
             cpu_bound_speedup=(
                 sum(o['process_cpu_seconds'][0] for o in ones) /
                 sum(max(t['process_cpu_seconds']) for t in twos)),
             rows=len(rows_one), rows_identical=same,
             machine=common.machine_info(),
             note=('foreign_cores: cores busy with other processes during '
                   'the run (of the machine\'s cores); with any, the ratio '
                   'is not the one a quiet machine gives'))
  common.write_json(FLAGS.mp_out, out)
  print(f"capacity_scaling {FLAGS.mp_grid}: 1 process on core "
        f"{FLAGS.mp_cores[0]} {', '.join(f'{t:.1f}' for t in one_s)} s, "
        f"2 processes on cores {','.join(FLAGS.mp_cores[:2])} "
        f"{', '.join(f'{t:.1f}' for t in two_s)} s: {out['speedup']:.2f}x "
        f"(per pair: {', '.join(f'{x:.2f}' for x in speedups)}; CPU seconds "
        f"of the slowest process: {out['cpu_bound_speedup']:.2f}x); rows "
        f"identical: {same} ({len(rows_one)} rows); other processes used "
        f"{max(r.get('foreign_cores', float('nan')) for r in ones + twos):.2f}"
        " cores at most meanwhile", flush=True)
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
