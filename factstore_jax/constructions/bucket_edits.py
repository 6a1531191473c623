"""Bucket-local editing of closed-form encoder-decoder MLPs (docs/design.md).

:func:`edit` inserts, updates and deletes facts of a :class:`Construction`
built by :func:`encoder_decoder.construct` by re-solving only the buckets the
changes fall in, and returns a new construction (nothing is modified).

What changes. The encoder is the telescoped sum ``E(x) = sum_j S_j(t)
(M_j - M_{j-1}) x`` (see :mod:`gadgets`). Re-solving bucket ``i``'s map
``M_i`` changes the up-weights of the two cuts around it (``M_i - M_{i-1}``
and ``M_{i+1} - M_i``); moving a cut changes that cut's gate rows only.

* Facts *below* every touched bucket see those steps at exactly 0, so
  their outputs are bit-identical (same batch of keys, same hidden width).
* Facts *above* see both changed cuts at exactly 1: mathematically their
  code is unchanged (``M_{i+1} - M_{i-1}``), but the float sum is rounded
  differently (a few ulps of ``|M_j x|``). So the edit re-verifies every
  fact from the lowest touched bucket upward, with the same check as
  :func:`construct` (steps exactly 0/1, code, margins against the whole
  value table). Its cost is that of verifying those facts.

A bucket split adds ``m`` hidden neurons (one step): the projections ``x W``
are then differently-shaped matmuls, which may round even the facts below
by ~1e-7; they stay verified by their recorded margins, which exceed that
by orders of magnitude. The dense weights are re-assembled from the
per-bucket gadgets (:func:`encoder_decoder.assemble_gadgets`, ``O(n m d)``
elementwise work), so steps whose up-weights become exactly zero are dropped
and ones that come alive are added.

Semantics of a change list (all indices refer to the fact set passed in;
deletions are applied first, then updates, then inserts):

* ``Delete(i)`` removes fact ``i``; later facts shift down. Its bucket is
  re-solved on the remaining keys; the deleted key's output may become
  anything.
* ``Update(i, value)`` maps key ``i`` to ``value``; its bucket is re-solved.
* ``Insert(key, value)`` appends a fact (inserted facts follow the kept old
  ones, in list order) to the bucket whose interval covers ``<g, key>``.
* ``value`` is an index into the value table or a new value vector ``(d,)``,
  appended to the table (in list order). Its code is its separator on the
  projected table ``V D`` with the same decoder; it must be decodable
  (``rho > 0``) and every used code must still beat it, with a certified
  margin ``<c_j, (V D)_j - (V D)_new> - err * ||(V D)_j - (V D)_new||_1 > 0``
  (``err`` the worst code error), else :class:`ConstructionError` asks for a
  full rebuild (a larger code dim).

Insertion policy: a key whose projection lies inside a bucket (with the
construction's slack to both neighbouring steps) joins it with no gate
change. A key in the gap between two buckets joins the side that leaves the
wider sub-gap (the other side if that bucket is full) and the shared step
moves into that sub-gap, with the same slack: the bucket above gets new gate
rows but keeps its map, and every key stays exactly saturated. A bucket that
would exceed the bucket size ``b`` is split at the widest gap near its
middle: the upper part becomes a new bucket ``j + 1`` with its own step
(later buckets are renumbered), keeping the order along the projection.

Failing facts make their buckets refit in float64; if that fails the edit
raises :class:`ConstructionError`. Per-bucket minimum margins kept in
:class:`BucketStructure` give the new global report (with new value
vectors, the certified bound above caps those of buckets below the edit).

Only the clipped gate is supported: relu steps cancel only approximately.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from factstore_jax.constructions import decoders, gadgets
from factstore_jax.constructions import encoder_decoder as ed
from factstore_jax.constructions import assembly
from factstore_jax.constructions import codes as codes_lib
from factstore_jax.constructions import repair
from factstore_jax.constructions import verify as verify_lib
from factstore_jax.errors import ConstructionError, FactStoreError
from factstore_jax.factsets import FactSet
from factstore_jax.mlp import num_params
from factstore_jax.precision import full_precision
from factstore_jax.threads import single_threaded_blas

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

  ``facts``/``margins`` cover every fact from the lowest touched bucket
  upward (re-verified); the facts below it keep bit-identical outputs.
  """
  num_inserted: int
  num_updated: int                # updates that changed a value
  num_deleted: int
  new_values: tuple               # indices of value vectors appended
  solved_buckets: tuple           # buckets whose maps were re-solved
  regated_buckets: tuple          # buckets whose step moved, map kept
  new_buckets: tuple              # buckets created by splits
  refit_buckets: tuple            # re-solved again in float64
  facts: np.ndarray               # (F,) checked facts (new fact set indices)
  margins: np.ndarray             # (F,) their margins
  accuracy: float                 # over the checked facts
  min_margin: float               # over the checked facts
  min_normalized_margin: float
  code_error: float               # max |E(k) - c_f| over the checked facts
  gate_slack: float               # min distance of their steps from (0, 1)
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
  new_codes, new_rho = codes_lib.value_codes(table, decoder, tol=tol,
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
# Host-side plan: which keys go in which bucket, where the steps sit.


@dataclasses.dataclass
class _Plan:
  """Mutable host copy of the bucket bookkeeping during one edit.

  Buckets stay in order along the projection: bucket ``j``'s step is the cut
  below it (bucket 0's is always on). Members are in "extended" indices:
  old facts ``0..N-1``, inserted facts ``N + q``.
  """
  index: np.ndarray          # (n, b)
  valid: np.ndarray          # (n, b)
  step_start: np.ndarray     # (n,) float64
  step_width: np.ndarray     # (n,) float64
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
    return self.step_start.shape[0]

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

  def place_cut(self, j: int, lo: float, hi: float):
    """Puts the step below bucket ``j >= 1`` inside ``(lo, hi)``."""
    gap = hi - lo
    if not gap > 0 or not math.isfinite(gap):
      raise ConstructionError(
          f'no room for a step between buckets {j - 1} and {j} '
          f'(gap {gap:.3g}); rebuild with construct()')
    # Edits place ramps by the configured slack alone (no rounding room):
    # the certificate of the edited MLP checks every step.
    self.step_start[j], self.step_width[j] = gadgets.ramp(
        lo, hi, 0.0, 0.0, self.slack)
    self.regate.add(j)
    self.cut_gaps.append(gap)

  def insert_bucket(self, after: int) -> int:
    """A new empty bucket right after ``after`` (later ids shift by one)."""
    j = after + 1
    ins = lambda a, fill: np.insert(a, j, fill, axis=0)
    self.index, self.valid = ins(self.index, 0), ins(self.valid, False)
    self.step_start = ins(self.step_start, 0.0)
    self.step_width = ins(self.step_width, 1.0)
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
               step_start=np.array(b.step_start, np.float64),
               step_width=np.array(b.step_width, np.float64),
               direction=np.asarray(b.direction, np.float64), keys=keys,
               new_keys=[], slack=slack,
               origin=list(range(b.index.shape[0])))


def _locate(plan: _Plan, t: float) -> int:
  """Bucket whose interval covers ``t`` (cut at the middle of each step)."""
  mids = plan.step_start[1:] + 0.5 * plan.step_width[1:]
  return int(np.searchsorted(mids, t, side='right'))


def _edge(plan: _Plan, j: int, side: int) -> float:
  """Projection of the outermost key of bucket ``j`` on ``side`` (1 = high).

  An empty bucket has no keys: the step on its far side bounds it
  (``-/+inf`` at the ends).
  """
  members = plan.bucket(j)
  if members:
    proj = plan.project(members)
    return float(proj.max() if side == 1 else proj.min())
  if side == 1:
    return (-math.inf if j == 0 else
            float(plan.step_start[j] + plan.step_width[j]))
  return (math.inf if j + 1 >= plan.num_buckets else
          float(plan.step_start[j + 1]))


def _insert(plan: _Plan, key: np.ndarray, ext: int) -> int:
  """Adds key ``ext`` to a bucket (moving a step or splitting if needed)."""
  t = float(key.astype(np.float64) @ plan.direction)
  j = _locate(plan, t)
  n = plan.num_buckets
  guard = plan.slack / (1.0 - 2.0 * plan.slack)
  z_low = (math.inf if j == 0 else
           (t - plan.step_start[j]) / plan.step_width[j])
  z_high = (-math.inf if j + 1 >= n else
            (t - plan.step_start[j + 1]) / plan.step_width[j + 1])
  target = j
  if z_low < 1.0 + guard or z_high > -guard:
    # Near a cut: between the last key below it and the first above it.
    lo_b, hi_b = (j - 1, j) if z_low < 1.0 + guard else (j, j + 1)
    lo, hi = _edge(plan, lo_b, 1), _edge(plan, hi_b, 0)
    if t <= lo:
      target = lo_b
    elif t >= hi:
      target = hi_b
    else:
      full = lambda i: len(plan.bucket(i)) >= plan.bucket_size
      join_low = (hi - t) >= (t - lo)
      if not plan.bucket(lo_b):
        join_low = True
      elif not plan.bucket(hi_b):
        join_low = False
      elif full(lo_b if join_low else hi_b) and not full(
          hi_b if join_low else lo_b):
        join_low = not join_low
      if join_low:
        plan.place_cut(hi_b, t, hi)
        target = lo_b
      else:
        plan.place_cut(hi_b, lo, t)
        target = hi_b
  members = plan.bucket(target)
  for i in members:  # an identical row projects identically: same bucket
    if np.array_equal(plan.rows([i])[0], key):
      raise FactStoreError(f'inserted key equals the key of fact {i}')
  members.append(ext)
  plan.solve.add(target)
  if len(members) > plan.bucket_size:
    _split(plan, target)
  return target


def _split(plan: _Plan, j: int):
  """Splits an over-full bucket; its upper part becomes a new bucket ``j+1``
  whose step sits in the widest gap near the middle of bucket ``j``."""
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
  plan.place_cut(new, float(t[p - 1]), float(t[p]))
  plan.solve.update((j, new))


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


# --------------------------------------------------------------------------
# Device-side work.


def _pad(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def _padded(rows: Sequence[int]) -> np.ndarray:
  """``rows`` padded to a power of two by repeating the first (few shapes)."""
  rows = list(rows)
  return np.array(rows + rows[:1] * (_pad(len(rows)) - len(rows)), np.int64)


@jax.jit
def _solve(keys, targets, valid):
  """Exact maps of ``A`` buckets: ``(A, b, d), (A, b, m), (A, b)`` ->
  ``(A, m, d)`` (the per-bucket solve of :func:`construct`)."""
  return jax.vmap(gadgets.solve_bucket)(keys, targets, valid)


def _verify_from(parts, model, factset, codes, owner, lowest, chunk_size):
  """Structured check of every fact in buckets ``>= lowest``.

  Returns ``(facts (F,), margins, normalized, code_error, steps_ok, slack)``
  as numpy arrays over those facts.
  """
  facts = np.flatnonzero(owner >= lowest)
  rows = _padded(facts) if len(facts) else facts
  keys, values, mapping = factset
  gamma, norms, err, ok, slack = jax.device_get(verify_lib._structured_terms_jit(
      parts, model, values, codes, keys[rows], mapping[rows],
      jnp.asarray(owner[rows], jnp.int32), chunk_size=chunk_size))
  f = len(facts)
  norms = np.maximum(norms[:f], np.finfo(norms.dtype).tiny)
  return facts, gamma[:f], gamma[:f] / norms, err[:f], ok[:f], slack[:f]


# --------------------------------------------------------------------------
# The edit.


def _empty_report(start: float) -> EditReport:
  """Report of an edit that changes nothing (updates to the current value)."""
  return EditReport(0, 0, 0, (), (), (), (), (), np.zeros(0, np.int64),
                    np.zeros(0, np.float32), 1.0, math.inf, math.inf, 0.0,
                    math.inf, math.inf, time.perf_counter() - start)


@full_precision
def edit(construction: ed.Construction, factset: FactSet, changes, *,
         chunk_size: int = 2048
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
    chunk_size: keys per vmapped chunk of the verification.

  Returns:
    ``(new_construction, new_factset, EditReport)``. The new fact set keeps
    the remaining old facts in order, then the inserted ones; appended value
    vectors follow the old values. Facts below every touched bucket have
    bit-identical outputs (same batch of keys, unchanged hidden width); every
    fact from the lowest touched bucket upward is re-verified and has
    positive margin.

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

  # Plan the bucket contents and steps on the host (finds duplicate keys).
  plan = _make_plan(structure, keys_np, structure.slack)
  if len(parsed.deletes) or updated:
    owner = gadgets.key_owner(plan.index, plan.valid, n_keys)
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
  n_facts = len(mapping_new)

  # Re-solve the solved buckets (in the new numbering; splits insert some).
  origin = np.array(plan.origin)
  src = np.maximum(origin, 0)
  split = len(origin) != parts.maps.shape[0]
  solved = sorted(plan.solve)
  dtype = keys_np.dtype
  codes = new_vals.codes
  targets = np.asarray(codes)[mapping_new]                     # (N', m)
  maps = parts.maps[jnp.asarray(src)] if split else parts.maps
  if solved:  # (every change re-solves the bucket it lands in)
    sel = _padded(solved)
    slots, valid = plan.index[sel], plan.valid[sel]
    with single_threaded_blas():  # as construct() does
      fresh = jax.block_until_ready(
          _solve(keys_new[slots], targets[slots], valid))
    maps = maps.at[jnp.asarray(solved)].set(fresh[:len(solved)])

  rep = construction.report
  min_gap = min([float(rep.min_gap)] + plan.cut_gaps)
  buckets = gadgets.Buckets(
      parts.buckets.direction, jnp.asarray(plan.index, jnp.int32),
      jnp.asarray(plan.valid), jnp.asarray(plan.step_start.astype(dtype)),
      jnp.asarray(plan.step_width.astype(dtype)),
      jnp.asarray(min_gap, dtype))
  scale, bias, sign = assembly._gate_params_jit(buckets, 'clipped')
  new_parts = assembly.Gadgets(buckets, maps, scale.astype(dtype),
                         bias.astype(dtype), sign.astype(dtype))
  decoder = construction.model.decoder
  assemble = lambda p: assembly.assemble_live(p, decoder, 'clipped')
  model = assemble(new_parts)

  # Verify every fact from the lowest touched bucket upward: a moved step
  # below bucket j also decides the keys of bucket j - 1.
  lowest = min([j for j in solved] +
               [max(j - 1, 0) for j in plan.regate - plan.solve])
  owner = gadgets.key_owner(plan.index, plan.valid, n_facts)
  check = lambda p, mdl: _verify_from(p, mdl, factset_new, codes, owner,
                                      lowest, chunk_size)
  facts, margins, normalized, errs, ok, slack = check(new_parts, model)
  if not ok.all():
    b = int(owner[facts[np.argmin(ok)]])
    raise ConstructionError(
        f'bucket {b}: {int((~ok).sum())} fact(s) are not exactly on their '
        'side of every step after the edit (keys too close to a cut); '
        'rebuild with construct()')
  margins_all = np.full(n_facts, np.inf, margins.dtype)
  margins_all[facts] = margins
  refit = [int(j) for j in repair.failing_buckets(new_parts, keys_new, targets,
                                              margins_all)]
  if refit:
    new_parts = repair.refit_buckets(new_parts, keys_new, targets, refit)
    model = assemble(new_parts)
    facts, margins, normalized, errs, ok, slack = check(new_parts, model)
  if not (ok.all() and margins.min() > 0):
    b = int(owner[facts[np.argmin(np.nan_to_num(margins, nan=-np.inf))]])
    raise ConstructionError(
        f'bucket {b} could not be re-solved: min margin '
        f'{float(np.nanmin(margins)):.3g} even after a float64 refit; '
        'rebuild with construct() (smaller bucket_size or float64)')

  # Per-bucket margins: re-verified buckets from the check, those below
  # from the structure, capped by the new values' certified bound.
  n_b = plan.num_buckets
  seg_min = lambda x: np.asarray(jax.ops.segment_min(
      jnp.asarray(x), jnp.asarray(owner[facts]), num_segments=n_b))
  min_m = np.minimum(np.asarray(structure.min_margin)[src], new_vals.margin)
  min_n = np.minimum(np.asarray(structure.min_normalized_margin)[src],
                     new_vals.normalized_margin)
  checked = np.arange(n_b) >= lowest
  min_m = np.where(checked, seg_min(margins), min_m)
  min_n = np.where(checked, seg_min(normalized), min_n)
  new_structure = structure.replace(
      gadgets=new_parts, min_margin=jnp.asarray(min_m, dtype),
      min_normalized_margin=jnp.asarray(min_n, dtype))

  checked_err = float(errs.max()) if errs.size else 0.0
  n_params = num_params(model)
  seconds = time.perf_counter() - start
  report = rep._replace(
      num_facts=n_facts, num_values=n_total, num_buckets=n_b,
      hidden_dim=int(model.w_gate.shape[1]), num_params=n_params,
      num_params_gated_mlp=num_params(jax.eval_shape(model.as_mlp)),
      params_per_fact=n_params / max(n_facts, 1),
      bits_per_param=n_facts * math.log2(max(n_total, 2)) / n_params,
      accuracy=1.0, min_margin=float(min_m.min()),
      min_normalized_margin=float(min_n.min()),
      code_error=max(code_error, checked_err),
      rho_projected=float(np.asarray(new_vals.rho)[used].min()),
      min_gap=min_gap, repaired_buckets=rep.repaired_buckets + len(refit),
      max_map_norm=assembly.max_map_norm(new_parts.maps), seconds=seconds)
  new_construction = ed.Construction(model=model, report=report, codes=codes,
                                     rho=new_vals.rho,
                                     structure=new_structure)
  edit_report = EditReport(
      num_inserted=len(parsed.inserts), num_updated=len(updated),
      num_deleted=len(dels), new_values=tuple(range(n_values, n_total)),
      solved_buckets=tuple(solved),
      regated_buckets=tuple(sorted(plan.regate - plan.solve)),
      new_buckets=tuple(int(j) for j in np.flatnonzero(origin < 0)),
      refit_buckets=tuple(refit), facts=facts, margins=margins,
      accuracy=float(np.mean(margins > 0)) if margins.size else 1.0,
      min_margin=float(margins.min()) if margins.size else math.inf,
      min_normalized_margin=(float(normalized.min()) if margins.size
                             else math.inf),
      code_error=checked_err,
      gate_slack=float(slack.min()) if slack.size else math.inf,
      new_value_margin=new_vals.margin, seconds=seconds)
  return new_construction, factset_new, edit_report
