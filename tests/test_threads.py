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


def test_construct_is_deterministic_with_large_bucket_solves():
  # Buckets of ~240 keys at d = 256: Gram matrices large enough for a
  # multi-threaded OpenBLAS, whose results vary between calls. construct()
  # must run every LAPACK call inside single_threaded_blas (blocking there:
  # dispatched asynchronously, the solves ran after it ended and the maps
  # differed between two identical calls).
  import jax
  import numpy as np
  from factstore_jax import construct, factsets
  fs = factsets.random_factset(jax.random.key(0), 4096, 256, num_values=1024,
                               tied=False, mapping='many_to_one')
  first, again = (construct(0, fs) for _ in range(2))
  assert first.report.bucket_size > 200
  for a, b in zip(jax.tree.leaves((first.model, first.structure.gadgets)),
                  jax.tree.leaves((again.model, again.structure.gadgets))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_single_threaded_blas_limits_every_blas_to_one_thread():
  import threadpoolctl
  from factstore_jax.threads import single_threaded_blas
  with single_threaded_blas():
    infos = threadpoolctl.threadpool_info()
    blas = [i for i in infos if i['user_api'] == 'blas']
    assert blas and all(i['num_threads'] == 1 for i in blas)
