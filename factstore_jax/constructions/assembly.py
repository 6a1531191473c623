"""Gadgets to gated-MLP weights: bucket solves, streamed builds, assembly.

The dense encoder is assembled from the compact :class:`Gadgets` (buckets,
per-bucket maps ``M_j``, step ramps); see docs/design.md, "The closed-form
encoder-decoder".
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from factstore_jax import sharding
from factstore_jax.constructions import gadgets
from factstore_jax.precision import full_precision
from factstore_jax.mlp import EncoderDecoder

Array = jax.Array


def assemble(direction: Array, maps: Array, scale: Array, bias: Array,
             sign: Array, decoder: Array, activation: str) -> EncoderDecoder:
  """Gated-MLP weights from gadgets. ``maps (n, m, d)``, ``scale/bias (n, k)``.

  Hidden neurons are ordered ``(cut, code coordinate, step neuron)``,
  ``h = n * m * k``; the up-weights of cut ``j`` are the telescoped
  differences ``M_j - M_{j-1}`` (:func:`gadgets.telescope`).
  """
  n, m, _ = maps.shape
  return _assemble_steps(direction, gadgets.telescope(maps), scale, bias,
                         sign, decoder, jnp.repeat(jnp.arange(n), m),
                         jnp.tile(jnp.arange(m), n), activation)


def _assemble_steps(direction, tele, scale, bias, sign, decoder, cut, coord,
                    activation: str) -> EncoderDecoder:
  """The weights of the steps ``(cut (h',), coord (h',))`` of telescoped
  maps ``tele (n, m, d)``, in that order: step ``(j, r)`` has the ``k``
  gate columns ``direction * scale[j]``, biases ``bias[j]``, up-weights
  ``tele[j, r] * sign`` and routes to coordinate ``r``."""
  d, m, k = tele.shape[2], tele.shape[1], sign.shape[0]
  h = cut.shape[0] * k
  w_gate = direction[:, None, None] * scale[cut][None]            # (d, h', k)
  w_up = jnp.transpose(tele[cut, coord], (1, 0))[..., None] * sign
  routing = jnp.broadcast_to(jnp.eye(m, dtype=tele.dtype)[coord][:, None],
                             (cut.shape[0], k, m))
  return EncoderDecoder(w_gate=w_gate.reshape(d, h),
                        b_gate=bias[cut].reshape(h), w_up=w_up.reshape(d, h),
                        routing=routing.reshape(h, m), decoder=decoder,
                        activation=activation, window=k)


class Gadgets(NamedTuple):
  """The compact description the dense weights are assembled from."""
  buckets: gadgets.Buckets
  maps: Array    # (n, m, d) per-bucket exact maps M_j
  scale: Array   # (n, k) gate scale of each step neuron
  bias: Array    # (n, k) gate bias of each step neuron
  sign: Array    # (k,) sign of each step neuron


@full_precision
def build_gadgets(key: Array, keys: Array, targets: Array, *, bucket_size: int,
                  activation: str = 'clipped', slack: float = 0.25,
                  fill: float = gadgets.DEFAULT_FILL) -> Gadgets:
  """Buckets, steps and exact maps with ``E(k_i) = targets_i``.

  ``keys (N, d)``, ``targets (N, m)``. Pure; static ``N, d, m, b, fill``.
  """
  buckets = gadgets.make_buckets(key, keys, bucket_size, fill=fill,
                                 slack=slack)
  maps = gadgets.solve_buckets(keys, targets, buckets)
  scale, bias, sign = gadgets.step_gate_params(buckets, activation)
  dtype = keys.dtype
  return Gadgets(buckets, maps, scale.astype(dtype), bias.astype(dtype),
                 sign.astype(dtype))


@functools.partial(jax.jit, static_argnames=('bucket_size', 'fill', 'slack'))
def _make_buckets_jit(key, keys, *, bucket_size, fill, slack):
  return gadgets.make_buckets(key, keys, bucket_size, fill=fill, slack=slack)


_solve_chunk_jit = jax.jit(gadgets.solve_indexed)


@full_precision
def build_gadgets_streamed(key: Array, keys: Array, targets: Array, *,
                           bucket_size: int, activation: str = 'clipped',
                           slack: float = 0.25,
                           fill: float = gadgets.DEFAULT_FILL,
                           stream_size: int = 1024,
                           progress=None,
                           mesh: jax.sharding.Mesh | None = None) -> Gadgets:
  """:func:`build_gadgets` with the bucket solves in a host loop.

  ``stream_size`` buckets are solved per call (the last call padded to the
  same shape, so one program serves all), so the gathered keys take
  ``O(stream_size b d)`` memory instead of ``O(n b d)``; each call splits
  its buckets over the devices of ``mesh`` (:func:`sharding.shard_rows`,
  default :func:`sharding.local_mesh`). The maps equal :func:`build_gadgets`'s
  (each bucket's solve is the same program). ``progress(done, total)`` runs
  after each call. Call it inside
  :func:`~factstore_jax.threads.single_threaded_blas` on CPU.
  """
  buckets = _make_buckets_jit(key, keys, bucket_size=bucket_size, fill=fill,
                              slack=slack)
  n = buckets.index.shape[0]
  mesh = sharding.local_mesh() if mesh is None else mesh
  if mesh.size > 1:
    keys, targets = sharding.replicate((keys, targets), mesh)
  solve = lambda index, valid: sharding.shard_rows(
      _solve_chunk_jit, (keys, targets), (index, valid), mesh=mesh)
  if stream_size >= n:
    # Blocked here: the caller's single_threaded_blas must still hold while
    # the LAPACK calls run (asynchronously dispatched, they ran after it
    # ended, on a multi-threaded OpenBLAS whose results vary run to run).
    maps = jax.block_until_ready(solve(buckets.index, buckets.valid))
    if progress is not None:
      progress(n, n)
  else:
    pieces = []
    for start in range(0, n, stream_size):
      stop = min(start + stream_size, n)
      # Pad the last call by repeating its own buckets (dropped below).
      rows = np.arange(start, start + stream_size)
      rows = np.where(rows < stop, rows, start + (rows - stop) % (stop - start))
      part = solve(buckets.index[rows], buckets.valid[rows])
      pieces.append(jax.block_until_ready(part)[:stop - start])
      if progress is not None:
        progress(stop, n)
    maps = jnp.concatenate(pieces)
  scale, bias, sign = _gate_params_jit(buckets, activation)
  dtype = keys.dtype
  return Gadgets(buckets, maps, scale.astype(dtype), bias.astype(dtype),
                 sign.astype(dtype))


_gate_params_jit = jax.jit(gadgets.step_gate_params,
                           static_argnames=('activation',))


@full_precision
def assemble_gadgets(parts: Gadgets, decoder: Array,
                     activation: str) -> EncoderDecoder:
  """The encoder-decoder MLP of built gadgets and a ``decoder (d, m)``."""
  return assemble(parts.buckets.direction, parts.maps, parts.scale, parts.bias,
                  parts.sign, decoder, activation)


@full_precision
def build_encoder(key: Array, keys: Array, targets: Array, decoder: Array, *,
                  bucket_size: int, activation: str = 'clipped',
                  slack: float = 0.25, fill: float = gadgets.DEFAULT_FILL):
  """Encoder-decoder with ``E(k_i) = targets_i``. Returns ``(model, Gadgets)``."""
  parts = build_gadgets(key, keys, targets, bucket_size=bucket_size,
                        activation=activation, slack=slack, fill=fill)
  return assemble_gadgets(parts, decoder, activation), parts


def prune_dead(model: EncoderDecoder) -> EncoderDecoder:
  """Drops the steps whose up-weights are exactly zero (host-level).

  Such neurons contribute an exact 0 to every output, so the function is
  unchanged; a step's ``window`` neurons are kept or dropped together.
  """
  w_up = np.asarray(model.w_up)
  k = model.window
  live = np.any(w_up != 0, axis=0).reshape(-1, k).any(axis=1)
  if live.all():
    return model
  cols = jnp.asarray(np.flatnonzero(np.repeat(live, k)))
  return model.replace(w_gate=model.w_gate[:, cols], b_gate=model.b_gate[cols],
                       w_up=model.w_up[:, cols], routing=model.routing[cols])


assemble_jit = jax.jit(assemble_gadgets, static_argnames=('activation',))


@jax.jit
def _live_steps(maps: Array, sign: Array) -> tuple[Array, Array]:
  """The telescoped maps ``(n, m, d)`` and ``(n, m)`` bool: the steps
  (cut, code coordinate) with a nonzero up-weight in any of their ``k``
  neurons (:func:`prune_dead`'s test, without the ``(d, n m k)`` weights)."""
  tele = gadgets.telescope(maps)
  live = jnp.any(tele[..., None] * sign != 0, axis=(2, 3))
  return tele, live


_assemble_steps_jit = jax.jit(_assemble_steps, static_argnames=('activation',))


def assemble_live(parts: Gadgets, decoder: Array,
                  activation: str) -> EncoderDecoder:
  """``prune_dead(assemble_gadgets(parts, decoder, activation))``, bitwise,
  without building the dead neurons (host-level).

  The dense layer of :func:`assemble` has ``n m k`` neurons; with patched
  code coordinates most are dead (at 2^22 facts, 8,632 cuts x 117
  coordinates: 8 GiB of weights before pruning against ~1 GiB after). Only
  the live steps go through :func:`assemble`'s step builder, so the result
  equals the pruned assembly bitwise.
  """
  tele, live = _live_steps(parts.maps, parts.sign)
  cut, coord = np.nonzero(np.asarray(live))   # row-major: assemble's order
  return _assemble_steps_jit(parts.buckets.direction, tele, parts.scale,
                             parts.bias, parts.sign, decoder,
                             jnp.asarray(cut, jnp.int32),
                             jnp.asarray(coord, jnp.int32),
                             activation=activation)


def max_map_norm(maps: Array, chunk: int = 256) -> float:
  """``max_j ||M_j||_2`` of bucket maps ``(n, m, d)`` (largest singular
  value), in float64, ``chunk`` maps at a time (a float64 copy of all the
  maps would be twice their size: 4 GiB at 2^22 facts)."""
  maps = np.asarray(maps)
  return max((float(np.max(np.linalg.norm(
      maps[i:i + chunk].astype(np.float64), ord=2, axis=(1, 2))))
              for i in range(0, maps.shape[0], chunk)), default=0.0)
