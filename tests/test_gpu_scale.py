"""experiments/gpu_scale.py on its --quick grid (CPU).

Slow: eight GD width searches (two methods, two sizes, two step budgets),
about 140 s of CPU, mostly compiling a training program per width.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from conftest import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(out_dir, *flags):
  env = subprocess_env()
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'experiments', 'gpu_scale.py'),
       '--quick', f'--out_dir={out_dir}', *flags],
      capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.mark.slow
def test_quick_grid(tmp_path):
  _run(tmp_path)
  with open(tmp_path / 'rows.csv') as f:
    rows = list(csv.DictReader(f))
  # 2 sizes x 2 step budgets x 2 methods x 1 seed, one search each.
  assert sorted((int(r['num_facts']), int(r['max_steps']), r['method'])
                for r in rows) == sorted(
      (n, b, m) for n in (16, 32) for b in (200, 400)
      for m in ('gd', 'encoder_decoder_gd'))
  for r in rows:
    assert int(r['dim']) == 16 and float(r['rel_tol']) == 0.5
    tested = {int(w): a for w, a in json.loads(r['tested']).items()}
    if r['width']:
      # W* is a tested width that stored every fact.
      assert tested[int(r['width'])] == 1.0
      assert float(r['params_per_fact']) == (
          int(r['num_params']) / int(r['num_facts']))
  blob = json.loads((tmp_path / 'summary.json').read_text())
  assert blob['sizes'] == [16, 32] and blob['budgets'] == [200, 400]
  assert 'gpu_scale.py --quick' in blob['command']
  summary = (tmp_path / 'summary.md').read_text()
  assert '| gd | 32 | 200 |' in summary and 'ED-GD / GD' in summary
  # Resumable: a second run computes nothing.
  mtime = os.path.getmtime(tmp_path / 'rows.csv')
  _run(tmp_path)
  assert os.path.getmtime(tmp_path / 'rows.csv') == mtime
