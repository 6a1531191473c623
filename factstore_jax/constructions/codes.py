"""Value codes: the decoder, the code-dimension search and straggler patches.

The code of value ``j`` is its separator on the projected table ``V D``
(:mod:`factstore_jax.decodability`); :func:`choose_code_dim` finds the
smallest searched ``m`` whose used projected values are decodable, leaving at
most a budget of stragglers to :func:`patch_stragglers`.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from factstore_jax.decodability import decodability, settled, used_values
from factstore_jax.constructions import decoders
from factstore_jax.errors import ConstructionError, InfeasibleFactSetError
from factstore_jax.precision import full_precision
from factstore_jax.constructions.config import ConstructionConfig, code_dims

Array = jax.Array


@full_precision
def value_codes(values: Array, decoder: Array, *, tol: float = 1e-3,
                floor: float = 0.0, indices=None, **stream):
  """Codes (separators of ``V D``) and their decodability ``(P,)``.

  With ``indices (S,)`` only those values are solved (``(S, m)``, ``(S,)``).
  ``stream`` (``stream_size``, ``abort``, ``progress``) goes to
  :func:`~factstore_jax.decodability.decodability`; returns ``None`` if
  ``abort`` stopped it.
  """
  result = decodability(decoders.project_values(values, decoder),
                                tol=tol, floor=floor, indices=indices,
                                **stream)
  if result is None:
    return None
  return result.separators, result.rho


def construction_decoder(key: Array, dim: int, code_dim: int,
                         dtype=jnp.float32) -> Array:
  """The JL decoder ``(d, m)`` the construction draws for ``key`` at ``m``.

  :func:`choose_code_dim` certifies it (the code dim it returns leaves every
  used projected value decodable); encoder-decoder GD trains with it too.
  """
  return decoders.jl_decoder(jax.random.split(key)[0], dim, code_dim, dtype)


class CodeChoice(NamedTuple):
  """What :func:`choose_code_dim` picked."""
  code_dim: int
  codes: Array             # (P, m) separators of the projected values
  rho: Array               # (P,) their decodability after projection
  stragglers: np.ndarray   # used values to patch (rho at or below the floor)


def _probe_limit(config: ConstructionConfig, size: int) -> int:
  """Probe failures above which a code dim is rejected without a full solve.

  With patching a few stragglers are fine; at the budget fraction ``p`` a
  sample of ``size`` has ``p size`` failures on average, so the limit is
  twice that plus 3 (a false rejection only costs a larger ``m``).
  """
  return int(2 * config.patch * size) + 3 if config.patch > 0 else 0


@full_precision
def choose_code_dim(key: Array, values: Array, mapping, config:
                    ConstructionConfig, *, stream_size: int | None = None,
                    progress=None) -> CodeChoice:
  """Smallest ``m`` of the search whose used projected values are decodable,
  up to ``config.patch`` of them left to patching.

  A searched ``m < d`` is accepted when at most ``patch_budget`` used values
  have ``rho <= min_rho`` after projection (those become the stragglers
  :func:`patch_stragglers` gives their own decoder columns); a fixed
  ``config.code_dim < d`` when at most that many have ``rho <= 0``. With
  ``stream_size`` the values are solved that many per jitted call and a
  code dimension is rejected as soon as more used values are certified
  below the floor than may be patched (same result, less work for rejected
  ``m``); a random sample of 256 used values rejects a clearly too small
  ``m`` first. ``progress(stage, done, total)`` runs after each call. A
  fixed code dim that leaves too many values undecodable raises
  :class:`ConstructionError` as soon as that is certified.

  Returns a :class:`CodeChoice`; raises :class:`InfeasibleFactSetError` if
  some used value is not decodable even with the identity decoder.
  """
  dim = values.shape[1]
  used = used_values(mapping)
  dims = code_dims(config, dim)
  probe = np.random.default_rng(0).permutation(used)[:256]
  is_used = np.zeros(values.shape[0], bool)
  is_used[used] = True

  def certified(ids, part, floor):
    """Used values among ``ids`` (the values ``part`` solved) certified at or
    below the floor (gap closed or dual bound below it: a re-solve with a
    larger active set would not touch them)."""
    closed = settled(part, config.tol, floor=floor)
    return ids[is_used[ids] & closed & (np.asarray(part.rho) <= floor)]

  for m in dims:
    decoder = construction_decoder(key, dim, m, values.dtype)
    fixed = config.code_dim is not None
    floor = rho_floor(config, m, dim)
    budget = patch_budget(config, len(used)) if m < dim else 0
    t0 = time.perf_counter()
    if m < dim and len(probe) < len(used):
      # A random sample of used values rejects a too-small m cheaply.
      part = decodability(decoders.project_values(values, decoder),
                                  tol=config.tol, floor=floor, indices=probe)
      bad_probe = certified(probe, part, floor)
      if len(bad_probe) > min(budget, _probe_limit(config, len(probe))):
        if fixed:
          raise_undecodable(m, bad_probe)
        logging.info('code_dim %d rejected by a sample (%.1fs)', m,
                     time.perf_counter() - t0)
        continue
    stream, bad = {}, []
    if stream_size is not None and stream_size < values.shape[0]:
      def abort(rows, part, floor=floor, budget=budget):
        if not (floor > 0 or fixed):
          return False
        bad.extend(certified(rows, part, floor))
        return len(bad) > budget
      stage = f'decodability m={m}'
      stream = dict(stream_size=stream_size, abort=abort, progress=(
          None if progress is None else
          lambda done, total, stage=stage: progress(stage, done, total)))
    solved = value_codes(values, decoder, tol=config.tol, floor=floor,
                         **stream)
    if solved is None:
      if fixed:
        raise_undecodable(m, np.asarray(bad))
      logging.info('code_dim %d rejected while streaming (%.1fs)', m,
                   time.perf_counter() - t0)
      continue
    codes, rho = solved
    rho_used = np.asarray(rho)[used]
    stragglers = used[rho_used <= floor]
    logging.info('code_dim %d: min rho of used projected values %.4f, %d at '
                 'or below %.3g (%.1fs)', m, rho_used.min(), len(stragglers),
                 floor, time.perf_counter() - t0)
    if fixed or len(stragglers) <= budget:
      break
  if len(stragglers) and m >= dim:
    # Re-solved on their own (host retries): values whose first solve
    # stalled above rho = 0 get their codes; the rest are refused.
    again = refuse_undecodable(decoders.project_values(values, decoder),
                               stragglers, tol=config.tol)
    codes = codes.at[stragglers].set(again.separators.astype(codes.dtype))
    rho = rho.at[stragglers].set(again.rho.astype(rho.dtype))
    stragglers = stragglers[:0]
  if len(stragglers):
    if len(stragglers) > budget:
      raise_undecodable(m, stragglers)
    logging.info('code_dim %d: %d used value(s) to patch', m, len(stragglers))
  return CodeChoice(min(m, dim), codes, rho, stragglers)


def patch_budget(config: ConstructionConfig, num_used: int) -> int:
  """How many used values a fixed code dim may leave to patching."""
  return int(config.patch * num_used)


@full_precision
def patch_stragglers(values: Array, decoder: Array, codes: Array, rho: Array,
                     stragglers, *, tol: float = 1e-3):
  """Extra decoder columns for values undecodable after projection.

  Straggler ``s_k`` gets the column ``u_k``, its separator in the full
  space (``<u_k, v_s - v_j> >= rho_s ||v_s - v_j||`` for every ``j``), and
  the code ``e_{m+k}``; every other code gets zeros there, so its logits are
  unchanged. Returns ``(decoder (d, m+S), codes (P, m+S), rho (P,))`` with
  the stragglers' full-space ``rho``.

  Raises:
    InfeasibleFactSetError: a straggler is not decodable even in the full
    space.
  """
  stragglers = np.asarray(stragglers, np.int64)
  full = refuse_undecodable(values, stragglers, tol=tol)
  s = len(stragglers)
  decoder = jnp.concatenate([decoder, full.separators.T.astype(decoder.dtype)],
                            axis=1)
  extra = jnp.zeros((codes.shape[0], s), codes.dtype).at[
      stragglers, jnp.arange(s)].set(1)
  codes = jnp.concatenate([codes.at[stragglers].set(0), extra], axis=1)
  rho = rho.at[stragglers].set(full.rho.astype(rho.dtype))
  return decoder, codes, rho


def refuse_undecodable(values: Array, candidates, *, tol: float = 1e-3,
                       labels=None):
  """Full-space decodability of ``candidates``; raises unless all are
  decodable.

  The one place a construction refuses a fact set: only a value whose
  certificate is closed (gap or dual bound within ``tol``, so its ``rho``
  is at most ``tol``) is named undecodable. A value whose solve ends with
  ``rho <= 0`` but an open certificate is not known to be undecodable (an
  earlier solver stalled there on decodable values), so it raises
  :class:`ConstructionError` with its bounds instead.

  Args:
    values: ``(P, d)`` value table the codes separate.
    candidates: ``(S,)`` used values to re-solve (against all of ``values``).
    tol: certificate tolerance.
    labels: optional ``S`` names for the messages (default the indices).

  Returns:
    :class:`~factstore_jax.decodability.Decodability` of the ``S``
    candidates (every ``rho > 0``).

  Raises:
    InfeasibleFactSetError: naming the candidates certified undecodable.
    ConstructionError: some candidate's certificate stays open at
      ``rho <= 0``.
  """
  candidates = np.asarray(candidates, np.int64)
  labels = candidates.tolist() if labels is None else list(labels)
  full = decodability(values, tol=tol, indices=candidates)
  rho, dual = np.asarray(full.rho), np.asarray(full.dual_bound)
  bad = rho <= 0
  open_ = np.flatnonzero(bad & ~settled(full, tol))
  if open_.size:
    shown = [(labels[i], round(float(rho[i]), 6), round(float(dual[i]), 6))
             for i in open_[:10]]
    raise ConstructionError(
        f'{open_.size} used value(s) have uncertified decodability (rho '
        f'lower bound <= 0 < upper bound; (value, lower, upper): {shown}); '
        f'a smaller tol may resolve them')
  if bad.any():
    raise InfeasibleFactSetError(
        candidates[bad],
        f'fact set is infeasible: {int(bad.sum())} used value(s) are not '
        f'decodable (certified rho <= tol = {tol:g}; rho <= 0: not strict '
        f'vertices of the value hull): '
        f'{[labels[i] for i in np.flatnonzero(bad)[:20]]}')
  return full


def raise_undecodable(code_dim: int, bad: np.ndarray, which: str | None = None):
  """Raises for used values (``bad``, if any) undecodable after projection."""
  if len(bad):
    which = which or f'e.g. {np.sort(bad)[:10].tolist()}'
    raise ConstructionError(
        f'code_dim={code_dim} leaves used value(s) undecodable after '
        f'projection ({which}); use a larger code_dim or leave it unset to '
        'search')


def rho_floor(config: ConstructionConfig, m: int, dim: int) -> float:
  """The projected rho a searched code dim ``m < d`` must beat (0 for a
  fixed code dim or the identity decoder)."""
  return config.min_rho if m < dim and config.code_dim is None else 0.0
