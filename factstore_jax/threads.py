"""CPU threading: a guard for the batched LAPACK calls of the bucket solves,
and :func:`expose_cpu_cores` to split row-parallel work over the cores.

jaxlib runs a batched LAPACK kernel (e.g. a vmapped Cholesky) as many small
calls spread over XLA's thread pool, and each call goes to an OpenBLAS that
starts threads of its own. On a small machine the two pools oversubscribe the
cores and spin against each other: measured on a 2-core CPU, the bucket
solves of a 65,536-fact construction took 130 s instead of 1 s. Inside
:func:`single_threaded_blas` each LAPACK call is single-threaded and the
parallelism comes from XLA alone. :func:`construct` and
:func:`construct_batched` use it; wrap your own jitted calls of
``construct_fixed`` / ``build_gadgets`` in it on CPU (and block on the result
inside the ``with``, since JAX dispatches asynchronously).
"""

from __future__ import annotations

import functools
import os

import threadpoolctl

_DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'


@functools.cache
def _blas_controller() -> threadpoolctl.ThreadpoolController:
  """One controller of the loaded BLAS libraries (scanning them is slow)."""
  # jaxlib's LAPACK kernels call scipy's OpenBLAS, loaded lazily on the first
  # LAPACK call; load it now so the controller sees it.
  import scipy.linalg.cython_lapack  # pylint: disable=unused-import,g-import-not-at-top
  return threadpoolctl.ThreadpoolController()


def single_threaded_blas():
  """Context manager limiting every loaded BLAS library to one thread.

  JAX dispatches asynchronously: block on the results inside the ``with``
  (``jax.block_until_ready``), or the LAPACK calls may run after it ends,
  on a multi-threaded OpenBLAS whose results then vary from run to run.
  """
  return _blas_controller().limit(limits=1, user_api='blas')


def expose_cpu_cores() -> int:
  """One XLA CPU device per usable core; call before JAX starts.

  XLA runs each small matrix product or LAPACK call of the bucket solves and
  the decodability solver on a single core; with the cores exposed as
  devices, :func:`~factstore_jax.sharding.shard_rows` splits that work over
  them (measured on 2 cores: construction at N = 65,536 about 1.5x
  faster). Sets ``XLA_FLAGS=--xla_force_host_platform_device_count=<cores>``
  unless the flag is already there; it has no effect once JAX has created
  its CPU backend. The ``factstore`` CLI and the construction benchmarks
  call it.

  Do not run vmapped LAPACK work (e.g. ``sharding.map_batched`` over Hebbian
  ridge solves) on several CPU devices at once: jaxlib's batched LAPACK
  kernels then wait on each other's share of the thread pool (seen: a
  2-device ``benchmarks/sweep.py`` hung at 0% CPU). The construction's own
  LAPACK calls are unbatched (``lax.map`` per device) and run inside
  :func:`single_threaded_blas`.

  Returns the device count the flag now asks for.
  """
  flags = os.environ.get('XLA_FLAGS', '')
  for token in flags.split():
    if token.startswith(_DEVICE_COUNT_FLAG + '='):
      return int(token.split('=', 1)[1])
  cores = (len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
           else os.cpu_count() or 1)
  if cores > 1:
    os.environ['XLA_FLAGS'] = f'{flags} {_DEVICE_COUNT_FLAG}={cores}'.strip()
  return cores
