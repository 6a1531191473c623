"""NTK / associative-memory baseline (Nichani, Lee, Bietti 2024).

See docs/design.md, "Baselines".

The MLP is ``g(x) = D[(U x) * relu(G x)]`` with

* gate weights ``G (m, d)``: i.i.d. Gaussian rows ``N(0, I_d / s^2)`` where
  ``s^2 = mean_i ||k_i||^2`` is the mean squared key norm, so the gate
  pre-activations ``G k_i`` are ~ ``N(0, 1)`` at the keys (for unit keys the
  rows are standard Gaussian) -- the scale under which the Hermite features
  below are orthonormal;
* down weights ``D (d, m)``: i.i.d. columns uniform on the unit sphere;
* up weights ``U = (1/m) sum_i (h_k(G k_i) * D^T v_f(i)) k_i^T`` with
  ``h_k = He_k / sqrt(k!)`` the normalised probabilists' Hermite polynomial of
  degree ``k`` (:func:`hermite`).

As a :class:`~factstore_jax.mlp.GatedMLP`: ``w_gate = G^T``, ``w_up = U^T``,
``w_down = D^T``, ``activation='relu'``, no biases; ``3 d m`` parameters.

In expectation over ``G``, unit ``r``'s share of ``g(x)`` from fact ``i`` is
``c_k <k_i, x>^(k+1) D_r D_r^T v_f(i) / m`` (unit keys), where
``c_k = E[h_k(Z) relu(Z)]`` is relu's ``k``-th normalised Hermite coefficient:
``c_1 = 1/2``, ``c_2 = 1/(2 sqrt(pi))``, ``c_4 = -1/(4 sqrt(3 pi))``, even
degrees alternating in sign, and ``c_k = 0`` for odd ``k >= 3`` (``relu(z) -
z/2 = |z|/2`` is even). So with the relu gate odd degrees ``k >= 3`` carry no
signal in expectation (storage rests on fluctuations: near-chance accuracy)
and ``k = 4, 8, ...`` store with the wrong sign (accuracy near 0). Degrees 1
and 2 are the useful ones; the formula is kept as the baseline specifies it.

Widths are nested: unit ``r``'s random weights depend only on ``(key, r)``,
so the width-``m`` MLP holds the first ``m`` units of any wider one (up to
the ``1/m`` scale of ``U``), whatever ``max_width`` is.

Two entry points:

* :func:`ntk_mlp` -- static ``width``; hidden width ``width``.
* :func:`ntk_mlp_masked` -- ``width`` may be traced (``vmap`` over widths);
  hidden width ``max_width`` with units ``>= width`` exactly zero.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from factstore_jax.errors import FactStoreError
from factstore_jax.factsets import FactSet
from factstore_jax.mlp import GatedMLP
from factstore_jax.precision import matmul

Array = jax.Array



# ----------------------------------------------------------------------------
# Helpers shared with the Hebbian baseline.
# ----------------------------------------------------------------------------


def check_factset_shapes(factset: FactSet) -> tuple[int, int]:
  """Shape checks that work on tracers too; returns ``(N, d)``."""
  keys, values, mapping = factset
  if jnp.ndim(keys) != 2 or jnp.ndim(values) != 2 or jnp.ndim(mapping) != 1:
    raise FactStoreError(
        'expected an unbatched fact set: keys (N, d), values (P, d), mapping '
        f'(N,); got shapes {jnp.shape(keys)}, {jnp.shape(values)}, '
        f'{jnp.shape(mapping)} (vmap over stacked fact sets)')
  n, d = jnp.shape(keys)
  if jnp.shape(values)[1] != d:
    raise FactStoreError(
        f'keys have dimension d = {d} but values have dimension '
        f'{jnp.shape(values)[1]}')
  if jnp.shape(mapping)[0] != n:
    raise FactStoreError(
        f'mapping has length {jnp.shape(mapping)[0]} but there are N = {n} '
        'keys')
  return n, d


def _is_int(x: Any) -> bool:
  return (isinstance(x, (int, np.integer)) and
          not isinstance(x, (bool, np.bool_)))


def check_widths(width: Any, max_width: Any, *, masked: bool) -> int:
  """Validates ``width`` / ``max_width`` on the host; returns ``max_width``.

  For the sliced entry points ``width`` must be a Python int and
  ``max_width`` defaults to it. For the masked ones ``max_width`` is a
  required Python int and ``width`` may be a traced integer scalar (checked
  only when concrete).
  """
  if masked:
    if not _is_int(max_width):
      raise FactStoreError(
          f'max_width must be a Python int for the masked variant, got '
          f'{max_width!r}')
  elif not _is_int(width):
    raise FactStoreError(
        f'width must be a Python int (use the *_masked variant for traced '
        f'widths), got {type(width).__name__}')
  if max_width is None:
    max_width = width
  if not _is_int(max_width):
    raise FactStoreError(f'max_width must be a Python int, got {max_width!r}')
  if max_width < 1:
    raise FactStoreError(f'max_width must be >= 1, got {max_width}')
  max_width = int(max_width)
  if isinstance(width, jax.core.Tracer):
    return max_width
  if jnp.ndim(width) != 0:
    raise FactStoreError(
        f'width must be a scalar, got shape {jnp.shape(width)}')
  if not jnp.issubdtype(jnp.result_type(width), jnp.integer):
    raise FactStoreError(f'width must be an integer, got {width!r}')
  w = int(width)
  if w < 1:
    raise FactStoreError(f'width must be >= 1, got {w}')
  if w > max_width:
    raise FactStoreError(
        f'width = {w} exceeds max_width = {max_width}')
  return max_width


def unit_normal(key: Array, num_units: int, dim: int, dtype: Any) -> Array:
  """``(num_units, dim)`` standard normal rows; row ``r`` depends on (key, r).

  Row ``r`` is drawn from ``fold_in(key, r)``, so the first ``m`` rows are the
  same for every ``num_units >= m`` (nested widths).
  """
  draw = lambda r: jax.random.normal(jax.random.fold_in(key, r), (dim,), dtype)
  return jax.vmap(draw)(jnp.arange(num_units))


def unit_mask(width: Array | int, max_width: int, dtype: Any) -> Array:
  """``(max_width,)``: 1 for the first ``width`` units, 0 after."""
  return (jnp.arange(max_width) < width).astype(dtype)


def clip_width(width: Array | int, max_width: int) -> Array:
  """A traced width clipped to ``[1, max_width]`` (int32 scalar)."""
  return jnp.clip(jnp.asarray(width, jnp.int32), 1, max_width)


# ----------------------------------------------------------------------------
# Hermite features.
# ----------------------------------------------------------------------------


def hermite(z: Array, degree: int) -> Array:
  """Normalised probabilists' Hermite polynomial ``He_k(z) / sqrt(k!)``.

  Orthonormal under the standard Gaussian: ``E[h_j(Z) h_k(Z)] = [j == k]``
  for ``Z ~ N(0, 1)``. Uses the three-term recurrence
  ``He_{n+1} = z He_n - n He_{n-1}`` on the normalised polynomials.

  Args:
    z: any-shaped array.
    degree: ``k >= 0`` (a Python int; static).

  Returns:
    Array shaped like ``z``.
  """
  if not _is_int(degree) or degree < 0:
    raise FactStoreError(f'degree must be a Python int >= 0, got {degree!r}')
  prev, cur = jnp.zeros_like(z), jnp.ones_like(z)
  # Normalised: h_{n+1} = (z h_n - sqrt(n) h_{n-1}) / sqrt(n + 1).
  for n in range(degree):
    prev, cur = cur, (z * cur - math.sqrt(n) * prev) / math.sqrt(n + 1)
  return cur


# ----------------------------------------------------------------------------
# The construction.
# ----------------------------------------------------------------------------


def _check_degree(degree: Any) -> None:
  if not _is_int(degree):
    raise FactStoreError(f'degree must be a Python int, got {degree!r}')
  if degree < 1:
    raise FactStoreError(f'degree must be >= 1, got {degree}')


class NTKFeatures(NamedTuple):
  """Random weights of the NTK construction, one row per hidden unit."""
  gate: Array  # (m, d) rows of G
  down: Array  # (m, d) columns of D (unit norm)


def ntk_features(key: Array, keys: Array, max_width: int) -> NTKFeatures:
  """Random gate and down weights of the first ``max_width`` units.

  Args:
    key: PRNG key.
    keys: ``(N, d)`` keys (only their mean squared norm is used).
    max_width: number of units drawn (static).

  Returns:
    :class:`NTKFeatures`: ``gate (max_width, d)`` Gaussian rows scaled by
    ``1 / rms key norm``; ``down (max_width, d)`` unit rows (the columns of
    ``D``). Row ``r`` depends only on ``(key, r)`` and the keys' scale.
  """
  dim, dtype = keys.shape[1], keys.dtype
  k_gate, k_down = jax.random.split(key)
  scale = jnp.sqrt(jnp.mean(jnp.sum(keys * keys, axis=1)))
  gate = unit_normal(k_gate, max_width, dim, dtype) / jnp.maximum(
      scale, jnp.finfo(dtype).tiny)
  down = unit_normal(k_down, max_width, dim, dtype)
  down = down / jnp.linalg.norm(down, axis=1, keepdims=True)
  return NTKFeatures(gate, down)


def _ntk(key: Array, factset: FactSet, width: Array | int, max_width: int,
         degree: int) -> GatedMLP:
  """Hidden width ``max_width``; units ``>= width`` zero (``width`` traced)."""
  keys, values, mapping = factset
  gate, down = ntk_features(key, keys, max_width)
  mask = unit_mask(width, max_width, keys.dtype)
  feats = hermite(matmul(keys, gate.T), degree)
  proj = matmul(values[mapping], down.T)  # (N, m)
  coef = feats * proj * (mask / jnp.asarray(width, keys.dtype))[None, :]
  w_up = matmul(keys.T, coef)            # (d, m)
  return GatedMLP(w_gate=gate.T, w_up=w_up, w_down=down * mask[:, None],
                  activation='relu')


def ntk_mlp(key: Array, factset: FactSet, width: int, *,
            max_width: int | None = None, degree: int = 1) -> GatedMLP:
  """NTK / associative-memory MLP of hidden width ``width``.

  Pure and jit-able with ``width``, ``max_width`` and ``degree`` static;
  ``vmap`` over keys and (stacked) fact sets.

  Args:
    key: PRNG key.
    factset: keys ``(N, d)``, values ``(P, d)``, mapping ``(N,)``.
    width: hidden width ``m >= 1`` (Python int).
    max_width: width the random features are drawn at (default ``width``);
      the result does not depend on it (units are drawn one by one), it only
      has to be ``>= width``.
    degree: Hermite degree ``k >= 1`` of the features (1 and 2 are useful;
      see the module docstring).

  Returns:
    :class:`GatedMLP` with ``w_gate, w_up (d, width)``, ``w_down (width,
    d)``, ``activation='relu'``, no biases.
  """
  check_factset_shapes(factset)
  check_widths(width, max_width, masked=False)
  _check_degree(degree)
  return _ntk(key, factset, width, width, degree)


def ntk_mlp_masked(key: Array, factset: FactSet, width: Array | int, *,
                   max_width: int, degree: int = 1) -> GatedMLP:
  """:func:`ntk_mlp` padded to ``max_width``; ``width`` may be traced.

  Units ``>= width`` have zero up and down weights, so they contribute
  exactly zero and the outputs equal ``ntk_mlp(key, factset, width)``'s up to
  float rounding. A traced ``width`` is clipped to ``[1, max_width]``
  (a concrete one is validated).

  Returns:
    :class:`GatedMLP` of hidden width ``max_width``.
  """
  check_factset_shapes(factset)
  check_widths(width, max_width, masked=True)
  _check_degree(degree)
  return _ntk(key, factset, clip_width(width, max_width), max_width, degree)


def ntk_num_params(dim: int, width: int) -> int:
  """Parameters of :func:`ntk_mlp`'s output: ``w_gate, w_up, w_down`` = 3dm."""
  if dim < 1 or width < 1:
    raise FactStoreError(
        f'dim and width must be >= 1, got dim = {dim}, width = {width}')
  return 3 * dim * width
