"""Robustness instruments of a fact MLP: can attention use it.

See docs/design.md, "Transformers and usability".

A Transformer's attention delivers a noisy key ``norm(h_Q) ≈ k`` to the fact
MLP. Whether the MLP still recalls the fact depends on how far the delivered
vector may stray from the key (the *robustness radius*), how fast the MLP's
output moves with its input (*Lipschitz* estimates) and how far attention
actually strays (the *noise floor*). This module measures all four:

* :func:`robustness_radius` — per key, the largest perturbation radius along
  sampled directions at which decoding stays correct (batched bisection).
* :func:`lipschitz_bound` — a weight-norm upper bound of the Lipschitz constant
  of a gated MLP on the ball ``||x|| <= R``.
* :func:`jacobian_norm` — the empirical local Jacobian spectral norm at given
  points (power iteration with ``jvp``/``vjp``).
* :func:`noise_floor` — ``max / mean / p95`` of ``||inputs - targets||``.

Every function that takes an MLP takes it as a callable
``fn: (..., d) -> (..., d)`` (``lambda x: params(x)``, an
:class:`~factstore_jax.mlp.EncoderDecoder`, ...),
uses explicit PRNG keys and is ``jit``-able with ``fn`` closed over, e.g.
``jax.jit(lambda key, fs: robustness_radius(fn, key, fs))``. Each
call runs one compiled program; a callable that is a pytree of arrays (an
``EncoderDecoder``, an NNX module) enters it as traced arguments, so models of
the same shapes share one compilation, while any other callable (a lambda
over params) is a static argument whose arrays compile in as constants.
Bad input raises :class:`~factstore_jax.errors.FactStoreError` before any
computation; value checks (finite entries, mapping range) run only on concrete
arrays, shape checks always.

Decoding follows :mod:`factstore_jax.storage`: an output ``y`` decodes key ``i``
correctly iff its margin ``<y, v_f(i)> - max_{j != f(i)} <y, v_j>`` is strictly
positive (ties count as wrong).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from factstore_jax import mlp as mlp_lib
from factstore_jax import storage
from factstore_jax import validation
from factstore_jax.errors import FactStoreError
from factstore_jax.factsets import FactSet

Array = jax.Array
MLPFn = Callable[[Array], Array]

# Upper bounds of silu: sup_z silu'(z) = 1.09984 (at z ≈ 2.40), and
# min_z silu(z) = -0.27846 (at z ≈ -1.28); inf silu' = -0.0998.
_SILU_MAX_SLOPE = 1.1
_SILU_MAX_NEG = 0.2785


# --------------------------------------------------------------------------
# Host-side validation (shapes always; values only when concrete).


def _check_fn(fn: Any, in_shape: tuple[int, ...], dtype,
              out_shape: tuple[int, ...] | None) -> tuple[int, ...]:
  """Checks ``fn`` is callable and maps ``in_shape`` to ``out_shape``."""
  if not callable(fn):
    raise FactStoreError(f'fn must be callable, got {type(fn).__name__}')
  try:
    out = jax.eval_shape(fn, jax.ShapeDtypeStruct(in_shape, dtype))
  except (TypeError, ValueError) as e:
    raise FactStoreError(
        f'fn failed on an input of shape {in_shape}: {e}') from e
  shape = getattr(out, 'shape', None)
  if shape is None:
    raise FactStoreError(
        f'fn must return one array, got {type(out).__name__} for an input of '
        f'shape {in_shape}')
  ok = len(shape) == 1 if out_shape is None else tuple(shape) == out_shape
  if not ok:
    want = '(d_out,)' if out_shape is None else str(out_shape)
    raise FactStoreError(
        f'fn must map an input of shape {in_shape} to shape {want}, got '
        f'{tuple(shape)}')
  return tuple(shape)


# --------------------------------------------------------------------------
# Passing ``fn`` into jit.


class _ByIdentity:
  """Hashable-by-identity wrapper for an unhashable callable."""

  def __init__(self, fn: MLPFn):
    self.fn = fn

  def __call__(self, x: Array) -> Array:
    return self.fn(x)


def _split_fn(fn: MLPFn) -> tuple[Any, tuple[Array, ...] | None]:
  """``(static, leaves)``: how ``fn`` crosses a ``jit`` boundary.

  A pytree of arrays (``EncoderDecoder``, an NNX module) travels as its
  treedef (static) and array leaves (traced), so one compiled program serves
  every model of the same shapes. Any other callable is static; arrays it
  closes over become constants of the compiled program, and it is compiled
  again for every new callable object.
  """
  leaves, treedef = jax.tree.flatten(fn)
  if leaves and all(isinstance(leaf, (jax.Array, np.ndarray))
                    for leaf in leaves):
    try:
      hash(treedef)
      return treedef, tuple(leaves)
    except TypeError:
      pass
  try:
    hash(fn)
  except TypeError:
    fn = _ByIdentity(fn)
  return fn, None


def _join_fn(static: Any, leaves: tuple[Array, ...] | None) -> MLPFn:
  return static if leaves is None else jax.tree.unflatten(static, leaves)


def _chunked_vmap(f: Callable, xs: Any, num: int, chunk_size: int) -> Array:
  """``vmap(f)`` over the ``num`` rows of ``xs``, ``chunk_size`` at a time.

  The last chunk is padded (with repeats of the last row) rather than
  compiled separately; padded results are dropped.
  """
  if num <= chunk_size:
    return jax.vmap(f)(xs)
  num_chunks = -(-num // chunk_size)
  idx = jnp.minimum(jnp.arange(num_chunks * chunk_size), num - 1)
  chunks = jax.tree.map(
      lambda a: a[idx].reshape((num_chunks, chunk_size) + a.shape[1:]), xs)
  out = jax.lax.map(jax.vmap(f), chunks)
  return out.reshape((num_chunks * chunk_size,) + out.shape[2:])[:num]


# --------------------------------------------------------------------------
# Robustness radius.


def _unit(v: Array) -> Array:
  """Rows of ``v (..., d)`` scaled to unit norm (zero rows stay zero)."""
  norm = jnp.linalg.norm(v, axis=-1, keepdims=True)
  return v / jnp.maximum(norm, jnp.finfo(v.dtype).tiny)


def _directions(key: Array, num_directions: int, dim: int, dtype) -> Array:
  """``num_directions`` uniform unit directions ``(D, d)`` for one key."""
  # Drawn flat: XLA:CPU compiles threefry over a 2-D shape ~5x slower.
  flat = jax.random.normal(key, (num_directions * dim,), dtype)
  return _unit(flat.reshape(num_directions, dim))


def sample_directions(key: Array, num_keys: int, num_directions: int, dim: int,
                      dtype=jnp.float32) -> Array:
  """The unit directions :func:`robustness_radius` probes, ``(N, D, d)``.

  Key ``i`` uses ``jax.random.split(key, N)[i]``, so the directions do not
  depend on ``chunk_size``.
  """
  num_keys = validation.check_int(num_keys, 'num_keys', 1)
  num_directions = validation.check_int(num_directions, 'num_directions', 1)
  dim = validation.check_int(dim, 'dim', 1)
  subkeys = jax.random.split(key, num_keys)
  return jax.vmap(lambda k: _directions(k, num_directions, dim, dtype))(subkeys)


def _key_radius(fn: MLPFn, values: Array, max_radius: Array, iters: int,
                num_directions: int, key_vec: Array, target: Array,
                subkey: Array) -> Array:
  """Robustness radius of one key ``(d,)`` with value index ``target ()``."""
  u = _directions(subkey, num_directions, key_vec.shape[-1], key_vec.dtype)
  targets = jnp.broadcast_to(target, (num_directions,))

  def correct(r):  # (D,) radii -> (D,) bool
    out = fn(key_vec[None, :] + r[:, None] * u)
    return storage.margins(out, values, targets) > 0

  ok_at_0 = storage.margins(fn(key_vec[None, :]), values, target[None])[0] > 0
  hi = jnp.full((num_directions,), max_radius, key_vec.dtype)
  ok_at_max = correct(hi)

  def bisect(_, bracket):  # invariant: correct at lo, wrong at hi
    lo, hi = bracket
    mid = 0.5 * (lo + hi)
    ok = correct(mid)
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo, _ = jax.lax.fori_loop(0, iters, bisect, (jnp.zeros_like(hi), hi))
  per_direction = jnp.where(ok_at_max, hi, lo)
  return jnp.where(ok_at_0, jnp.min(per_direction), 0.0).astype(key_vec.dtype)


def robustness_radius(fn: MLPFn, key: Array, factset: FactSet, *,
                      num_directions: int = 16,
                      max_radius: float = 1.0, iters: int = 20,
                      chunk_size: int = 256) -> Array:
  """Per-key robustness radius of an MLP along random directions.

  For key ``i`` and ``D = num_directions`` random unit directions ``u``
  (uniform on the sphere, see :func:`sample_directions`), the radius along
  ``u`` is the largest ``r in [0, max_radius]`` with ``fn(k_i + r u)`` still
  decoding to ``f(i)`` (strictly positive margin). It is found by bisection,
  all keys and directions at once: ``iters`` halvings of ``[0, max_radius]``
  (a ``lax.fori_loop``), keeping the endpoint where decoding is correct, so
  the error is at most ``max_radius / 2**iters`` below the boundary found.
  The key's radius is the min over its directions; a key already wrong at
  ``r = 0`` gets 0 and a direction still correct at ``max_radius`` counts as
  ``max_radius``.

  Bisection assumes the correctly-decoded set is star-shaped around ``k_i``
  along each direction (correct on ``[0, r*)``, wrong beyond). If it is not,
  the result is *a* boundary found by bisection, not necessarily the first
  one, and can overestimate the radius along that direction. Likewise the min
  over finitely many sampled directions is at least the radius over all
  directions (it approaches it as ``num_directions`` grows).

  Keys are processed ``chunk_size`` at a time: memory is
  ``O(chunk_size * D * (d + P))`` plus ``fn``'s activations on
  ``chunk_size * D`` points.

  Args:
    fn: the MLP, ``(..., d) -> (..., d)`` (how it enters jit: module doc).
    key: PRNG key for the directions.
    factset: :class:`~factstore_jax.factsets.FactSet`: keys ``(N, d)``,
      values ``(P, d)``, mapping ``(N,)`` int in ``[0, P)``.
    num_directions: ``D >= 1`` directions per key (static).
    max_radius: ``> 0``, the largest radius probed.
    iters: ``>= 1`` bisection steps (static).
    chunk_size: ``>= 1`` keys per batch (static).

  Returns:
    ``(N,)`` radii in ``[0, max_radius]``, dtype of ``keys``.

  Raises:
    FactStoreError: bad shapes, non-finite keys or values, mapping out of
      range or not integer, ``num_directions < 1``, ``max_radius <= 0``,
      ``iters < 1``, ``chunk_size < 1``, or ``fn`` not mapping ``(D, d)`` to
      ``(D, d)``.
  """
  keys, values, mapping = factset
  keys = validation.real_array(keys, 'keys', to_float=True)
  values = validation.real_array(values, 'values', to_float=True)
  validation.check_ndim(keys, 2, 'keys', 'N, d')
  validation.check_ndim(values, 2, 'values', 'P, d')
  validation.check_nonempty(keys, 'keys')
  validation.check_nonempty(values, 'values')
  num_keys, dim = keys.shape
  if values.shape[1] != dim:
    raise FactStoreError(
        f'keys have dimension d = {dim} but values have dimension '
        f'{values.shape[1]}')
  mapping = validation.mapping_array(mapping, num_keys, values.shape[0])
  validation.check_finite(keys, 'keys')
  validation.check_finite(values, 'values')
  num_directions = validation.check_int(num_directions, 'num_directions', 1)
  iters = validation.check_int(iters, 'iters', 1)
  chunk_size = validation.check_int(chunk_size, 'chunk_size', 1)
  validation.check_scalar(max_radius, 'max_radius', minimum=0, strict=True)
  _check_fn(fn, (num_directions, dim), keys.dtype, (num_directions, dim))

  fn_static, fn_leaves = _split_fn(fn)
  return _robustness_radius(fn_static, fn_leaves, keys, values, mapping, key,
                            max_radius, num_directions=num_directions,
                            iters=iters, chunk_size=min(chunk_size, num_keys))


@functools.partial(jax.jit, static_argnames=('fn_static', 'num_directions',
                                             'iters', 'chunk_size'))
def _robustness_radius(fn_static, fn_leaves, keys, values, mapping, key,
                       max_radius, *, num_directions, iters, chunk_size):
  fn = _join_fn(fn_static, fn_leaves)
  max_radius = jnp.asarray(max_radius, keys.dtype)
  subkeys = jax.random.split(key, keys.shape[0])

  def one(args):
    k, f, sk = args
    return _key_radius(fn, values, max_radius, iters, num_directions, k, f, sk)

  return _chunked_vmap(one, (keys, mapping, subkeys), keys.shape[0],
                       chunk_size)


# --------------------------------------------------------------------------
# Lipschitz bound.


def _activation_bounds(activation: str, lo: Array, hi: Array):
  """Per-neuron ``(sup |act(z)|, sup |act'(z)|)`` over ``z in [lo, hi]``."""
  zero = jnp.zeros_like(hi)
  if activation == 'identity':
    return jnp.maximum(jnp.abs(lo), jnp.abs(hi)), jnp.ones_like(hi)
  if activation == 'relu':
    return jnp.maximum(hi, 0.0), jnp.where(hi > 0, 1.0, zero)
  if activation == 'clipped':
    # Slope 1 only where [lo, hi] meets (0, 1); constant 0 or 1 elsewhere.
    slope = jnp.where((hi > 0) & (lo < 1), 1.0, zero)
    return jnp.clip(hi, 0.0, 1.0), slope
  if activation == 'silu':
    # silu(z) <= z for z >= 0 and |silu(z)| <= 0.2785 for z < 0.
    neg = jnp.where(lo < 0, _SILU_MAX_NEG, zero)
    return jnp.maximum(jnp.maximum(hi, 0.0), neg), jnp.full_like(
        hi, _SILU_MAX_SLOPE)
  raise FactStoreError(
      f'lipschitz_bound has no bound for activation {activation!r}; expected '
      f'one of {sorted(mlp_lib.ACTIVATIONS)}')


def _check_gated_mlp(params: mlp_lib.GatedMLP) -> None:
  w_gate, w_up, w_down = params.w_gate, params.w_up, params.w_down
  for name, w in (('w_gate', w_gate), ('w_up', w_up), ('w_down', w_down)):
    validation.check_ndim(w, 2, name, 'd, h' if name != 'w_down' else 'h, d_out')
  if w_up.shape != w_gate.shape:
    raise FactStoreError(
        f'w_up has shape {w_up.shape} but w_gate has shape {w_gate.shape}')
  hidden = w_gate.shape[1]
  if w_down.shape[0] != hidden:
    raise FactStoreError(
        f'w_down has {w_down.shape[0]} rows but the hidden width is {hidden}')
  for name in ('b_gate', 'b_up'):
    b = getattr(params, name)
    if b is not None and tuple(b.shape) != (hidden,):
      raise FactStoreError(
          f'{name} must have shape ({hidden},), got {tuple(b.shape)}')
  mlp_lib.get_activation(params.activation)


def lipschitz_bound(params: mlp_lib.GatedMLP | mlp_lib.EncoderDecoder, *,
                    radius: float = 1.0) -> Array:
  """Weight-norm upper bound of the Lipschitz constant on ``||x|| <= radius``.

  A gated MLP ``g(x) = [(x W_up + b_up) * act(x W_gate + b_gate)] W_down
  + b_down`` is a product of two affine maps, so it is not globally Lipschitz;
  on the ball ``||x|| <= R`` it is. With ``z = x W_gate + b_gate`` and
  ``u = x W_up + b_up`` its Jacobian (column convention) is

    ``J(x) = W_down^T [diag(act(z)) W_up^T + diag(u * act'(z)) W_gate^T]``,

  and since ``||A diag(s) B||_2 <= ||A||_2 max|s| ||B||_2``,

    ``L(R) = ||W_down||_2 (||W_up||_2 max_j S_j + ||W_gate||_2 max_j U_j A_j)``

  bounds ``||J(x)||_2`` on the ball, hence (the ball is convex) bounds
  ``||g(x) - g(y)|| / ||x - y||`` for ``x, y`` in it. Per neuron ``j``, with
  column norms ``n^g_j = ||W_gate[:, j]||``, ``n^u_j = ||W_up[:, j]||``:
  ``z_j in [lo_j, hi_j] = [b_gate_j - R n^g_j, b_gate_j + R n^g_j]``,
  ``U_j = |b_up_j| + R n^u_j >= |u_j|``, and ``S_j >= sup |act(z_j)|``,
  ``A_j >= sup |act'(z_j)|`` over that interval:

  * ``identity``: ``S = max(|lo|, |hi|)``, ``A = 1``;
  * ``relu``: ``S = max(hi, 0)``, ``A = [hi > 0]``;
  * ``clipped`` (``min(max(z, 0), 1)``): ``S = clip(hi, 0, 1) <= 1``,
    ``A = [hi > 0 and lo < 1]``;
  * ``silu``: ``S = max(hi, 0, 0.2785 [lo < 0])``, ``A = 1.1``
    (``sup silu' = 1.0998``, ``min silu = -0.27846``).

  Spectral norms are exact (``jnp.linalg.norm(ord=2)``, an SVD). Keys of norm
  up to ``K`` perturbed by up to ``r`` need ``radius = K + r``.

  Args:
    params: a :class:`~factstore_jax.mlp.GatedMLP` or an
      :class:`~factstore_jax.mlp.EncoderDecoder`
      (bounded through its :meth:`as_mlp`).
    radius: ``R > 0``, radius of the ball around the origin.

  Returns:
    ``()`` the bound ``L(R)``.

  Raises:
    FactStoreError: ``params`` of another type or inconsistent shapes,
      ``radius <= 0``.
  """
  params = mlp_lib.as_gated(params)
  _check_gated_mlp(params)
  validation.check_scalar(radius, 'radius', minimum=0, strict=True)
  return _lipschitz_bound(params, radius)


@jax.jit
def _lipschitz_bound(params: mlp_lib.GatedMLP, radius: Array) -> Array:
  w_gate, w_up, w_down = params.w_gate, params.w_up, params.w_down
  zeros = jnp.zeros((w_gate.shape[1],), w_gate.dtype)
  b_gate = zeros if params.b_gate is None else params.b_gate
  b_up = zeros if params.b_up is None else params.b_up
  reach_gate = radius * jnp.linalg.norm(w_gate, axis=0)   # (h,)
  bound_up = jnp.abs(b_up) + radius * jnp.linalg.norm(w_up, axis=0)
  sup_act, sup_slope = _activation_bounds(
      params.activation, b_gate - reach_gate, b_gate + reach_gate)
  spec = lambda w: jnp.linalg.norm(w, ord=2)
  return spec(w_down) * (spec(w_up) * jnp.max(sup_act) +
                         spec(w_gate) * jnp.max(bound_up * sup_slope))


# --------------------------------------------------------------------------
# Empirical Jacobian norm.


def jacobian_norm(fn: MLPFn, key: Array, x: Array, *, iters: int = 30,
                  chunk_size: int = 1024) -> Array:
  """Local Jacobian spectral norm ``||J_fn(x_i)||_2`` at each point.

  Power iteration ``v <- J^T J v / ||J^T J v||`` from a random unit ``v``,
  with ``J v`` by forward mode (``jax.linearize``, i.e. ``jvp``) and
  ``J^T w`` by reverse mode (``jax.vjp``); the estimate is ``||J v||``,
  which never exceeds the true norm and converges to it at the rate
  ``(s_2 / s_1)^(2 iters)`` (ratio of the two largest singular values). A
  zero Jacobian gives 0. Points are vmapped, ``chunk_size`` at a time.

  Args:
    fn: the MLP, ``(..., d) -> (..., d_out)`` (how it enters jit: module
      doc).
    key: PRNG key for the start vectors (row ``i`` of
      ``jax.random.normal(key, (N * d,)).reshape(N, d)``).
    x: ``(N, d)`` points (e.g. the keys).
    iters: ``>= 1`` power iterations (static).
    chunk_size: ``>= 1`` points per batch (static).

  Returns:
    ``(N,)`` Jacobian norms, dtype of ``x``.

  Raises:
    FactStoreError: ``x`` not ``(N, d)`` or non-finite, ``iters < 1``,
      ``chunk_size < 1``, ``fn`` not mapping ``(d,)`` to a vector.
  """
  x = validation.real_array(x, 'x', to_float=True)
  validation.check_ndim(x, 2, 'x', 'N, d')
  validation.check_nonempty(x, 'x')
  validation.check_finite(x, 'x')
  iters = validation.check_int(iters, 'iters', 1)
  chunk_size = validation.check_int(chunk_size, 'chunk_size', 1)
  _check_fn(fn, (x.shape[1],), x.dtype, None)
  fn_static, fn_leaves = _split_fn(fn)
  return _jacobian_norm(fn_static, fn_leaves, x, key, iters=iters,
                        chunk_size=min(chunk_size, x.shape[0]))


@functools.partial(jax.jit, static_argnames=('fn_static', 'iters',
                                             'chunk_size'))
def _jacobian_norm(fn_static, fn_leaves, x, key, *, iters, chunk_size):
  fn = _join_fn(fn_static, fn_leaves)
  # Start vectors drawn flat, all at once (the size of x): cheap to compile.
  starts = jax.random.normal(key, (x.size,), x.dtype).reshape(x.shape)

  def one(args):
    point, v = args
    _, jvp_fn = jax.linearize(fn, point)
    _, vjp_fn = jax.vjp(fn, point)

    def power_step(_, v):
      (z,) = vjp_fn(jvp_fn(v))
      norm = jnp.linalg.norm(z)
      return jnp.where(norm > 0, z / jnp.where(norm > 0, norm, 1.0), v)

    v = jax.lax.fori_loop(0, iters, power_step, _unit(v))
    return jnp.linalg.norm(jvp_fn(v)).astype(point.dtype)

  return _chunked_vmap(one, (x, starts), x.shape[0], chunk_size)


# --------------------------------------------------------------------------
# Attention noise floor.


class NoiseFloor(NamedTuple):
  max: Array        # () max_i ||inputs_i - targets_i||
  mean: Array       # () mean distance
  p95: Array        # () 95th percentile (linear interpolation)
  distances: Array  # (M,) per-row distances


def noise_floor(inputs: Array, targets: Array) -> NoiseFloor:
  """Distance statistics of delivered vectors from the true keys.

  The attention noise floor: ``inputs`` are what attention delivers to the
  MLP (already normalised by the caller, e.g. ``norm(h_Q)``), ``targets``
  the keys they should be.

  Args:
    inputs: ``(M, d)`` delivered vectors.
    targets: ``(M, d)`` true keys, row for row.

  Returns:
    :class:`NoiseFloor` of ``||inputs_i - targets_i||``.

  Raises:
    FactStoreError: shapes not ``(M, d)``, different, or empty.
  """
  inputs = validation.real_array(inputs, 'inputs', to_float=True)
  targets = validation.real_array(targets, 'targets', to_float=True)
  validation.check_ndim(inputs, 2, 'inputs', 'M, d')
  validation.check_ndim(targets, 2, 'targets', 'M, d')
  if inputs.shape != targets.shape:
    raise FactStoreError(
        f'inputs have shape {inputs.shape} but targets have shape '
        f'{targets.shape}')
  validation.check_nonempty(inputs, 'inputs')
  dist = jnp.linalg.norm(inputs - targets, axis=-1)
  return NoiseFloor(max=jnp.max(dist), mean=jnp.mean(dist),
                    p95=jnp.percentile(dist, 95.0), distances=dist)
