r"""The capacity-usability tradeoff: whitening and construction knobs.

Anisotropic tied embeddings (a rank-1 spike of strength ``--beta`` on the
sphere), whitening off / on. With whitening on, each fact MLP is built on
the whitened vocabulary (keys and the whole embedding table times the
symmetric ``W = S^{-1/2}`` of the fact embeddings) and folded back,
``g(x) = g_w(x W) W`` (:func:`factstore_jax.mlp.fold_linear`), so it stores
the same facts over the original embeddings. For each method and knob
(closed form: code dim x bucket size, and its W*; GD: hidden width, and its
W*):

* standalone storage: params, accuracy, min margin;
* Lipschitz: the weight-norm bound on the ball of the keys' norm, and the
  empirical local Jacobian norm at the keys (median, max; and its median
  relative to the output norm, which does not change with output scale);
* robustness radius at the keys (median, min over keys; random directions);
* Transformer recall with schedule (a)'s attention (trained once on key
  copy), whose noise floor ``||norm(h_Q) - k||`` is recorded too.

A second axis we control: the closed form's bucket fill (``--fills``; the
nominal bucket holds ``fill * d`` keys). Fuller buckets need fewer neurons
per fact but larger maps ``M_j`` (a larger Lipschitz constant): for each fill
the closed form at its W* (unwhitened) gets the same measurements.

Writes ``rows.csv`` (resumable), ``tradeoff.png``, ``fill.png`` and
``summary.md``, whose last sections answer, with the measured numbers,
whether whitening raised standalone capacity, raised the Lipschitz estimate
and lowered recall, and how capacity, Lipschitz and recall move with fill.

  python experiments/capacity_usability.py
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from factstore_jax import distributed, factsets, provenance, robustness, storage
from factstore_jax.capacity import methods
from factstore_jax.atomic import save_figure, write_text
from factstore_jax.errors import ConstructionError
from factstore_jax.mlp import fold_linear
from factstore_jax.sweep import ResultsTable, run_sweep
from factstore_jax.transformer import data, train

import transformer_common as tc  # experiments/transformer_common.py

flags.DEFINE_integer('dim', 64, 'Embedding dimension d.')
flags.DEFINE_integer('num_facts', 512, 'N (tied, random permutation).')
flags.DEFINE_float('beta', 3.0, 'Spike strength of the embeddings.')
flags.DEFINE_integer('seed', 0, 'Seed.')
flags.DEFINE_list('code_dims', ['16', '32', '64'], 'Closed-form code dims.')
flags.DEFINE_list('bucket_sizes', ['8', '32'], 'Closed-form bucket sizes.')
flags.DEFINE_list('gd_widths', ['16', '32', '64'], 'GD hidden widths.')
flags.DEFINE_list('fills', ['0.25', '0.5', '0.75', '0.9', '0.95', '1.0'],
                  'Closed-form bucket fills, each at its W*.')
flags.DEFINE_integer('num_junk', 4, 'Junk vocabulary size J.')
flags.DEFINE_integer('context_len', 4, 'Junk tokens L on each side of K.')
flags.DEFINE_integer('steps', 3000, 'Attention training steps.')
flags.DEFINE_integer('mlp_steps', 10_000, 'GD step budget of the fact MLPs.')
flags.DEFINE_float('rel_tol', 0.1, 'Relative bracket of the W* searches.')
flags.DEFINE_integer('num_directions', 8, 'Directions per key (radius).')
flags.DEFINE_string('out_dir', 'experiments/results/capacity_usability',
                    'Output folder.')
distributed.define_flags()
FLAGS = flags.FLAGS

KEY_FIELDS = ('method', 'whitened', 'knob')


@functools.lru_cache(maxsize=None)
def setup():
  """Spiked tied task, its vocabulary, whitening and trained attention."""
  k_fs, k_vocab = jax.random.split(jax.random.key(FLAGS.seed))
  fs = factsets.random_factset(k_fs, FLAGS.num_facts, FLAGS.dim, tied=True,
                               embedding='spiked', beta=FLAGS.beta)
  vocab = data.make_vocabulary(k_vocab, fs, FLAGS.num_junk)
  t = tc.Task(fs, vocab, data.fact_targets(vocab, fs.mapping), None,
              data.vocab_factset(vocab, fs.mapping), None)
  whiten = factsets.whitening_matrix(fs.keys)
  model = tc.new_model(t, FLAGS.seed)
  config = train.TransformerTrainConfig(max_steps=FLAGS.steps,
                             context_len=FLAGS.context_len)
  train.schedule_a(model, jax.random.key(300 + FLAGS.seed), vocab, None,
                   config)
  floor = tc.noise(model, t, FLAGS.seed, FLAGS.context_len)
  return t, whiten, model, floor


FILL = 'W*@fill='


def build(method, whitened, knob, t, whiten):
  """``(Built on the space it was made for, MLP over the original space)``."""
  fs = t.mlp_factset
  if whitened:
    fs = factsets.FactSet(fs.keys @ whiten, fs.values @ whiten, fs.mapping)
  key = jax.random.key(100 + FLAGS.seed)
  options = tc.mlp_options(FLAGS.mlp_steps)
  if knob.startswith(FILL):
    options = dataclasses.replace(options, fill=float(knob[len(FILL):]))
    knob = 'W*'
  if knob == 'W*':
    built, _ = methods.smallest_mlp(method, key, fs, options=options,
                                    rel_tol=FLAGS.rel_tol)
  elif method == 'encoder_decoder':
    code_dim, bucket = (int(v) for v in knob.split('/'))
    options = methods.MethodOptions(bucket_size=bucket)
    built = methods.build_mlp(method, key, fs, code_dim, options=options)
  else:
    built = methods.build_mlp(method, key, fs, int(knob), options=options)
  mlp = built.mlp.as_mlp()
  if whitened:
    mlp = fold_linear(mlp, whiten, whiten)
  return built, mlp


def compute_one(c) -> dict:
  start = time.perf_counter()
  t, whiten, model, floor = setup()
  try:
    built, mlp = build(c['method'], c['whitened'], c['knob'], t, whiten)
  except ConstructionError as e:
    return dict(error=str(e)[:120], seconds=time.perf_counter() - start)
  fs = t.mlp_factset
  fn = mlp
  keys = jnp.asarray(fs.keys)
  key_norm = float(jnp.max(jnp.linalg.norm(keys, axis=-1)))
  jac = np.asarray(robustness.jacobian_norm(fn, jax.random.key(7), keys))
  # Scale-free: Jacobian norm relative to the output norm at the key.
  rel = jac / np.maximum(np.linalg.norm(np.asarray(fn(keys)), axis=-1),
                         1e-30)
  radius = np.asarray(robustness.robustness_radius(
      fn, jax.random.key(8), fs._replace(keys=keys),
      num_directions=FLAGS.num_directions, max_radius=1.0, iters=16))
  standalone = storage.evaluate_fn(fn, fs._replace(keys=keys))
  model.swap_mlp(mlp)
  recall = tc.recall(model, t, t.targets, FLAGS.seed, FLAGS.context_len)
  return dict(num_params=built.num_params,
              params_per_fact=built.num_params / FLAGS.num_facts,
              standalone_accuracy=float(standalone.accuracy),
              standalone_margin=float(standalone.min_margin),
              lipschitz_bound=float(robustness.lipschitz_bound(
                  mlp, radius=key_norm)),
              jacobian_median=float(np.median(jac)),
              jacobian_max=float(jac.max()),
              relative_jacobian_median=float(np.median(rel)),
              radius_median=float(np.median(radius)),
              radius_min=float(radius.min()),
              recall=recall, seconds=time.perf_counter() - start, **floor)


def configs():
  knobs = {'encoder_decoder': ['W*'] + [f'{m}/{b}' for m in FLAGS.code_dims
                                         for b in FLAGS.bucket_sizes],
           'gd': ['W*'] + list(FLAGS.gd_widths)}
  return ([dict(method=m, whitened=w, knob=k) for m, ks in knobs.items()
           for k in ks for w in (False, True)] +
          [dict(method='encoder_decoder', whitened=False, knob=FILL + f)
           for f in FLAGS.fills])


def fill_rows(rows):
  """The fill sweep's rows, by increasing fill."""
  out = [r for r in ok(rows) if str(r['knob']).startswith(FILL)]
  return sorted(out, key=lambda r: float(r['knob'][len(FILL):]))


def plot_fill(rows, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = fill_rows(rows)
  fills = [float(r['knob'][len(FILL):]) for r in rows]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  axes[0].plot(fills, [r['params_per_fact'] for r in rows], 'o-')
  axes[0].set_ylabel('W* parameters per fact')
  axes[1].plot(fills, [r['jacobian_median'] for r in rows], 'o-',
               label='Jacobian median at keys')
  axes[1].plot(fills, [r['lipschitz_bound'] for r in rows], 's--',
               label='weight-norm Lipschitz bound')
  axes[1].set_yscale('log')
  axes[1].legend(fontsize=7)
  axes[2].plot(fills, [100 * r['recall'] for r in rows], 'o-')
  axes[2].set_ylabel('Transformer recall (%)')
  for ax in axes:
    ax.set_xlabel('bucket fill (nominal keys per bucket / d)')
  fig.suptitle(f'Closed form at W* vs bucket fill (d = {FLAGS.dim}, N = '
               f'{FLAGS.num_facts}, spike β = {FLAGS.beta}, unwhitened)',
               fontsize=9)
  fig.tight_layout()
  save_figure(fig, path)


def fill_verdict(rows) -> list[str]:
  """The fill sweep in numbers: capacity against Lipschitz and recall."""
  rows = fill_rows(rows)
  lines = ['', '## Bucket fill at W* (closed form, unwhitened)', '',
           '| fill | params/fact | Jacobian median | Lipschitz bound | '
           'radius median | recall |', '|---|---|---|---|---|---|']
  for r in rows:
    lines.append(
        f"| {r['knob'][len(FILL):]} | {r['params_per_fact']:.1f} | "
        f"{r['jacobian_median']:.3g} | {r['lipschitz_bound']:.3g} | "
        f"{r['radius_median']:.3g} | {r['recall']:.4f} |")
  if len(rows) >= 2:
    lo, hi = rows[0], rows[-1]
    lines += ['', f"From fill {lo['knob'][len(FILL):]} to "
              f"{hi['knob'][len(FILL):]}: params/fact "
              f"{lo['params_per_fact']:.1f} -> {hi['params_per_fact']:.1f}, "
              f"Jacobian median {lo['jacobian_median']:.3g} -> "
              f"{hi['jacobian_median']:.3g}, recall {lo['recall']:.4f} -> "
              f"{hi['recall']:.4f}."]
  return lines


def ok(rows):
  return [r for r in rows if r.get('recall') is not None]


def plot(rows, path, floor):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 3, figsize=(13, 4))
  for r in ok(rows):
    color = 'C0' if r['method'] == 'encoder_decoder' else 'C2'
    marker = 'x' if r['whitened'] else 'o'
    size = 70 if r['knob'] == 'W*' else 30
    for ax, x in zip(axes, ('params_per_fact', 'relative_jacobian_median',
                            'radius_median')):
      ax.scatter(r[x], 100 * r['recall'], c=color, marker=marker, s=size)
  for ax, label in zip(axes, ('MLP parameters per fact',
                              '‖J(k)‖ / ‖g(k)‖ at keys (median)',
                              'robustness radius at keys (median)')):
    ax.set_xscale('log')
    ax.set_xlabel(label)
    ax.set_ylabel('Transformer recall (%)')
  axes[2].axvline(floor['noise_p95'], color='k', ls=':', lw=1,
                  label='attention noise p95')
  axes[2].axvline(floor['noise_max'], color='k', ls='--', lw=1,
                  label='attention noise max')
  handles = [plt.Line2D([], [], color=c, marker='o', ls='', label=n)
             for c, n in (('C0', 'closed form'), ('C2', 'GD'))]
  handles += [plt.Line2D([], [], color='gray', marker=m, ls='', label=n)
              for m, n in (('o', 'raw'), ('x', 'whitened'))]
  axes[0].legend(handles=handles, fontsize=7)
  axes[2].legend(fontsize=7)
  fig.suptitle(f'Capacity vs usability (d = {FLAGS.dim}, N = '
               f'{FLAGS.num_facts}, spike β = {FLAGS.beta}; big markers: W*)',
               fontsize=9)
  fig.tight_layout()
  save_figure(fig, path)


def verdict(rows) -> list[str]:
  """Whitening's effect at W*, per method, in numbers."""
  lines = ['', '## Whitening at W* (the paper claims: more capacity, larger '
           'Lipschitz, lower recall)', '']
  for method in ('encoder_decoder', 'gd'):
    pair = {r['whitened']: r for r in ok(rows)
            if r['method'] == method and r['knob'] == 'W*'}
    if set(pair) != {False, True}:
      lines.append(f'- {method}: W* rows missing')
      continue
    raw, wh = pair[False], pair[True]
    lines.append(
        f"- {method}: params/fact {raw['params_per_fact']:.1f} -> "
        f"{wh['params_per_fact']:.1f} (capacity "
        f"{'raised' if wh['num_params'] < raw['num_params'] else 'not raised'}"
        f"); Jacobian median {raw['jacobian_median']:.3g} -> "
        f"{wh['jacobian_median']:.3g} (relative "
        f"{raw['relative_jacobian_median']:.3g} -> "
        f"{wh['relative_jacobian_median']:.3g}), bound "
        f"{raw['lipschitz_bound']:.3g} -> "
        f"{wh['lipschitz_bound']:.3g} (Lipschitz "
        f"{'raised' if wh['jacobian_median'] > raw['jacobian_median'] else 'not raised'}"
        f"); radius median {raw['radius_median']:.3g} -> "
        f"{wh['radius_median']:.3g}; recall {raw['recall']:.4f} -> "
        f"{wh['recall']:.4f} ("
        f"{'lowered' if wh['recall'] < raw['recall'] else 'not lowered'}).")
  return lines


def summary(rows, floor) -> str:
  lines = ['# capacity_usability', '',
           f"d = {FLAGS.dim}, N = {FLAGS.num_facts}, tied spiked embeddings "
           f"(β = {FLAGS.beta}), J = {FLAGS.num_junk}, L = "
           f"{FLAGS.context_len}. Attention (schedule a) noise floor: max "
           f"{floor['noise_max']:.3g}, p95 {floor['noise_p95']:.3g}, mean "
           f"{floor['noise_mean']:.3g}.", '',
           '| method | whitened | knob | params/fact | margin | Lipschitz '
           'bound | Jacobian median / max | relative Jacobian | radius median '
           '/ min | recall |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    if r.get('recall') is None:
      lines.append(f"| {r['method']} | {r['whitened']} | {r['knob']} | "
                   f"failed: {r.get('error')} | | | | | | |")
      continue
    lines.append(
        f"| {r['method']} | {r['whitened']} | {r['knob']} | "
        f"{r['params_per_fact']:.1f} | {r['standalone_margin']:.3g} | "
        f"{r['lipschitz_bound']:.3g} | {r['jacobian_median']:.3g} / "
        f"{r['jacobian_max']:.3g} | {r['relative_jacobian_median']:.3g} | "
        f"{r['radius_median']:.3g} / "
        f"{r['radius_min']:.3g} | {r['recall']:.4f} |")
  return '\n'.join(lines + verdict(rows) + fill_verdict(rows)) + '\n'


def main(argv):
  del argv
  distributed.initialize_from_flags()
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  table = ResultsTable(os.path.join(FLAGS.out_dir, 'rows.csv'), KEY_FIELDS)
  rows = run_sweep(configs(), lambda g: [compute_one(c) for c in g], table,
                   desc='knobs',
                   merge_only=FLAGS.merge_only)
  if not distributed.is_main_process():
    return
  floor = setup()[3]
  plot(rows, os.path.join(FLAGS.out_dir, 'tradeoff.png'), floor)
  plot_fill(rows, os.path.join(FLAGS.out_dir, 'fill.png'))
  text = summary(rows, floor)
  write_text(os.path.join(FLAGS.out_dir, 'summary.md'),
             text + provenance.footer())
  print(text)


if __name__ == '__main__':
  app.run(main)
