r"""Which random decoder needs the smallest code dim? Gaussian JL vs others.

The construction's decoder ``D (d, m)`` must leave every used projected value
``V D`` decodable (rho > 0), up to the ``patch`` budget. For each value
table (``--geometries``, ``P = --num_values`` values at ``d = --dim``,
``--seeds`` seeds) and each code dim in ``--code_dims`` this counts the
undecodable projected values (certified: ``rho <= 0``) of

* ``gaussian``: ``G / sqrt(m)`` (what ``construct`` draws);
* ``orthonormal``: the Q factor of the same ``G`` (orthonormal columns);
* ``pca``: the top-``m`` principal directions of the value table (fitted).

Fewer undecodable values at the same ``m`` means a smaller code dim for the
same patch budget, i.e. fewer parameters. Decodability (``rho > 0``) only
depends on the decoder's column span: ``V G`` and ``V Q = V G R^{-1}`` differ
by an invertible map of the code space, which maps separators to
separators, so ``orthonormal`` has exactly ``gaussian``'s undecodable count
(only its margins differ); it is off by default (``--kinds``).

Usage::

  python benchmarks/decoder_choice.py --num_values=4096 --dim=128 \
      --code_dims=16,20,24 --out=benchmarks/results/decoder_choice.json
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from factstore_jax.decodability import decodability
from factstore_jax import factsets as F
from factstore_jax.constructions import decoders

import common  # benchmarks/common.py (the script's folder is on sys.path)

FLAGS = flags.FLAGS
flags.DEFINE_integer('num_values', 4096, 'P.')
flags.DEFINE_integer('dim', 128, 'd.')
flags.DEFINE_list('code_dims', ['16', '20', '24'], 'Code dims m to test.')
flags.DEFINE_list('geometries', ['sphere', 'spiked'], 'Value embeddings '
                  '(random_factset embedding=; spiked uses beta=3).')
flags.DEFINE_integer('seeds', 2, 'Seeds per geometry.')
flags.DEFINE_list('kinds', ['gaussian', 'pca'], 'Decoders to compare.')
flags.DEFINE_string('out', 'benchmarks/results/decoder_choice.json',
                    'JSON output.')

KINDS = ('gaussian', 'orthonormal', 'pca')


def make_decoder(kind: str, key, values, m: int):
  """``(d, m)`` decoder of the given kind."""
  g = decoders.jl_decoder(key, values.shape[1], m, values.dtype)
  if kind == 'gaussian':
    return g
  if kind == 'orthonormal':
    return jnp.linalg.qr(g)[0]
  centred = values - values.mean(axis=0)
  return jnp.linalg.svd(centred, full_matrices=False)[2][:m].T


def main(argv):
  del argv
  unknown = set(FLAGS.kinds) - set(KINDS)
  if unknown:
    raise app.UsageError(f'--kinds: unknown {sorted(unknown)}; use {KINDS}')
  rows = []
  cells = [(g, s, m) for g in FLAGS.geometries for s in range(FLAGS.seeds)
           for m in map(int, FLAGS.code_dims)]
  for geometry, seed, m in tqdm.tqdm(cells, desc='decoders'):
    fs = F.random_factset(jax.random.PRNGKey(seed), FLAGS.num_values,
                          FLAGS.dim, embedding=geometry,
                          beta=3.0 if geometry == 'spiked' else 0.0)
    for kind in FLAGS.kinds:
      decoder = make_decoder(kind, jax.random.PRNGKey(1000 + seed), fs.values,
                             m)
      t0 = time.perf_counter()
      result = decodability(decoders.project_values(fs.values, decoder),
                                stream_size=2048)
      rho = np.asarray(result.rho)
      rows.append(dict(geometry=geometry, seed=seed, code_dim=m, decoder=kind,
                       undecodable=int((rho <= 0).sum()),
                       min_rho=float(rho.min()),
                       median_rho=float(np.median(rho)),
                       seconds=time.perf_counter() - t0))
      print(rows[-1], flush=True)
  summary = {}
  for kind in FLAGS.kinds:
    for m in map(int, FLAGS.code_dims):
      for geometry in FLAGS.geometries:
        here = [r for r in rows if r['decoder'] == kind and
                r['code_dim'] == m and r['geometry'] == geometry]
        summary[f'{geometry} m={m} {kind}'] = dict(
            undecodable_mean=float(np.mean([r['undecodable'] for r in here])),
            median_rho_mean=float(np.mean([r['median_rho'] for r in here])))
  common.write_json(FLAGS.out, dict(
      num_values=FLAGS.num_values, dim=FLAGS.dim, rows=rows, summary=summary,
      machine=common.machine_info()))
  for k, v in summary.items():
    print(f'{k:32s} undecodable {v["undecodable_mean"]:7.1f}  median rho '
          f'{v["median_rho_mean"]:.4f}')


if __name__ == '__main__':
  app.run(main)
