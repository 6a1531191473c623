"""End-to-end smoke runs of the experiment scripts on tiny grids."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, out_dir, *flags):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'experiments', script),
       f'--out_dir={out_dir}', *flags],
      capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc


def rows(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_capacity_scaling_tiny(tmp_path):
  flags = ['--dims=16', '--alphas=0.125,0.25', '--seeds=0,1',
           '--methods=gd,hebbian_ridge', '--geometries=isotropic',
           '--max_steps=600', '--learning_rate=0.01', '--patience=200']
  run('capacity_scaling.py', tmp_path, *flags)
  got = rows(tmp_path / 'rows.csv')
  assert len(got) == 2 * 2 * 2
  assert all(r['num_params'] for r in got)
  summary = (tmp_path / 'summary.md').read_text()
  assert 'Log-log slopes' in summary and '| isotropic | 16 | gd |' in summary
  assert (tmp_path / 'scaling.png').stat().st_size > 0
  # A re-run finds every row done and computes nothing new.
  mtime = os.path.getmtime(tmp_path / 'rows.csv')
  run('capacity_scaling.py', tmp_path, *flags)
  assert os.path.getmtime(tmp_path / 'rows.csv') == mtime


def test_decodability_scaling_tiny(tmp_path):
  run('decodability_scaling.py', tmp_path, '--dim=16', '--num_facts=32',
      '--betas=0,4', '--exponents=2', '--whitened=power_law_2',
      '--methods=gd', '--seeds=0,1', '--max_steps=600')
  got = rows(tmp_path / 'rows.csv')
  assert {r['geometry'] for r in got} == {
      'spike_0', 'spike_4', 'power_law_2', 'power_law_2+whitened'}
  assert all(0 < float(r['rho_min']) <= 1 for r in got)
  assert 'R²' in (tmp_path / 'summary.md').read_text()
  assert (tmp_path / 'rho_vs_cost.png').stat().st_size > 0
