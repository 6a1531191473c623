r"""Decodability solver: this checkout against another, same values, one run.

The table: ``P = --num_values`` values uniform on the sphere in ``d = --dim``
(512), projected to ``m`` (each of ``--code_dims``) by the construction's
Gaussian JL decoder, exactly the table ``construct`` solves at 2^20 facts
(``benchmarks/million.py``). Each entry of ``--pythonpaths`` (``.`` = this
checkout; another path, e.g. a ``git worktree`` of an older commit) solves
the same table in a fresh subprocess with the CPU cores exposed as devices
(``threads.expose_cpu_cores``, as the CLI and ``construct`` run it), at the
same ``tol``; the subprocess records its wall time (compile included, one
cold call), the CPU time other processes took meanwhile, and writes ``rho`` and the dual bound. The parent checks that
the two certificates agree (each run's certified ``rho`` is at most the
other's dual bound) and reports the time ratio, the new solver's pass
GFLOP/s (lower bound: one pool pass, ``2 P m`` per value, and one
certification pass, ``4 P m``) and its fraction of the float32 matmul peak
measured in the same subprocess.

``--stream_size`` and ``--floor`` solve as ``construct`` does (2,048 values
per call, floor 0.02); ``--warm_repeats`` also times calls after the cold
one, without compiling.

Usage::

  git worktree add /tmp/old_66bcaea 66bcaea
  python benchmarks/decodability.py --pythonpaths=.,/tmp/old_66bcaea \
      --out=benchmarks/results/decodability.json
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

import common  # benchmarks/common.py (the script's folder is on sys.path)

FLAGS = flags.FLAGS
flags.DEFINE_list('pythonpaths', ['.'], 'Library checkouts to compare.')
flags.DEFINE_integer('num_values', 65536, 'Number of values P.')
flags.DEFINE_integer('dim', 512, 'Value dimension before projection.')
flags.DEFINE_list('code_dims', ['64'], 'Projected dimensions m.')
flags.DEFINE_integer('num_solve', 0,
                     'Solve only the first values (0: all P); every solve '
                     'is against all P competitors.')
flags.DEFINE_float('tol', 1e-3, 'Certificate gap target of both solvers.')
flags.DEFINE_float('rel_tol', 0.0, 'Relative certificate gap (0: tol only).')
flags.DEFINE_float('floor', 0.0, 'Decodability floor (construct uses 0.02).')
flags.DEFINE_integer('stream_size', 0,
                     'Values per jitted call, as construct streams them '
                     '(2,048 in benchmarks/million.py; 0: one call).')
flags.DEFINE_integer('warm_repeats', 0,
                     'Calls timed after the cold one (best reported): the '
                     'solver without its compile.')
flags.DEFINE_integer('seed', 0, 'Seed of the values and the decoder.')
flags.DEFINE_string('out', 'benchmarks/results/decodability.json',
                    'JSON output.')
flags.DEFINE_string('child', None, 'Internal: solve and write this .npz.')

_CHILD_FLAGS = ('num_values', 'dim', 'code_dims', 'num_solve', 'tol', 'seed',
                'floor', 'stream_size', 'warm_repeats', 'rel_tol')


def table(num_values: int, dim: int, code_dim: int, seed: int):
  """The projected value table (the same in every checkout)."""
  import jax  # pylint: disable=g-import-not-at-top
  from factstore_jax.constructions import decoders  # pylint: disable=g-import-not-at-top
  from factstore_jax.factsets import sample_sphere  # pylint: disable=g-import-not-at-top
  key_values, key_decoder = jax.random.split(jax.random.key(seed))
  values = sample_sphere(key_values, num_values, dim)
  decoder = decoders.jl_decoder(key_decoder, dim, code_dim, values.dtype)
  return decoders.project_values(values, decoder)


def child(path: str) -> None:
  """Solves each table once (cold) and writes rho, dual bound and times."""
  from factstore_jax import threads  # pylint: disable=g-import-not-at-top
  threads.expose_cpu_cores()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from factstore_jax.decodability import decodability  # pylint: disable=g-import-not-at-top
  out, info = {}, {'devices': len(jax.devices()),
                   'matmul_peak': common.matmul_peak(2048, 3)}
  for m in map(int, FLAGS.code_dims):
    values = jax.block_until_ready(
        table(FLAGS.num_values, FLAGS.dim, m, FLAGS.seed))
    indices = (jnp.arange(FLAGS.num_solve) if FLAGS.num_solve else None)
    # Only the options set (older checkouts may lack them).
    options = dict(tol=FLAGS.tol, indices=indices)
    if FLAGS.floor:
      options['floor'] = FLAGS.floor
    if FLAGS.rel_tol:
      options['rel_tol'] = FLAGS.rel_tol
    if FLAGS.stream_size:
      options['stream_size'] = FLAGS.stream_size
    solve = lambda: jax.block_until_ready(decodability(values, **options))
    with common.ForeignCpu() as foreign:
      start = time.perf_counter()
      result = solve()
      seconds = time.perf_counter() - start
      warm = []
      for _ in range(FLAGS.warm_repeats):
        start = time.perf_counter()
        solve()
        warm.append(time.perf_counter() - start)
    if warm:
      info[f'warm_seconds_{m}'] = min(warm)
    info[f'foreign_cpu_{m}'] = foreign.as_dict()
    out[f'rho_{m}'] = np.asarray(result.rho)
    out[f'dual_{m}'] = np.asarray(result.dual_bound)
    info[f'seconds_{m}'] = seconds
    print(f'm={m}: {seconds:.1f} s', file=sys.stderr, flush=True)
  np.savez(path, **out)
  print(json.dumps(info))


def run_checkout(pythonpath: str, tmp: str, index: int) -> dict:
  path = os.path.join(tmp, f'run{index}.npz')
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)  # the child exposes the cores itself
  args = [f'--{name}={",".join(map(str, v)) if isinstance(v, list) else v}'
          for name in _CHILD_FLAGS for v in [getattr(FLAGS, name)]]
  run = common.run_checkout(
      pythonpath, [os.path.abspath(__file__), f'--child={path}', *args],
      'decodability', env=env)
  return dict(run, arrays=dict(np.load(path)))


def main(argv):
  del argv
  if FLAGS.child:
    child(FLAGS.child)
    return
  with tempfile.TemporaryDirectory() as tmp:
    runs = [run_checkout(p, tmp, i) for i, p in enumerate(FLAGS.pythonpaths)]
  p = FLAGS.num_values
  solved = FLAGS.num_solve or p
  rows = []
  for m in map(int, FLAGS.code_dims):
    row = {'code_dim': m, 'num_values': p, 'num_solved': solved,
           'seconds': [r[f'seconds_{m}'] for r in runs]}
    if FLAGS.warm_repeats:
      row['warm_seconds'] = [r[f'warm_seconds_{m}'] for r in runs]
    first = runs[0]
    flop = solved * 6.0 * p * m
    row['new_pass_gflop_lower_bound'] = flop / 1e9
    row['new_gflops'] = flop / row['seconds'][0] / 1e9
    row['new_fraction_of_peak'] = (row['new_gflops'] /
                                   first['matmul_peak']['gflops'])
    for r in runs[1:]:
      a, b = first['arrays'], r['arrays']
      row.setdefault('speedup_vs', []).append(
          r[f'seconds_{m}'] / first[f'seconds_{m}'])
      row.setdefault('certificates_agree', []).append(bool(
          np.all(a[f'rho_{m}'] <= b[f'dual_{m}'] + 1e-6) and
          np.all(b[f'rho_{m}'] <= a[f'dual_{m}'] + 1e-6)))
      row.setdefault('max_abs_rho_difference', []).append(float(
          np.max(np.abs(a[f'rho_{m}'] - b[f'rho_{m}']))))
    row['max_gap'] = [float(np.max(r['arrays'][f'dual_{m}'] -
                                   r['arrays'][f'rho_{m}'])) for r in runs]
    row['min_rho'] = [float(np.min(r['arrays'][f'rho_{m}'])) for r in runs]
    row['foreign_cpu'] = [r[f'foreign_cpu_{m}'] for r in runs]
    rows.append(row)
    print(json.dumps(row), flush=True)
  result = dict(
      benchmark='decodability', machine=common.machine_info(),
      config={k: getattr(FLAGS, k) for k in _CHILD_FLAGS},
      checkouts=[{k: r[k] for k in ('pythonpath', 'commit', 'devices',
                                    'matmul_peak')} for r in runs],
      rows=rows)
  common.write_json(FLAGS.out, result)


if __name__ == '__main__':
  app.run(main)
