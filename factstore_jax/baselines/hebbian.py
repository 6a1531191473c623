"""Hebbian / bilinear random-feature baselines (docs/design.md, "Baselines").

Features ``phi(x) = (A_0 x) * (A_1 x) / sqrt(m)`` with ``A_0, A_1 (m, d)``
and a linear readout ``g(x) = W phi(x)``, ``W (d, m)``. Targets are
``Y = V[f] (N, d)`` and ``Phi (N, m)`` stacks the features of the keys.

Readouts (``readout=``):

* ``'hebbian'`` -- raw Hebbian sum ``W = sum_i v_f(i) phi(k_i)^T / N``
  (= ``Y^T Phi / N``), random Gaussian ``A_0, A_1``.
* ``'ridge'`` -- ridge regression ``W = Y^T Phi (Phi^T Phi + lam I)^{-1}``
  (primal, an ``m x m`` solve) or, equivalently,
  ``W = Y^T (Phi Phi^T + lam I)^{-1} Phi`` (dual, ``N x N``), random
  Gaussian ``A_0, A_1``. Both use the same
  ``lam = ridge * ||Phi||_F^2 / m`` (``ridge`` times the mean diagonal entry
  of ``Phi^T Phi``), so they give the same ``W``; ``solver='auto'`` picks the
  dual when ``m > N``. ``ridge = 0`` is plain least squares (interpolation
  when ``m >= N``) and needs the chosen Gram to be nonsingular.
* ``'data_dependent'`` -- ``A_0, A_1`` fitted to the score matrix in closed
  form (:func:`fit_bilinear_features`), then the ridge readout.

Random ``A_0, A_1`` have i.i.d. ``N(0, 1)`` entries; row ``r`` depends only
on ``(key, r)``, so widths are nested: the width-``m`` features are the first
``m`` of any wider draw, whatever ``max_width`` is (the readout of course is
re-solved per width).

As a :class:`~factstore_jax.mlp.GatedMLP`: ``w_gate = A_1^T / sqrt(m)``
(``activation='identity'``), ``w_up = A_0^T``, ``w_down = W^T``; ``3 d m``
parameters, no biases.

Two entry points: :func:`hebbian_mlp` (static ``width``) and
:func:`hebbian_mlp_masked` (``width`` may be traced: hidden width
``max_width``, units ``>= width`` exactly zero, outputs equal to the sliced
MLP's up to float rounding), so a capacity search can ``vmap`` over widths.

On a CPU, run jitted ridge / data-dependent calls inside
:func:`factstore_jax.threads.single_threaded_blas` (and block on the result
inside it) if several LAPACK-heavy programs run at once.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from factstore_jax import precision
from factstore_jax.baselines.ntk import (check_factset_shapes,
                                             check_widths, clip_width,
                                             unit_mask, unit_normal)
from factstore_jax.errors import FactStoreError
from factstore_jax.factsets import FactSet
from factstore_jax.mlp import GatedMLP

Array = jax.Array

READOUTS = ('hebbian', 'ridge', 'data_dependent')
SOLVERS = ('auto', 'primal', 'dual')
_mm = precision.matmul


class BilinearFeatures(NamedTuple):
  """The two factor matrices of ``phi(x) = (A_0 x) * (A_1 x) / sqrt(m)``."""
  a0: Array  # (m, d)
  a1: Array  # (m, d)


def random_features(key: Array, dim: int, max_width: int,
                    dtype: Any = jnp.float32) -> BilinearFeatures:
  """Gaussian ``A_0, A_1 (max_width, d)``; row ``r`` depends on ``(key, r)``."""
  k0, k1 = jax.random.split(key)
  return BilinearFeatures(unit_normal(k0, max_width, dim, dtype),
                          unit_normal(k1, max_width, dim, dtype))


def features(feats: BilinearFeatures, x: Array, width: Array | int) -> Array:
  """``phi(x) = (A_0 x) * (A_1 x) / sqrt(width)``: ``x (N, d) -> (N, m)``."""
  scale = jax.lax.rsqrt(jnp.asarray(width, x.dtype))
  return _mm(x, feats.a0.T) * _mm(x, feats.a1.T) * scale


# ----------------------------------------------------------------------------
# Data-dependent features.
# ----------------------------------------------------------------------------


def _weighted_lstsq(keys: Array, weights: Array, targets: Array,
                    reg: float) -> Array:
  """Per unit ``r``: ``argmin_a sum_i (w_ir (k_i . a) - t_ir)^2 + lam_r |a|^2``.

  Args:
    keys: ``(N, d)``.
    weights: ``(N, m)`` multipliers ``w_ir``.
    targets: ``(N, m)`` targets ``t_ir``.
    reg: relative ridge; ``lam_r = reg * trace(M_r) / d`` with
      ``M_r = K^T diag(w_r^2) K``.

  Returns:
    ``(m, d)``: row ``r`` solves ``(M_r + lam_r I) a = K^T (w_r * t_r)``.
  """
  dim = keys.shape[1]
  eye = jnp.eye(dim, dtype=keys.dtype)

  def one(args):
    w, t = args                                       # (N,), (N,)
    kw = keys * w[:, None]
    gram = _mm(kw.T, kw)
    lam = reg * jnp.trace(gram) / dim + jnp.finfo(keys.dtype).tiny
    return jnp.linalg.solve(gram + lam * eye, _mm(kw.T, t))

  # lax.map over units keeps memory at O(batch * d^2), not O(m * d^2).
  return jax.lax.map(one, (weights.T, targets.T), batch_size=64)


def fit_bilinear_features(key: Array, keys: Array, targets: Array,
                          max_width: int, *,
                          reg: float = 1e-3) -> BilinearFeatures:
  """Data-dependent ``A_0, A_1`` by two closed-form least-squares passes.

  Each unit ``r`` gets a random unit *score direction* ``u_r (d,)`` and is
  fitted so that its bilinear feature ``(a0_r . k_i)(a1_r . k_i)`` predicts
  the score of key ``i``'s target along ``u_r``, ``s_ir = <y_i, u_r>``: the
  score matrix ``S = Y U^T (N, m)``, a random projection of the target scores
  ``Y V^T`` onto ``m`` directions. Exactly:

  1. Draw ``u_r`` (unit) and a provisional Gaussian ``b_r (d,)``.
  2. ``A_0``: ``a0_r = argmin_a sum_i ((b_r . k_i)(a . k_i) - s_ir)^2
     + lam |a|^2`` -- a ``d x d`` weighted least-squares solve per unit.
  3. ``A_1``: ``a1_r = argmin_a sum_i ((a0_r . k_i)(a . k_i) - s_ir)^2
     + lam |a|^2`` with the ``a0_r`` of step 2.
  4. Both rows are rescaled to the geometric mean of their norms (the
     product, hence every feature, is unchanged; this only balances the
     gate and up weights).

  ``lam = reg * trace(M) / d`` for each ``d x d`` normal matrix ``M``. Units
  are independent, so widths stay nested (row ``r`` depends on
  ``(key, r)`` and the data only). Cost ``O(m N d^2)``.

  Args:
    key: PRNG key.
    keys: ``(N, d)``.
    targets: ``(N, d)`` targets ``Y = V[f]``.
    max_width: number of units (static).
    reg: relative ridge of the per-unit solves (> 0 keeps them well posed).

  Returns:
    :class:`BilinearFeatures` with ``a0, a1 (max_width, d)``.
  """
  dim, dtype = keys.shape[1], keys.dtype
  k_dir, k_init = jax.random.split(key)
  dirs = unit_normal(k_dir, max_width, dim, dtype)
  dirs = dirs / jnp.linalg.norm(dirs, axis=1, keepdims=True)
  scores = _mm(targets, dirs.T)                             # (N, m)
  init = unit_normal(k_init, max_width, dim, dtype)
  a0 = _weighted_lstsq(keys, _mm(keys, init.T), scores, reg)
  a1 = _weighted_lstsq(keys, _mm(keys, a0.T), scores, reg)
  n0 = jnp.linalg.norm(a0, axis=1, keepdims=True)
  n1 = jnp.linalg.norm(a1, axis=1, keepdims=True)
  tiny = jnp.finfo(dtype).tiny
  g = jnp.sqrt(n0 * n1)
  return BilinearFeatures(a0 * g / jnp.maximum(n0, tiny),
                          a1 * g / jnp.maximum(n1, tiny))


# ----------------------------------------------------------------------------
# Readouts.
# ----------------------------------------------------------------------------


def hebbian_readout(phi: Array, targets: Array) -> Array:
  """Raw Hebbian ``W = Y^T Phi / N``: ``phi (N, m)``, ``targets (N, d)`` ->
  ``(d, m)``."""
  return _mm(targets.T, phi) / phi.shape[0]


def ridge_readout(phi: Array, targets: Array, *, ridge: float,
                  width: Array | int, mask: Array | None = None,
                  solver: str = 'auto') -> Array:
  """Ridge readout ``W (d, m)`` from ``phi (N, m)`` and ``targets (N, d)``.

  ``lam = ridge * ||Phi||_F^2 / width`` in both forms:

  * primal: ``W = Y^T Phi (Phi^T Phi + lam I)^{-1}`` (``m x m``);
  * dual:   ``W = Y^T (Phi Phi^T + lam I)^{-1} Phi`` (``N x N``).

  Args:
    phi: ``(N, m)`` features; masked columns must be zero.
    targets: ``(N, d)``.
    ridge: relative ridge ``>= 0``.
    width: the active width (may be traced); sets ``lam``.
    mask: optional ``(m,)`` 0/1 active-unit mask. In the primal Gram the
      masked rows/columns get 1 on the diagonal (and are zero elsewhere), so
      they decouple and their readout columns are exactly zero.
    solver: ``'auto'`` (dual iff ``m > N``, ``m`` the static column count),
      ``'primal'`` or ``'dual'``.

  Returns:
    ``(d, m)``; masked columns are zero.
  """
  n, m = phi.shape
  dtype = phi.dtype
  lam = ridge * jnp.sum(phi * phi) / jnp.asarray(width, dtype)
  if solver == 'auto':
    solver = 'dual' if m > n else 'primal'
  if solver == 'dual':
    gram = _mm(phi, phi.T) + lam * jnp.eye(n, dtype=dtype)
    # W^T = Phi^T (Phi Phi^T + lam I)^{-1} Y.
    return _mm(phi.T, _solve_sym(gram, targets)).T
  diag = lam if mask is None else lam * mask + (1 - mask)
  gram = _mm(phi.T, phi) + jnp.diag(jnp.broadcast_to(diag, (m,)))
  # W^T = (Phi^T Phi + lam I)^{-1} Phi^T Y.
  return _solve_sym(gram, _mm(phi.T, targets)).T


def _solve_sym(a: Array, b: Array) -> Array:
  """Solves ``a x = b`` for a symmetric positive (semi)definite ``a``."""
  # Symmetrise against matmul rounding; LU (jnp.linalg.solve) is more
  # forgiving than Cholesky when lam is tiny and a is nearly singular.
  return jnp.linalg.solve(0.5 * (a + a.T), b)


# ----------------------------------------------------------------------------
# Entry points.
# ----------------------------------------------------------------------------


def _check_options(readout: Any, ridge: Any, solver: Any, fit_reg: Any) -> None:
  if readout not in READOUTS:
    raise FactStoreError(
        f'unknown readout {readout!r}; expected one of {READOUTS}')
  if solver not in SOLVERS:
    raise FactStoreError(
        f'unknown solver {solver!r}; expected one of {SOLVERS}')
  if isinstance(ridge, jax.core.Tracer):
    raise FactStoreError('ridge must be a concrete float, not traced')
  if not ridge >= 0:  # also rejects NaN
    raise FactStoreError(f'ridge must be >= 0, got {ridge}')
  if not fit_reg > 0:
    raise FactStoreError(f'fit_reg must be > 0, got {fit_reg}')


def _hebbian(key: Array, factset: FactSet, width: Array | int,
             max_width: int, readout: str, ridge: float, solver: str,
             fit_reg: float) -> GatedMLP:
  keys, values, mapping = factset
  dtype = keys.dtype
  targets = values[mapping]
  if readout == 'data_dependent':
    feats = fit_bilinear_features(key, keys, targets, max_width, reg=fit_reg)
  else:
    feats = random_features(key, keys.shape[1], max_width, dtype)
  mask = unit_mask(width, max_width, dtype)
  phi = features(feats, keys, width) * mask[None, :]
  if readout == 'hebbian':
    w = hebbian_readout(phi, targets)
  else:
    w = ridge_readout(phi, targets, ridge=ridge, width=width, mask=mask,
                      solver=solver)
  scale = jax.lax.rsqrt(jnp.asarray(width, dtype))
  return GatedMLP(w_gate=feats.a1.T * scale, w_up=feats.a0.T * mask[None, :],
                  w_down=w.T * mask[:, None], activation='identity')


def hebbian_mlp(key: Array, factset: FactSet, width: int, *,
                max_width: int | None = None, readout: str = 'ridge',
                ridge: float = 1e-3, solver: str = 'auto',
                fit_reg: float = 1e-3) -> GatedMLP:
  """Bilinear random-feature MLP of hidden width ``width``.

  Pure and jit-able with every argument but ``key`` and ``factset`` static;
  ``vmap`` over keys and (stacked) fact sets.

  Args:
    key: PRNG key.
    factset: keys ``(N, d)``, values ``(P, d)``, mapping ``(N,)``.
    width: hidden width ``m >= 1`` (Python int).
    max_width: width the random features are drawn at (default ``width``);
      the result does not depend on it, it only has to be ``>= width``.
    readout: ``'hebbian'``, ``'ridge'`` or ``'data_dependent'`` (see the
      module docstring).
    ridge: relative ridge ``>= 0``, ``lam = ridge * ||Phi||_F^2 / m``
      (ignored by ``'hebbian'``).
    solver: ``'auto'`` (dual iff ``m > N``), ``'primal'`` or ``'dual'``.
    fit_reg: relative ridge of the per-unit feature fits of
      ``'data_dependent'`` (:func:`fit_bilinear_features`).

  Returns:
    :class:`GatedMLP` with ``w_gate = A_1^T / sqrt(m)``, ``w_up = A_0^T``
    ``(d, m)``, ``w_down = W^T (m, d)``, ``activation='identity'``.
  """
  check_factset_shapes(factset)
  check_widths(width, max_width, masked=False)
  _check_options(readout, ridge, solver, fit_reg)
  # Features of units >= width are never used: draw exactly `width`.
  return _hebbian(key, factset, width, width, readout, ridge, solver, fit_reg)


def hebbian_mlp_masked(key: Array, factset: FactSet, width: Array | int, *,
                       max_width: int, readout: str = 'ridge',
                       ridge: float = 1e-3, solver: str = 'auto',
                       fit_reg: float = 1e-3) -> GatedMLP:
  """:func:`hebbian_mlp` padded to ``max_width``; ``width`` may be traced.

  Units ``>= width`` have zero up and down weights (and are decoupled from
  the ridge solve), so outputs equal ``hebbian_mlp(key, factset, width)``'s
  up to float rounding. ``solver='auto'`` decides primal/dual from
  ``max_width`` (static), not from ``width``; with ``ridge = 0`` pick the
  solver whose Gram is nonsingular for every width you pass. A traced
  ``width`` is clipped to ``[1, max_width]`` (a concrete one is validated).

  Returns:
    :class:`GatedMLP` of hidden width ``max_width``.
  """
  check_factset_shapes(factset)
  check_widths(width, max_width, masked=True)
  _check_options(readout, ridge, solver, fit_reg)
  return _hebbian(key, factset, clip_width(width, max_width), max_width,
                  readout, ridge, solver, fit_reg)


def hebbian_num_params(dim: int, width: int) -> int:
  """Parameters of :func:`hebbian_mlp`'s output: ``w_gate, w_up, w_down``
  = ``3 d m`` (the ``1/sqrt(m)`` is folded into ``w_gate``)."""
  if dim < 1 or width < 1:
    raise FactStoreError(
        f'dim and width must be >= 1, got dim = {dim}, width = {width}')
  return 3 * dim * width
