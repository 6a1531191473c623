r"""Fact editing in a 1-layer Transformer: MLP swap vs ROME / MEMIT / AlphaEdit
/ fine-tuning, one harness (docs/design.md, "Fact editing").

Base: the synthetic relation of :mod:`factstore_jax.transformer.editing.relation`
(``--num_facts`` books onto ``--num_objects`` authors, 8 training and 4
held-out templates), a GD fact MLP of width ``--mlp_width`` (calibrated) in
the block, attention trained with next-token loss over every token.

For each fraction of facts edited, two disjoint edit sets of that size are
drawn: a *validation* set, on which every configuration of each method's grid
(``harness.default_grids``) is scored, and a *test* set, on which the best
configuration is reported (the highest validation score among configurations
with word-perplexity ratio <= ``--max_ppl_ratio``). Metrics: efficacy, paraphrase
(held-out templates), specificity, score (harmonic mean) and the word
perplexity ratio after/before.

Writes ``rows.csv`` (one row per method and fraction; resumable),
``grid.csv`` (every validation trial), ``editing.png`` and ``summary.md``.

  python experiments/fact_editing.py                  # ~20-30 min on 2 cores
  python experiments/fact_editing.py --fractions=0.1 --methods=swap,memit
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import jax
import numpy as np
from absl import app, flags

from factstore_jax import distributed, provenance
from factstore_jax.capacity import methods
from factstore_jax.atomic import save_figure, write_text
from factstore_jax.transformer.editing import harness
from factstore_jax.transformer.editing import relation as rel_lib
from factstore_jax.sweep import ResultsTable, process_table, run_sweep

flags.DEFINE_integer('num_facts', 1024, 'Facts (subjects) N.')
flags.DEFINE_integer('num_objects', 64, 'Objects M.')
flags.DEFINE_integer('dim', 128, 'Model dimension d.')
flags.DEFINE_integer('fact_dim', 80, 'Coordinates of subjects and objects.')
flags.DEFINE_integer('mlp_width', 64, 'Hidden width of the GD fact MLPs.')
flags.DEFINE_integer('mlp_steps', 3000, 'GD steps of every fact MLP.')
flags.DEFINE_integer('code_dim', 32, 'Code dim of the closed-form swap.')
flags.DEFINE_integer('base_steps', 2000, 'Base-model training steps.')
flags.DEFINE_float('base_lr', 1e-2, 'Base-model AdamW peak rate.')
flags.DEFINE_list('fractions', ['0.02', '0.05', '0.1', '0.25', '0.5'],
                  'Fractions of facts edited (<= 0.5: validation and test '
                  'sets are disjoint).')
flags.DEFINE_list('methods', list(harness.METHODS), 'Editing methods.')
flags.DEFINE_float('max_ppl_ratio', 1.05,
                   'Model selection: the best score among configurations '
                   'whose word-perplexity ratio is at most this (among all '
                   'if none is).')
flags.DEFINE_integer('seed', 0, 'Seed.')
flags.DEFINE_string('out_dir', 'experiments/results/fact_editing',
                    'Output folder.')
distributed.define_flags()
FLAGS = flags.FLAGS

KEY_FIELDS = ('method', 'fraction', 'seed')


def gd_options() -> methods.MethodOptions:
  return rel_lib.gd_options(FLAGS.mlp_steps)


@functools.cache
def base():
  """(relation, trained base model, base metrics)."""
  start = time.perf_counter()
  seed = FLAGS.seed
  relation = rel_lib.make_relation(
      jax.random.key(seed), FLAGS.num_facts, FLAGS.num_objects, FLAGS.dim,
      FLAGS.fact_dim)
  fs = rel_lib.fact_factset(relation)
  built = methods.build_mlp('gd', jax.random.key(seed + 1), fs,
                            FLAGS.mlp_width, options=gd_options())
  model = rel_lib.base_model(jax.random.key(seed + 2), relation,
                             rel_lib.calibrate(built.mlp, fs))
  config = dataclasses.replace(rel_lib.BASE_TRAIN, max_steps=FLAGS.base_steps,
                               learning_rate=FLAGS.base_lr)
  report = rel_lib.train_base(model, jax.random.key(seed + 3), relation,
                              config, progress=True)
  facts = np.arange(relation.num_facts)
  scores = {name: rel_lib.evaluate(model, rel_lib.all_sequences(
      relation, templates, facts))
            for name, templates in (('train', relation.train_templates),
                                    ('heldout', relation.heldout_templates))}
  info = dict(base_train_accuracy=float(scores['train'].correct.mean()),
              base_heldout_accuracy=float(scores['heldout'].correct.mean()),
              base_word_ppl=scores['train'].word_perplexity,
              base_mlp_params=built.num_params,
              base_mlp_accuracy=built.accuracy,
              base_train_seconds=report.seconds,
              base_seconds=time.perf_counter() - start)
  print('base model:', json.dumps(info))
  return relation, model, info


@functools.cache
def contexts(fraction: float):
  """(validation context, test context) for one fraction."""
  relation, model, _ = base()
  n = relation.num_facts
  k = max(1, round(fraction * n))
  if 2 * k > n:
    raise ValueError(f'fraction {fraction} leaves no disjoint test set')
  rng = np.random.default_rng([FLAGS.seed, k])
  perm = rng.permutation(n)
  out = []
  for i, facts in enumerate((np.sort(perm[:k]), np.sort(perm[k:2 * k]))):
    edits = harness.draw_edits(rng, relation, facts)
    out.append(harness.make_context(
        model, jax.random.key(1000 * FLAGS.seed + i), relation, edits))
  return tuple(out)


def describe(config: dict) -> str:
  return json.dumps({k: v for k, v in config.items() if k != 'options'})


def compute_one(c, grid_table: ResultsTable) -> dict:
  relation, model, info = base()
  val, test = contexts(c['fraction'])
  grid = harness.default_grids(FLAGS.mlp_width, FLAGS.code_dim,
                               gd_options())[c['method']]
  best, trials = harness.best_of_grid(c['method'], model, val,
                                      info['base_word_ppl'], grid,
                                      FLAGS.max_ppl_ratio)
  for t in trials:
    grid_table.append(dict(method=c['method'], fraction=c['fraction'],
                           seed=c['seed'], config=describe(t.config),
                           seconds=t.seconds, **t.scores._asdict()))
  final = harness.run_trial(c['method'], model, test, info['base_word_ppl'],
                            best.config)
  return dict(config=describe(best.config), val_score=best.scores.score,
              num_edits=len(test.edits.facts), seconds=final.seconds,
              **final.scores._asdict(), **info)


def plot(rows, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  for i, m in enumerate(dict.fromkeys(r['method'] for r in rows)):
    rs = sorted((r for r in rows if r['method'] == m),
                key=lambda r: r['fraction'])
    x = [100 * r['fraction'] for r in rs]
    ax1.plot(x, [r['score'] for r in rs], 'o-', color=f'C{i}', label=m)
    ax2.plot(x, [r['ppl_ratio'] for r in rs], 'o-', color=f'C{i}', label=m)
  ticks = sorted({100 * r['fraction'] for r in rows})
  for ax in (ax1, ax2):
    ax.set_xscale('log')
    ax.set_xticks(ticks, [f'{t:g}' for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel('facts edited (%)')
  ax1.set_ylabel('score (harmonic mean)')
  ax1.axhline(0.95, color='k', ls='--', lw=0.8)
  ax1.set_ylim(-0.02, 1.02)
  ax2.set_ylabel('word perplexity after / before')
  ax2.axhline(1.05, color='k', ls='--', lw=0.8)
  ax1.legend(fontsize=8)
  fig.suptitle('Editing a 1-layer Transformer (best of grid on validation '
               'edits, reported on test edits)', fontsize=9)
  fig.tight_layout()
  save_figure(fig, path)


def summary(rows) -> str:
  r0 = rows[0]
  lines = [
      '# fact_editing', '',
      f'N = {FLAGS.num_facts} facts onto {FLAGS.num_objects} objects, '
      f'd = {FLAGS.dim} (fact coordinates {FLAGS.fact_dim}); base: GD fact '
      f'MLP width {FLAGS.mlp_width} ({r0["base_mlp_params"]} params), '
      f'attention trained {FLAGS.base_steps} steps with next-token loss. '
      f'Best of grid on validation edits (score, among configurations with '
      f'ppl ratio <= {FLAGS.max_ppl_ratio}), reported on test edits. '
      f'Base object accuracy {r0["base_train_accuracy"]:.4f} (training '
      f'templates) / {r0["base_heldout_accuracy"]:.4f} (held-out), word '
      f'perplexity {r0["base_word_ppl"]:.3f}.', '',
      '| method | edited | best config (validation) | efficacy | paraphrase '
      '| specificity | score | ppl ratio | edit s |',
      '|---|---|---|---|---|---|---|---|---|']
  for r in sorted(rows, key=lambda r: (r['fraction'], r['method'])):
    lines.append(
        f"| {r['method']} | {100 * r['fraction']:g}% ({r['num_edits']}) | "
        f"`{r['config']}` | {r['efficacy']:.4f} | {r['paraphrase']:.4f} | "
        f"{r['specificity']:.4f} | **{r['score']:.4f}** | "
        f"{r['ppl_ratio']:.4f} | {r['seconds']:.2f} |")
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  distributed.initialize_from_flags()
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  for m in FLAGS.methods:
    if m not in harness.METHODS:
      raise ValueError(f'unknown method {m!r}; expected {harness.METHODS}')
  start = time.perf_counter()
  configs = [dict(method=m, fraction=float(f), seed=FLAGS.seed)
             for f in FLAGS.fractions for m in FLAGS.methods]
  table = ResultsTable(os.path.join(FLAGS.out_dir, 'rows.csv'), KEY_FIELDS)
  # Under jax.distributed, each process logs its trials to grid.p<i>.csv.
  grid_table = process_table(os.path.join(FLAGS.out_dir, 'grid.csv'),
                             KEY_FIELDS + ('config',))
  rows = run_sweep(configs,
                   lambda g: [compute_one(c, grid_table) for c in g], table,
                   desc='fact editing',
                   merge_only=FLAGS.merge_only)
  if not distributed.is_main_process():
    return
  plot(rows, os.path.join(FLAGS.out_dir, 'editing.png'))
  text = summary(rows)
  text += f'\nWall time of this run: {time.perf_counter() - start:.0f} s.\n'
  write_text(os.path.join(FLAGS.out_dir, 'summary.md'),
             text + provenance.footer())
  print(text)


if __name__ == '__main__':
  app.run(main)
