"""Per-bucket window gadgets of the encoder (DESIGN §3).

Keys are projected on a random unit direction ``g`` and sorted; the sorted
order is cut into ``n`` consecutive buckets of at most ``b`` keys, each cut
placed at the widest gap near its nominal position. Bucket ``j`` gets a window
``T_j(t)`` of the projection ``t = <g, x>`` that is exactly 1 on its keys and
exactly 0 on every other key, and an exact minimum-norm linear map
``M_j (m, d)`` with ``M_j k_i = c_i`` on its keys. The encoder is
``E(x) = sum_j T_j(<g, x>) M_j x``.

Windows (``z = (t - a) / delta`` rises from 0 to 1 inside a gap; the ramp
occupies the middle ``1 - 2 * slack`` of the gap, so float rounding of ``t``
cannot move a key off a saturated value):

* ``clipped`` (default): ``T = clip(z_L, 0, 1) - clip(z_R, 0, 1)``, 2 neurons.
* ``relu``: ``T = relu(z_L) - relu(z_L - 1) - relu(z_R) + relu(z_R - 1)``,
  4 neurons; the cancellation of far-right keys loses about
  ``eps * |t - a| / delta`` per ramp in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

# Per activation: (neuron signs, shift of each neuron's pre-activation, which
# ramp it belongs to: 0 = left gap, 1 = right gap).
GADGETS = {
    'clipped': ((1.0, -1.0), (0.0, 0.0), (0, 1)),
    'relu': ((1.0, -1.0, -1.0, 1.0), (0.0, -1.0, 0.0, -1.0), (0, 0, 1, 1)),
}


class Buckets(NamedTuple):
  direction: Array   # (d,) unit projection direction g
  index: Array       # (n, b) key indices of each bucket (padded)
  valid: Array       # (n, b) bool, False on padding
  ramp_start: Array  # (n, 2) a: where the left / right ramp starts
  ramp_width: Array  # (n, 2) delta (> 0), 1 for the always-on/off ramps
  ramp_fixed: Array  # (n, 2) bool: left ramp of bucket 0 / right of last
  min_gap: Array     # () smallest gap used by a cut (0 means degenerate)


def num_buckets(num_keys: int, bucket_size: int) -> int:
  """Buckets used for ``num_keys`` keys at most ``bucket_size`` per bucket.

  Nominal bucket size is ``3/4`` of the maximum, leaving room to move each cut
  to the widest gap nearby.
  """
  if num_keys <= bucket_size:
    return 1
  stride = max(1, (3 * bucket_size) // 4)
  return -(-num_keys // stride)


def make_buckets(key: Array, keys: Array, bucket_size: int, *,
                 slack: float = 0.25) -> Buckets:
  """Buckets of ``keys (N, d)`` along a random direction (static N, b)."""
  n_keys, dim = keys.shape
  n = num_buckets(n_keys, bucket_size)
  direction = jax.random.normal(key, (dim,), keys.dtype)
  direction = direction / jnp.linalg.norm(direction)
  proj = keys @ direction
  order = jnp.argsort(proj)
  t = proj[order]
  if n > 1:
    nominal = jnp.round(jnp.arange(1, n) * (n_keys / n)).astype(jnp.int32)
    half = max(0, (bucket_size - -(-n_keys // n)) // 2)
    offsets = jnp.arange(-half, half + 1)
    window = jnp.clip(nominal[:, None] + offsets[None, :], 1, n_keys - 1)
    gaps = t[window] - t[window - 1]
    cuts = jnp.take_along_axis(window, jnp.argmax(gaps, 1)[:, None], 1)[:, 0]
  else:
    cuts = jnp.zeros((0,), jnp.int32)
  starts = jnp.concatenate([jnp.array([0]), cuts, jnp.array([n_keys])])
  pos = starts[:-1, None] + jnp.arange(bucket_size)[None, :]
  valid = pos < starts[1:, None]
  index = order[jnp.clip(pos, 0, n_keys - 1)]

  lo, hi = t[jnp.maximum(cuts - 1, 0)], t[cuts]
  gap = hi - lo
  a = lo + slack * gap
  width = (1.0 - 2.0 * slack) * gap
  # Left ramp of bucket j sits in cut j-1, right ramp in cut j.
  big = jnp.ones((1,), keys.dtype)
  ramp_start = jnp.stack([jnp.concatenate([-big, a]),
                          jnp.concatenate([a, big])], axis=1)
  ramp_width = jnp.stack([jnp.concatenate([big, width]),
                          jnp.concatenate([width, big])], axis=1)
  fixed = jnp.zeros((n, 2), bool).at[0, 0].set(True).at[n - 1, 1].set(True)
  ramp_width = jnp.where(fixed, 1.0, ramp_width)
  min_gap = jnp.min(gap) if n > 1 else jnp.array(jnp.inf, keys.dtype)
  return Buckets(direction, index, valid, ramp_start, ramp_width, fixed,
                 min_gap)


def solve_buckets(keys: Array, targets: Array, buckets: Buckets, *,
                  chunk_size: int | None = None) -> Array:
  """Exact minimum-norm maps: ``M_j k_i = targets_i`` for ``i`` in bucket j.

  ``keys (N, d)``, ``targets (N, m)`` -> ``M (n, m, d)``, one
  :func:`solve_bucket` per bucket (see :func:`solve_indexed`).
  """
  return solve_indexed(keys, targets, buckets.index, buckets.valid,
                       chunk_size=chunk_size)


def solve_indexed(keys: Array, targets: Array, index: Array, valid: Array, *,
                  chunk_size: int | None = None) -> Array:
  """:func:`solve_bucket` for buckets given as ``index (n, b)``, ``valid (n, b)``.

  Returns ``M (n, m, d)``. On CPU the buckets are solved one after another
  (``lax.map``): XLA's CPU batched matmuls run these small products at
  half the speed of single ones, and only one LAPACK call is then ever
  runnable (jaxlib's batched LAPACK kernels can deadlock on a 2-thread CPU
  pool when two run concurrently). Elsewhere they are vmapped. With
  ``chunk_size`` they are solved ``chunk_size`` at a time (``lax.map``
  over vmapped chunks), so the gathered keys take ``O(chunk_size b d)``
  memory instead of ``O(n b d)``. Each bucket's solve is the same program
  in every case, so the maps do not depend on the schedule.
  """
  def one(args):
    i, v = args
    return solve_bucket(keys[i], targets[i], v)
  if chunk_size is not None and chunk_size < index.shape[0]:
    return jax.lax.map(one, (index, valid), batch_size=chunk_size)
  return map_buckets(one, (index, valid))


def map_buckets(fn, xs):
  """``fn`` over the leading axis of ``xs``: ``lax.map`` on CPU, else vmap."""
  return jax.lax.platform_dependent(
      xs, cpu=lambda a: jax.lax.map(fn, a), default=jax.vmap(fn))


def solve_bucket(keys: Array, targets: Array, valid: Array) -> Array:
  """One bucket's map: ``keys (b, d)``, ``targets (b, m)``, ``valid (b,)``
  -> ``M (m, d)`` with ``M k_i = c_i`` on the valid rows, of minimum norm.

  ``M = alpha^T K`` with ``(K K^T) alpha = C``: a Cholesky factor of the
  Gram matrix (padding rows get a unit diagonal, so they never perturb the
  real keys), one solve, then one step of iterative refinement with the
  residual ``C - K M^T`` formed from ``K`` itself (corrected semi-normal
  equations). Keys that are (nearly) linearly dependent give non-finite or
  inexact maps; :func:`~factstore_jax.constructions.encoder_decoder.construct`
  verifies every fact and re-solves such buckets in float64.
  """
  k = jnp.where(valid[:, None], keys, 0.0)                     # (b, d)
  c = jnp.where(valid[:, None], targets, 0.0)                  # (b, m)
  gram = k @ k.T + jnp.diag((~valid).astype(k.dtype))          # (b, b)
  chol = jnp.linalg.cholesky(gram)
  solve = lambda rhs: jax.scipy.linalg.cho_solve((chol, True), rhs)
  maps = solve(c).T @ k                                        # (m, d)
  residual = jnp.where(valid[:, None], c - k @ maps.T, 0.0)    # (b, m)
  return maps + solve(residual).T @ k


def window_gate_params(buckets: Buckets, activation: str):
  """Gate scale and bias per (bucket, neuron): ``z = scale * t + bias``.

  Returns ``scale (n, k)``, ``bias (n, k)``, ``sign (k,)`` with ``k`` neurons
  per window (2 clipped, 4 relu); the window is ``sum_k sign_k act(z_k)``.
  """
  signs, shifts, ramp = GADGETS[activation]
  ramp = jnp.array(ramp)
  start = buckets.ramp_start[:, ramp]                  # (n, k)
  width = buckets.ramp_width[:, ramp]
  fixed = buckets.ramp_fixed[:, ramp]
  scale = jnp.where(fixed, 0.0, 1.0 / width)
  # Fixed ramps: the left one of bucket 0 is always on (z = 1), the right
  # one of the last bucket always off (z = 0).
  const = jnp.where(jnp.array([0, 1])[ramp] == 0, 1.0, 0.0)
  bias = jnp.where(fixed, const, -start / width) + jnp.array(shifts)
  return scale, bias, jnp.array(signs)
