r"""Transformer capacity: the MLP size a 1-layer Transformer needs for 99%.

For each method and N (d fixed, tied sphere, random permutation): the
standalone W* (smallest MLP storing every fact, decoding over the whole
vocabulary) and the in-Transformer W*_T: the smallest MLP whose recall
through schedule (a)'s attention (trained once per task on key copy) is at
least ``--recall`` (default 0.99), found by the same integer search over the
method's knob (:func:`factstore_jax.capacity.search_width`). Read the other
way round, W*_T(N) gives the largest N at >= 99% recall for a parameter
budget. Rows go to ``rows.csv`` (resumable); ``capacity.png`` plots N
against MLP parameters (standalone dashed, in-Transformer solid) and
``summary.md`` tabulates both.

  python experiments/transformer_capacity.py
  python experiments/transformer_capacity.py --num_facts=256,512,1024,2048
"""

from __future__ import annotations

import os
import time

import jax
from absl import app, flags

from factstore_jax import capacity, distributed, provenance
from factstore_jax.capacity import methods
from factstore_jax.atomic import save_figure, write_text
from factstore_jax.errors import ConstructionError
from factstore_jax.sweep import ResultsTable, run_sweep
from factstore_jax.transformer import train

import transformer_common as tc  # experiments/transformer_common.py

flags.DEFINE_integer('dim', 64, 'Embedding dimension d.')
flags.DEFINE_list('num_facts', ['128', '256', '512'], 'Fact counts N.')
flags.DEFINE_list('seeds', ['0'], 'Seeds.')
flags.DEFINE_list('methods', ['encoder_decoder', 'gd', 'hebbian_ridge'],
                  'Fact-MLP methods.')
flags.DEFINE_float('recall', 0.99, 'Recall threshold of W*_T.')
flags.DEFINE_integer('num_junk', 4, 'Junk vocabulary size J.')
flags.DEFINE_integer('context_len', 4, 'Junk tokens L on each side of K.')
flags.DEFINE_integer('steps', 3000, 'Attention training steps.')
flags.DEFINE_integer('mlp_steps', 10_000, 'GD step budget of the fact MLPs.')
flags.DEFINE_float('rel_tol', 0.1, 'Relative bracket of both searches.')
flags.DEFINE_string('out_dir', 'experiments/results/transformer_capacity',
                    'Output folder.')
distributed.define_flags()
FLAGS = flags.FLAGS

KEY_FIELDS = ('method', 'dim', 'num_facts', 'seed')


def compute_one(c) -> dict:
  start = time.perf_counter()
  method, dim, n, seed = c['method'], c['dim'], c['num_facts'], c['seed']
  t = tc.task(dim, n, seed, FLAGS.num_junk)
  options = tc.mlp_options(FLAGS.mlp_steps)
  key = jax.random.key(100 + seed)
  config = train.TransformerTrainConfig(max_steps=FLAGS.steps,
                             context_len=FLAGS.context_len)
  model, _, floor = tc.copy_trained(dim, n, seed, FLAGS.num_junk, config)
  alone, cap = methods.smallest_mlp(method, key, t.mlp_factset,
                                    options=options, rel_tol=FLAGS.rel_tol)
  found = {}
  made = {cap.width: tc.at_wstar(alone, cap)}

  def evaluate(widths):
    accs = []
    for w in widths:
      try:
        built = made.get(w) or methods.build_mlp(
            method, key, t.mlp_factset, w, options=options,
            code_dim=cap.code_dim)
      except ConstructionError:
        accs.append(0.0)
        continue
      model.swap_mlp(built.mlp)
      found[w] = (built, tc.recall(model, t, t.targets, seed,
                                   FLAGS.context_len))
      accs.append(found[w][1])
    return accs

  top = dim if method == 'encoder_decoder' else 16 * dim
  search = capacity.search_width(
      evaluate, start=min(cap.width, top), max_width=top,
      threshold=FLAGS.recall, rel_tol=FLAGS.rel_tol)
  row = dict(standalone_width=cap.width, standalone_params=alone.num_params,
             standalone_margin=alone.min_margin,
             seconds=0.0, **floor)
  if search.width is not None:
    built, recall = found[search.width]
    row.update(transformer_width=search.width,
               transformer_params=built.num_params,
               transformer_recall=recall,
               ratio=built.num_params / alone.num_params)
  row['seconds'] = time.perf_counter() - start
  return row


def plot(rows, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for i, method in enumerate(FLAGS.methods):
    sel = sorted((r for r in rows if r['method'] == method),
                 key=lambda r: r['num_facts'])
    color = f'C{i}'
    pts = [(r['standalone_params'], r['num_facts']) for r in sel]
    if pts:
      ax.plot(*zip(*pts), '--o', color=color, mfc='none',
              label=f'{method} standalone')
    pts = [(r['transformer_params'], r['num_facts']) for r in sel
           if r.get('transformer_params')]
    if pts:
      ax.plot(*zip(*pts), '-o', color=color,
              label=f'{method} in Transformer (≥{FLAGS.recall:.0%})')
  ax.set_xscale('log')
  ax.set_yscale('log', base=2)
  ax.set_xlabel('MLP parameters')
  ax.set_ylabel('facts N')
  ax.set_title(f'Facts recalled vs MLP size (d = {FLAGS.dim}, J = '
               f'{FLAGS.num_junk}, L = {FLAGS.context_len})', fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  save_figure(fig, path)


def summary(rows) -> str:
  lines = ['# transformer_capacity', '',
           f'd = {FLAGS.dim}; W*_T = smallest MLP with Transformer recall ≥ '
           f'{FLAGS.recall} (schedule a); rel_tol {FLAGS.rel_tol}.', '',
           '| method | N | seed | standalone W* (params) | W*_T (params) | '
           'W*_T / W* | recall at W*_T | noise max / p95 |',
           '|---|---|---|---|---|---|---|---|']
  for r in rows:
    tr = (f"{r['transformer_width']} ({r['transformer_params']})"
          if r.get('transformer_params') else 'not reached')
    ratio = f"{r['ratio']:.2f}" if r.get('ratio') else '-'
    rec = (f"{r['transformer_recall']:.4f}"
           if r.get('transformer_recall') is not None else '-')
    lines.append(
        f"| {r['method']} | {r['num_facts']} | {r['seed']} | "
        f"{r['standalone_width']} ({r['standalone_params']}) | {tr} | "
        f"{ratio} | {rec} | {r['noise_max']:.3g} / {r['noise_p95']:.3g} |")
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  distributed.initialize_from_flags()
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  configs = [dict(method=m, dim=FLAGS.dim, num_facts=int(n), seed=int(s))
             for n in FLAGS.num_facts for s in FLAGS.seeds
             for m in FLAGS.methods]
  table = ResultsTable(os.path.join(FLAGS.out_dir, 'rows.csv'), KEY_FIELDS)
  rows = run_sweep(configs, lambda g: [compute_one(c) for c in g], table,
                   desc='capacity',
                   merge_only=FLAGS.merge_only)
  if not distributed.is_main_process():
    return
  plot(rows, os.path.join(FLAGS.out_dir, 'capacity.png'))
  text = summary(rows)
  write_text(os.path.join(FLAGS.out_dir, 'summary.md'),
             text + provenance.footer())
  print(text)


if __name__ == '__main__':
  app.run(main)
