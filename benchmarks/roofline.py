r"""Roofline report: achieved GFLOP/s (and GB/s) of the main kernels vs peak.

Peaks, measured here first (best of ``--peak_repeats``):

* compute: a jitted 2048 x 2048 float32 matmul (``common.matmul_peak``);
* memory bandwidth: a jitted ``x + y`` over ``--bw_mib`` MiB float32 arrays
  (bytes moved = 3 x the array size: two reads, one write).

Kernels (each warm, timed as the best of ``--repeats``, with the CPU time
other processes took, ``common.ForeignCpu``):

1. **Construction bucket solves** at N = 65,536, d = 256, P = 4,096 (as
   ``construct.py``): ``jit(build_gadgets)`` and ``jit(solve_buckets)`` on
   one device, and ``build_gadgets_streamed`` as ``construct`` runs it (the
   solves split over all devices by ``sharding.shard_rows``; this script
   exposes each CPU core as a device, ``threads.expose_cpu_cores``), all
   with the construction's ``m`` and ``b``, FLOPs from
   ``construct.bucket_solve_flops`` (analytic), and the whole
   ``construct`` (decodability + bucket solves + verification) for context.
2. **Decodability solver** on the construction's projected table (P = 4,096,
   m = the construction's code dim). Its work depends on the path
   (certification passes, Frank-Wolfe steps), so the FLOP count is a *lower
   bound*: per value, the pool pass (``2 P m``: ``V_B V^T``) and one
   certification pass (``4 P m``: ``[V_B; X_B] V^T``) plus one ``K x K``
   Gram; the table is read once per block of values and pass.
   **Structured certificate** of the same construction
   (``encoder_decoder.certify_gadgets``): FLOPs of its value pass (each used
   value's code against all ``P`` projected values, ``2 U P m``) and of the
   per-key bounds (``~ N (2 d + 34 m)``).
3. **GD training step** (``training.fit``, gated MLP, d = 128, N = P = 2048,
   width 64, full batch): FLOPs per step from ``training.step_flops``.
4. **Transformer training step** (``transformer.train.fit_groups`` step:
   d = 64, N = 512 tied keys, default ``TrainConfig``: batch 256, groups
   ``('qk',)``, ``context_len`` 4): FLOPs per step from XLA's
   ``cost_analysis()`` of one jitted step (forward, backward, AdamW update),
   time per step from a jitted ``lax.scan`` of ``--tf_steps`` steps.

For a kernel whose arithmetic intensity (FLOPs per byte of its main
operands) is below the machine balance (peak FLOP/s / peak B/s), the
bandwidth fraction is the relevant one and is reported as well.

Usage::

  python benchmarks/roofline.py --roofline_out=benchmarks/results/roofline.json

(``construct.py``'s flags are importable here too; only ``--seed`` and
``--matmul_size`` are used.)
"""

from __future__ import annotations

import functools
import os
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from factstore_jax import sharding, training
from factstore_jax import mlp as mlp_lib
from factstore_jax.decodability import decodability
from factstore_jax.constructions import decoders, gadgets
from factstore_jax.constructions import encoder_decoder as ed
from factstore_jax.constructions import assembly
from factstore_jax.constructions import verify as verify_lib
from factstore_jax.factsets import FactSet, random_factset
from factstore_jax.threads import expose_cpu_cores, single_threaded_blas
from factstore_jax.transformer import data as tf_data
from factstore_jax.transformer import model as tf_model
from factstore_jax.transformer import train as tf_train

import common  # benchmarks/common.py
import construct as construct_bench  # reuse bucket_solve_flops, make_factset


FLAGS = flags.FLAGS
flags.DEFINE_string('roofline_out', 'benchmarks/results/roofline.json',
                    'JSON output of the roofline report.')
flags.DEFINE_integer('construct_facts', 65536, 'N of the construction.')
flags.DEFINE_integer('construct_dim', 256, 'd of the construction.')
flags.DEFINE_integer('construct_values', 4096, 'P of the construction.')
flags.DEFINE_integer('peak_repeats', 5, 'Timed runs of the peak probes.')
flags.DEFINE_integer('bw_mib', 256, 'Size of each bandwidth-probe array.')
flags.DEFINE_integer('timing_repeats', 5, 'Timed runs per kernel (best).')
flags.DEFINE_integer('gd_steps', 200, 'Steps per GD throughput run.')
flags.DEFINE_integer('tf_steps', 100, 'Steps per Transformer timing run.')


def bandwidth_peak(mib: int, repeats: int) -> dict:
  """GB/s of a jitted ``x + y`` over two ``mib`` MiB float32 arrays."""
  n = mib * 2**20 // 4
  x = jnp.ones((n,), jnp.float32)
  y = jnp.full((n,), 2.0, jnp.float32)
  compiled = jax.jit(jnp.add).lower(x, y).compile()
  times = common.time_compiled(compiled, (x, y), repeats)
  moved = 3.0 * 4 * n
  return {'array_mib': mib, 'bytes': moved, 'best_seconds': min(times),
          'seconds': times, 'gbytes_per_s': moved / min(times) / 1e9}


def _timed(fn, repeats):
  """Best-of-``repeats`` seconds of ``fn()`` (blocked), after one warm run."""
  jax.block_until_ready(fn())
  times = []
  with common.ForeignCpu() as foreign:
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - t0)
  return min(times), times, foreign.as_dict()


def _entry(name, flops, seconds, peak, *, bytes_moved=None, bw=None, **extra):
  gflops = flops / seconds / 1e9
  out = {'name': name, 'flops': flops, 'seconds': seconds,
         'gflops_per_s': gflops,
         'fraction_of_peak': gflops / peak['gflops']}
  if bytes_moved is not None:
    out['bytes'] = bytes_moved
    out['gbytes_per_s'] = bytes_moved / seconds / 1e9
    out['fraction_of_bandwidth'] = out['gbytes_per_s'] / bw['gbytes_per_s']
    out['intensity_flops_per_byte'] = flops / bytes_moved
  out.update(extra)
  return out


def construction(peak, bw) -> list[dict]:
  n, d, p = (FLAGS.construct_facts, FLAGS.construct_dim,
             FLAGS.construct_values)
  fs = construct_bench.make_factset(jax.random.key(FLAGS.seed), n, d, p)
  ed.construct(FLAGS.seed, fs)  # compile everything
  t0 = time.perf_counter()
  with common.ForeignCpu() as foreign_c:
    c = ed.construct(FLAGS.seed, fs)
    jax.block_until_ready((c.model, c.codes))
  construct_s = time.perf_counter() - t0
  rep = c.report
  targets = c.codes[fs.mapping]
  key = jax.random.key(FLAGS.seed + 2)
  gad = jax.jit(assembly.build_gadgets,
                static_argnames=('bucket_size', 'activation', 'slack'))
  gad_c = gad.lower(key, fs.keys, targets,
                    bucket_size=rep.bucket_size).compile()
  with single_threaded_blas():
    parts = jax.block_until_ready(gad_c(key, fs.keys, targets))
    gad_s, gad_times, gad_f = _timed(lambda: gad_c(key, fs.keys, targets),
                                     FLAGS.timing_repeats)
    solve_c = jax.jit(gadgets.solve_buckets).lower(
        fs.keys, targets, parts.buckets).compile()
    solve_s, solve_times, solve_f = _timed(
        lambda: solve_c(fs.keys, targets, parts.buckets),
        FLAGS.timing_repeats)
    # construct()'s own path: bucketing, then the solves split over all
    # devices (sharding.shard_rows), the maps gathered back on one device.
    mesh = sharding.local_mesh()
    split_s, split_times, split_f = _timed(
        lambda: assembly.build_gadgets_streamed(
            key, fs.keys, targets, bucket_size=rep.bucket_size,
            stream_size=ed.STREAM_BUCKETS, mesh=mesh).maps,
        FLAGS.timing_repeats)
  flops = construct_bench.bucket_solve_flops(rep.num_buckets, d,
                                             rep.bucket_size, rep.code_dim)
  # Main operands: the gathered keys (n b d) read by the Gram and the two
  # products, the maps written.
  nb, b, m = rep.num_buckets, rep.bucket_size, rep.code_dim
  moved = 4.0 * (3 * nb * b * d + nb * m * d)
  common_extra = dict(num_buckets=nb, bucket_size=b, code_dim=m, dim=d,
                      num_facts=n, num_values=p,
                      flops_terms_per_bucket=flops['per_bucket_terms'])
  return [
      _entry('construction: build_gadgets (bucketing + bucket solves)',
             flops['total'], gad_s, peak, bytes_moved=moved, bw=bw,
             times=gad_times, foreign_cpu=gad_f, **common_extra),
      _entry('construction: solve_buckets (bucket solves only)',
             flops['total'], solve_s, peak, bytes_moved=moved, bw=bw,
             times=solve_times, foreign_cpu=solve_f, **common_extra),
      _entry(f'construction: build_gadgets_streamed, as construct() runs it '
             f'(solves split over {mesh.size} device(s))', flops['total'],
             split_s, peak, bytes_moved=moved, bw=bw, times=split_times,
             foreign_cpu=split_f, devices=mesh.size, **common_extra),
      _entry('construction: whole construct() (decodability, solves, '
             'verification; FLOPs = bucket solves only)', flops['total'],
             construct_s, peak, foreign_cpu=foreign_c.as_dict(),
             report=rep.as_dict()),
  ], c, fs


def bucket_profile(c, fs, peak) -> dict:
  """Where the bucket-solve time goes: each stage of ``solve_bucket`` alone.

  Every stage runs on the previous stage's stored results, mapped over the
  construction's buckets as ``solve_buckets`` maps them
  (``gadgets.map_buckets``: one bucket after another on CPU): the gather of
  keys and targets, the Gram matrix, its Cholesky factor (LAPACK
  ``potrf``), the first Gram solve (two triangular solves), the maps
  ``alpha^T K``, the refinement residual ``C - K M^T`` and the refinement
  (second Gram solve and product). Stored intermediates cost memory traffic
  the fused program does not pay, so the stages sum to a bit more.
  """
  rep = c.report
  targets = c.codes[fs.mapping]
  index = c.structure.gadgets.buckets.index
  valid = c.structure.gadgets.buckets.valid
  nb, b, m, d = rep.num_buckets, rep.bucket_size, rep.code_dim, fs.keys.shape[1]
  per = construct_bench.bucket_solve_flops(nb, d, b, m)['per_bucket_terms']
  each = lambda fn: jax.jit(lambda *xs: gadgets.map_buckets(
      lambda a: fn(*a), xs))
  cho = lambda chol, rhs: jax.scipy.linalg.cho_solve((chol, True), rhs)
  gather = each(lambda i, v: (jnp.where(v[:, None], fs.keys[i], 0.0),
                              jnp.where(v[:, None], targets[i], 0.0)))
  gram = each(lambda k, v: k @ k.T + jnp.diag((~v).astype(k.dtype)))
  chol = each(jnp.linalg.cholesky)
  first = each(cho)
  maps = each(lambda alpha, k: alpha.T @ k)
  resid = each(lambda k, cc, mp, v: jnp.where(v[:, None], cc - k @ mp.T, 0.0))
  refine = each(lambda ch, r, k, mp: mp + cho(ch, r).T @ k)
  with single_threaded_blas():
    k, cc = jax.block_until_ready(gather(index, valid))
    g = jax.block_until_ready(gram(k, valid))
    ch = jax.block_until_ready(chol(g))
    alpha = jax.block_until_ready(first(ch, cc))
    mp = jax.block_until_ready(maps(alpha, k))
    r = jax.block_until_ready(resid(k, cc, mp, valid))
  stages = {
      'gather + mask': (lambda: gather(index, valid), 0.0),
      'gram K K^T': (lambda: gram(k, valid), per['gram']),
      'cholesky': (lambda: chol(g), per['cholesky']),
      'first Gram solve': (lambda: first(ch, cc), per['triangular'] / 2),
      'maps alpha^T K': (lambda: maps(alpha, k), per['maps'] / 2),
      'residual C - K M^T': (lambda: resid(k, cc, mp, valid),
                             per['residual']),
      'refinement solve + product': (
          lambda: refine(ch, r, k, mp),
          per['triangular'] / 2 + per['maps'] / 2 + per['update']),
  }
  out = {}
  with single_threaded_blas():
    for name, (fn, flops) in stages.items():
      jax.block_until_ready(fn())
      seconds, times, foreign = _timed(fn, FLAGS.timing_repeats)
      rate = nb * flops / seconds / 1e9
      out[name] = {'seconds': seconds, 'times': times, 'flops': nb * flops,
                   'gflops_per_s': rate,
                   'fraction_of_peak': rate / peak['gflops'],
                   'foreign_cpu': foreign}
  return out


def certificate_entry(c, fs, peak, bw) -> dict:
  parts = c.structure.gadgets
  run = lambda: verify_lib.certify_gadgets(parts, c.model, fs, c.codes)[0]
  run()  # compile
  seconds, times, foreign = _timed(run, FLAGS.timing_repeats)
  n, d = fs.keys.shape
  p, m = fs.values.shape[0], c.report.code_dim
  used = len(np.unique(np.asarray(fs.mapping)))
  flops = 2.0 * used * p * m + n * (2.0 * d + 34.0 * m)
  # The projected table (P, m) once per chunk of 1,024 used values, the keys.
  moved = 4.0 * (-(-used // 1024) * p * m + n * d)
  return _entry('structured certificate (value pass + per-key bounds)',
                flops, seconds, peak, bytes_moved=moved, bw=bw, times=times,
                foreign_cpu=foreign, num_facts=n, num_values=p, code_dim=m,
                used_values=used)


def decodability_entry(c, fs, peak, bw) -> dict:
  d = fs.keys.shape[1]
  m = c.report.code_dim
  decoder = decoders.jl_decoder(jax.random.split(jax.random.key(
      FLAGS.seed))[0], d, m, fs.keys.dtype)
  table = decoders.project_values(fs.values, decoder)
  p = table.shape[0]
  k = min(max(m // 2, 64), 256, p - 1)
  run = lambda: decodability(table, tol=1e-3)
  seconds, times, foreign = _timed(run, FLAGS.timing_repeats)
  flops = p * (6.0 * p * m + 2.0 * k * k * m)
  # The (P, m) table read once per block of 64 values in each of the two
  # passes; no (B, P) score array is written (reduced per subtile in cache).
  moved = 2 * -(-p // 64) * 4.0 * p * m
  return _entry('decodability solver (lower-bound FLOPs: pool + '
                'certification pass)',
                flops, seconds, peak, bytes_moved=moved, bw=bw, times=times,
                foreign_cpu=foreign, num_values=p, code_dim=m,
                num_candidates=k)


def gd_entry(peak, bw) -> dict:
  d, n, width = 128, 2048, 64
  fs = random_factset(jax.random.key(FLAGS.seed), n, d, n, tied=False,
                      mapping='permutation')
  model = mlp_lib.init_mlp(jax.random.key(FLAGS.seed), d, width)
  config = training.TrainConfig(max_steps=FLAGS.gd_steps, patience=None,
                                target_accuracy=1.0)
  result = {}
  def run():
    result['r'] = training.fit(model, fs, config=config)
    return result['r']
  seconds, times, foreign = _timed(run, FLAGS.timing_repeats)
  steps = int(result['r'].steps)
  per_step = training.step_flops(n, d, width, n)
  # Operands per step: keys, value table, weights, the (N, P) logits
  # written and read twice (forward, softmax backward).
  moved = 4.0 * (2 * n * d + 4 * d * width + 3 * n * n)
  return _entry('GD training step (training.fit, d=128, N=P=2048, width 64)',
                per_step * steps, seconds, peak, bytes_moved=moved * steps,
                bw=bw, times=times, foreign_cpu=foreign, steps=steps,
                flops_per_step=per_step,
                steps_per_s=steps / seconds)


def transformer_entry(peak, bw) -> dict:
  d, n = 64, 512
  fs = random_factset(jax.random.key(FLAGS.seed), n, d, None, tied=True,
                      mapping='permutation')
  vocab = tf_data.make_vocabulary(jax.random.key(1), fs)
  model = tf_model.Transformer(vocab.embeddings,
                               vocab.embeddings[vocab.key_ids], None,
                               key=jax.random.key(2))
  config = tf_train.TransformerTrainConfig()
  targets = tf_data.copy_targets(vocab)
  graphdef, params, rest = nnx.split(
      model, tf_model.group_filter(config.groups), ...)
  opt = optax.adamw(optax.cosine_decay_schedule(
      config.learning_rate, config.max_steps, config.final_fraction),
                    weight_decay=config.weight_decay)
  opt_state = opt.init(params)

  def step(params, opt_state, key):
    def loss(params):
      batch = tf_data.sample_batch(key, vocab, targets, config.batch_size,
                                   config.context_len)
      return tf_train.query_loss(nnx.merge(graphdef, params, rest),
                                 batch.tokens, batch.targets,
                                 config.logit_scale)[0]
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  key = jax.random.key(3)
  step_c = jax.jit(step).lower(params, opt_state, key).compile()
  xla_flops = construct_bench._xla_flops(step_c)  # pylint: disable=protected-access
  cost = step_c.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_bytes = float(cost.get('bytes accessed', 0.0)) if cost else None

  @functools.partial(jax.jit, static_argnums=3)
  def many(params, opt_state, key, num):
    def body(carry, k):
      p, s = carry
      p, s, v = step(p, s, k)
      return (p, s), v
    (p, s), v = jax.lax.scan(body, (params, opt_state),
                             jax.random.split(key, num))
    return p, v

  steps = FLAGS.tf_steps
  seconds, times, foreign = _timed(
      lambda: many(params, opt_state, key, steps), FLAGS.timing_repeats)
  return _entry('Transformer training step (d=64, N=512, batch 256, '
                'groups qk; FLOPs from XLA cost_analysis)',
                xla_flops * steps, seconds, peak,
                bytes_moved=None if not xla_bytes else xla_bytes * steps,
                bw=bw, times=times, foreign_cpu=foreign, steps=steps,
                flops_per_step=xla_flops, xla_bytes_per_step=xla_bytes,
                steps_per_s=steps / seconds)


def _table(entries, peak, bw) -> str:
  head = ['kernel', 'GFLOP', 'seconds', 'GFLOP/s', '%peak', 'GB/s', '%bw',
          'other%']
  rows = []
  for e in entries:
    f = e.get('foreign_cpu', {}).get('fraction')
    rows.append([
        e['name'][:62], f"{e['flops'] / 1e9:.2f}", f"{e['seconds']:.3f}",
        f"{e['gflops_per_s']:.1f}", f"{100 * e['fraction_of_peak']:.1f}",
        f"{e['gbytes_per_s']:.1f}" if 'gbytes_per_s' in e else '-',
        f"{100 * e['fraction_of_bandwidth']:.1f}"
        if 'fraction_of_bandwidth' in e else '-',
        '-' if f is None else f'{100 * f:.0f}'])
  widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in
            enumerate(head)]
  lines = ['  '.join(h.ljust(w) if i == 0 else h.rjust(w)
                     for i, (h, w) in enumerate(zip(head, widths)))]
  for r in rows:
    lines.append('  '.join(c.ljust(w) if i == 0 else c.rjust(w)
                           for i, (c, w) in enumerate(zip(r, widths))))
  lines.append(f"peak: {peak['gflops']:.1f} GFLOP/s ({peak['size']}^3 f32 "
               f"matmul), {bw['gbytes_per_s']:.1f} GB/s (x + y, "
               f"{bw['array_mib']} MiB arrays); machine balance "
               f"{peak['gflops'] / bw['gbytes_per_s']:.1f} FLOP/byte")
  return '\n'.join(lines)


def main(argv):
  del argv
  common.wait_for_quiet(60.0, 0.1)
  with common.ForeignCpu() as foreign_peak:
    peak = common.matmul_peak(FLAGS.matmul_size, FLAGS.peak_repeats)
    bw = bandwidth_peak(FLAGS.bw_mib, FLAGS.peak_repeats)
  peak['foreign_cpu'] = bw['foreign_cpu'] = foreign_peak.as_dict()
  logging.info('peak %.1f GFLOP/s, %.1f GB/s', peak['gflops'],
               bw['gbytes_per_s'])
  entries, c, fs = construction(peak, bw)
  profile = bucket_profile(c, fs, peak)
  entries.append(decodability_entry(c, fs, peak, bw))
  entries.append(certificate_entry(c, fs, peak, bw))
  del c, fs
  entries.append(gd_entry(peak, bw))
  entries.append(transformer_entry(peak, bw))
  data = {'benchmark': 'roofline', 'machine': common.machine_info(),
          'matmul_peak': peak, 'bandwidth_peak': bw,
          'machine_balance_flops_per_byte': peak['gflops'] /
                                            bw['gbytes_per_s'],
          'target': 'construction >= 30% of the matmul peak at N = 65,536',
          'entries': entries,
          'bucket_solve_profile': profile,
          'loadavg_end': os.getloadavg(),
          'timestamp': time.strftime('%Y-%m-%dT%H:%M:%S%z')}
  print(_table(entries, peak, bw))
  print('bucket-solve stages (N = %d):' % FLAGS.construct_facts)
  for name, st in profile.items():
    print(f"  {name:30s} {1e3 * st['seconds']:8.1f} ms  "
          f"{st['gflops_per_s']:6.1f} GFLOP/s  "
          f"{100 * st['fraction_of_peak']:5.1f}% of peak")
  common.write_json(FLAGS.roofline_out, data)
  print(f'wrote {FLAGS.roofline_out}')
  return 0


if __name__ == '__main__':
  expose_cpu_cores()  # before JAX starts its CPU backend
  app.run(main)
