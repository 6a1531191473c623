r"""GD benchmark: step throughput vs the fp32 roofline, and the cost of W*.

At ``d = --dim`` (128), ``N = P = --num_facts`` (2048, tied spherical keys and
values, random permutation), fp32, full batch:

* **Steps/s** of :func:`factstore_jax.training.fit` on a random gated MLP of
  hidden width ``--width`` (64; identity gate, no biases): ``--steps`` steps
  with early stopping off, timed from call to ready results (the final storage
  evaluation included), best of ``--repeats``. FLOPs per step:
  :func:`training.step_flops` (matmuls a step needs: forward, gradients of the
  weights only, logits in the cheaper association). Roofline fraction =
  achieved GFLOP/s / the peak of a jitted 2048^3 fp32 matmul, measured
  interleaved with the steps (best of each).
* **W\*** (smallest width storing every fact, one seed) two ways:
  ``ours`` = :func:`factstore_jax.methods.find_capacity` (GD with early stop
  at 100%, plateau stop after ``patience`` steps without progress, geometric
  bracketing from a size-based guess, integer search that stops once its
  bracket is within ``--rel_tol`` of W*);
  ``plain`` = bisection on ``[1, --max_width]`` that trains every candidate
  for the full 10,000 steps (early stopping off) and tests its final
  accuracy. Same initialisation (key), same schedule. Both wall times, both
  W*, the speed-up and the relative difference are recorded.

Prints a table and writes ``benchmarks/results/gd.json`` (atomically).

  python benchmarks/gd.py                    # everything (~25 min on 2 cores)
  python benchmarks/gd.py --skip_plain       # throughput + our W* only
"""

from __future__ import annotations

import time

import jax
from absl import app, flags

from factstore_jax import factsets, training
from factstore_jax.capacity import methods
from factstore_jax import mlp as mlp_lib

import common  # benchmarks/common.py

flags.DEFINE_integer('dim', 128, 'd.')
flags.DEFINE_integer('num_facts', 2048, 'N = P.')
flags.DEFINE_integer('width', 64, 'Hidden width for the throughput run.')
flags.DEFINE_integer('steps', 300, 'Steps per throughput run.')
flags.DEFINE_integer('repeats', 4, 'Throughput runs (best).')
flags.DEFINE_integer('max_width', 128, 'Upper end of both W* searches.')
flags.DEFINE_integer('seed', 0, 'Seed of the fact set and the init.')
flags.DEFINE_float('rel_tol', 0.1,
                   'Our search stops when its bracket (lo, hi] is this narrow '
                   '(relative to hi): W* is then within this of the exact '
                   'smallest passing width (the acceptance allows 10%).')
flags.DEFINE_bool('skip_plain', False, 'Skip the plain-bisection baseline.')
flags.DEFINE_enum('compute_dtype', None, ['bfloat16', 'float32'],
                  'TrainConfig.compute_dtype of every run (None: fp32).')
flags.DEFINE_string('out', 'benchmarks/results/gd.json', 'JSON output.')
FLAGS = flags.FLAGS


def throughput(fs) -> dict:
  d, n = FLAGS.dim, FLAGS.num_facts
  model = mlp_lib.init_mlp(jax.random.key(FLAGS.seed), d, FLAGS.width)
  config = training.TrainConfig(max_steps=FLAGS.steps, patience=None,
                                target_accuracy=1.0,
                                compute_dtype=FLAGS.compute_dtype)
  jax.block_until_ready(training.fit(model, fs, config=config))  # compile
  flops = training.step_flops(n, d, FLAGS.width, n)
  runs = []
  for _ in range(FLAGS.repeats):
    peak = common.matmul_peak(2048, 3)['gflops']
    with common.ForeignCpu() as foreign:
      t0 = time.perf_counter()
      result = jax.block_until_ready(training.fit(model, fs, config=config))
      seconds = time.perf_counter() - t0
    steps = int(result.steps)
    runs.append(dict(peak_gflops=peak, steps=steps, seconds=seconds,
                     steps_per_s=steps / seconds,
                     gflops=steps * flops / seconds / 1e9,
                     foreign_fraction=foreign.fraction))
  best_peak = max(r['peak_gflops'] for r in runs)
  best = max(runs, key=lambda r: r['steps_per_s'])
  return dict(flops_per_step=flops, runs=runs, peak_gflops=best_peak,
              steps_per_s=best['steps_per_s'], gflops=best['gflops'],
              roofline_fraction=best['gflops'] / best_peak)


def ours(fs) -> dict:
  key = jax.random.key(FLAGS.seed)
  t0 = time.perf_counter()
  options = methods.MethodOptions(
      train=training.TrainConfig(compute_dtype=FLAGS.compute_dtype))
  cap = methods.find_capacity('gd', [key], [fs], max_width=FLAGS.max_width,
                              rel_tol=FLAGS.rel_tol, options=options)[0]
  return dict(seconds=time.perf_counter() - t0, width=cap.width,
              num_params=cap.num_params, tested=cap.tested,
              rounds=cap.rounds)


def plain(fs) -> dict:
  """Bisection on [1, max_width]; every candidate trains 10,000 steps."""
  key = jax.random.key(FLAGS.seed)
  config = training.TrainConfig(max_steps=10_000, early_stop=False,
                                compute_dtype=FLAGS.compute_dtype)
  tested = {}

  def passes(width: int) -> bool:
    result = training.train_mlp(key, fs, width, config=config)
    tested[width] = float(result.accuracy)
    return tested[width] >= 1.0

  t0 = time.perf_counter()
  lo, hi = 0, FLAGS.max_width          # lo fails (0 by convention)
  if not passes(hi):
    return dict(seconds=time.perf_counter() - t0, width=None, tested=tested)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if passes(mid):
      hi = mid
    else:
      lo = mid
  return dict(seconds=time.perf_counter() - t0, width=hi,
              num_params=methods.width_params('gd', FLAGS.dim, hi),
              tested=tested)


def main(argv):
  del argv
  d, n = FLAGS.dim, FLAGS.num_facts
  fs = factsets.random_factset(jax.random.key(FLAGS.seed), n, d, tied=True)
  if jax.default_backend() == 'cpu':
    common.wait_for_quiet(120.0, 0.1)
  out = dict(config=dict(dim=d, num_facts=n, num_values=n, width=FLAGS.width,
                         steps=FLAGS.steps, seed=FLAGS.seed,
                         max_width=FLAGS.max_width,
                         compute_dtype=FLAGS.compute_dtype),
             machine=common.machine_info())
  out['throughput'] = tp = throughput(fs)
  print(f"GD step d={d} N=P={n} width={FLAGS.width}: "
        f"{tp['steps_per_s']:.1f} steps/s, {tp['gflops']:.1f} GFLOP/s "
        f"({tp['flops_per_step'] / 1e9:.2f} GFLOP/step), peak "
        f"{tp['peak_gflops']:.1f} GFLOP/s -> {tp['roofline_fraction']:.0%} "
        'of the fp32 roofline', flush=True)
  common.write_json(FLAGS.out, out)
  out['wstar_ours'] = mine = ours(fs)
  print(f"W* ours: width {mine['width']} ({mine['num_params']} params) in "
        f"{mine['seconds']:.1f} s, {len(mine['tested'])} widths", flush=True)
  common.write_json(FLAGS.out, out)
  if not FLAGS.skip_plain:
    out['wstar_plain'] = base = plain(fs)
    speedup = base['seconds'] / mine['seconds']
    rel = (None if base['width'] is None or mine['width'] is None
           else mine['width'] / base['width'] - 1)
    out['speedup'], out['relative_difference'] = speedup, rel
    print(f"W* plain bisection: width {base['width']} in "
          f"{base['seconds']:.1f} s, {len(base['tested'])} widths; "
          f"speed-up {speedup:.1f}x, W* difference "
          f"{'n/a' if rel is None else f'{rel:+.1%}'}", flush=True)
    common.write_json(FLAGS.out, out)


if __name__ == '__main__':
  app.run(main)
