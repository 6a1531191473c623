"""decodability_scaling --v2's law comparison on synthetic rows.

Runs in a subprocess: the experiment defines its absl flags at import, and
other experiment modules imported by tests define flags of the same names.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from conftest import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent('''
    import json, sys
    import numpy as np
    sys.path.insert(0, 'experiments')
    import decodability_scaling as ds
    ds.FLAGS(['ds', '--v2', '--methods=encoder_decoder,gd', '--num_boot=300',
              '--dim=64'])
    ds.apply_v2_defaults()
    rng = np.random.default_rng(0)
    rows = []
    for n in (256, 512, 1024, 2048):
      for g in range(10):
        for seed in range(3):
          rho = float(np.exp(rng.uniform(np.log(0.02), np.log(0.6))))
          gam = float(rng.uniform(0.01, 0.5))   # unrelated to the cost
          noise = 1 + 0.03 * rng.normal(size=2)
          rows += [
              dict(geometry=f'g{g}', num_facts=n, method='encoder_decoder',
                   seed=seed, rho_min=rho, hebbian_margin=gam,
                   params_per_fact=(0.01 / rho**2 + 20) * noise[0]),
              dict(geometry=f'g{g}', num_facts=n, method='gd', seed=seed,
                   rho_min=rho, hebbian_margin=gam,
                   params_per_fact=(8 * np.log(1 / rho) + 5) * noise[1])]
    comp = ds.v2_comparisons(rows, [256, 512, 1024, 2048])
    text, blob = ds.v2_summary(rows, comp, [256, 512, 1024, 2048])
    v = np.array([[1.0, 0], [0.6, 0.8], [0.5, 0.5]])
    print(json.dumps(dict(
        best={m: {str(n): c.best for n, c in per.items()}
              for m, per in comp.items()},
        verdicts=blob['verdicts'], seeds=blob['seeds'],
        rel_tol=blob['rel_tol'], text=text,
        hebb=ds.hebbian_margin(v, np.array([0, 1])),
        hebb_all=ds.hebbian_margin(v, np.array([0, 1, 2])))))
''')


def test_v2_law_comparison_recovers_the_generating_laws():
  env = subprocess_env()
  proc = subprocess.run([sys.executable, '-c', SCRIPT], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  # Pooled and at every N, each method's generating law is found.
  assert set(out['best']['encoder_decoder'].values()) == {'inv_rho2'}
  assert set(out['best']['gd'].values()) == {'log_inv_rho'}
  assert len(out['best']['gd']) == 5   # 'all' and four sizes
  assert 'beats' in out['verdicts']['encoder_decoder/all']
  assert out['seeds'] == ['0', '1', '2'] and out['rel_tol'] == 0.02
  assert '| gd | all | 120 | log(1/ρ) |' in out['text']
  # Hebbian margin over the used values, rivals from the whole table:
  # v0 = (1, 0): 1 - <v0, v1> = 0.4; v1 = (0.6, 0.8): 1 - <v1, v2> = 0.3
  # (the unused v2 = (0.5, 0.5) is its closest rival). With v2 used too,
  # <v2, v1> = 0.7 > |v2|^2 = 0.5: reading v2 back fails (-0.2).
  assert abs(out['hebb'] - 0.3) < 1e-9
  assert abs(out['hebb_all'] - (-0.2)) < 1e-9


INFEASIBLE = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, 'experiments')
    import decodability_scaling as ds
    from factstore_jax import training
    from factstore_jax.capacity import methods
    from factstore_jax.errors import InfeasibleFactSetError
    ds.FLAGS(['ds', '--v2', '--quick'])
    ds.apply_v2_defaults()
    calls = []
    def refuse(method, *args, **kwargs):
      calls.append(method)
      raise InfeasibleFactSetError([3])
    methods.find_capacity = refuse
    options = methods.MethodOptions(train=training.TrainConfig(max_steps=10))
    row, = ds.compute([dict(geometry='spike_0', dim=16, num_facts=32,
                            method='encoder_decoder', seed=0)], options)
    print(json.dumps(dict(row, calls=calls)))
''')


def test_an_infeasible_fact_set_gives_a_row_without_w_star():
  # The closed form refuses a set with a value certified undecodable: the
  # row records rho and no W* (left out of every law) instead of ending
  # the sweep.
  proc = subprocess.run([sys.executable, '-c', INFEASIBLE], cwd=ROOT,
                        env=subprocess_env(), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  row = json.loads(proc.stdout.strip().splitlines()[-1])
  assert row['calls'] == ['encoder_decoder']
  assert row['width'] == row['num_params'] == row['params_per_fact'] == ''
  assert 0 < row['rho_min'] <= 1 and row['seconds'] > 0


DEFAULTS = textwrap.dedent('''
    import json, sys
    import numpy as np
    sys.path.insert(0, 'experiments')
    import decodability_scaling as ds
    from factstore_jax.decodability import decodability
    ds.FLAGS(['ds', '--v2'])
    ds.apply_v2_defaults()
    rho = {g: float(np.min(decodability(
        ds.make_factset(g, 0, 256).values).rho))
           for g in ('spike_0', 'flat_0.2')}
    def cost_of(m, n, geometry='spike_0'):
      return ds.v2_row_cost(dict(geometry=geometry, dim=64, num_facts=n,
                                 method=m, seed=0))
    cost = {f'{m}@{n}': cost_of(m, n)
            for m in ('encoder_decoder', 'gd') for n in (256, 2048)}
    # A row the checked-in results lack (geometry not run): the formula.
    cost.update({f'{m}@{n}/formula': cost_of(m, n, 'no_such_geometry')
                 for m in ('encoder_decoder', 'gd') for n in (256, 2048)})
    reference = ds.reference_rows(ds.REFERENCE_ROWS, ds.KEY_FIELDS).get(
        dict(geometry='spike_0', dim=64, num_facts=2048, method='gd', seed=0))
    cost['reference'] = reference['seconds']
    configs = ds.v2_configs()
    by_method = {m: sorted({c['geometry'] for c in configs
                            if c['method'] == m}) for m in ds.FLAGS.methods}
    ds.FLAGS.v2_gd_geometries = ['spike_0', 'flat_0.05']
    try:
      ds.v2_configs()
      error = None
    except ValueError as e:
      error = str(e)
    print(json.dumps(dict(geometries=ds.geometries(), rho=rho, cost=cost,
                          extended=ds.V2_EXTENDED, seeds=ds.FLAGS.seeds,
                          rel_tol=ds.FLAGS.rel_tol, dim=ds.FLAGS.dim,
                          num_configs=len(configs), by_method=by_method,
                          error=error)))
''')


def test_v2_default_grid_spans_the_rho_range_and_deals_gd_as_dearer():
  proc = subprocess.run([sys.executable, '-c', DEFAULTS], cwd=ROOT,
                        env=subprocess_env(), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert len(out['geometries']) == 8
  assert {'spike_0', 'flat_0.2'} <= set(out['geometries'])
  assert not set(out['geometries']) & set(out['extended'])
  assert out['seeds'] == ['0', '1', '2'] and out['rel_tol'] <= 0.02
  assert out['dim'] == 64
  # GD (the dear rows) runs on a subset spanning the same rho range; the
  # closed form on all 8: 4 sizes x 3 seeds x (8 + 4) geometries.
  assert out['by_method']['encoder_decoder'] == sorted(out['geometries'])
  gd = out['by_method']['gd']
  assert len(gd) == 4 and set(gd) < set(out['geometries'])
  assert out['num_configs'] == 4 * 3 * (8 + 4)
  assert {'spike_0', 'flat_0.2'} <= set(gd)   # both ends of the rho range
  assert "--v2_gd_geometries ['flat_0.05'] are not in" in out['error']
  # Isotropic values at one end, a flat cap at the other (seed 0, N = 256:
  # 0.035; down to 0.014 over the grid's seeds and sizes).
  assert out['rho']['spike_0'] > 0.5
  assert out['rho']['flat_0.2'] < 0.05
  cost = out['cost']
  # A checked-in row costs the seconds it took; others the formula.
  assert cost['gd@2048'] == cost['reference'] > 0
  for kind in ('', '/formula'):
    assert 0 < cost[f'encoder_decoder@256{kind}'] < cost[f'gd@2048{kind}']
    assert cost[f'encoder_decoder@256{kind}'] <= cost[
        f'encoder_decoder@2048{kind}']
    assert cost[f'gd@256{kind}'] < cost[f'gd@2048{kind}']
    assert cost[f'gd@2048{kind}'] > 5 * cost[f'encoder_decoder@2048{kind}']


RESUME = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, 'experiments')
    import decodability_scaling as ds
    from factstore_jax import training
    from factstore_jax.capacity import methods
    ds.FLAGS(['ds', '--quick', '--max_steps=1000', '--out_dir=' + sys.argv[1]])
    ds.apply_v2_defaults()
    trained = []
    real = methods.evaluate_batched
    def counting(method, keys, fss, widths, **kwargs):
      trained.extend(widths)
      return real(method, keys, fss, widths, **kwargs)
    methods.evaluate_batched = counting
    options = methods.MethodOptions(train=training.TrainConfig(
        max_steps=ds.FLAGS.max_steps))
    config = dict(geometry='spike_0', dim=16, num_facts=16, method='gd',
                  seed=0)
    first, = ds.compute([config], options)
    n_first = len(trained)
    # rows.csv lost, rounds.jsonl kept: the search replays every round.
    again, = ds.compute([config], options)
    print(json.dumps(dict(first=first, again=again, n_first=n_first,
                          n_again=len(trained) - n_first)))
''')


def test_a_gd_row_replays_its_journaled_rounds(tmp_path):
  proc = subprocess.run([sys.executable, '-c', RESUME, str(tmp_path)],
                        cwd=ROOT, env=subprocess_env(), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out['n_first'] >= 2 and out['n_again'] == 0
  assert out['again']['width'] == out['first']['width'] != ''
  lines = [json.loads(x) for x in open(tmp_path / 'rounds.jsonl')]
  assert len(lines) == out['n_first']
  # The replayed row's seconds include the journaled rounds'.
  assert out['again']['seconds'] >= sum(x['seconds'] for x in lines)


REFRESH = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, 'experiments')
    import decodability_scaling as ds
    from factstore_jax.sweep import ResultsTable
    old = dict(rho_min=-0.05, rho_mean=0.2, inv_rho2=1e24)
    new = dict(rho_min=0.02, rho_mean=0.3, inv_rho2=2500.0,
               rho_solver=ds.RHO_SOLVER)
    base = dict(geometry='spike_300', dim=64, num_facts=256)
    rows = [dict(base, method='gd', seed=0, width=9, **old),
            dict(base, method='encoder_decoder', seed=0, width=30, **new),
            dict(base, method='gd', seed=1, width=8, **old)]  # no fresh row
    table = ResultsTable(sys.argv[1], ds.KEY_FIELDS)
    for r in rows:
      table.append(r)
    out, changed = ds.refresh_rho(rows, table)
    print(json.dumps(dict(changed=changed, out=out,
                          file=ResultsTable(sys.argv[1],
                                            ds.KEY_FIELDS).rows())))
''')


def test_stale_rho_columns_are_taken_from_the_same_fact_sets_fresh_row(
    tmp_path):
  proc = subprocess.run(
      [sys.executable, '-c', REFRESH, str(tmp_path / 'rows.csv')], cwd=ROOT,
      env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  assert got['changed'] == 1
  for rows in (got['out'], got['file']):
    gd0, ed, gd1 = rows
    assert (gd0['rho_min'], gd0['inv_rho2'], gd0['width']) == (0.02, 2500.0, 9)
    assert gd0['rho_solver'] == ed['rho_solver'] >= 2
    assert gd1['rho_min'] == -0.05 and gd1.get('rho_solver') is None
