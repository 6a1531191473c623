"""One command per paper result: list, run, or redraw the experiments.

  python experiments/reproduce.py --list              # every result we reproduce
  python experiments/reproduce.py NAME                # run it (figure + summary)
  python experiments/reproduce.py NAME -- --seeds=0   # extra flags for the script
  python experiments/reproduce.py --plot_only         # redraw every figure
  python experiments/reproduce.py NAME --plot_only    # redraw NAME's figures
  python experiments/reproduce.py --stale             # what changed since each

Experiments are discovered by listing ``experiments/*.py`` (every script with
an ``app.run`` entry point), so a new script appears here without an edit;
``RESULTS`` adds, for the known ones, the paper claim, the command that made
the checked-in results, measured times and how to redraw their figures from
the checked-in CSVs (each script's own ``plot`` functions: nothing is drawn
twice). A script not in ``RESULTS`` is listed with its docstring's first
line and runs with its default flags.

``--plot_only`` reads ``rows.csv`` of the result's folder and writes the
figures next to it (or under ``--plot_dir``), so the checked-in figures are
exactly what it produces; ``tests/test_docs.py`` redraws one and compares.

``--stale`` lists, for each result, the library commit that made its rows
(:func:`recorded_commit`) and the files of the library, the script and the
experiment modules it imports that changed since (:func:`staleness`): a
result with changed files may no longer be what today's code gives.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
from typing import Callable

from absl import app, flags

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

flags.DEFINE_bool('list', False, 'Print every experiment and exit.')
flags.DEFINE_bool('plot_only', False,
                  'Redraw the figures from the checked-in rows.csv files '
                  'instead of running anything.')
flags.DEFINE_bool('stale', False,
                  'Print, for each result, its recorded library commit and '
                  'the library / script files changed since, and exit.')
flags.DEFINE_string('plot_dir', None,
                    'With --plot_only: write figures to PLOT_DIR/<result>/ '
                    'instead of the results folders.')
FLAGS = flags.FLAGS


def _floor(rows):
  """capacity_usability's attention noise floor, as recorded in its rows."""
  return {k: rows[0][k] for k in ('noise_max', 'noise_mean', 'noise_p95')}


@dataclasses.dataclass(frozen=True)
class Result:
  """One paper result: a script, its flags, where its results live.

  Attributes:
    script: the experiment's module name (``experiments/<script>.py``).
    claim: the paper's claim it measures (one line).
    args: the script's flags that produced the checked-in results.
    cpu_time: measured wall time on the 2-core development CPU.
    gpu_time: measured on a GPU, or ``'—'`` where never run on one.
    key_fields: ``rows.csv``'s key columns (the script's ``KEY_FIELDS``
      when ``None``).
    figures: ``(file name, plot function name, extra-arguments builder)``:
      ``plot_function(rows, path, *builder(rows))``.
  """
  script: str
  claim: str
  args: tuple[str, ...] = ()
  cpu_time: str = 'not recorded'
  gpu_time: str = '—'
  key_fields: tuple[str, ...] | None = None
  figures: tuple[tuple[str, str, Callable | None], ...] = ()

  def out_dir(self, name: str, root: str = ROOT) -> str:
    """The results folder of result ``name`` in the checkout ``root``."""
    for a in self.args:
      if a.startswith('--out_dir='):
        return os.path.join(root, a.split('=', 1)[1])
    return os.path.join(root, 'experiments', 'results', name)


_FULL_GRID = ('--dims=64,128', '--alphas=0.03125,0.0625,0.125,0.25,0.5')

RESULTS = {
    'capacity_scaling': Result(
        'capacity_scaling',
        'The closed form needs W* ~ N like GD (matching log-log slopes), '
        'below the NTK and Hebbian baselines (default grid: d = 64, '
        'N <= 512)',
        cpu_time='21 min 35 s on one core from an empty folder (stop 56, '
        'ffb16f7)',
        figures=(('scaling.png', 'plot', None),)),
    'capacity_scaling_n2048': Result(
        'capacity_scaling',
        'Slopes of every method over the full grid capped at N <= 2,048 '
        '(closed-form rows superseded: see capacity_scaling_n8192)',
        args=_FULL_GRID + ('--max_num_facts=2048',
                           '--out_dir=experiments/results/'
                           'capacity_scaling_n2048'),
        cpu_time='2.4 h isotropic (74 min of it encoder_decoder_gd)',
        figures=(('scaling.png', 'plot', None),)),
    'capacity_scaling_n4096': Result(
        'capacity_scaling',
        'Closed form vs GD like-for-like at d = 128 over N = 512-4,096',
        args=_FULL_GRID + ('--max_num_facts=4096', '--geometries=isotropic',
                           '--out_dir=experiments/results/'
                           'capacity_scaling_n4096'),
        cpu_time='GD at N = 4,096 not finished in 2.5 h (CPU)',
        gpu_time='GD at N = 4,096: 369 s on an H100 (--chunk_size=0, '
        'benchmarks/gpu/check.sh D)',
        figures=(('scaling.png', 'plot', None),)),
    'capacity_scaling_n8192': Result(
        'capacity_scaling',
        'Closed form vs GD over N = 512-8,192 at d = 128, both geometries '
        '(the current closed-form rows)',
        args=_FULL_GRID + ('--geometries=isotropic,anisotropic',
                           '--out_dir=experiments/results/'
                           'capacity_scaling_n8192'),
        cpu_time='> 18 h in resumed parts (GD at N = 8,192: 4.8 h per '
        'geometry); --summarize_only redraws in seconds',
        figures=(('scaling.png', 'plot', None),)),
    'decodability_scaling': Result(
        'decodability_scaling',
        "The closed form's cost grows with 1/rho^2 of the values; GD's "
        'does not',
        cpu_time='about 30 min (shared machine)',
        figures=(('rho_vs_cost.png', 'plot', None),)),
    'construction_sweep': Result(
        'construction_sweep',
        'The closed form stores and certifies every fact without training, '
        'at a params-per-fact cost that is flat in N',
        key_fields=('num_facts', 'seed', 'dim', 'num_values'),
        cpu_time='43 s (sum of row seconds: 31 s; stop 56)',
        figures=(('params_per_fact.png', 'plot', None),)),
    'transformer_recall': Result(
        'transformer_recall',
        'A fact MLP plugged into a 1-layer Transformer is recalled '
        '(schedule a: 100%; schedule b trains around it)',
        cpu_time='2 min 58 s on one core (stop 57; sum of row seconds: 174 s)',
        figures=(('recall.png', 'plot', None),)),
    'transformer_capacity': Result(
        'transformer_capacity',
        'Inside the Transformer the smallest usable MLP is about the '
        'standalone W*',
        cpu_time='7 min 2-21 s on one core (stop 57, twice: rows identical '
        'but for seconds, 415 and 434 s)',
        figures=(('capacity.png', 'plot', None),)),
    'capacity_usability': Result(
        'capacity_usability',
        'Capacity vs usability: fuller buckets and whitening trade '
        'parameters for Jacobian norm and recall',
        cpu_time='5 min 52 s on one core (stop 57; sum of row seconds: '
        '343 s)',
        figures=(('tradeoff.png', 'plot', lambda rows: (_floor(rows),)),
                 ('fill.png', 'plot_fill', None))),
    'measure_zero': Result(
        'measure_zero',
        'The construction stores every feasible fact set but a measure-zero '
        'set, and refuses (never silently misstores) near degenerate ones',
        cpu_time='368 s on 2 cores as two processes, from an empty folder '
        '(840 trials, 11.5 min of trial time)'),
    'fact_editing': Result(
        'fact_editing',
        'Swapping the fact MLP edits facts at scale; ROME, MEMIT and '
        'AlphaEdit fall off with the number of edits',
        cpu_time='1,359 s (3 seeds, 2 cores); the constructed swap with its '
        'draws 1,207 s on one core (stop 53)',
        figures=(('editing.png', 'plot', None),)),
    'fact_editing_n4096': Result(
        'fact_editing',
        'The MLP swaps at N = 4,096 (10% of facts edited)',
        args=('--fractions=0.1', '--methods=swap,swap_constructed,memit',
              '--num_facts=4096', '--mlp_width=256',
              '--out_dir=experiments/results/fact_editing_n4096'),
        cpu_time='about 22 min a seed on 2 cores (stop 48); the constructed '
        'swap with its draws about 29-39 min a seed on one core (stop 53, '
        'base model included)'),
    'decodability_scaling_v2': Result(
        'decodability_scaling',
        'The rho law over rho_min 0.6 -> 0.005 (8 geometries) and N = '
        '256-2,048 (d = 64, 3 seeds), closed form and GD, R^2 with '
        'bootstrap intervals',
        args=('--v2', '--v2_gd_geometries=spike_0,power_law_2,spike_30,'
              'spike_100,power_law_4,spike_300,flat_0.5,flat_0.2'),
        cpu_time='27,524 s of one-core row time (GD at N = 2,048: 64%), '
        'about 3.8 h on 2 cores as two processes (the full grid; the '
        'default --v2, GD on 4 geometries: 15,153 s, 7,577 s on each of '
        '2 processes; one timed default run: 7,158 s, 1.99 h, '
        'results/decodability_scaling_v2_default; resumable, GD searches '
        'journaled)'),
    'capacity_usability_stats': Result(
        'capacity_usability',
        'Capacity vs usability over 5 seeds x beta {1.5, 3, 5} x N {512, '
        '2,048}, with t and Wilson intervals',
        args=('--stats',),
        cpu_time='17,580 s of one-core row and setup time (GD at N = '
        '2,048: 77%), about 2.4 h on 2 cores as two processes (summed over '
        'partial runs; resumable, GD searches journaled); one timed run '
        'from an empty folder: 11,103 s (3.08 h) in three segments at '
        '1.35x-0.94x those seconds (results/capacity_usability_stats_timed); '
        'the same rows without the W* retraining smallest_mlp dropped at '
        'stop 57: 8,852 s (2.46 h) on the busier process (projected); '
        'run uninterrupted from an empty folder at stop 58: 8,627 s '
        '(2.40 h) at about 1.1-1.25x the checked-in seconds '
        '(results/capacity_usability_stats_timed2)'),
}


def scripts() -> list[str]:
  """Every experiment script under experiments/ (those with ``app.run``)."""
  out = []
  for name in sorted(os.listdir(HERE)):
    path = os.path.join(HERE, name)
    if (not name.endswith('.py') or name == os.path.basename(__file__) or
        not os.path.isfile(path)):
      continue
    with open(path) as f:
      if 'app.run(' in f.read():
        out.append(name[:-3])
  return out


def _first_line(script: str) -> str:
  with open(os.path.join(HERE, script + '.py')) as f:
    doc = ast.get_docstring(ast.parse(f.read())) or ''
  return doc.strip().splitlines()[0] if doc.strip() else '(no docstring)'


def catalogue() -> dict[str, Result]:
  """``RESULTS`` plus a default entry for every unregistered script."""
  found = scripts()
  out = {n: r for n, r in RESULTS.items() if r.script in found}
  for s in found:
    if not any(r.script == s for r in out.values()):
      out[s] = Result(s, _first_line(s))
  return out


def command(result: Result, extra=()) -> list[str]:
  return [sys.executable, os.path.join('experiments', result.script + '.py'),
          *result.args, *extra]


def print_list(entries: dict[str, Result]) -> None:
  for name, r in entries.items():
    shown = ' '.join(['python', f'experiments/{r.script}.py', *r.args])
    print(f'{name}\n  claim:    {r.claim}\n  command:  {shown}\n'
          f'  CPU time: {r.cpu_time}\n  GPU time: {r.gpu_time}\n'
          f'  figures:  {", ".join(f[0] for f in r.figures) or "—"}\n')


def plot_only(name: str, result: Result) -> list[str]:
  """Redraws ``result``'s figures from its rows.csv; returns their paths.

  Imports the script in this process (its flags keep their defaults, the
  values the checked-in runs used for the figures' titles).
  """
  if not result.figures:
    raise app.UsageError(f'{name}: no figure recipe in RESULTS; run it.')
  sys.path.insert(0, HERE)
  sys.path.insert(0, ROOT)
  module = importlib.import_module(result.script)
  from factstore_jax.sweep import ResultsTable  # pylint: disable=g-import-not-at-top
  src = result.out_dir(name)
  rows_csv = os.path.join(src, 'rows.csv')
  if not os.path.exists(rows_csv):
    raise app.UsageError(f'{name}: no {rows_csv}')
  rows = ResultsTable(rows_csv, result.key_fields or module.KEY_FIELDS).rows()
  dst = src if FLAGS.plot_dir is None else os.path.join(FLAGS.plot_dir, name)
  os.makedirs(dst, exist_ok=True)
  paths = []
  for filename, function, extra in result.figures:
    path = os.path.join(dst, filename)
    getattr(module, function)(rows, path, *(extra(rows) if extra else ()))
    paths.append(path)
  return paths


_FOOTER = re.compile(r'library at commit `([0-9a-f]{7,40})(\+dirty)?`')


def _git(root: str, *args: str) -> str:
  return subprocess.run(['git', '-C', root, *args], capture_output=True,
                        text=True, check=True).stdout.strip()


def recorded_commit(out_dir: str, root: str = ROOT
                    ) -> tuple[str | None, bool, str]:
  """The library commit that made ``out_dir``'s rows.

  In order: the last ``library at commit `...``` footer of ``summary.md``
  (:func:`factstore_jax.provenance.footer`), ``summary.json``'s
  ``"commit"`` (or its ``"config"``'s), else the commit that last checked
  in ``rows.csv`` (the library that made the rows may be older).

  Returns:
    ``(commit or None, dirty, where it was found)``.
  """
  summary = os.path.join(out_dir, 'summary.md')
  if os.path.exists(summary):
    with open(summary) as f:
      found = _FOOTER.findall(f.read())
    if found:
      return found[-1][0], bool(found[-1][1]), 'summary.md footer'
  summary = os.path.join(out_dir, 'summary.json')
  if os.path.exists(summary):
    with open(summary) as f:
      data = json.load(f)
    commit = data.get('commit') or data.get('config', {}).get('commit')
    if isinstance(commit, str) and commit:
      return commit.split('+')[0], commit.endswith('+dirty'), 'summary.json'
  rows = os.path.join(out_dir, 'rows.csv')
  if os.path.exists(rows):
    commit = _git(root, 'log', '-1', '--format=%H', '--', rows)
    if commit:
      return commit, False, 'rows.csv checked in'
  return None, False, 'nothing recorded'


def sources(script: str, root: str = ROOT) -> list[str]:
  """What a result of ``script`` depends on: the library, the script and
  the experiment modules it imports (transitively), relative to ``root``."""
  here = os.path.join(root, 'experiments')
  todo, seen = [script], []
  while todo:
    name = todo.pop()
    if name in seen:
      continue
    seen.append(name)
    with open(os.path.join(here, name + '.py')) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import)
               else [node.module] if isinstance(node, ast.ImportFrom)
               and node.module and not node.level else [])
      todo += [n for n in names
               if os.path.exists(os.path.join(here, n + '.py'))]
  return ['factstore_jax'] + sorted(f'experiments/{n}.py' for n in seen)


def staleness(name: str, result: Result, root: str = ROOT) -> dict:
  """``result``'s recorded commit and what of its sources changed since.

  Returns:
    dict with ``name``, ``commit``, ``dirty``, ``found_in`` (see
    :func:`recorded_commit`), ``commits`` (commits since that touch the
    sources) and ``changed`` (the source files that differ between that
    commit and the working tree; ``[]``: current).
  """
  commit, dirty, found_in = recorded_commit(result.out_dir(name, root), root)
  out = dict(name=name, commit=commit, dirty=dirty, found_in=found_in,
             commits=None, changed=None)
  if commit is None:
    return out
  paths = sources(result.script, root)
  out['commits'] = int(_git(root, 'rev-list', '--count', f'{commit}..HEAD',
                            '--', *paths))
  changed = _git(root, 'diff', '--name-only', commit, '--', *paths)
  out['changed'] = changed.splitlines() if changed else []
  return out


def print_stale(entries: dict[str, Result]) -> None:
  for name, r in entries.items():
    if not os.path.isdir(r.out_dir(name)):
      continue
    s = staleness(name, r)
    if s['commit'] is None:
      print(f'{name}: no recorded commit')
      continue
    head = f"{name}: {s['commit'][:9]}{'+dirty' if s['dirty'] else ''}"
    if not s['changed']:
      print(f"{head}: current ({s['found_in']})")
      continue
    shown = ', '.join(s['changed'][:6])
    more = len(s['changed']) - 6
    print(f"{head} ({s['found_in']}): {len(s['changed'])} files changed, "
          f"{s['commits']} commits since: {shown}"
          + (f' and {more} more' if more > 0 else ''))


def main(argv):
  names, extra = argv[1:2], argv[2:]
  entries = catalogue()
  if FLAGS.list:
    print_list(entries)
    return
  if FLAGS.stale:
    print_stale(entries)
    return
  if not names:
    if not FLAGS.plot_only:
      raise app.UsageError('Name an experiment (see --list) or pass '
                           '--plot_only.')
    # One process per result: the scripts define overlapping flags.
    for name, r in entries.items():
      if not r.figures:
        print(f'{name}: skipped (no figure recipe)')
        continue
      cmd = [sys.executable, os.path.abspath(__file__), name, '--plot_only']
      if FLAGS.plot_dir is not None:
        cmd.append(f'--plot_dir={FLAGS.plot_dir}')
      subprocess.run(cmd, check=True, cwd=ROOT)
    return
  name = names[0]
  if name not in entries:
    raise app.UsageError(f'unknown experiment {name!r}; one of '
                         f'{sorted(entries)}')
  if FLAGS.plot_only:
    for path in plot_only(name, entries[name]):
      print(path)
    return
  cmd = command(entries[name], extra)
  print(' '.join(cmd[1:]), flush=True)
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      p for p in (ROOT, env.get('PYTHONPATH')) if p)
  sys.exit(subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode)


if __name__ == '__main__':
  app.run(main)
