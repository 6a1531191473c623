r"""Recall of a 1-layer Transformer through a plugged-in fact MLP.

For each method (closed-form encoder-decoder, GD MLP, Hebbian ridge), size
(d, N) and seed: the fact MLP at the method's standalone W* (built for the
whole vocabulary, see ``transformer_common``), then both schedules of
docs/design.md, "Transformers and usability":

* (a) attention trained on key copy with the identity MLP, the fact MLP
  inserted untouched;
* (b) the frozen fact MLP inserted, attention trained through it;

and for each, recall on the facts (``swap=False``) and, after swapping in an
MLP built at the same knob for a *different* permutation over the same
embeddings, recall on that map (``swap=True``). Also the attention noise
floor ``||norm(h_Q) - k||`` (max / mean / p95). Rows go to ``rows.csv``
(resumable); ``recall.png`` and ``summary.md`` are written at the end.

  python experiments/transformer_recall.py                  # d=64, N=512
  python experiments/transformer_recall.py --dims=64,128 --num_facts=512,2048
"""

from __future__ import annotations

import os
import time

import jax
from absl import app, flags

from factstore_jax import distributed, provenance
from factstore_jax.atomic import save_figure, write_text
from factstore_jax.sweep import ResultsTable, run_sweep
from factstore_jax.transformer import train

import transformer_common as tc  # experiments/transformer_common.py

flags.DEFINE_list('dims', ['64'], 'Embedding dimensions d.')
flags.DEFINE_list('num_facts', ['512'], 'Fact counts N.')
flags.DEFINE_list('seeds', ['0'], 'Seeds.')
flags.DEFINE_list('methods', ['encoder_decoder', 'gd', 'hebbian_ridge'],
                  'Fact-MLP methods (see factstore_jax.methods).')
flags.DEFINE_list('schedules', ['a', 'b'],
                  'Schedules (docs/design.md, "Transformers and usability").')
flags.DEFINE_integer('num_junk', 4, 'Junk vocabulary size J.')
flags.DEFINE_integer('context_len', 4, 'Junk tokens L on each side of K.')
flags.DEFINE_integer('steps', 3000, 'Attention training steps.')
flags.DEFINE_float('learning_rate', 3e-2, 'Attention AdamW peak rate.')
flags.DEFINE_integer('mlp_steps', 10_000, 'GD step budget of the fact MLPs.')
flags.DEFINE_float('rel_tol', 0.1, 'Relative bracket of the W* searches.')
flags.DEFINE_string('out_dir', 'experiments/results/transformer_recall',
                    'Output folder.')
distributed.define_flags()
FLAGS = flags.FLAGS

KEY_FIELDS = ('method', 'dim', 'num_facts', 'seed', 'schedule', 'swap')


def attn_config() -> train.TransformerTrainConfig:
  return train.TransformerTrainConfig(max_steps=FLAGS.steps,
                           learning_rate=FLAGS.learning_rate,
                           context_len=FLAGS.context_len)


def compute_one(c) -> dict:
  start = time.perf_counter()
  dim, n, seed = c['dim'], c['num_facts'], c['seed']
  t = tc.task(dim, n, seed, FLAGS.num_junk)
  pair = tc.wstar_pair(c['method'], dim, n, seed, FLAGS.num_junk,
                       FLAGS.rel_tol, FLAGS.mlp_steps)
  config = attn_config()
  if c['schedule'] == 'a':
    model, report, floor = tc.copy_trained(dim, n, seed, FLAGS.num_junk,
                                           config)
  else:
    model, report, floor = b_trained(c['method'], dim, n, seed, config)
  built, targets = ((pair.alt, t.alt_targets) if c['swap']
                    else (pair.built, t.targets))
  model.swap_mlp(built.mlp)
  recall = tc.recall(model, t, targets, seed, FLAGS.context_len)
  return dict(recall=recall, width=pair.width,
              num_params=built.num_params,
              params_per_fact=built.num_params / n,
              standalone_accuracy=built.accuracy,
              standalone_margin=built.min_margin,
              train_steps=report.steps, train_seconds=report.seconds,
              mlp_seconds=pair.seconds, seconds=time.perf_counter() - start,
              **floor)


_B = {}


def b_trained(method, dim, n, seed, config):
  """Schedule (b)'s model for one method (memoised)."""
  key = (method, dim, n, seed)
  if key not in _B:
    t = tc.task(dim, n, seed, FLAGS.num_junk)
    pair = tc.wstar_pair(method, dim, n, seed, FLAGS.num_junk, FLAGS.rel_tol,
                         FLAGS.mlp_steps)
    model = tc.new_model(t, seed)
    report = train.schedule_b(model, jax.random.key(600 + seed), t.vocab, pair.built.mlp,
                              t.targets, config)
    _B[key] = (model, report, tc.noise(model, t, seed, FLAGS.context_len))
  return _B[key]


def plot(rows, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4))
  labels, vals = [], []
  for r in rows:
    labels.append(f"{r['method']}\nd={r['dim']} N={r['num_facts']}\n"
                  f"({r['schedule']}){' swap' if r['swap'] else ''}")
    vals.append(100 * r['recall'])
  colors = ['C0' if not r['swap'] else 'C1' for r in rows]
  ax.bar(range(len(vals)), vals, color=colors)
  ax.axhline(99, color='k', ls='--', lw=0.8, label='99%')
  ax.set_xticks(range(len(vals)), labels, fontsize=5.5)
  ax.set_ylabel('recall at Q (%)')
  ax.set_ylim(min(vals + [90]) - 2, 100.5)
  ax.set_title('Transformer recall through a plugged-in fact MLP '
               '(blue: own map, orange: eval-MLP swap)', fontsize=8)
  fig.tight_layout()
  save_figure(fig, path)


def summary(rows) -> str:
  lines = ['# transformer_recall', '',
           f'J = {FLAGS.num_junk} junk tokens, L = {FLAGS.context_len}, '
           f'{FLAGS.steps} attention steps; fact MLPs at their standalone W* '
           f'(rel_tol {FLAGS.rel_tol}), decoding over the whole vocabulary.',
           '', '| method | d | N | seed | schedule | swap | recall | MLP params '
           '| params/fact | standalone margin | noise max / p95 |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(
        f"| {r['method']} | {r['dim']} | {r['num_facts']} | {r['seed']} | "
        f"{r['schedule']} | {r['swap']} | {r['recall']:.4f} | "
        f"{r['num_params']} | {r['params_per_fact']:.1f} | "
        f"{r['standalone_margin']:.3g} | {r['noise_max']:.3g} / "
        f"{r['noise_p95']:.3g} |")
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  distributed.initialize_from_flags()
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  configs = [dict(method=m, dim=int(d), num_facts=int(n), seed=int(s),
                  schedule=sc, swap=sw)
             for d in FLAGS.dims for n in FLAGS.num_facts
             for s in FLAGS.seeds for m in FLAGS.methods
             for sc in FLAGS.schedules for sw in (False, True)]
  table = ResultsTable(os.path.join(FLAGS.out_dir, 'rows.csv'), KEY_FIELDS)
  rows = run_sweep(configs, lambda g: [compute_one(c) for c in g], table,
                   desc='recall',
                   merge_only=FLAGS.merge_only)
  if not distributed.is_main_process():
    return
  plot(rows, os.path.join(FLAGS.out_dir, 'recall.png'))
  text = summary(rows)
  write_text(os.path.join(FLAGS.out_dir, 'summary.md'),
             text + provenance.footer())
  print(text)



if __name__ == '__main__':
  app.run(main)
