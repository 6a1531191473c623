"""Repairs of failing buckets: float64 refits and splits of ill-conditioned
buckets (docs/design.md, "The closed-form encoder-decoder")."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from factstore_jax.constructions import gadgets
from factstore_jax.precision import full_precision
from factstore_jax.constructions.assembly import Gadgets
from factstore_jax.constructions.verify import bucket_of_key

Array = jax.Array


def _misses(outputs, codes, xp=jnp):
  """``(..., m), (..., m) -> (...,)`` bool: rows whose map output misses its
  code, ``max_r |(out - c)_r| > 1e-3 (1 + max_r |c_r|)`` or non-finite (the
  one miss criterion of the repairs; ``xp`` is ``jnp`` or ``np``)."""
  err = xp.abs(outputs - codes)
  # NaN counts as a miss (explicitly: a max reduction may drop NaNs).
  err = xp.max(xp.where(xp.isnan(err), xp.inf, err), axis=-1)
  return ~(err <= 1e-3 * (1 + xp.max(xp.abs(codes), axis=-1)))


@jax.jit
@full_precision
def _own_map_misses(maps, keys, targets, index, valid):
  """``(n, b)`` bool: whether bucket ``j``'s own map misses the code of its
  key ``index[j, s]`` (:func:`_misses`). One ``(b, d) x (d, m)`` product per
  bucket (per key, each key would gather its bucket's whole ``(m, d)``
  map)."""
  def one(args):
    m_j, rows, ok = args
    return ok & _misses(keys[rows] @ m_j.T, targets[rows])
  return jax.lax.map(one, (maps, index, valid), batch_size=16)


def failing_buckets(parts: Gadgets, keys, targets, margins) -> np.ndarray:
  """Buckets to refit, given the per-key ``margins (N,)`` of a check.

  A bad map ``M_j`` spoils every key at or above bucket ``j`` (the
  telescoped sum carries ``M_j - M_{j-1}`` and ``M_{j+1} - M_j``), so the
  culprits are the buckets of failing facts whose own map misses its keys
  (non-finite, or off by more than ``1e-3 (1 + |c|)``); if there is none,
  every bucket holding a failing fact. NaN margins count as failing.
  """
  failing = ~(np.asarray(margins) > 0)
  if not failing.any():
    return np.zeros(0, np.int64)
  owner = np.asarray(bucket_of_key(parts.buckets, keys.shape[0]))
  index, valid = parts.buckets.index, parts.buckets.valid
  misses = np.asarray(_own_map_misses(parts.maps, keys, targets, index, valid))
  missed = np.zeros(failing.shape[0], bool)
  valid_np = np.asarray(valid)
  missed[np.asarray(index)[valid_np]] = misses[valid_np]
  culprits = np.unique(owner[failing & missed])
  return culprits if culprits.size else np.unique(owner[failing])


def refit_buckets(parts: Gadgets, keys, targets, bad_buckets) -> Gadgets:
  """Re-solves the given buckets' maps in float64 (numpy lstsq, min norm).

  Only the given buckets' rows are gathered and widened (memory
  ``O(b d)`` per bucket, never ``O(N d)``).
  """
  index, valid = np.asarray(parts.buckets.index), np.asarray(parts.buckets.valid)
  bad_buckets = np.asarray(bad_buckets, np.int64).reshape(-1)
  if not bad_buckets.size:
    return parts
  fits = []
  for j in bad_buckets:
    rows = jnp.asarray(index[j][valid[j]])
    keys64 = np.asarray(keys[rows], np.float64)
    targets64 = np.asarray(targets[rows], np.float64)
    fits.append(np.linalg.lstsq(keys64, targets64, rcond=None)[0].T)
  fits = np.stack(fits).astype(np.dtype(parts.maps.dtype))
  maps = parts.maps.at[jnp.asarray(bad_buckets)].set(jnp.asarray(fits))
  return parts._replace(maps=maps)


def _bucket_misses(parts: Gadgets, keys, targets, j: int) -> bool:
  """Whether bucket ``j``'s own map misses one of its keys' codes
  (:func:`_misses`, evaluated in float64)."""
  index, valid = np.asarray(parts.buckets.index), np.asarray(parts.buckets.valid)
  # Gather the bucket's rows, then widen them: widening all of ``keys``
  # first cost 4 GiB at N = 2^20, d = 512 (the peak RSS of the whole build).
  rows = jnp.asarray(index[j][valid[j]])
  out = (np.asarray(keys[rows], np.float64)
         @ np.asarray(parts.maps[j], np.float64).T)
  return bool(np.any(_misses(out, np.asarray(targets[rows], np.float64),
                             np)))


def split_unsolved(parts: Gadgets, keys, targets, candidates, *,
                    slack: float, activation: str,
                    max_rounds: int = 16) -> tuple[Gadgets, int]:
  """Guard: splits buckets whose float64 solve still misses their keys.

  Such a bucket's keys are (nearly) linearly dependent with inconsistent
  codes, so no accurate exact map exists; it is cut in two at its widest
  projection gap (:func:`gadgets.split_bucket`) and each half is solved in
  float64, repeatedly (up to ``max_rounds``) until every half is solved or
  holds one key. Host-side; returns the new gadgets and the number of
  splits.
  """
  todo = sorted(int(j) for j in np.asarray(candidates).reshape(-1))
  splits = 0
  for _ in range(max_rounds):
    missed = [j for j in todo if _bucket_misses(parts, keys, targets, j)
              and int(np.asarray(parts.buckets.valid[j]).sum()) > 1]
    if not missed:
      break
    todo = []
    for j in sorted(missed, reverse=True):
      buckets = gadgets.split_bucket(parts.buckets, keys, j, slack=slack)
      maps = jnp.concatenate([parts.maps[:j + 1], parts.maps[j:]])
      scale, bias, sign = gadgets.step_gate_params(buckets, activation)
      parts = refit_buckets(
          Gadgets(buckets, maps, scale.astype(maps.dtype),
                  bias.astype(maps.dtype), sign.astype(maps.dtype)),
          keys, targets, [j, j + 1])
      todo = [t + 1 for t in todo] + [j, j + 1]
      splits += 1
    todo = sorted(todo)
  return parts, splits
