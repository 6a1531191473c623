"""Capacity search: the smallest MLP that stores a fact set, and scaling fits.

``W*(method, factset)`` is the smallest parameter count at which storage
accuracy meets a threshold (default 1.0). Every method exposes one integer
width knob whose parameter count grows with it; :func:`search_width` finds the
smallest passing width without ever testing a width twice: it grows a bracket
geometrically from a start guess, then splits the bracket geometrically into
``batch`` + 1 parts per round, testing ``batch`` widths at once (one vmapped
call where the method allows). Storage is assumed monotone in width; a pass
below a fail (GD noise) is kept as the answer, which is what a user asking
"how small can it be" wants.

Fits: :func:`loglog_slope` (``W ~ N^s``) and :func:`fit_n_log_n`
(``W = C N (log2 N + b)``).
"""

from __future__ import annotations

import math
from typing import Callable, Generator, NamedTuple, Sequence

import numpy as np

from factstore_jax.errors import FactStoreError


class WidthSearch(NamedTuple):
  width: int | None          # smallest passing width (None: none passed)
  tested: dict               # width -> accuracy, every width evaluated
  rounds: int                # calls of ``evaluate``


def _check_search(start, max_width, min_width, batch, growth, rel_tol):
  if not 1 <= min_width <= max_width:
    raise FactStoreError(
        f'need 1 <= min_width <= max_width, got {min_width}, {max_width}')
  if not min_width <= start <= max_width:
    raise FactStoreError(
        f'start {start} is outside [{min_width}, {max_width}]')
  if batch < 1 or growth <= 1 or rel_tol < 0:
    raise FactStoreError(
        f'need batch >= 1, growth > 1, rel_tol >= 0; got {batch}, {growth}, '
        f'{rel_tol}')


def _search(*, start, max_width, min_width, threshold, batch, rel_tol,
            growth) -> Generator[list[int], list[float], WidthSearch]:
  """The search as a generator: yields widths, receives their accuracies."""
  tested: dict[int, float] = {}
  rounds = 0

  def run(widths):
    nonlocal rounds
    widths = sorted({int(w) for w in widths} - set(tested))
    if not widths:
      return
    accs = yield widths
    if len(accs) != len(widths):
      raise FactStoreError(
          f'evaluate returned {len(accs)} accuracies for {len(widths)} widths')
    tested.update({w: float(a) for w, a in zip(widths, accs)})
    rounds += 1

  def bounds():
    passed = [w for w, a in tested.items() if a >= threshold]
    hi = min(passed) if passed else None
    failed = [w for w, a in tested.items()
              if a < threshold and (hi is None or w < hi)]
    return (max(failed) if failed else None), hi

  yield from run([start])
  lo, hi = bounds()
  # Grow (or shrink) geometrically until the answer is bracketed.
  while hi is None and max(tested) < max_width:
    top = max(tested)
    yield from run([min(max_width, math.ceil(top * growth ** (i + 1)))
                    for i in range(batch)])
    lo, hi = bounds()
  if hi is None:
    return WidthSearch(None, tested, rounds)
  while lo is None and min(tested) > min_width:
    bottom = min(tested)
    yield from run([max(min_width, math.floor(bottom / growth ** (i + 1)))
                    for i in range(batch)])
    lo, hi = bounds()
  lo = min_width - 1 if lo is None else lo
  # Split the bracket (lo, hi) geometrically into batch + 1 parts until
  # adjacent: widths are scale parameters and the tolerance is relative.
  while hi - lo > 1 and hi - lo > rel_tol * hi:
    ratio = hi / max(lo, 0.5)
    yield from run({min(hi - 1, max(lo + 1, round(
        max(lo, 0.5) * ratio ** ((i + 1) / (batch + 1)))))
                    for i in range(batch)})
    new_lo, hi = bounds()
    lo = lo if new_lo is None else max(lo, new_lo)
  return WidthSearch(hi, tested, rounds)


def search_width(evaluate: Callable[[Sequence[int]], Sequence[float]], *,
                 start: int, max_width: int, min_width: int = 1,
                 threshold: float = 1.0, batch: int = 1,
                 rel_tol: float = 0.0, growth: float = 2.0) -> WidthSearch:
  """Smallest integer width in ``[min_width, max_width]`` meeting ``threshold``.

  Args:
    evaluate: maps a list of widths to their storage accuracies (one call may
      train them all at once).
    start: first width tried (a good guess saves rounds).
    max_width, min_width: search range (inclusive).
    threshold: accuracy to meet.
    batch: widths per ``evaluate`` call.
    rel_tol: stop once ``(hi - lo) <= rel_tol * hi`` (0: exact).
    growth: bracket growth factor while no width has passed / failed.

  Returns:
    :class:`WidthSearch`.
  """
  return search_widths(lambda members, widths: evaluate(widths), [start],
                       max_width=max_width, min_width=min_width,
                       threshold=threshold, batch=batch, rel_tol=rel_tol,
                       growth=growth)[0]


def search_widths(evaluate: Callable[[Sequence[int], Sequence[int]],
                                     Sequence[float]],
                  starts: Sequence[int], **kwargs) -> list[WidthSearch]:
  """Several searches (e.g. one per seed) run in lockstep.

  Each round gathers every unfinished search's widths into one call
  ``evaluate(members, widths)`` (parallel lists: member ``members[j]`` at
  width ``widths[j]``), so a method can train them all in one vmapped,
  masked program. Keyword arguments as :func:`search_width`.
  """
  kwargs = dict(dict(min_width=1, threshold=1.0, batch=1, rel_tol=0.0,
                     growth=2.0), **kwargs)
  for start in starts:
    _check_search(start, kwargs['max_width'], kwargs['min_width'],
                  kwargs['batch'], kwargs['growth'], kwargs['rel_tol'])
  searches = [_search(start=s, **kwargs) for s in starts]
  results: list[WidthSearch | None] = [None] * len(starts)
  pending = {}
  for i, gen in enumerate(searches):
    pending[i] = next(gen)
  while pending:
    members = [i for i, ws in pending.items() for _ in ws]
    widths = [w for ws in pending.values() for w in ws]
    accs = list(evaluate(members, widths))
    if len(accs) != len(widths):
      raise FactStoreError(
          f'evaluate returned {len(accs)} accuracies for {len(widths)} widths')
    offset, nxt = 0, {}
    for i, ws in pending.items():
      try:
        nxt[i] = searches[i].send(accs[offset:offset + len(ws)])
      except StopIteration as stop:
        results[i] = stop.value
      offset += len(ws)
    pending = nxt
  return results


# --------------------------------------------------------------------------
# Scaling fits.


class Fit(NamedTuple):
  params: tuple          # fitted parameters
  r2: float              # coefficient of determination (of log W for slopes)


def loglog_slope(n: Sequence[float], w: Sequence[float]) -> Fit:
  """Least-squares ``log W = s log N + c``; returns ``((s, c), R^2)``."""
  x, y = np.log(np.asarray(n, float)), np.log(np.asarray(w, float))
  if x.size < 2 or np.ptp(x) == 0:
    raise FactStoreError('a slope needs at least two distinct N')
  s, c = np.polyfit(x, y, 1)
  return Fit((float(s), float(c)), _r2(y, s * x + c))


def fit_n_log_n(n: Sequence[float], w: Sequence[float]) -> Fit:
  """Least-squares ``W = C N (log2 N + b)`` (linear in ``C`` and ``C b``)."""
  n, w = np.asarray(n, float), np.asarray(w, float)
  if n.size < 2 or np.ptp(n) == 0:
    raise FactStoreError('the N log N fit needs at least two distinct N')
  design = np.stack([n * np.log2(n), n], axis=1)
  (c, cb), *_ = np.linalg.lstsq(design, w, rcond=None)
  return Fit((float(c), float(cb / c) if c else float('nan')),
             _r2(w, design @ np.array([c, cb])))


def linear_fit(x: Sequence[float], y: Sequence[float]) -> Fit:
  """Least-squares ``y = a x + c``; returns ``((a, c), R^2)``."""
  x, y = np.asarray(x, float), np.asarray(y, float)
  if x.size < 2 or np.ptp(x) == 0:
    raise FactStoreError('a linear fit needs at least two distinct x')
  a, c = np.polyfit(x, y, 1)
  return Fit((float(a), float(c)), _r2(y, a * x + c))


def _r2(y, pred) -> float:
  ss = float(np.sum((y - np.mean(y)) ** 2))
  return 1.0 - float(np.sum((y - pred) ** 2)) / ss if ss > 0 else 1.0


def info_floor(num_facts: int, num_values: int, bits_per_param: float = 32.0):
  """Information-theoretic floor ``N log2 P / b`` parameters."""
  return num_facts * math.log2(max(num_values, 2)) / bits_per_param
