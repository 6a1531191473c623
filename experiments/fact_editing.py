r"""Fact editing in a 1-layer Transformer: MLP swap (GD or constructed) vs
ROME / MEMIT / AlphaEdit / fine-tuning, one harness (docs/design.md, "Fact
editing").

Base, per seed: the synthetic relation of
:mod:`factstore_jax.transformer.editing.relation` (``--num_facts`` books onto
``--num_objects`` authors; 8 training, 4 held-out and 3 mixed held-out
templates, the mixed ones with a distractor subject), a GD fact
MLP of width ``--mlp_width`` (calibrated) in the block, attention trained
with next-token loss over every token.

For each seed and fraction of facts edited, two disjoint edit sets of that
size are drawn: a *validation* set, on which every configuration of each
method's grid (``harness.default_grids``) is scored, and a *test* set, on
which the best configuration is reported (``harness.best_of_grid``: among
configurations with word-perplexity ratio <= ``--max_ppl_ratio``, the
quietest whose validation score clears ``--target_score`` by two binomial
standard errors, else the highest score). Metrics:
efficacy, paraphrase (held-out templates), specificity, score (harmonic
mean), the word perplexity ratio after/before, and mixed paraphrase (held-out
templates with a distractor subject: the fact MLP's input is a mixture, so
this measures how an edit generalises beyond its exact keys).

Writes ``rows.csv`` (one row per method, fraction and seed; resumable),
``grid.csv`` (every validation trial), ``editing.png`` and ``summary.md``
(means over seeds with Student-t intervals).

  python experiments/fact_editing.py      # 3 seeds, every method: ~40 min on 2 cores
  python experiments/fact_editing.py --fractions=0.1 --methods=swap,memit
  python experiments/fact_editing.py --fractions=0.1 --seeds=0,1,2 \
      --methods=swap,swap_constructed --num_facts=4096 \
      --out_dir=experiments/results/fact_editing_swap/n4096
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

from factstore_jax import distributed, provenance, stats
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
                   'Model selection: only configurations whose word-'
                   'perplexity ratio is at most this (all if none is).')
flags.DEFINE_float('target_score', harness.TARGET_SCORE,
                   'Model selection: among those, the lowest ppl ratio whose '
                   'score is at least this plus two binomial standard errors '
                   'of the edit count (harness.score_bar); if none is, the '
                   'highest score. Also the summary\'s "meets" bar.')
flags.DEFINE_list('seeds', ['0', '1', '2'],
                  'Seeds: each one its own relation, base model and edit '
                  'sets; the summary gives Student-t intervals over them.')
flags.DEFINE_string('out_dir', 'experiments/results/fact_editing',
                    'Output folder.')
distributed.define_flags()
FLAGS = flags.FLAGS

KEY_FIELDS = ('method', 'fraction', 'seed')


def gd_options() -> methods.MethodOptions:
  return rel_lib.gd_options(FLAGS.mlp_steps)


@functools.cache
def base(seed: int):
  """(relation, trained base model, base metrics) of one seed."""
  start = time.perf_counter()
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
  scores = {name: harness.evaluate_all_facts(model, relation, templates)
            for name, templates in (('train', relation.train_templates),
                                    ('heldout', relation.heldout_templates),
                                    ('mixed', relation.mixed_templates))}
  info = dict(base_train_accuracy=float(scores['train'].correct.mean()),
              base_heldout_accuracy=float(scores['heldout'].correct.mean()),
              base_mixed_accuracy=float(scores['mixed'].correct.mean()),
              base_word_ppl=scores['train'].word_perplexity,
              base_mlp_params=built.num_params,
              base_mlp_accuracy=built.accuracy,
              base_train_seconds=report.seconds,
              base_seconds=time.perf_counter() - start)
  print('base model:', json.dumps(info))
  return relation, model, info


@functools.cache
def contexts(seed: int, fraction: float):
  """(validation context, test context) for one seed and fraction."""
  relation, model, _ = base(seed)
  n = relation.num_facts
  k = max(1, round(fraction * n))
  if 2 * k > n:
    raise ValueError(f'fraction {fraction} leaves no disjoint test set')
  rng = np.random.default_rng([seed, k])
  perm = rng.permutation(n)
  out = []
  for i, facts in enumerate((np.sort(perm[:k]), np.sort(perm[k:2 * k]))):
    edits = harness.draw_edits(rng, relation, facts)
    out.append(harness.make_context(
        model, jax.random.key(1000 * seed + i), relation, edits))
  return tuple(out)


def describe(config: dict) -> str:
  return json.dumps({k: v for k, v in config.items() if k != 'options'})


def compute_one(c, grid_table: ResultsTable) -> dict:
  relation, model, info = base(c['seed'])
  val, test = contexts(c['seed'], c['fraction'])
  grid = harness.default_grids(FLAGS.mlp_width, FLAGS.code_dim,
                               gd_options())[c['method']]
  best, trials = harness.best_of_grid(c['method'], model, val,
                                      info['base_word_ppl'], grid,
                                      FLAGS.max_ppl_ratio, FLAGS.target_score)
  for t in trials:
    grid_table.append(dict(method=c['method'], fraction=c['fraction'],
                           seed=c['seed'], config=describe(t.config),
                           seconds=t.seconds, **t.scores._asdict()))
  final = harness.run_trial(c['method'], model, test, info['base_word_ppl'],
                            best.config)
  return dict(config=describe(best.config), val_score=best.scores.score,
              num_edits=len(test.edits.facts), seconds=final.seconds,
              **final.scores._asdict(), **info)


def _by_method_fraction(rows) -> dict:
  """``{(method, fraction): [rows of each seed]}`` in table order."""
  out = {}
  for r in sorted(rows, key=lambda r: (r['fraction'], r['method'],
                                       r['seed'])):
    out.setdefault((r['method'], r['fraction']), []).append(r)
  return out


def plot(rows, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  groups = _by_method_fraction(rows)
  for i, m in enumerate(dict.fromkeys(r['method'] for r in rows)):
    cells = sorted((f, rs) for (mm, f), rs in groups.items() if mm == m)
    x = [100 * f for f, _ in cells]
    for ax, field in ((ax1, 'score'), (ax2, 'ppl_ratio')):
      iv = [stats.mean_interval([r[field] for r in rs]) for _, rs in cells]
      mean = np.array([v['mean'] for v in iv])
      err = np.array([[v['mean'] - v['low'], v['high'] - v['mean']]
                      if v['n'] > 1 else [0.0, 0.0] for v in iv]).T
      ax.errorbar(x, mean, yerr=err, fmt='o-', color=f'C{i}', capsize=3,
                  label=m)
  ticks = sorted({100 * r['fraction'] for r in rows})
  for ax in (ax1, ax2):
    ax.set_xscale('log')
    ax.set_xticks(ticks, [f'{t:g}' for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel('facts edited (%)')
  ax1.set_ylabel('score (harmonic mean)')
  ax1.axhline(FLAGS.target_score, color='k', ls='--', lw=0.8)
  ax1.set_ylim(-0.02, 1.02)
  ax2.set_ylabel('word perplexity after / before')
  ax2.axhline(FLAGS.max_ppl_ratio, color='k', ls='--', lw=0.8)
  ax1.legend(fontsize=8)
  seeds = len({r['seed'] for r in rows})
  fig.suptitle('Editing a 1-layer Transformer (best of grid on validation '
               f'edits, reported on test edits; mean over {seeds} seed(s), '
               '95% t-intervals)', fontsize=9)
  fig.tight_layout()
  save_figure(fig, path)


def _ci(rs, field) -> str:
  return stats.format_mean_interval(
      stats.mean_interval([r[field] for r in rs]))


def summary(rows) -> str:
  seeds = sorted({r['seed'] for r in rows})
  base_rows = {r['seed']: r for r in rows}.values()
  span = lambda f: (f'{min(r[f] for r in base_rows):.4f}-'
                    f'{max(r[f] for r in base_rows):.4f}')
  lines = [
      '# fact_editing', '',
      f'N = {FLAGS.num_facts} facts onto {FLAGS.num_objects} objects, '
      f'd = {FLAGS.dim} (fact coordinates {FLAGS.fact_dim}), seeds '
      f'{", ".join(map(str, seeds))}; base: GD fact MLP width '
      f'{FLAGS.mlp_width}, attention trained {FLAGS.base_steps} steps with '
      'next-token loss on the training templates. Best of '
      'grid on validation edits (among configurations with ppl ratio '
      f'<= {FLAGS.max_ppl_ratio}: the lowest ratio whose score clears '
      f'{FLAGS.target_score} by two binomial standard errors of the edit '
      'count, else the highest score), reported on test edits. Base object '
      f'accuracy over seeds: {span("base_train_accuracy")} (training '
      f'templates), {span("base_heldout_accuracy")} (held-out), '
      f'{span("base_mixed_accuracy")} (held-out with a distractor subject); '
      f'word perplexity {span("base_word_ppl")}.', '',
      'Score = harmonic mean of efficacy (training templates), paraphrase '
      '(held-out templates) and specificity. *Mixed paraphrase*: the edited '
      'facts in held-out templates with a distractor subject before the real '
      'one, where attention delivers a mixture of the two subjects to the '
      'fact MLP; compare it with the base model\'s accuracy on the same '
      'templates. Means over seeds with 95% Student-t intervals; *meets*: '
      f'score >= {FLAGS.target_score} and ppl ratio <= {FLAGS.max_ppl_ratio} '
      'in every seed.',
      '',
      '| method | edited | seeds | score | efficacy | paraphrase | mixed '
      'paraphrase | base mixed | ppl ratio | meets |',
      '|---|---|---|---|---|---|---|---|---|---|']
  for (m, f), rs in _by_method_fraction(rows).items():
    meets = all(r['score'] >= FLAGS.target_score
                and r['ppl_ratio'] <= FLAGS.max_ppl_ratio
                for r in rs)
    lines.append(
        f"| {m} | {100 * f:g}% ({rs[0]['num_edits']}) | {len(rs)} | "
        f"**{_ci(rs, 'score')}** | {_ci(rs, 'efficacy')} | "
        f"{_ci(rs, 'paraphrase')} | {_ci(rs, 'paraphrase_mixed')} | "
        f"{_ci(rs, 'base_mixed_accuracy')} | {_ci(rs, 'ppl_ratio')} | "
        f"{'yes' if meets else 'no'} |")
  lines += [
      '', '## Per seed', '',
      '| method | edited | seed | best config (validation) | efficacy | '
      'paraphrase | mixed paraphrase | specificity | score | ppl ratio | '
      'edit s |',
      '|---|---|---|---|---|---|---|---|---|---|---|']
  for (m, f), rs in _by_method_fraction(rows).items():
    for r in rs:
      lines.append(
          f"| {m} | {100 * f:g}% ({r['num_edits']}) | {r['seed']} | "
          f"`{r['config']}` | {r['efficacy']:.4f} | {r['paraphrase']:.4f} | "
          f"{r['paraphrase_mixed']:.4f} | {r['specificity']:.4f} | "
          f"**{r['score']:.4f}** | {r['ppl_ratio']:.4f} | "
          f"{r['seconds']:.2f} |")
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  distributed.initialize_from_flags()
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  for m in FLAGS.methods:
    if m not in harness.METHODS:
      raise ValueError(f'unknown method {m!r}; expected {harness.METHODS}')
  start = time.perf_counter()
  configs = [dict(method=m, fraction=float(f), seed=int(seed))
             for seed in FLAGS.seeds for f in FLAGS.fractions
             for m in FLAGS.methods]
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
