r"""Structured margin certificate of a clipped-gate encoder-decoder MLP.

The dense check (:func:`~factstore_jax.constructions.encoder_decoder.verify`)
evaluates every key against every hidden neuron and every value:
``O(N (h d + P d))``, about 70 TFLOP at 2^20 facts. The certificate gets a
lower bound on every fact's margin from the construction's structure
instead (docs/design.md, "Certificate"):

1. **Identity.** The dense weights must equal, bit for bit, the assembly of
   the gadgets (``prune_dead(assemble_gadgets(parts, decoder))``); every
   statement below is about those weights. A corrupted weight is rejected
   here.
2. **Steps.** Each key's projection ``t = <g, x>`` is computed once. The
   dense pre-activation of cut ``j`` is ``fl(fl(x . w_j) + b_j)`` with
   ``w_j = fl(g s_j)``; standard dot-product bounds put it within
   ``s_j kappa(x)`` of ``s_j t + b_j``, so the step is exactly 1 if
   ``t - kappa >= L_j = (1/(1-u) - b_j)/s_j`` and exactly 0 if
   ``t + kappa <= U_j = -b_j/s_j``. With prefix maxima of ``L`` and suffix
   minima of ``U`` every key is checked against all cuts in ``O(1)``.
3. **Codes.** In exact arithmetic the dense code of a key of bucket ``o``
   is ``P_o x`` with ``P_o`` the prefix sum of the stored differences
   ``M_j - M_{j-1}``; its error ``|P_o x - c|`` is computed per bucket in
   float64 with its own rounding bound. Float32 evaluation adds at most
   ``(gamma_d + gamma_{o+1}(1 + gamma_d)) A_o |x|`` per coordinate
   (``A_o`` the prefix sum of ``|M_j - M_{j-1}|``), whatever the summation
   order: the *worst-case* allowance. It grows like ``o^2 u`` and exceeds
   the margins beyond ~10^5 facts (docs/design.md gives the measurements);
   then the allowance is *sampled*: a Euclidean ball of ``SAMPLED_SAFETY``
   times the largest float32-vs-exact code deviation ``|dense - exact|_2``
   of the dense model on the keys of the top buckets (the longest sums) and
   a uniform sample. That one is a measured
   bound, not a proof, and the certificate says which one it used.
4. **Values.** Once per used value ``f``: ``G_f = min_{j != f} <c_f, w_f -
   w_j>`` over the projected table ``w = V D`` (float32 matmuls, with
   rounding bounds). A key's margin is at least ``G_f - |B| Delta_f`` minus
   the decoder's and the logits' rounding, where ``B`` bounds its code error
   and ``Delta_f >= max_j |w_f - w_j|``.

Cost: ``O(N m d)`` for the codes, ``O(P_used P m)`` for the values, no
``N h d`` or ``N P d`` term. The bound never exceeds the margin the dense
float32 evaluation computes (tested against :func:`verify` up to 65,536
facts, with the worst-case allowance; with the sampled one this holds
empirically).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from factstore_jax import sharding
from factstore_jax.constructions import gadgets
from factstore_jax.precision import full_precision

Array = jax.Array

U32 = 2.0 ** -24          # unit roundoff of float32
U64 = 2.0 ** -53
SAMPLED_SAFETY = 8.0      # sampled float32 allowance = this x max deviation
SAMPLE_KEYS = 2048        # uniform keys of the sampled allowance
SAMPLE_TOP_BUCKETS = 2    # plus every key of this many top buckets
TOP_RIVALS = 16           # rivals per value checked with the exact code


def gamma(k, u: float = U32):
  """``k u / (1 - k u)``, the classic bound for ``k`` rounded operations."""
  k = np.asarray(k, np.float64)
  return k * u / (1.0 - k * u)


class Certificate(NamedTuple):
  """What :func:`certify` proved. Per-key arrays are ``(N,)`` numpy."""
  margins: np.ndarray       # lower bounds on the margins (-inf: not certified)
  output_norms: np.ndarray  # upper bounds on |g(x)| (for normalized margins)
  code_bounds: np.ndarray   # bound on max_r |E_r(x) - c_r| incl. float32
  steps_ok: np.ndarray      # every step of the key certified exactly 0 / 1
  identical: bool           # dense weights == assembly of the gadgets
  step_slack: float         # min distance of t from a ramp, minus kappa
  float32_bound: str        # 'worst-case' (any order) or 'sampled'
  float32_worst_case: float   # max worst-case float32 code allowance
  float32_sampled: float      # max measured |dense - exact code|_2
  exact_code_error: float     # max exact-arithmetic code error bound

  @property
  def min_margin(self) -> float:
    return float(self.margins.min()) if self.margins.size else math.inf


def _same(a, b) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  return a.shape == b.shape and a.dtype == b.dtype and bool(
      np.array_equal(a, b))


def weights_identical(model, assembled) -> bool:
  """Whether every dense array of ``model`` equals ``assembled``'s, bitwise."""
  return (model.activation == assembled.activation and
          model.window == assembled.window and
          all(_same(getattr(model, n), getattr(assembled, n)) for n in
              ('w_gate', 'b_gate', 'w_up', 'routing', 'decoder')))


def step_thresholds(scale: np.ndarray, bias: np.ndarray, u: float = U32):
  """``(lo (n,), hi (n,))``: a key of bucket ``o`` with projection ``t`` and
  float allowance ``kappa`` has every step exactly right iff
  ``t - kappa >= lo[o]`` and ``t + kappa <= hi[o]`` (sufficient).

  ``lo[o] = max_{1<=j<=o} (1/(1-u) - b_j)/s_j`` (steps at or below its
  bucket reach 1), ``hi[o] = min_{j>o} -b_j/s_j`` (later steps stay 0);
  rounded outwards.
  """
  s = np.asarray(scale, np.float64)
  b = np.asarray(bias, np.float64)
  n = s.shape[0]
  with np.errstate(divide='ignore', invalid='ignore'):
    up = (1.0 / (1.0 - u) - b[1:]) / s[1:]
    down = -b[1:] / s[1:]
  bad = ~(np.isfinite(up) & np.isfinite(down) & (s[1:] > 0))
  up = np.where(bad, np.inf, up + 8 * U64 * np.abs(up))
  down = np.where(bad, -np.inf, down - 8 * U64 * np.abs(down))
  lo = np.concatenate([[-np.inf], np.maximum.accumulate(up)]) if n > 1 else (
      np.array([-np.inf]))
  hi = np.concatenate([np.minimum.accumulate(down[::-1])[::-1], [np.inf]])
  if not (s[0] == 0 and b[0] == 1):   # bucket 0's step must be exactly 1
    lo = np.full(n, np.inf)
  return lo, hi


def _projection_bound(direction: np.ndarray,
                      u: float = U32) -> tuple[np.ndarray, float]:
  """Nonzero coordinates of ``g`` and the factor ``c`` with
  ``|fl(x . fl(g s)) / s - <g, x>| <= c sum_k |x_k g_k|``."""
  g = np.asarray(direction, np.float64)
  return np.flatnonzero(g), float(gadgets.projection_rounding(g, u))


@jax.jit
@full_precision
def _projected(values, decoder):
  """``w = V D (P, m)``, ``max_j |(|V| |D|)_j|``, ``|v_j|``."""
  w = values @ decoder
  err_w = jnp.abs(values) @ jnp.abs(decoder)
  return (w, jnp.max(jnp.linalg.norm(err_w, axis=1)),
          jnp.linalg.norm(values, axis=1))


# The value stage's pass over all P competitors: this many per tile (one
# (U, m) x (m, T) product, reduced at once to one maximum per block).
RIVAL_TILE = 4096
RIVAL_BLOCK = 64


@functools.partial(jax.jit, static_argnames=('k',))
@full_precision
def _rivals(codes, w, used, k: int, one_rows, one_coef, one_w):
  """The ``k`` closest rivals of each value in ``used (U,)`` (sorted):
  ``(U, k)`` indices and separations ``<c_f, w_f> - <c_f, w_j>`` as float32
  computes them (ascending), and ``(U,)`` a bound: every competitor not
  among the first ``k - 1`` has a separation at least the smaller of the
  last one and the bound (up to the rounding of one computed score).

  ``codes (P, m')``/``w (P, m')`` hold the code columns with several
  nonzeros; a column with a single nonzero (a patched straggler's one-hot
  code) comes apart, as ``one_rows (S,)`` (its row), ``one_coef (S,)``
  (the entry) and ``one_w (P, S)`` (its column of ``w``), and is added to
  its row's scores alone instead of costing ``P`` multiply-adds per row.

  For ``P`` of several tiles the scores are never stored whole: a tiled
  pass keeps one maximum per block of ``RIVAL_BLOCK`` competitors, the
  ``k`` best blocks are rescored, and the bound is the separation of the
  smallest of their maxima (a competitor of any other block scores at most
  that).
  """
  p, num = w.shape[0], used.shape[0]
  c = codes[used]                                            # (U, m')
  s_ar = jnp.arange(one_rows.shape[0])
  pos = jnp.clip(jnp.searchsorted(used, one_rows), 0, num - 1)
  pos = jnp.where(used[pos] == one_rows, pos, num)           # else dropped
  row_of = jnp.minimum(pos, num - 1)
  own = jnp.einsum('um,um->u', c, w[used]).at[pos].add(
      one_coef * one_w[one_rows, s_ar], mode='drop')

  def scores(j):  # (U, n) competitors (may be >= P: masked) -> (U, n)
    s = jnp.einsum('um,unm->un', c, w[jnp.minimum(j, p - 1)])
    s = s.at[pos].add(one_coef[:, None] * one_w[
        jnp.minimum(j[row_of], p - 1), s_ar[:, None]], mode='drop')
    return jnp.where((j == used[:, None]) | (j >= p), -jnp.inf, s)

  tile, block = RIVAL_TILE, RIVAL_BLOCK
  if p < 2 * tile or k * block * 4 > p:   # small: every score at once
    every = c @ w.T                                          # (U, P)
    every = every.at[pos].add(one_coef[:, None] * one_w.T, mode='drop')
    every = jnp.where(jnp.arange(p)[None, :] == used[:, None], -jnp.inf,
                      every)
    idx = jax.lax.top_k(every, k)[1]
    top = jnp.take_along_axis(every, idx, axis=1)
    return idx, own[:, None] - top, own - top[:, -1]
  num_tiles = -(-p // tile)
  wp = jnp.pad(w, ((0, num_tiles * tile - p), (0, 0)))
  one_wp = jnp.pad(one_w, ((0, num_tiles * tile - p), (0, 0)))

  def tile_maxima(t):
    s = c @ jax.lax.dynamic_slice_in_dim(wp, t * tile, tile).T   # (U, T)
    s = s.at[pos].add(one_coef[:, None] * jax.lax.dynamic_slice_in_dim(
        one_wp, t * tile, tile).T, mode='drop')
    j = t * tile + jnp.arange(tile)
    s = jnp.where((j[None, :] == used[:, None]) | (j[None, :] >= p),
                  -jnp.inf, s)
    return jnp.max(s.reshape(num, tile // block, block), axis=2)

  maxima = jax.lax.map(tile_maxima, jnp.arange(num_tiles))
  maxima = jnp.moveaxis(maxima, 0, 1).reshape(num, -1)       # (U, blocks)
  # Values are read off the inputs: using top_k's values output made this
  # 2.5x slower on CPU (and the P < 8,192 case 40x).
  chosen = jax.lax.top_k(maxima, k)[1]
  least = jnp.min(jnp.take_along_axis(maxima, chosen, axis=1), axis=1)
  j = (chosen[:, :, None] * block + jnp.arange(block)).reshape(num, -1)
  rescored = scores(j)
  which = jax.lax.top_k(rescored, k)[1]
  top = jnp.take_along_axis(rescored, which, axis=1)
  return jnp.take_along_axis(j, which, axis=1), own[:, None] - top, own - least


class ValueCache:
  """The last value stage computed, for certificates of the same table.

  A construction that repairs or rebuilds its buckets certifies again with
  the same values, decoder and codes: the value stage (the closest rivals
  of every used value, ~12 s of a 2^18-fact certificate at P = 65,536) is
  then reused. It is reused only if every input equals the stored one
  (compared on the host), so a cache can never hand back another table's
  bounds.
  """

  def __init__(self):
    self._inputs, self._bounds = None, None
    self.hits = 0

  def get(self, inputs, compute):
    """The bounds for ``inputs`` (a tuple of arrays and numbers):
    the stored ones if every input equals the stored inputs, else
    ``compute()`` (stored for next time)."""
    inputs = tuple(np.asarray(a) if not isinstance(a, float) else a
                   for a in inputs)
    if self._inputs is not None and len(inputs) == len(self._inputs) and all(
        np.array_equal(a, b) and np.result_type(a) == np.result_type(b)
        for a, b in zip(inputs, self._inputs)):
      self.hits += 1
      return self._bounds
    self._bounds = compute()
    self._inputs = inputs
    return self._bounds


@functools.partial(jax.jit, static_argnames=('k',))
def _rivals_of(codes, w, one_rows, one_coef, one_w, used, *, k: int):
  """:func:`_rivals` with the rows last (for :func:`sharding.shard_rows`)."""
  return _rivals(codes, w, used, k, one_rows, one_coef, one_w)


class _Values(NamedTuple):
  """Host float64 quantities of the value table the margin bound needs."""
  w: np.ndarray         # (P, m) float32 V D, widened
  ew: float             # max_j |w_j - (V D)_j| (exact V D)
  wn: np.ndarray        # (P,) upper bounds on |(V D)_j|
  wmax: float
  vn: np.ndarray        # (P,) upper bounds on |v_j|
  vmax: float
  rivals: np.ndarray    # (U, K) closest rivals of each used value
  rest: np.ndarray      # (U,) lower bound on the (K+1)-th separation
  cn: np.ndarray        # (U,) upper bounds on |c_f|


def _value_bounds(values, decoder, codes, used, k: int, u: float = U32,
                  chunk: int = 256) -> _Values:
  dim, m = decoder.shape
  w, ew, vn = _projected(values, decoder)
  k1 = min(k + 1, values.shape[0] - 1)
  codes_np = np.asarray(codes)
  cn = np.linalg.norm(codes_np[used].astype(np.float64), axis=1) * (
      1 + gamma(m + 1, u))
  if k1 > 0:
    # Columns by their nonzeros: several (the JL code), one (a patched
    # straggler's one-hot code: added to its own row only), none.
    nnz = np.count_nonzero(codes_np, axis=0)
    dense, one = np.flatnonzero(nnz > 1), np.flatnonzero(nnz == 1)
    one_rows = np.argmax(codes_np[:, one] != 0, axis=0)
    mesh = sharding.local_mesh()
    shared = sharding.replicate(
        (jnp.asarray(codes_np[:, dense]), w[:, dense],
         jnp.asarray(one_rows, jnp.int32),
         jnp.asarray(codes_np[one_rows, one]), w[:, one]), mesh)
    # One chunk per local device per call (CPU cores exposed as devices
    # run one each); every chunk is the same program as on its own.
    step = chunk * mesh.size
    idx, sep, bound = [], [], []
    for start in range(0, len(used), step):
      rows = used[start:start + step]
      part = jax.device_get(sharding.shard_rows(
          _rivals_of, shared, (jnp.asarray(rows, jnp.int32),), mesh=mesh,
          static_kwargs=dict(k=k1), row_multiple=min(chunk, len(rows))))
      idx.append(part[0]), sep.append(part[1]), bound.append(part[2])
    idx, sep = np.concatenate(idx), np.concatenate(sep).astype(np.float64)
    sep[:, -1] = np.minimum(sep[:, -1], np.concatenate(bound))
  else:   # a single value: no rivals
    idx, sep = np.zeros((len(used), 0), np.int64), np.zeros((len(used), 0))
  w = np.asarray(w, np.float64)
  ew = float(ew) * float(gamma(dim, u)) * (1 + gamma(dim + m + 2, u))
  wn = np.linalg.norm(w, axis=1) * (1 + gamma(m + 1, U64)) + ew
  wmax = float(wn.max())
  vn = np.asarray(vn, np.float64) * (1 + gamma(dim + 1, u))
  if k1 == k + 1:
    # Each <c_f, w_j> as float32 computed it: operand error (ew) and the
    # dot's (gamma_m), twice, plus the subtraction.
    s = sep[:, -1]
    rest = s - (2 * cn * (ew + float(gamma(m, u)) * wmax) * (1 + 2 * u) +
                2 * u * (np.abs(s) + 2 * cn * wmax))
  else:   # every rival is among the closest
    rest = np.full(len(used), np.inf)
  return _Values(w=w, ew=ew, wn=wn, wmax=wmax, vn=vn, vmax=float(vn.max()),
                 rivals=idx[:, :k], rest=rest, cn=cn)


def _key_margins(code, bound, f, slot, codes, vals: _Values, decoder_norms,
                 u: float = U32, radius=0.0):
  """Margin lower bounds of keys with exact-arithmetic codes ``code (b, m)``
  (computed in float64) whose dense float32 codes lie within ``bound (b,
  m)`` of them per coordinate plus an extra Euclidean ``radius`` (a scalar
  or ``(b,)``). Returns ``(lower (b,), |g(x)| upper (b,), code bound (b,))``.
  """
  d_spec, d_frob, m, dim = decoder_norms
  radius = np.broadcast_to(np.asarray(radius, np.float64), (len(f),))
  cf = codes[f]                                             # (b, m)
  wf = vals.w[f]                                            # (b, m)
  diff = wf[:, None, :] - vals.w[vals.rivals[slot]]         # (b, K, m)
  c_norm = np.linalg.norm(code, axis=1) + np.linalg.norm(bound, axis=1) + \
      radius
  near = (np.einsum('bm,bkm->bk', code, diff)
          - np.einsum('bm,bkm->bk', bound, np.abs(diff))
          - radius[:, None] * np.linalg.norm(diff, axis=2)
          - float(gamma(m + 1, U64)) * np.einsum('bm,bkm->bk', np.abs(code),
                                                 np.abs(diff))
          - (2 * vals.ew * c_norm)[:, None])
  near = near.min(axis=1) if near.shape[1] else np.full(len(f), np.inf)
  full = np.abs(code - cf) + bound                          # vs c_f
  far = vals.rest[slot] - (np.linalg.norm(full, axis=1) + radius) * (
      vals.wn[f] + vals.wmax)
  dy = float(gamma(m, u)) * d_frob * c_norm
  y_norm = d_spec * c_norm + dy
  lower = (np.minimum(near, far) - dy * (vals.vn[f] + vals.vmax)
           - (2 * float(gamma(dim, u)) + 2 * u) * y_norm * vals.vmax * 1.01)
  return lower, y_norm, full.max(axis=1) + radius


def certify(parts, model, assembled, keys, values, mapping, codes, *,
            stream_size: int = 65536, seed: int = 0,
            progress=None, value_cache: ValueCache | None = None
            ) -> Certificate:
  """Certificate of every fact of a clipped-gate construction (host-level).

  Args:
    parts: the construction's gadgets (``buckets``, ``maps (n, m, d)``,
      ``scale``/``bias (n, 1)``).
    model: the dense :class:`EncoderDecoder` to certify.
    assembled: ``prune_dead(assemble_gadgets(parts, model.decoder))``; the
      certificate holds for ``model`` only if it equals this bitwise.
    keys: ``(N, d)``; values: ``(P, d)``; mapping: ``(N,)``.
    codes: ``(P, m)`` value codes.
    stream_size: keys per host chunk of the step check.
    seed: seed of the uniform key sample of the sampled float32 allowance.
    progress: optional ``progress(done, total)`` over the buckets.
    value_cache: optional :class:`ValueCache`: the value stage (which
      depends on the values, decoder, codes and used values only, not on
      the buckets) is read from it when those are equal to its last ones.

  Returns:
    :class:`Certificate`.
  """
  if model.activation != 'clipped' or model.window != 1:
    raise ValueError('the structured certificate needs the clipped gate '
                     f'(got {model.activation!r}); use the dense check')
  keys_np = np.asarray(keys)
  mapping_np = np.asarray(mapping).astype(np.int64)
  codes_np = np.asarray(codes, np.float64)
  n_keys, dim = keys_np.shape
  identical = weights_identical(model, assembled)
  index = np.asarray(parts.buckets.index)
  valid = np.asarray(parts.buckets.valid)
  n = index.shape[0]
  owner = gadgets.key_owner(index, valid, n_keys)   # -1: in no bucket

  # Steps.
  u = float(np.finfo(np.dtype(model.w_up.dtype)).eps) / 2   # model's roundoff
  lo, hi = step_thresholds(np.asarray(parts.scale)[:, 0],
                           np.asarray(parts.bias)[:, 0], u)
  g = np.asarray(parts.buckets.direction, np.float64)
  nz, c_proj = _projection_bound(g, u)
  steps_ok = np.zeros(n_keys, bool)
  slack = np.inf
  for start in range(0, n_keys, stream_size):
    x = keys_np[start:start + stream_size][:, nz].astype(np.float64)
    t = x @ g[nz]
    a = np.abs(x) @ np.abs(g[nz]) * (1 + gamma(len(nz) + 1, U64))
    kappa = (c_proj + float(gamma(len(nz), U64))) * a * (1 + 1e-12)
    o = owner[start:start + stream_size]
    room = np.minimum(t - kappa - lo[o], hi[o] - t - kappa)
    steps_ok[start:start + stream_size] = (room >= 0) & (o >= 0)
    slack = min(slack, float(room.min()))

  # Values: projected table, closest rivals of every used value.
  used = np.unique(mapping_np)
  slot_of = np.searchsorted(used, mapping_np)
  compute = lambda: _value_bounds(jnp.asarray(values), model.decoder,
                                 jnp.asarray(codes), used, TOP_RIVALS, u)
  if value_cache is None:
    vals = compute()
  else:
    vals = value_cache.get((values, model.decoder, codes, used, u), compute)
  d_np = np.asarray(model.decoder, np.float64)
  m = d_np.shape[1]
  norms = (float(np.linalg.norm(d_np, 2)) * (1 + 1e-6),
           float(np.linalg.norm(d_np)) * (1 + 1e-6), m, d_np.shape[0])

  def buckets(only=None):
    """Per bucket: ``(o, rows, exact code, its rounding bound, |x| . A_o)``
    in float64, with the prefix sums carried along; ``only (N,)`` bool
    restricts the rows."""
    prefix, prefix_abs = np.zeros((m, dim)), np.zeros((m, dim))
    g64d, g64o = float(gamma(dim + 1, U64)), float(gamma(n + 1, U64))
    for o, tele_o in _telescoped(parts.maps):   # the stored w_up
      prefix += tele_o
      prefix_abs += np.abs(tele_o)
      rows = index[o][valid[o]]
      if only is not None:
        rows = rows[only[rows]]
      if not rows.size:
        continue
      k = keys_np[rows].astype(np.float64)
      ka = np.abs(k) @ prefix_abs.T
      code = k @ prefix.T
      err = (g64d * (np.abs(k) @ np.abs(prefix.T)) + g64o * ka) * (1 + 1e-12)
      yield o, rows, code, err, ka

  # The sampled float32 allowance: dense codes vs exact ones.
  top = np.arange(max(0, n - SAMPLE_TOP_BUCKETS), n)
  rng = np.random.default_rng(seed)
  sample = np.unique(np.concatenate([
      rng.choice(n_keys, min(SAMPLE_KEYS, n_keys), replace=False),
      index[top][valid[top]]]))
  in_sample = np.zeros(n_keys, bool)
  in_sample[sample] = True
  exact_s = {}
  for _, rows, code, err, _ in buckets(only=in_sample):
    for r, c, e in zip(rows, code, err):
      exact_s[int(r)] = (c, e)
  dense = _encode_rows(model, keys_np[sample])
  # The Euclidean norm of the deviation: a per-coordinate maximum applied to
  # every coordinate would cost a factor up to sqrt(m) more.
  sampled = max((float(np.linalg.norm(dense[i] - exact_s[int(r)][0]))
                 for i, r in enumerate(sample)), default=0.0)

  margins = {'worst-case': np.empty(n_keys), 'sampled': np.empty(n_keys)}
  y_norms = {k: np.empty(n_keys) for k in margins}
  code_bounds = {k: np.empty(n_keys) for k in margins}
  exact_err, worst_max = 0.0, 0.0
  for o, rows, code, err, ka in buckets():
    worst = float(gamma(dim, u) + gamma(o + 1, u) * (1 + gamma(dim, u))) * (
        ka * (1 + 1e-12))
    worst_max = max(worst_max, float(worst.max()))
    f, slot = mapping_np[rows], slot_of[rows]
    exact_err = max(exact_err, float(np.max(np.abs(code - codes_np[f]) + err)))
    for kind, allowance, radius in (
        ('worst-case', worst, 0.0),
        ('sampled', 0.0, SAMPLED_SAFETY * sampled)):
      lower, y_norm, cb = _key_margins(code, err + allowance, f, slot,
                                       codes_np, vals, norms, u, radius)
      margins[kind][rows], y_norms[kind][rows] = lower, y_norm
      code_bounds[kind][rows] = cb
    if progress is not None and (o + 1) % 256 == 0:
      progress(o + 1, n)
  if progress is not None:
    progress(n, n)

  kind = 'worst-case'
  ok = steps_ok & identical
  if not (np.all(ok) and margins[kind].min() > 0) and (
      margins['sampled'].min() > 0):
    kind = 'sampled'
  return Certificate(
      margins=np.where(ok, margins[kind], -np.inf),
      output_norms=y_norms[kind], code_bounds=code_bounds[kind],
      steps_ok=steps_ok, identical=identical, step_slack=slack,
      float32_bound=kind, float32_worst_case=worst_max,
      float32_sampled=sampled, exact_code_error=exact_err)


# Buckets per telescoped chunk the certificate holds at a time.
TELESCOPE_CHUNK = 256


@functools.partial(jax.jit, static_argnames=('size',))
def _telescope_chunk(maps, start, *, size: int):
  """Rows ``start .. start + size - 1`` of :func:`gadgets.telescope`, by
  the same subtraction (``1 <= start <= n - size``)."""
  rows = jax.lax.dynamic_slice_in_dim(maps, start, size)
  return rows - jax.lax.dynamic_slice_in_dim(maps, start - 1, size)


def _telescoped(maps):
  """``(o, M_o - M_{o-1})`` for every bucket ``o`` (host float32 arrays,
  bitwise :func:`gadgets.telescope`), computed ``TELESCOPE_CHUNK`` buckets
  at a time: the whole ``(n, m, d)`` array is the size of the maps (2 GiB
  at 2^22 facts)."""
  n = maps.shape[0]
  if n == 0:
    return
  yield 0, np.asarray(maps[0])
  if n == 1:
    return
  size = min(TELESCOPE_CHUNK, n - 1)
  for start in range(1, n, size):
    # The last chunk ends at n (overlapping the one before): one shape,
    # and no padded copy of the maps.
    first = min(start, n - size)
    chunk = np.asarray(_telescope_chunk(maps, first, size=size))
    for o in range(start, min(start + size, n)):
      yield o, chunk[o - first]


@jax.jit
@full_precision
def _encode(model, x):
  return model.encode(x)


# Bytes of hidden activations one call of the sampled dense encoding may
# hold: the sample is encoded in chunks of as many keys (the hidden layer
# grows with N: at 2^19 facts the whole sample at once took 1.3 GiB).
ENCODE_BYTES = 128 * 2**20


def _encode_rows(model, x: np.ndarray) -> np.ndarray:
  """Dense float32 codes ``(S, m)`` (float64) of the keys ``x (S, d)``,
  in chunks of a fixed size (the last padded; one compiled shape)."""
  hidden = model.w_up.shape[1] * np.dtype(model.w_up.dtype).itemsize
  size = int(max(1, min(len(x), ENCODE_BYTES // (3 * hidden))))
  pad = -len(x) % size
  xp = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad else x
  out = [np.asarray(_encode(model, jnp.asarray(xp[i:i + size])), np.float64)
         for i in range(0, len(xp), size)]
  return np.concatenate(out)[:len(x)] if out else np.zeros(
      (0, model.decoder.shape[1]))

