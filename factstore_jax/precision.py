"""Full float32 matmuls for constructions and margin certificates.

On GPUs and TPUs XLA's default float32 matmul may round its operands to
TF32 or bfloat16 (about three significant digits). A closed-form solve or a
margin certificate computed that way can be wrong in the sign of a small
margin. Functions wrapped in :func:`full_precision` trace every matmul at
``'highest'`` precision (true float32 / float64 arithmetic); on CPU that is
what XLA does anyway, so nothing changes there. Gradient-descent training
keeps the platform default (or bfloat16, ``TrainConfig.compute_dtype``) for
its steps; only its final certificate is computed at full precision.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import jax
import jax.numpy as jnp

from factstore_jax.errors import FactStoreError

F = TypeVar('F', bound=Callable)

COMPUTE_DTYPES = ('bfloat16', 'float16', 'float32', 'float64')


def check_compute_dtype(name: str | None) -> str | None:
  """``name`` if it is ``None`` or one of :data:`COMPUTE_DTYPES`, else raises
  :class:`~factstore_jax.errors.FactStoreError`."""
  if name is not None and name not in COMPUTE_DTYPES:
    *head, last = map(repr, COMPUTE_DTYPES)
    raise FactStoreError(f"compute_dtype must be None, {', '.join(head)} or "
                         f"{last}, got {name!r}")
  return name


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a @ b`` at ``'highest'`` precision, whatever the surrounding setting.

  For a single product inside code that otherwise keeps the platform
  default; wrap whole functions with :func:`full_precision` instead.
  """
  return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def full_precision(fn: F) -> F:
  """Wraps ``fn`` so its matmuls trace at ``'highest'`` precision.

  Apply it beneath ``jax.jit`` (the setting is read while tracing) or to a
  plain Python function that calls jitted ones (the setting is part of their
  compilation cache key).
  """
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.default_matmul_precision('highest'):
      return fn(*args, **kwargs)
  return wrapped  # type: ignore[return-value]
