"""The sweep runner every experiment uses: sharded batches, resumable CSV.

* :func:`map_batched` maps a one-item function over a stacked batch (fact
  sets x seeds), the batch axis sharded over all devices with
  ``jax.sharding``; results equal the unsharded ``jax.vmap``.
* :class:`ResultsTable` is a CSV of result rows; each append rewrites the
  file atomically, so a killed process never leaves a half-written table.
* :func:`run_sweep` computes the configs the table does not hold yet, in
  groups, appending each finished row at once, with a progress bar. Re-running
  a killed sweep skips what it finished.

Typical use::

  table = ResultsTable('results.csv', key_fields=('n', 'seed'))
  def compute(group):
    batch = stack_inputs(group)             # leaves (len(group), ...)
    out = map_batched(one_run, batch)       # dict of (len(group), ...) arrays
    return [{'acc': float(a)} for a in out['acc']]
  rows = run_sweep(configs, compute, table, batch_size=8)
"""

from __future__ import annotations

import csv
import functools
import numbers
import os
from typing import Any, Callable, Hashable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from factstore_jax.atomic import atomic_output
from factstore_jax.errors import FactStoreError

BATCH_AXIS = 'batch'


# ---------------------------------------------------------------------------
# Sharded batched map.
# ---------------------------------------------------------------------------


def batch_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with the single axis ``'batch'`` over ``devices``.

  Args:
    devices: the devices to use; all of ``jax.devices()`` when ``None``.
  """
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise FactStoreError('batch_mesh: no devices given')
  return Mesh(np.asarray(devices, dtype=object), (BATCH_AXIS,))


def local_mesh() -> Mesh:
  """:func:`batch_mesh` over this process's devices.

  What :func:`shard_rows` (and so ``construct``'s bucket solves and the
  decodability solver) split over by default. On CPU, XLA runs each small
  matrix product or LAPACK call on one core; to use every core, expose them
  as devices before JAX starts (:func:`factstore_jax.threads.expose_cpu_cores`,
  or ``XLA_FLAGS=--xla_force_host_platform_device_count=$(nproc)``; the
  ``factstore`` CLI does this itself).
  """
  return batch_mesh(jax.local_devices())


@functools.lru_cache(maxsize=128)
def _compiled(fn: Callable[..., Any], mesh: Mesh,
              static: tuple[tuple[str, Hashable], ...],
              chunk_size: int | None = None) -> Callable[..., Any]:
  """``jit(vmap(fn))`` with outputs sharded on ``'batch'``; one per key.

  With ``chunk_size``: each device maps over its items ``chunk_size`` at a
  time (``lax.map``), in ``jit(shard_map(...))``.
  """
  one = functools.partial(fn, **dict(static)) if static else fn
  if chunk_size is None:
    out_sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    return jax.jit(jax.vmap(one), out_shardings=out_sharding)
  rows = PartitionSpec(BATCH_AXIS)
  return jax.jit(jax.shard_map(
      lambda items: jax.lax.map(one, items, batch_size=chunk_size),
      mesh=mesh, in_specs=rows, out_specs=rows, check_vma=False))


def _batch_size(inputs: Any) -> int:
  """The common leading size ``B`` of every leaf of ``inputs``."""
  leaves = jax.tree.leaves(inputs)
  if not leaves:
    raise FactStoreError('map_batched: inputs have no array leaves')
  sizes = set()
  for leaf in leaves:
    shape = np.shape(leaf)
    if not shape:
      raise FactStoreError(
          'map_batched: every input leaf needs a leading batch axis; got a '
          'scalar leaf')
    sizes.add(shape[0])
  if len(sizes) != 1:
    raise FactStoreError(
        f'map_batched: input leaves disagree on the batch size: '
        f'{sorted(sizes)}')
  size = sizes.pop()
  if size == 0:
    raise FactStoreError('map_batched: empty batch (B = 0)')
  return size


def _pad_batch(inputs: Any, size: int, multiple: int) -> tuple[int, Any]:
  """``inputs`` padded along the batch axis to a multiple of ``multiple``.

  Repeats the last item (index ``size - 1`` fills every padding slot).
  Returns ``(padded_size, padded_inputs)``.
  """
  padded = -(-size // multiple) * multiple
  if padded != size:
    index = np.minimum(np.arange(padded), size - 1)
    inputs = jax.tree.map(lambda x: x[index], inputs)
  return padded, inputs


def check_chunk_size(chunk_size: Any, what: str) -> None:
  """Raises ``FactStoreError`` unless ``chunk_size`` is None or an int >= 1."""
  if chunk_size is not None and (
      isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
      or chunk_size < 1):
    raise FactStoreError(
        f'{what} must be None or an int >= 1, got {chunk_size!r}')


def map_batched(fn: Callable[..., Any], inputs: Any, *,
                mesh: Mesh | None = None,
                static_kwargs: Mapping[str, Hashable] | None = None,
                to_host: bool = True, chunk_size: int | None = None) -> Any:
  """``jax.vmap(fn)(inputs)``, the batch axis sharded over the mesh devices.

  The batch is padded up to a multiple of the device count by repeating its
  last item; the padding is cut off the outputs. Each device runs
  ``B_padded / num_devices`` items of one jitted ``vmap(fn)``, or, with
  ``chunk_size``, maps over them ``chunk_size`` at a time (``lax.map``; each
  item's loops then stop on their own). On a CPU, where one item already
  keeps the cores busy, that can be faster: 32 small GD trainings took
  15.8 s with ``chunk_size=1`` against 26.8 s vmapped on the 2-core
  development CPU (``benchmarks/sweep.py``).

  Compiled functions are cached on ``(fn, mesh, static_kwargs)``, and
  ``jax.jit`` caches on shapes below that: pass the same function object
  each call (a module-level function, not a fresh ``lambda`` or
  ``functools.partial``) and put configuration into ``static_kwargs``.

  Args:
    fn: maps ONE item (a pytree like ``inputs`` without the batch axis) to a
      pytree of arrays; called as ``fn(item, **static_kwargs)``.
    inputs: pytree whose leaves (numpy or jax arrays, PRNG key arrays
      included) share a leading batch axis ``B >= 1``.
    mesh: a mesh with a ``'batch'`` axis; :func:`batch_mesh` when ``None``.
    static_kwargs: hashable keyword arguments passed to ``fn`` unbatched
      (sizes, option strings); part of the cache key.
    to_host: return numpy arrays (default). With ``False`` return the
      ``jax.Array`` s: sharded over ``'batch'`` when ``B`` is a multiple of
      the device count; otherwise the padding is sliced off, and JAX may
      replicate the slice.
    chunk_size: ``None`` (one ``vmap`` per device) or an int ``>= 1``: items
      per step of a sequential map on each device.

  Returns:
    ``fn``'s output pytree, each leaf with leading axis ``B``. It equals the
    unsharded ``jax.jit(jax.vmap(fn))(inputs)`` up to float rounding: each
    device runs ``vmap`` over its local batch, and XLA may order a reduction
    differently for a different batch size (seen on CPU: 1 ulp). With one
    device it is the same program, bit for bit.
  """
  mesh = batch_mesh() if mesh is None else mesh
  if BATCH_AXIS not in mesh.axis_names:
    raise FactStoreError(
        f"map_batched: mesh has axes {mesh.axis_names}, needs a 'batch' axis")
  check_chunk_size(chunk_size, 'map_batched: chunk_size')
  static = tuple(sorted((static_kwargs or {}).items()))
  try:
    compiled = _compiled(fn, mesh, static, chunk_size)
  except TypeError as e:  # an unhashable static value
    raise FactStoreError(
        f'map_batched: static_kwargs must be hashable: {e}') from None
  size = _batch_size(inputs)
  padded, inputs = _pad_batch(inputs, size, mesh.shape[BATCH_AXIS])
  inputs = jax.device_put(inputs,
                          NamedSharding(mesh, PartitionSpec(BATCH_AXIS)))
  outputs = compiled(inputs)
  if to_host:
    return jax.tree.map(lambda x: np.asarray(x)[:size], outputs)
  if padded == size:
    return outputs
  return jax.tree.map(lambda x: x[:size], outputs)


@functools.lru_cache(maxsize=128)
def _row_sharded(fn: Callable[..., Any], mesh: Mesh, num_shared: int,
                 num_rows: int, static: tuple[tuple[str, Hashable], ...]):
  """``jit(shard_map(fn))``: shared inputs replicated, row inputs split."""
  one = functools.partial(fn, **dict(static)) if static else fn
  whole, rows = PartitionSpec(), PartitionSpec(BATCH_AXIS)
  return jax.jit(jax.shard_map(
      lambda *args: one(*args), mesh=mesh,
      in_specs=(whole,) * num_shared + (rows,) * num_rows, out_specs=rows,
      # No collectives; loops in ``fn`` mix per-device and replicated carries.
      check_vma=False))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """``tree`` copied to every device of ``mesh`` (a no-op if it already is)."""
  whole = NamedSharding(mesh, PartitionSpec())
  if all(d.platform == 'cpu' for d in mesh.devices.flat):
    # CPU devices share the host memory: placing a host view costs nothing
    # (measured: 0.3 ms against 58 ms device to device for 72 MB).
    def host_view(x):
      if (isinstance(x, jax.Array) and isinstance(x.dtype, np.dtype)
          and x.sharding != whole):
        return np.asarray(x)
      return x
    tree = jax.tree.map(host_view, tree)
  return jax.device_put(tree, whole)


def shard_rows(fn: Callable[..., Any], shared: Sequence[Any],
               rows: Sequence[Any], *, mesh: Mesh | None = None,
               static_kwargs: Mapping[str, Hashable] | None = None,
               row_multiple: int = 1) -> Any:
  """``fn(*shared, *rows, **static_kwargs)``, the rows split over devices.

  For a jitted ``fn`` whose outputs are per-row (leading axis ``S`` of the
  ``rows`` arrays) and whose rows are independent: the ``shared`` inputs are
  copied to every device of ``mesh`` (:func:`replicate`), the rows padded
  (repeating the last row) to a multiple of ``row_multiple x devices`` and
  split into one contiguous block per device, and the outputs gathered on
  the mesh's first device with the padding cut off. With one device it is
  just ``fn(...)``. Host-level (not jittable). On CPU, XLA runs a small
  matrix product or LAPACK call on one core; exposing the cores as devices
  (``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before JAX starts)
  lets this run one block per core.

  Args:
    fn: a jitted function; called as ``fn(*shared, *rows, **static_kwargs)``.
    shared: inputs every row needs (pytrees).
    rows: arrays (or pytrees of arrays) with a common leading axis ``S``.
    mesh: a mesh with a ``'batch'`` axis; :func:`local_mesh` when ``None``.
    static_kwargs: hashable keyword arguments (cache key, as in
      :func:`map_batched`).
    row_multiple: each device's block is a multiple of this (e.g. ``fn``'s
      ``lax.map`` batch size, so every row is batched with the same
      neighbours as in one call).

  Returns:
    ``fn``'s outputs, each with leading axis ``S``, on one device. Each row
    is computed by the same program as in one call; XLA may still round a
    batched reduction differently for another batch size.
  """
  mesh = local_mesh() if mesh is None else mesh
  static = dict(static_kwargs or {})
  if mesh.size == 1:
    return fn(*shared, *rows, **static)
  size = _batch_size(tuple(rows))
  _, rows = _pad_batch(tuple(rows), size, mesh.size * row_multiple)
  split = jax.device_put(rows, NamedSharding(mesh, PartitionSpec(BATCH_AXIS)))
  compiled = _row_sharded(fn, mesh, len(shared), len(rows),
                          tuple(sorted(static.items())))
  out = compiled(*replicate(tuple(shared), mesh), *split)
  first = mesh.devices.flat[0]
  return jax.tree.map(lambda x: jax.device_put(x, first)[:size], out)


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
