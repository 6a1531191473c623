"""Tests for factstore_jax.provenance (commit and command of a result)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from factstore_jax import provenance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_commit_is_this_checkouts_head():
  head = subprocess.run(['git', '-C', ROOT, 'rev-parse', 'HEAD'],
                        capture_output=True, text=True, check=False)
  if head.returncode:
    pytest.skip('not a git checkout')
  commit = provenance.library_commit(ROOT)
  assert commit.split('+')[0] == head.stdout.strip()
  assert commit.endswith('+dirty') == bool(subprocess.run(
      ['git', '-C', ROOT, 'status', '--porcelain', '--untracked-files=no',
       '--', 'factstore_jax'], capture_output=True, text=True,
      check=False).stdout.strip())


def test_no_git_checkout_gives_none(tmp_path):
  assert provenance.library_commit(tmp_path) is None
  assert 'unknown commit' in provenance.footer(['x.py'], root=tmp_path)


def test_command_line_quotes_and_relativises(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  script = os.path.join(str(tmp_path), 'experiments', 'e.py')
  line = provenance.command_line([script, '--dims=64,128', '--name=a b'])
  assert line == "python experiments/e.py --dims=64,128 '--name=a b'"
  # A script outside the current folder keeps its absolute path.
  assert provenance.command_line(['/elsewhere/e.py']) == (
      'python /elsewhere/e.py')


def test_footer_names_command_and_commit():
  text = provenance.footer(['experiments/e.py', '--seed=1'], root=ROOT)
  assert '`python experiments/e.py --seed=1`' in text
  commit = provenance.library_commit(ROOT)
  if commit:
    assert commit in text


_LONG_RUN = '''
import json, subprocess, sys
sys.path.insert(0, sys.argv[1])
from factstore_jax import provenance
before = provenance.run_commit()
# A commit lands while the "run" goes on.
with open(sys.argv[1] + '/factstore_jax/x.py', 'w') as f:
  f.write('X = 2\\n')
subprocess.run(['git', '-C', sys.argv[1], 'commit', '-qam', 'c2'], check=True)
print(json.dumps([before, provenance.run_commit(), provenance.library_commit(),
                  provenance.footer(['e.py'])]))
'''


def test_a_run_records_the_commit_it_started_at(tmp_path):
  # A copy of the module in a scratch checkout: the footer written at the
  # end of a run names the commit of the code it imported, not a commit
  # made while it ran.
  package = tmp_path / 'factstore_jax'
  package.mkdir()
  (package / '__init__.py').write_text('')
  (package / 'x.py').write_text('X = 1\n')
  with open(provenance.__file__) as f:
    (package / 'provenance.py').write_text(f.read())
  git = lambda *a: subprocess.run(['git', '-C', str(tmp_path), *a],
                                  check=True, capture_output=True,
                                  text=True).stdout.strip()
  git('init', '-q')
  git('config', 'user.email', 't@t')
  git('config', 'user.name', 't')
  git('add', '.')
  git('commit', '-qm', 'c1')
  first = git('rev-parse', 'HEAD')
  out = subprocess.run([sys.executable, '-c', _LONG_RUN, str(tmp_path)],
                       capture_output=True, text=True, check=True, timeout=60,
                       env=dict(os.environ, GIT_AUTHOR_NAME='t',
                                GIT_AUTHOR_EMAIL='t@t', GIT_COMMITTER_NAME='t',
                                GIT_COMMITTER_EMAIL='t@t'))
  before, after, now, footer = json.loads(out.stdout.splitlines()[-1])
  assert before == after == first
  assert now == git('rev-parse', 'HEAD') != first
  assert f'commit `{first}`' in footer
