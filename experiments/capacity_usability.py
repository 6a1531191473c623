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

Statistics mode (``--stats``): the same claims over a grid instead of one
setup, with intervals. For every seed (``--stats_seeds``, default 0-4) x
spike strength (``--stats_betas``, default 1.5, 3, 5) x N
(``--stats_num_facts``, default 512, 2048) at ``--dim``, the setup (task,
whitening and schedule (a)'s attention, once per ``(seed, beta, N)``, with the
single-setup mode's key derivations) gets the W* rows of both methods with
whitening off and on, and the closed form's W* (unwhitened) at each of
``--stats_fills`` (default 0.5, 1.0; the default fill 0.95 is the unwhitened
W* row itself). Recall is counted over ``--stats_contexts`` (default 16)
contexts per fact: ``recall_hits`` of ``recall_trials = N * contexts``
queries per row. Writes to ``experiments/results/capacity_usability_stats``
(or ``--out_dir``):

* ``rows.csv``, keyed by (dim, num_facts, seed, beta, method, whitened,
  knob), resumable: a killed run computes only the missing rows when run
  again, and the rows are ordered N first (all N = 512 rows before N = 2048),
  then seed, so a partial table holds whole seeds of the cheap N. Budget
  flags (``--steps``, ``--mlp_steps``, ...) are recorded in every row and a
  resumed table must match them. A row's time is measured in its
  ``seconds`` column (the setup's attention training, shared by the setup's
  rows, in ``setup_seconds``); the summary reports their median and total.
* ``summary.md`` and ``summary.json`` (the same numbers): per (beta, N) and
  method, params/fact with whitening off and on (mean ± std over seeds), the
  paired difference with a 95% Student t interval over seeds and the number
  of seeds where whitening lowered W*, the Jacobian median ratio
  whitened / raw, recall pooled over seeds with Wilson 95% intervals; per
  fill, params/fact, Jacobian median and recall; the recall resolution
  (Wilson half-widths at the pooled query counts); and a verdict per claim
  (holds / does not hold / not resolved, from the intervals).
* ``stats.png``: the paired effects per (beta, N) and the fill rows.
* ``rounds.jsonl``: every width GD's W* searches trained
  (:class:`factstore_jax.capacity.RoundLog`); a row killed mid-search
  resumes from it, and its ``seconds`` include the journaled rounds'.

  python experiments/capacity_usability.py --stats

A GD row at N = 2048 takes about 200-950 s on one core of the 2-core
development CPU; there, run the grid as two local ``jax.distributed``
processes, one per core (each (N, seed, beta) setup stays on one process,
setups dealt by the checked-in rows' seconds, :func:`stats_row_cost`;
``docs/distributed.md``)::

  for i in 0 1; do taskset -c $i python experiments/capacity_usability.py \
      --stats --coordinator_address=127.0.0.1:12356 --num_processes=2 \
      --process_id=$i & done; wait

``--stats --quick`` runs a tiny grid for the tests (d = 16, N = 32, seeds 0
and 1, beta 3, fill 1.0, tiny budgets; flags given explicitly win) into
``--out_dir``, by default ``capacity_usability_stats_quick`` beside the
stats folder, so it never mixes with the real grid's rows.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from factstore_jax import (distributed, factsets, provenance, robustness,
                           stats, storage)
from factstore_jax.capacity import methods
from factstore_jax.capacity.rounds import RoundLog
from factstore_jax.atomic import save_figure, write_text
from factstore_jax.constructions import gadgets
from factstore_jax.errors import ConstructionError
from factstore_jax.mlp import fold_linear
from factstore_jax.sweep import (ResultsTable, format_value, recorded_seconds,
                                 reference_rows, run_sweep)
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
                    'Output folder (with --stats its default is '
                    'experiments/results/capacity_usability_stats).')
flags.DEFINE_bool('stats', False,
                  'Statistics mode: W* with whitening off / on and the fill '
                  'rows over a grid of seeds x betas x N, with intervals.')
flags.DEFINE_list('stats_seeds', ['0', '1', '2', '3', '4'],
                  '--stats: seeds.')
flags.DEFINE_list('stats_betas', ['1.5', '3', '5'],
                  '--stats: spike strengths (>= 0).')
flags.DEFINE_list('stats_num_facts', ['512', '2048'],
                  '--stats: numbers of facts N (>= 2), smallest first.')
flags.DEFINE_list('stats_fills', ['0.5', '1.0'],
                  '--stats: closed-form bucket fills in (0, 1] at W* '
                  '(unwhitened), besides the default fill of the W* row.')
flags.DEFINE_integer('stats_contexts', 16,
                     '--stats: contexts per fact of the recall test '
                     '(N * this many queries per row).')
flags.DEFINE_bool('quick', False,
                  '--stats on a tiny grid (tests): d 16, N 32, seeds 0,1, '
                  'beta 3, fill 1.0 and tiny budgets; flags given on the '
                  'command line win.')
distributed.define_flags()
FLAGS = flags.FLAGS

KEY_FIELDS = ('method', 'whitened', 'knob')
ROUNDS = 'rounds.jsonl'  # --stats: GD W* search rounds (capacity.RoundLog)


@functools.lru_cache(maxsize=None)
def setup_for(seed: int, beta: float, num_facts: int):
  """Spiked tied task, its vocabulary, whitening and trained attention.

  Computed once per ``(seed, beta, num_facts)`` (at the flags' ``dim`` and
  budgets). Returns ``(task, whitening, model, noise floor, seconds)``.
  """
  start = time.perf_counter()
  k_fs, k_vocab = jax.random.split(jax.random.key(seed))
  fs = factsets.random_factset(k_fs, num_facts, FLAGS.dim, tied=True,
                               embedding='spiked', beta=beta)
  vocab = data.make_vocabulary(k_vocab, fs, FLAGS.num_junk)
  t = tc.Task(fs, vocab, data.fact_targets(vocab, fs.mapping), None,
              data.vocab_factset(vocab, fs.mapping), None)
  whiten = factsets.whitening_matrix(fs.keys)
  model = tc.new_model(t, seed)
  config = train.TransformerTrainConfig(max_steps=FLAGS.steps,
                             context_len=FLAGS.context_len)
  train.schedule_a(model, jax.random.key(300 + seed), vocab, None,
                   config)
  floor = tc.noise(model, t, seed, FLAGS.context_len)
  return t, whiten, model, floor, time.perf_counter() - start


def setup():
  """The single setup of the flags' ``seed``, ``beta`` and ``num_facts``."""
  return setup_for(FLAGS.seed, FLAGS.beta, FLAGS.num_facts)[:4]


FILL = 'W*@fill='


def build(method, whitened, knob, t, whiten, seed, replay=None):
  """``(Built on the space it was made for, MLP over the original space)``.

  ``replay``: ``known`` / ``on_round`` for a W* search (a rounds journal).
  """
  fs = t.mlp_factset
  if whitened:
    fs = factsets.FactSet(fs.keys @ whiten, fs.values @ whiten, fs.mapping)
  key = jax.random.key(100 + seed)
  options = tc.mlp_options(FLAGS.mlp_steps)
  if knob.startswith(FILL):
    options = dataclasses.replace(options, fill=float(knob[len(FILL):]))
    knob = 'W*'
  if knob == 'W*':
    built, _ = methods.smallest_mlp(method, key, fs, options=options,
                                    rel_tol=FLAGS.rel_tol, **(replay or {}))
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
  """A row of the single setup (the flags' seed, beta and N)."""
  start = time.perf_counter()
  t, whiten, model, floor = setup()
  return measure(c, t, whiten, model, floor, FLAGS.seed, FLAGS.num_facts,
                 start)


def measure(c, t, whiten, model, floor, seed, num_facts, start,
            contexts_per_fact=None, journal=None) -> dict:
  """Builds ``c``'s MLP on setup ``(t, whiten, model)`` and measures it.

  With ``contexts_per_fact`` the recall is counted (``recall_hits`` of
  ``recall_trials`` queries); without, it is ``tc.recall``'s rate.
  ``journal``: ``(RoundLog, cell, setup)`` for a GD W* search, which then
  resumes from the journaled widths; the row's seconds include theirs.
  """
  replay = None
  if journal is not None:
    log, cell, setup_ = journal
    replay, (earlier,) = log.resume(cell, [seed], [setup_])
    start -= earlier
  try:
    built, mlp = build(c['method'], c['whitened'], c['knob'], t, whiten, seed,
                       replay)
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
  if contexts_per_fact is None:
    recall = dict(recall=tc.recall(model, t, t.targets, seed,
                                   FLAGS.context_len))
  else:
    recall = recall_counts(model, t, seed, contexts_per_fact)
  return dict(num_params=built.num_params,
              params_per_fact=built.num_params / num_facts,
              standalone_accuracy=float(standalone.accuracy),
              standalone_margin=float(standalone.min_margin),
              lipschitz_bound=float(robustness.lipschitz_bound(
                  mlp, radius=key_norm)),
              jacobian_median=float(np.median(jac)),
              jacobian_max=float(jac.max()),
              relative_jacobian_median=float(np.median(rel)),
              radius_median=float(np.median(radius)),
              radius_min=float(radius.min()),
              **recall, seconds=time.perf_counter() - start, **floor)


def recall_counts(model, t, seed, contexts_per_fact) -> dict:
  """Recall as counts: ``recall_hits`` of ``recall_trials`` queries.

  ``train.recall`` with ``tc.recall``'s key (``500 + seed``) and
  ``contexts_per_fact`` contexts per fact.
  """
  r = train.recall(model, jax.random.key(500 + seed), t.vocab, t.targets,
                   context_len=FLAGS.context_len,
                   contexts_per_fact=contexts_per_fact)
  per_fact = np.asarray(r.per_fact)
  hits = int(np.rint(per_fact * contexts_per_fact).sum())
  trials = int(per_fact.size) * int(contexts_per_fact)
  return dict(recall=hits / trials, recall_hits=hits, recall_trials=trials)


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


# ---------------------------------------------------------------------------
# --stats: the claims over seeds x betas x N, with intervals.
# ---------------------------------------------------------------------------

STATS_OUT_DIR = 'experiments/results/capacity_usability_stats'
QUICK_OUT_DIR = 'experiments/results/capacity_usability_stats_quick'
STATS_KEY_FIELDS = ('dim', 'num_facts', 'seed', 'beta', 'method', 'whitened',
                    'knob')
METHODS = ('encoder_decoder', 'gd')
# --quick: the grid and the budgets of the tests' tiny runs.
QUICK = dict(dim=16, stats_num_facts=['32'], stats_seeds=['0', '1'],
             stats_betas=['3'], stats_fills=['1.0'], num_junk=2,
             context_len=2, steps=300, mlp_steps=1500, rel_tol=0.5)
# Flags that change a row's numbers but are not in its key: recorded in every
# row, and a resumed table must match them.
BUDGET_FLAGS = ('num_junk', 'context_len', 'steps', 'mlp_steps', 'rel_tol',
                'num_directions')
CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class Grid:
  seeds: tuple[int, ...]
  betas: tuple[float, ...]
  num_facts: tuple[int, ...]   # increasing
  fills: tuple[float, ...]     # the fill rows' fills (default fill excluded)
  contexts: int


def _parse_list(name, kind):
  values = FLAGS[name].value
  if not values:
    raise ValueError(f'--{name} is empty; give at least one value')
  try:
    out = tuple(kind(v) for v in values)
  except ValueError:
    raise ValueError(
        f'--{name} must be a list of {kind.__name__}s; got '
        f'{",".join(values)!r}') from None
  if len(set(out)) != len(out):
    raise ValueError(f'--{name} repeats a value: {",".join(values)!r}')
  return out


def stats_grid() -> Grid:
  """The --stats grid from the flags; ValueError (naming the flag) if bad."""
  seeds = _parse_list('stats_seeds', int)
  if min(seeds) < 0:
    raise ValueError(f'--stats_seeds must be >= 0; got {seeds}')
  betas = _parse_list('stats_betas', float)
  if not all(math.isfinite(b) and b >= 0 for b in betas):
    raise ValueError(f'--stats_betas must be finite and >= 0; got {betas}')
  num_facts = _parse_list('stats_num_facts', int)
  if min(num_facts) < 2:
    raise ValueError(f'--stats_num_facts must be >= 2; got {num_facts}')
  fills = _parse_list('stats_fills', float)
  if not all(0 < f <= 1 for f in fills):
    raise ValueError(f'--stats_fills must be in (0, 1]; got {fills}')
  if FLAGS.stats_contexts < 1:
    raise ValueError(
        f'--stats_contexts must be >= 1; got {FLAGS.stats_contexts}')
  if FLAGS.dim < 2:
    raise ValueError(f'--dim must be >= 2; got {FLAGS.dim}')
  return Grid(seeds, betas, tuple(sorted(num_facts)),
              tuple(f for f in fills if f != gadgets.DEFAULT_FILL),
              FLAGS.stats_contexts)


def apply_quick():
  """--quick: the tiny grid and budgets, except flags given explicitly."""
  for name, value in QUICK.items():
    if not FLAGS[name].present:
      setattr(FLAGS, name, value)


def fill_knob(fill: float) -> str:
  """The knob of the closed form's W* at ``fill`` (the default: ``'W*'``)."""
  return 'W*' if fill == gadgets.DEFAULT_FILL else f'{FILL}{float(fill)!r}'


def stats_configs(grid: Grid) -> list[dict]:
  """Every row: N outer (cheap first), then seed, beta, then the setup's rows.

  Per setup: W* of both methods with whitening off and on, then the closed
  form's W* (unwhitened) at each fill of ``grid.fills``.
  """
  out = []
  for n in grid.num_facts:
    for seed in grid.seeds:
      for beta in grid.betas:
        base = dict(dim=FLAGS.dim, num_facts=n, seed=seed, beta=beta)
        out += [dict(base, method=m, whitened=w, knob='W*')
                for m in METHODS for w in (False, True)]
        out += [dict(base, method='encoder_decoder', whitened=False,
                     knob=fill_knob(f)) for f in grid.fills]
  return out


# The checked-in --stats rows: their seconds deal a rerun's setups over
# processes (stats_row_cost).
STATS_REFERENCE_ROWS = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), 'results',
    'capacity_usability_stats', 'rows.csv')


def stats_row_cost(config) -> float:
  """Estimated one-core seconds of a --stats row, to deal setups over
  processes (it changes only which process computes a setup).

  A row of the checked-in grid (:data:`STATS_REFERENCE_ROWS`, same key,
  budgets and contexts) costs what it took there. Otherwise the closed form
  about ``42 N / 2048`` s and GD's W* about ``450 (N / 2048)^2.3`` s at
  10,000 steps: the means of the checked-in rows (closed form 8.9 and 42.2
  s, GD 18.1 and 451 s at N = 512 and 2,048; GD's cross-entropy over the N
  values dominates). Dealt by count, the default grid's two processes get
  9,045 s and 8,105 s of the checked-in rows' seconds; by this cost, 8,568
  s and 8,582 s (each setup's attention training, about 11 s at N = 512
  and 18 s at 2,048, not counted). The checked-in GD rows include a second
  training at W* that ``smallest_mlp`` no longer runs (about 19% of the
  timed run's row seconds); every setup has the same mix of rows, so the
  dealing hardly moves.
  """
  budgets = {name: getattr(FLAGS, name) for name in BUDGET_FLAGS}
  seconds = recorded_seconds(
      reference_rows(STATS_REFERENCE_ROWS, STATS_KEY_FIELDS), config,
      dict(budgets, contexts_per_fact=FLAGS.stats_contexts))
  if seconds is not None:
    return seconds
  n = config['num_facts'] / 2048
  if config['method'] == 'encoder_decoder':
    return 42.0 * n
  return 450.0 * n ** 2.3 * FLAGS.mlp_steps / 1e4


def compute_stats_row(c, contexts: int, journal_path: str) -> dict:
  """One --stats row: its setup (cached) and :func:`measure` with counts.

  GD's W* searches journal their widths to ``journal_path``."""
  t, whiten, model, floor, setup_seconds = setup_for(
      c['seed'], c['beta'], c['num_facts'])
  journal = None
  if c['method'] != 'encoder_decoder' and c['knob'] == 'W*':
    # GD's W* search (minutes at N = 2,048) journals its widths.
    journal = (RoundLog(journal_path),
               [c['dim'], c['num_facts'], c['seed'], c['beta'], c['method'],
                c['whitened']], dict(mlp_steps=FLAGS.mlp_steps))
  row = measure(c, t, whiten, model, floor, c['seed'], c['num_facts'],
                time.perf_counter(), contexts_per_fact=contexts,
                journal=journal)
  return dict(row, setup_seconds=setup_seconds, contexts_per_fact=contexts,
              **{name: getattr(FLAGS, name) for name in BUDGET_FLAGS})


def check_budgets(table: ResultsTable, configs, grid: Grid) -> None:
  """ValueError if rows already in ``table`` were made with other budgets."""
  current = {name: getattr(FLAGS, name) for name in BUDGET_FLAGS}
  current['contexts_per_fact'] = grid.contexts
  flag_of = {'contexts_per_fact': 'stats_contexts'}
  for c in configs:
    row = table.get(c)
    if row is None:
      continue
    for column, value in current.items():
      if format_value(row.get(column)) != format_value(value):
        flag = flag_of.get(column, column)
        raise ValueError(
            f'{table.path} holds rows made with --{flag}='
            f'{row.get(column)}; this run has --{flag}={value}: give '
            f'--{flag}={row.get(column)} or another --out_dir')


def _nan_to_none(obj):
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  if isinstance(obj, dict):
    return {k: _nan_to_none(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_nan_to_none(v) for v in obj]
  return obj


def mean_interval(values) -> dict:
  """:func:`stats.mean_interval` at this experiment's confidence."""
  return stats.mean_interval(values, CONFIDENCE)


def pooled_recall(rows) -> dict:
  """Recall hits and trials summed over ``rows``, with the Wilson interval.

  ``half_width``: half the interval's width at the observed rate, the
  resolution of this many queries.
  """
  hits = sum(int(r['recall_hits']) for r in rows)
  trials = sum(int(r['recall_trials']) for r in rows)
  ci = stats.wilson_interval(hits, trials, CONFIDENCE)
  return dict(hits=hits, trials=trials, rate=ci.rate, low=ci.low,
              high=ci.high, half_width=(ci.high - ci.low) / 2,
              text=stats.format_ci(ci, 4))


def _separate(a, b) -> bool:
  return a['high'] < b['low'] or b['high'] < a['low']


def _fmt(x, spec='.2f'):
  return 'n/a' if x is None or not math.isfinite(x) else format(x, spec)


def _pm(m, spec='.2f'):
  return f"{_fmt(m['mean'], spec)} ± {_fmt(m['std'], spec)}"


def _ci(m, spec='.2f'):
  return f"[{_fmt(m['low'], spec)}, {_fmt(m['high'], spec)}]"


def _direction(m, claim_below: bool, ref: float = 0.0) -> str:
  """Claim 'the mean is below ``ref``' (or above) from ``m``'s interval."""
  low, high = m['low'], m['high']
  if not (math.isfinite(low) and math.isfinite(high)):
    return 'not resolved'
  if claim_below:
    return ('holds' if high < ref else
            'does not hold' if low >= ref else 'not resolved')
  return ('holds' if low > ref else
          'does not hold' if high <= ref else 'not resolved')


def _recall_lowered(before, after) -> str:
  """Claim 'recall fell from ``before`` to ``after``' by the Wilson CIs."""
  if after['high'] < before['low']:
    return 'holds'
  if after['low'] > before['high']:
    return 'does not hold'
  return 'not resolved'


def _ok(rows):
  return [r for r in rows if r is not None and r.get('recall') is not None]


def whitening_cell(by_key, beta, n, method, grid: Grid) -> dict:
  """Whitening's effect at W* for one (beta, N, method), over the seeds."""
  arm = {w: {s: by_key.get((n, s, beta, method, w, 'W*'))
             for s in grid.seeds} for w in (False, True)}
  seeds = [s for s in grid.seeds
           if _ok([arm[False][s]]) and _ok([arm[True][s]])]
  raw = [arm[False][s] for s in seeds]
  wh = [arm[True][s] for s in seeds]
  col = lambda rows, name: np.asarray([r[name] for r in rows], np.float64)
  diff = col(wh, 'params_per_fact') - col(raw, 'params_per_fact')
  ratio = col(wh, 'jacobian_median') / np.maximum(
      col(raw, 'jacobian_median'), 1e-30)
  log_ratio = mean_interval(np.log(np.maximum(ratio, 1e-30)))
  recall_raw, recall_wh = pooled_recall(raw), pooled_recall(wh)
  out = dict(
      beta=beta, num_facts=n, method=method, seeds=seeds,
      missing_seeds=[s for s in grid.seeds if s not in seeds],
      params_per_fact_raw=mean_interval(col(raw, 'params_per_fact')),
      params_per_fact_whitened=mean_interval(col(wh, 'params_per_fact')),
      params_per_fact_diff=mean_interval(diff),
      seeds_whitening_lowered_wstar=int(np.sum(
          col(wh, 'num_params') < col(raw, 'num_params'))),
      jacobian_ratio_mean=float(ratio.mean()) if ratio.size else math.nan,
      jacobian_ratio_geometric=dict(
          mean=math.exp(log_ratio['mean']) if seeds else math.nan,
          low=math.exp(log_ratio['low']) if seeds else math.nan,
          high=math.exp(log_ratio['high']) if seeds else math.nan),
      seeds_jacobian_raised=int(np.sum(ratio > 1)),
      recall_raw=recall_raw, recall_whitened=recall_wh,
      recall_separate=_separate(recall_raw, recall_wh),
      recall_diff_over_seeds=mean_interval(col(wh, 'recall') -
                                           col(raw, 'recall')))
  out['verdicts'] = {
      'whitening raises capacity': _direction(out['params_per_fact_diff'],
                                              claim_below=True),
      'whitening raises Lipschitz': _direction(log_ratio, claim_below=False),
      'whitening lowers recall': _recall_lowered(recall_raw, recall_wh)}
  return out


def fill_cell(by_key, beta, n, grid: Grid) -> dict:
  """The closed form's W* (unwhitened) at each fill for one (beta, N)."""
  fills = sorted(set(grid.fills) | {gadgets.DEFAULT_FILL})
  per_seed = {}  # fill -> {seed: row}, rows that exist and did not fail
  for f in fills:
    found = {s: by_key.get((n, s, beta, 'encoder_decoder', False,
                            fill_knob(f))) for s in grid.seeds}
    per_seed[f] = {s: r for s, r in found.items() if _ok([r])}
  entries = []
  for f in fills:
    rows = list(per_seed[f].values())
    entries.append(dict(
        fill=f, seeds=sorted(per_seed[f]),
        params_per_fact=mean_interval([r['params_per_fact'] for r in rows]),
        jacobian_median=mean_interval([r['jacobian_median'] for r in rows]),
        recall=pooled_recall(rows)))
  lo, hi = fills[0], fills[-1]
  seeds = [s for s in grid.seeds if s in per_seed[lo] and s in per_seed[hi]]
  diff = mean_interval([per_seed[hi][s]['params_per_fact'] -
                        per_seed[lo][s]['params_per_fact'] for s in seeds])
  recall_lo = pooled_recall([per_seed[lo][s] for s in seeds])
  recall_hi = pooled_recall([per_seed[hi][s] for s in seeds])
  capacity = _direction(diff, claim_below=True)
  recall = _recall_lowered(recall_lo, recall_hi)
  if capacity == 'holds' and recall == 'holds':
    verdict = 'holds'
  elif 'does not hold' in (capacity, recall):
    verdict = 'does not hold'
  else:
    verdict = 'not resolved'
  return dict(beta=beta, num_facts=n, fills=entries, low_fill=lo,
              high_fill=hi, paired_seeds=seeds, params_per_fact_diff=diff,
              recall_low_fill=recall_lo, recall_high_fill=recall_hi,
              recall_separate=_separate(recall_lo, recall_hi),
              capacity_raised=capacity, recall_lowered=recall,
              verdict=verdict)


CLAIMS = ('whitening raises capacity', 'whitening raises Lipschitz',
          'whitening lowers recall', 'fuller buckets trade recall for capacity')


def overall(labels) -> str:
  """One label from the cells': unanimous, else not resolved."""
  if labels and all(v == 'holds' for v in labels):
    return 'holds'
  if labels and all(v == 'does not hold' for v in labels):
    return 'does not hold'
  return 'not resolved'


def stats_results(rows, grid: Grid) -> dict:
  """Every number of the --stats summary (``summary.json``)."""
  by_key = {(r['num_facts'], r['seed'], r['beta'], r['method'],
             r['whitened'], r['knob']): r for r in rows if r is not None}
  failed = [r for r in by_key.values() if r.get('recall') is None]
  seconds = [r['seconds'] for r in by_key.values() if r.get('seconds')]
  setups = {(r['num_facts'], r['seed'], r['beta']): r['setup_seconds']
            for r in by_key.values() if r.get('setup_seconds') is not None}
  cells = []
  for n in grid.num_facts:
    for beta in grid.betas:
      cells.append(dict(
          beta=beta, num_facts=n,
          whitening={m: whitening_cell(by_key, beta, n, m, grid)
                     for m in METHODS},
          fill=fill_cell(by_key, beta, n, grid)))
  verdicts = {}
  for claim in CLAIMS:
    if claim == CLAIMS[-1]:
      labels = [c['fill']['verdict'] for c in cells]
    else:
      labels = [c['whitening'][m]['verdicts'][claim] for c in cells
                for m in METHODS]
    verdicts[claim] = dict(
        verdict=overall(labels),
        **{k: labels.count(k) for k in ('holds', 'does not hold',
                                        'not resolved')})
  return dict(
      grid=dict(dim=FLAGS.dim, seeds=list(grid.seeds), betas=list(grid.betas),
                num_facts=list(grid.num_facts),
                fills=sorted(set(grid.fills) | {gadgets.DEFAULT_FILL}),
                contexts_per_fact=grid.contexts, confidence=CONFIDENCE,
                **{name: getattr(FLAGS, name) for name in BUDGET_FLAGS}),
      rows_expected=len(stats_configs(grid)), rows_done=len(by_key),
      rows_failed=[{k: r.get(k) for k in STATS_KEY_FIELDS + ('error',)}
                   for r in failed],
      row_seconds=dict(median=float(np.median(seconds)) if seconds else None,
                       max=max(seconds) if seconds else None,
                       total=float(sum(seconds))),
      setup_seconds=dict(
          median=float(np.median(list(setups.values()))) if setups else None,
          count=len(setups)),
      cells=cells, verdicts=verdicts)


def _cell_name(c) -> str:
  return f"β = {c['beta']:g}, N = {c['num_facts']}"


def stats_summary(res) -> str:
  """``summary.md`` of --stats (without the provenance footer)."""
  g = res['grid']
  rs = res['row_seconds']
  lines = [
      '# capacity_usability --stats', '',
      f"d = {g['dim']}, tied spiked embeddings, β ∈ {g['betas']}, N ∈ "
      f"{g['num_facts']}, seeds {g['seeds']}; J = {g['num_junk']}, L = "
      f"{g['context_len']}, attention steps {g['steps']}, GD steps "
      f"{g['mlp_steps']}, W* bracket {g['rel_tol']}. Recall: "
      f"{g['contexts_per_fact']} contexts per fact, N · "
      f"{g['contexts_per_fact']} queries per row. Intervals are "
      f"{g['confidence']:.0%}: Student t over seeds for means of per-seed "
      'differences (zero width when every seed gave the same difference), '
      'Wilson score intervals for recall pooled over seeds.', '',
      f"Rows: {res['rows_done']} of {res['rows_expected']} done, "
      f"{len(res['rows_failed'])} failed (W* not found). Seconds per row "
      f"(the rows' `seconds` column, the setup's attention training "
      f"excluded: `setup_seconds`): median {_fmt(rs['median'], '.1f')}, max "
      f"{_fmt(rs['max'], '.1f')}, total {_fmt(rs['total'], '.0f')}."]
  for r in res['rows_failed']:
    lines.append(f"- failed: {r}")
  lines += [
      '', '## Whitening at W*', '',
      'Per (β, N) and method, over the seeds where both W* rows exist. Δ = '
      'whitened − raw params/fact (negative: whitening raised capacity); '
      'Jacobian ratio = whitened / raw median Jacobian norm at the keys '
      '(mean over seeds; geometric mean with its interval from the log '
      'ratios); recall pooled over seeds with Wilson intervals.', '',
      '| β | N | method | seeds | params/fact raw | params/fact whitened | '
      'Δ [95% CI] | W* lowered | Jacobian ratio mean (geo. [95% CI]) | '
      'recall raw | recall whitened | Wilson CIs separate |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for c in res['cells']:
    for m in METHODS:
      w = c['whitening'][m]
      geo = w['jacobian_ratio_geometric']
      lines.append(
          f"| {c['beta']:g} | {c['num_facts']} | {m} | {len(w['seeds'])} | "
          f"{_pm(w['params_per_fact_raw'])} | "
          f"{_pm(w['params_per_fact_whitened'])} | "
          f"{_fmt(w['params_per_fact_diff']['mean'], '+.2f')} "
          f"{_ci(w['params_per_fact_diff'])} | "
          f"{w['seeds_whitening_lowered_wstar']}/{len(w['seeds'])} | "
          f"{_fmt(w['jacobian_ratio_mean'], '.3g')} ({_fmt(geo['mean'], '.3g')}"
          f" [{_fmt(geo['low'], '.3g')}, {_fmt(geo['high'], '.3g')}]) | "
          f"{w['recall_raw']['text']} | {w['recall_whitened']['text']} | "
          f"{'yes' if w['recall_separate'] else 'no'} |")
  lines += [
      '', '## Bucket fill at W* (closed form, unwhitened)', '',
      f'The default fill ({gadgets.DEFAULT_FILL}) is the unwhitened W* row '
      'above. params/fact and Jacobian median: mean ± std over seeds; recall '
      'pooled over seeds (Wilson).', '',
      '| β | N | fill | seeds | params/fact | Jacobian median | recall |',
      '|---|---|---|---|---|---|---|']
  for c in res['cells']:
    for e in c['fill']['fills']:
      lines.append(
          f"| {c['beta']:g} | {c['num_facts']} | {e['fill']:g} | "
          f"{len(e['seeds'])} | {_pm(e['params_per_fact'])} | "
          f"{_pm(e['jacobian_median'], '.3g')} | {e['recall']['text']} |")
  lines += [
      '', '## Recall resolution', '',
      'Pooled over seeds, the queries of one row count as independent '
      'trials; the queries of one seed share its attention and MLP, so the '
      'seed-level interval of the paired recall difference is given beside '
      "the verdicts. Two rates' Wilson intervals separate only when they "
      'differ by about the sum of their half-widths:', '']
  for c in res['cells']:
    for m in METHODS:
      w = c['whitening'][m]
      a, b = w['recall_raw'], w['recall_whitened']
      lines.append(
          f"- {_cell_name(c)}, {m}: {a['trials']} queries per arm; Wilson "
          f"half-width {a['half_width']:.4f} at recall {_fmt(a['rate'], '.4f')}"
          f" (raw), {b['half_width']:.4f} at {_fmt(b['rate'], '.4f')} "
          f"(whitened): differences below about "
          f"{a['half_width'] + b['half_width']:.4f} are not resolved.")
  lines += [
      '', '## Verdicts', '',
      'Per cell: capacity from the interval of Δ params/fact (below 0: '
      'holds; at or above 0: does not hold), Lipschitz from the interval of '
      'the geometric Jacobian ratio (above 1: holds; at or below 1: does not '
      'hold), recall from the pooled Wilson intervals (separate, whitened '
      'below: holds; separate, whitened above: does not hold); anything else '
      'is not resolved. Fuller buckets: the lowest against the highest fill, '
      'holding when both capacity rises and recall falls, resolved. A claim '
      'holds (or does not hold) overall only when every cell agrees.', '']
  for claim in CLAIMS:
    v = res['verdicts'][claim]
    lines.append(
        f"- **{claim}: {v['verdict']}** (cells: {v['holds']} hold, "
        f"{v['does not hold']} do not, {v['not resolved']} not resolved).")
    for c in res['cells']:
      if claim == CLAIMS[-1]:
        f = c['fill']
        lo = next(e for e in f['fills'] if e['fill'] == f['low_fill'])
        hi = next(e for e in f['fills'] if e['fill'] == f['high_fill'])
        lines.append(
            f"  - {_cell_name(c)}: {f['verdict']}. Fill {f['low_fill']:g} -> "
            f"{f['high_fill']:g} over seeds {f['paired_seeds']}: params/fact "
            f"{_fmt(lo['params_per_fact']['mean'])} -> "
            f"{_fmt(hi['params_per_fact']['mean'])} (Δ "
            f"{_fmt(f['params_per_fact_diff']['mean'], '+.2f')} "
            f"{_ci(f['params_per_fact_diff'])}; capacity raised: "
            f"{f['capacity_raised']}), Jacobian median "
            f"{_fmt(lo['jacobian_median']['mean'], '.3g')} -> "
            f"{_fmt(hi['jacobian_median']['mean'], '.3g')}, recall "
            f"{f['recall_low_fill']['text']} -> "
            f"{f['recall_high_fill']['text']} (recall lowered: "
            f"{f['recall_lowered']}).")
        continue
      for m in METHODS:
        w = c['whitening'][m]
        label = w['verdicts'][claim]
        if claim == CLAIMS[0]:
          text = (f"params/fact {_fmt(w['params_per_fact_raw']['mean'])} -> "
                  f"{_fmt(w['params_per_fact_whitened']['mean'])}, Δ "
                  f"{_fmt(w['params_per_fact_diff']['mean'], '+.2f')} "
                  f"{_ci(w['params_per_fact_diff'])}; W* lowered in "
                  f"{w['seeds_whitening_lowered_wstar']} of "
                  f"{len(w['seeds'])} seeds")
        elif claim == CLAIMS[1]:
          geo = w['jacobian_ratio_geometric']
          text = (f"Jacobian median ratio mean "
                  f"{_fmt(w['jacobian_ratio_mean'], '.3g')}, geometric "
                  f"{_fmt(geo['mean'], '.3g')} [{_fmt(geo['low'], '.3g')}, "
                  f"{_fmt(geo['high'], '.3g')}]; raised in "
                  f"{w['seeds_jacobian_raised']} of {len(w['seeds'])} seeds")
        else:
          d = w['recall_diff_over_seeds']
          text = (f"recall {w['recall_raw']['text']} -> "
                  f"{w['recall_whitened']['text']} (intervals "
                  f"{'separate' if w['recall_separate'] else 'overlap'}); "
                  f"per-seed difference {_fmt(d['mean'], '+.4f')} "
                  f"{_ci(d, '+.4f')}")
          if w['recall_separate'] and d['low'] <= 0 <= d['high']:
            text += (' (the seed-level interval contains 0: the pooled '
                     'difference is not consistent across these seeds)')
        lines.append(f"  - {_cell_name(c)}, {m}: {label}. {text}.")
  return '\n'.join(lines) + '\n'


def plot_stats(res, path):
  """Whitening's paired effects and the fill rows, per (beta, N) cell."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  cells = res['cells']
  x = np.arange(len(cells))
  names = [f"β={c['beta']:g}\nN={c['num_facts']}" for c in cells]
  nan = lambda v: math.nan if v is None else v
  fig, axes = plt.subplots(1, 4, figsize=(17, 4))
  for i, m in enumerate(METHODS):
    color, dx = ('C0', -0.12) if m == 'encoder_decoder' else ('C2', 0.12)
    label = 'closed form' if m == 'encoder_decoder' else 'GD'
    w = [c['whitening'][m] for c in cells]
    for ax, name in ((axes[0], 'params_per_fact_diff'),
                     (axes[1], 'jacobian_ratio_geometric')):
      ivs = [v[name] for v in w]
      mean = np.asarray([nan(v['mean']) for v in ivs])
      err = np.asarray([[mean[j] - nan(v['low']), nan(v['high']) - mean[j]]
                        for j, v in enumerate(ivs)]).T
      ax.errorbar(x + dx, mean, yerr=err, fmt='o', color=color, capsize=3,
                  label=label)
    for k, (arm, marker) in enumerate((('recall_raw', 'o'),
                                       ('recall_whitened', 'x'))):
      r = [v[arm] for v in w]
      mean = np.asarray([100 * nan(v['rate']) for v in r])
      err = np.asarray([[mean[j] - 100 * v['low'], 100 * v['high'] - mean[j]]
                        for j, v in enumerate(r)]).T
      axes[2].errorbar(x + dx + (k - 0.5) * 0.1, mean, yerr=err, fmt=marker,
                       color=color, capsize=3,
                       label=f"{label}, {'raw' if k == 0 else 'whitened'}")
  for c, color in zip(cells, (f'C{j % 10}' for j in range(len(cells)))):
    es = c['fill']['fills']
    axes[3].errorbar(
        [nan(e['params_per_fact']['mean']) for e in es],
        [100 * nan(e['recall']['rate']) for e in es],
        yerr=np.asarray([[100 * (nan(e['recall']['rate']) -
                                 e['recall']['low']),
                          100 * (e['recall']['high'] -
                                 nan(e['recall']['rate']))]
                         for e in es]).T,
        fmt='o-', color=color, capsize=3, label=_cell_name(c))
    for e in es:
      axes[3].annotate(f"{e['fill']:g}", (nan(e['params_per_fact']['mean']),
                                          100 * nan(e['recall']['rate'])),
                       xytext=(3, 3), textcoords='offset points', fontsize=6)
  axes[0].axhline(0, color='k', lw=0.8)
  axes[0].set_ylabel('Δ W* params/fact, whitened − raw (95% t CI)')
  axes[1].axhline(1, color='k', lw=0.8)
  axes[1].set_yscale('log')
  axes[1].set_ylabel('Jacobian median ratio whitened / raw\n'
                     '(geometric mean, 95% t CI)')
  axes[2].set_ylabel('Transformer recall (%), pooled, 95% Wilson')
  for ax in axes[:3]:
    ax.set_xticks(x)
    ax.set_xticklabels(names, fontsize=7)
    ax.legend(fontsize=6)
  axes[3].set_xlabel('closed-form W* params/fact (labels: fill)')
  axes[3].set_ylabel('recall (%), pooled, 95% Wilson')
  axes[3].legend(fontsize=6)
  g = res['grid']
  fig.suptitle(f"Capacity vs usability over seeds {g['seeds']} (d = "
               f"{g['dim']}, {g['contexts_per_fact']} contexts per fact)",
               fontsize=9)
  fig.tight_layout()
  save_figure(fig, path)


def main_stats():
  """--stats: the grid's rows (resumable), summary.md/json and stats.png."""
  if FLAGS.quick:
    apply_quick()
  grid = stats_grid()
  out_dir = FLAGS.out_dir
  if not FLAGS['out_dir'].present:
    out_dir = QUICK_OUT_DIR if FLAGS.quick else STATS_OUT_DIR
  distributed.initialize_from_flags()
  os.makedirs(out_dir, exist_ok=True)
  table = ResultsTable(os.path.join(out_dir, 'rows.csv'), STATS_KEY_FIELDS)
  configs = stats_configs(grid)
  check_budgets(table, configs, grid)
  rows = run_sweep(configs,
                   lambda g: [compute_stats_row(
                       c, grid.contexts, os.path.join(out_dir, ROUNDS))
                              for c in g],
                   table, desc='stats rows', merge_only=FLAGS.merge_only,
                   affinity=lambda c: (c['num_facts'], c['seed'], c['beta']),
                   cost=stats_row_cost)
  if not distributed.is_main_process():
    return
  res = stats_results(rows, grid)
  write_text(os.path.join(out_dir, 'summary.json'),
             json.dumps(_nan_to_none(res), indent=1, allow_nan=False) + '\n')
  plot_stats(res, os.path.join(out_dir, 'stats.png'))
  text = stats_summary(res)
  write_text(os.path.join(out_dir, 'summary.md'), text + provenance.footer())
  print(text)


def main(argv):
  del argv
  if FLAGS.stats:
    main_stats()
    return
  if FLAGS.quick:
    raise ValueError('--quick applies to --stats only')
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
