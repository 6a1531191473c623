"""Facts-per-parameter scaling: W* vs N for every method.

See docs/design.md, "Capacity and scaling".

For each geometry (isotropic: tied spherical keys/values; anisotropic: a
rank-1 spike of strength ``beta`` on keys and values), dimension d, size
N = alpha d^2 and method, finds W* (the smallest parameter count storing every
fact) on ``len(seeds)`` random fact sets with a random permutation map. Seeds
of one cell are searched in lockstep (one device-sharded program per round
for the batched methods; GD members run ``--chunk_size`` at a time). Rows
are appended atomically to ``rows.csv`` and skipped on re-run; every search
round is appended to ``rounds.jsonl``, so a re-run resumes an unfinished
cell without training its tested widths again (same GD settings). Writes
``scaling.png`` (log-log W* vs N, fitted slopes, the information floor
``N log2 P / 32``) and ``summary.md`` (slopes per method with their spread
over seeds, ``W = C N (log2 N + b)`` fits, and the closed-form vs GD slope
difference).

  python experiments/capacity_scaling.py                 # default grid
  python experiments/capacity_scaling.py --dims=64,128 \\
      --alphas=0.03125,0.0625,0.125,0.25,0.5             # the full grid
  python experiments/capacity_scaling.py --dims=64,128 \\
      --alphas=0.03125,0.0625,0.125,0.25,0.5 --max_num_facts=2048  # capped
  python experiments/capacity_scaling.py ... --summarize_only  # report only
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import app, flags

from factstore_jax import capacity, distributed, factsets, provenance, training
from factstore_jax.capacity import methods
from factstore_jax.capacity.rounds import RoundLog
from factstore_jax.atomic import save_figure, write_text
from factstore_jax.sweep import ResultsTable, run_sweep

flags.DEFINE_list('methods', list(methods.METHODS), 'Methods.')
flags.DEFINE_list('dims', ['64'], 'Embedding dimensions d.')
flags.DEFINE_list('alphas', ['0.03125', '0.0625', '0.125'],
                  'N = alpha * d^2.')
flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds (fact set, features).')
flags.DEFINE_list('geometries', ['isotropic', 'anisotropic'],
                  'isotropic and/or anisotropic (spike beta on keys+values).')
flags.DEFINE_float('beta', 1.5, 'Spike strength of the anisotropic geometry.')
flags.DEFINE_integer('max_steps', 10_000, 'GD step budget.')
flags.DEFINE_float('learning_rate', 1e-3, 'GD initial learning rate.')
flags.DEFINE_integer('patience', 2_000, 'GD plateau patience (steps).')
flags.DEFINE_integer('chunk_size', 1,
                     'GD members trained at a time on each device (lax.map; '
                     'each stops early on its own); 0 = all in one vmap.',
                     lower_bound=0)
flags.DEFINE_float('rel_tol', 0.05,
                   'Stop a width search when its bracket is this narrow '
                   '(relative); 0 = exact.')
flags.DEFINE_integer('max_num_facts', None,
                     'Drop grid points with N = alpha d^2 above this (e.g. '
                     'the full grid capped at what a 2-core CPU finishes).',
                     lower_bound=1)
flags.DEFINE_bool('summarize_only', False,
                  'Compute nothing: plot and summarise the grid points '
                  'already in rows.csv (e.g. while a sweep still runs).')
flags.DEFINE_string('out_dir', 'experiments/results/capacity_scaling',
                    'Output folder.')
distributed.define_flags()
FLAGS = flags.FLAGS

KEY_FIELDS = ('geometry', 'dim', 'num_facts', 'method', 'seed')
ROUNDS = 'rounds.jsonl'  # one line per (cell, seed, width) evaluated
TAIL = 3  # sizes in the asymptotic-end slope
NEGATIVE_C = '; C < 0: W* grows slower than N log N over these N'


def search_cost(config: dict, max_steps: int) -> float:
  """Rough seconds of one seed's capacity search on one CPU core.

  Only steers how ``run_sweep`` deals cells to processes under
  ``jax.distributed`` (never a row). GD-trained searches cost about
  ``N^2`` per step (``N`` facts through a width ``~ N / d`` MLP of ``d``
  inputs); the closed form about ``N d`` per construction; each adds its
  compiling, spread over a cell's rows. Fitted to a one-process run of the
  d = 48, N = 288 and 576 grid (8 seeds, 2 geometries, 3,000 steps) on this
  repository's CPU (``docs/distributed.md``); the cheap baselines are
  taken as a small fraction of the closed form.
  """
  n, d = config['num_facts'], config['dim']
  if config['method'] in ('gd', 'encoder_decoder_gd'):
    return 0.45 + 3.1e-9 * n * n * max_steps
  if config['method'] == 'encoder_decoder':
    return 2.96 + 1.21e-4 * n * d
  return 0.3 + 1e-5 * n * d


def make_factset(geometry: str, seed: int, n: int, dim: int, beta: float):
  embedding = 'sphere' if geometry == 'isotropic' else 'spiked'
  return factsets.random_factset(
      jax.random.key(seed), n, dim, tied=True, mapping='permutation',
      embedding=embedding, beta=beta if geometry == 'anisotropic' else 0.0)


def compute(group: list[dict], options: methods.MethodOptions) -> list[dict]:
  """W* for a group of configs; one lockstep search per (cell, method)."""
  cells: dict[tuple, list[int]] = {}
  for j, c in enumerate(group):
    cells.setdefault((c['geometry'], c['dim'], c['num_facts'], c['method']),
                     []).append(j)
  out: list[dict | None] = [None] * len(group)
  for (geometry, dim, n, method), members in cells.items():
    seeds = [group[j]['seed'] for j in members]
    t0 = time.perf_counter()
    fss = [make_factset(geometry, s, n, dim, FLAGS.beta) for s in seeds]
    keys = [jax.random.key(1000 + s) for s in seeds]
    cell = [geometry, dim, n, method]
    # Encoder-decoder GD's code dim (and the certified decoder it trains
    # with) is chosen per fact set: a width's accuracy depends on it, so
    # the seed's logged rounds record it.
    code_dims = ([methods.gd_code_dim(k, fs) for k, fs in zip(keys, fss)]
                 if method == 'encoder_decoder_gd' else [None] * len(seeds))
    setups = [round_setup(m) for m in code_dims]
    found = methods.find_capacity(
        method, keys, fss, options=options, rel_tol=FLAGS.rel_tol,
        on_round=log_round(f'{method} {geometry} d={dim} N={n}', seeds,
                           cell, setups),
        known=None if method == 'encoder_decoder' else load_rounds(
            cell, seeds, setups),
        code_dim=None if code_dims[0] is None else code_dims)
    seconds = (time.perf_counter() - t0) / len(members)
    for j, cap in zip(members, found):
      out[j] = dict(
          width=cap.width if cap.width is not None else '',
          num_params=cap.num_params if cap.num_params is not None else '',
          params_per_fact=(cap.num_params / n if cap.num_params else ''),
          code_dim=cap.code_dim if cap.code_dim is not None else '',
          rounds=cap.rounds, tested=json.dumps(cap.tested),
          info_floor=capacity.info_floor(n, n), seconds=seconds,
          device=jax.devices()[0].device_kind, **closed_form_fields(cap))
  return out


CLOSED_FORM_FIELDS = ('num_params_gated_mlp', 'bits_per_param', 'min_margin',
                      'code_error', 'patched_values', 'max_map_norm')


def closed_form_fields(cap: methods.Capacity) -> dict:
  """The closed form's report at W*: the folded gated-MLP count, bits per
  parameter, certified min margin, code error, patched values and the
  largest bucket map norm (empty for the other methods)."""
  rep = cap.report or {}
  out = {f: rep.get(f, '') for f in CLOSED_FORM_FIELDS}
  # The knob searched is the bulk code dim; the report's includes patches.
  out['closed_form_code_dim'] = rep.get('code_dim', '')
  return out


def round_setup(code_dim: int | None = None) -> dict:
  """What a width's accuracy depends on besides its cell and seed."""
  setup = dict(max_steps=FLAGS.max_steps, learning_rate=FLAGS.learning_rate,
               patience=FLAGS.patience, beta=FLAGS.beta)
  if code_dim is not None:
    # Encoder-decoder GD: the code dim and the construction's decoder at it
    # (rounds logged before had a random decoder and are not replayed).
    setup.update(code_dim=code_dim, decoder='construction')
  return setup


def load_rounds(cell: list, seeds: list[int],
                setups: list[dict]) -> list[dict[int, float]]:
  """``{width: accuracy}`` per seed from ``rounds.jsonl`` (the seed's setup).
  """
  return RoundLog(os.path.join(FLAGS.out_dir, ROUNDS)).known(
      cell, seeds, setups)


def log_round(name: str, seeds: list[int], cell: list, setups: list[dict]):
  """Prints each search round (a cell's GD rounds can take an hour) and
  appends it, with its seconds, to ``rounds.jsonl``."""
  return RoundLog(os.path.join(FLAGS.out_dir, ROUNDS)).recorder(
      cell, seeds, setups, name=name)


def slopes(rows, geometry, dim, method, largest: int | None = None):
  """Per-seed log-log slopes of W* vs N (seeds with >= 2 finite points).

  ``largest``: fit only each seed's ``largest`` biggest sizes (the
  asymptotic end of the curve).
  """
  per_seed = {}
  for r in rows:
    if (r['geometry'], r['dim'], r['method']) == (geometry, dim, method) \
        and r['num_params'] not in ('', None):
      per_seed.setdefault(r['seed'], []).append(
          (r['num_facts'], r['num_params']))
  fits = [capacity.loglog_slope(*zip(*sorted(pts)[-(largest or 0):])).params[0]
          for pts in per_seed.values() if len({p[0] for p in pts}) >= 2]
  return np.array(fits)


def plot(rows, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  panels = sorted({(r['geometry'], r['dim']) for r in rows})
  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5),
                           squeeze=False)
  for ax, (geometry, dim) in zip(axes[0], panels):
    sel = [r for r in rows if (r['geometry'], r['dim']) == (geometry, dim)]
    sizes = sorted({r['num_facts'] for r in sel})
    for method in [m for m in methods.METHODS
                   if any(r['method'] == m for r in sel)]:
      ws = [[r['num_params'] for r in sel if r['method'] == method
             and r['num_facts'] == n and r['num_params'] not in ('', None)]
            for n in sizes]
      xs = [n for n, w in zip(sizes, ws) if w]
      if not xs:
        continue
      mean = [np.mean(w) for w in ws if w]
      # Bars span the seeds' range (a std bar can dip below 0 on a log axis).
      err = np.array([[np.mean(w) - min(w), max(w) - np.mean(w)]
                      for w in ws if w]).T
      s = slopes(rows, geometry, dim, method)
      label = method + (f' (slope {s.mean():.2f}±{s.std():.2f})'
                        if s.size else '')
      ax.errorbar(xs, mean, yerr=err, marker='o', capsize=3, label=label)
    ax.plot(sizes, [capacity.info_floor(n, n) for n in sizes], 'k--',
            label='floor N log2 P / 32')
    ax.set_xscale('log', base=2)
    ax.set_yscale('log', base=2)
    ax.set_xlabel('facts N')
    ax.set_ylabel('W* (parameters)')
    ax.set_title(f'{geometry}, d = {dim} (mean, bars: range over seeds)')
    ax.legend(fontsize=7)
  fig.tight_layout()
  save_figure(fig, path)


def summary(rows) -> str:
  lines = ['# capacity_scaling', '',
           '| geometry | d | method | N | W* mean ± std (params) | '
           'params/fact | seeds | device |', '|---' * 8 + '|']
  cells = sorted({(r['geometry'], r['dim'], r['method'], r['num_facts'])
                  for r in rows})
  for geometry, dim, method, n in cells:
    sel = [r['num_params'] for r in rows
           if (r['geometry'], r['dim'], r['method'], r['num_facts'])
           == (geometry, dim, method, n)]
    ok = [w for w in sel if w not in ('', None)]
    w = (f'{np.mean(ok):.0f} ± {np.std(ok):.0f}' if ok else 'not found')
    ppf = f'{np.mean(ok) / n:.1f}' if ok else '-'
    devices = sorted({str(r.get('device') or '?') for r in rows
                      if (r['geometry'], r['dim'], r['method'],
                          r['num_facts']) == (geometry, dim, method, n)})
    lines.append(f'| {geometry} | {dim} | {method} | {n} | {w} | {ppf} | '
                 f'{len(ok)}/{len(sel)} | {", ".join(devices)} |')
  lines += ['', '## Log-log slopes of W* vs N (mean ± std over seeds)', '',
            f'Slopes over all sizes, and over the {TAIL} largest (the '
            'asymptotic end) where a method has more sizes than that.', '',
            f'| geometry | d | method | slope | slope, {TAIL} largest N | '
            'C, b of W = C N (log2 N + b) |',
            '|---|---|---|---|---|---|']
  fmt = lambda s: f'{s.mean():.3f} ± {s.std():.3f}' if s.size else '—'
  for geometry, dim in sorted({(r['geometry'], r['dim']) for r in rows}):
    found, tails = {}, {}
    for method in methods.METHODS:
      s = slopes(rows, geometry, dim, method)
      if not s.size:
        continue
      pts = [(r['num_facts'], r['num_params']) for r in rows
             if (r['geometry'], r['dim'], r['method'])
             == (geometry, dim, method) and r['num_params'] not in ('', None)]
      found[method] = s
      tails[method] = (slopes(rows, geometry, dim, method, largest=TAIL)
                       if len({n for n, _ in pts}) > TAIL else np.array([]))
      nlogn = capacity.fit_n_log_n(*zip(*pts))
      lines.append(f'| {geometry} | {dim} | {method} | {s.mean():.3f} ± '
                   f'{s.std():.3f} | {fmt(tails[method])} | '
                   f'C = {nlogn.params[0]:.3g}, b = {nlogn.params[1]:.3g} '
                   f'(R² {nlogn.r2:.3f}'
                   f'{NEGATIVE_C if nlogn.params[0] < 0 else ""}) |')
    if 'encoder_decoder' in found and 'gd' in found:
      lines.append(gap_row(rows, geometry, dim))
  return '\n'.join(lines + closed_form_section(rows)) + '\n'


WINDOWED = 'rows_encoder_decoder_windowed.csv'


def _mean(rows, field):
  vals = [float(r[field]) for r in rows if r.get(field) not in ('', None)]
  return float(np.mean(vals)) if vals else None


def closed_form_section(rows) -> list[str]:
  """The closed form at W* per cell, against the baselines and (where the
  out_dir keeps them, ``WINDOWED``) the two-neuron-window construction."""
  cf = [r for r in rows if r['method'] == 'encoder_decoder'
        and r.get('num_params_gated_mlp') not in ('', None)]
  if not cf:
    return []
  old = []
  path = os.path.join(FLAGS.out_dir, WINDOWED)
  if os.path.exists(path):
    old = ResultsTable(path, KEY_FIELDS).rows()
  lines = ['', '## The closed form at W* (means over seeds)', '',
           'Factorised = the count above (`w_gate, b_gate, w_up, routing, '
           'decoder`); folded = the same function as a standard gated MLP '
           '(`w_gate, b_gate, w_up, w_down`). bits/param = N log2 P / params. '
           'Windowed = the earlier construction (two neurons per bucket and '
           f'code coordinate, buckets of ~3/8 d keys; `{WINDOWED}`).', '',
           '| geometry | d | N | params/fact factorised / folded | bits/param '
           'factorised / folded | min margin (min) | patched values | '
           'max ‖M_j‖ | windowed params/fact (ratio) | hebbian_data | '
           'hebbian_ridge | GD (closed form / GD) |', '|---' * 12 + '|']
  cells = sorted({(r['geometry'], r['dim'], r['num_facts']) for r in cf})
  for geometry, dim, n in cells:
    same = lambda rs, m: [r for r in rs if (r['geometry'], r['dim'],
                                            r['num_facts'], r['method'])
                          == (geometry, dim, n, m)]
    here = same(cf, 'encoder_decoder')
    fact, folded = (_mean(here, f) / n for f in ('num_params',
                                                 'num_params_gated_mlp'))
    bits = np.log2(n)
    margin = min(float(r['min_margin']) for r in here)
    per_fact = lambda m, src=rows: (_mean(same(src, m), 'num_params') or
                                    np.nan) / n
    was = per_fact('encoder_decoder', old)
    gd = per_fact('gd')
    lines.append(
        f'| {geometry} | {dim} | {n} | {fact:.1f} / {folded:.1f} | '
        f'{bits / fact:.3f} / {bits / folded:.3f} | {margin:.3g} | '
        f'{_mean(here, "patched_values"):.1f} | '
        f'{_mean(here, "max_map_norm"):.3g} | '
        f'{_cell(was, f"{was / fact:.2f}x")} | '
        f'{_cell(per_fact("hebbian_data"))} | '
        f'{_cell(per_fact("hebbian_ridge"))} | '
        f'{_cell(gd, f"{fact / gd:.1f}x")} |')
  return lines


def _cell(per_fact: float, ratio: str | None = None) -> str:
  """A params/fact table cell (with a ratio), or '—' where a method has no
  rows for the cell (e.g. no ``WINDOWED`` file in the folder)."""
  if not np.isfinite(per_fact):
    return '—'
  return f'{per_fact:.1f}' + (f' ({ratio})' if ratio else '')


def gap_row(rows, geometry: str, dim: int) -> str:
  """Closed form − GD slope difference, over the sizes both have."""
  def sizes(method):
    return {r['num_facts'] for r in rows
            if (r['geometry'], r['dim'], r['method']) == (geometry, dim, method)
            and r['num_params'] not in ('', None)}
  common = sorted(sizes('encoder_decoder') & sizes('gd'))
  both = [r for r in rows if r['num_facts'] in common]
  cells = []
  for largest in (None, TAIL):
    e, g = (slopes(both, geometry, dim, m, largest=largest)
            if largest is None or len(common) > TAIL else np.array([])
            for m in ('encoder_decoder', 'gd'))
    cells.append(f'{e.mean() - g.mean():+.3f} ± {np.hypot(e.std(), g.std()):.3f}'
                 if e.size and g.size else '—')
  span = f'N = {common[0]}–{common[-1]}' if common else 'no common N'
  return (f'| {geometry} | {dim} | closed form − GD ({span}) | {cells[0]} | '
          f'{cells[1]} | |')


def main(argv):
  del argv
  distributed.initialize_from_flags()
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  options = methods.MethodOptions(train=training.TrainConfig(
      learning_rate=FLAGS.learning_rate, max_steps=FLAGS.max_steps,
      patience=FLAGS.patience), chunk_size=FLAGS.chunk_size or None)
  seeds = [int(s) for s in FLAGS.seeds]
  configs = [dict(geometry=g, dim=int(d), num_facts=int(float(a) * int(d)**2),
                  method=m, seed=s)
             for g in FLAGS.geometries for d in FLAGS.dims
             for a in FLAGS.alphas for m in FLAGS.methods for s in seeds]
  if FLAGS.max_num_facts is not None:
    configs = [c for c in configs if c['num_facts'] <= FLAGS.max_num_facts]
  if not configs:
    raise app.UsageError('No grid point has N <= --max_num_facts.')
  table = ResultsTable(os.path.join(FLAGS.out_dir, 'rows.csv'), KEY_FIELDS)
  if FLAGS.summarize_only:
    rows = [table.get(c) for c in configs if table.is_done(c)]
    if not rows:
      raise app.UsageError(f'No finished grid point in {table.path}.')
  else:
    rows = run_sweep(configs, lambda g: compute(g, options), table,
                     batch_size=len(seeds), desc='capacity searches',
                     merge_only=FLAGS.merge_only,
                     # A cell's geometries share its compiled programs.
                     affinity=lambda c: (c['dim'], c['num_facts'],
                                         c['method']),
                     cost=lambda c: search_cost(c, FLAGS.max_steps))
    if not rows:
      raise app.UsageError(f'No finished grid point in {table.path}.')
  if not distributed.is_main_process():
    return
  plot(rows, os.path.join(FLAGS.out_dir, 'scaling.png'))
  text = summary(rows)
  write_text(os.path.join(FLAGS.out_dir, 'summary.md'),
             text + provenance.footer())
  print(text)


if __name__ == '__main__':
  app.run(main)
