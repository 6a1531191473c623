"""Decodability of value embeddings: separators, rho, certificates.

For value ``i`` of a table ``V (P, d)``::

  rho_i = max_{||u|| <= 1} min_{j != i} <u, w_ij>,   w_ij = (v_i - v_j) / ||v_i - v_j||

equals the distance from the origin to the convex hull of ``{w_ij}_j``
(``rho_i > 0`` iff ``v_i`` is a strict vertex of the hull of ``V``).

Solver (batched over ``i`` with ``vmap``, chunked with ``lax.map`` so memory is
``O(chunk * (P + K d))``; the ``P x P x d`` difference tensor is never built):
an active set of ``K`` competitors per value, chosen by the current direction;
pairwise Frank-Wolfe on the ``K x K`` Gram matrix of their normalised
differences (min-norm point, warm-started); then one matmul
``x @ V^T`` scores all ``P`` competitors, violators replace inactive slots,
repeat. Each value gets a certificate: the primal margin achieved by its
separator ``u_i = x_i / ||x_i||`` against *all* competitors (a lower bound on
``rho_i``) and the dual bound ``||x_i||`` (an upper bound), whose gap is
driven below ``tol``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from factstore_jax import sweep
from factstore_jax.errors import FactStoreError
from factstore_jax.precision import full_precision

Array = jax.Array


class Decodability(NamedTuple):
  rho: Array         # (P,) certified lower bound on rho_i (primal margin)
  separators: Array  # (P, d) unit output directions u_i
  dual_bound: Array  # (P,) upper bound on rho_i
  gap: Array         # (P,) dual_bound - rho
  decodable: Array   # (P,) bool, rho_i > atol

  @property
  def rho_min(self) -> Array:
    return jnp.min(self.rho)


class _Outer(NamedTuple):
  step: Array
  cand: Array    # (K,) int competitor indices
  lam: Array     # (K,) simplex weights
  done: Array    # () bool
  x: Array       # (d,) min-norm point of the last certificate
  dual: Array    # () its norm
  smin: Array    # () its smallest score against all competitors


def _top_k_indices(y: Array, k: int) -> Array:
  """``jax.lax.top_k(y, k)[1]`` of a 1-D ``y``, exactly (ties included).

  For long ``y`` a two-level selection: the ``k`` blocks with the largest
  maxima (ties to the lower block) hold the ``k`` largest entries (ties to
  the lower index), so one ``top_k`` over the block maxima and one over the
  ``k`` selected blocks (kept in index order) replace a ``top_k`` over all
  of ``y``; on CPU this is 2-3x faster at ``len(y) = 65,536``, ``k = 64``.
  """
  n = y.shape[0]
  if n < 8192 or k < 1:
    return jax.lax.top_k(y, k)[1]
  block = 16
  while block * block * k < n:  # block ~ sqrt(n / k)
    block *= 2
  if k * block * 4 > n:
    return jax.lax.top_k(y, k)[1]
  num_blocks = -(-n // block)
  padded = jnp.pad(y, (0, num_blocks * block - n), constant_values=-jnp.inf)
  blocks = padded.reshape(num_blocks, block)
  chosen = jnp.sort(jax.lax.top_k(jnp.max(blocks, axis=1), k)[1])
  pos = jax.lax.top_k(blocks[chosen].reshape(-1), k)[1]
  return chosen[pos // block] * block + pos % block


def _pairwise_frank_wolfe(q: Array, lam: Array, tol: float,
                          max_steps: int) -> Array:
  """Min of ``lam^T q lam`` over the simplex, from ``lam`` (one problem).

  ``q (K, K)`` is a Gram matrix of unit vectors. Stops when the Frank-Wolfe
  gap, in rho units (``gap / ||x||``), is below ``tol``.
  """
  def gap_of(lam, qlam):
    sq = jnp.maximum(lam @ qlam, 0.0)
    return (sq - jnp.min(qlam)) / jnp.maximum(jnp.sqrt(sq), 1e-12)

  def cond(state):
    t, lam, qlam = state
    return (t < max_steps) & (gap_of(lam, qlam) > tol)

  def body(state):
    t, lam, qlam = state
    s = jnp.argmin(qlam)
    a = jnp.argmax(jnp.where(lam > 0, qlam, -jnp.inf))
    curv = q[s, s] + q[a, a] - 2 * q[s, a]
    step = (qlam[a] - qlam[s]) / jnp.maximum(curv, 1e-12)
    step = jnp.clip(step, 0.0, lam[a])
    lam = lam.at[s].add(step).at[a].add(-step)
    lam = jnp.where(lam < 1e-12, 0.0, lam)  # keeps the support tight
    qlam = q @ lam
    return t + 1, lam, qlam

  _, lam, _ = jax.lax.while_loop(cond, body, (0, lam, q @ lam))
  return lam


def _solve_one(i: Array, values: Array, sqnorm: Array, *,
               num_candidates: int, tol: float, atol: float, floor: float,
               max_outer: int, max_inner: int):
  """Separator, primal and dual of value ``i`` (vmapped by the caller)."""
  num_values = values.shape[0]
  k = num_candidates
  vi = values[i]
  others = jnp.arange(num_values)
  excluded = others == i
  dist = jnp.sqrt(jnp.maximum(sqnorm[i] + sqnorm - 2 * (values @ vi), 0.0))
  safe_dist = jnp.where(excluded, 1.0, jnp.maximum(dist, 1e-30))

  def scores(x):  # <x, w_ij> for every j, self at +inf.
    s = (x @ vi - values @ x) / safe_dist
    return jnp.where(excluded, jnp.inf, s)

  def differences(cand):  # exact normalised differences (K, d) and norms.
    diff = vi[None, :] - values[cand]
    norm = jnp.linalg.norm(diff, axis=1)
    return diff / jnp.maximum(norm, 1e-30)[:, None], norm

  # Initial active set: half nearest neighbours, half best-scored by v_i
  # (values are centred, so v_i points away from the mean).
  x0 = vi
  x0 = x0 / jnp.maximum(jnp.linalg.norm(x0), 1e-30)
  near = _top_k_indices(-jnp.where(excluded, jnp.inf, dist), k - k // 2)
  taken = excluded.at[near].set(True)
  best = _top_k_indices(-jnp.where(taken, jnp.inf, scores(x0)), k // 2)
  cand0 = jnp.concatenate([near, best])
  w0, _ = differences(cand0)
  lam0 = jax.nn.one_hot(jnp.argmin(w0 @ x0), k, dtype=values.dtype)

  def certificate(cand, lam):
    w, _ = differences(cand)
    x = lam @ w
    dual = jnp.linalg.norm(x)
    s = scores(x)
    # Recompute the K smallest scores from exact differences (Gram-based
    # distances lose precision for near neighbours).
    worst = _top_k_indices(-s, k)
    w_worst, _ = differences(worst)
    s = s.at[worst].set(w_worst @ x)
    return x, dual, s

  def cond(state: _Outer):
    return (state.step < max_outer) & ~state.done

  def body(state: _Outer):
    w, _ = differences(state.cand)
    lam = _pairwise_frank_wolfe(w @ w.T, state.lam, tol / 4, max_inner)
    x, dual, s = certificate(state.cand, lam)
    primal = jnp.min(s) / jnp.maximum(dual, 1e-30)
    done = (dual - primal <= tol) | (dual <= max(atol, floor))
    # Replace inactive slots by the most violating competitors not yet held.
    held = jnp.zeros(num_values, bool).at[state.cand].max(lam > 0)
    new = _top_k_indices(-jnp.where(held, jnp.inf, s), k)
    free = lam <= 0
    rank = jnp.clip(jnp.cumsum(free) - 1, 0, k - 1)
    cand = jnp.where(free, new[rank], state.cand)
    cand = jnp.where(done, state.cand, cand)
    return _Outer(state.step + 1, cand, lam, done, x, dual, jnp.min(s))

  zero = jnp.zeros((), values.dtype)
  state = jax.lax.while_loop(
      cond, body, _Outer(jnp.array(0), cand0, lam0, jnp.array(False),
                         jnp.zeros_like(vi), zero, zero))
  if max_outer > 0:
    # The last step's certificate is the final one: a step that is not done
    # only replaces competitors of zero weight, which leaves x unchanged.
    x, dual, smin = state.x, state.dual, state.smin
  else:
    x, dual, s = certificate(state.cand, state.lam)
    smin = jnp.min(s)
  u = x / jnp.maximum(dual, 1e-30)
  primal = smin / jnp.maximum(dual, 1e-30)
  # An exact duplicate of v_i (or a min-norm point at the origin) means no
  # direction separates it: report rho <= 0.
  has_duplicate = jnp.min(jnp.where(excluded, jnp.inf, dist)) <= 0.0
  zero = (dual <= atol) | has_duplicate
  primal = jnp.where(zero, jnp.minimum(primal, 0.0), primal)
  primal = jnp.where(has_duplicate, 0.0, primal)
  dual = jnp.where(has_duplicate, 0.0, dual)
  return u, primal, dual


@full_precision
def decodability(values: Array, *, num_candidates: int | None = None,
                 tol: float = 1e-3, atol: float = 1e-6,
                 floor: float = 0.0, chunk_size: int | None = None,
                 max_outer: int = 20, max_inner: int = 2000,
                 indices=None, stream_size: int | None = None,
                 abort=None, progress=None) -> Decodability | None:
  """Per-value decodability ``rho_i`` with separators and certificates.

  Args:
    values: ``(P, d)`` value table (any scale; rho is translation and scale
      invariant, so values are centred and rescaled internally).
    num_candidates: first active-set size ``K`` (clipped to ``P - 1``);
      outside ``jit``, values whose gap stays above ``tol`` are re-solved
      with ``K`` doubled, up to ``min(P - 1, d + 1)``; default
      ``clip(d // 2, 64, 256)``. The optimum's support has at most
      ``d + 1`` points and grows with ``P``; measured: ``K = 32`` stalls at
      ``P = 65,536, d = 32``, ``K = 64`` stalls at ``d = 256``, while the
      default certifies ``gap <= 1e-3`` for ``d`` from 16 to 512.
    tol: target certificate gap ``dual_bound - rho``.
    atol: a dual bound at or below this means "not decodable".
    floor: stop refining a value once its dual bound is <= ``floor`` (its
      rho is then known to be below the floor; its gap may exceed ``tol``).
    chunk_size: values solved at once (memory ``O(chunk * (P + K d))``);
      default 32 on CPU (a vmapped chunk runs until its slowest value
      converges: at P = 4,096, d = 32 chunks of 8-64 took 3.4-3.8 s, of 256
      6.0 s), 256 elsewhere (parallel lanes).
    max_outer: active-set refreshes; ``max_inner``: Frank-Wolfe steps each.
    indices: optional ``(S,)`` values to solve (against all competitors);
      the result then has ``S`` rows instead of ``P``.
    stream_size: outside ``jit`` only: solve at most this many values per
      jitted call (rounded up to a multiple of ``chunk_size``), in a host
      loop, so ``abort`` / ``progress`` run between calls. The result is the
      same as one call's (the values are batched the same way).
    abort: optional ``abort(rows (s,) np.ndarray, part: Decodability) ->
      bool`` called after each streamed call with the positions (in
      ``indices``) it solved; ``True`` stops early and returns ``None``.
    progress: optional ``progress(done, total)`` called after each call.

  Returns:
    :class:`Decodability` with ``(P,)`` fields and ``separators (P, d)``
    (``None`` if ``abort`` stopped it).
  """
  values = jnp.asarray(values)
  if chunk_size is None:
    chunk_size = 32 if jax.default_backend() == 'cpu' else 256
  if values.ndim != 2 or values.shape[0] < 2:
    raise FactStoreError(
        f'values must have shape (P, d) with P >= 2, got {values.shape}')
  num_values = values.shape[0]
  if num_candidates is None:
    num_candidates = min(max(values.shape[1] // 2, 64), 256)
  k = max(1, min(num_candidates, num_values - 1))
  if indices is None:
    indices = jnp.arange(num_values)
  indices = jnp.asarray(indices, jnp.int32)
  def solve(idx, k):
    static = dict(num_candidates=k, tol=tol, atol=atol, floor=floor,
                  chunk_size=max(1, min(chunk_size, idx.shape[0])),
                  max_outer=max_outer, max_inner=max_inner)
    if isinstance(values, jax.core.Tracer) or isinstance(idx, jax.core.Tracer):
      return _decodability(values, idx, **static)
    # Outside jit: values split over the local devices, whole chunks each.
    return sweep.shard_rows(_decodability, (values,), (idx,),
                            static_kwargs=static,
                            row_multiple=static['chunk_size'])
  total = indices.shape[0]
  if stream_size is None or stream_size >= total:
    result = solve(indices, k)
    if abort is not None and abort(np.arange(total), result):
      return None
    if progress is not None:
      jax.block_until_ready(result)
      progress(total, total)
  else:
    # Chunk boundaries on multiples of chunk_size: every value is batched
    # with the same neighbours as in a single call.
    step = -(-max(stream_size, 1) // chunk_size) * chunk_size
    parts = []
    for start in range(0, total, step):
      rows = np.arange(start, min(start + step, total))
      part = solve(indices[start:start + step], k)
      if abort is not None and abort(rows, part):
        return None
      parts.append(part)
      if progress is not None:
        jax.block_until_ready(part)
        progress(int(rows[-1]) + 1, total)
    result = Decodability(*(jnp.concatenate(f) for f in zip(*parts)))
  # Outside jit: values whose certificate is still open may need a larger
  # active set (the support can hold up to d + 1 competitors, e.g. all P - 1
  # for orthonormal values); re-solve just those with K doubled.
  k_max = min(num_values - 1, values.shape[1] + 1)
  while k < k_max:
    try:
      gap, dual = np.asarray(result.gap), np.asarray(result.dual_bound)
    except (jax.errors.TracerArrayConversionError,
            jax.errors.ConcretizationTypeError):
      break
    open_ = np.flatnonzero((gap > tol) & (dual > max(atol, floor)))
    if not open_.size:
      break
    k = min(2 * k, k_max)
    again = solve(indices[open_], k)
    result = Decodability(*(
        full.at[open_].set(part) for full, part in zip(result, again)))
  return result


@jax.jit(static_argnames=('num_candidates', 'tol', 'atol', 'floor',
                          'chunk_size', 'max_outer', 'max_inner'))
@full_precision
def _decodability(values, indices, *, num_candidates, tol, atol, floor, chunk_size,
                  max_outer, max_inner):
  values = values - jnp.mean(values, axis=0)
  values = values / jnp.maximum(jnp.max(jnp.abs(values)), 1e-30)
  sqnorm = jnp.sum(values**2, axis=1)
  solve = lambda i: _solve_one(
      i, values, sqnorm, num_candidates=num_candidates, tol=tol,
      atol=atol, floor=floor, max_outer=max_outer, max_inner=max_inner)
  u, primal, dual = jax.lax.map(solve, indices, batch_size=chunk_size)
  return Decodability(rho=primal, separators=u, dual_bound=dual,
                      gap=dual - primal, decodable=primal > atol)


def used_values(mapping) -> np.ndarray:
  """Sorted indices of the values a fact map uses (host side)."""
  return np.unique(np.asarray(mapping))


def undecodable_values(result: Decodability, mapping=None) -> list[int]:
  """Indices of values (used by ``mapping`` if given) with ``rho <= atol``."""
  bad = ~np.asarray(result.decodable)
  if mapping is not None:
    used = np.zeros_like(bad)
    used[used_values(mapping)] = True
    bad &= used
  return np.flatnonzero(bad).tolist()
