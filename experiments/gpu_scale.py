r"""GPU-ready scale runs: GD and encoder-decoder GD at d = 128, N = 16k, 32k.

For each method (``gd``, ``encoder_decoder_gd``), size N (isotropic tied
sphere keys/values, random permutation), GD step budget (the ablation) and
seed, one *independent* width search per seed
(:func:`factstore_jax.methods.find_capacity` on that seed's fact set alone,
``rel_tol`` 0.02) finds W*. Rows are appended to ``rows.csv`` (resumable,
one per search). ``summary.md`` / ``summary.json`` give W*/N per cell (mean,
std and a 95% Student-t interval of the mean over seeds,
:func:`factstore_jax.stats.mean_interval`), the
ED-GD / GD ratio per N and budget, the log-log slope between the sizes, the
commit and the command. With ``--rho_law`` the script then runs the v2 rho
law at the same d (``experiments/decodability_scaling.py --v2 --dim=...``)
into ``<out_dir>/rho_law``.

On a device (one H200): a search at N = 32,768 takes many GD runs of up to
``max(step_budgets)`` steps; run the cells in pieces (``--num_facts_list``,
``--methods``, ``--step_budgets``) if a run is bounded in time: every
finished search is kept. ``--quick`` (d = 16, N in {16, 32}, budgets
{200, 400}, learning rate 0.01, seed 0, ``rel_tol`` 0.5, no rho law) checks
the plumbing on a CPU.

  python experiments/gpu_scale.py                      # the full grid
  python experiments/gpu_scale.py --quick --out_dir=/tmp/gpu_scale
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
from absl import app, flags

from factstore_jax import capacity, factsets, provenance, stats, training
from factstore_jax.capacity import methods
from factstore_jax.atomic import write_text
from factstore_jax.errors import FactStoreError
from factstore_jax.sweep import ResultsTable, run_sweep

KEY_FIELDS = ('dim', 'num_facts', 'method', 'max_steps', 'seed')
QUICK = dict(dim=16, num_facts_list=['16', '32'], step_budgets=['200', '400'],
             seeds=['0'], rel_tol=0.5, learning_rate=0.01, patience=100,
             rho_law=False, out_dir='experiments/results/gpu_scale_quick')


def define_flags():
  """The script's flags (defined when run, not at import)."""
  flags.DEFINE_integer('dim', 128, 'Embedding dimension d.')
  flags.DEFINE_list('num_facts_list', ['16384', '32768'], 'Sizes N = P.')
  flags.DEFINE_list('methods', ['gd', 'encoder_decoder_gd'], 'GD methods.')
  flags.DEFINE_list('step_budgets', ['5000', '10000', '20000'],
                    'GD max_steps of the step-budget ablation.')
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds (independent searches).')
  flags.DEFINE_float('rel_tol', 0.02, 'Relative bracket of each W* search.')
  flags.DEFINE_float('learning_rate', 1e-3, 'GD initial learning rate.')
  flags.DEFINE_integer('patience', 2_000, 'GD hopeless-run window (steps).')
  flags.DEFINE_bool('rho_law', True, 'Also run the v2 rho law at this d.')
  flags.DEFINE_bool('quick', False, 'Small CPU grid (see the docstring).')
  flags.DEFINE_string('out_dir', 'experiments/results/gpu_scale',
                      'Output folder.')


FLAGS = flags.FLAGS


def apply_quick() -> None:
  if FLAGS.quick:
    for name, value in QUICK.items():
      if not FLAGS[name].present:
        FLAGS[name].value = value


def search(config: dict) -> dict:
  """One independent W* search (one seed, one cell); returns its row."""
  t0 = time.perf_counter()
  n, d, seed = config['num_facts'], config['dim'], config['seed']
  fs = factsets.random_factset(jax.random.key(seed), n, d)
  options = methods.MethodOptions(train=training.TrainConfig(
      max_steps=config['max_steps'], learning_rate=FLAGS.learning_rate,
      patience=FLAGS.patience))
  cap = methods.find_capacity(config['method'], [jax.random.key(1000 + seed)],
                              [fs], options=options,
                              rel_tol=FLAGS.rel_tol)[0]
  return dict(
      width=cap.width, num_params=cap.num_params,
      params_per_fact=(cap.num_params / n if cap.num_params else None),
      code_dim=cap.code_dim, rounds=cap.rounds,
      tested=json.dumps({str(k): v for k, v in sorted(cap.tested.items())}),
      rel_tol=FLAGS.rel_tol, device=jax.devices()[0].device_kind,
      seconds=time.perf_counter() - t0)


def summarize(rows, sizes, budgets) -> tuple[str, dict]:
  command = provenance.command_line()
  blob = dict(dim=FLAGS.dim, sizes=sizes, budgets=budgets,
              seeds=list(FLAGS.seeds), rel_tol=FLAGS.rel_tol,
              commit=provenance.run_commit() or 'unknown',
              command=command, cells={}, ratios={},
              slopes={})
  lines = ['# gpu_scale: GD and encoder-decoder GD at scale', '',
           f'd = {FLAGS.dim}; N = {sizes}; step budgets {budgets}; seeds '
           f'{FLAGS.seeds} (independent searches); rel_tol {FLAGS.rel_tol}; '
           f'commit `{blob["commit"]}`; command `{command}`.', '',
           '| method | N | max_steps | W*/N mean | 95% CI (t over seeds) | '
           'std | found | device |', '|---|---|---|---|---|---|---|---|']
  means = {}
  for method in FLAGS.methods:
    for n in sizes:
      for b in budgets:
        sel = [r for r in rows if (r['method'], r['num_facts'],
                                   r['max_steps']) == (method, n, b)]
        ppf = np.array([r['params_per_fact'] for r in sel
                        if r['params_per_fact'] is not None], float)
        if not sel:
          continue
        if ppf.size:
          m = stats.mean_interval(ppf)
          means[(method, n, b)] = mean = m['mean']
          ci = None if ppf.size < 2 else (m['low'], m['high'])
          cell = (f'{mean:.3f} | - | -' if ci is None else
                  f'{mean:.3f} | [{ci[0]:.3f}, {ci[1]:.3f}] | '
                  f'{m["std"]:.3f}')
        else:
          cell, ci = '- | - | -', None
        blob['cells'][f'{method}/{n}/{b}'] = dict(
            params_per_fact=ppf.tolist(), ci=ci, seeds=len(sel))
        lines.append(f'| {method} | {n} | {b} | {cell} | {ppf.size}/'
                     f'{len(sel)} | {sel[0]["device"]} |')
  lines += ['', '| N | max_steps | ED-GD / GD (W*/N means) |', '|---|---|---|']
  for n in sizes:
    for b in budgets:
      pair = (means.get(('encoder_decoder_gd', n, b)), means.get(('gd', n, b)))
      if None not in pair:
        blob['ratios'][f'{n}/{b}'] = pair[0] / pair[1]
        lines.append(f'| {n} | {b} | {pair[0] / pair[1]:.3f} |')
  if len(sizes) >= 2:
    lines += ['', '| method | max_steps | log-log slope of W* over N |',
              '|---|---|---|']
    for method in FLAGS.methods:
      for b in budgets:
        pts = [(n, means[(method, n, b)] * n) for n in sizes
               if (method, n, b) in means]
        if len(pts) >= 2:
          fit = capacity.loglog_slope(*zip(*pts))
          blob['slopes'][f'{method}/{b}'] = fit.params[0]
          lines.append(f'| {method} | {b} | {fit.params[0]:.3f} |')
  return '\n'.join(lines) + '\n', blob


def main(argv):
  del argv
  apply_quick()
  sizes = [int(n) for n in FLAGS.num_facts_list]
  budgets = [int(b) for b in FLAGS.step_budgets]
  for m in FLAGS.methods:
    if m not in ('gd', 'encoder_decoder_gd'):
      raise FactStoreError(f'--methods: {m!r} is not a GD method')
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  configs = [dict(dim=FLAGS.dim, num_facts=n, method=m, max_steps=b,
                  seed=int(s))
             for n in sizes for b in budgets for m in FLAGS.methods
             for s in FLAGS.seeds]
  table = ResultsTable(os.path.join(FLAGS.out_dir, 'rows.csv'), KEY_FIELDS)
  rows = run_sweep(configs, lambda group: [search(c) for c in group], table,
                   desc='searches')
  text, blob = summarize(rows, sizes, budgets)
  write_text(os.path.join(FLAGS.out_dir, 'summary.md'), text)
  write_text(os.path.join(FLAGS.out_dir, 'summary.json'),
             json.dumps(blob, indent=1) + '\n')
  print(text)
  if FLAGS.rho_law:
    root = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, os.path.join(root,
                                                  'decodability_scaling.py'),
                    '--v2', f'--dim={FLAGS.dim}',
                    f'--out_dir={os.path.join(FLAGS.out_dir, "rho_law")}'],
                   check=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
