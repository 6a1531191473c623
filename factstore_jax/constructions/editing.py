"""Bucket-local editing of closed-form encoder-decoder MLPs (DESIGN §3, §7).

:func:`edit` inserts, updates and deletes facts of a :class:`Construction`
built by :func:`encoder_decoder.construct` by re-solving only the buckets the
changes fall in, and returns a new construction (nothing is modified).

Why other facts are untouched, bit for bit. Off its bucket a clipped-gate
window's two neurons are either both silent (keys below the bucket) or both
saturated at exactly 1 with opposite up-weights ``+-(M_j x)_r`` (keys above).
The factorised model sums each window's two neurons before routing
(:func:`encoder_decoder.route`), so such a pair adds exactly 0 whatever
``M_j`` is and whatever order the backend's dot sums the rest in. So
``model(x)`` (:class:`EncoderDecoder`) of every fact outside the re-solved
buckets is bit-identical after an edit that keeps the hidden width,
evaluated on the same batch of keys. A bucket split adds ``2 m`` hidden
neurons: the projections ``x W`` are then differently-shaped matmuls, which
may round each fact's own window differently (~1e-6 here). The folded gated MLP
(``construction.mlp``) sums each pair through ``w_down = routing D^T``, where
a fused multiply-add keeps one product's rounding error: its outputs above an
edited bucket move by float rounding (~1e-7 here), far below any margin.

Semantics of a change list (all indices refer to the fact set passed in;
deletions are applied first, then updates, then inserts):

* ``Delete(i)`` removes fact ``i``; later facts shift down. Its bucket is
  re-solved on the remaining keys; the deleted key's output may become
  anything.
* ``Update(i, value)`` maps key ``i`` to ``value``; its bucket is re-solved.
* ``Insert(key, value)`` appends a fact (inserted facts follow the kept old
  ones, in list order) to the bucket whose window covers ``<g, key>``.
* ``value`` is an index into the value table or a new value vector ``(d,)``,
  appended to the table (in list order). Its code is its separator on the
  projected table ``V D`` with the same decoder; it must be decodable
  (``rho > 0``) and every used code must still beat it, with a certified
  margin ``<c_j, (V D)_j - (V D)_new> - err * ||(V D)_j - (V D)_new||_1 > 0``
  (``err`` the worst code error), else :class:`ConstructionError` asks for a
  full rebuild (a larger code dim).

Insertion policy: a key whose projection lies inside a bucket (with the
construction's slack to both ramps) joins it with no gate change. A key in
the gap between two buckets joins the side that leaves the wider sub-gap (the
other side if that bucket is full) and the shared ramp moves into that
sub-gap, with the same slack: the neighbour gets new gate rows but keeps its
map, and its keys stay exactly saturated, so their outputs stay bit-identical
too. A bucket that would exceed the bucket size ``b`` is split at the widest
gap near its middle: the upper part becomes a new bucket ``j + 1`` whose
``2 m`` hidden neurons are inserted right after bucket ``j``'s (later buckets
are renumbered, their weights copied unchanged), keeping the hidden order
along the projection.

Each edit verifies every fact of every bucket it touched (own window exactly
1, the windows of the buckets on either side exactly 0, margins against the
whole value table, code error), refits failing buckets in float64 and raises
:class:`ConstructionError` if that fails. Facts elsewhere are not
re-verified: their outputs are those the input construction verified.
Per-bucket minimum margins kept in :class:`BucketStructure` give the new
global report without an ``O(N)`` pass (with new value vectors, the
certified bound above caps those of untouched buckets).

Cost: ``O(A b d (b + m) + A b P d)`` for ``A`` touched buckets of ``b`` keys
and ``P`` values, plus one copy of the dense weights (``O(h d)``, no
arithmetic; ``donate=True`` writes in place instead), ``O(N)`` host indexing
and, for new value vectors, their decodability solve; never a rebuild. Only the clipped gate is supported: relu
windows cancel only approximately, so one bucket leaks into others.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import threadpoolctl

from factstore_jax import storage
from factstore_jax.constructions import decoders, gadgets
from factstore_jax.constructions import encoder_decoder as ed
from factstore_jax.errors import ConstructionError, FactStoreError
from factstore_jax.factsets import FactSet
from factstore_jax.mlp import get_activation, num_params
from factstore_jax.precision import full_precision

Array = jax.Array


class Insert(NamedTuple):
  """New fact: ``key (d,)`` maps to ``value`` (index or new vector ``(d,)``)."""
  key: Any
  value: Any


class Update(NamedTuple):
  """Fact ``index`` now maps to ``value`` (index or new vector ``(d,)``)."""
  index: Any
  value: Any


class Delete(NamedTuple):
  """Removes fact ``index``."""
  index: Any


class EditReport(NamedTuple):
  """What an edit did and what it verified (bucket ids in the new numbering).

  ``facts``/``margins`` cover every fact of every touched bucket (re-solved or
  re-gated), the only facts whose outputs may differ from before.
  """
  num_inserted: int
  num_updated: int                # updates that changed a value
  num_deleted: int
  new_values: tuple               # indices of value vectors appended
  solved_buckets: tuple           # buckets whose maps were re-solved
  regated_buckets: tuple          # buckets whose window moved, map kept
  new_buckets: tuple              # buckets created by splits
  refit_buckets: tuple            # re-solved again in float64
  facts: np.ndarray               # (F,) checked facts (new fact set indices)
  margins: np.ndarray             # (F,) their margins
  accuracy: float                 # over the checked facts
  min_margin: float               # over the checked facts
  min_normalized_margin: float
  code_error: float               # max |E(k) - c_f| over the checked facts
  gate_slack: float               # min distance of their ramps from (0, 1)
  new_value_margin: float         # certified bound, other facts vs new values
  seconds: float

  def as_dict(self) -> dict:
    out = {}
    for k, v in self._asdict().items():
      if isinstance(v, np.ndarray):
        v = v.tolist()
      out[k] = list(v) if isinstance(v, tuple) else v
    return out


# --------------------------------------------------------------------------
# Validation (host side, before any work).


class _Changes(NamedTuple):
  deletes: np.ndarray       # (D,) sorted fact indices
  updates: dict             # fact index -> value index (new ones >= P)
  inserts: list             # [(key (d,) numpy, value index)]
  new_vectors: np.ndarray   # (Q, d) appended value vectors


def _as_index(x, upper: int, name: str) -> int:
  a = np.asarray(x)
  if a.ndim != 0 or a.dtype == np.bool_ or not np.issubdtype(a.dtype,
                                                             np.integer):
    raise FactStoreError(f'{name} must be an integer, got {x!r}')
  i = int(a)
  if not 0 <= i < upper:
    raise FactStoreError(f'{name} = {i} is out of range [0, {upper})')
  return i


def _as_vector(x, dim: int, dtype, name: str) -> np.ndarray:
  try:
    a = np.asarray(x)
  except (TypeError, ValueError) as e:
    raise FactStoreError(f'{name} could not be converted to an array: {e}')
  if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.integer) or
                                 jnp.issubdtype(a.dtype, jnp.floating)):
    raise FactStoreError(f'{name} must hold real numbers, got dtype {a.dtype}')
  if a.shape != (dim,):
    raise FactStoreError(f'{name} must have shape ({dim},), got {a.shape}')
  a = a.astype(np.float64)
  if not np.isfinite(a).all():
    raise FactStoreError(f'{name} has a non-finite entry')
  return a.astype(dtype)


def _parse_changes(changes, n_keys: int, n_values: int, dim: int,
                   dtype) -> _Changes:
  if isinstance(changes, (Insert, Update, Delete)):
    changes = [changes]
  if not isinstance(changes, Sequence) or isinstance(changes, str):
    raise FactStoreError('changes must be a list of Insert, Update or Delete, '
                         f'got {type(changes).__name__}')
  deletes, updates, inserts, vectors = set(), {}, [], []

  def value_ref(v, name):
    if np.ndim(v) == 0:
      return _as_index(v, n_values, name)
    vectors.append(_as_vector(v, dim, dtype, name))
    return n_values + len(vectors) - 1

  for c, change in enumerate(changes):
    where = f'changes[{c}]'
    if isinstance(change, Delete):
      i = _as_index(change.index, n_keys, f'{where}.index (Delete)')
      if i in deletes:
        raise FactStoreError(f'{where}: fact {i} is deleted twice')
      if i in updates:
        raise FactStoreError(f'{where}: fact {i} is both updated and deleted')
      deletes.add(i)
    elif isinstance(change, Update):
      i = _as_index(change.index, n_keys, f'{where}.index (Update)')
      if i in deletes:
        raise FactStoreError(f'{where}: fact {i} is both deleted and updated')
      if i in updates:
        raise FactStoreError(f'{where}: fact {i} is updated twice')
      updates[i] = value_ref(change.value, f'{where}.value (Update)')
    elif isinstance(change, Insert):
      key = _as_vector(change.key, dim, dtype, f'{where}.key (Insert)')
      inserts.append((key, value_ref(change.value, f'{where}.value (Insert)')))
    else:
      raise FactStoreError(f'{where} must be Insert, Update or Delete, got '
                           f'{type(change).__name__}')
  for q, (key, _) in enumerate(inserts):
    for r in range(q):
      if np.array_equal(key, inserts[r][0]):
        raise FactStoreError(f'inserted keys {r} and {q} are identical')
  new_vectors = (np.stack(vectors) if vectors else np.zeros((0, dim), dtype))
  return _Changes(np.array(sorted(deletes), np.int64), updates, inserts,
                  new_vectors)


def _check_inputs(construction, factset):
  structure = getattr(construction, 'structure', None)
  if structure is None:
    raise FactStoreError(
        'construction carries no bucket structure; build it with '
        'encoder_decoder.construct (or an earlier edit)')
  if construction.model.activation != 'clipped':
    raise FactStoreError(
        'bucket-local editing needs the clipped gate (activation '
        f"'clipped'), got {construction.model.activation!r}: relu windows "
        'cancel only approximately, so one bucket leaks into the others')
  if not isinstance(factset, tuple) or len(factset) != 3:
    raise FactStoreError('factset must be a FactSet (keys, values, mapping)')
  keys, values, mapping = (np.asarray(a) for a in factset)
  rep = construction.report
  n_keys, n_values = rep.num_facts, construction.codes.shape[0]
  if keys.shape != (n_keys, rep.dim):
    raise FactStoreError(
        f'factset keys have shape {keys.shape}; the construction stores '
        f'{n_keys} facts of dimension {rep.dim}')
  if values.shape != (n_values, rep.dim):
    raise FactStoreError(
        f'factset values have shape {values.shape}; the construction has '
        f'codes for {n_values} values of dimension {rep.dim}')
  if mapping.shape != (n_keys,) or not np.issubdtype(mapping.dtype,
                                                     np.integer):
    raise FactStoreError(
        f'factset mapping must be ({n_keys},) integers, got {mapping.shape} '
        f'{mapping.dtype}')
  return structure, keys, values, mapping


# --------------------------------------------------------------------------
# New value vectors.


class _NewValues(NamedTuple):
  values: Array        # (P + Q, d)
  codes: Array         # (P + Q, m)
  rho: Array           # (P + Q,)
  margin: float        # certified bound of old used codes vs new values
  normalized_margin: float


def _add_values(construction, values_dev, values, new_vectors, used_old,
                code_error, tol) -> _NewValues:
  """Codes of appended values and the certificate for the untouched facts.

  ``values_dev`` is the table as given (kept when nothing is appended),
  ``values`` its host copy.
  """
  codes, rho = construction.codes, construction.rho
  if not len(new_vectors):
    return _NewValues(jnp.asarray(values_dev), codes, rho, math.inf,
                      math.inf)
  n_old, n_new = values.shape[0], new_vectors.shape[0]
  decoder = construction.model.decoder
  table = jnp.asarray(np.concatenate([values, new_vectors]))
  new_codes, new_rho = ed.value_codes(table, decoder, tol=tol,
                                      indices=np.arange(n_old, n_old + n_new))
  new_rho = np.asarray(new_rho)
  if (new_rho <= 0).any():
    bad = (n_old + np.flatnonzero(new_rho <= 0)).tolist()
    raise ConstructionError(
        f'new value(s) {bad} are not decodable after projection with code '
        f'dim {decoder.shape[1]} (rho <= 0: not strict vertices of the '
        'projected value hull); rebuild with construct() (it grows the code '
        'dim up to the identity decoder)')
  proj = np.asarray(decoders.project_values(table, decoder), np.float64)
  old_codes = np.asarray(codes, np.float64)
  diff = proj[:n_old, None, :] - proj[None, n_old:, :]       # (P, Q, m)
  lin = np.einsum('pm,pqm->pq', old_codes, diff)
  bound = (lin - code_error * np.abs(diff).sum(-1)).min(1)   # (P,)
  dist = np.linalg.norm(diff, axis=-1)
  rho_old = np.minimum(np.asarray(rho, np.float64),
                       (lin / np.maximum(dist, 1e-30)).min(1))
  used = np.flatnonzero(used_old)
  if used.size and bound[used].min() <= 0:
    bad = used[bound[used] <= 0]
    raise ConstructionError(
        f'new value vector(s) outscore the codes of {bad.size} used value(s) '
        f'(e.g. {bad[:10].tolist()}): facts outside the edited buckets would '
        'no longer be stored; rebuild with construct() (larger code dim)')
  dec = np.asarray(decoder, np.float64)
  out_norm = np.linalg.norm(old_codes @ dec.T, axis=1)
  out_norm += np.linalg.norm(dec) * math.sqrt(dec.shape[1]) * code_error
  margin = float(bound[used].min()) if used.size else math.inf
  norm_margin = (float((bound[used] / out_norm[used]).min()) if used.size
                 else math.inf)
  dtype = codes.dtype
  return _NewValues(
      table, jnp.concatenate([codes, jnp.asarray(new_codes, dtype)]),
      jnp.concatenate([jnp.asarray(rho_old, rho.dtype),
                       jnp.asarray(new_rho, rho.dtype)]),
      margin, norm_margin)


# --------------------------------------------------------------------------
# Host-side plan: which keys go in which bucket, where the ramps sit.


@dataclasses.dataclass
class _Plan:
  """Mutable host copy of the bucket bookkeeping during one edit.

  Bucket members are in "extended" indices: old facts ``0..N-1``, inserted
  facts ``N + q``.
  """
  index: np.ndarray          # (n, b)
  valid: np.ndarray          # (n, b)
  ramp_start: np.ndarray     # (n, 2)
  ramp_width: np.ndarray     # (n, 2)
  ramp_fixed: np.ndarray     # (n, 2)
  direction: np.ndarray      # (d,) float64
  keys: np.ndarray           # (N, d) old keys
  new_keys: list             # inserted keys so far
  slack: float
  origin: list = dataclasses.field(default_factory=list)  # old id, -1 new
  members: dict = dataclasses.field(default_factory=dict)
  solve: set = dataclasses.field(default_factory=set)
  regate: set = dataclasses.field(default_factory=set)
  cut_gaps: list = dataclasses.field(default_factory=list)

  @property
  def num_buckets(self) -> int:
    return self.ramp_start.shape[0]

  @property
  def bucket_size(self) -> int:
    return self.index.shape[1]

  def bucket(self, j: int) -> list:
    if j not in self.members:
      self.members[j] = self.index[j][self.valid[j]].tolist()
    return self.members[j]

  def rows(self, ext) -> np.ndarray:
    n = self.keys.shape[0]
    return np.stack([self.keys[i] if i < n else self.new_keys[i - n]
                     for i in ext]) if len(ext) else np.zeros(
                         (0, self.keys.shape[1]))

  def project(self, ext) -> np.ndarray:
    return self.rows(ext).astype(np.float64) @ self.direction

  def set_ramp(self, j: int, side: int, start, width, fixed: bool):
    self.ramp_start[j, side] = start
    self.ramp_width[j, side] = width
    self.ramp_fixed[j, side] = fixed
    self.regate.add(j)

  def place_cut(self, left: int, right: int, lo: float, hi: float):
    """Puts the ramp shared by ``left`` and ``right`` inside ``(lo, hi)``."""
    gap = hi - lo
    if not gap > 0 or not math.isfinite(gap):
      raise ConstructionError(
          f'no room for a window ramp between buckets {left} and {right} '
          f'(gap {gap:.3g}); rebuild with construct()')
    start, width = lo + self.slack * gap, (1.0 - 2.0 * self.slack) * gap
    self.set_ramp(left, 1, start, width, False)
    self.set_ramp(right, 0, start, width, False)
    self.cut_gaps.append(gap)

  def order(self) -> np.ndarray:
    """Buckets sorted along the projection direction."""
    left = np.where(self.ramp_fixed[:, 0], -np.inf, self.ramp_start[:, 0])
    return np.argsort(left, kind='stable')

  def insert_bucket(self, after: int) -> int:
    """A new empty bucket right after ``after`` (later ids shift by one)."""
    j = after + 1
    ins = lambda a, fill: np.insert(a, j, fill, axis=0)
    self.index, self.valid = ins(self.index, 0), ins(self.valid, False)
    self.ramp_start = ins(self.ramp_start, 0)
    self.ramp_width = ins(self.ramp_width, 1)
    self.ramp_fixed = ins(self.ramp_fixed, False)
    self.origin.insert(j, -1)
    shift = lambda i: i + 1 if i >= j else i
    self.members = {shift(i): v for i, v in self.members.items()}
    self.solve = {shift(i) for i in self.solve}
    self.regate = {shift(i) for i in self.regate}
    self.members[j] = []
    return j


def _make_plan(structure, keys, slack) -> _Plan:
  b = structure.gadgets.buckets
  return _Plan(index=np.array(b.index), valid=np.array(b.valid),
               ramp_start=np.array(b.ramp_start, np.float64),
               ramp_width=np.array(b.ramp_width, np.float64),
               ramp_fixed=np.array(b.ramp_fixed),
               direction=np.asarray(b.direction, np.float64), keys=keys,
               new_keys=[], slack=slack,
               origin=list(range(b.index.shape[0])))


def _owner(plan: _Plan, n_keys: int) -> np.ndarray:
  owner = np.full(n_keys, -1, np.int64)
  rows = np.broadcast_to(np.arange(plan.num_buckets)[:, None],
                         plan.index.shape)
  owner[plan.index[plan.valid]] = rows[plan.valid]
  return owner


def _locate(plan: _Plan, t: float):
  """Bucket whose window covers ``t``, and its neighbours ``(left, right)``."""
  order = plan.order()
  starts = plan.ramp_start[order[1:], 0] + 0.5 * plan.ramp_width[order[1:], 0]
  pos = int(np.searchsorted(starts, t, side='right'))
  left = int(order[pos - 1]) if pos > 0 else None
  right = int(order[pos + 1]) if pos + 1 < len(order) else None
  return int(order[pos]), left, right


def _edge(plan: _Plan, j: int, side: int) -> float:
  """Projection of the outermost key of bucket ``j`` on ``side`` (1 = high).

  An empty bucket has no keys: its far ramp bounds it (``-/+inf`` if fixed).
  """
  members = plan.bucket(j)
  if members:
    proj = plan.project(members)
    return float(proj.max() if side == 1 else proj.min())
  far = 0 if side == 1 else 1
  if plan.ramp_fixed[j, far]:
    return -math.inf if side == 1 else math.inf
  start, width = plan.ramp_start[j, far], plan.ramp_width[j, far]
  return float(start + width if far == 0 else start)


def _insert(plan: _Plan, key: np.ndarray, ext: int) -> int:
  """Adds key ``ext`` to a bucket (moving a ramp or splitting if needed)."""
  t = float(key.astype(np.float64) @ plan.direction)
  j, left, right = _locate(plan, t)
  guard = plan.slack / (1.0 - 2.0 * plan.slack)
  rs, rw, fixed = plan.ramp_start[j], plan.ramp_width[j], plan.ramp_fixed[j]
  z_left = math.inf if fixed[0] else (t - rs[0]) / rw[0]
  z_right = -math.inf if fixed[1] else (t - rs[1]) / rw[1]
  target = j
  if z_left < 1.0 + guard or z_right > -guard:
    # Near a cut: between the last key on the left and the first on the right.
    if z_left < 1.0 + guard:
      lo_b, hi_b = left, j
    else:
      lo_b, hi_b = j, right
    lo, hi = _edge(plan, lo_b, 1), _edge(plan, hi_b, 0)
    if t <= lo:
      target = lo_b
    elif t >= hi:
      target = hi_b
    else:
      full = lambda i: len(plan.bucket(i)) >= plan.bucket_size
      join_left = (hi - t) >= (t - lo)
      if not plan.bucket(lo_b):
        join_left = True
      elif not plan.bucket(hi_b):
        join_left = False
      elif full(lo_b if join_left else hi_b) and not full(
          hi_b if join_left else lo_b):
        join_left = not join_left
      if join_left:
        plan.place_cut(lo_b, hi_b, t, hi)
        target = lo_b
      else:
        plan.place_cut(lo_b, hi_b, lo, t)
        target = hi_b
  members = plan.bucket(target)
  for i in members:  # an identical row projects identically: same bucket
    row = plan.rows([i])[0]
    if np.array_equal(row, key):
      raise FactStoreError(f'inserted key equals the key of fact {i}')
  members.append(ext)
  plan.solve.add(target)
  if len(members) > plan.bucket_size:
    _split(plan, target)
  return target


def _split(plan: _Plan, j: int):
  """Splits an over-full bucket; its upper part becomes a new bucket ``j+1``.

  The new bucket's neurons go right after bucket ``j``'s, so the hidden
  order stays the order along the projection: every key meets the (exactly
  cancelling) neuron pairs of the windows to its left before its own.
  """
  members = plan.bucket(j)
  proj = plan.project(members)
  order = np.argsort(proj, kind='stable')
  sorted_ext, t = [members[o] for o in order], proj[order]
  count, b = len(members), plan.bucket_size
  lo_p, hi_p = max(1, count - b), min(b, count - 1)
  half = max(1, b // 4)
  cand = np.arange(max(lo_p, count // 2 - half),
                   min(hi_p, count // 2 + half) + 1)
  gaps = t[cand] - t[cand - 1]
  p = int(cand[np.argmax(gaps)])
  new = plan.insert_bucket(j)
  plan.members[j] = sorted_ext[:p]
  plan.members[new] = sorted_ext[p:]
  # The new bucket inherits j's right ramp, j's right ramp is the new cut.
  plan.set_ramp(new, 1, plan.ramp_start[j, 1], plan.ramp_width[j, 1],
                bool(plan.ramp_fixed[j, 1]))
  plan.place_cut(j, new, float(t[p - 1]), float(t[p]))
  plan.solve.update((j, new))


# --------------------------------------------------------------------------
# Device-side work on the touched buckets only.


@functools.cache
def _blas():
  """One controller of the loaded BLAS libraries (scanning them is slow)."""
  # jaxlib's LAPACK kernels call scipy's OpenBLAS, loaded lazily: load it
  # first (as factstore_jax.threads does) so the controller sees it.
  importlib.import_module('scipy.linalg.cython_lapack')
  return threadpoolctl.ThreadpoolController()


def _pad(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


@jax.jit
def _solve(keys, targets, valid):
  """Exact maps of ``A`` buckets: ``(A, b, d), (A, b, m), (A, b)`` ->
  ``(A, m, d)`` (the per-bucket solve of :func:`construct`)."""
  return jax.vmap(gadgets.solve_bucket)(keys, targets, valid)


@jax.jit
def _gate_params(ramp_start, ramp_width, ramp_fixed):
  """Clipped-gate ``scale, bias (A, 2)`` from ramps ``(A, 2)``."""
  buckets = gadgets.Buckets(None, None, None, ramp_start, ramp_width,
                            ramp_fixed, None)
  return gadgets.window_gate_params(buckets, 'clipped')[:2]


class _Check(NamedTuple):
  margins: Array     # (A, b), +inf on padding
  normalized: Array  # (A, b)
  window_ok: Array   # (A, b)
  code_error: Array  # (A, b)
  gate_slack: Array  # (A, b)


@jax.jit
def _check_buckets(x, f, valid, maps, scale, bias, near_scale, near_bias,
                   near_ok, free, values, codes, decoder, direction, sign):
  """Structured check of ``A`` buckets' facts, as :func:`verify_structured`.

  ``x (A, b, d)`` keys, ``f (A, b)`` values, ``maps (A, m, d)``, own gates
  ``scale/bias (A, k)``, the gates of the buckets on either side
  ``near_scale/near_bias (A, 2, k)`` (``near_ok (A, 2)`` where one exists),
  ``free (A, k)`` the non-fixed ramps. Gate columns are formed as in the dense
  MLP (``direction * scale``).
  """
  act = get_activation('clipped')

  def one(args):
    x, f, valid, maps, scale, bias, n_scale, n_bias, n_ok, free = args
    z = x @ (direction[:, None] * scale[None, :]) + bias           # (b, k)
    own = act(z) @ sign
    z_near = jnp.einsum('bd,dnk->bnk', x,
                        direction[:, None, None] * n_scale[None]) + n_bias
    near = act(z_near) @ sign                                       # (b, 2)
    ok = (own == 1) & jnp.all((near == 0) | ~n_ok[None, :], axis=1)
    gap = jnp.where(free[None, :], jnp.maximum(-z, z - 1), jnp.inf)
    code = own[:, None] * (x @ maps.T)                              # (b, m)
    out = code @ decoder.T
    gamma = storage.margins(out, values, f)
    gamma = jnp.where(ok, gamma, -jnp.inf)
    norm = jnp.linalg.norm(out, axis=1)
    err = jnp.max(jnp.abs(code - codes[f]), axis=1)
    pad = lambda a, fill: jnp.where(valid, a, fill)
    return _Check(pad(gamma, jnp.inf),
                  pad(gamma / jnp.maximum(norm, jnp.finfo(norm.dtype).tiny),
                      jnp.inf),
                  pad(ok, True), pad(err, 0.0), pad(jnp.min(gap, 1), jnp.inf))

  return jax.lax.map(one, (x, f, valid, maps, scale, bias, near_scale,
                           near_bias, near_ok, free))


def _write(w_gate, b_gate, w_up, maps, decoder, direction, sign, sel, maps_t,
           scale_t, bias_t):
  """Writes buckets ``sel (A,)``: their maps and dense columns (as assemble)."""
  sub = ed.assemble(direction, maps_t, scale_t, bias_t, sign, decoder,
                    'clipped')
  width = maps_t.shape[1] * scale_t.shape[1]
  cols = (sel[:, None] * width + jnp.arange(width)[None, :]).reshape(-1)
  return (w_gate.at[:, cols].set(sub.w_gate), b_gate.at[cols].set(sub.b_gate),
          w_up.at[:, cols].set(sub.w_up), maps.at[sel].set(maps_t))


_write_copy = jax.jit(_write)
# Updates in place: the input weights (first four arguments) are consumed.
_write_donated = jax.jit(_write, donate_argnums=(0, 1, 2, 3))


@jax.jit
def _gather_columns(model, cols):
  """The dense MLP restricted to hidden neurons ``cols (h',)`` (a copy)."""
  return model.replace(w_gate=model.w_gate[:, cols],
                       b_gate=model.b_gate[cols], w_up=model.w_up[:, cols],
                       routing=model.routing[cols])


def _refit(keys, targets, valid) -> np.ndarray:
  """Float64 minimum-norm maps of some buckets (numpy lstsq)."""
  out = np.zeros((keys.shape[0], targets.shape[2], keys.shape[2]))
  for a in range(keys.shape[0]):
    rows = valid[a]
    if rows.any():
      out[a] = np.linalg.lstsq(np.asarray(keys[a][rows], np.float64),
                               np.asarray(targets[a][rows], np.float64),
                               rcond=None)[0].T
  return out


def _write_index(plan: _Plan, deletes: np.ndarray):
  """Writes the planned members into ``plan.index``, in new fact numbering."""
  b = plan.bucket_size
  for j, members in plan.members.items():
    plan.index[j] = 0
    plan.index[j, :len(members)] = members
    plan.valid[j] = np.arange(b) < len(members)
  if len(deletes):  # later facts shift down; inserted ones follow the kept
    plan.index = plan.index - np.searchsorted(deletes, plan.index)
    plan.index[~plan.valid] = 0


def _neighbours(plan: _Plan, sel: np.ndarray) -> np.ndarray:
  """``(A, 2)`` buckets just below / above each of ``sel`` (-1 if none)."""
  order = plan.order()
  rank = np.empty_like(order)
  rank[order] = np.arange(len(order))
  r = rank[sel]
  below = np.where(r > 0, order[np.maximum(r - 1, 0)], -1)
  above = np.where(r + 1 < len(order), order[np.minimum(r + 1,
                                                        len(order) - 1)], -1)
  return np.stack([below, above], 1)


# --------------------------------------------------------------------------
# The edit.


def _empty_report(start: float) -> EditReport:
  """Report of an edit that changes nothing (updates to the current value)."""
  return EditReport(0, 0, 0, (), (), (), (), (), np.zeros(0, np.int64),
                    np.zeros(0, np.float32), 1.0, math.inf, math.inf, 0.0,
                    math.inf, math.inf, time.perf_counter() - start)


@full_precision
def edit(construction: ed.Construction, factset: FactSet, changes, *,
         donate: bool = False
         ) -> tuple[ed.Construction, FactSet, EditReport]:
  """Inserts, updates and deletes facts by re-solving only their buckets.

  Args:
    construction: from :func:`encoder_decoder.construct` (or an earlier
      edit), clipped gate, storing ``factset``.
    factset: the fact set it stores: keys ``(N, d)``, values ``(P, d)``,
      mapping ``(N,)``. Only shapes are checked against the construction.
    changes: a list of :class:`Insert`, :class:`Update`, :class:`Delete`
      (or one of them); indices refer to ``factset``. Deterministic: equal
      inputs give bit-identical results (no PRNG key is needed: the
      direction and decoder are reused).
    donate: update the dense weights and maps in place instead of copying
      them (``O(h d)`` memory traffic, the main cost of a small edit at
      large ``N``); the input construction's ``model.w_gate, b_gate, w_up``
      and ``structure.gadgets.maps`` are then consumed (deleted arrays) once
      the edit succeeds. For chains of edits that keep only the result.

  Returns:
    ``(new_construction, new_factset, EditReport)``. The new fact set keeps
    the remaining old facts in order, then the inserted ones; appended value
    vectors follow the old values. Every fact outside the re-solved buckets
    has a bit-identical output (evaluating the same batch of keys; within
    float rounding after a bucket split); the report's checked facts all
    have positive margin.

  Raises:
    FactStoreError: bad input (names it), before any work.
    ConstructionError: the edit cannot be done bucket-locally (a new value
    not decodable after projection or outscoring used codes, a bucket
    that cannot be re-solved); rebuild with :func:`construct`.
  """
  start = time.perf_counter()
  structure, keys_np, values_np, mapping_np = _check_inputs(construction,
                                                            factset)
  n_keys, dim = keys_np.shape
  n_values = values_np.shape[0]
  parsed = _parse_changes(changes, n_keys, n_values, dim, keys_np.dtype)
  parts = structure.gadgets
  if int(np.asarray(parts.buckets.valid).sum()) != n_keys:
    raise FactStoreError(
        'the construction\'s buckets hold '
        f'{int(np.asarray(parts.buckets.valid).sum())} keys, the fact set '
        f'{n_keys}: pass the fact set the construction stores')

  # The new map (old facts first, then inserted ones) and value usage.
  mapping_new = mapping_np.astype(np.int32)
  updated = [i for i, v in parsed.updates.items() if v != mapping_np[i]]
  for i in updated:
    mapping_new[i] = parsed.updates[i]
  mapping_new = np.concatenate([
      np.delete(mapping_new, parsed.deletes),
      np.array([v for _, v in parsed.inserts], np.int32)])
  n_total = n_values + len(parsed.new_vectors)
  used = np.bincount(mapping_new, minlength=n_total) > 0
  rho_np = np.asarray(construction.rho)
  newly = sorted({v for v in list(parsed.updates.values()) +
                  [v for _, v in parsed.inserts] if v < n_values})
  bad = [v for v in newly if rho_np[v] <= 0]
  if bad:
    raise ConstructionError(
        f'value(s) {bad[:10]} are not decodable after projection (rho <= 0); '
        'rebuild with construct()')

  # Plan the bucket contents and ramps on the host (finds duplicate keys).
  plan = _make_plan(structure, keys_np, structure.slack)
  if len(parsed.deletes) or updated:
    owner = _owner(plan, n_keys)
    for i in parsed.deletes:
      plan.bucket(int(owner[i])).remove(int(i))
      plan.solve.add(int(owner[i]))
    for i in updated:
      plan.solve.add(int(owner[i]))
  for q, (key, _) in enumerate(parsed.inserts):
    plan.new_keys.append(key)
    _insert(plan, key, n_keys + q)
  if not (plan.solve or plan.regate):  # only updates to the current value
    return construction, factset, _empty_report(start)
  code_error = float(construction.report.code_error)
  new_vals = _add_values(construction, factset[1], values_np,
                         parsed.new_vectors,
                         used[:n_values], code_error, structure.tol)

  # The new fact set, and the bucket index in its numbering.
  dels = parsed.deletes
  if len(dels) or parsed.inserts:
    rows_new = [k for k, _ in parsed.inserts]
    keys_new = np.concatenate([np.delete(keys_np, dels, 0)] + (
        [np.stack(rows_new)] if rows_new else []))
    keys_out = jnp.asarray(keys_new)
  else:
    keys_new, keys_out = keys_np, factset[0]
  factset_new = FactSet(keys_out, new_vals.values, jnp.asarray(mapping_new))
  _write_index(plan, dels)

  # Per-bucket arrays in the new bucket numbering (splits insert buckets).
  origin = np.array(plan.origin)
  src = np.maximum(origin, 0)
  split = len(origin) != parts.maps.shape[0]
  touched = sorted(plan.solve | plan.regate)
  solved = sorted(plan.solve)
  dtype = keys_np.dtype
  sign = parts.sign
  scale_np, bias_np = np.asarray(parts.scale)[src], np.asarray(parts.bias)[src]
  ramp_start = plan.ramp_start.astype(dtype)
  ramp_width = plan.ramp_width.astype(dtype)
  rows = np.array(touched)
  n_t = len(touched)  # padded to a power of two: few compiled shapes
  sel = np.array(touched + touched[:1] * (_pad(n_t) - n_t), np.int64)
  s_t, b_t = _gate_params(ramp_start[sel], ramp_width[sel],
                          plan.ramp_fixed[sel])
  scale_np[sel], bias_np[sel] = np.asarray(s_t), np.asarray(b_t)
  maps = parts.maps[jnp.asarray(src)] if split else parts.maps
  model = construction.model
  if split:
    width = parts.maps.shape[1] * sign.shape[0]
    cols = (src[:, None] * width + np.arange(width)).reshape(-1)
    model = _gather_columns(model, jnp.asarray(cols))

  # Re-solve the solved buckets (all touched ones are computed, same shapes).
  slots, valid = plan.index[sel], plan.valid[sel]
  x = keys_new[slots]                                          # (A, b, d)
  f = mapping_new[slots]
  codes = new_vals.codes
  targets = np.asarray(codes)[f]
  maps_t = np.array(maps[jnp.asarray(sel)])
  is_solved = np.isin(sel, solved)
  with _blas().limit(limits=1, user_api='blas'):  # as construct() does
    fresh = np.asarray(jax.block_until_ready(_solve(x, targets, valid)))
  maps_t[is_solved] = fresh[is_solved]

  # Verify every fact of every touched bucket (own and nearby windows).
  near = _neighbours(plan, sel)
  free = ~plan.ramp_fixed[sel][:, np.array(gadgets.GADGETS['clipped'][2])]

  def run_check(maps_t):
    return jax.tree.map(np.asarray, _check_buckets(
        x, f, valid, maps_t, scale_np[sel], bias_np[sel],
        scale_np[np.maximum(near, 0)], bias_np[np.maximum(near, 0)],
        near >= 0, free, new_vals.values, codes, construction.model.decoder,
        parts.buckets.direction, sign))

  check = run_check(maps_t)
  if not check.window_ok.all():
    a = int(np.argmin(check.window_ok.all(1)))
    raise ConstructionError(
        f'bucket {int(sel[a])}: {int((~check.window_ok[a]).sum())} fact(s) '
        'are not exactly inside their window after the edit (keys too close '
        'to a bucket boundary); rebuild with construct()')
  failing = [a for a in range(n_t)
             if not check.margins[a].min() > 0 and is_solved[a]]
  refit = [int(sel[a]) for a in failing]
  if failing:
    idx = np.array(failing)
    maps_t[idx] = _refit(x[idx], targets[idx], valid[idx]).astype(dtype)
    check = run_check(maps_t)
  if not check.margins.min() > 0:
    a = int(np.argmin(np.nan_to_num(check.margins.min(1), nan=-np.inf)))
    raise ConstructionError(
        f'bucket {int(sel[a])} could not be re-solved: min margin '
        f'{float(check.margins[a].min()):.3g} even after a float64 refit; '
        'rebuild with construct() (smaller bucket_size or float64)')

  # Write the touched buckets' gadgets and dense columns (after a split the
  # gathered copies are ours to update in place).
  write = _write_donated if donate or split else _write_copy
  w_gate, b_gate, w_up, maps = write(
      model.w_gate, model.b_gate, model.w_up, maps, model.decoder,
      parts.buckets.direction, sign, jnp.asarray(sel), jnp.asarray(maps_t),
      jnp.asarray(scale_np[sel]), jnp.asarray(bias_np[sel]))
  model = model.replace(w_gate=w_gate, b_gate=b_gate, w_up=w_up)

  # Per-bucket margins; untouched buckets are bounded by the new values.
  min_m = np.minimum(np.asarray(structure.min_margin)[src], new_vals.margin)
  min_n = np.minimum(np.asarray(structure.min_normalized_margin)[src],
                     new_vals.normalized_margin)
  min_m[rows] = check.margins[:n_t].min(1)
  min_n[rows] = check.normalized[:n_t].min(1)
  rep = construction.report
  min_gap = min([float(rep.min_gap)] + plan.cut_gaps)
  buckets = gadgets.Buckets(
      parts.buckets.direction, jnp.asarray(plan.index, jnp.int32),
      jnp.asarray(plan.valid), jnp.asarray(ramp_start),
      jnp.asarray(ramp_width), jnp.asarray(plan.ramp_fixed),
      jnp.asarray(min_gap, dtype))
  new_structure = structure.replace(
      gadgets=ed.Gadgets(buckets, maps, jnp.asarray(scale_np),
                         jnp.asarray(bias_np), sign),
      min_margin=jnp.asarray(min_m, dtype),
      min_normalized_margin=jnp.asarray(min_n, dtype))

  in_bucket = valid[:n_t]
  margins = check.margins[:n_t][in_bucket]
  checked_err = float(check.code_error[:n_t].max())
  n_facts, h = len(mapping_new), model.w_gate.shape[1]
  n_params = num_params(model)
  seconds = time.perf_counter() - start
  report = rep._replace(
      num_facts=n_facts, num_values=n_total, num_buckets=plan.num_buckets,
      hidden_dim=h, num_params=n_params,
      num_params_gated_mlp=2 * dim * h + h + h * dim,
      params_per_fact=n_params / max(n_facts, 1),
      bits_per_param=n_facts * math.log2(max(n_total, 2)) / n_params,
      accuracy=1.0, min_margin=float(min_m.min()),
      min_normalized_margin=float(min_n.min()),
      code_error=max(code_error, checked_err),
      rho_projected=float(np.asarray(new_vals.rho)[used].min()),
      min_gap=min_gap, repaired_buckets=rep.repaired_buckets + len(refit),
      seconds=seconds)
  new_construction = ed.Construction(model=model, report=report, codes=codes,
                                     rho=new_vals.rho,
                                     structure=new_structure)
  edit_report = EditReport(
      num_inserted=len(parsed.inserts), num_updated=len(updated),
      num_deleted=len(dels), new_values=tuple(range(n_values, n_total)),
      solved_buckets=tuple(solved),
      regated_buckets=tuple(sorted(plan.regate - plan.solve)),
      new_buckets=tuple(int(j) for j in np.flatnonzero(origin < 0)),
      refit_buckets=tuple(refit), facts=slots[:n_t][in_bucket],
      margins=margins,
      accuracy=float(np.mean(margins > 0)) if margins.size else 1.0,
      min_margin=float(margins.min()) if margins.size else math.inf,
      min_normalized_margin=(float(check.normalized[:n_t][in_bucket].min())
                             if margins.size else math.inf),
      code_error=checked_err, gate_slack=float(check.gate_slack[:n_t].min()),
      new_value_margin=new_vals.margin, seconds=seconds)
  return new_construction, factset_new, edit_report
