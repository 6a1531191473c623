"""Shared pytest configuration: ``slow`` tests run only with ``--runslow``.

Tests compare forward passes with float64 / NumPy references at float32
tolerances, so user-facing matmuls run at full float32 precision here too:
on GPUs and TPUs JAX's default rounds float32 matmul operands to TF32 / bf16
(measured on an H100: relative error 2.9e-4 vs 8.1e-7). On CPU this changes
nothing. Constructions and certificates set full precision themselves
(``factstore_jax.precision``; ``tests/test_precision.py`` checks that under a
reduced default).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

import jax
import pytest

jax.config.update('jax_default_matmul_precision', 'highest')

# Most of the suite's time is XLA compiling small programs that then run for
# milliseconds. XLA's CPU backend at optimisation level 0 compiles them about
# a third faster (tests/test_methods.py alone: 96 s -> 60 s on 2 cores); it
# changes the generated machine code's speed, not what it computes (no
# fast-math: IEEE float semantics either way). Benchmarks and experiments
# run at XLA's default level. Set FACTSTORE_TEST_XLA_OPT=default to test at
# that level too. Set before any backend starts; workers and subprocesses
# inherit it.
if os.environ.get('FACTSTORE_TEST_XLA_OPT', '0') != 'default':
  os.environ['XLA_FLAGS'] = ' '.join(
      f for f in (os.environ.get('XLA_FLAGS', ''),
                  '--xla_backend_optimization_level=0') if f)

# One persistent compilation cache per test run, shared by the xdist workers
# and the subprocesses they start (CLI, experiment scripts, notebook): they
# inherit this environment from the controller, so the same programs compile
# once per run instead of once per process. The cache starts empty every
# run and the controller removes it at the end (pytest_unconfigure). Workers
# and subprocesses start with these variables set, and JAX reads them when
# it is imported; this process may have imported JAX already, hence the
# config updates.
_OWN_CACHE = 'JAX_COMPILATION_CACHE_DIR' not in os.environ
if _OWN_CACHE:
  _CACHE_SETTINGS = {
      'jax_compilation_cache_dir': tempfile.mkdtemp(
          prefix='factstore_jax_test_cache_'),
      'jax_persistent_cache_min_compile_time_secs': 0,
      'jax_persistent_cache_min_entry_size_bytes': 0}
  for _name, _value in _CACHE_SETTINGS.items():
    os.environ[_name.upper()] = str(_value)
    jax.config.update(_name, _value)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(device_count: int | None = None) -> dict[str, str]:
  """The environment of a test's subprocess (``from conftest import ...``).

  This checkout first on ``PYTHONPATH``, CPU only, and the suite's
  ``XLA_FLAGS`` (its optimisation level, so the shared compilation cache
  serves) with any device count replaced by ``device_count`` CPU devices
  (``None``: XLA's default, one).
  """
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env['PYTHONPATH'] = os.pathsep.join(
      p for p in (ROOT, os.environ.get('PYTHONPATH')) if p)
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  if device_count is not None:
    flags.append(f'--xla_force_host_platform_device_count={device_count}')
  env['XLA_FLAGS'] = ' '.join(flags)
  return env


def free_address() -> str:
  """``127.0.0.1:<port>`` with a port free now, for a test's coordinator."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return f'127.0.0.1:{s.getsockname()[1]}'


def pytest_addoption(parser):
  parser.addoption('--runslow', action='store_true', default=False,
                   help='also run tests marked @pytest.mark.slow')


def pytest_configure(config):
  config.addinivalue_line('markers',
                          'slow: long-running tests, run with --runslow')


# pytest-xdist runs with --dist loadfile (pyproject.toml): each file goes to
# one worker, so a file's cached setup (a trained model, a construction) is
# computed once, not once per worker. Files of long single tests (subprocess
# runs of the notebook and the experiment scripts, 50-150 s each) run first,
# so they start on separate workers instead of leaving one at the end.
LONG_FIRST = ('test_notebook.py::test_runs_top_to_bottom',
              'test_experiments.py::test_capacity_scaling_tiny',
              'test_experiments.py::test_transformer_recall_tiny',
              'test_experiments.py::test_transformer_capacity_tiny',
              'test_experiments.py::test_decodability_scaling_tiny')


def pytest_collection_modifyitems(config, items):
  def rank(item):
    ends = [item.nodeid.endswith(name) for name in LONG_FIRST]
    return ends.index(True) if True in ends else len(LONG_FIRST)
  items.sort(key=rank)
  if config.getoption('--runslow'):
    return
  skip_slow = pytest.mark.skip(reason='slow test: pass --runslow to run it')
  for item in items:
    if 'slow' in item.keywords:
      item.add_marker(skip_slow)


def pytest_unconfigure(config):
  # Workers inherit the controller's directory (_OWN_CACHE False there).
  if _OWN_CACHE and not hasattr(config, 'workerinput'):
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
