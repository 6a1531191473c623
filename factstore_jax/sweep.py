"""The sweep runner every experiment uses: resumable CSV result tables.

* :class:`ResultsTable` is a CSV of result rows; each append rewrites the
  file atomically, so a killed process never leaves a half-written table.
* :func:`run_sweep` computes the configs the table does not hold yet, in
  groups, appending each finished row at once, with a progress bar. Re-running
  a killed sweep skips what it finished.

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
import numbers
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

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
    text = {}
    for name, value in row.items():
      if not isinstance(name, str):
        raise FactStoreError(f'column names must be str; got {name!r}')
      text[name] = format_value(value)
    header = self._header + [c for c in text if c not in self._header]
    rows = self._rows + [text]
    self._write(header, rows)
    # Only after the file is written does the table change.
    self._header, self._rows = header, rows
    self._index[key] = len(rows) - 1

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
# Sweep runner.
# ---------------------------------------------------------------------------


def run_sweep(configs: Sequence[Mapping[str, Any]],
              compute: Callable[[list[dict[str, Any]]],
                                Sequence[Mapping[str, Any]]],
              table: ResultsTable, *, batch_size: int = 1,
              desc: str | None = None,
              progress: bool = True) -> list[dict[str, Any]]:
  """Computes the configs ``table`` lacks and appends each finished row.

  Pending configs (those ``table.is_done`` rejects) go to ``compute`` in
  consecutive groups of ``batch_size``; each result is merged with its
  config (``{**config, **result}``) and appended at once, one atomic write
  per row. If ``compute`` raises, the rows finished before stay on disk and
  the exception propagates; running again computes only the rest.

  Args:
    configs: dicts of scalars, each holding the table's key fields; no two
      with the same key.
    compute: ``group (list of config dicts) -> list of result dicts``, one
      per config, in order. A result may repeat a config value but not
      change it.
    table: where rows are read and appended.
    batch_size: configs per ``compute`` call (``>= 1``).
    desc: progress bar label.
    progress: show a ``tqdm`` bar over all configs (starting at the number
      already done).

  Returns:
    The table's rows (parsed) for ``configs``, in ``configs`` order.
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
  pending = [dict(c) for c in configs if not table.is_done(c)]
  bar = tqdm(total=len(configs), initial=len(configs) - len(pending),
             desc=desc, disable=not progress)
  with bar:
    for start in range(0, len(pending), batch_size):
      group = pending[start:start + batch_size]
      results = compute([dict(c) for c in group])
      rows = _merge(group, results)
      for row in rows:
        table.append(row)
        bar.update(1)
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
