"""The documentation stays true: examples run, figures redraw, pages list all.

* every ```python block of README.md and docs/*.md runs (the blocks of one
  file in order, in one fresh interpreter, from an empty folder);
* the README keeps the Quickstart contract and its length budget;
* the API reference names every module of the package;
* ``experiments/reproduce.py --list`` names every experiment script,
  ``--plot_only`` redraws a checked-in figure from the checked-in CSV, and
  ``--stale`` names the sources changed since a result's recorded commit.
"""

from __future__ import annotations

import json
import os
import pathlib
import pkgutil
import re
import subprocess
import sys

import numpy as np
import pytest

import factstore_jax

ROOT = pathlib.Path(__file__).resolve().parent.parent
QUICKSTART = ('pip install . && factstore demo',
              'pip install ".[test]" && python -m pytest -q')


def python_blocks(path: pathlib.Path) -> list[str]:
  """The bodies of the ```python fenced blocks of a Markdown file."""
  return re.findall(r'^```python\n(.*?)^```', path.read_text(),
                    flags=re.S | re.M)


def _doc_files() -> list[pathlib.Path]:
  return [ROOT / 'README.md'] + sorted((ROOT / 'docs').glob('*.md'))


def _env() -> dict[str, str]:
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      p for p in (str(ROOT), env.get('PYTHONPATH')) if p)
  return env


def test_block_extraction_finds_the_readme_tour():
  blocks = python_blocks(ROOT / 'README.md')
  assert blocks, 'README.md has no ```python block'
  assert any('construct(' in b for b in blocks)


@pytest.mark.parametrize(
    'path', [p for p in _doc_files() if python_blocks(p)],
    ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(path, tmp_path):
  source = '\n\n'.join(python_blocks(path))
  script = tmp_path / 'blocks.py'
  script.write_text(
      'import jax\n'
      "jax.config.update('jax_default_matmul_precision', 'highest')\n" +
      source)
  proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path,
                        env=_env(), capture_output=True, text=True,
                        timeout=600, check=False)
  assert proc.returncode == 0, (
      f'{path.name}: a python block failed\n{proc.stderr[-3000:]}')


def test_readme_quickstart_and_length():
  readme = (ROOT / 'README.md').read_text()
  assert len(readme.splitlines()) <= 250
  for command in QUICKSTART:
    assert command in readme, command
  ci = (ROOT / '.ci' / 'run').read_text().splitlines()
  assert QUICKSTART[1] in ci, '.ci/run must run Quickstart command 2 verbatim'


def test_readme_tour_imports_only_the_top_level():
  for block in python_blocks(ROOT / 'README.md'):
    for line in block.splitlines():
      match = re.match(r'\s*from (factstore_jax\S*) import', line)
      if match:
        assert match.group(1) == 'factstore_jax', line


def test_api_reference_documents_every_module():
  api = (ROOT / 'docs' / 'api.rst').read_text()
  documented = set(re.findall(r'^\.\. automodule:: (\S+)', api, flags=re.M))
  modules = {m.name for m in pkgutil.walk_packages(factstore_jax.__path__,
                                                   'factstore_jax.')}
  modules.add('factstore_jax')
  assert modules - documented == set(), 'add these to docs/api.rst'
  assert documented - modules == set(), 'docs/api.rst names unknown modules'


def _experiment_scripts() -> list[str]:
  return sorted(p.stem for p in (ROOT / 'experiments').glob('*.py')
                if p.name != 'reproduce.py' and 'app.run(' in p.read_text())


def test_reproduce_lists_every_experiment():
  proc = subprocess.run(
      [sys.executable, str(ROOT / 'experiments' / 'reproduce.py'), '--list'],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
      check=True)
  scripts = _experiment_scripts()
  assert len(scripts) >= 7, scripts
  for name in scripts:
    assert f'command:  python experiments/{name}.py' in proc.stdout, name
  for field in ('claim:', 'CPU time:', 'GPU time:'):
    assert proc.stdout.count(field) >= len(scripts), field


def test_plot_only_redraws_the_checked_in_figure(tmp_path):
  """Redraws construction_sweep's figure and compares it pixel by pixel.

  With the matplotlib the figure was drawn with the PNGs are byte-identical;
  another matplotlib or FreeType version may move anti-aliased text edges,
  so the comparison allows a mean absolute pixel difference of 1e-3 (a
  changed data point moves whole markers and error bars, far more).
  """
  matplotlib_image = pytest.importorskip('matplotlib.image')
  subprocess.run(
      [sys.executable, str(ROOT / 'experiments' / 'reproduce.py'),
       'construction_sweep', '--plot_only', f'--plot_dir={tmp_path}'],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
      check=True)
  name = 'params_per_fact.png'
  new = matplotlib_image.imread(tmp_path / 'construction_sweep' / name)
  old = matplotlib_image.imread(
      ROOT / 'experiments' / 'results' / 'construction_sweep' / name)
  assert new.shape == old.shape
  assert float(np.abs(new - old).mean()) <= 1e-3


_STALENESS = '''
import json, sys
sys.path.insert(0, sys.argv[1])
import reproduce as r
print(json.dumps(r.staleness('x', r.Result('s', 'claim'), root=sys.argv[2])))
'''


def test_stale_names_the_sources_changed_since_the_recorded_commit(tmp_path):
  def git(*args):
    return subprocess.run(['git', '-C', str(tmp_path), *args], check=True,
                          capture_output=True, text=True).stdout.strip()

  def write(path, text):
    (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / path).write_text(text)

  def stale():
    proc = subprocess.run(
        [sys.executable, '-c', _STALENESS, str(ROOT / 'experiments'),
         str(tmp_path)], capture_output=True, text=True, timeout=120,
        check=True)
    return json.loads(proc.stdout.splitlines()[-1])

  git('init', '-q')
  git('config', 'user.email', 't@t')
  git('config', 'user.name', 't')
  write('factstore_jax/a.py', 'A = 1\n')
  write('experiments/s.py', 'import h\nfrom absl import app\n')
  write('experiments/h.py', 'H = 1\n')
  write('experiments/other.py', 'O = 1\n')
  git('add', '.')
  git('commit', '-qm', 'c1')
  made = git('rev-parse', 'HEAD')
  results = pathlib.Path('experiments/results/x')
  # Nothing recorded yet.
  assert stale()['commit'] is None
  write(results / 'rows.csv', 'a\n1\n')
  write(results / 'summary.md', f'Produced by `python experiments/s.py` with '
        f'the library at commit `{made}`.\n')
  git('add', '.')
  git('commit', '-qm', 'c2: results')
  s = stale()
  assert (s['commit'], s['dirty'], s['found_in']) == (made, False,
                                                     'summary.md footer')
  assert (s['changed'], s['commits']) == ([], 0)
  # A module the script does not import changes: still current.
  write('experiments/other.py', 'O = 2\n')
  git('commit', '-qam', 'c3')
  assert stale()['changed'] == []
  # A helper it imports changes (committed), then the library (not yet).
  write('experiments/h.py', 'H = 2\n')
  git('commit', '-qam', 'c4')
  write('factstore_jax/a.py', 'A = 2\n')
  s = stale()
  assert (s['changed'], s['commits']) == (
      ['experiments/h.py', 'factstore_jax/a.py'], 1)
  # Fallbacks: summary.json's commit (dirty), then the rows' commit.
  (tmp_path / results / 'summary.md').unlink()
  write(results / 'summary.json',
        json.dumps({'config': {'commit': made + '+dirty'}}))
  assert [stale()[k] for k in ('commit', 'dirty', 'found_in')] == [
      made, True, 'summary.json']
  (tmp_path / results / 'summary.json').unlink()
  s = stale()
  assert (s['found_in'], s['commit']) == ('rows.csv checked in',
                                          git('log', '-1', '--format=%H',
                                              '--', str(results / 'rows.csv')))
