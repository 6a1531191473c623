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

  python benchmarks/sweep.py
"""

from __future__ import annotations

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
FLAGS = flags.FLAGS


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


def main(argv):
  del argv
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
