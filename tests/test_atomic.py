"""Tests for atomic file output helpers."""

from __future__ import annotations

import os

import matplotlib
import pytest

from factstore_jax import atomic
from factstore_jax.errors import FactStoreError

matplotlib.use('Agg')


def test_write_text_replaces_and_leaves_no_temp(tmp_path):
  path = tmp_path / 'a.md'
  atomic.write_text(path, 'one')
  atomic.write_text(path, 'two')
  assert path.read_text() == 'two'
  assert os.listdir(tmp_path) == ['a.md']


def test_failed_write_keeps_old_file(tmp_path):
  path = tmp_path / 'a.md'
  atomic.write_text(path, 'old')
  with pytest.raises(RuntimeError):
    with atomic.atomic_output(path) as tmp:
      with open(tmp, 'w') as f:
        f.write('half')
      raise RuntimeError('crash mid-write')
  assert path.read_text() == 'old'
  assert os.listdir(tmp_path) == ['a.md']


def test_save_figure_png(tmp_path):
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots()
  ax.plot([0, 1], [1, 0])
  atomic.save_figure(fig, tmp_path / 'f.png')
  assert (tmp_path / 'f.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_missing_folder(tmp_path):
  with pytest.raises(FactStoreError, match='does not exist'):
    atomic.write_text(tmp_path / 'nope' / 'a.md', 'x')
