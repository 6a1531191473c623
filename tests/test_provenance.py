"""Tests for factstore_jax.provenance (commit and command of a result)."""

from __future__ import annotations

import os
import subprocess

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
