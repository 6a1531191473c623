r"""What keeping the search's model saves :func:`~factstore_jax.methods.smallest_mlp`.

``smallest_mlp`` used to search W* and then train the MLP at W* again; a GD
search now keeps the model it trained at W* (``find_capacity(...,
keep_models=True)``). Per seed, at ``capacity_usability --stats``'s setting
(d = ``--dim`` 64, N = ``--num_facts`` 2,048 tied spiked facts with
``--beta`` 1.5, 10,000 GD steps, ``rel_tol`` 0.1), in one process:

* ``kept``: the wall time of ``smallest_mlp('gd', ...)`` (search + the kept
  model's re-certification);
* ``rebuild``: the wall time of ``build_mlp('gd', ...)`` at the W* found,
  which the old ``smallest_mlp`` ran after the same search;
* the saving ``rebuild / (kept + rebuild)``, and both models' accuracy,
  minimum margin and the largest output difference between them.

Prints a table and writes ``benchmarks/results/smallest_mlp.json``.

  python benchmarks/smallest_mlp.py               # seed 1 (~8 min, 1 core)
  python benchmarks/smallest_mlp.py --seeds=1,2
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from absl import app, flags

from factstore_jax import factsets, training
from factstore_jax.capacity import methods

import common  # benchmarks/common.py

flags.DEFINE_integer('dim', 64, 'd.')
flags.DEFINE_integer('num_facts', 2048, 'N (tied).')
flags.DEFINE_float('beta', 1.5, 'Spike strength of the embeddings.')
flags.DEFINE_integer('steps', 10_000, 'GD step budget.')
flags.DEFINE_float('rel_tol', 0.1, 'Relative bracket of the W* search.')
flags.DEFINE_list('seeds', ['1'], 'Seeds (fact set and initialisation).')
flags.DEFINE_string('out', 'benchmarks/results/smallest_mlp.json',
                    'JSON output.')
FLAGS = flags.FLAGS


def one_seed(seed: int) -> dict:
  fs = factsets.random_factset(jax.random.key(seed), FLAGS.num_facts,
                               FLAGS.dim, tied=True, embedding='spiked',
                               beta=FLAGS.beta)
  key = jax.random.key(100 + seed)
  options = methods.MethodOptions(
      train=training.TrainConfig(max_steps=FLAGS.steps))
  t0 = time.perf_counter()
  kept, cap = methods.smallest_mlp('gd', key, fs, options=options,
                                   rel_tol=FLAGS.rel_tol)
  kept_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  rebuilt = methods.build_mlp('gd', key, fs, cap.width, options=options)
  rebuild_s = time.perf_counter() - t0
  diff = float(jnp.max(jnp.abs(kept.mlp(fs.keys) - rebuilt.mlp(fs.keys))))
  return dict(seed=seed, width=cap.width, tested=cap.tested,
              kept_seconds=kept_s, rebuild_seconds=rebuild_s,
              saving=rebuild_s / (kept_s + rebuild_s),
              kept_accuracy=kept.accuracy, kept_margin=kept.min_margin,
              rebuilt_accuracy=rebuilt.accuracy,
              rebuilt_margin=rebuilt.min_margin, max_output_diff=diff)


def main(argv):
  del argv
  out = dict(config=dict(dim=FLAGS.dim, num_facts=FLAGS.num_facts,
                         beta=FLAGS.beta, steps=FLAGS.steps,
                         rel_tol=FLAGS.rel_tol),
             machine=common.machine_info(), seeds=[])
  print('seed  W*  kept s  rebuild s  saving  kept acc/margin  '
        'rebuilt acc/margin  max |diff|')
  for seed in FLAGS.seeds:
    r = one_seed(int(seed))
    out['seeds'].append(r)
    print(f"{r['seed']:4d} {r['width']:3d} {r['kept_seconds']:7.1f} "
          f"{r['rebuild_seconds']:10.1f} {r['saving']:7.1%} "
          f"{r['kept_accuracy']:.4f}/{r['kept_margin']:.2e} "
          f"{r['rebuilt_accuracy']:.4f}/{r['rebuilt_margin']:.2e} "
          f"{r['max_output_diff']:.1e}", flush=True)
    common.write_json(FLAGS.out, out)


if __name__ == '__main__':
  app.run(main)
