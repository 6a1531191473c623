"""Tests of factstore_jax.threads."""

from __future__ import annotations

import os


def test_expose_cpu_cores_adds_the_flag_once(monkeypatch):
  from factstore_jax.threads import expose_cpu_cores
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1, 2},
                      raising=False)
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_enable_fast_math=false')
  assert expose_cpu_cores() == 3
  assert os.environ['XLA_FLAGS'] == ('--xla_cpu_enable_fast_math=false '
                                     '--xla_force_host_platform_device_count=3')
  assert expose_cpu_cores() == 3  # already there: unchanged
  assert os.environ['XLA_FLAGS'].count('device_count') == 1
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=5')
  assert expose_cpu_cores() == 5
  assert os.environ['XLA_FLAGS'] == '--xla_force_host_platform_device_count=5'
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0},
                      raising=False)
  monkeypatch.delenv('XLA_FLAGS')
  assert expose_cpu_cores() == 1 and 'XLA_FLAGS' not in os.environ
