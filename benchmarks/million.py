r"""Million-fact construction: N = 2^20 facts, d = 512, P = 65,536 on one CPU.

For each N in ``--sizes`` (default 2^16, 2^18, 2^20) at ``d = --dim`` (512)
and ``P = --num_values`` (65,536), on an isotropic untied fact set (keys and
values uniform on the unit sphere, a random many-to-one map that uses every
value), in a fresh subprocess per size (so ``ru_maxrss`` is that size's own
peak):

* the fact set is generated in chunks (``--gen_chunk`` keys per step of a
  jitted ``lax.map``; key chunk ``c`` is ``sample_sphere(fold_in(k, c))``),
  so the keys (2 GiB at N = 2^20) are the only N-sized buffer;
* ``encoder_decoder.construct`` builds it and certifies every fact
  (``--verify=certificate``, the structured margin certificate; or
  ``--verify=dense``, every key against every hidden neuron and all P
  values), streaming: decodability in calls of ``STREAM_VALUES`` values (a
  code dimension is rejected once more used values are certified below the
  floor than may be patched), bucket solves in calls of ``STREAM_BUCKETS``
  buckets, the dense check in calls of ``STREAM_KEYS`` keys; a tqdm bar per
  stage (stderr) follows the calls; ``--dense_check`` also runs the dense
  check after a certified build and records its min margin (the
  certificate's must not be larger);
* per stage: seconds, GFLOP (as the library does the work; the
  decodability solver's is not counted), GFLOP/s and the fraction of the
  float32 matmul peak measured in the same process;
* recorded: wall time of generation and of ``construct`` (cold: compile
  included, one run), the time of each stage (from the progress calls),
  peak RSS, the construction report, and the CPU time other processes took
  (``common.ForeignCpu``; the machine is shared).

After each size the parent projects the next size's time from the stage
times (decodability independent of N; bucket solves and assembly linear in
N; verification per key ``~ P d + 2 d n`` with ``n ~ N / (3b/4)`` buckets);
if the projection exceeds ``--max_minutes`` the size is not run and the
projection is recorded instead.

Usage::

  python benchmarks/million.py --sizes=65536,262144,1048576 \
      --out=benchmarks/results/million.json
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import tqdm

from factstore_jax.constructions import encoder_decoder as ed
from factstore_jax.constructions import verify as verify_lib
from factstore_jax.constructions import gadgets
from factstore_jax.factsets import FactSet, many_to_one_map, sample_sphere
from factstore_jax.threads import expose_cpu_cores

import common  # benchmarks/common.py (the script's folder is on sys.path)

FLAGS = flags.FLAGS
flags.DEFINE_list('sizes', ['65536', '262144', '1048576'], 'Numbers of facts.')
flags.DEFINE_integer('dim', 512, 'Embedding dimension d.')
flags.DEFINE_integer('num_values', 65536, 'Number of values P.')
flags.DEFINE_integer('seed', 0, 'Seed of the fact set and construction.')
flags.DEFINE_integer('gen_chunk', 65536, 'Keys generated per chunk.')
flags.DEFINE_float('max_minutes', 45.0,
                   'Do not start a size whose projected wall time exceeds '
                   'this (minutes).')
flags.DEFINE_float('quiet_wait_s', 60.0,
                   'Before each size, wait up to this long for other '
                   'processes to use < --max_foreign of the CPU.')
flags.DEFINE_float('max_foreign', 0.1, 'See --quiet_wait_s.')
flags.DEFINE_string('out', 'benchmarks/results/million.json', 'JSON output.')
flags.DEFINE_enum('verify', 'certificate', ['certificate', 'dense'],
                  "construct()'s check (ConstructionConfig.verify).")
flags.DEFINE_bool('dense_check', False, 'After a certified construction, also '
                  'run the dense check and record its min margin and time.')
flags.DEFINE_integer('single_size', None,
                     'Internal: run only this N here and print one JSON line.')

_MIB = 1024.0  # ru_maxrss is in KiB on Linux.


def _rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / _MIB


def make_factset(key: jax.Array, n: int, d: int, p: int,
                 chunk: int) -> FactSet:
  """Sphere keys (generated ``chunk`` rows at a time), values, many-to-one."""
  k_keys, k_values, k_map = jax.random.split(key, 3)
  chunk = min(chunk, n)
  if n % chunk:
    raise ValueError(f'gen_chunk {chunk} must divide N = {n}')

  @jax.jit
  def keys_of(k):
    parts = jax.lax.map(
        lambda c: sample_sphere(jax.random.fold_in(k, c), chunk, d),
        jnp.arange(n // chunk))
    return parts.reshape(n, d)

  return jax.block_until_ready(FactSet(
      keys_of(k_keys), sample_sphere(k_values, p, d),
      many_to_one_map(k_map, n, p)))


class _Progress:
  """tqdm bar per stage; records each stage's first and last call time and
  the process's peak RSS at its last call (where the peak grew: the stage
  that holds the largest working set)."""

  def __init__(self):
    self.t0 = time.perf_counter()
    self.bars, self.first, self.last, self.peak = {}, {}, {}, {}

  def __call__(self, stage: str, done: int, total: int):
    now = time.perf_counter() - self.t0
    if stage not in self.bars:
      self.bars[stage] = tqdm.tqdm(total=total, desc=stage, file=sys.stderr,
                                   mininterval=1.0, dynamic_ncols=True)
      self.first[stage] = now
    bar = self.bars[stage]
    bar.update(done - bar.n)
    self.last[stage] = now
    self.peak[stage] = _rss_mib()
    if done >= total:
      bar.close()

  def stage_seconds(self) -> dict:
    """Seconds from the previous stage's last call to this one's last."""
    out, prev = {}, 0.0
    for stage in sorted(self.last, key=self.last.get):
      out[stage] = self.last[stage] - prev
      prev = self.last[stage]
    return out


def run_single(n: int) -> dict:
  d, p = FLAGS.dim, FLAGS.num_values
  rss_start = _rss_mib()
  t0 = time.perf_counter()
  with common.ForeignCpu() as foreign_gen:
    factset = make_factset(jax.random.key(FLAGS.seed), n, d, p,
                           FLAGS.gen_chunk)
  gen_s = time.perf_counter() - t0
  rss_gen = _rss_mib()
  logging.info('N=%d: fact set in %.1fs (peak %.0f MiB)', n, gen_s, rss_gen)

  peak = common.matmul_peak(2048, 3)
  progress = _Progress()
  t0 = time.perf_counter()
  with common.ForeignCpu() as foreign:
    result = ed.construct(FLAGS.seed, factset, progress=progress,
                          verify=FLAGS.verify)
    jax.block_until_ready((result.model, result.codes, result.rho))
  seconds = time.perf_counter() - t0
  rep = result.report
  dense = None
  if FLAGS.dense_check:
    t1 = time.perf_counter()
    check, _, _ = verify_lib.verify_structured_streamed(
        result.structure.gadgets, result.model, factset, result.codes,
        stream_size=verify_lib.STREAM_KEYS,
        progress=lambda done, total: progress('dense check', done, total))
    dense = {'seconds': time.perf_counter() - t1,
             'min_margin': float(check.storage.min_margin),
             'accuracy': float(check.storage.accuracy),
             'certificate_below_dense': rep.min_margin <= float(
                 check.storage.min_margin)}
  stages = progress.stage_seconds()
  return {
      'num_facts': n, 'dim': d, 'num_values': p, 'seed': FLAGS.seed,
      'generate_seconds': gen_s,
      'construct_seconds': seconds,
      'total_seconds': gen_s + seconds,
      'stage_seconds': stages,
      'stage_rates': stage_rates(stages, n, d, p, rep, peak['gflops']),
      'matmul_peak': peak,
      'check': rep.check,
      'float32_bound': rep.float32_bound,
      'dense_check': dense,
      'peak_rss_mib': _rss_mib(),
      'stage_peak_rss_mib': progress.peak,
      'rss_after_generate_mib': rss_gen,
      'start_rss_mib': rss_start,
      'foreign_cpu_generate': foreign_gen.as_dict(),
      'foreign_cpu_construct': foreign.as_dict(),
      'loadavg_end': os.getloadavg(),
      'accuracy': rep.accuracy,
      'min_margin': rep.min_margin,
      'min_normalized_margin': rep.min_normalized_margin,
      'code_dim': rep.code_dim,
      'bucket_size': rep.bucket_size,
      'num_buckets': rep.num_buckets,
      'params_per_fact': rep.params_per_fact,
      'report': rep.as_dict(),
      'streaming': {'values_per_call': ed.STREAM_VALUES,
                    'buckets_per_call': ed.STREAM_BUCKETS,
                    'keys_per_call': verify_lib.STREAM_KEYS},
  }


def stage_flops(stage: str, n: int, d: int, p: int, rep) -> float | None:
  """Floating-point operations of a stage as the library does it (the
  decodability solver's work depends on its iterations: not counted)."""
  m, b, nb, h = rep.code_dim, rep.bucket_size, rep.num_buckets, rep.hidden_dim
  if stage == 'buckets':   # Gram, Cholesky, solves + 2 refinements
    return nb * (2 * b * b * d + b ** 3 / 3 + 6 * (2 * b * m * d + 2 * b * b * m))
  if stage == 'certify':   # three (b, d) x (d, m) products per bucket, the
    # rivals' einsums and the (U, P, m) separations
    return 6 * n * m * d + 2 * 16 * 3 * n * m + 2 * p * p * m
  if stage in ('verify', 'dense check'):   # steps, encode, logits
    return n * (2 * d * h * 2 + 2 * d * m + 2 * p * d)
  return None


def stage_rates(stages: dict, n: int, d: int, p: int, rep,
                peak_gflops: float) -> dict:
  """GFLOP/s and fraction of the matmul peak per stage (where counted)."""
  out = {}
  for stage, seconds in stages.items():
    flops = stage_flops(stage, n, d, p, rep)
    if flops is None or seconds <= 0:
      out[stage] = {'seconds': seconds, 'gflops': None, 'fraction_of_peak': None}
      continue
    rate = flops / seconds / 1e9
    out[stage] = {'seconds': seconds, 'gflop': flops / 1e9, 'gflops': rate,
                  'fraction_of_peak': rate / peak_gflops}
  return out


def _run_child(n: int) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), f'--single_size={n}',
         f'--dim={FLAGS.dim}', f'--num_values={FLAGS.num_values}',
         f'--verify={FLAGS.verify}', f'--dense_check={FLAGS.dense_check}',
         f'--seed={FLAGS.seed}', f'--gen_chunk={FLAGS.gen_chunk}']
  proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True,
                        check=False)
  for line in reversed(proc.stdout.splitlines()):
    if line.strip().startswith('{'):
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        continue
  return {'num_facts': n, 'error': f'child exited with {proc.returncode}',
          'stdout_tail': proc.stdout[-2000:]}


def project_seconds(r: dict, n_new: int) -> float:
  """Projected wall time at ``n_new`` facts from the stage times of ``r``."""
  n, d, p = r['num_facts'], r['dim'], r['num_values']
  ratio = n_new / n
  stages = r['stage_seconds']
  dec = sum(v for k, v in stages.items() if k.startswith('decodability'))
  buckets = stages.get('buckets', 0.0)
  verify = stages.get('verify', 0.0) + stages.get('certify', 0.0)
  assemble = stages.get('assemble', 0.0)
  b = r['bucket_size']
  nk = lambda m: 2 * gadgets.num_buckets(m, b)
  verify_ratio = ratio * (p + nk(n_new)) / (p + nk(n))
  rest = r['construct_seconds'] - dec - buckets - verify - assemble
  return (dec + (buckets + assemble + rest + r['generate_seconds']) * ratio +
          verify * verify_ratio)


def _table(results: list[dict]) -> str:
  head = ['N', 'gen s', 'construct s', 'total min', 'peak MiB', 'acc',
          'min margin', 'm', 'bkts', 'dec s', 'bkt s', 'check', 'check s',
          'other%']
  rows = []
  for r in results:
    if 'error' in r or 'skipped' in r:
      why = r.get('error') or r['skipped']
      rows.append([str(r['num_facts']), why])
      continue
    st = r['stage_seconds']
    dec = sum(v for k, v in st.items() if k.startswith('decodability'))
    frac = r['foreign_cpu_construct']['fraction']
    rows.append([
        str(r['num_facts']), f"{r['generate_seconds']:.1f}",
        f"{r['construct_seconds']:.1f}", f"{r['total_seconds'] / 60:.1f}",
        f"{r['peak_rss_mib']:.0f}", f"{r['accuracy']:.4f}",
        f"{r['min_margin']:.4f}", str(r['code_dim']), str(r['num_buckets']),
        f'{dec:.0f}', f"{st.get('buckets', 0):.0f}",
        r.get('check', 'dense'),
        f"{st.get('verify', 0) + st.get('certify', 0):.0f}",
        'n/a' if frac is None else f'{100 * frac:.0f}'])
  full = [row for row in rows if len(row) == len(head)]
  widths = [max([len(h)] + [len(row[i]) for row in full])
            for i, h in enumerate(head)]
  lines = ['  '.join(h.rjust(w) for h, w in zip(head, widths))]
  for row in rows:
    if len(row) == len(head):
      lines.append('  '.join(c.rjust(w) for c, w in zip(row, widths)))
    else:
      lines.append(f'{row[0].rjust(widths[0])}  {row[1]}')
  lines.append('construct s: cold (compile included), every fact certified '
               '(check: the structured certificate, or the dense check of '
               'every key against all hidden neurons and all P values); '
               'other% = share of core-seconds used by other processes '
               'during construct')
  return '\n'.join(lines)


def main(argv):
  del argv
  if FLAGS.single_size is not None:
    sys.stdout.write(json.dumps(run_single(FLAGS.single_size)) + '\n')
    sys.stdout.flush()
    return 0
  sizes = [int(s) for s in FLAGS.sizes]
  results = []
  data = {
      'benchmark': 'million',
      'config': {'sizes': sizes, 'dim': FLAGS.dim,
                 'num_values': FLAGS.num_values, 'seed': FLAGS.seed,
                 'gen_chunk': FLAGS.gen_chunk,
                 'max_minutes': FLAGS.max_minutes,
                 'factset': 'keys and values uniform on the unit sphere '
                            '(untied), many_to_one_map; keys generated in '
                            'chunks (fold_in per chunk)'},
      'machine': common.machine_info(),
      'results': results,
  }
  for n in sizes:
    if results and 'construct_seconds' in results[-1]:
      projected = project_seconds(results[-1], n)
      logging.info('N=%d: projected %.1f min', n, projected / 60)
      if projected > 60 * FLAGS.max_minutes:
        results.append({'num_facts': n, 'projected_seconds': projected,
                        'skipped': f'projected {projected / 60:.0f} min > '
                                   f'{FLAGS.max_minutes:.0f} min'})
        break
    else:
      projected = None
    before = common.wait_for_quiet(FLAGS.quiet_wait_s, FLAGS.max_foreign)
    t0 = time.perf_counter()
    r = _run_child(n)
    r['child_wall_seconds'] = time.perf_counter() - t0
    r['foreign_fraction_before'] = before
    r['projected_seconds'] = projected
    results.append(r)
    data['timestamp'] = time.strftime('%Y-%m-%dT%H:%M:%S%z')
    common.write_json(FLAGS.out, data)  # after every size
    print(_table(results), flush=True)
    if 'error' in r:
      break
  print(_table(results))
  common.write_json(FLAGS.out, data)
  print(f'wrote {FLAGS.out}')
  return 1 if any('error' in r for r in results) else 0


if __name__ == '__main__':
  expose_cpu_cores()  # before JAX starts its CPU backend
  app.run(main)
