"""A journal of capacity-search rounds, so a killed search resumes.

A GD capacity search trains one MLP per width it tests; at large N one
search takes many minutes, and a killed run would train every width again.
:class:`RoundLog` is an append-only JSON-lines file with one line per
evaluated ``(cell, seed, width)``: its :meth:`RoundLog.recorder` is an
``on_round`` callback for :func:`~factstore_jax.capacity.methods.find_capacity`
and :meth:`RoundLog.known` gives back the accuracies as ``find_capacity``'s
``known`` argument (the search is deterministic given the accuracies, so it
asks again for exactly the widths it tested before, and trains only the
rest).

A line is replayed only for the same ``cell`` (what the fact set is, e.g.
``[geometry, d, N, method]``), ``seed`` and ``setup`` (everything else a
width's accuracy depends on: step budget, learning rate, code dim, ...).
Each line also records the seconds its round took (a round's time split
evenly over its widths), so a resumed row can report the compute it really
cost (:meth:`RoundLog.seconds`). Lines are appended whole and synced; a
line cut short by a kill is skipped. Several processes may append to one
file (each line is one ``write``).

Line format (``setup`` and ``cell`` are compared as JSON values)::

  {"cell": [...], "seed": 0, "width": 48, "accuracy": 1.0,
   "setup": {...}, "device": "cpu", "seconds": 212.4}
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, Sequence

import jax
from tqdm.auto import tqdm


class RoundLog:
  """The rounds journal at ``path`` (created on the first append).

  Args:
    path: the ``.jsonl`` file.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)

  def _lines(self, cell: Sequence[Any]):
    if not os.path.exists(self.path):
      return
    cell = json.loads(json.dumps(list(cell)))
    with open(self.path) as f:
      for line in f:
        try:
          r = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
          continue
        if isinstance(r, dict) and r.get('cell') == cell:
          yield r

  def _select(self, cell, seeds, setups):
    if len(seeds) != len(setups):
      raise ValueError(f'need one setup per seed, got {len(setups)} for '
                       f'{len(seeds)} seeds')
    want = {s: json.loads(json.dumps(u)) for s, u in zip(seeds, setups)}
    for r in self._lines(cell):
      if r.get('seed') in want and r.get('setup') == want[r['seed']]:
        yield r

  def _read(self, cell, seeds, setups):
    """``(known, seconds)`` per seed in one pass over the file."""
    known = {s: {} for s in seeds}
    seen, seconds = set(), {s: 0.0 for s in seeds}
    for r in self._select(cell, seeds, setups):
      width = int(r['width'])
      known[r['seed']][width] = float(r['accuracy'])
      if (r['seed'], width) not in seen:
        seen.add((r['seed'], width))
        seconds[r['seed']] += float(r.get('seconds', 0.0))
    return [known[s] for s in seeds], [seconds[s] for s in seeds]

  def known(self, cell: Sequence[Any], seeds: Sequence[int],
            setups: Sequence[dict]) -> list[dict[int, float]]:
    """``{width: accuracy}`` per seed, from the lines of that seed's setup.

    Args:
      cell: what the fact set is (JSON-able list).
      seeds: the seeds, in ``find_capacity``'s fact-set order.
      setups: one dict per seed (JSON-able).

    Returns:
      One dict per seed (empty where nothing was logged).
    """
    return self._read(cell, seeds, setups)[0]

  def seconds(self, cell: Sequence[Any], seeds: Sequence[int],
              setups: Sequence[dict]) -> list[float]:
    """Summed seconds of each seed's logged rounds (a width logged twice,
    by two runs that both trained it, counts once: its first line)."""
    return self._read(cell, seeds, setups)[1]

  def resume(self, cell: Sequence[Any], seeds: Sequence[int],
             setups: Sequence[dict], *, name: str | None = None
             ) -> tuple[dict, list[float]]:
    """What a search needs to resume, from one read of the file.

    Returns:
      ``(kwargs, seconds)``: ``kwargs`` holds ``known`` (:meth:`known`) and
      ``on_round`` (:meth:`recorder`, with ``name``) for
      :func:`~factstore_jax.capacity.methods.find_capacity` or
      ``smallest_mlp``; ``seconds`` is :meth:`seconds`, per seed.
    """
    known, seconds = self._read(cell, seeds, setups)
    return (dict(known=known,
                 on_round=self.recorder(cell, seeds, setups, name=name)),
            seconds)

  def recorder(self, cell: Sequence[Any], seeds: Sequence[int],
               setups: Sequence[dict], *, name: str | None = None
               ) -> Callable[[list[int], list[int], list[float]], None]:
    """An ``on_round(members, widths, accuracies)`` callback that appends
    the round's lines (``members`` index ``seeds``) and, with ``name``,
    prints the round to stderr. A round's seconds run from the recorder's
    creation or the previous round."""
    if len(seeds) != len(setups):
      raise ValueError(f'need one setup per seed, got {len(setups)} for '
                       f'{len(seeds)} seeds')
    t0 = time.perf_counter()
    last = [t0]

    def record(members, widths, accs):
      now = time.perf_counter()
      each = (now - last[0]) / max(1, len(widths))
      last[0] = now
      if name is not None:
        tried = ', '.join(f'seed {seeds[m]} width {w}: {a:.4f}'
                          for m, w, a in zip(members, widths, accs))
        tqdm.write(f'{name} [{now - t0:.0f} s] {tried}', file=sys.stderr)
      device = jax.devices()[0].device_kind
      lines = ''.join(
          json.dumps(dict(cell=list(cell), seed=seeds[m], width=int(w),
                          accuracy=float(a), setup=setups[m], device=device,
                          seconds=each)) + '\n'
          for m, w, a in zip(members, widths, accs))
      folder = os.path.dirname(self.path)
      if folder:
        os.makedirs(folder, exist_ok=True)
      with open(self.path, 'a+b') as f:
        # A line cut by a kill has no newline: start on a fresh line, or
        # the first new line would join the cut one and be lost with it.
        cut = f.tell() > 0 and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b'\n'
        f.write((('\n' if cut else '') + lines).encode())
        f.flush()
        os.fsync(f.fileno())
    return record
