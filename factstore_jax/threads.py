"""CPU threading guard for the batched LAPACK calls of the bucket solves.

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

import threadpoolctl


def single_threaded_blas():
  """Context manager limiting every loaded BLAS library to one thread."""
  # jaxlib's LAPACK kernels call scipy's OpenBLAS, loaded lazily on the first
  # LAPACK call; load it now so the limit reaches it.
  import scipy.linalg.cython_lapack  # pylint: disable=unused-import,g-import-not-at-top
  return threadpoolctl.threadpool_limits(limits=1, user_api='blas')
