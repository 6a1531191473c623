"""End-to-end smoke runs of the experiment scripts on tiny grids."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, out_dir, *flags):
  env = subprocess_env()
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'experiments', script),
       f'--out_dir={out_dir}', *flags],
      capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc


def rows(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def run_main(module, out_dir, *flags):
  """``module.main`` in this process (flags restored afterwards).

  For runs that compute nothing (resumed grids, reports, usage errors): they
  need no fresh interpreter, only the script's flags and ``main``.
  """
  from absl.testing import flagsaver  # pylint: disable=import-outside-toplevel
  with flagsaver.flagsaver():
    module.FLAGS([module.__name__, f'--out_dir={out_dir}', *flags])
    module.main([])


def test_capacity_scaling_tiny(tmp_path, monkeypatch):
  flags = ['--dims=16', '--alphas=0.125,0.25', '--seeds=0,1',
           '--methods=gd,hebbian_ridge', '--geometries=isotropic',
           '--max_steps=600', '--learning_rate=0.01', '--patience=200',
           '--rel_tol=0.5']
  proc = run('capacity_scaling.py', tmp_path, *flags)
  assert 'gd isotropic d=16 N=32 [' in proc.stderr  # one line per round
  assert 'seed 1 width' in proc.stderr
  got = rows(tmp_path / 'rows.csv')
  assert len(got) == 2 * 2 * 2
  assert all(r['num_params'] for r in got)
  assert {r['device'] for r in got} == {'cpu'}  # JAX_PLATFORMS=cpu
  summary = (tmp_path / 'summary.md').read_text()
  assert 'Log-log slopes' in summary and '| isotropic | 16 | gd |' in summary
  assert '| 2/2 | cpu |' in summary
  assert '3 largest N' in summary  # a column, empty (—) with two sizes
  # Provenance: the command line and the library commit that made it.
  assert 'Produced by `python ' in summary and '--dims=16' in summary
  assert 'with the library at ' in summary
  assert (tmp_path / 'scaling.png').stat().st_size > 0
  # Every tested width of every row is in rounds.jsonl.
  with open(tmp_path / 'rounds.jsonl') as f:
    logged = [json.loads(line) for line in f]
  assert sorted((r['cell'][2], r['cell'][3], r['seed'], r['width'],
                 r['accuracy']) for r in logged) == sorted(
      (int(r['num_facts']), r['method'], int(r['seed']), int(w), a)
      for r in got for w, a in json.loads(r['tested']).items())
  # The runs below that compute nothing call the script's main in this
  # process (no fresh interpreter and JAX start each).
  from absl import app  # pylint: disable=import-outside-toplevel
  monkeypatch.syspath_prepend(os.path.join(ROOT, 'experiments'))
  monkeypatch.setattr(sys, 'excepthook', sys.excepthook)  # main installs one
  import capacity_scaling  # pylint: disable=import-outside-toplevel
  main = lambda *f: run_main(capacity_scaling, tmp_path, *f)
  # A re-run finds every row done and computes nothing new.
  mtime = os.path.getmtime(tmp_path / 'rows.csv')
  main(*flags)
  assert os.path.getmtime(tmp_path / 'rows.csv') == mtime
  # A cap on N drops the grid points above it (here the whole d = 24 part
  # and alpha = 0.25 at d = 16), so nothing new is computed either.
  main(*flags[1:], '--dims=16,24', '--max_num_facts=32')
  assert os.path.getmtime(tmp_path / 'rows.csv') == mtime
  assert '| isotropic | 16 | gd | 64 |' not in (
      tmp_path / 'summary.md').read_text()
  with pytest.raises(app.UsageError, match='No grid point'):
    main(*flags, '--max_num_facts=8')
  # --summarize_only reports the finished points of a larger grid and
  # computes nothing (d = 24 has none).
  main(*flags[1:], '--dims=16,24', '--summarize_only')
  assert os.path.getmtime(tmp_path / 'rows.csv') == mtime
  summary = (tmp_path / 'summary.md').read_text()
  assert '| isotropic | 16 | gd | 64 |' in summary and '| 24 |' not in summary
  with pytest.raises(app.UsageError, match='No finished grid point'):
    main(*flags[1:], '--dims=24', '--summarize_only')
  # A different GD setup does not reuse the logged rounds (the search would
  # train every width again); the same setup does.
  from absl.testing import flagsaver  # pylint: disable=import-outside-toplevel
  cell = ['isotropic', 16, 32, 'gd']
  tested = [json.loads(r['tested'])
            for r in sorted(got, key=lambda r: r['seed'])
            if (r['num_facts'], r['method']) == ('32', 'gd')]
  with flagsaver.flagsaver():
    for max_steps, want in (('600', tested), ('500', [{}, {}])):
      capacity_scaling.FLAGS(['capacity_scaling', f'--out_dir={tmp_path}',
                              *flags, f'--max_steps={max_steps}'])
      setups = [capacity_scaling.round_setup()] * 2
      known = capacity_scaling.load_rounds(cell, [0, 1], setups)
      assert [{str(w): a for w, a in k.items()} for k in known] == want
  # rows.csv lost, rounds.jsonl kept: the re-run replays the logged rounds
  # (the closed-form baselines too: they are batched) and trains nothing.
  os.remove(tmp_path / 'rows.csv')
  proc = run('capacity_scaling.py', tmp_path, *flags)
  assert 'width' not in proc.stderr
  again = rows(tmp_path / 'rows.csv')
  drop = lambda rs: [{k: v for k, v in r.items() if k != 'seconds'}
                     for r in rs]
  assert drop(again) == drop(got)


def test_capacity_rounds_replay_only_the_same_setup(tmp_path, monkeypatch):
  # Encoder-decoder GD's accuracies depend on each seed's code dim and
  # decoder: rounds logged under another setup (or none) are not replayed.
  monkeypatch.syspath_prepend(os.path.join(ROOT, 'experiments'))
  import capacity_scaling  # pylint: disable=import-outside-toplevel
  from absl.testing import flagsaver  # pylint: disable=import-outside-toplevel
  cell = ['isotropic', 16, 32, 'encoder_decoder_gd']
  with flagsaver.flagsaver():
    capacity_scaling.FLAGS(['capacity_scaling', f'--out_dir={tmp_path}'])
    setups = [capacity_scaling.round_setup(8), capacity_scaling.round_setup(4)]
    assert [s['code_dim'] for s in setups] == [8, 4]
    capacity_scaling.log_round('test', [3, 4], cell, setups)(
        [0, 1, 0], [10, 10, 20], [0.5, 0.25, 1.0])
    load = capacity_scaling.load_rounds
    assert load(cell, [3, 4], setups) == [{10: 0.5, 20: 1.0}, {10: 0.25}]
    assert load(cell, [4], setups[1:]) == [{10: 0.25}]
    assert load(cell, [3, 4], setups[::-1]) == [{}, {}]
    assert load(cell, [3, 4], [capacity_scaling.round_setup()] * 2) == [{}, {}]
    assert load(cell[:3] + ['gd'], [3, 4], setups) == [{}, {}]
    # A line logged before the decoder was the construction's.
    old = dict(setups[0])
    del old['decoder']
    with open(tmp_path / capacity_scaling.ROUNDS, 'a') as f:
      f.write(json.dumps(dict(cell=cell, seed=3, width=30, accuracy=1.0,
                              setup=old)) + '\n')
    assert load(cell, [3], setups[:1]) == [{10: 0.5, 20: 1.0}]


def test_capacity_scaling_summary_slopes(monkeypatch):
  """Whole-range and largest-3 slopes, and their closed form − GD gaps."""
  monkeypatch.syspath_prepend(os.path.join(ROOT, 'experiments'))
  import capacity_scaling  # pylint: disable=import-outside-toplevel
  sizes = [128, 256, 512, 1024, 2048]
  rows = []
  for seed in (0, 1):
    for n in sizes:
      # GD: slope 0.5 up to N = 512, then 1.0 (least squares over all five
      # sizes: 0.75); the closed form: 1.2 throughout.
      gd = 100 * (n / 128) ** 0.5 if n <= 512 else 200 * (n / 512)
      rows += [dict(geometry='isotropic', dim=64, num_facts=n, seed=seed,
                    method='encoder_decoder', num_params=10 * n ** 1.2),
               dict(geometry='isotropic', dim=64, num_facts=n, seed=seed,
                    method='gd', num_params=gd),
               dict(geometry='isotropic', dim=64, num_facts=n, seed=seed,
                    method='ntk', num_params=1000 * n ** 0.5)]
  text = capacity_scaling.summary(rows)
  assert ('| isotropic | 64 | encoder_decoder | 1.200 ± 0.000 | 1.200 ± 0.000 |'
          in text)
  assert '| isotropic | 64 | gd | 0.750 ± 0.000 | 1.000 ± 0.000 |' in text
  gap = '| closed form − GD (N = 128–2048) | +0.450 ± 0.000 | +0.200 ± 0.000 |'
  assert gap in text
  # A size only the closed form has (here slope 2 from N = 2048) changes
  # its own slopes but not the gap, taken over the sizes both have.
  more = rows + [dict(geometry='isotropic', dim=64, num_facts=4096, seed=s,
                      method='encoder_decoder', num_params=40 * 2048 ** 1.2)
                 for s in (0, 1)]
  text_more = capacity_scaling.summary(more)
  assert gap in text_more
  assert ('| isotropic | 64 | encoder_decoder | 1.200 ± 0.000 | 1.200 ± 0.000 |'
          not in text_more)
  # Sub-N log N growth gets a negative C, flagged as such.
  fits = [l for l in text.splitlines() if 'C = ' in l]
  ntk, = [l for l in fits if '| ntk |' in l]
  closed, = [l for l in fits if '| encoder_decoder |' in l]
  assert capacity_scaling.NEGATIVE_C in ntk
  assert capacity_scaling.NEGATIVE_C not in closed


def test_decodability_scaling_tiny(tmp_path):
  # 2,000 GD steps store 32 facts at widths 10-20 (600 steps needed up to
  # 128), and rel_tol=1 stops each search at its first bracket: three
  # compiled widths in all instead of about eight.
  run('decodability_scaling.py', tmp_path, '--dim=16', '--num_facts=32',
      '--betas=0,4', '--exponents=2', '--whitened=power_law_2',
      '--methods=gd', '--seeds=0', '--max_steps=2000', '--rel_tol=1')
  got = rows(tmp_path / 'rows.csv')
  assert {r['geometry'] for r in got} == {
      'spike_0', 'spike_4', 'power_law_2', 'power_law_2+whitened'}
  assert all(0 < float(r['rho_min']) <= 1 for r in got)
  assert 'R²' in (tmp_path / 'summary.md').read_text()
  assert (tmp_path / 'rho_vs_cost.png').stat().st_size > 0


TINY_TRANSFORMER = ['--num_junk=2', '--context_len=2', '--steps=300',
                    '--mlp_steps=1500', '--rel_tol=0.5']


def _transformer_recall(out_dir, methods):
  run('transformer_recall.py', out_dir, '--dims=16', '--num_facts=32',
      f'--methods={",".join(methods)}', '--schedules=a', *TINY_TRANSFORMER)
  got = rows(out_dir / 'rows.csv')
  assert len(got) == len(methods) * 2  # methods x swap
  assert all(0 <= float(r['recall']) <= 1 for r in got)
  assert all(float(r['standalone_accuracy']) == 1.0 for r in got)
  assert '| encoder_decoder | 16 | 32 |' in (out_dir / 'summary.md').read_text()
  assert (out_dir / 'recall.png').stat().st_size > 0


def test_transformer_recall_tiny(tmp_path):
  _transformer_recall(tmp_path, ['encoder_decoder'])


@pytest.mark.slow  # ~25 s more (the Hebbian W* search); the closed form
def test_transformer_recall_tiny_two_methods(tmp_path):  # covers the script
  _transformer_recall(tmp_path, ['encoder_decoder', 'hebbian_ridge'])


@pytest.mark.slow  # ~40 s in the suite; test_transformer_recall_tiny runs
def test_transformer_capacity_tiny(tmp_path):  # the same Transformer path
  run('transformer_capacity.py', tmp_path, '--dim=16', '--num_facts=16,32',
      '--methods=hebbian_ridge', *TINY_TRANSFORMER)
  got = rows(tmp_path / 'rows.csv')
  assert [int(r['num_facts']) for r in got] == [16, 32]
  assert all(int(r['standalone_params']) > 0 for r in got)
  assert (tmp_path / 'capacity.png').stat().st_size > 0


@pytest.mark.slow  # ~70 s on 2 idle cores: GD and closed-form W* searches
def test_capacity_usability_tiny(tmp_path):
  run('capacity_usability.py', tmp_path, '--dim=16', '--num_facts=32',
      '--code_dims=16', '--bucket_sizes=8', '--gd_widths=8', '--fills=1.0',
      *TINY_TRANSFORMER)
  got = rows(tmp_path / 'rows.csv')
  assert {(r['method'], r['knob']) for r in got} == {
      ('encoder_decoder', 'W*'), ('encoder_decoder', '16/8'), ('gd', 'W*'),
      ('gd', '8'), ('encoder_decoder', 'W*@fill=1.0')}
  text = (tmp_path / 'summary.md').read_text()
  assert '## Whitening at W*' in text
  assert '## Bucket fill at W*' in text
  assert (tmp_path / 'tradeoff.png').stat().st_size > 0
  assert (tmp_path / 'fill.png').stat().st_size > 0


STATS_QUICK = ['--stats', '--quick', *TINY_TRANSFORMER]


def test_capacity_usability_stats_quick(tmp_path):
  run('capacity_usability.py', tmp_path, *STATS_QUICK)
  got = rows(tmp_path / 'rows.csv')
  n, contexts = 32, 16  # --quick's N; --stats_contexts' default
  expected = {(seed, method, whitened, 'W*') for seed in ('0', '1')
              for method in ('encoder_decoder', 'gd')
              for whitened in ('False', 'True')}
  expected |= {(seed, 'encoder_decoder', 'False', 'W*@fill=1.0')
               for seed in ('0', '1')}
  assert {(r['seed'], r['method'], r['whitened'], r['knob'])
          for r in got} == expected
  assert len(got) == len(expected)
  for r in got:
    assert (r['dim'], r['num_facts'], r['beta']) == ('16', str(n), '3.0')
    hits, trials = int(r['recall_hits']), int(r['recall_trials'])
    assert trials == n * contexts and 0 <= hits <= trials
    assert float(r['recall']) == hits / trials
  # Cheap N first, then seeds outer: seed 0's rows before seed 1's.
  assert [r['seed'] for r in got] == ['0'] * 5 + ['1'] * 5
  text = (tmp_path / 'summary.md').read_text()
  assert '## Verdicts' in text
  for claim in ('whitening raises capacity', 'whitening raises Lipschitz',
                'whitening lowers recall',
                'fuller buckets trade recall for capacity'):
    assert any(f'**{claim}: {v}**' in text
               for v in ('holds', 'does not hold', 'not resolved'))
  assert 'Wilson' in text and f'/{2 * n * contexts} = ' in text
  assert '## Recall resolution' in text and 'Produced by `python ' in text
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert [(c['beta'], c['num_facts']) for c in summary['cells']] == [(3.0, n)]
  cell = summary['cells'][0]
  for method in ('encoder_decoder', 'gd'):
    w = cell['whitening'][method]
    assert w['recall_raw']['trials'] == 2 * n * contexts
    assert w['recall_raw']['low'] <= w['recall_raw']['rate'] <= (
        w['recall_raw']['high'])
  assert [e['fill'] for e in cell['fill']['fills']] == [0.95, 1.0]
  assert summary['rows_done'] == summary['rows_expected'] == len(expected)
  assert (tmp_path / 'stats.png').stat().st_size > 0
  # GD's W* searches journal their widths (a killed row resumes from them);
  # each GD row's seconds cover its journaled rounds.
  journal = [json.loads(x) for x in open(tmp_path / 'rounds.jsonl')]
  assert {(j['cell'][2], j['cell'][4], j['cell'][5]) for j in journal} == {
      (seed, 'gd', w) for seed in (0, 1) for w in (False, True)}
  for r in got:
    if r['method'] == 'gd':
      spent = sum(j['seconds'] for j in journal
                  if j['cell'] == [16, n, int(r['seed']), 3.0, 'gd',
                                   r['whitened'] == 'True'])
      assert 0 < spent <= float(r['seconds'])
  # A re-run computes nothing: the same rows, byte for byte.
  before = (tmp_path / 'rows.csv').read_bytes()
  run('capacity_usability.py', tmp_path, *STATS_QUICK)
  assert (tmp_path / 'rows.csv').read_bytes() == before
  # Other budgets on the same table are refused before any work.
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'experiments',
                                    'capacity_usability.py'),
       f'--out_dir={tmp_path}', *STATS_QUICK, '--steps=301'],
      capture_output=True, text=True, env=subprocess_env(), timeout=600)
  assert proc.returncode != 0 and '--steps' in proc.stderr
  assert (tmp_path / 'rows.csv').read_bytes() == before


STATS_COST = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, 'experiments')
    import capacity_usability as cu
    from factstore_jax.sweep import deal, recorded_seconds, reference_rows
    cu.FLAGS(['cu', '--stats'] + sys.argv[1:])
    configs = cu.stats_configs(cu.stats_grid())
    seconds = [recorded_seconds(
        reference_rows(cu.STATS_REFERENCE_ROWS, cu.STATS_KEY_FIELDS), c) for c in configs]
    costs = [cu.stats_row_cost(c) for c in configs]
    affinity = [(c['num_facts'], c['seed'], c['beta']) for c in configs]
    loads = {}
    for name, owners in (('count', deal(affinity, 2)),
                         ('cost', deal(affinity, 2, costs))):
      load = [0.0, 0.0]
      for s, p in zip(seconds, owners):
        load[p] += s or 0.0
      loads[name] = load
    print(json.dumps(dict(configs=configs, seconds=seconds, costs=costs,
                          loads=loads)))
''')


def _stats_costs(*flags):
  proc = subprocess.run([sys.executable, '-c', STATS_COST, *flags], cwd=ROOT,
                        env=subprocess_env(), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_capacity_usability_stats_deals_setups_by_their_checked_in_seconds():
  got = _stats_costs()
  assert len(got['configs']) == 180
  # Every default row has a checked-in row, and costs what it took there.
  assert None not in got['seconds'] and got['costs'] == got['seconds']
  # Dealt by those costs, the busier process gets less than by count, and
  # the two are within 1% of each other.
  count, cost = got['loads']['count'], got['loads']['cost']
  assert max(cost) < max(count)
  assert max(cost) / min(cost) < 1.01 < max(count) / min(count)
  # Under another budget the checked-in rows are not used (every row
  # records its budgets), nor where they lack the row (another N): the
  # formula, GD's scaled by its step budget.
  for flags in (['--mlp_steps=5000'],
                ['--mlp_steps=5000', '--stats_num_facts=1024']):
    got = _stats_costs(*flags)
    for c, cost in zip(got['configs'], got['costs']):
      n = c['num_facts'] / 2048
      want = (42.0 * n if c['method'] == 'encoder_decoder'
              else 450.0 * n ** 2.3 * 0.5)
      assert cost == pytest.approx(want)
  assert {c['num_facts'] for c in got['configs']} == {1024}


@pytest.mark.parametrize('flag', ['--stats_contexts=0', '--stats_seeds=',
                                  '--stats_betas=-1', '--stats_num_facts=1'])
def test_capacity_usability_stats_bad_flag(tmp_path, flag):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'experiments',
                                    'capacity_usability.py'),
       f'--out_dir={tmp_path / "out"}', '--stats', flag],
      capture_output=True, text=True, env=subprocess_env(), timeout=600)
  assert proc.returncode != 0
  assert flag.split('=')[0] in proc.stderr
  assert not (tmp_path / 'out').exists()  # refused before any work


FACT_EDITING_TINY = ['--num_facts=48', '--num_objects=6', '--dim=48',
                     '--fact_dim=32', '--mlp_width=24', '--mlp_steps=400',
                     '--code_dim=16', '--base_steps=300', '--fractions=0.1',
                     '--seeds=0,1', '--methods=swap,swap_constructed,memit']


def test_fact_editing_tiny_two_seeds(tmp_path):
  run('fact_editing.py', tmp_path, *FACT_EDITING_TINY)
  got = rows(tmp_path / 'rows.csv')
  assert sorted((r['seed'], r['method']) for r in got) == sorted(
      (s, m) for s in ('0', '1') for m in ('swap', 'swap_constructed', 'memit'))
  for r in got:
    for field in ('efficacy', 'paraphrase', 'paraphrase_mixed',
                  'specificity', 'score', 'base_mixed_accuracy'):
      assert 0.0 <= float(r[field]) <= 1.0, (field, r[field])
    assert float(r['ppl_ratio']) > 0
  constructed = [r for r in got if r['method'] == 'swap_constructed']
  assert all('encoder_decoder' in r['config'] for r in constructed)
  # The constructed swap's grid covers every calibration quantile.
  grid = rows(tmp_path / 'grid.csv')
  quantiles = {json.loads(r['config'])['quantile'] for r in grid
               if r['method'] == 'swap_constructed'}
  from factstore_jax.transformer.editing import harness  # pylint: disable=import-outside-toplevel
  assert quantiles == set(harness.CONSTRUCTED_QUANTILES)
  text = (tmp_path / 'summary.md').read_text()
  assert 'mixed paraphrase' in text and '## Per seed' in text
  # Two seeds: every summary cell carries a t-interval.
  line = next(l for l in text.splitlines() if l.startswith('| swap | 10%'))
  assert line.count('[') >= 5 and '| 2 |' in line
  assert (tmp_path / 'editing.png').stat().st_size > 0


def test_every_script_imports_names_the_library_has():
  # Scripts are not imported by the suite (their absl flags would clash), so
  # a renamed or moved library function breaks them silently (it broke
  # benchmarks/construct.py once): every `from factstore_jax... import x`
  # in benchmarks/ and experiments/ must name a module or attribute that
  # exists.
  import ast
  import glob
  import importlib
  scripts = sorted(glob.glob(os.path.join(ROOT, 'benchmarks', '**', '*.py'),
                             recursive=True) +
                   glob.glob(os.path.join(ROOT, 'experiments', '*.py')))
  checked, missing = 0, []
  for path in scripts:
    with open(path) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if not (isinstance(node, ast.ImportFrom) and node.module and
              node.module.startswith('factstore_jax')):
        continue
      module = importlib.import_module(node.module)
      for alias in node.names:
        checked += 1
        if not hasattr(module, alias.name):
          try:
            importlib.import_module(f'{node.module}.{alias.name}')
          except ImportError:
            missing.append(f'{os.path.relpath(path, ROOT)}: '
                           f'{node.module}.{alias.name}')
  assert checked > 50   # the scan found the scripts' imports
  assert not missing, missing
