"""Decodability of value embeddings: separators, rho, certificates.

For value ``i`` of a table ``V (P, d)``::

  rho_i = max_{||u|| <= 1} min_{j != i} <u, w_ij>,   w_ij = (v_i - v_j) / ||v_i - v_j||

equals the distance from the origin to the convex hull of ``{w_ij}_j``
(``rho_i > 0`` iff ``v_i`` is a strict vertex of the hull of ``V``).

Solver, per block of ``B`` values (``lax.map`` over blocks; every pass is a
tiled matmul over all ``P`` competitors, reduced per subtile of ``S`` to its
minimum, so no ``(B, P)`` array and no ``P x P x d`` tensor is built):

1. *pool*: one pass scores every competitor against the start direction
   ``v_i / |v_i|`` (exact, from ``V_B V^T`` and the norms) and keeps the
   ``Kp`` lowest subtile minima as the value's candidate pool;
2. *refine*: an active set of ``K`` pool members, pairwise Frank-Wolfe on
   their ``K x K`` Gram matrix (min-norm point, warm-started), the pool
   rescored and violators swapped into zero-weight slots, until the pool
   gap is small;
3. *certify*: one pass scores every competitor against ``x_i`` (from
   ``[V_B; X_B] V^T``; the ``K`` lowest subtiles are rescored from exact
   differences); a value whose gap is still above ``tol`` takes the most
   violating competitors into its pool and repeats 2-3.

A block runs until its slowest value is done. Outside ``jit``, on many
values, every value runs the first round, and the values still open then
(about a fifth on isotropic tables) go on from their state in blocks of
their own: the same per-value computation, without most values waiting
through rounds they do not need.

Each value gets a certificate: the primal margin achieved by its separator
``u_i = x_i / ||x_i||`` against *all* competitors (a lower bound on
``rho_i``) and the dual bound ``||x_i||`` (the norm of a point of the hull of
a subset, an upper bound), whose gap is driven below ``tol``. Cost per value:
two or three passes of ``2 P d`` multiply-adds plus the Frank-Wolfe steps;
``benchmarks/decodability.py`` times it against the previous solver.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from factstore_jax import sharding
from factstore_jax.errors import FactStoreError
from factstore_jax.precision import full_precision

Array = jax.Array

# Active-set refreshes within a value's candidate pool per certification pass
# (each a pairwise Frank-Wolfe solve on the active set and one pool scoring).
POOL_REFRESHES = 20
# Re-solves of values whose sign is still unknown at the largest active set,
# each with a 10x tighter tolerance and 10x more Frank-Wolfe steps.
TIGHTEN_RETRIES = 2

# Outside jit, solves of at least this many blocks run their first round on
# every value, then the values still open on their own (``rounds`` in
# :func:`decodability`).
_COMPACT_MIN_BLOCKS = 16


class Decodability(NamedTuple):
  rho: Array         # (P,) certified lower bound on rho_i (primal margin)
  separators: Array  # (P, d) unit output directions u_i
  dual_bound: Array  # (P,) upper bound on rho_i
  gap: Array         # (P,) dual_bound - rho
  decodable: Array   # (P,) bool, rho_i > atol

  @property
  def rho_min(self) -> Array:
    return jnp.min(self.rho)


class _Table(NamedTuple):
  """The centred, rescaled value table, zero-padded to whole tiles."""
  values: Array   # (P', d); rows >= P are padding
  sqnorm: Array   # (P',)
  valid: Array    # (P',) bool, False on the padding
  tile: int       # competitors per pass step (divides P')
  subtile: int    # competitors per reduced slot (divides tile)


class _Round(NamedTuple):
  """A block's solver state; all but ``step`` are per value, so the state
  of any values can be gathered into new blocks and solved on."""
  step: Array      # () int, rounds run in this call (per value once gathered)
  pool: Array      # (B, Kp) int competitor indices
  act: Array       # (B, K) positions in the pool of the active set
  lam: Array       # (B, K) simplex weights on the active set
  done: Array      # (B,) bool
  x: Array         # (B, d) min-norm point of the last certificate
  dual: Array      # (B,) its norm
  smin: Array      # (B,) its smallest score against all competitors
  duplicate: Array  # (B,) bool, a competitor within rounding of v_i


def _pairwise_frank_wolfe(q: Array, lam: Array, tol: float,
                          max_steps: int, stop: float = 0.0,
                          rel_tol: float = 0.0) -> Array:
  """Min of ``lam^T q lam`` over the simplex, from ``lam`` (one problem).

  ``q (K, K)`` is a Gram matrix of unit vectors. Stops when the Frank-Wolfe
  gap, in rho units (``gap / ||x||``), is below ``max(tol, rel_tol ||x||)``,
  or when the point's norm ``||x||`` (an upper bound on rho) is at or below
  ``stop``: a value whose rho lies below the floor needs no better point
  (for a value whose origin is in the hull the relative gap never closes).
  Each step moves
  weight from the worst held point to the best point and updates
  ``q lam`` from two columns of ``q`` (no ``K x K`` product per step).
  """
  ar = jnp.arange(lam.shape[0])

  def cond(state):
    t, lam, qlam = state
    sq = jnp.maximum(jnp.sum(lam * qlam), 0.0)
    norm = jnp.sqrt(sq)
    gap = (sq - jnp.min(qlam)) / jnp.maximum(norm, 1e-12)
    return (t < max_steps) & (gap > jnp.maximum(tol, rel_tol * norm)) & (
        sq > stop * stop)

  def body(state):
    t, lam, qlam = state
    s = _argmin(qlam)
    a = _argmin(jnp.where(lam > 0, -qlam, jnp.inf))
    q_s, q_a = q[s], q[a]
    curv = q_s[s] + q_a[a] - 2 * q_s[a]
    lam_a = jnp.sum(jnp.where(ar == a, lam, 0.0))
    step = (qlam[a] - qlam[s]) / jnp.maximum(curv, 1e-12)
    step = jnp.clip(step, 0.0, lam_a)
    lam = lam + step * ((ar == s).astype(lam.dtype) -
                        (ar == a).astype(lam.dtype))
    lam = jnp.where(lam < 1e-12, 0.0, lam)  # keeps the support tight
    return t + 1, lam, qlam + step * (q_s - q_a)

  _, lam, _ = jax.lax.while_loop(cond, body, (0, lam, q @ lam))
  return lam


def _table(values: Array, pool: int) -> _Table:
  """Centres and rescales ``values`` (rho is invariant) and pads to tiles.

  One slot per subtile of ``S`` competitors survives a pass; ``S`` is kept
  small enough (``P / S >= 4 x pool``) that a pool member rarely loses its
  slot to a better competitor in the same subtile.
  """
  num_values = values.shape[0]
  subtile = int(min(8, max(1, num_values // (4 * pool))))
  tile = min(4096, -(-num_values // subtile) * subtile)
  padded = -(-num_values // tile) * tile
  values = values - jnp.mean(values, axis=0)
  values = values / jnp.maximum(jnp.max(jnp.abs(values)), 1e-30)
  values = jnp.pad(values, ((0, padded - num_values), (0, 0)))
  valid = jnp.arange(padded) < num_values
  return _Table(values, jnp.sum(values**2, axis=1), valid, tile, subtile)


def _ordered_int(x: Array) -> Array:
  """float32 -> int32 with the same order (``-0.0 < +0.0``)."""
  i = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  return jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)


def _argmin(x: Array) -> Array:
  """Index of a smallest entry of ``x (n,)`` as one integer ``min``.

  The low ``log2 n`` bits of the scores' order-preserving integer images
  carry the index, so the chosen entry exceeds the true minimum by at most
  that rounding (``2^bits`` ulps, ``~2 n * 2^-24`` relative; for
  ``n = 64``, 8e-6). XLA's CPU backend runs
  ``argmin`` (a two-operand reduction) as a scalar loop: inside the vmapped
  Frank-Wolfe loop this is 4x faster per step (10 against 40 us for 64
  values of ``K = 64``). Callers that need the exact minimum read it with
  ``jnp.min``.
  """
  n = x.shape[-1]
  bits = max(1, (n - 1).bit_length())
  low = jnp.int32(2**bits - 1)
  key = _ordered_int(x) & ~low | jnp.arange(n, dtype=jnp.int32)
  return jnp.min(key, axis=-1) & low


def _ordered_float(i: Array) -> Array:
  """Inverse of :func:`_ordered_int`."""
  i = jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)
  return jax.lax.bitcast_convert_type(i, jnp.float32)


def _pass(table: _Table, own: Array, lhs: Array, score) -> tuple[Array, Array]:
  """One pass over every competitor, reduced to a minimum per subtile.

  Args:
    table: the padded value table.
    own: ``(B,)`` the rows' own indices (their ``j = i`` entry is skipped).
    lhs: ``(R, d)`` vectors multiplied with every competitor; the first
      ``B`` are the rows' own values.
    score: ``score(prod (R, T), sq (T,)) -> (B, T)`` scores a tile from
      ``prod = lhs @ tile.T`` and the tile's squared norms.

  Returns:
    ``(mins, index)``, both ``(B, P' / S)``: each subtile's smallest score
    (``+inf`` for padding and ``j = i``) and the competitor that has it.
    The tile loop keeps the working set in cache: one ``(R, d) x (d, T)``
    product per step, no ``(B, P)`` array.
  """
  tile, sub = table.tile, table.subtile
  b = own.shape[0]
  bits = max(1, (sub - 1).bit_length())

  def step(t):
    vt = jax.lax.dynamic_slice_in_dim(table.values, t * tile, tile)
    sqt = jax.lax.dynamic_slice_in_dim(table.sqnorm, t * tile, tile)
    ok = jax.lax.dynamic_slice_in_dim(table.valid, t * tile, tile)
    j = t * tile + jnp.arange(tile)
    s = score(lhs @ vt.T, sqt)
    s = jnp.where(ok[None, :] & (j[None, :] != own[:, None]), s, jnp.inf)
    if sub == 1:
      return s, jnp.broadcast_to(j, s.shape)
    # argmin per subtile as one integer min: the score's order-preserving
    # int32 image with its position in the low bits (rounded down, so the
    # decoded score never exceeds the true one).
    key = _ordered_int(s) & ~(2**bits - 1) | (j % sub)[None, :]
    key = jnp.min(key.reshape(b, tile // sub, sub), axis=2)
    return (_ordered_float(key & ~(2**bits - 1)),
            j[::sub][None, :] + (key & (2**bits - 1)))

  mins, index = jax.lax.map(step, jnp.arange(table.values.shape[0] // tile))
  return (jnp.moveaxis(mins, 0, 1).reshape(b, -1),
          jnp.moveaxis(index, 0, 1).reshape(b, -1))


def _solve_block(table: _Table, own: Array, state: _Round | None, *,
                 num_candidates: int, pool_size: int, tol: float,
                 rel_tol: float, atol: float, floor: float, max_outer: int,
                 max_inner: int) -> _Round:
  """Runs up to ``max_outer`` rounds for the values ``own (B,)``, from
  their pools (``state`` ``None``) or from ``state``; returns the state
  (:func:`_result` reads the separators and bounds off it)."""
  k, kp = num_candidates, pool_size
  vals = table.values
  vb, sqb = vals[own], table.sqnorm[own]
  # rho_i >= 0 (u = 0 is feasible), so a dual bound <= tol already pins rho
  # within tol: values inside the hull (dual -> 0 only sublinearly) stop
  # there instead of running every Frank-Wolfe step.
  stop = max(atol, floor, tol)

  # Pass 1: the pool, the kp competitors scoring lowest against the start
  # direction x0 = v_i / |v_i| (values are centred, so v_i points away from
  # the mean). Competitors at a distance the Gram-based d^2 cannot resolve
  # (within its rounding, ~u (|v_i|^2 + |v_j|^2)) come first: the pool's
  # exact differences then tell duplicates from close neighbours.
  eps = 64 * float(jnp.finfo(vals.dtype).eps)
  def start_score(gram, sqt):
    total = sqb[:, None] + sqt[None, :]
    d2 = total - 2 * gram
    s = (sqb[:, None] - gram) * jax.lax.rsqrt(jnp.maximum(d2, 1e-30))
    return jnp.where(d2 <= eps * total, -jnp.inf, s)
  def first_pool():
    key, index = _pass(table, own, vb, start_score)
    return jnp.take_along_axis(index, jax.lax.top_k(-key, kp)[1], axis=1)

  def differences(cand):  # (B, n) -> exact normalised (B, n, d), norms
    diff = vb[:, None, :] - vals[cand]
    norm = jnp.linalg.norm(diff, axis=-1)
    return diff / jnp.maximum(norm, 1e-30)[..., None], norm

  def refine(w, act, lam):  # active-set min-norm point over one pool
    def cond(state):
      t, _, _, done = state
      return (t < POOL_REFRESHES) & ~done

    def body(state):
      t, act, lam, _ = state
      wa = w[act]
      # Half the stop: its incrementally updated norm drifts from |x|.
      lam = _pairwise_frank_wolfe(wa @ wa.T, lam, tol / 2, max_inner,
                                  stop / 2, rel_tol / 2)
      x = lam @ wa
      dual = jnp.linalg.norm(x)
      s = w @ x
      done = (dual - jnp.min(s) / jnp.maximum(dual, 1e-30) <=
              0.75 * jnp.maximum(tol, rel_tol * dual)) | (dual <= stop)
      # Zero-weight slots take the pool's most violating non-members.
      held = jnp.zeros(kp, bool).at[act].max(lam > 0)
      new = jax.lax.top_k(-jnp.where(held, jnp.inf, s), k)[1]
      free = lam <= 0
      rank = jnp.clip(jnp.cumsum(free) - 1, 0, k - 1)
      act = jnp.where(done | ~free, act, new[rank])
      return t + 1, act, lam, done

    _, act, lam, _ = jax.lax.while_loop(
        cond, body, (0, act, lam, jnp.array(False)))
    return act, lam

  def certify(x):  # (B, d) -> smallest exact-ish score over all competitors
    xv = jnp.sum(x * vb, axis=1)
    def score(prod, sqt):
      gram, cross = prod[:own.shape[0]], prod[own.shape[0]:]
      d2 = jnp.maximum(sqb[:, None] + sqt[None, :] - 2 * gram, 0.0)
      return (xv[:, None] - cross) * jax.lax.rsqrt(jnp.maximum(d2, 1e-30))
    mins, index = _pass(table, own, jnp.concatenate([vb, x]), score)
    # Gram-based distances lose precision for near neighbours: rescore the
    # k lowest slots from exact differences.
    worst = jax.lax.top_k(-mins, min(k, mins.shape[1]))[1]
    w_worst, _ = differences(jnp.take_along_axis(index, worst, axis=1))
    exact = jnp.einsum('bnd,bd->bn', w_worst, x)
    mins = jax.vmap(lambda m, i, e: m.at[i].set(e))(mins, worst, exact)
    return mins, index

  def start():
    pool = first_pool()
    # A competitor within rounding of v_i (rows equal in the input can
    # differ by an ulp once centred and rescaled under jit) is a duplicate.
    w, norm = differences(pool)
    scale = jnp.sqrt(sqb)[:, None] + jnp.sqrt(table.sqnorm[pool])
    act0 = jnp.broadcast_to(jnp.arange(k), (own.shape[0], k))
    x0 = vb / jnp.maximum(jnp.sqrt(sqb), 1e-30)[:, None]
    first = jnp.argmin(jnp.einsum('bkd,bd->bk', w[:, :k], x0), axis=1)
    zero = jnp.zeros(own.shape, vals.dtype)
    return _Round(jnp.array(0), pool, act0,
                  jax.nn.one_hot(first, k, dtype=vals.dtype),
                  jnp.zeros(own.shape, bool), jnp.zeros_like(vb), zero, zero,
                  jnp.any(norm <= eps * scale, axis=1))

  def cond(state: _Round):
    return (state.step < max_outer) & ~jnp.all(state.done)

  def body(state: _Round):
    w, _ = differences(state.pool)
    act, lam = jax.vmap(refine)(w, state.act, state.lam)
    x = jnp.einsum('bk,bkd->bd', lam, jnp.take_along_axis(
        w, act[..., None], axis=1))
    dual = jnp.linalg.norm(x, axis=1)
    mins, index = certify(x)
    smin = jnp.min(mins, axis=1)
    primal = smin / jnp.maximum(dual, 1e-30)
    done = (dual - primal <= jnp.maximum(tol, rel_tol * dual)) | (
        dual <= stop)
    # Open values: the k most violating competitors outside the pool
    # replace its highest-scoring non-support members.
    viol = jnp.take_along_axis(
        index, jax.lax.top_k(-mins, min(k, mins.shape[1]))[1], axis=1)
    fresh = ~jnp.any(viol[:, :, None] == state.pool[:, None, :], axis=2)
    held = jax.vmap(lambda a, l: jnp.zeros(kp, bool).at[a].max(l > 0))(
        act, lam)
    s_pool = jnp.einsum('bnd,bd->bn', w, x)
    slots = jax.lax.top_k(jnp.where(held, -jnp.inf, s_pool), k)[1]
    replaced = jnp.where(fresh, viol, jnp.take_along_axis(
        state.pool, slots, axis=1))
    pool = jax.vmap(lambda p, s, r: p.at[s].set(r))(state.pool, slots,
                                                    replaced)
    keep = state.done
    sel = lambda old, new: jnp.where(
        keep.reshape(keep.shape + (1,) * (new.ndim - 1)), old, new)
    return _Round(state.step + 1, sel(state.pool, pool), sel(state.act, act),
                  sel(state.lam, lam), keep | done, sel(state.x, x),
                  sel(state.dual, dual), sel(state.smin, smin),
                  state.duplicate)

  state = start() if state is None else state._replace(step=jnp.array(0))
  return jax.lax.while_loop(cond, body, state)


def _result(state: _Round, atol: float):
  """Separators ``u``, primal and dual bounds of a solver state."""
  x, dual, smin = state.x, state.dual, state.smin
  u = x / jnp.maximum(dual, 1e-30)[..., None]
  primal = smin / jnp.maximum(dual, 1e-30)
  # An exact duplicate of v_i (or a min-norm point at the origin) means no
  # direction separates it: report rho <= 0.
  zero_norm = (dual <= atol) | state.duplicate
  primal = jnp.where(zero_norm, jnp.minimum(primal, 0.0), primal)
  primal = jnp.where(state.duplicate, 0.0, primal)
  dual = jnp.where(state.duplicate, 0.0, dual)
  return u, primal, dual


@full_precision
def decodability(values: Array, *, num_candidates: int | None = None,
                 tol: float = 1e-3, rel_tol: float = 0.0,
                 atol: float = 1e-6, floor: float = 0.0,
                 chunk_size: int | None = None,
                 pool_size: int | None = None,
                 max_outer: int = 20, max_inner: int = 200,
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
    tol: target certificate gap ``dual_bound - rho``. Since ``rho_i >= 0``,
      a value whose dual bound reaches ``tol`` is settled too (``rho_i`` is
      in ``[0, tol]``; its ``rho`` may stay negative and it is reported not
      decodable): a value with ``0 < rho_i <= tol`` may be reported either
      way, so lower ``tol`` to resolve smaller ``rho``. Outside ``jit``, a
      value still open at ``rho <= atol`` after the ``K`` doublings is
      re-solved at 10x and 100x tighter ``tol`` with 10x and 100x
      ``max_inner`` (``TIGHTEN_RETRIES``), keeping its best bounds.
    rel_tol: also accept a gap up to ``rel_tol * dual_bound`` (the
      certificate is then ``rho_i >= (1 - rel_tol) dual_bound_i``): the
      separators are within that fraction of optimal, which is all a
      construction needs of them. Measured on a random ``P = 16,384,
      d = 32`` table (floor 0.02): ``0.01`` solves it 1.17x faster than
      ``0``, ``0.03`` 1.4x (``benchmarks/decodability.py --rel_tol``).
      Values with small ``rho`` are still resolved to ``tol``.
    atol: a dual bound at or below this means "not decodable".
    floor: stop refining a value once its dual bound is <= ``floor`` (its
      rho is then known to be below the floor; its gap may exceed ``tol``).
    chunk_size: values solved at once, ``B`` (memory
      ``O(B (Kp d + P / S))``); default 64 on CPU, 256 elsewhere. A block
      runs until its slowest value is certified (outside ``jit``, values
      open after the first round go on in blocks of their own).
    pool_size: candidate pool per value, ``Kp`` (clipped to ``P - 1``,
      at least ``2 K``); default ``max(512, 4 K)``; doubled with ``K``.
    max_outer: certification passes per value; ``max_inner``: Frank-Wolfe
      steps per active-set refresh (up to ``POOL_REFRESHES`` refreshes per
      pass, each warm-started). The slowest value of a block sets a
      block's step count: capped at 200 steps per refresh, it refreshes its
      active set sooner, and a block of 64 values at ``P = 65,536, m = 32``
      refines in 71 ms instead of 96 ms with 2,000 steps (same certified
      gap).
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

  Raises:
    FactStoreError: ``values`` not ``(P, d)`` with ``P >= 2``;
      ``max_outer`` or ``max_inner`` below 1; ``rel_tol`` outside
      ``[0, 1)``.
  """
  values = jnp.asarray(values)
  if max_outer < 1 or max_inner < 1:
    raise FactStoreError(f'max_outer and max_inner must be >= 1, got '
                         f'{max_outer} and {max_inner}')
  if not 0.0 <= rel_tol < 1.0:
    raise FactStoreError(f'rel_tol must be in [0, 1), got {rel_tol}')
  if chunk_size is None:
    chunk_size = 64 if jax.default_backend() == 'cpu' else 256
  if values.ndim != 2 or values.shape[0] < 2:
    raise FactStoreError(
        f'values must have shape (P, d) with P >= 2, got {values.shape}')
  num_values = values.shape[0]
  if num_candidates is None:
    num_candidates = min(max(values.shape[1] // 2, 64), 256)
  k = max(1, min(num_candidates, num_values - 1))
  if pool_size is None:
    pool_size = max(512, 4 * k)
  pool_size = max(2 * k, pool_size)
  if indices is None:
    indices = jnp.arange(num_values)
  indices = jnp.asarray(indices, jnp.int32)
  base_k = k
  traced = any(isinstance(a, jax.core.Tracer) for a in (values, indices))
  k_max = min(num_values - 1, values.shape[1] + 1)

  def solve(idx, k, rounds, state=None, tol=tol, max_inner=max_inner):
    static = dict(num_candidates=k, tol=tol, rel_tol=rel_tol, atol=atol,
                  floor=floor,
                  pool_size=min(num_values - 1, pool_size * k // base_k),
                  chunk_size=max(1, min(chunk_size, idx.shape[0])),
                  max_outer=rounds, max_inner=max_inner)
    if traced:
      return _decodability(values, idx, state, **static)
    # Outside jit: values split over the local devices, whole chunks each.
    return sharding.shard_rows(
        _decodability, (values,), (idx,) if state is None else (idx, state),
        static_kwargs=static, row_multiple=static['chunk_size'])

  def rounds(idx, k):
    """Every round for ``idx``; outside jit, on many values, the values
    still open after the first round go on in blocks of their own (a block
    runs until its slowest value is done: in mixed blocks most values would
    wait through rounds they do not need)."""
    if (traced or max_outer < 2 or
        idx.shape[0] < _COMPACT_MIN_BLOCKS * chunk_size):
      return solve(idx, k, max_outer)
    state = solve(idx, k, 1)
    open_ = np.flatnonzero(~np.asarray(state.done))
    if not open_.size:
      return state
    take = _padded(open_, chunk_size)
    # Gathers and merges on the host: their shapes follow the number of
    # open values, and as jax ops each new shape would compile.
    state = jax.tree.map(np.asarray, state)
    more = solve(jnp.asarray(np.asarray(idx)[take]), k, max_outer - 1,
                 jax.tree.map(lambda a: jnp.asarray(a[take]), state))
    return jax.tree.map(lambda full, part: _set_rows(
        full, open_, np.asarray(part)[:open_.size]), state, more)

  def finish(idx):
    result = _as_result(rounds(idx, k), atol)
    # Outside jit, values whose certificate is still open are re-solved:
    # first with K (and the pool) doubled, since the support can hold up to
    # d + 1 competitors (e.g. all P - 1 for orthonormal values); then, at
    # the largest K, with a 10x tighter tolerance and 10x more Frank-Wolfe
    # steps per refresh each retry. Frank-Wolfe stopped at tol can leave a
    # full active set whose weights never reach zero, so no slot frees for
    # the violating competitors and the certificate stalls far from tol
    # (measured: rho -0.038 with gap 0.067 on a spiked P = 2,048, d = 64
    # table whose rho is 0.026). These retries (each a new compile) are for
    # values whose sign is unknown, rho <= atol < dual bound. Every attempt
    # gives valid bounds, so each value keeps its best of both.
    attempts = [(min(2 ** n * k, k_max), tol, max_inner)
                for n in range(1, 32) if 2 ** (n - 1) * k < k_max]
    attempts += [(max(k, k_max), tol * 10.0 ** -n, max_inner * 10 ** n)
                 for n in range(1, TIGHTEN_RETRIES + 1)]
    for k_retry, tol_retry, inner_retry in ([] if traced else attempts):
      open_ = ~settled(result, tol, rel_tol, atol, floor)
      if tol_retry < tol:  # only values whose sign is still unknown
        open_ &= np.asarray(result.rho) <= atol
      open_ = np.flatnonzero(open_)
      if not open_.size:
        break
      take = _padded(open_, 1)
      again = _as_result(solve(jnp.asarray(np.asarray(idx)[take]), k_retry,
                               max_outer, tol=tol_retry,
                               max_inner=inner_retry), atol)
      result = _best_of(result, open_, again)
    return Decodability(*map(jnp.asarray, result))

  total = indices.shape[0]
  if stream_size is None or stream_size >= total:
    result = finish(indices)
    if abort is not None and abort(np.arange(total), result):
      return None
    if progress is not None:
      jax.block_until_ready(result)
      progress(total, total)
    return result
  # Chunk boundaries on multiples of chunk_size: every value is batched with
  # the same neighbours as in a single call.
  step = -(-max(stream_size, 1) // chunk_size) * chunk_size
  parts = []
  for start in range(0, total, step):
    rows = np.arange(start, min(start + step, total))
    part = finish(indices[start:start + step])
    if abort is not None and abort(rows, part):
      return None
    parts.append(part)
    if progress is not None:
      jax.block_until_ready(part)
      progress(int(rows[-1]) + 1, total)
  return Decodability(*(jnp.concatenate(f) for f in zip(*parts)))


@jax.jit(static_argnames=('num_candidates', 'pool_size', 'tol', 'rel_tol',
                          'atol', 'floor', 'chunk_size', 'max_outer', 'max_inner'))
@full_precision
def _decodability(values, indices, state=None, *, num_candidates, pool_size,
                  tol, rel_tol, atol, floor, chunk_size, max_outer, max_inner) -> _Round:
  """Solver state ``(S, ...)`` of the values ``indices (S,)`` after up to
  ``max_outer`` rounds, from their pools or from ``state`` (per value)."""
  table = _table(values, pool_size)
  num = indices.shape[0]
  blocks = -(-num // chunk_size)

  def to_blocks(a):  # (S, ...) -> (blocks, chunk, ...), padded by the last
    a = jnp.pad(a, [(0, blocks * chunk_size - num)] + [(0, 0)] * (a.ndim - 1),
                mode='edge')
    return a.reshape(blocks, chunk_size, *a.shape[1:])

  solve = lambda rows, st: _solve_block(
      table, rows, st, num_candidates=num_candidates, pool_size=pool_size,
      tol=tol, rel_tol=rel_tol, atol=atol, floor=floor, max_outer=max_outer,
      max_inner=max_inner)
  own = to_blocks(indices)
  if state is None:
    out = jax.lax.map(lambda rows: solve(rows, None), own)
  else:
    out = jax.lax.map(lambda a: solve(*a), (own, jax.tree.map(to_blocks,
                                                              state)))
  out = out._replace(step=jnp.broadcast_to(out.step[:, None],
                                           (blocks, chunk_size)))
  return jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:])[:num], out)


def _padded(rows: np.ndarray, multiple: int) -> np.ndarray:
  """``rows`` padded (repeating the last) to a power of two times
  ``multiple``: re-solves of a varying number of values compile few shapes."""
  blocks = 1 << (-(-rows.size // multiple) - 1).bit_length()
  return np.concatenate([rows, np.full(blocks * multiple - rows.size,
                                       rows[-1])])


def _best_of(result: Decodability, rows: np.ndarray,
             again: Decodability) -> Decodability:
  """``result`` (host arrays) with ``rows`` tightened by a re-solve
  ``again`` (its first ``rows.size`` rows): the larger primal bound with
  its separator, and the smaller dual bound (both bounds of any solve are
  valid, so the merge is too)."""
  n = rows.size
  rho, dual = np.asarray(result.rho), np.asarray(result.dual_bound)
  new_rho = np.asarray(again.rho)[:n]
  new_dual = np.asarray(again.dual_bound)[:n]
  better = new_rho > rho[rows]
  rho = _set_rows(rho, rows, np.where(better, new_rho, rho[rows]))
  seps = np.asarray(result.separators)
  seps = _set_rows(seps, rows, np.where(
      better[:, None], np.asarray(again.separators)[:n], seps[rows]))
  dual = _set_rows(dual, rows, np.minimum(dual[rows], new_dual))
  decodable = _set_rows(np.asarray(result.decodable), rows, np.where(
      better, np.asarray(again.decodable)[:n],
      np.asarray(result.decodable)[rows]))
  return Decodability(rho, seps, dual, dual - rho, decodable)


def _set_rows(full: np.ndarray, rows: np.ndarray,
              part: np.ndarray) -> np.ndarray:
  """A copy of ``full`` with ``full[rows] = part`` (host arrays)."""
  full = np.array(full)
  full[rows] = part
  return full


def _as_result(state: _Round, atol: float) -> Decodability:
  u, primal, dual = _result(state, atol)
  return Decodability(rho=primal, separators=u, dual_bound=dual,
                      gap=dual - primal, decodable=primal > atol)


def settled(result: Decodability, tol: float, rel_tol: float = 0.0,
            atol: float = 1e-6, floor: float = 0.0) -> np.ndarray:
  """``(P,)`` bool (host): values whose certificate is closed, i.e. gap at
  most ``max(tol, rel_tol * dual_bound)``, or dual bound at or below
  ``max(atol, floor, tol)`` (rho known to be below it); a re-solve with a
  larger active set would not change them."""
  gap, dual = np.asarray(result.gap), np.asarray(result.dual_bound)
  return (gap <= np.maximum(tol, rel_tol * dual)) | (
      dual <= max(atol, floor, tol))


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
