"""Closed-form construction across fact-set sizes: cost, margins, time.

For each N (at fixed d and P) and each seed, builds and certifies an
encoder-decoder MLP on a random isotropic fact set (keys and values on the
sphere, untied, random many-to-one map), and records one CSV row. Rows are
appended atomically and skipped on re-run, so a killed sweep loses nothing it
finished. Writes ``rows.csv``, ``params_per_fact.png`` and ``summary.md``.

  python experiments/construction_sweep.py --dim=64 --sizes=1024,2048,4096,8192
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import app, flags

from factstore_jax import distributed
from factstore_jax import factsets
from factstore_jax import provenance
from factstore_jax.atomic import save_figure, write_text
from factstore_jax.constructions.encoder_decoder import construct
from factstore_jax.sweep import ResultsTable, run_sweep

flags.DEFINE_integer('dim', 64, 'Embedding dimension d.')
flags.DEFINE_list('sizes', ['1024', '2048', '4096', '8192'], 'Numbers of facts N.')
flags.DEFINE_integer('num_values', 512, 'Value-table size P.')
flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds (fact set and construction).')
flags.DEFINE_string('out_dir', 'experiments/results/construction_sweep',
                    'Output folder.')
distributed.define_flags()
FLAGS = flags.FLAGS

FIELDS = ('num_facts', 'seed', 'dim', 'num_values', 'code_dim', 'bucket_size',
          'num_params', 'num_params_gated_mlp', 'params_per_fact', 'accuracy',
          'min_margin', 'min_normalized_margin', 'rho_projected', 'seconds')


def plot(rows: list[dict], path: str):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  sizes = sorted({int(r['num_facts']) for r in rows})
  ppf = [[float(r['params_per_fact']) for r in rows
          if int(r['num_facts']) == n] for n in sizes]
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.errorbar(sizes, [np.mean(p) for p in ppf],
              yerr=[np.std(p) for p in ppf], marker='o', capsize=3)
  ax.set_xscale('log', base=2)
  ax.set_xlabel('facts N')
  ax.set_ylabel('parameters per fact (encoder-decoder)')
  ax.set_title(f'closed-form construction, d = {rows[0]["dim"]}, '
               f'P = {rows[0]["num_values"]} (mean ± std over seeds)')
  fig.tight_layout()
  save_figure(fig, path)


def summary(rows: list[dict]) -> str:
  lines = ['| N | seeds | params/fact (mean ± std) | min margin (min) | '
           'accuracy (min) | seconds (mean) |', '|---|---|---|---|---|---|']
  for n in sorted({int(r['num_facts']) for r in rows}):
    sel = [r for r in rows if int(r['num_facts']) == n]
    ppf = np.array([float(r['params_per_fact']) for r in sel])
    lines.append(
        f'| {n} | {len(sel)} | {ppf.mean():.1f} ± {ppf.std():.1f} | '
        f'{min(float(r["min_margin"]) for r in sel):.4g} | '
        f'{min(float(r["accuracy"]) for r in sel):.4f} | '
        f'{np.mean([float(r["seconds"]) for r in sel]):.1f} |')
  return '\n'.join(lines) + '\n'


def compute(group: list[dict]) -> list[dict]:
  out = []
  for c in group:
    fs = factsets.random_factset(jax.random.key(c['seed']), c['num_facts'],
                                 c['dim'], c['num_values'], tied=False,
                                 mapping='many_to_one')
    rep = construct(c['seed'], fs).report.as_dict()
    out.append({k: rep[k] for k in FIELDS if k not in c})
  return out


def main(argv):
  del argv
  distributed.initialize_from_flags()
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  table = ResultsTable(os.path.join(FLAGS.out_dir, 'rows.csv'),
                       ('num_facts', 'seed', 'dim', 'num_values'))
  configs = [dict(num_facts=int(n), seed=int(s), dim=FLAGS.dim,
                  num_values=FLAGS.num_values)
             for n in FLAGS.sizes for s in FLAGS.seeds]
  rows = run_sweep(configs, compute, table, desc='constructions',
                   merge_only=FLAGS.merge_only)
  if not distributed.is_main_process():
    return
  plot(rows, os.path.join(FLAGS.out_dir, 'params_per_fact.png'))
  write_text(os.path.join(FLAGS.out_dir, 'summary.md'),
             summary(rows) + provenance.footer())
  print(summary(rows))


if __name__ == '__main__':
  app.run(main)
