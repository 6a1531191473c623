r"""Editing benchmark: a 1-fact bucket-local edit versus a full rebuild.

On the fact set of ``benchmarks/construct.py`` (``N = --num_facts`` keys and
``P = --num_values`` values independently uniform on the unit sphere
``S^{d-1}``, ``d = --dim``, a many-to-one map using every value), this

1. builds the MLP with ``encoder_decoder.construct`` (``seconds_first``,
   compilation included) and evaluates the factorised model ``model(x)`` on
   every key (fixed chunks of ``--chunk`` keys, the same batches later);
2. applies a chain of 1-fact updates ``editing.edit(c, fs, [Update(i, v)])``
   (distinct facts ``i`` drawn at random, ``v`` a random other value), the
   first ``--warmup_edits`` untimed (compilation), the next ``--edits`` timed
   from the call until the returned construction is ready
   (``jax.block_until_ready``); the speed figure is their median. An edit
   re-assembles the dense weights and re-verifies every fact from the lowest
   touched bucket upward (the telescoped sum above it is rounded anew), so
   its time depends on where the edited fact sits;
3. rebuilds the edited fact set from scratch with ``construct`` ``--rebuilds``
   times (same shapes as step 1, so compiled code is reused: warm times;
   the median is the baseline);
4. evaluates the edited model on every key again and checks that every fact
   below the lowest bucket any edit touched has a bit-identical output
   (``np.array_equal``), records the largest output change of the other
   facts outside re-solved buckets, and checks that every fact of the edited
   set is stored (accuracy 1 and the minimum margin, from those outputs).

Timed blocks record ``foreign_cpu`` (CPU time other processes took, see
``common.ForeignCpu``): the machine is shared, and busy neighbours slow both
the edits and the rebuilds.

Usage::

  python benchmarks/edit.py --num_facts=65536 --dim=256 --num_values=4096 \
      --out=benchmarks/results/edit.json
"""

from __future__ import annotations

import os
import statistics
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from factstore_jax import storage
from factstore_jax.constructions import bucket_edits as editing
from factstore_jax.constructions.encoder_decoder import construct
from factstore_jax.factsets import FactSet, many_to_one_map, sample_sphere

import common  # benchmarks/common.py (the script's folder is on sys.path)

FLAGS = flags.FLAGS
flags.DEFINE_integer('num_facts', 65536, 'Number of facts N.')
flags.DEFINE_integer('dim', 256, 'Embedding dimension d.')
flags.DEFINE_integer('num_values', 4096, 'Number of values P.')
flags.DEFINE_integer('seed', 0, 'Seed of the fact set and construction.')
flags.DEFINE_integer('edits', 9, 'Timed 1-fact update edits (median).')
flags.DEFINE_integer('warmup_edits', 2, 'Untimed edits first (compilation).')
flags.DEFINE_integer('rebuilds', 2, 'Timed full constructions (median).')
flags.DEFINE_integer('chunk', 1024, 'Keys per batch of the full evaluations.')
flags.DEFINE_string('out', 'benchmarks/results/edit.json',
                    'Where the JSON results are written.')
flags.DEFINE_float('quiet_wait_s', 300.0,
                   'First wait up to this long for other processes to use '
                   'less than 10% of the CPU (3 s samples).')


def make_factset(key: jax.Array, n: int, d: int, p: int) -> FactSet:
  """Isotropic untied fact set, as in ``benchmarks/construct.py``."""
  k_keys, k_values, k_map = jax.random.split(key, 3)
  factset = FactSet(sample_sphere(k_keys, n, d), sample_sphere(k_values, p, d),
                    many_to_one_map(k_map, n, p))
  return jax.block_until_ready(factset)


@jax.jit
def _apply(model, x):
  return model(x)


def evaluate(model, keys, chunk: int) -> np.ndarray:
  """``model(k)`` for every key, in fixed batches of ``chunk`` keys."""
  outs = [np.asarray(_apply(model, keys[s:s + chunk]))
          for s in range(0, keys.shape[0], chunk)]
  return np.concatenate(outs)


def _timed(fn):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - t0


def main(argv):
  del argv
  n, d, p, seed = FLAGS.num_facts, FLAGS.dim, FLAGS.num_values, FLAGS.seed
  rng = np.random.default_rng(seed)
  load_start = os.getloadavg()
  foreign_before = common.wait_for_quiet(FLAGS.quiet_wait_s, 0.1)
  fs = make_factset(jax.random.key(seed), n, d, p)

  with common.ForeignCpu() as foreign_first:
    c0, seconds_first = _timed(lambda: construct(seed, fs))
  rep0 = c0.report
  logging.info('construct: %.1fs (m=%d, b=%d, %d buckets)', seconds_first,
               rep0.code_dim, rep0.bucket_size, rep0.num_buckets)
  t0 = time.perf_counter()
  before = evaluate(c0.model, fs.keys, FLAGS.chunk)
  eval_seconds = time.perf_counter() - t0
  logging.info('full evaluation: %.1fs', eval_seconds)

  # A chain of 1-fact updates on distinct facts.
  facts = rng.choice(n, FLAGS.warmup_edits + FLAGS.edits, replace=False)
  c, f = c0, fs
  resolved = set()  # facts whose bucket some edit re-solved
  lowest = rep0.num_buckets  # lowest bucket any edit touched
  edits = []
  with common.ForeignCpu() as foreign_edits:
    for e, i in enumerate(facts):
      v = int((int(f.mapping[i]) + rng.integers(1, p)) % p)
      (c, f, rep), seconds = _timed(lambda: editing.edit(
          c, f, [editing.Update(int(i), v)]))
      buckets = c.structure.gadgets.buckets
      index, valid = np.asarray(buckets.index), np.asarray(buckets.valid)
      for j in rep.solved_buckets:
        resolved.update(index[j][valid[j]].tolist())
      lowest = min([lowest, *rep.solved_buckets,
                    *(max(j - 1, 0) for j in rep.regated_buckets)])
      edits.append({'fact': int(i), 'value': v, 'seconds': seconds,
                    'timed': e >= FLAGS.warmup_edits,
                    'solved_buckets': list(rep.solved_buckets),
                    'checked_facts': int(len(rep.facts)),
                    'min_margin': rep.min_margin,
                    'report_seconds': rep.seconds})
      logging.info('edit %d: fact %d -> value %d in %.1f ms (%d facts '
                   'checked, min margin %.4f)', e, i, v, 1e3 * seconds,
                   len(rep.facts), rep.min_margin)
  timed = [e['seconds'] for e in edits if e['timed']]
  edit_s = statistics.median(timed)

  rebuild_times, foreign_rebuilds = [], []
  for r in range(FLAGS.rebuilds):
    with common.ForeignCpu() as foreign:
      rebuilt, seconds = _timed(lambda: construct(seed, f))
    rebuild_times.append(seconds)
    foreign_rebuilds.append(foreign.as_dict())
    logging.info('rebuild %d: %.1fs', r, seconds)
  rebuild_s = statistics.median(rebuild_times)

  after = evaluate(c.model, f.keys, FLAGS.chunk)
  others = np.setdiff1d(np.arange(n), np.array(sorted(resolved)))
  buckets = c.structure.gadgets.buckets
  index, valid = np.asarray(buckets.index), np.asarray(buckets.valid)
  below = np.sort(index[:lowest][valid[:lowest]])
  same = np.all(before[below] == after[below], axis=1)
  moved = float(np.abs(before[others] - after[others]).max())
  stored = storage.evaluate_outputs(after, f.values, f.mapping)
  edited_ok = all(int(np.argmax(after[e['fact']] @ np.asarray(f.values).T))
                  == e['value'] for e in edits)

  result = {
      'num_facts': n, 'dim': d, 'num_values': p, 'seed': seed,
      'code_dim': rep0.code_dim, 'bucket_size': rep0.bucket_size,
      'num_buckets': rep0.num_buckets, 'hidden_dim': rep0.hidden_dim,
      'construct_seconds_first': seconds_first,
      'rebuild_seconds': rebuild_times,
      'rebuild_median_seconds': rebuild_s,
      'rebuild_report_seconds': rebuilt.report.seconds,
      'edit_seconds': timed,
      'edit_median_seconds': edit_s,
      'edit_warmup_seconds': [e['seconds'] for e in edits if not e['timed']],
      'speedup': rebuild_s / edit_s,
      'speedup_vs_first_construct': seconds_first / edit_s,
      'edits': edits,
      'facts_resolved': len(resolved),
      'lowest_touched_bucket': int(lowest),
      'facts_below_lowest': int(len(below)),
      'facts_bit_identical': int(same.sum()),
      'all_below_bit_identical': bool(same.all()),
      'facts_compared': int(len(others)),
      'max_output_change_outside_resolved': moved,
      'edited_facts_decode_to_new_value': edited_ok,
      'accuracy_after': float(stored.accuracy),
      'min_margin_after': float(stored.min_margin),
      'report_min_margin_after': c.report.min_margin,
      'full_evaluation_seconds': eval_seconds,
      'foreign_cpu_first': foreign_first.as_dict(),
      'foreign_cpu_edits': foreign_edits.as_dict(),
      'foreign_cpu_rebuilds': foreign_rebuilds,
  }
  print(f'N={n} d={d} P={p}: m={rep0.code_dim} b={rep0.bucket_size} '
        f'{rep0.num_buckets} buckets, hidden {rep0.hidden_dim}')
  print(f'1-fact update edit: median {1e3 * edit_s:.1f} ms over {len(timed)} '
        f'(min {1e3 * min(timed):.1f}, max {1e3 * max(timed):.1f}); warm-up '
        + ', '.join(f"{e['seconds']:.2f}s" for e in edits if not e['timed']))
  print(f'full construct of the edited set: median {rebuild_s:.2f} s '
        f'({", ".join(f"{t:.2f}" for t in rebuild_times)}); first construct '
        f'{seconds_first:.2f} s with compilation')
  print(f'speed-up: {rebuild_s / edit_s:.0f}x')
  print(f'bit-identical outputs: {int(same.sum())} / {len(below)} facts '
        f'below bucket {lowest}; largest change of the {len(others)} facts '
        f'outside the {len(resolved)} re-solved: {moved:.2e}; edited set '
        f'accuracy {float(stored.accuracy):.4f}, min margin '
        f'{float(stored.min_margin):.4f}; edited facts decode to their new '
        f'values: {edited_ok}')
  data = {
      'benchmark': 'edit',
      'config': {'num_facts': n, 'dim': d, 'num_values': p, 'seed': seed,
                 'edits': FLAGS.edits, 'warmup_edits': FLAGS.warmup_edits,
                 'rebuilds': FLAGS.rebuilds, 'chunk': FLAGS.chunk,
                 'factset': 'keys and values uniform on the unit sphere '
                            '(untied), many_to_one_map'},
      'machine': common.machine_info(),
      'loadavg_start': load_start,
      'foreign_fraction_before': foreign_before,
      'loadavg_end': os.getloadavg(),
      'result': result,
      'timestamp': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
  }
  common.write_json(FLAGS.out, data)
  print(f'wrote {FLAGS.out}')
  ok = same.all() and float(stored.accuracy) == 1.0 and edited_ok
  return 0 if ok else 1


if __name__ == '__main__':
  app.run(main)
