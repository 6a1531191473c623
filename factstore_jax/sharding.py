"""Splitting batched work over devices with ``jax.sharding``.

* :func:`map_batched` maps a one-item function over a stacked batch (fact
  sets x seeds), the batch axis sharded over this process's devices (all of
  them with one process); results equal the unsharded ``jax.vmap``.
* :func:`shard_rows` runs a jitted function whose outputs are per row (the
  bucket solves, the decodability solver) with its rows split over this
  process's devices and its shared inputs replicated.
* :func:`batch_mesh` / :func:`local_mesh` build the 1-D ``'batch'`` meshes
  both use.

On CPU, expose the cores as devices first
(:func:`factstore_jax.threads.expose_cpu_cores`) so that each core takes a
share.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Hashable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from factstore_jax.errors import FactStoreError

BATCH_AXIS = 'batch'


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
    mesh: a mesh with a ``'batch'`` axis; :func:`local_mesh` (this
      process's devices: all devices with one process) when ``None``. Under
      ``jax.distributed`` each process then maps its own batch, as the
      sweep runner's processes do; a mesh over every process's devices
      (``batch_mesh()``) needs every process to make the same call.
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
  mesh = local_mesh() if mesh is None else mesh
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
