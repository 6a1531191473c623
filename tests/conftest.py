"""Shared pytest configuration: ``slow`` tests run only with ``--runslow``."""

from __future__ import annotations

import pytest


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
