"""End-to-end tests of the ``factstore`` command on temporary files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from factstore_jax import factsets

N, D, P = 512, 32, 64


def factstore(*args, cwd):
  proc = subprocess.run([sys.executable, '-m', 'factstore_jax.cli', *args],
                        cwd=cwd, capture_output=True, text=True, timeout=600)
  return proc


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  folder = tmp_path_factory.mktemp('cli')
  fs = factsets.random_factset(jax.random.key(3), N, D, P, tied=False,
                               mapping='many_to_one')
  keys, values, mapping = (np.asarray(a) for a in fs)
  np.save(folder / 'K.npy', keys)
  np.save(folder / 'V.npy', values)
  np.save(folder / 'F.npy', mapping)
  factsets.save_factset(str(folder / 'facts.npz'), fs)
  bad = {}
  k = keys.copy()
  k[5, 3] = np.nan
  bad['nan'] = ('Knan.npy', k, 'non-finite')
  v = values.copy()
  v[4, 0] = np.inf
  bad['inf'] = ('Vinf.npy', v, 'non-finite')
  f = mapping.copy()
  f[7] = P + 10
  bad['range'] = ('Fbad.npy', f, 'out of range')
  k = keys.copy()
  k[9] = k[3]
  f2 = mapping.copy()
  f2[9] = (f2[3] + 1) % P
  bad['dup'] = ('Kdup.npy', k, 'identical but map to different values')
  np.save(folder / 'Fdup.npy', f2)
  bad['empty'] = ('Kempty.npy', np.zeros((0, D), np.float32), 'empty')
  bad['shape'] = ('Kshape.npy', keys[:, :D - 1], 'd')
  for name, arr, _ in bad.values():
    np.save(folder / name, arr)
  v = values.copy()
  v[2] = (v[0] + v[1]) / 2
  np.save(folder / 'Vmean.npy', v)
  f = mapping.copy()
  f[0] = 2
  np.save(folder / 'Fmean.npy', f)
  return folder, bad


def _json(proc):
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 1, proc.stdout
  return json.loads(lines[0])


@pytest.mark.parametrize('ext', [
    '.safetensors',
    # ~12 s in the suite; test_serialization_versions checks .npz files.
    pytest.param('.npz', marks=pytest.mark.slow)])
def test_construct_then_evaluate(files, ext):
  folder, _ = files
  out = f'mlp{ext}'
  built = _json(factstore('construct', '--keys', 'K.npy', '--values', 'V.npy',
                          '--mapping', 'F.npy', '--out', out, cwd=folder))
  for field in ('accuracy', 'min_margin', 'num_params', 'params_per_fact',
                'num_facts', 'rho', 'seconds'):
    assert field in built
  assert built['accuracy'] == 1.0 and built['min_margin'] > 0
  assert built['num_facts'] == N
  assert os.path.exists(folder / out)
  evaluated = _json(factstore('evaluate', '--mlp', out, '--factset',
                              'facts.npz', cwd=folder))
  assert evaluated['accuracy'] == 1.0 and evaluated['min_margin'] > 0
  assert evaluated['num_params'] == built['num_params']
  if built['check'] == 'certificate':   # a certified lower bound
    assert built['min_margin'] <= evaluated['min_margin'] + 1e-6
    assert built['min_margin'] > 0.25 * evaluated['min_margin']
  else:
    np.testing.assert_allclose(evaluated['min_margin'], built['min_margin'],
                               rtol=1e-3)


def test_decodability_command(files):
  folder, _ = files
  result = _json(factstore('decodability', '--values', 'V.npy', '--mapping',
                           'F.npy', cwd=folder))
  assert result['num_undecodable'] == 0 and result['undecodable'] == []
  assert result['rho_min'] > 0
  result = _json(factstore('decodability', '--values', 'Vmean.npy',
                           '--mapping', 'Fmean.npy', cwd=folder))
  assert result['undecodable'] == [2] and result['rho_min'] <= 0


def test_infeasible_construct_names_the_value(files):
  folder, _ = files
  proc = factstore('construct', '--keys', 'K.npy', '--values', 'Vmean.npy',
                   '--mapping', 'Fmean.npy', '--out', 'never.safetensors',
                   cwd=folder)
  assert proc.returncode != 0
  assert 'infeasible' in proc.stderr and '[2]' in proc.stderr
  assert not os.path.exists(folder / 'never.safetensors')


_SLOW = pytest.mark.slow


# The CLI's part (one line on stderr, exit status, no file) is the same for
# every case; test_factsets and test_construction check each message. Two
# cases run by default (~4 s each: a fresh interpreter), the rest with
# --runslow.
@pytest.mark.parametrize('case', [
    'nan', pytest.param('inf', marks=_SLOW), pytest.param('range', marks=_SLOW),
    'dup', pytest.param('empty', marks=_SLOW),
    pytest.param('shape', marks=_SLOW)])
def test_bad_input_fails_cleanly(files, case):
  folder, bad = files
  name, _, message = bad[case]
  args = {'keys': 'K.npy', 'values': 'V.npy', 'mapping': 'F.npy'}
  target = {'nan': 'keys', 'inf': 'values', 'range': 'mapping', 'dup': 'keys',
            'empty': 'keys', 'shape': 'keys'}[case]
  args[target] = name
  if case == 'dup':
    args['mapping'] = 'Fdup.npy'
  out = f'never_{case}.safetensors'
  proc = factstore('construct', *[f'--{k}={v}' for k, v in args.items()],
                   '--out', out, cwd=folder)
  assert proc.returncode != 0
  assert proc.stdout == ''
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], proc.stderr
  assert not os.path.exists(folder / out)
  # No temporary file of the atomic writer (``.<name>.<random><ext>``).
  assert not [f for f in os.listdir(folder) if f.startswith(f'.{out}.')]


def test_usage_errors(files):
  folder, _ = files
  proc = factstore('construct', '--keys', 'K.npy', '--out', 'x.npz',
                   cwd=folder)
  assert proc.returncode != 0 and 'missing --values' in proc.stderr
  proc = factstore('evaluate', '--mlp', 'missing.safetensors', '--factset',
                   'facts.npz', cwd=folder)
  assert proc.returncode != 0 and 'no such MLP file' in proc.stderr


def test_demo_small(files):
  folder, _ = files
  # The shapes of this module's fact set: the programs that construct and
  # decodability compiled above are in the compilation cache.
  proc = factstore('demo', '--num_facts', str(N), '--dim', str(D),
                   '--num_values', str(P), '--png', 'margins.png', cwd=folder)
  assert proc.returncode == 0, proc.stderr
  assert 'all facts stored: yes' in proc.stdout
  assert (folder / 'margins.png').stat().st_size > 1000
