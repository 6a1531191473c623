r"""Measure-zero stress: fact sets driven towards degeneracy by a parameter ε.

The construction claims to store every feasible fact set (all used values
decodable) and to raise ``InfeasibleFactSetError`` naming the undecodable
values otherwise. Random fact sets are generic and cannot probe the
measure-zero set where that could break, so each *family* below follows one
path, per seed, from a generic fact set (large ε) to a degenerate one
(ε -> 0); only ε changes along a path (the base points and perturbation
directions are fixed by the seed):

* ``near_duplicate_keys``: ``N/8`` key pairs ``k' = normalise(k + ε u)``
  mapped to different values (key gap ~ ε; feasible for every ε > 0).
* ``near_duplicate_values``: ``P/8`` value pairs ``v' = normalise(v + ε u)``,
  both used (rho ~ ε / 2 -> 0, still feasible; equal in float32 at tiny ε,
  and then both are undecodable).
* ``hull_exterior``: value 0 at ``c + λ* (1 + ε) u`` where ``c + λ* u`` is
  where the ray from the centroid ``c`` of the other values along a random
  ``u`` leaves their hull (an LP): a strict vertex with rho -> 0 as ε -> 0.
* ``hull_interior``: value 0 at ``c + λ* (1 - ε) u``, strictly inside the
  hull: infeasible for every ε > 0; ``construct`` must name value 0.
* ``low_rank_keys``: keys ``normalise(Z A^T + ε G)`` with ``A`` a random
  ``d x 2`` orthonormal frame (rank 2 as ε -> 0).
* ``many_to_one_gaps``: ``N/4`` of the ``P = N`` values used, each by four
  keys; keys in ``N/4`` clusters of four, ``normalise(c + ε u_j)``, the four
  keys of a cluster mapped to four different values (gaps ~ ε).

Each trial (family, ε, seed) runs :func:`factstore_jax.construct` and is
classified:

* ``stored``: it returned, and the dense checks
  (:func:`factstore_jax.storage.evaluate_fn` on the returned encoder-decoder
  and :func:`factstore_jax.storage.evaluate_mlp` on its folded gated MLP, both
  float32) give accuracy 1.0 and min margin > 0;
* ``silently_wrong``: it returned but a dense check finds accuracy < 1 or
  min margin <= 0 (must never happen); every returned MLP is also evaluated
  in float64 (numpy, ``f64_min_margin``): the summary lists stored trials
  whose facts hold only through float32 rounding;
* ``infeasible``: it raised ``InfeasibleFactSetError``; the named values are
  checked against an independent :func:`factstore_jax.decodability.decodability`
  solve (``named_max_rho``: the largest certified rho lower bound among them,
  ``<= 1e-6`` means none is certified decodable) and an LP in float64
  (``named_in_hull``: how many lie in the convex hull of the other values,
  i.e. are undecodable exactly); ``missed``: used values the independent
  solve finds undecodable that were not named;
* ``construction_error`` / ``input_error``: another documented refusal
  (``ConstructionError``; a ``FactStoreError`` from validation, e.g. keys that
  became identical in float32);
* ``crash``: any other exception (a bug).

Rows go to ``rows.csv`` (resumable, :mod:`factstore_jax.sweep`); the script
writes ``success_vs_eps.png`` (success rate with Wilson 95% intervals, and
the dense min margin, against ε, log x) and ``summary.md`` / ``summary.json``
(counts per cell with Wilson and Clopper-Pearson intervals, the commit and
the command). ``--quick`` runs a small grid (the test's).

  python experiments/measure_zero.py                    # default grid
  python experiments/measure_zero.py --quick --out_dir=/tmp/mz
  python experiments/measure_zero.py --merge_only       # report only

The trials are independent: on the 2-core development CPU run the default
grid as two local ``jax.distributed`` processes, one per core
(``docs/distributed.md``; ``--merge_only`` reports what has finished and
computes nothing)::

  for i in 0 1; do taskset -c $i python experiments/measure_zero.py \
      --coordinator_address=127.0.0.1:12357 --num_processes=2 \
      --process_id=$i & done; wait
"""

from __future__ import annotations

import json
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
from absl import app, flags

import factstore_jax
from factstore_jax import distributed, provenance, stats, storage
from factstore_jax.atomic import save_figure, write_text
from factstore_jax.decodability import decodability, used_values
from factstore_jax.errors import (ConstructionError, FactStoreError,
                                  InfeasibleFactSetError)
from factstore_jax.factsets import FactSet
from factstore_jax.sweep import ResultsTable, run_sweep

FAMILIES = ('near_duplicate_keys', 'near_duplicate_values', 'hull_exterior',
            'hull_interior', 'low_rank_keys', 'many_to_one_gaps')
# The outcome each family should have for a clearly non-degenerate ε.
EXPECTED = {f: 'stored' for f in FAMILIES} | {'hull_interior': 'infeasible'}
OUTCOMES = ('stored', 'infeasible', 'construction_error', 'input_error',
            'crash', 'silently_wrong')
KEY_FIELDS = ('family', 'dim', 'num_facts', 'epsilon', 'seed')
ATOL = 1e-6   # decodability's "not decodable" threshold

FLAGS = flags.FLAGS


# ---------------------------------------------------------------------------
# Families.
# ---------------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _tangent(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
  """Random unit directions orthogonal to each unit row of ``base``."""
  g = rng.normal(size=base.shape)
  g -= np.sum(g * base, axis=-1, keepdims=True) * base
  return _unit(g)


def ray_exit(others: np.ndarray, direction: np.ndarray) -> float:
  """``max t`` with ``c + t * direction`` in the convex hull of ``others``.

  ``c`` is the centroid of ``others`` (inside their hull). An LP in float64
  (HiGHS) over ``(alpha (M,), t)``: ``sum alpha_i (o_i - c) = t direction``,
  ``sum alpha = 1``, ``alpha >= 0``.

  Args:
    others: ``(M, d)`` points spanning ``R^d`` affinely.
    direction: ``(d,)``.

  Returns:
    ``t*``; ``c + s * direction`` is outside the hull iff ``s > t*``.
  """
  others = np.asarray(others, np.float64)
  others = others - others.mean(axis=0)
  m, d = others.shape
  a_eq = np.zeros((d + 1, m + 1))
  a_eq[:d, :m] = others.T
  a_eq[:d, m] = -np.asarray(direction, np.float64)
  a_eq[d, :m] = 1
  b_eq = np.zeros(d + 1)
  b_eq[d] = 1
  cost = np.zeros(m + 1)
  cost[m] = -1
  res = scipy.optimize.linprog(cost, A_eq=a_eq, b_eq=b_eq,
                               bounds=[(0, None)] * (m + 1), method='highs')
  if res.status != 0:
    raise FactStoreError(f'ray_exit: LP failed ({res.message})')
  return float(res.x[m])


def in_hull_of_others(values: np.ndarray, j: int) -> bool:
  """Whether ``values[j]`` lies in the hull of the other rows (float64 LP).

  Such a value is not a strict vertex: not decodable, in exact arithmetic.
  """
  values = np.asarray(values, np.float64)
  others = np.delete(values, j, axis=0)
  a_eq = np.vstack([others.T, np.ones((1, others.shape[0]))])
  b_eq = np.append(values[j], 1.0)
  res = scipy.optimize.linprog(np.zeros(others.shape[0]), A_eq=a_eq,
                               b_eq=b_eq, bounds=(0, None), method='highs')
  return res.status == 0


class Trial(NamedTuple):
  factset: FactSet          # float32 keys, values; int32 mapping
  target: int               # the value the family degrades (-1: several)
  lp_ratio: float | None    # hull families: t* / s of value 0 (> 1: inside)
  min_key_gap: float        # min distance of keys mapped to different values


def make_trial(family: str, dim: int, num_facts: int, eps: float,
               seed: int) -> Trial:
  """The fact set of ``family`` at ``eps`` for ``seed`` (numpy, float32).

  Args:
    family: one of ``FAMILIES``.
    dim: ``d``; num_facts: ``N`` (a multiple of 8).
    eps: the degeneracy parameter, ``> 0``.
    seed: fixes every base point and direction; only ``eps`` moves them.

  Returns:
    :class:`Trial`.
  """
  if family not in FAMILIES:
    raise FactStoreError(f'unknown family {family!r}; expected one of '
                         f'{FAMILIES}')
  if num_facts % 8 or num_facts < 16:
    raise FactStoreError(f'num_facts must be a multiple of 8, >= 16; got '
                         f'{num_facts}')
  if not eps > 0:
    raise FactStoreError(f'eps must be > 0; got {eps}')
  n, d = num_facts, dim
  rng = np.random.default_rng([FAMILIES.index(family), seed])
  keys = _unit(rng.normal(size=(n, d)))
  values = _unit(rng.normal(size=(n, d)))
  mapping = rng.permutation(n)
  target, lp_ratio = -1, None
  if family == 'near_duplicate_keys':
    i = np.arange(0, n // 4, 2)
    keys[i + 1] = _unit(keys[i] + eps * _tangent(rng, keys[i]))
  elif family == 'near_duplicate_values':
    i = np.arange(0, n // 4, 2)
    values[i + 1] = _unit(values[i] + eps * _tangent(rng, values[i]))
  elif family in ('hull_exterior', 'hull_interior'):
    u = _unit(rng.normal(size=d))
    exit_t = ray_exit(values[1:], u)
    scale = exit_t * (1 + eps if family == 'hull_exterior' else 1 - eps)
    values[0] = values[1:].mean(axis=0) + scale * u
    target = 0
  elif family == 'low_rank_keys':
    frame, _ = np.linalg.qr(rng.normal(size=(d, 2)))
    keys = _unit(rng.normal(size=(n, 2)) @ frame.T +
                 eps * rng.normal(size=(n, d)))
  elif family == 'many_to_one_gaps':
    # The table keeps N values (so every family has the same shapes); the
    # map uses N/4 of them, four keys each.
    p = n // 4
    centres = _unit(rng.normal(size=(p, d)))
    offsets = _unit(rng.normal(size=(n, d)))
    keys = _unit(np.repeat(centres, 4, axis=0) + eps * offsets)
    shift = rng.permutation(p)
    mapping = (np.repeat(shift, 4) + np.tile(np.arange(4), p)) % p
    mapping = rng.permutation(n)[:p][mapping]
  keys32 = keys.astype(np.float32)
  values32 = values.astype(np.float32)
  if target == 0:
    # Measured on the float32 values actually stored.
    v = values32.astype(np.float64)
    offset = v[0] - v[1:].mean(axis=0)
    s = float(np.linalg.norm(offset))
    lp_ratio = ray_exit(v[1:], offset / s) / s
  k64 = keys32.astype(np.float64)
  dist = np.linalg.norm(k64[:, None] - k64[None], axis=-1)
  differ = mapping[:, None] != mapping[None]
  return Trial(FactSet(jnp.asarray(keys32), jnp.asarray(values32),
                       jnp.asarray(mapping, jnp.int32)),
               target, lp_ratio, float(dist[differ].min()))


# ---------------------------------------------------------------------------
# One trial.
# ---------------------------------------------------------------------------


def _dense_f64(model, keys, values, mapping) -> float:
  """Min margin of the folded gated MLP evaluated in float64 (numpy)."""
  mlp = model.as_mlp()
  x = np.asarray(keys, np.float64)
  gate = x @ np.asarray(mlp.w_gate, np.float64)
  if mlp.b_gate is not None:
    gate += np.asarray(mlp.b_gate, np.float64)
  act = (np.clip(gate, 0, 1) if mlp.activation == 'clipped'
         else np.maximum(gate, 0))
  out = ((x @ np.asarray(mlp.w_up, np.float64)) * act) @ np.asarray(
      mlp.w_down, np.float64)
  scores = out @ np.asarray(values, np.float64).T
  idx = np.arange(len(mapping))
  target = scores[idx, mapping]
  scores[idx, mapping] = -np.inf
  return float(np.min(target - scores.max(axis=1)))


def run_trial(family: str, dim: int, num_facts: int, eps: float,
              seed: int) -> dict:
  """Constructs and classifies one trial; returns its row (scalars).

  See the module docstring for the outcomes and columns.
  """
  t0 = time.perf_counter()
  trial = make_trial(family, dim, num_facts, eps, seed)
  keys, values, mapping = trial.factset
  mapping_np = np.asarray(mapping)
  used = used_values(mapping_np)
  indep = decodability(values)
  rho_used = np.asarray(indep.rho)[used]
  undecodable = set(used[rho_used <= ATOL].tolist())
  row = dict(
      lp_ratio=trial.lp_ratio, min_key_gap=trial.min_key_gap,
      rho_min_used=float(rho_used.min()),
      rho_target=(float(np.asarray(indep.rho)[trial.target])
                  if trial.target >= 0 else None),
      independent_undecodable=len(undecodable))
  try:
    c = factstore_jax.construct(seed, trial.factset)
  except InfeasibleFactSetError as e:
    named = sorted(set(e.undecodable))
    rho = np.asarray(indep.rho)
    row.update(
        outcome='infeasible', named=json.dumps(named[:50]),
        num_named=len(named),
        named_unused=len(set(named) - set(used.tolist())),
        named_max_rho=float(rho[named].max()) if named else None,
        named_max_dual=(float(np.asarray(indep.dual_bound)[named].max())
                        if named else None),
        named_in_hull=sum(in_hull_of_others(values, j) for j in named[:50]),
        missed=len(undecodable - set(named)), error=str(e)[:200])
  except ConstructionError as e:
    row.update(outcome='construction_error', error=str(e)[:200])
  except FactStoreError as e:
    row.update(outcome='input_error', error=str(e)[:200])
  except Exception as e:  # pylint: disable=broad-except
    row.update(outcome='crash', error=f'{type(e).__name__}: {e}'[:200])
  else:
    rep = c.report
    factorised = storage.evaluate_fn(c.model, FactSet(keys, values, mapping))
    folded = storage.evaluate_mlp(c.model.as_mlp(),
                                  FactSet(keys, values, mapping))
    dense_ok = all(float(r.accuracy) == 1.0 and float(r.min_margin) > 0
                   for r in (factorised, folded))
    row.update(
        outcome='stored' if dense_ok else 'silently_wrong',
        certified_min_margin=rep.min_margin, check=rep.check,
        float32_bound=rep.float32_bound,
        dense_accuracy=float(factorised.accuracy),
        dense_min_margin=float(factorised.min_margin),
        folded_accuracy=float(folded.accuracy),
        folded_min_margin=float(folded.min_margin),
        f64_min_margin=_dense_f64(c.model, keys, values, mapping_np),
        dense_min_normalized_margin=float(factorised.min_normalized_margin),
        certificate_above_dense=bool(
            rep.min_margin > float(factorised.min_margin) + 1e-6),
        code_dim=rep.code_dim, patched_values=rep.patched_values,
        repaired_buckets=rep.repaired_buckets, retries=rep.retries,
        split_buckets=rep.split_buckets, num_params=rep.num_params)
  row['seconds'] = time.perf_counter() - t0
  return row


# ---------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------


def cells(rows):
  """``{(family, eps): [rows]}`` in family, descending-ε order."""
  out = {}
  for r in sorted(rows, key=lambda r: (FAMILIES.index(r['family']),
                                       -r['epsilon'], r['seed'])):
    out.setdefault((r['family'], r['epsilon']), []).append(r)
  return out


def cell_stats(sel) -> dict:
  counts = {o: sum(r['outcome'] == o for r in sel) for o in OUTCOMES}
  n = len(sel)
  fam = sel[0]['family']
  ok = counts[EXPECTED[fam]]
  margins = [r['dense_min_margin'] for r in sel if r['outcome'] == 'stored']
  infeasible = [r for r in sel if r['outcome'] == 'infeasible']
  return dict(
      family=fam, epsilon=sel[0]['epsilon'], trials=n, counts=counts,
      seeds=sorted(r['seed'] for r in sel),
      expected=EXPECTED[fam], success=ok,
      success_rate=ok / n,
      wilson=list(stats.wilson_interval(ok, n)[3:5]),
      clopper_pearson=list(stats.clopper_pearson_interval(ok, n)[3:5]),
      stored_rate=counts['stored'] / n,
      stored_wilson=list(stats.wilson_interval(counts['stored'], n)[3:5]),
      min_dense_margin=min(margins) if margins else None,
      median_dense_margin=float(np.median(margins)) if margins else None,
      min_rho_used=min(r['rho_min_used'] for r in sel),
      named_all_undecodable=all(
          (r['named_max_rho'] is not None and r['named_max_rho'] <= ATOL)
          for r in infeasible),
      named_in_hull=sum(r['named_in_hull'] or 0 for r in infeasible),
      num_named=sum(r['num_named'] or 0 for r in infeasible),
      missed=sum(r['missed'] or 0 for r in infeasible),
      certificate_above_dense=sum(bool(r.get('certificate_above_dense'))
                                  for r in sel),
      lp_ratio_range=([min(r['lp_ratio'] for r in sel),
                       max(r['lp_ratio'] for r in sel)]
                      if sel[0]['lp_ratio'] is not None else None))


def plot(all_stats, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
  families = list(dict.fromkeys(s['family'] for s in all_stats))
  for fam in families:
    sel = [s for s in all_stats if s['family'] == fam]
    eps = np.array([s['epsilon'] for s in sel])
    rate = np.array([s['success_rate'] for s in sel])
    lo = np.array([s['wilson'][0] for s in sel])
    hi = np.array([s['wilson'][1] for s in sel])
    ax1.errorbar(eps, rate, yerr=[rate - lo, hi - rate], marker='o',
                 capsize=3, label=f'{fam} (expect {EXPECTED[fam]})')
    m = [(s['epsilon'], s['min_dense_margin']) for s in sel
         if s['min_dense_margin'] is not None]
    if m:
      ax2.plot(*zip(*m), marker='o', label=fam)
  ax1.set_xscale('log')
  ax1.set_xlabel('ε (degeneracy parameter)')
  ax1.set_ylabel('rate of the expected outcome (Wilson 95%)')
  ax1.set_ylim(-0.05, 1.05)
  ax1.legend(fontsize=7)
  ax2.set_xscale('log')
  ax2.set_yscale('log')
  ax2.set_xlabel('ε')
  ax2.set_ylabel('min dense margin over stored trials')
  ax2.legend(fontsize=7)
  fig.tight_layout()
  save_figure(fig, path)


def summarize(rows, config: dict) -> tuple[str, dict]:
  all_stats = [cell_stats(sel) for sel in cells(rows).values()]
  total = {o: sum(s['counts'][o] for s in all_stats) for o in OUTCOMES}
  wrong = total['silently_wrong']
  trials = sum(total.values())
  wrong_ci = stats.clopper_pearson_interval(wrong, trials)
  lines = [
      '# measure_zero: construct near degenerate fact sets', '',
      f'd = {config["dim"]}, N = {config["num_facts"]}; seeds '
      f'{config["seeds"]} requested, '
      f'{min(s["trials"] for s in all_stats)}-'
      f'{max(s["trials"] for s in all_stats)} finished per cell; commit '
      f'`{config["commit"]}`; command `{config["command"]}`; '
      f'{config["seconds_total"] / 60:.1f} min of trial time '
      f'({config["backend"]}).', '',
      f'**Silently wrong MLPs: {wrong} of {trials} trials** (Clopper-Pearson '
      f'95% upper bound on the rate: {wrong_ci.high:.2g}). Outcomes over all '
      'trials: ' + ', '.join(f'{o} {total[o]}' for o in OUTCOMES) + '.', '',
      'Success = the family\'s expected outcome (`stored`; `infeasible` for '
      'hull_interior), with Wilson and Clopper-Pearson 95% intervals. '
      '`min margin`: the smallest dense float32 margin over stored trials. '
      '`named`: values named by InfeasibleFactSetError (`in hull`: how many '
      'of them an exact LP places in the hull of the others; `all undec.`: '
      'whether the independent decodability solve certified none of them '
      'decodable; `missed`: independently undecodable used values not '
      'named).', '',
      '| family | ε | stored | infeasible | constr. err | input err | crash '
      '| silently wrong | success (Wilson 95%) | Clopper-Pearson | min margin '
      '| min ρ used | named (in hull, all undec., missed) |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  for s in all_stats:
    c = s['counts']
    named = (f'{s["num_named"]} ({s["named_in_hull"]}, '
             f'{"yes" if s["named_all_undecodable"] else "NO"}, '
             f'{s["missed"]})' if c['infeasible'] else '-')
    margin = (f'{s["min_dense_margin"]:.2e}'
              if s['min_dense_margin'] is not None else '-')
    lines.append(
        f'| {s["family"]} | {s["epsilon"]:g} | {c["stored"]} | '
        f'{c["infeasible"]} | {c["construction_error"]} | '
        f'{c["input_error"]} | {c["crash"]} | {c["silently_wrong"]} | '
        f'{s["success"]}/{s["trials"]} [{s["wilson"][0]:.2f}, '
        f'{s["wilson"][1]:.2f}] | [{s["clopper_pearson"][0]:.2f}, '
        f'{s["clopper_pearson"][1]:.2f}] | {margin} | '
        f'{s["min_rho_used"]:.1e} | {named} |')
  errors = {}
  for r in rows:
    if r['outcome'] in ('construction_error', 'input_error', 'crash'):
      errors.setdefault((r['family'], r['outcome'], r['error'][:90]), []
                        ).append((r['epsilon'], r['seed']))
  if errors:
    lines += ['', '## Refusals and errors (first 90 characters)', '']
    for (fam, outcome, msg), where in sorted(errors.items()):
      lines.append(f'- {fam} / {outcome} ×{len(where)} (ε, seed) e.g. '
                   f'{where[:3]}: `{msg}`')
  cert = sum(s['certificate_above_dense'] for s in all_stats)
  lines += ['', f'Trials whose certified min margin exceeds the dense one '
            f'(by > 1e-6): {cert}.']
  fragile = [r for r in rows if r['outcome'] == 'stored' and
             r['f64_min_margin'] is not None and r['f64_min_margin'] <= 0]
  lines += ['', f'Stored trials whose MLP misstores when the same weights are '
            f'evaluated in float64 (numpy): {len(fragile)} of '
            f'{total["stored"]}' + (':' if fragile else '.')]
  for r in fragile:
    lines.append(f'- {r["family"]} ε={r["epsilon"]:g} seed {r["seed"]}: '
                 f'float32 dense min margin {r["dense_min_margin"]:.3g}, '
                 f'float64 {r["f64_min_margin"]:.3g} (check {r["check"]}, '
                 f'{r["repaired_buckets"]} bucket(s) refit, '
                 f'{r["split_buckets"]} split)')
  blob = dict(config=config, totals=total, trials=trials,
              silently_wrong=wrong, float64_misstored=[
                  dict(family=r['family'], epsilon=r['epsilon'],
                       seed=r['seed'], f64_min_margin=r['f64_min_margin'],
                       dense_min_margin=r['dense_min_margin'])
                  for r in fragile],
              silently_wrong_rate_cp95=[wrong_ci.low, wrong_ci.high],
              cells=all_stats)
  return '\n'.join(lines) + '\n', blob


def define_flags():
  """Defines the script's flags (not at import, so tests can import the
  module next to other experiments whose flags share these names)."""
  flags.DEFINE_integer('dim', 16, 'Embedding dimension d.')
  flags.DEFINE_integer('num_facts', 64, 'N = P (many_to_one_gaps uses N/4 '
                       'of the values).')
  flags.DEFINE_list('families', list(FAMILIES), 'Families to run.')
  flags.DEFINE_list('epsilons', ['1e-1', '1e-2', '1e-3', '1e-4', '1e-5',
                                 '1e-6', '1e-7'], 'Degeneracy parameters ε.')
  flags.DEFINE_integer('num_seeds', 20,
                       'Seeds 0..num_seeds-1 per (family, ε).')
  flags.DEFINE_bool('quick', False, 'Small grid (d=8, N=16, ε in {1e-2, '
                    '1e-6}, seed 0) for tests.')
  flags.DEFINE_string('out_dir', 'experiments/results/measure_zero',
                      'Output folder.')
  distributed.define_flags()  # --merge_only: report the finished trials


def grid() -> tuple[int, int, list[float], list[int], list[str]]:
  if FLAGS.quick:
    return 8, 16, [1e-2, 1e-6], [0], list(FLAGS.families)
  return (FLAGS.dim, FLAGS.num_facts, [float(e) for e in FLAGS.epsilons],
          list(range(FLAGS.num_seeds)), list(FLAGS.families))


def main(argv):
  del argv
  dim, n, epsilons, seeds, families = grid()
  for f in families:
    if f not in FAMILIES:
      raise FactStoreError(f'unknown family {f!r}; expected {FAMILIES}')
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  # Seed-major order: a run stopped early has every cell, with fewer seeds.
  configs = [dict(family=f, dim=dim, num_facts=n, epsilon=e, seed=s)
             for s in seeds for f in families for e in epsilons]
  distributed.initialize_from_flags()
  table = ResultsTable(os.path.join(FLAGS.out_dir, 'rows.csv'), KEY_FIELDS)
  compute = lambda group: [run_trial(c['family'], c['dim'], c['num_facts'],
                                     c['epsilon'], c['seed']) for c in group]
  rows = run_sweep(configs, compute, table, desc='trials',
                   merge_only=FLAGS.merge_only)
  if not distributed.is_main_process():
    return
  if not rows:
    raise FactStoreError(f'no finished trial of the grid in {table.path}')
  config = dict(dim=dim, num_facts=n, epsilons=epsilons, seeds=seeds,
                families=families,
                commit=provenance.run_commit() or 'unknown',
                command=provenance.command_line(),
                backend=jax.default_backend(),
                seconds_total=float(sum(r['seconds'] for r in rows)))
  text, blob = summarize(rows, config)
  plot(blob['cells'], os.path.join(FLAGS.out_dir, 'success_vs_eps.png'))
  write_text(os.path.join(FLAGS.out_dir, 'summary.md'), text)
  write_text(os.path.join(FLAGS.out_dir, 'summary.json'),
             json.dumps(blob, indent=1, default=float) + '\n')
  print(text)


if __name__ == '__main__':
  define_flags()
  app.run(main)
