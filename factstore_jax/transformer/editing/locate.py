"""Locate-and-edit updates of a gated MLP's down-projection.

See docs/design.md, "Fact editing".

ROME (Meng et al. 2022), MEMIT (Meng et al. 2023) and AlphaEdit (Fang et al.
2025) in this project's row-vector convention (as in :mod:`factstore_jax.mlp`):

  ``hidden (..., h) = (x @ w_up + b_up) * act(x @ w_gate + b_gate)``,
  ``out = hidden @ w_down (+ b_down)``, ``w_down (h, d)``.

Edits change only ``w_down``. A *key* ``k (h,)`` is a hidden vector (what the
down-projection reads), a *value* ``v (d,)`` the output wanted for it; an edit
set is ``keys (E, h)``, ``values (E, d)`` and its residuals are
``R = values - keys @ w_down (E, d)``. ``cov (h, h)`` is the second moment
``C = K^T K / M`` of the keys whose outputs should be preserved.

Every function is pure and jit-compatible. Inputs are validated at the Python
boundary, before anything is traced, with a
:class:`~factstore_jax.errors.FactStoreError` naming the problem (shapes,
dtypes, NaN/inf, negative or non-scalar hyper-parameters, ...); value checks
(finiteness, symmetry, zero keys, signs) run only on concrete inputs and are
skipped for traced ones (e.g. under an outer ``jax.jit`` or ``jax.vmap``).
Arithmetic runs in the inputs' common floating dtype, at least float32
(float64 inputs under ``jax_enable_x64`` give float64 results); the edits'
matrix products use ``Precision.HIGHEST`` (:func:`hidden_states` keeps
:meth:`~factstore_jax.mlp.GatedMLP.__call__`'s default, to match the model).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from factstore_jax import mlp as mlp_lib
from factstore_jax import precision, validation
from factstore_jax.errors import FactStoreError

Array = jax.Array

_mm = precision.matmul
# Relative tolerance of the symmetry check of ``cov`` and ``projector``.
_SYMMETRY_RTOL = 1e-4


class EditFit(NamedTuple):
  """How well an edited down-projection fits (scalars).

  Attributes:
    edit_error: ``max |k @ w_after - v|`` over the edits' keys and values.
    preserved_change: ``max |k_p @ (w_after - w_before)|`` over the preserved
      keys (0 when there are none).
  """
  edit_error: Array
  preserved_change: Array


# --------------------------------------------------------------------------
# Validation (Python boundary, before tracing).
# --------------------------------------------------------------------------


def _symmetric(x: Any, name: str, size: int, why: str) -> Array:
  """A finite symmetric ``(size, size)`` matrix (symmetry checked if concrete)."""
  arr = validation.matrix(x, name, 'h, h', (size, size), why=(why, why))
  if not validation.is_traced(arr):
    a = np.asarray(arr)
    scale = max(float(np.max(np.abs(a))), np.finfo(np.float64).tiny)
    asym = float(np.max(np.abs(a - a.T)))
    if asym > _SYMMETRY_RTOL * scale:
      raise FactStoreError(
          f'{name} must be symmetric: max |{name} - {name}^T| = {asym:.3g} '
          f'exceeds {_SYMMETRY_RTOL:g} * max |{name}| = '
          f'{_SYMMETRY_RTOL * scale:.3g}')
  return arr


def _check_nonzero_rows(keys: Array, name: str) -> None:
  if validation.is_traced(keys):
    return
  zero = np.flatnonzero(~np.any(np.asarray(keys) != 0, axis=1))
  if zero.size:
    raise FactStoreError(
        f'{name} has all-zero row(s) {zero[:20].tolist()}: a zero key cannot '
        'be edited (its output is 0 whatever w_down is)')


def _edit_set(w_down: Any, keys: Any, values: Any, w_name: str = 'w_down'
             ) -> tuple[Array, Array, Array]:
  """Validates ``w_down (h, d)``, ``keys (E, h)``, ``values (E, d)``."""
  w = validation.matrix(w_down, w_name, 'h, d')
  h, d = w.shape
  k = validation.matrix(keys, 'keys', 'E, h', (None, h),
              why=('', f'the rows of {w_name}'))
  v = validation.matrix(values, 'values', 'E, d', (k.shape[0], d),
              why=('one row per key', f'the columns of {w_name}'))
  return w, k, v


def _float_dtype(*arrays: Array):
  """The arrays' common dtype, promoted to at least float32."""
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _cast(dtype, *arrays):
  return tuple(None if a is None else jnp.asarray(a).astype(dtype)
               for a in arrays)


# --------------------------------------------------------------------------
# Keys and their second moment.
# --------------------------------------------------------------------------


_hidden = jax.jit(mlp_lib.hidden)


def hidden_states(params: mlp_lib.GatedMLP, x: Array) -> Array:
  """The down-projection's inputs (the "keys") of a gated MLP.

  ``hidden = (x @ w_up + b_up) * act(x @ w_gate + b_gate)``, so that
  ``params(x) == hidden @ w_down (+ b_down)``.

  Args:
    params: a :class:`~factstore_jax.mlp.GatedMLP`, ``w_gate, w_up (d, h)``.
    x: inputs ``(M, d)`` (any leading axes ``(..., d)`` are kept).

  Returns:
    ``(M, h)`` (or ``(..., h)``) hidden vectors.
  """
  params = mlp_lib.as_gated(params)
  mlp_lib.get_activation(params.activation)
  w_gate = validation.matrix(params.w_gate, 'params.w_gate', 'd, h')
  d, h = w_gate.shape
  validation.matrix(params.w_up, 'params.w_up', 'd, h', (d, h),
          why=('as w_gate', 'as w_gate'))
  for name in ('b_gate', 'b_up'):
    b = getattr(params, name)
    if b is not None:
      b = validation.real_array(b, f'params.{name}')
      if b.shape != (h,):
        raise FactStoreError(
            f'params.{name} must have shape ({h},) (the columns of w_gate), '
            f'got {tuple(b.shape)}')
      validation.check_finite(b, f'params.{name}')
  x = validation.real_array(x, 'x')
  if x.ndim < 1 or x.shape[-1] != d:
    raise FactStoreError(
        f'x must have shape (M, d) with d = {d} (the rows of w_gate), got '
        f'shape {tuple(x.shape)}')
  validation.check_finite(x, 'x')
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(_float_dtype(x, w_gate))
  return _hidden(params, x)


@jax.jit
def _second_moment(keys: Array) -> Array:
  return _mm(keys.T, keys) / keys.shape[0]


def second_moment(keys: Array) -> Array:
  """The keys' (uncentred) second moment ``C = K^T K / M``.

  The "C" of ROME and MEMIT, computed from the keys whose outputs an edit
  should preserve. Runs in float32 (integer and half-precision keys are
  promoted), or float64 for float64 keys (under ``jax_enable_x64``).

  Args:
    keys: ``(M, h)``, ``M >= 1``.

  Returns:
    ``(h, h)`` symmetric positive semi-definite.
  """
  keys = validation.matrix(keys, 'keys', 'M, h')
  return _second_moment(*_cast(_float_dtype(keys), keys))


# --------------------------------------------------------------------------
# ROME.
# --------------------------------------------------------------------------


@jax.jit
def _rome(w: Array, keys: Array, values: Array, cov: Array,
          ridge: Array) -> Array:
  h = cov.shape[0]
  cov = (cov + cov.T) / 2
  scale = jnp.trace(cov) / h
  scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
  c_reg = cov + ridge * scale * jnp.eye(h, dtype=cov.dtype)
  # C is fixed, so every u_i = C^{-1} k_i comes from one solve (not an
  # inverse); only the residuals depend on the earlier edits.
  u = jnp.linalg.solve(c_reg, keys.T).T                       # (E, h)

  def step(w, edit):
    k, u_k, v = edit
    r = v - _mm(k, w)                                         # (d,)
    w = w + jnp.outer(u_k, r) / _mm(u_k, k)
    return w, None

  w, _ = lax.scan(step, w, (keys, u, values))
  return w


def rome(w_down: Array, keys: Array, values: Array, cov: Array, *,
         ridge: float = 1e-6) -> Array:
  """Sequential rank-one edits (ROME), one per edit, in order.

  For each edit ``(k, v)``, in order (a ``lax.scan``), with
  ``C' = C + ridge * (trace(C) / h) * I`` and ``u = C'^{-1} k`` (a solve):

    ``w <- w + u (v - k w)^T / (u . k)``     (an ``(h, 1) x (1, d)`` outer product)

  After the step ``k @ w == v`` exactly (to float tolerance), and the step is
  the smallest such change in the C'-norm ``tr(D^T C' D)``: it solves
  ``min_D tr(D^T C' D)`` subject to ``k @ (w + D) = v``. A later edit moves the
  earlier edits' outputs unless its ``u`` is orthogonal to their keys
  (``k_i^T C'^{-1} k_j = 0``), so only the last edit is exact in general.

  Args:
    w_down: ``(h, d)``.
    keys: ``(E, h)``, no all-zero row.
    values: ``(E, d)``.
    cov: ``(h, h)`` symmetric positive semi-definite ``C`` (see
      :func:`second_moment`).
    ridge: ``>= 0``, relative regulariser of ``C`` (``C' = C`` at 0, then ``C``
      must be invertible). If ``trace(C) = 0`` the scale is 1 instead.

  Returns:
    The edited ``w_down (h, d)``, in the inputs' common float dtype.
  """
  w, k, v = _edit_set(w_down, keys, values)
  c = _symmetric(cov, 'cov', w.shape[0], 'the rows of w_down')
  validation.check_scalar(ridge, 'ridge', minimum=0.0, strict=False)
  _check_nonzero_rows(k, 'keys')
  dtype = _float_dtype(w, k, v, c)
  return _rome(*_cast(dtype, w, k, v, c, ridge))


# --------------------------------------------------------------------------
# MEMIT.
# --------------------------------------------------------------------------


@jax.jit
def _memit(w: Array, keys: Array, values: Array, cov: Array,
           lam: Array) -> Array:
  r = values - _mm(keys, w)                                   # (E, d)
  a = lam * cov + _mm(keys.T, keys)                           # (h, h)
  a = (a + a.T) / 2
  return w + jnp.linalg.solve(a, _mm(keys.T, r))


def memit(w_down: Array, keys: Array, values: Array, cov: Array, *,
          lam: float) -> Array:
  """Batch least-squares edit (MEMIT) of all the edits at once.

  With residuals ``R = V - K w (E, d)``,

    ``Delta (h, d) = (lam * C + K^T K)^{-1} K^T R``     (a linear solve)

  and the result is ``w + Delta``. ``Delta`` minimises

    ``||K (w + Delta) - V||^2 + lam * tr(Delta^T C Delta)``,

  the edits' squared error plus ``lam`` times the change's C-norm (the mean
  squared change of the outputs of the keys ``C`` was computed from). As
  ``lam -> 0`` with ``E <= h`` independent keys (and ``C`` invertible) every
  edit becomes exact; as ``lam`` grows ``tr(Delta^T C Delta)`` shrinks
  monotonically. For one edit it is ROME's step (``ridge=0``) scaled by
  ``s / (lam + s)``, ``s = k^T C^{-1} k``.

  Args:
    w_down: ``(h, d)``.
    keys: ``(E, h)``.
    values: ``(E, d)``.
    cov: ``(h, h)`` symmetric positive semi-definite ``C``.
    lam: ``>= 0``; ``lam * C + K^T K`` must be invertible (at ``lam = 0`` that
      needs ``E >= h`` keys spanning the hidden space).

  Returns:
    The edited ``w_down (h, d)``, in the inputs' common float dtype.
  """
  w, k, v = _edit_set(w_down, keys, values)
  c = _symmetric(cov, 'cov', w.shape[0], 'the rows of w_down')
  validation.check_scalar(lam, 'lam', minimum=0.0, strict=False)
  dtype = _float_dtype(w, k, v, c)
  return _memit(*_cast(dtype, w, k, v, c, lam))


# --------------------------------------------------------------------------
# AlphaEdit.
# --------------------------------------------------------------------------


@jax.jit
def _null_space_projector(cov: Array, rel_tol: Array) -> Array:
  evals, evecs = jnp.linalg.eigh((cov + cov.T) / 2)          # ascending
  top = evals[-1]
  keep = (evals < rel_tol * top) | (top <= 0)
  p = _mm(evecs * keep.astype(evecs.dtype), evecs.T)
  return (p + p.T) / 2


def null_space_projector(cov: Array, *, rel_tol: float = 1e-2) -> Array:
  """Projector onto C's (numerical) null space (AlphaEdit, Fang et al. 2025).

  ``P = U_0 U_0^T`` where the columns of ``U_0`` are the eigenvectors of ``C``
  (``jnp.linalg.eigh``) whose eigenvalue is ``< rel_tol * max eigenvalue``.
  For a preserved key ``k_p`` (one of the keys ``C`` was computed from),
  ``||k_p P||^2 <= M * lambda_0`` where ``lambda_0`` is the largest discarded
  eigenvalue (``sum_p ||k_p P||^2 = M * tr(P C P)``). A zero ``C`` gives
  ``P = I``.

  Args:
    cov: ``(h, h)`` symmetric positive semi-definite ``C``.
    rel_tol: in ``(0, 1]``, the relative eigenvalue threshold.

  Returns:
    ``(h, h)`` symmetric idempotent ``P`` in ``cov``'s float dtype.
  """
  c = validation.real_array(cov, 'cov')
  if c.ndim != 2 or c.shape[0] != c.shape[1]:
    raise FactStoreError(
        f'cov must be a square (h, h) matrix, got shape {tuple(c.shape)}')
  c = _symmetric(c, 'cov', c.shape[0], 'square')
  validation.check_scalar(rel_tol, 'rel_tol', minimum=0.0, strict=True, maximum=1.0)
  dtype = _float_dtype(c)
  return _null_space_projector(*_cast(dtype, c, rel_tol))


@jax.jit
def _alphaedit(w: Array, keys: Array, values: Array, projector: Array,
               lam: Array, prior_keys: Array | None) -> Array:
  h = w.shape[0]
  p = projector
  r = values - _mm(keys, w)                                   # (E, d)
  m = _mm(keys.T, keys)                                       # (h, h)
  if prior_keys is not None:
    m = m + _mm(prior_keys.T, prior_keys)
  a = _mm(_mm(p, m), p)
  a = (a + a.T) / 2 + lam * jnp.eye(h, dtype=w.dtype)
  y = jnp.linalg.solve(a, _mm(p, _mm(keys.T, r)))
  return w + _mm(p, y)


def alphaedit(w_down: Array, keys: Array, values: Array, projector: Array, *,
              lam: float, prior_keys: Array | None = None) -> Array:
  """Null-space-projected batch edit (AlphaEdit, Fang et al. 2025).

  The paper (column convention: ``W (d, h)``, keys as columns ``K_1 (h, E)``,
  ``R = V_1 - W K_1 (d, E)``, earlier edits' keys ``K_p``) updates
  ``W <- W + Delta`` with

    ``Delta = R K_1^T P (K_p K_p^T P + K_1 K_1^T P + I)^{-1}``.

  Transposed into this module's row convention (``w = W^T (h, d)``,
  ``K = K_1^T (E, h)``, ``R = V - K w (E, d)``, ``P = P^T``) and with the
  identity term weighted by ``lam``:

    ``Delta (h, d) = (P (K^T K + K_p^T K_p) + lam I)^{-1} P K^T R``
    ``             = P (P M P + lam I)^{-1} P K^T R``,  ``M = K^T K + K_p^T K_p``,

  (equal for a symmetric idempotent ``P`` and ``lam > 0``; the second,
  symmetric, form is what is computed). So ``P @ Delta == Delta``: the change
  lies in C's null space and the outputs ``k_p @ w`` of the preserved keys
  move by at most ``||k_p P|| ||Delta||_2`` (small, bounded by the discarded
  eigenvalues, see :func:`null_space_projector`). ``Delta`` minimises, over
  changes ``Delta = P Y``,

    ``||K (w + Delta) - V||^2 + ||K_p Delta||^2 + lam ||Delta||^2``,

  so edits whose keys have a null-space component move to their values (to
  ``O(lam)`` when ``K P`` has full row rank), and earlier edits (``K_p``) are
  kept in place as far as the new ones allow.

  Args:
    w_down: ``(h, d)``.
    keys: ``(E, h)``.
    values: ``(E, d)``.
    projector: ``(h, h)`` symmetric idempotent ``P``
      (:func:`null_space_projector`).
    lam: ``> 0``, the weight of ``||Delta||^2``.
    prior_keys: optional ``(E_p, h)`` keys of earlier edits (``E_p`` may be 0).

  Returns:
    The edited ``w_down (h, d)``, in the inputs' common float dtype.
  """
  w, k, v = _edit_set(w_down, keys, values)
  p = _symmetric(projector, 'projector', w.shape[0], 'the rows of w_down')
  validation.check_scalar(lam, 'lam', minimum=0.0, strict=True)
  if prior_keys is not None:
    prior_keys = validation.matrix(prior_keys, 'prior_keys', 'E_p, h',
                         (None, w.shape[0]), why=('', 'the rows of w_down'),
                         allow_empty=True)
  arrays = (w, k, v, p) + (() if prior_keys is None else (prior_keys,))
  dtype = _float_dtype(*arrays)
  w, k, v, p, prior_keys = _cast(dtype, w, k, v, p, prior_keys)
  return _alphaedit(w, k, v, p, jnp.asarray(lam).astype(dtype), prior_keys)


# --------------------------------------------------------------------------
# Fit of an edit.
# --------------------------------------------------------------------------


@jax.jit
def _edit_fit(w_before: Array, w_after: Array, keys: Array, values: Array,
              preserved_keys: Array | None) -> EditFit:
  edit_error = jnp.max(jnp.abs(_mm(keys, w_after) - values))
  if preserved_keys is None:
    preserved_change = jnp.zeros((), w_after.dtype)
  else:
    change = _mm(preserved_keys, w_after - w_before)
    preserved_change = jnp.max(jnp.abs(change), initial=0.0)
  return EditFit(edit_error=edit_error, preserved_change=preserved_change)


def edit_fit(w_before: Array, w_after: Array, keys: Array, values: Array,
             preserved_keys: Array | None = None) -> EditFit:
  """How exact the edits are and how much the preserved outputs moved.

  Args:
    w_before: ``(h, d)``, the down-projection before the edit.
    w_after: ``(h, d)``, after it.
    keys: ``(E, h)``, the edits' keys.
    values: ``(E, d)``, their target values.
    preserved_keys: optional ``(M, h)`` keys whose outputs should not move
      (``M`` may be 0).

  Returns:
    An :class:`EditFit`: ``edit_error = max |keys @ w_after - values|`` and
    ``preserved_change = max |preserved_keys @ (w_after - w_before)|``
    (the output change ``k_p w' - k_p w``, computed from the weight change so
    that it is not swamped by rounding of the outputs themselves).
  """
  w_after, k, v = _edit_set(w_after, keys, values, 'w_after')
  w_before = validation.matrix(w_before, 'w_before', 'h, d', w_after.shape,
                     why=('as w_after', 'as w_after'))
  if preserved_keys is not None:
    preserved_keys = validation.matrix(preserved_keys, 'preserved_keys', 'M, h',
                             (None, w_after.shape[0]),
                             why=('', 'the rows of w_after'), allow_empty=True)
  arrays = (w_before, w_after, k, v) + (
      () if preserved_keys is None else (preserved_keys,))
  dtype = _float_dtype(*arrays)
  return _edit_fit(*_cast(dtype, w_before, w_after, k, v, preserved_keys))
