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

import jax
import pytest

jax.config.update('jax_default_matmul_precision', 'highest')


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
