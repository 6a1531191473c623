"""Telescoped step gadgets of the encoder (docs/design.md, "Encoder").

Keys are projected on a random sparse direction ``g`` and sorted; the sorted
order is cut into ``n`` consecutive buckets of at most ``b`` keys (nominally
``fill * b``, each cut then moved to the widest gap within reach). Bucket
``j`` gets an exact minimum-norm linear map ``M_j (m, d)`` with
``M_j k_i = c_i`` on its keys, and every cut gets one *step* ``S_j(t)`` of
the projection ``t = <g, x>``: 0 on every key below the cut, 1 on every key
above it. With ``S_0 = 1`` (always on) the encoder is the telescoped sum

  ``E(x) = sum_j S_j(<g, x>) (M_j - M_{j-1}) x``,   ``M_{-1} = 0``,

which is ``M_i x`` on every key of bucket ``i`` (``S_j = 1`` for ``j <= i``,
``0`` after): one step per cut instead of a two-sided window per bucket.

Steps (``z = (t - a) / delta`` rises from 0 to 1 inside a gap; the ramp
occupies the middle ``1 - 2 * slack`` of the gap, so float rounding of ``t``
cannot move a key off a saturated value; where the gap is so narrow that
the rounding bound of the nearby keys' projections exceeds ``slack * gap``
on a side, the ramp narrows on that side to leave twice that bound flat, up
to ``MAX_SLACK``, see :func:`ramp`):

* ``clipped`` (default): ``S = clip(z, 0, 1)``, 1 neuron per cut and code
  coordinate; saturates exactly at 0 and 1.
* ``relu``: ``S = relu(z) - relu(z - 1)``, 2 neurons; for keys far above the
  cut the two cancel only to about ``eps * |t - a| / delta`` in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Per activation: (neuron signs, shift of each neuron's pre-activation); a
# step is sum_k sign_k act(z + shift_k).
GADGETS = {
    'clipped': ((1.0,), (0.0,)),
    'relu': ((1.0, -1.0), (0.0, -1.0)),
}

DEFAULT_FILL = 0.95


class Buckets(NamedTuple):
  """Buckets along the projection, in increasing order of ``<g, x>``.

  Bucket ``j >= 1``'s step sits in the gap between bucket ``j - 1`` and
  bucket ``j``; bucket 0's step is always on (its start/width are unused).
  """
  direction: Array   # (d,) projection direction g (see `projection`)
  index: Array       # (n, b) key indices of each bucket (padded)
  valid: Array       # (n, b) bool, False on padding
  step_start: Array  # (n,) a_j: where the step below bucket j starts
  step_width: Array  # (n,) delta_j > 0 (1 for bucket 0)
  min_gap: Array     # () smallest gap used by a cut (inf for one bucket)


def num_buckets(num_keys: int, bucket_size: int,
                fill: float = DEFAULT_FILL) -> int:
  """Buckets used for ``num_keys`` keys at most ``bucket_size`` per bucket.

  Nominal bucket size is ``fill * bucket_size``; the rest is room to move
  each cut to the widest gap nearby.
  """
  if num_keys <= bucket_size:
    return 1
  stride = max(1, int(fill * bucket_size))
  return -(-num_keys // stride)


SPARSE_SUPPORTS = (2, 8, 32)
# A ramp keeps at least this fraction of its gap's width (1 - 2 * MAX_SLACK).
MAX_SLACK = 0.45
# A ramp leaves this many times the rounding bound of a nearby key's
# projection flat between the key and the ramp (where the gap allows) ...
ROOM_SAFETY = 2.0
# ... for this many keys on each side of the cut.
ROOM_NEIGHBOURS = 4


def _xp(a):
  """``jnp`` for jax arrays and tracers, ``numpy`` for host values."""
  return jnp if isinstance(a, jax.Array) else np


def projection_rounding(direction, u: float):
  """Factor ``c`` with ``|fl(x . fl(g s)) / s - <g, x>| <= c sum_k |x_k g_k|``
  for the dense evaluation of a gate column ``g s`` (unit roundoff ``u``).

  ``c = u_w + gamma_k (1 + u_w)`` with ``k`` the nonzeros of ``direction
  (d,)`` and ``u_w = 0`` when every nonzero is a power of two (``g s`` is
  then exact), else ``u``. Works on host arrays (float64 arithmetic) and
  inside ``jit``.
  """
  xp = _xp(direction)
  g = direction
  nnz = xp.maximum(xp.sum(g != 0), 1)
  exact = xp.all((g == 0) | (xp.abs(xp.frexp(g)[0]) == 0.5))
  u_w = xp.where(exact, 0.0, u)
  k = nnz * u
  return u_w + k / (1.0 - k) * (1.0 + u_w)


def flat_room(keys, t, edge, direction):
  """Flat width a ramp needs beside a cut's edge key.

  Each nearby key's projection may move by its rounding bound ``c sum_k
  |x_k g_k|`` (:func:`projection_rounding`) in the dense float32 MLP; the
  ramp must stay ``ROOM_SAFETY`` times that away from it. ``keys (..., K,
  d)`` and their projections ``t (..., K)`` on one side of cuts whose edge
  projections are ``edge (...)``; ``direction (d,)``. Returns ``(...,)``:
  the largest ``ROOM_SAFETY c sum|x g| - |t - edge|`` (at least 0).
  """
  xp = _xp(direction)
  u = float(np.finfo(np.dtype(keys.dtype)).eps) / 2
  reach = xp.abs(keys) @ xp.abs(direction)
  need = ROOM_SAFETY * projection_rounding(direction, u) * reach - xp.abs(
      t - edge[..., None])
  return xp.maximum(xp.max(need, axis=-1), 0.0)


def ramp(lo, hi, room_lo, room_hi, slack: float):
  """``(start, width)`` of the ramps of steps in the gaps ``(lo, hi)``.

  The ramp leaves ``max(slack, room / gap)`` of the gap flat on each side,
  each capped at ``MAX_SLACK`` (unless ``slack`` is larger): with the rooms
  of :func:`flat_room`, keys near the cut stay on saturated values in float32
  wherever the gap allows. Where both rooms are below ``slack * gap`` this
  is the middle ``1 - 2 slack`` of the gap. Arguments broadcast; host or
  traced arrays.
  """
  xp = _xp(lo)
  gap = xp.asarray(hi - lo)
  wide = gap > 0
  frac = lambda room: xp.maximum(slack, xp.minimum(
      xp.where(wide, room, 0.0) / xp.where(wide, gap, 1.0), MAX_SLACK))
  s_lo, s_hi = frac(room_lo), frac(room_hi)
  return lo + s_lo * gap, (1.0 - s_lo - s_hi) * gap


def directions(key: Array, dim: int, dtype=jnp.float32) -> list[Array]:
  """Candidate projection directions ``(d,)``, preferred first.

  ``+-1`` on ``k`` random coordinates and 0 elsewhere for each ``k`` in
  ``SPARSE_SUPPORTS`` (below ``d``), then a dense Gaussian unit vector.
  A sparse direction's entries are powers of two, so every product in the
  dense gate column ``g * s`` is exact and the float32 pre-activation
  ``x @ (g * s)`` is within ``gamma_k sum_{g_i != 0} |x_i| s`` of
  ``s <g, x>``: steps can be certified from ``t`` alone
  (:mod:`~factstore_jax.constructions.certificate`). A dense direction's
  ``gamma_d |x| |g|`` bound exceeds the cut gaps beyond ~10^5 keys.
  """
  k_coord, k_sign, k_dense = jax.random.split(key, 3)
  perm = jax.random.permutation(k_coord, dim)
  signs = jnp.where(jax.random.bernoulli(k_sign, 0.5, (dim,)), 1.0, -1.0)
  dense = jax.random.normal(k_dense, (dim,), dtype)
  out = [jnp.zeros((dim,), dtype).at[perm[:k]].set(signs[:k].astype(dtype))
         for k in SPARSE_SUPPORTS if k < dim]
  return out + [dense / jnp.linalg.norm(dense)]


def _cuts(t: Array, n: int, bucket_size: int):
  """Cut positions ``(n-1,)`` in the sorted projections ``t (N,)`` and their
  gaps: each nominal cut moves to the widest gap within reach."""
  n_keys = t.shape[0]
  if n == 1:
    return jnp.zeros((0,), jnp.int32), jnp.zeros((0,), t.dtype)
  nominal = jnp.round(jnp.arange(1, n) * (n_keys / n)).astype(jnp.int32)
  half = max(0, (bucket_size - -(-n_keys // n)) // 2)
  offsets = jnp.arange(-half, half + 1)
  window = jnp.clip(nominal[:, None] + offsets[None, :], 1, n_keys - 1)
  gaps = t[window] - t[window - 1]
  best = jnp.argmax(gaps, 1)[:, None]
  return (jnp.take_along_axis(window, best, 1)[:, 0],
          jnp.take_along_axis(gaps, best, 1)[:, 0])


def make_buckets(key: Array, keys: Array, bucket_size: int, *,
                 fill: float = DEFAULT_FILL, slack: float = 0.25) -> Buckets:
  """Buckets of ``keys (N, d)`` along a random direction (static N, b, fill).

  The direction is the first of :func:`directions` whose cuts all fall in
  gaps of positive width (keys tied along a sparse direction may share a
  bucket, not straddle a cut); the dense one is the last resort.
  """
  n_keys, dim = keys.shape
  n = num_buckets(n_keys, bucket_size, fill)
  chosen = None
  for g in reversed(directions(key, dim, keys.dtype)):
    proj = keys @ g
    order = jnp.argsort(proj)
    t = proj[order]
    cuts, gap = _cuts(t, n, bucket_size)
    if chosen is None:
      chosen = (g, order, t, cuts)
      continue
    ok = jnp.all(gap > 0)
    chosen = tuple(jnp.where(ok, a, b) for a, b in
                   zip((g, order, t, cuts), chosen))
  direction, order, t, cuts = chosen
  starts = jnp.concatenate([jnp.array([0]), cuts, jnp.array([n_keys])])
  pos = starts[:-1, None] + jnp.arange(bucket_size)[None, :]
  valid = pos < starts[1:, None]
  index = order[jnp.clip(pos, 0, n_keys - 1)]

  lo, hi = t[jnp.maximum(cuts - 1, 0)], t[cuts]
  gap = hi - lo
  near = jnp.arange(ROOM_NEIGHBOURS)
  below = jnp.clip(cuts[:, None] - 1 - near, 0, n_keys - 1)   # (n-1, K)
  above = jnp.clip(cuts[:, None] + near, 0, n_keys - 1)
  start, width = ramp(
      lo, hi, flat_room(keys[order[below]], t[below], lo, direction),
      flat_room(keys[order[above]], t[above], hi, direction), slack)
  one = jnp.ones((1,), keys.dtype)
  step_start = jnp.concatenate([-one, start])
  step_width = jnp.concatenate([one, width])
  min_gap = jnp.min(gap) if n > 1 else jnp.array(jnp.inf, keys.dtype)
  return Buckets(direction, index, valid, step_start, step_width, min_gap)


def key_owner(index, valid, num_keys: int) -> np.ndarray:
  """``(num_keys,)`` bucket of each key (``-1`` for none), host numpy.

  ``index``/``valid (n, b)`` as in :class:`Buckets`.
  """
  index, valid = np.asarray(index), np.asarray(valid)
  owner = np.full(num_keys, -1, np.int64)
  rows = np.broadcast_to(np.arange(index.shape[0])[:, None], index.shape)
  owner[index[valid]] = rows[valid]
  return owner


def split_bucket(buckets: Buckets, keys, j: int, *,
                 slack: float = 0.25) -> Buckets:
  """Bucket ``j`` split in two at its widest internal projection gap.

  Host-side (concrete arrays, not traced): the repair guard of
  :func:`~factstore_jax.constructions.encoder_decoder.construct` splits a
  bucket whose keys admit no accurate exact map (nearly linearly dependent
  keys with inconsistent codes), since each half's solve is better
  conditioned. The new cut gets a step placed by :func:`ramp`, as
  :func:`make_buckets` places it; buckets after ``j`` move up by
  one. ``keys (N, d)``; returns ``Buckets`` with ``n + 1`` buckets of the
  same size ``b``.
  """
  index, valid = np.asarray(buckets.index), np.asarray(buckets.valid)
  rows = index[j][valid[j]]                       # ascending projection
  if rows.size < 2:
    raise ValueError(f'bucket {j} holds {rows.size} key(s); cannot split it')
  t = (np.asarray(keys, np.float64)[rows]
       @ np.asarray(buckets.direction, np.float64))
  cut = 1 + int(np.argmax(np.diff(t)))
  b = index.shape[1]
  pad = lambda r: np.concatenate([r, np.full(b - r.size, rows[0], r.dtype)])
  halves = np.stack([pad(rows[:cut]), pad(rows[cut:])])
  half_valid = np.arange(b)[None, :] < np.array([[cut], [rows.size - cut]])
  gap = t[cut] - t[cut - 1]
  dtype = np.asarray(buckets.step_start).dtype
  g, keys = np.asarray(buckets.direction).astype(dtype), np.asarray(keys)
  below = slice(max(0, cut - ROOM_NEIGHBOURS), cut)
  above = slice(cut, cut + ROOM_NEIGHBOURS)
  start, width = ramp(
      t[cut - 1], t[cut],
      flat_room(keys[rows[below]], t[below], np.asarray(t[cut - 1]), g),
      flat_room(keys[rows[above]], t[above], np.asarray(t[cut]), g), slack)
  insert = lambda a, new, axis=0: np.concatenate(
      [a[:j], new, a[j + 1:]], axis=axis)
  step_start = np.asarray(buckets.step_start)
  step_width = np.asarray(buckets.step_width)
  return Buckets(
      direction=buckets.direction,
      index=jnp.asarray(insert(index, halves.astype(index.dtype))),
      valid=jnp.asarray(insert(valid, half_valid)),
      step_start=jnp.asarray(insert(step_start, np.array(
          [step_start[j], start], dtype))),
      step_width=jnp.asarray(insert(step_width, np.array(
          [step_width[j], width], dtype))),
      min_gap=jnp.minimum(buckets.min_gap, jnp.asarray(gap, dtype)))


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
  real keys), one solve, then two steps of iterative refinement with the
  residual ``C - K M^T`` formed from ``K`` itself (corrected semi-normal
  equations), which keeps the residual small for buckets of up to ``d``
  keys. Keys that are (nearly) linearly dependent give non-finite or
  inexact maps; :func:`~factstore_jax.constructions.encoder_decoder.construct`
  verifies every fact and re-solves such buckets in float64.
  """
  k = jnp.where(valid[:, None], keys, 0.0)                     # (b, d)
  c = jnp.where(valid[:, None], targets, 0.0)                  # (b, m)
  gram = k @ k.T + jnp.diag((~valid).astype(k.dtype))          # (b, b)
  chol = jnp.linalg.cholesky(gram)
  solve = lambda rhs: jax.scipy.linalg.cho_solve((chol, True), rhs)
  maps = solve(c).T @ k                                        # (m, d)
  for _ in range(2):
    residual = jnp.where(valid[:, None], c - k @ maps.T, 0.0)  # (b, m)
    maps = maps + solve(residual).T @ k
  return maps


def step_gate_params(buckets: Buckets, activation: str):
  """Gate scale and bias per (cut, neuron): ``z = scale * t + bias``.

  Returns ``scale (n, k)``, ``bias (n, k)``, ``sign (k,)`` with ``k`` neurons
  per step (1 clipped, 2 relu); the step is ``sum_k sign_k act(z_k)``. Bucket
  0's step is always on: ``scale = 0``, ``z = 1``.
  """
  signs, shifts = GADGETS[activation]
  first = jnp.arange(buckets.step_start.shape[0]) == 0
  scale = jnp.where(first, 0.0, 1.0 / buckets.step_width)
  bias = jnp.where(first, 1.0, -buckets.step_start / buckets.step_width)
  shifts = jnp.array(shifts, scale.dtype)
  return (jnp.broadcast_to(scale[:, None], (scale.shape[0], len(signs))),
          bias[:, None] + shifts, jnp.array(signs))


def telescope(maps: Array) -> Array:
  """Up-weights of the steps: ``M_j - M_{j-1}`` (``M_{-1} = 0``), ``(n, m, d)``."""
  return jnp.concatenate([maps[:1], maps[1:] - maps[:-1]])


def telescope_error_bound(maps, keys, owner, *, dtype=jnp.float32):
  """A-priori bound on the float error of the telescoped code, per key.

  For a key ``x`` of bucket ``i`` the dense model sums, per code coordinate
  ``r``, the ``i + 1`` dot products ``(M_j - M_{j-1})_r . x`` (the stored,
  rounded differences) and exact zeros. With unit roundoff ``u`` of
  ``dtype`` and ``γ_k = k u / (1 - k u)``:

    ``|E_r(x) - (M_i x)_r| <= (u + γ_d + γ_{i+1} (1 + γ_d))
    sum_{j<=i} |M_j - M_{j-1}|_r . |x|``

  (rounding of the stored differences, of the dot products, of the sum over
  cuts). Host-side, float64.

  Args:
    maps: ``(n, m, d)`` bucket maps.
    keys: ``(S, d)`` keys.
    owner: ``(S,)`` bucket of each key.

  Returns:
    ``(S, m)`` bounds.
  """
  maps = np.asarray(maps, np.float64)
  keys = np.abs(np.asarray(keys, np.float64))
  owner = np.asarray(owner)
  d = maps.shape[2]
  u = float(jnp.finfo(dtype).eps) / 2
  gamma = lambda k: k * u / (1 - k * u)
  diffs = np.abs(np.concatenate([maps[:1], maps[1:] - maps[:-1]]))
  prefix = np.cumsum(diffs, axis=0)                       # (n, m, d)
  coef = u + gamma(d) + gamma(owner + 1.0) * (1 + gamma(d))   # (S,)
  return coef[:, None] * np.einsum('smd,sd->sm', prefix[owner], keys)
