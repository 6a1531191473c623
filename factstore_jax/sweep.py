"""The sweep runner every experiment uses: resumable CSV result tables.

* :class:`ResultsTable` is a CSV of result rows; each append rewrites the
  file atomically, so a killed process never leaves a half-written table.
* :func:`run_sweep` computes the configs the table does not hold yet, in
  groups, appending each finished row at once, with a progress bar. Re-running
  a killed sweep skips what it finished. Between groups it releases JAX's
  compiled programs before the process runs out of memory maps
  (:func:`release_compiled`).
* Under ``jax.distributed`` (:mod:`factstore_jax.distributed`) every process
  runs the same :func:`run_sweep` call: the pending groups are dealt out over
  the processes, each appends its rows to its own shard file
  (:func:`shard_path`, ``rows.p<i>.csv``), and process 0 merges the shards
  into the table's file at the end (:func:`merge_shards`; also
  ``run_sweep(..., merge_only=True)``).

Typical use::

  table = ResultsTable('results.csv', key_fields=('n', 'seed'))
  def compute(group):
    batch = stack_inputs(group)             # leaves (len(group), ...)
    out = sharding.map_batched(one_run, batch)  # dict of (len(group), ...)
    return [{'acc': float(a)} for a in out['acc']]
  rows = run_sweep(configs, compute, table, batch_size=8)
"""

from __future__ import annotations

import csv
import functools
import gc
import json
import math
import numbers
import os
import re
import zlib
from typing import Any, Callable, Hashable, Iterable, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from factstore_jax import distributed
from factstore_jax.atomic import atomic_output
from factstore_jax.errors import FactStoreError

# ---------------------------------------------------------------------------
# Results table.
# ---------------------------------------------------------------------------


def format_value(value: Any) -> str:
  """Canonical CSV text of a scalar: how values are written and matched.

  ``bool`` -> ``'True'``/``'False'``; integers -> ``str(int)``; floats ->
  ``repr(float)`` (round-trips exactly); ``str`` as is; ``None`` -> ``''``.
  numpy / jax scalars and 0-d arrays count as their Python value. So ``1``
  and ``1.0`` are different keys (``'1'`` vs ``'1.0'``), and so are ``0.1``
  and ``np.float32(0.1)`` (``'0.10000000149011612'``).
  """
  if value is None:
    return ''
  if isinstance(value, str):
    return value
  if isinstance(value, (np.ndarray, jax.Array, np.generic)):
    if np.ndim(value) != 0:
      raise FactStoreError(
          f'table values must be scalars; got an array of shape '
          f'{np.shape(value)}')
    value = np.asarray(value).item()
  if isinstance(value, (bool, np.bool_)):
    return str(bool(value))
  if isinstance(value, numbers.Integral):
    return str(int(value))
  if isinstance(value, numbers.Real):
    return repr(float(value))
  raise FactStoreError(
      f'table values must be str, int, float, bool or None; got '
      f'{type(value).__name__}: {value!r}')


def parse_value(text: str) -> Any:
  """Inverse of :func:`format_value` (``''`` -> ``None``; numbers and
  ``'True'``/``'False'`` parsed; anything else stays a string)."""
  if text == '':
    return None
  if text in ('True', 'False'):
    return text == 'True'
  try:
    return int(text)
  except ValueError:
    pass
  try:
    return float(text)
  except ValueError:
    return text


class ResultsTable:
  """A CSV of result rows, rewritten atomically on every append.

  Rows are dicts of scalars (str, int, float, bool, None); they are stored
  as :func:`format_value` text and given back parsed by :func:`parse_value`
  (so a string that looks like a number comes back as a number, and ``''``
  as ``None``). The header is the union of every row's columns in first-seen
  order; a row lacking a column reads ``None`` there. Rows are identified by
  ``key_fields``: at most one row per key. One writer per file at a time.
  """

  def __init__(self, path: str | os.PathLike, key_fields: Sequence[str]):
    """Opens ``path``, reading its rows if it exists (empty otherwise).

    Args:
      path: the CSV file; its folder must exist by the first append.
      key_fields: the columns that identify a row (a ``str`` means one).
    """
    if isinstance(key_fields, str):
      key_fields = (key_fields,)
    key_fields = tuple(key_fields)
    if not key_fields:
      raise FactStoreError('ResultsTable: key_fields is empty')
    if len(set(key_fields)) != len(key_fields):
      raise FactStoreError(f'ResultsTable: duplicate key_fields {key_fields}')
    self.path = os.fspath(path)
    self.key_fields = key_fields
    self._header: list[str] = []
    self._rows: list[dict[str, str]] = []  # canonical text, full header
    self._index: dict[tuple[str, ...], int] = {}
    if os.path.exists(self.path):
      self._load()

  def _load(self) -> None:
    with open(self.path, newline='') as f:
      reader = csv.reader(f)
      header = next(reader, None)
      if header is None:  # an empty file is an empty table
        return
      missing = [k for k in self.key_fields if k not in header]
      if missing:
        raise FactStoreError(
            f'{self.path}: header {header} lacks key field(s) {missing}')
      rows = []
      for line, values in enumerate(reader, start=2):
        if len(values) != len(header):
          raise FactStoreError(
              f'{self.path}:{line}: {len(values)} values for '
              f'{len(header)} columns')
        rows.append(dict(zip(header, values)))
    index = {}
    for i, row in enumerate(rows):
      key = tuple(row[k] for k in self.key_fields)
      if key in index:
        raise FactStoreError(f'{self.path}: duplicate rows for key {key}')
      index[key] = i
    self._header, self._rows, self._index = header, rows, index

  def reload(self) -> None:
    """Reads the file again (empty if it is gone): another writer's rows."""
    self._header, self._rows, self._index = [], [], {}
    if os.path.exists(self.path):
      self._load()

  def key(self, config: Mapping[str, Any]) -> tuple[str, ...]:
    """The canonical text of ``config``'s key fields."""
    missing = [k for k in self.key_fields if k not in config]
    if missing:
      raise FactStoreError(
          f'config {dict(config)} lacks key field(s) {missing}')
    return tuple(format_value(config[k]) for k in self.key_fields)

  def is_done(self, config: Mapping[str, Any]) -> bool:
    """Whether a row with ``config``'s key fields is in the table."""
    return self.key(config) in self._index

  def get(self, config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The (parsed) row with ``config``'s key, or ``None``."""
    i = self._index.get(self.key(config))
    return None if i is None else self._parse(self._rows[i])

  def append(self, row: Mapping[str, Any]) -> None:
    """Adds ``row`` and rewrites the file atomically (temp file + rename).

    On any error the file and this table are left as they were.
    """
    if not isinstance(row, Mapping):
      raise FactStoreError(f'a row must be a dict; got {type(row).__name__}')
    key = self.key(row)
    if key in self._index:
      raise FactStoreError(f'{self.path}: a row with key {key} exists')
    text, header = self._as_text(row)
    rows = self._rows + [text]
    self._write(header, rows)
    # Only after the file is written does the table change.
    self._header, self._rows = header, rows
    self._index[key] = len(rows) - 1

  def update(self, changes: Iterable[tuple[Mapping[str, Any],
                                            Mapping[str, Any]]]) -> None:
    """Sets columns of existing rows and rewrites the file once, atomically.

    Args:
      changes: ``(config, values)`` pairs: ``values``' columns are set in the
        row with ``config``'s key (new columns join the header; later pairs
        win on the same row and column).

    Raises:
      FactStoreError: a pair names no row, or its ``values`` names a key
        field. Every pair is checked before anything is written, so on any
        error the file and this table are left as they were.
    """
    header, rows = self._header, list(self._rows)
    for config, values in changes:
      i = self._index.get(self.key(config))
      if i is None:
        raise FactStoreError(
            f'{self.path}: no row with key {self.key(config)}')
      keys = [k for k in values if k in self.key_fields]
      if keys:
        raise FactStoreError(f'update cannot change key field(s) {keys}')
      text, header = self._as_text(values, header)
      rows[i] = {**rows[i], **text}
    if rows == self._rows and header == self._header:
      return
    self._write(header, rows)
    self._header, self._rows = header, rows

  def _as_text(self, values: Mapping[str, Any],
               header: list[str] | None = None
               ) -> tuple[dict[str, str], list[str]]:
    """``values`` as canonical text, and ``header`` (default: the file's)
    with their new columns."""
    header = self._header if header is None else header
    text = {}
    for name, value in values.items():
      if not isinstance(name, str):
        raise FactStoreError(f'column names must be str; got {name!r}')
      text[name] = format_value(value)
    return text, header + [c for c in text if c not in header]

  def _replace(self, header: list[str], rows: list[dict[str, str]]) -> None:
    """Rewrites the file with ``rows`` (canonical text) and adopts them."""
    index = {}
    for i, row in enumerate(rows):
      index[tuple(row.get(k, '') for k in self.key_fields)] = i
    if len(index) != len(rows):
      raise FactStoreError(f'{self.path}: duplicate keys in the rows given')
    self._write(header, rows)
    self._header, self._rows, self._index = header, rows, index

  def _write(self, header: list[str], rows: list[dict[str, str]]) -> None:
    with atomic_output(self.path) as tmp:
      with open(tmp, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=header, restval='')
        writer.writeheader()
        for row in rows:
          writer.writerow(row)
        f.flush()
        os.fsync(f.fileno())

  def _parse(self, row: Mapping[str, str]) -> dict[str, Any]:
    return {c: parse_value(row.get(c, '')) for c in self._header}

  @property
  def columns(self) -> list[str]:
    """The header: every column in first-seen order."""
    return list(self._header)

  def rows(self) -> list[dict[str, Any]]:
    """Every row, parsed, in file order; each has every column."""
    return [self._parse(r) for r in self._rows]

  def column(self, name: str, dtype: Any = float) -> np.ndarray:
    """Column ``name`` as a ``(num_rows,)`` array of ``dtype``."""
    if name not in self._header:
      raise FactStoreError(f'{self.path}: no column {name!r}')
    return np.asarray([parse_value(r.get(name, '')) for r in self._rows],
                      dtype=dtype)

  def __len__(self) -> int:
    return len(self._rows)


# ---------------------------------------------------------------------------
# Per-process shard files.
# ---------------------------------------------------------------------------


@functools.cache
def reference_rows(path: str, key_fields: tuple[str, ...]) -> ResultsTable:
  """The rows of a checked-in ``rows.csv``, read once per process.

  For a :func:`run_sweep` ``cost`` (with :func:`recorded_seconds`) that looks
  rows up many times: the file is parsed on the first call only. Do not
  append to the table returned.

  Args:
    path: the CSV file (an empty table if it does not exist).
    key_fields: the columns that identify a row.

  Returns:
    The :class:`ResultsTable`, the same object for the same arguments.
  """
  return ResultsTable(path, key_fields)


def recorded_seconds(table: ResultsTable, config: Mapping[str, Any],
                     match: Mapping[str, Any] | None = None) -> float | None:
  """The ``seconds`` column of ``config``'s row in ``table``, or ``None``.

  For a :func:`run_sweep` ``cost`` that deals rows by what they took in
  earlier results (e.g. the checked-in rows of a default grid): ``None``
  where ``table`` has no row with ``config``'s key, the row has no
  ``seconds``, or it differs from ``match`` in any of its columns (a row
  computed under another budget).

  Args:
    table: the earlier rows.
    config: the row's config (its key fields at least).
    match: ``{column: value}`` the earlier row must have.

  Returns:
    Seconds, or ``None``.
  """
  row = table.get(config)
  if row is None or row.get('seconds') is None:
    return None
  if any(row.get(k) != v for k, v in (match or {}).items()):
    return None
  return float(row['seconds'])


def shard_path(path: str | os.PathLike, process_id: int) -> str:
  """The shard file of process ``process_id``: ``rows.csv`` -> ``rows.p3.csv``.
  """
  stem, ext = os.path.splitext(os.fspath(path))
  return f'{stem}.p{int(process_id)}{ext}'


def shard_paths(path: str | os.PathLike) -> list[str]:
  """The shard files of ``path`` that exist, in process order."""
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  stem, ext = os.path.splitext(os.path.basename(path))
  pattern = re.compile(re.escape(stem) + r'\.p(\d+)' + re.escape(ext) + '$')
  if not os.path.isdir(folder):
    return []
  found = [(int(m.group(1)), name) for name in os.listdir(folder)
           if (m := pattern.match(name))]
  return [os.path.join(os.path.dirname(path), name)
          for _, name in sorted(found)]


def process_table(path: str | os.PathLike,
                  key_fields: Sequence[str]) -> ResultsTable:
  """A table only this process writes: ``path`` itself when there is one
  process, its :func:`shard_path` under ``jax.distributed``.

  For tables a sweep's ``compute`` appends to on the side (e.g. a log of
  trials): two processes must never write one file.
  """
  info = distributed.process_info()
  if info.num_processes > 1:
    path = shard_path(path, info.process_id)
  return ResultsTable(path, key_fields)


def merge_shards(table: ResultsTable,
                 order: Sequence[Mapping[str, Any]] | None = None) -> int:
  """Merges the shard files of ``table`` into its file (atomic rewrite).

  Rows already in the table's file keep their place; the shards' other rows
  follow, deduplicated by key (the file's row wins, then the lowest process
  index), in the order of ``order``'s configs (rows of keys not in ``order``
  after them, sorted by key). A fresh sweep's merged file is thus the file
  one process would have written. The file is read again first, so rows
  another writer added are kept. Shard files are left in place (they may
  still be written to); merging again adds nothing.

  Args:
    table: the results table (its ``path`` names the merged file).
    order: configs (dicts with the key fields) giving the row order.

  Returns:
    How many rows the merge added.
  """
  table.reload()
  shards = [ResultsTable(p, table.key_fields)
            for p in shard_paths(table.path)]
  position = {}
  for i, config in enumerate(order or ()):
    position.setdefault(table.key(config), i)
  header = list(table._header)  # pylint: disable=protected-access
  rows = list(table._rows)  # pylint: disable=protected-access
  seen = set(table._index)  # pylint: disable=protected-access
  added = []
  for shard in shards:
    for row in shard._rows:  # pylint: disable=protected-access
      key = tuple(row[k] for k in table.key_fields)
      if key not in seen:
        seen.add(key)
        added.append((key, row))
  if not added:
    return 0
  added.sort(key=lambda item: (position.get(item[0], len(position)),
                               () if item[0] in position else item[0]))
  for _, row in added:
    header += [c for c in row if c not in header]
    rows.append(row)
  table._replace(header, rows)  # pylint: disable=protected-access
  return len(added)


def _done_keys(table: ResultsTable) -> set[tuple[str, ...]]:
  """Keys finished in the table's file or any of its shard files (as on
  disk now)."""
  table.reload()
  done = set(table._index)  # pylint: disable=protected-access
  for p in shard_paths(table.path):
    done |= set(ResultsTable(p, table.key_fields)._index)  # pylint: disable=protected-access
  return done


def owner(group_index: int, num_processes: int) -> int:
  """The process that computes pending group ``group_index``.

  Dealt in snake order (0, 1, .., n-1, n-1, .., 1, 0, 0, 1, ..): a grid whose
  groups alternate cheap and costly (closed form, GD, closed form, GD) or
  grow along it still splits about evenly.
  """
  turn, slot = divmod(int(group_index), int(num_processes))
  return slot if turn % 2 == 0 else num_processes - 1 - slot


# With costs, deal() splits an affinity class only if placing it whole would
# take a process past this multiple of an even share.
SPLIT_PAST_SHARE = 1.5


def deal(affinities: Sequence[Hashable], num_processes: int,
         costs: Sequence[float] | None = None) -> list[int]:
  """The process of each pending group, keeping groups of equal affinity
  together as far as balance allows.

  Groups with the same affinity (e.g. the same shapes, so the same compiled
  programs) go to one process, so each program is compiled by one process,
  as in a one-process run, instead of by every process (on CPU the
  processes cannot share compiled programs: the compilation cache keys them
  by device).

  Without ``costs`` the affinity classes, in order of first appearance, are
  placed whole on the processes in snake order (:func:`owner`), none taking
  more than ``ceil(groups / num_processes)`` groups; a class that does not
  fit the next process's room is split over the next ones.

  With ``costs`` (an estimate per group, any unit) the classes are placed
  whole, costliest first, each on the least loaded process (longest
  processing time first; on equal load, the one with fewest groups). A
  class is split only when it is costlier than an even share
  (``sum(costs) / num_processes``) and placing it whole would take the
  process past ``SPLIT_PAST_SHARE`` times that share (a split compiles its
  programs twice): it then fills the least loaded process up to the share,
  in group order and at least one group, and the rest is placed the same
  way.

  Args:
    affinities: one hashable per group, in group order.
    num_processes: processes to deal to (``>= 1``).
    costs: optional estimated cost per group (finite, ``>= 0``).

  Returns:
    The owning process of each group. Without ``costs``, group counts
    differ by at most ``ceil(groups / num_processes)`` minus the smallest
    share.

  Raises:
    FactStoreError: ``costs`` of the wrong length, negative or not finite.
  """
  n = int(num_processes)
  classes: dict[Hashable, list[int]] = {}
  for g, a in enumerate(affinities):
    classes.setdefault(a, []).append(g)
  owners = [0] * len(affinities)
  if costs is not None:
    costs = [float(c) for c in costs]
    if len(costs) != len(affinities) or not all(
        math.isfinite(c) and c >= 0 for c in costs):
      raise FactStoreError(
          f'costs must be {len(affinities)} finite numbers >= 0, one per '
          f'group; got {costs!r}')
    share = sum(costs) / n
    cost_of = lambda members: sum(costs[g] for g in members)
    load, count = [0.0] * n, [0] * n
    for members in sorted(classes.values(), key=lambda m: -cost_of(m)):
      while members:
        # Least loaded; on equal load (e.g. zero costs) fewest groups.
        p = min(range(n), key=lambda q: (load[q], count[q], q))
        take = len(members)
        # A split compiles the class's programs on two processes: only
        # worth it when the class alone is far past an even share.
        if cost_of(members) > share and (
            load[p] + cost_of(members) > SPLIT_PAST_SHARE * share):
          take, room = 0, share - load[p]
          while take == 0 or (take < len(members) and
                              costs[members[take]] <= room):
            room -= costs[members[take]]
            take += 1
        for g in members[:take]:
          owners[g] = p
        load[p] += cost_of(members[:take])
        count[p] += take
        members = members[take:]
    return owners
  quota = max(1, -(-len(affinities) // n))
  load, turn = [0] * n, 0
  for members in classes.values():
    done = 0
    while done < len(members):
      # The next process in snake order with room (n * quota >= groups).
      while load[owner(turn, n)] == quota:
        turn += 1
      p = owner(turn, n)
      turn += 1
      take = min(quota - load[p], len(members) - done)
      for g in members[done:done + take]:
        owners[g] = p
      load[p] += take
      done += take
  return owners


# ---------------------------------------------------------------------------
# Sweep runner.
# ---------------------------------------------------------------------------


# Linux gives a process at most vm.max_map_count memory maps (65,530 by
# default). Every program XLA:CPU compiles, and JAX keeps in its caches,
# holds some: a closed-form W* search at N = 1,024 adds 1,300-4,000, so a
# sweep of such rows passes the limit after about 20-40 of them; the next
# compilation then fails ("LLVM compilation error: Cannot allocate memory")
# and the process dies. Between groups run_sweep drops JAX's caches once the
# process holds this fraction of its limit.
MAP_FRACTION = 0.5


def memory_maps() -> tuple[int, int] | None:
  """``(maps this process holds, the system's limit)``, or ``None`` where
  the system does not say (not Linux)."""
  try:
    with open('/proc/sys/vm/max_map_count') as f:
      limit = int(f.read())
    with open('/proc/self/maps', 'rb') as f:
      count = sum(1 for _ in f)
  except (OSError, ValueError):
    return None
  return count, limit


def release_compiled(fraction: float = MAP_FRACTION) -> bool:
  """Drops JAX's compiled programs if the process nears its map limit.

  A long sweep compiles thousands of programs (shapes that change from row
  to row); JAX keeps them all, and each holds memory maps. Called between
  groups by :func:`run_sweep`; later calls recompile what they need.

  Args:
    fraction: clear once the process holds at least this fraction of
      ``vm.max_map_count`` maps (in ``(0, 1]``).

  Returns:
    Whether the caches were cleared (never where :func:`memory_maps` is
    ``None``).

  Raises:
    FactStoreError: ``fraction`` outside ``(0, 1]``.
  """
  if not 0 < fraction <= 1:
    raise FactStoreError(f'fraction must be in (0, 1]; got {fraction!r}')
  usage = memory_maps()
  if usage is None or usage[0] < fraction * usage[1]:
    return False
  jax.clear_caches()
  gc.collect()
  after = memory_maps()
  logging.info('released compiled programs: %d memory maps of %d allowed, '
               '%s after', usage[0], usage[1],
               after[0] if after else 'unknown')
  return True


def run_sweep(configs: Sequence[Mapping[str, Any]],
              compute: Callable[[list[dict[str, Any]]],
                                Sequence[Mapping[str, Any]]],
              table: ResultsTable, *, batch_size: int = 1,
              desc: str | None = None,
              progress: bool = True,
              merge_only: bool = False,
              affinity: Callable[[Mapping[str, Any]], Hashable] | None = None,
              cost: Callable[[Mapping[str, Any]], float] | None = None
              ) -> list[dict[str, Any]]:
  """Computes the configs ``table`` lacks and appends each finished row.

  Pending configs (those neither in ``table`` nor in any of its shard
  files) go to ``compute`` in consecutive groups of ``batch_size``; each
  result is merged with its config (``{**config, **result}``) and appended
  at once, one atomic write per row. If ``compute`` raises, the rows
  finished before stay on disk and the exception propagates; running again
  computes only the rest.
  After each group, a process that holds half its memory-map limit drops
  JAX's compiled programs (:func:`release_compiled`): a long sweep of
  changing shapes would otherwise die in compilation.

  Under ``jax.distributed`` with several processes, every process makes
  this same call (same configs, same ``batch_size``; checked). The
  processes agree on what is pending (the union of what each sees on
  disk), cut it into the same groups one process would, and deal the groups
  out (:func:`deal`, by ``affinity`` and ``cost``); so each group's
  ``compute`` call, and its rows, are those of a one-process run. Process
  ``i`` appends its rows to :func:`shard_path` ``(table.path, i)``. When all are done (a barrier),
  process 0 merges every shard into ``table``'s file (:func:`merge_shards`)
  and every process returns the merged rows. The folder must be one every
  process sees (a shared filesystem). A killed process loses no finished
  row; running the same call again, on any number of processes, resumes.
  With one process, shard files left by an earlier run are merged first.

  Args:
    configs: dicts of scalars, each holding the table's key fields; no two
      with the same key.
    compute: ``group (list of config dicts) -> list of result dicts``, one
      per config, in order. A result may repeat a config value but not
      change it. Under ``jax.distributed`` it must use this process's
      devices only (``sharding.map_batched``'s default mesh does).
    table: where rows are read and appended (the merged file).
    batch_size: configs per ``compute`` call (``>= 1``).
    desc: progress bar label.
    progress: show a ``tqdm`` bar over this process's configs (starting at
      the number already done).
    merge_only: compute nothing: merge the shard files into ``table``'s
      file (process 0) and return the rows found.
    affinity: optional ``config -> hashable``: groups (by their first
      config) of equal affinity compile the same programs, e.g. one cell's
      shapes under several geometries; under ``jax.distributed`` they go to
      one process as far as balance allows (:func:`deal`). It changes which
      process computes a group, never the group or its rows. ``None``: each
      group on its own.
    cost: optional ``config -> float``, an estimate of a config's compute
      time in any unit (finite, ``>= 0``); under ``jax.distributed`` the
      groups are then dealt by their summed cost, costliest classes first
      (:func:`deal`), instead of by count. Like ``affinity``, it changes
      only which process computes a group.

  Returns:
    The table's rows (parsed) for ``configs``, in ``configs`` order; with
    ``merge_only``, only those of the finished configs.

  Raises:
    FactStoreError: bad configs, results, ``batch_size`` or ``cost``
      (checked on every config before any is computed).
    DistributedError: the processes disagree on the configs, a peer died
      at a barrier, or process 0 does not see every process's rows.
  """
  if (not isinstance(batch_size, numbers.Integral) or
      isinstance(batch_size, bool) or batch_size < 1):
    raise FactStoreError(f'batch_size must be an int >= 1; got {batch_size!r}')
  configs = list(configs)
  seen = {}
  for i, config in enumerate(configs):
    if not isinstance(config, Mapping):
      raise FactStoreError(
          f'config {i} must be a dict; got {type(config).__name__}')
    key = table.key(config)
    if key in seen:
      raise FactStoreError(
          f'duplicate configs {seen[key]} and {i}: same key '
          f'{dict(zip(table.key_fields, key))}')
    seen[key] = i
  costs = None
  if cost is not None:
    costs = {}
    for key, config in zip(seen, configs):
      c = cost(config)
      if (isinstance(c, bool) or not isinstance(c, numbers.Real) or
          not math.isfinite(c) or c < 0):
        raise FactStoreError(
            f'cost must return a finite number >= 0; got {c!r} for '
            f'{dict(zip(table.key_fields, key))}')
      costs[key] = float(c)
  info = distributed.process_info()
  if merge_only:
    if info.process_id == 0:
      merge_shards(table, configs)
    distributed.barrier('merge_only')
    table.reload()
    return [table.get(c) for c in configs if table.is_done(c)]
  if info.num_processes == 1:
    if shard_paths(table.path):
      merge_shards(table, configs)
    pending = [dict(c) for c in configs if not table.is_done(c)]
    _compute_groups(_groups(pending, batch_size), compute, table,
                    total=len(configs), desc=desc, progress=progress)
    return [table.get(c) for c in configs]
  return _run_distributed(configs, compute, table, batch_size, desc, progress,
                          info, affinity, costs)


def _groups(pending: list[dict[str, Any]],
            batch_size: int) -> list[list[dict[str, Any]]]:
  return [pending[i:i + batch_size] for i in range(0, len(pending),
                                                   batch_size)]


def _compute_groups(groups, compute, table: ResultsTable, *, total: int,
                    desc: str | None, progress: bool) -> None:
  """Runs ``compute`` on each group, appending each row to ``table``."""
  todo = sum(len(g) for g in groups)
  bar = tqdm(total=total, initial=total - todo, desc=desc,
             disable=not progress)
  with bar:
    for group in groups:
      results = compute([dict(c) for c in group])
      for row in _merge(group, results):
        table.append(row)
        bar.update(1)
      release_compiled()


def _run_distributed(configs, compute, table: ResultsTable, batch_size: int,
                     desc: str | None, progress: bool,
                     info: distributed.ProcessInfo,
                     affinity, costs) -> list[dict[str, Any]]:
  """:func:`run_sweep` on process ``info.process_id`` of several."""
  keys = [table.key(c) for c in configs]
  digest = zlib.crc32(json.dumps([table.key_fields, keys, batch_size])
                      .encode())
  digests = distributed.all_gather(np.asarray([digest], np.uint32))
  if len({int(d) for d in digests.ravel()}) != 1:
    raise distributed.DistributedError(
        f'{distributed.describe(info)}: the processes were given different '
        'configs or batch sizes; run the same command on every process')
  done = _done_keys(table)
  mask = distributed.all_gather(np.asarray([k in done for k in keys]))
  done_anywhere = mask.any(axis=0)
  pending = [dict(c) for c, d in zip(configs, done_anywhere) if not d]
  groups = _groups(pending, batch_size)
  owners = deal([i if affinity is None else affinity(g[0])
                 for i, g in enumerate(groups)], info.num_processes,
                None if costs is None else
                [sum(costs[table.key(c)] for c in g) for g in groups])
  mine = [g for g, o in zip(groups, owners) if o == info.process_id]
  own = ResultsTable(shard_path(table.path, info.process_id),
                     table.key_fields)
  label = (f'{desc} ' if desc else '') + (
      f'[process {info.process_id}/{info.num_processes}]')
  todo = sum(len(g) for g in mine)
  _compute_groups(mine, compute, own, total=todo, desc=label,
                  progress=progress)
  distributed.barrier('sweep_finished')
  if info.process_id == 0:
    merge_shards(table, configs)
    lost = [k for k, c in zip(keys, configs) if not table.is_done(c)]
    if lost:
      raise distributed.DistributedError(
          f'{distributed.describe(info)}: after every process finished, '
          f'{len(lost)} row(s) are in no file this process sees (first: '
          f'{dict(zip(table.key_fields, lost[0]))}); the output folder must '
          'be on a filesystem every process shares')
  distributed.barrier('sweep_merged')
  table.reload()
  return [table.get(c) for c in configs]


def _merge(group: list[dict[str, Any]], results: Any) -> list[dict[str, Any]]:
  """``{**config, **result}`` per config, after checking the results."""
  if isinstance(results, Mapping) or not isinstance(results, Sequence):
    raise FactStoreError(
        f'compute must return a list of dicts; got {type(results).__name__}')
  if len(results) != len(group):
    raise FactStoreError(
        f'compute returned {len(results)} result(s) for {len(group)} '
        'config(s)')
  rows = []
  for config, result in zip(group, results):
    if not isinstance(result, Mapping):
      raise FactStoreError(
          f'compute returned a {type(result).__name__}, not a dict, for '
          f'config {config}')
    for name, value in result.items():
      if name in config and format_value(value) != format_value(config[name]):
        raise FactStoreError(
            f'result for config {config} changes {name!r} to {value!r}')
    rows.append({**config, **result})
  return rows
