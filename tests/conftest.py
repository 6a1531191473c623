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


def pytest_collection_modifyitems(config, items):
  if config.getoption('--runslow'):
    return
  skip_slow = pytest.mark.skip(reason='slow test: pass --runslow to run it')
  for item in items:
    if 'slow' in item.keywords:
      item.add_marker(skip_slow)
