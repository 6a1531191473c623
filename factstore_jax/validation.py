"""Argument checks at the Python boundary, before anything is traced.

Shapes and dtypes are checked always; values (finiteness, ranges, symmetry)
only when the array is concrete, so the public functions that use these
stay ``jit``-able with traced arguments. Every check raises
:class:`~factstore_jax.errors.FactStoreError` (a ``ValueError``) naming the
argument and what is wrong. Whole fact sets are checked on the host by
:func:`factstore_jax.factsets.validate_factset`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from factstore_jax.errors import FactStoreError

Array = jax.Array


def is_traced(x: Any) -> bool:
  """Whether ``x`` is a tracer (its values are unknown)."""
  return isinstance(x, jax.core.Tracer)


def concrete(x: Any) -> np.ndarray | None:
  """``x`` as a numpy array, or ``None`` while it is being traced."""
  if is_traced(x):
    return None
  try:
    return np.asarray(x)
  except jax.errors.ConcretizationTypeError:
    return None


def real_array(x: Any, name: str, *, to_float: bool = False) -> Array:
  """``x`` as a real (float or integer) array; tracers pass through.

  With ``to_float`` an integer array is converted to the default float.
  """
  if is_traced(x):
    arr = x
  else:
    try:
      arr = jnp.asarray(x)
    except (TypeError, ValueError) as e:
      raise FactStoreError(
          f'{name} could not be converted to an array: {e}') from e
  dtype = arr.dtype
  if dtype == jnp.bool_ or not (jnp.issubdtype(dtype, jnp.floating) or
                                jnp.issubdtype(dtype, jnp.integer)):
    raise FactStoreError(f'{name} must hold real numbers, got dtype {dtype}')
  if to_float and not jnp.issubdtype(dtype, jnp.floating):
    arr = arr.astype(jnp.result_type(float))
  return arr


def check_ndim(x: Array, ndim: int, name: str, axes: str) -> None:
  """``x.ndim == ndim``; ``axes`` names the axes, e.g. ``'N, d'``."""
  if x.ndim != ndim:
    raise FactStoreError(
        f'{name} must have shape ({axes}) ({ndim} dims), got shape '
        f'{tuple(x.shape)} with {x.ndim} dim(s)')


def check_nonempty(x: Array, name: str) -> None:
  if x.size == 0:
    raise FactStoreError(f'{name} is empty (shape {tuple(x.shape)})')


def check_finite(x: Array, name: str) -> None:
  """No NaN or inf in ``x`` (when concrete); names the first bad index."""
  arr = concrete(x)
  if arr is not None and not np.all(np.isfinite(arr)):
    bad = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
    raise FactStoreError(
        f'{name} holds a non-finite entry (NaN or inf) at index {bad}')


def matrix(x: Any, name: str, axes: str,
           shape: tuple[int | None, int | None] = (None, None), *,
           why: tuple[str, str] = ('', ''), allow_empty: bool = False,
           to_float: bool = False) -> Array:
  """A finite 2-D real array of shape ``shape`` (``None``: any size).

  ``axes`` names the axes (e.g. ``'E, h'``); ``why`` says where a required
  size comes from, for the error message.
  """
  arr = real_array(x, name, to_float=to_float)
  check_ndim(arr, 2, name, axes)
  for axis, (size, want, because) in enumerate(zip(arr.shape, shape, why)):
    if want is not None and size != want:
      label = axes.split(',')[axis].strip()
      because = f' ({because})' if because else ''
      raise FactStoreError(
          f'{name} must have shape ({axes}) with {label} = {want}{because}, '
          f'got shape {tuple(arr.shape)}')
  if not allow_empty:
    check_nonempty(arr, name)
  check_finite(arr, name)
  return arr


def check_int(value: Any, name: str, minimum: int) -> int:
  """A static Python (or numpy) int ``>= minimum``; returns it as ``int``."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value,
                                                           (int, np.integer)):
    raise FactStoreError(
        f'{name} must be a Python int (static), got {type(value).__name__}')
  if value < minimum:
    raise FactStoreError(f'{name} must be >= {minimum}, got {value}')
  return int(value)


def check_scalar(value: Any, name: str, *, minimum: float, strict: bool,
                 maximum: float | None = None) -> None:
  """A finite real scalar ``> minimum`` (strict) or ``>= minimum``, and
  ``<= maximum``. Only its shape is checked when it is traced."""
  if is_traced(value):
    if value.ndim != 0:
      raise FactStoreError(
          f'{name} must be a scalar, got shape {tuple(value.shape)}')
    return
  try:
    arr = np.asarray(value)
  except (TypeError, ValueError) as e:
    raise FactStoreError(f'{name} must be a real scalar, got {value!r}') from e
  if arr.ndim != 0 or arr.dtype == np.bool_ or not (
      np.issubdtype(arr.dtype, np.floating) or
      np.issubdtype(arr.dtype, np.integer)):
    raise FactStoreError(f'{name} must be a real scalar, got {value!r}')
  v = float(arr)
  low_ok = v > minimum if strict else v >= minimum
  if not np.isfinite(v) or not low_ok or (maximum is not None and v > maximum):
    bounds = f'{">" if strict else ">="} {minimum:g}'
    if maximum is not None:
      bounds += f' and <= {maximum:g}'
    raise FactStoreError(f'{name} must be finite and {bounds}, got {value!r}')


def mapping_array(mapping: Any, num_keys: int, num_values: int) -> Array:
  """An ``(N,)`` int32 mapping with entries in ``[0, P)`` (range checked
  when concrete)."""
  mapping = real_array(mapping, 'mapping')
  check_ndim(mapping, 1, 'mapping', 'N,')
  if mapping.shape[0] != num_keys:
    raise FactStoreError(
        f'mapping has length {mapping.shape[0]} but there are N = {num_keys} '
        'keys')
  if not jnp.issubdtype(mapping.dtype, jnp.integer):
    raise FactStoreError(
        f'mapping must have an integer dtype, got {mapping.dtype}')
  arr = concrete(mapping)
  if arr is not None and arr.size and (arr.min() < 0 or
                                       arr.max() >= num_values):
    bad = int(np.flatnonzero((arr < 0) | (arr >= num_values))[0])
    raise FactStoreError(
        f'mapping[{bad}] = {int(arr[bad])} is out of range [0, P = '
        f'{num_values})')
  return mapping.astype(jnp.int32)
