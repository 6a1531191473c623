"""The closed-form encoder-decoder construction (docs/design.md).

``g(x) = D E(x)``: a gated-MLP encoder ``E: R^d -> R^m`` that maps each key
exactly to the code ``c_f(i)`` of its value (telescoped steps, see
:mod:`gadgets`) and a linear decoder ``D (d, m)``. The code of value ``j`` is its separator computed on the
projected table ``V D``, so every margin is at least
``rho(V D) * ||(V D)_f(i) - (V D)_j|| > 0``.

Two entry points:

* :func:`construct` — host-level: validates, grows ``m`` until every used
  projected value is decodable, builds, verifies every fact, repairs failing
  buckets in float64, and raises rather than return a wrong MLP.
* :func:`construct_fixed` — the pure, fixed-shape core (``jit``/``vmap``);
  :func:`construct_batched` runs it over a stacked :class:`FactSet`.

Parameter count: the entries of every array of the MLP as built. The
factorised encoder-decoder holds ``w_gate, b_gate, w_up (encoder)``,
``routing (h, m)`` and ``decoder (d, m)``; folded into a standard gated MLP
(``w_down = routing @ decoder.T``) it holds ``w_gate, b_gate, w_up, w_down``.
With ``n`` buckets and code dim ``m`` the clipped gate has ``h = n m`` hidden
neurons (fewer after :func:`prune_dead` drops those whose up-weights are
exactly zero): ``h (2d + 1 + m) + d m`` factorised, ``h (3d + 1)`` folded.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from factstore_jax.decodability import decodability, used_values
from factstore_jax import storage
from factstore_jax import sharding
from factstore_jax.constructions import certificate, decoders, gadgets
from factstore_jax.errors import (ConstructionError, FactStoreError,
                                  InfeasibleFactSetError)
from factstore_jax.factsets import FactSet, validate_factset
from factstore_jax.precision import full_precision
from factstore_jax.threads import single_threaded_blas
from factstore_jax.mlp import (EncoderDecoder, GatedMLP, GatedMLPModule,
                               get_activation, num_params)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ConstructionConfig:
  """Static settings of the construction.

  Attributes:
    code_dim: code dimension ``m``; ``None`` searches ``min_code_dim, 2x, ...``
      until every used projected value has ``rho >= min_rho`` (``m >= d``
      means the identity decoder).
    bucket_size: max keys per bucket ``b <= d``; ``None`` means ``d``.
    fill: nominal bucket size as a fraction of ``bucket_size``, in
      ``(0, 1]``; the rest is room to move each cut to the widest gap nearby.
      Larger buckets need fewer neurons per fact but larger maps ``M_j``
      (a larger Lipschitz constant, see ``ConstructionReport.max_map_norm``).
    activation: ``'clipped'`` (exact steps) or ``'relu'``.
    min_code_dim: first ``m`` of the search.
    min_rho: decodability floor of projected values for the search.
    patch: with a fixed ``code_dim < d``, the largest fraction of the used
      values that may be undecodable after projection and are then
      *patched*: each gets an extra decoder column (its separator in the
      full space) and a code that is 1 on that column and 0 elsewhere, so
      only the buckets holding its keys get neurons for it. ``0`` disables
      patching (a fixed code dim then fails on any undecodable used value).
    slack: fraction of each gap left flat on both sides of a ramp.
    tol: certificate gap of the decodability solver.
    max_retries: rebuilds (new direction, half the bucket size) after a
      failed certificate that float64 refits could not mend.
    verify: ``'certificate'`` (default): the structured margin certificate
      (:mod:`~factstore_jax.constructions.certificate`, ``O(N m d + P^2
      m)``), falling back to the dense check when it cannot certify every
      fact; ``'dense'``: evaluate every key against every neuron and value
      (``O(N (h + P) d)``). The relu gate always uses the dense check.
  """
  code_dim: int | None = None
  bucket_size: int | None = None
  fill: float = gadgets.DEFAULT_FILL
  activation: str = 'clipped'
  min_code_dim: int = 16
  min_rho: float = 0.02
  patch: float = 0.01
  slack: float = 0.25
  tol: float = 1e-3
  max_retries: int = 2
  verify: str = 'certificate'


class ConstructionReport(NamedTuple):
  num_facts: int
  num_values: int
  dim: int
  code_dim: int
  bucket_size: int
  num_buckets: int
  hidden_dim: int
  num_params: int              # factorised encoder-decoder, as built
  num_params_gated_mlp: int    # folded into a standard gated MLP
  params_per_fact: float
  bits_per_param: float
  accuracy: float
  min_margin: float            # certified lower bound (see `check`)
  min_normalized_margin: float
  code_error: float            # max_i ||E(k_i) - c_f(i)||_inf (a bound
                               # when check == 'certificate')
  rho_projected: float         # min rho of used values of V D
  min_gap: float               # smallest cut gap of the projections
  repaired_buckets: int
  retries: int
  seconds: float
  fill: float = gadgets.DEFAULT_FILL
  max_map_norm: float = float('nan')  # max_j ||M_j||_2 of the bucket maps
  patched_values: int = 0             # decoder columns added for stragglers
  split_buckets: int = 0              # ill-conditioned buckets split in two
  check: str = 'dense'                # which check certified the margins
  float32_bound: str = ''             # certificate: 'worst-case'/'sampled'

  def as_dict(self) -> dict:
    return {k: (v.item() if hasattr(v, 'item') else v)
            for k, v in self._asdict().items()}


class Construction(NamedTuple):
  model: EncoderDecoder
  report: ConstructionReport
  codes: Array        # (P, m) codes of all values
  rho: Array          # (P,) decodability of the projected values
  # Per-bucket structure for bucket-local edits (constructions/editing.py);
  # None where the builder kept none.
  structure: BucketStructure | None = None

  @property
  def mlp(self) -> GatedMLP:
    """The constructed function as a standard gated MLP params pytree."""
    return self.model.as_mlp()

  def module(self) -> GatedMLPModule:
    """The constructed MLP as a Flax NNX module."""
    return GatedMLPModule(self.mlp)


# --------------------------------------------------------------------------
# Pure fixed-shape core.


def assemble(direction: Array, maps: Array, scale: Array, bias: Array,
             sign: Array, decoder: Array, activation: str) -> EncoderDecoder:
  """Gated-MLP weights from gadgets. ``maps (n, m, d)``, ``scale/bias (n, k)``.

  Hidden neurons are ordered ``(cut, code coordinate, step neuron)``,
  ``h = n * m * k``; the up-weights of cut ``j`` are the telescoped
  differences ``M_j - M_{j-1}`` (:func:`gadgets.telescope`).
  """
  n, m, d = maps.shape
  k = scale.shape[1]
  h = n * m * k
  w_gate = jnp.broadcast_to(direction[:, None, None, None] *
                            scale[None, :, None, :], (d, n, m, k))
  b_gate = jnp.broadcast_to(bias[:, None, :], (n, m, k))
  w_up = jnp.transpose(gadgets.telescope(maps), (2, 0, 1))[..., None] * sign
  routing = jnp.broadcast_to(
      jnp.eye(m, dtype=maps.dtype)[None, :, None, :], (n, m, k, m))
  return EncoderDecoder(w_gate=w_gate.reshape(d, h), b_gate=b_gate.reshape(h),
                        w_up=w_up.reshape(d, h), routing=routing.reshape(h, m),
                        decoder=decoder, activation=activation, window=k)


class Gadgets(NamedTuple):
  """The compact description the dense weights are assembled from."""
  buckets: gadgets.Buckets
  maps: Array    # (n, m, d) per-bucket exact maps M_j
  scale: Array   # (n, k) gate scale of each step neuron
  bias: Array    # (n, k) gate bias of each step neuron
  sign: Array    # (k,) sign of each step neuron


@flax.struct.dataclass
class BucketStructure:
  """Per-bucket state of a construction, kept for bucket-local edits
  (:mod:`factstore_jax.constructions.editing`).

  ``gadgets`` holds the buckets (keys of each bucket, projection direction,
  step ramps), the exact maps and the gate parameters the dense weights
  are assembled from (``model == prune_dead(assemble_gadgets(gadgets,
  decoder))``);
  ``min_margin (n,)`` / ``min_normalized_margin (n,)`` are the smallest
  margins of each bucket's facts (``+inf`` for an empty bucket), so the
  global minimum is known without re-verifying every fact.
  """
  gadgets: Gadgets
  min_margin: Array             # (n,)
  min_normalized_margin: Array  # (n,)
  slack: float = flax.struct.field(pytree_node=False, default=0.25)
  tol: float = flax.struct.field(pytree_node=False, default=1e-3)
  fill: float = flax.struct.field(pytree_node=False,
                                  default=gadgets.DEFAULT_FILL)


def bucket_structure(parts: Gadgets, check_report: storage.StorageReport,
                     num_keys: int, slack: float, tol: float,
                     fill: float = gadgets.DEFAULT_FILL) -> BucketStructure:
  """:class:`BucketStructure` of verified gadgets (margins ``(N,)`` per key)."""
  owner = bucket_of_key(parts.buckets, num_keys)
  n = parts.maps.shape[0]
  seg_min = lambda x: jax.ops.segment_min(x, owner, num_segments=n)
  return BucketStructure(parts, seg_min(check_report.margins),
                         seg_min(check_report.normalized_margins),
                         slack=slack, tol=tol, fill=fill)


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
    maps = solve(buckets.index, buckets.valid)
    if progress is not None:
      jax.block_until_ready(maps)
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


@functools.partial(jax.jit, static_argnames=('code_dim', 'bucket_size',
                                             'activation', 'slack', 'tol',
                                             'fill'))
@full_precision
def construct_fixed(key: Array, factset: FactSet, *, code_dim: int,
                    bucket_size: int, activation: str = 'clipped',
                    slack: float = 0.25, tol: float = 1e-3,
                    fill: float = gadgets.DEFAULT_FILL):
  """Fixed-shape construction for one fact set (jit- and vmap-able).

  Args:
    key: PRNG key (decoder and bucket direction).
    factset: keys ``(N, d)``, values ``(P, d)``, mapping ``(N,)``.
    code_dim: ``m``; ``m >= d`` uses the identity decoder (``m = d``).

  Returns:
    ``(model, codes (P, m), rho (P,), Gadgets)``. Nothing is verified here:
    use :func:`verify` (or :func:`construct` / :func:`construct_batched`,
    which do).
  """
  keys, values, mapping = factset
  dim = keys.shape[1]
  _, k_dir = jax.random.split(key)
  decoder = construction_decoder(key, dim, code_dim, keys.dtype)
  codes, rho = value_codes(values, decoder, tol=tol)
  model, parts = build_encoder(k_dir, keys, codes[mapping], decoder,
                               bucket_size=bucket_size, activation=activation,
                               slack=slack, fill=fill)
  return model, codes, rho, parts


class Verification(NamedTuple):
  storage: storage.StorageReport
  code_error: Array   # () max abs code error


@jax.jit
@full_precision
def verify(model: EncoderDecoder, factset: FactSet, codes: Array,
           chunk_size: int = 2048) -> Verification:
  """Checks every fact: margins against all values, and the code error."""
  keys, values, mapping = factset
  def one(args):
    k, f = args
    code = model.encode(k)
    out = code @ model.decoder.T
    gamma = storage.margins(out[None], values, f[None])[0]
    return gamma, jnp.linalg.norm(out), jnp.max(jnp.abs(code - codes[f]))
  gamma, norms, err = jax.lax.map(one, (keys, mapping), batch_size=chunk_size)
  return Verification(storage._report(gamma, norms), jnp.max(err))


def bucket_of_key(buckets: gadgets.Buckets, num_keys: int) -> Array:
  """``(N,)`` index of the bucket holding each key."""
  owner = jnp.zeros(num_keys, jnp.int32)
  rows = jnp.broadcast_to(
      jnp.arange(buckets.index.shape[0], dtype=jnp.int32)[:, None],
      buckets.index.shape)
  index = jnp.where(buckets.valid, buckets.index, num_keys)  # drop padding
  return owner.at[index].set(rows, mode='drop')


@functools.partial(jax.jit, static_argnames=('chunk_size',))
@full_precision
def verify_structured(parts: Gadgets, model: EncoderDecoder, factset: FactSet,
                      codes: Array, chunk_size: int = 2048):
  """Check of a clipped-gate construction: steps, codes and margins.

  Every step's pre-activation is computed from the same gate column the
  dense MLP holds (the dense ``w_gate`` repeats each one ``m`` times), so
  the check sees the steps the dense MLP computes: for a key of bucket
  ``j`` the steps of cuts ``0..j`` must be exactly 1 and all later ones
  exactly 0. The code is the dense model's (``model.encode``), checked
  against the value codes, and the output's margins against the whole
  value table. Returns ``(Verification, steps_ok (N,), gate_slack)`` where
  ``gate_slack`` is the smallest distance of a step pre-activation from the
  open ramp ``(0, 1)`` (rounding below it cannot change any step).
  """
  keys, values, mapping = factset
  owner = bucket_of_key(parts.buckets, keys.shape[0])
  gamma, norms, err, ok, slack = _structured_terms(
      parts, model, values, codes, keys, mapping, owner,
      chunk_size=chunk_size)
  return (Verification(storage._report(gamma, norms), jnp.max(err)), ok,
          jnp.min(slack))


def step_values(parts: Gadgets, x: Array, activation: str):
  """Steps of every cut for keys ``x (..., d)``: ``(steps (..., n), z (..., n))``.

  ``z`` is each cut's (unshifted) gate pre-activation, computed from the
  dense gate columns ``direction * scale``.
  """
  act = get_activation(activation)
  n, k = parts.scale.shape
  w_win = (parts.buckets.direction[:, None, None] * parts.scale[None])
  z = (x @ w_win.reshape(-1, n * k) + parts.bias.reshape(-1))
  z = z.reshape(*x.shape[:-1], n, k)
  return act(z) @ parts.sign, z[..., 0]


def _structured_terms(parts: Gadgets, model: EncoderDecoder, values: Array,
                      codes: Array, keys: Array, mapping: Array, owner: Array,
                      *, chunk_size: int):
  """Per-key terms of :func:`verify_structured` for keys ``(S, d)``:
  ``gamma, norm, code error, steps_ok, gate slack``, each ``(S,)``."""
  n = parts.scale.shape[0]
  cut = jnp.arange(n)

  def one(args):
    x, f, j = args
    steps, z = step_values(parts, x, model.activation)
    ok = jnp.all(steps == (cut <= j).astype(steps.dtype))
    slack = jnp.min(jnp.where(cut == 0, jnp.inf, jnp.maximum(-z, z - 1)))
    code = model.encode(x)
    out = model.decoder @ code
    gamma = storage.margins(out[None], values, f[None])[0]
    gamma = jnp.where(ok, gamma, -jnp.inf)
    err = jnp.max(jnp.abs(code - codes[f]))
    return gamma, jnp.linalg.norm(out), err, ok, slack

  return jax.lax.map(one, (keys, mapping, owner), batch_size=chunk_size)


_structured_terms_jit = jax.jit(_structured_terms,
                                static_argnames=('chunk_size',))


@full_precision
def verify_structured_streamed(parts: Gadgets, model: EncoderDecoder,
                               factset: FactSet, codes: Array,
                               chunk_size: int = 2048,
                               stream_size: int = 65536, progress=None):
  """:func:`verify_structured` as a host loop over ``stream_size`` keys.

  Same result (every key is batched with the same ``chunk_size``
  neighbours as in one call); peak memory ``O(chunk_size (P + h))`` plus
  the ``(N,)`` outputs. ``progress(done, total)`` runs after each call.
  """
  keys, values, mapping = factset
  n_keys = keys.shape[0]
  step = -(-max(stream_size, 1) // chunk_size) * chunk_size
  if step >= n_keys or isinstance(keys, jax.core.Tracer):
    out = verify_structured(parts, model, factset, codes,
                            chunk_size=chunk_size)
    if progress is not None:
      jax.block_until_ready(out)
      progress(n_keys, n_keys)
    return out
  owner = bucket_of_key(parts.buckets, n_keys)
  pieces = []
  for start in range(0, n_keys, step):
    stop = min(start + step, n_keys)
    pieces.append(jax.device_get(_structured_terms_jit(
        parts, model, values, codes, keys[start:stop], mapping[start:stop],
        owner[start:stop], chunk_size=chunk_size)))
    if progress is not None:
      progress(stop, n_keys)
  gamma, norms, err, ok, slack = (jnp.asarray(np.concatenate(p))
                                  for p in zip(*pieces))
  return (Verification(storage._report(gamma, norms), jnp.max(err)), ok,
          jnp.min(slack))


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


# --------------------------------------------------------------------------
# Host-level driver.


def as_key(key) -> Array:
  """A PRNG key from a key or an integer seed (Python or numpy int)."""
  if isinstance(key, (int, np.integer)):
    return jax.random.key(int(key))
  return key


def _resolve_bucket_size(config: ConstructionConfig, dim: int) -> int:
  b = config.bucket_size if config.bucket_size is not None else dim
  if not 1 <= b <= dim:
    raise FactStoreError(
        f'bucket_size must be in [1, d={dim}] (keys of a bucket must be '
        f'linearly independent), got {b}')
  return b


def _code_dims(config: ConstructionConfig, dim: int) -> list[int]:
  if config.code_dim is not None:
    if config.code_dim < 1:
      raise FactStoreError(f'code_dim must be >= 1, got {config.code_dim}')
    return [min(config.code_dim, dim)]
  dims, m = [], max(1, config.min_code_dim)
  while m < dim:
    dims.append(m)
    m *= 2
  return dims + [dim]


def _check_config(config: ConstructionConfig):
  if config.activation not in gadgets.GADGETS:
    raise FactStoreError(f'activation must be one of {sorted(gadgets.GADGETS)}'
                         f', got {config.activation!r}')
  if not 0 <= config.slack < 0.5:
    raise FactStoreError(f'slack must be in [0, 0.5), got {config.slack}')
  if not 0 < config.fill <= 1:
    raise FactStoreError(f'fill must be in (0, 1], got {config.fill}')
  if not 0 <= config.patch <= 1:
    raise FactStoreError(f'patch must be in [0, 1], got {config.patch}')
  if config.verify not in VERIFY_METHODS:
    raise FactStoreError(f'verify must be one of {VERIFY_METHODS}, got '
                         f'{config.verify!r}')


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
  dims = _code_dims(config, dim)
  probe = np.random.default_rng(0).permutation(used)[:256]
  is_used = np.zeros(values.shape[0], bool)
  is_used[used] = True

  def certified(ids, part, floor):
    """Used values among ``ids`` (the values ``part`` solved) certified at or
    below the floor (gap closed or dual bound below it: a re-solve with a
    larger active set would not touch them)."""
    rho_p, gap, dual = (np.asarray(a) for a in (part.rho, part.gap,
                                                part.dual_bound))
    closed = (gap <= config.tol) | (dual <= max(1e-6, floor))
    return ids[is_used[ids] & closed & (rho_p <= floor)]

  for m in dims:
    decoder = construction_decoder(key, dim, m, values.dtype)
    fixed = config.code_dim is not None
    floor = config.min_rho if m < dim and not fixed else 0.0
    budget = patch_budget(config, len(used)) if m < dim else 0
    t0 = time.perf_counter()
    if m < dim and len(probe) < len(used):
      # A random sample of used values rejects a too-small m cheaply.
      part = decodability(decoders.project_values(values, decoder),
                                  tol=config.tol, floor=floor, indices=probe)
      bad_probe = certified(probe, part, floor)
      if len(bad_probe) > min(budget, _probe_limit(config, len(probe))):
        if fixed:
          _undecodable(m, bad_probe)
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
        _undecodable(m, np.asarray(bad))
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
  if len(stragglers):
    if m >= dim:
      raise InfeasibleFactSetError(stragglers)
    if len(stragglers) > budget:
      _undecodable(m, stragglers)
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
  full = decodability(values, tol=tol, indices=stragglers)
  bad = stragglers[np.asarray(full.rho) <= 0]
  if len(bad):
    raise InfeasibleFactSetError(bad)
  s = len(stragglers)
  decoder = jnp.concatenate([decoder, full.separators.T.astype(decoder.dtype)],
                            axis=1)
  extra = jnp.zeros((codes.shape[0], s), codes.dtype).at[
      stragglers, jnp.arange(s)].set(1)
  codes = jnp.concatenate([codes.at[stragglers].set(0), extra], axis=1)
  rho = rho.at[stragglers].set(full.rho.astype(rho.dtype))
  return decoder, codes, rho


def _undecodable(code_dim: int, bad: np.ndarray):
  """Raises for used values (``bad``, if any) undecodable after projection."""
  if len(bad):
    raise ConstructionError(
        f'code_dim={code_dim} leaves used value(s) undecodable after '
        f'projection (e.g. {np.sort(bad)[:10].tolist()}); use a larger '
        'code_dim or leave it unset to search')


@jax.jit
@full_precision
def _direct_residual(maps, keys, targets, owner):
  """``max_r |(M_own k_i - c_i)_r|`` per key, from its own bucket's map."""
  def one(args):
    k, c, j = args
    err = jnp.abs(maps[j] @ k - c)
    return jnp.max(jnp.where(jnp.isnan(err), jnp.inf, err))  # NaN: a miss
  return jax.lax.map(one, (keys, targets, owner), batch_size=4096)


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
  residual = np.asarray(_direct_residual(parts.maps, keys, targets,
                                         jnp.asarray(owner)))
  scale = 1e-3 * (1 + np.abs(np.asarray(targets)).max(axis=1))
  missed = ~(residual <= scale)
  culprits = np.unique(owner[failing & missed])
  return culprits if culprits.size else np.unique(owner[failing])


def _refit_buckets(parts: Gadgets, keys, targets, bad_buckets) -> Gadgets:
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
  """Whether bucket ``j``'s own map misses one of its keys' codes.

  Misses are non-finite or off by more than ``1e-3 (1 + |c|)`` (the
  threshold of :func:`failing_buckets`).
  """
  index, valid = np.asarray(parts.buckets.index), np.asarray(parts.buckets.valid)
  rows = index[j][valid[j]]
  c = np.asarray(targets, np.float64)[rows]
  err = np.abs(np.asarray(keys, np.float64)[rows]
               @ np.asarray(parts.maps[j], np.float64).T - c)
  return not np.all(err <= 1e-3 * (1 + np.abs(c).max(axis=1, keepdims=True)))


def _split_unsolved(parts: Gadgets, keys, targets, candidates, *,
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
      parts = _refit_buckets(
          Gadgets(buckets, maps, scale.astype(maps.dtype),
                  bias.astype(maps.dtype), sign.astype(maps.dtype)),
          keys, targets, [j, j + 1])
      todo = [t + 1 for t in todo] + [j, j + 1]
      splits += 1
    todo = sorted(todo)
  return parts, splits


# Above these sizes construct() streams: host loops over jitted chunks, so
# peak memory stays bounded (results are the same as one call's).
STREAM_VALUES = 2048    # values per decodability call
STREAM_BUCKETS = 1024   # buckets per bucket-solve call
STREAM_KEYS = 65536     # keys per verification call


VERIFY_METHODS = ('certificate', 'dense')


def _round_down(x: np.ndarray) -> np.ndarray:
  """float64 -> float32, rounded towards -inf (lower bounds stay bounds)."""
  y = x.astype(np.float32)
  return np.where(y > x, np.nextafter(y, np.float32(-np.inf)), y)


def _round_up(x: np.ndarray) -> np.ndarray:
  y = x.astype(np.float32)
  return np.where(y < x, np.nextafter(y, np.float32(np.inf)), y)


def certify_gadgets(parts: Gadgets, model: EncoderDecoder, factset, codes, *,
                    assembled: EncoderDecoder | None = None, progress=None):
  """The structured certificate of ``model`` as a :class:`Verification`.

  ``assembled`` is ``prune_dead(assemble_gadgets(parts, model.decoder))``
  (built here when omitted); ``model`` must equal it bitwise, else every
  margin is ``-inf``. Margins are lower bounds (rounded down to float32),
  ``code_error`` an upper bound. Returns ``(Verification, Certificate)``.
  """
  keys, values, mapping = factset
  if assembled is None:
    assembled = prune_dead(_assemble_jit(parts, model.decoder,
                                         model.activation))
  cert = certificate.certify(parts, model, assembled, keys, values, mapping,
                             codes, stream_size=STREAM_KEYS,
                             progress=progress)
  report = storage._report(jnp.asarray(_round_down(cert.margins)),
                           jnp.asarray(_round_up(cert.output_norms)))
  return Verification(report, jnp.asarray(_round_up(
      cert.code_bounds.max(keepdims=True))[0])), cert


def _check(parts: Gadgets, model: EncoderDecoder, factset, codes,
           progress=None, method: str = 'certificate'):
  """Verification of every fact: ``(Verification, check name, float32 bound)``.

  The certificate (clipped gate) is tried first; if it cannot certify every
  fact the dense check decides (it sees the margins the dense float32
  evaluation computes).
  """
  if model.activation == 'clipped' and method == 'certificate':
    check, cert = certify_gadgets(
        parts, model, factset, codes, assembled=model,
        progress=None if progress is None else
        lambda done, total: progress('certify', done, total))
    if float(check.storage.min_margin) > 0:
      return check, 'certificate', cert.float32_bound
    logging.info('certificate: min margin %.3g (float32 bound %s); running '
                 'the dense check', float(check.storage.min_margin),
                 cert.float32_bound)
  if model.activation == 'clipped':
    check, _, _ = verify_structured_streamed(
        parts, model, factset, codes, stream_size=STREAM_KEYS,
        progress=None if progress is None else
        lambda done, total: progress('verify', done, total))
    return check, 'dense', ''
  return verify(model, factset, codes), 'dense', ''


def max_map_norm(maps: Array) -> float:
  """``max_j ||M_j||_2`` of bucket maps ``(n, m, d)`` (largest singular value)."""
  return float(np.max(np.linalg.norm(np.asarray(maps, np.float64), ord=2,
                                     axis=(1, 2))))


@full_precision
def construct(factset: FactSet, key: Array | int = 0,
              config: ConstructionConfig = ConstructionConfig(), *,
              progress=None, **overrides) -> Construction:
  """Builds, verifies and (if needed) repairs an encoder-decoder MLP.

  Args:
    factset: a valid :class:`FactSet` (keys ``(N, d)``, values ``(P, d)``,
      mapping ``(N,)``); checked before anything is traced.
    key: PRNG key or int seed.
    config: :class:`ConstructionConfig`; keyword ``overrides`` replace fields.
    progress: optional ``progress(stage, done, total)`` called between the
      jitted chunks of the long stages (``'decodability m=...'``,
      ``'buckets'``, ``'verify'``, ``'assemble'``). Large problems are
      streamed (``STREAM_VALUES`` values, ``STREAM_BUCKETS`` buckets,
      ``STREAM_KEYS`` keys per call), so memory stays bounded; the result
      is the same.

  Returns:
    :class:`Construction` with the model, its :class:`ConstructionReport`
    (accuracy is 1.0 and ``min_margin > 0`` whenever this returns), the value
    codes and the projected decodability.

  Raises:
    FactStoreError: bad input; InfeasibleFactSetError: some used value is not
    decodable (names them); ConstructionError: storage could not be
    certified even after repair.
  """
  start = time.perf_counter()
  config = dataclasses.replace(config, **overrides)
  _check_config(config)
  keys, values, mapping = factset
  validate_factset(keys, values, mapping)
  keys, values = jnp.asarray(keys), jnp.asarray(values)
  mapping = jnp.asarray(mapping, jnp.int32)
  key = as_key(key)
  n_keys, dim = keys.shape
  bucket_size = _resolve_bucket_size(config, dim)
  factset = FactSet(keys, values, mapping)
  code_dim, codes, rho, stragglers = choose_code_dim(
      key, values, mapping, config, stream_size=STREAM_VALUES,
      progress=progress)
  _, k_dir = jax.random.split(key)
  decoder = construction_decoder(key, dim, code_dim, keys.dtype)
  used = used_values(mapping)
  if len(stragglers):
    decoder, codes, rho = patch_stragglers(values, decoder, codes, rho,
                                           stragglers, tol=config.tol)
  code_dim = decoder.shape[1]
  targets = codes[mapping]

  repaired, retries, split = 0, 0, 0
  while True:
    with single_threaded_blas():
      parts = build_gadgets_streamed(
          k_dir, keys, targets, bucket_size=bucket_size,
          activation=config.activation, slack=config.slack, fill=config.fill,
          stream_size=STREAM_BUCKETS, progress=None if progress is None
          else lambda done, total: progress('buckets', done, total))
    model = prune_dead(_assemble_jit(parts, decoder, config.activation))
    check, check_name, f32 = _check(parts, model, factset, codes, progress,
                                    config.verify)
    # NaN margins (a singular bucket) count as failing.
    if not float(check.storage.min_margin) > 0:
      bad = failing_buckets(parts, keys, targets, check.storage.margins)
      logging.info('refitting %d bucket(s) in float64', len(bad))
      parts = _refit_buckets(parts, keys, targets, bad)
      parts, n_split = _split_unsolved(parts, keys, targets, bad,
                                       slack=config.slack,
                                       activation=config.activation)
      repaired += len(bad)
      split += n_split
      model = prune_dead(_assemble_jit(parts, decoder, config.activation))
      check, check_name, f32 = _check(parts, model, factset, codes, progress,
                                    config.verify)
    if float(check.storage.min_margin) > 0:
      break
    if retries >= config.max_retries:
      failing = int(np.sum(~(np.asarray(check.storage.margins) > 0)))
      raise ConstructionError(
          f'could not certify storage: {failing} of {n_keys} facts have '
          f'margin <= 0 (min margin {float(check.storage.min_margin):.3g}, '
          f'code error {float(check.code_error):.3g}, smallest projection '
          f'gap {float(parts.buckets.min_gap):.3g}) after {retries} '
          'rebuild(s); try dtype float64, a smaller bucket_size or a larger '
          'code_dim')
    retries += 1
    k_dir = jax.random.fold_in(k_dir, retries)
    bucket_size = max(1, bucket_size // 2)
    logging.info('rebuilding with a new direction, bucket_size %d', bucket_size)

  if progress is not None:
    progress('assemble', 1, 1)
  n_params = num_params(model)
  n_values = values.shape[0]
  report = ConstructionReport(
      num_facts=n_keys, num_values=n_values, dim=dim, code_dim=code_dim,
      bucket_size=bucket_size, num_buckets=int(parts.maps.shape[0]),
      hidden_dim=int(model.w_gate.shape[1]), num_params=n_params,
      # Shapes only: the folded w_down (h, d) is never materialised.
      num_params_gated_mlp=num_params(jax.eval_shape(model.as_mlp)),
      params_per_fact=n_params / n_keys,
      bits_per_param=n_keys * math.log2(max(n_values, 2)) / n_params,
      accuracy=float(check.storage.accuracy),
      min_margin=float(check.storage.min_margin),
      min_normalized_margin=float(check.storage.min_normalized_margin),
      code_error=float(check.code_error),
      rho_projected=float(np.asarray(rho)[used].min()),
      min_gap=float(parts.buckets.min_gap), repaired_buckets=repaired,
      retries=retries, seconds=time.perf_counter() - start, fill=config.fill,
      max_map_norm=max_map_norm(parts.maps),
      patched_values=len(stragglers), split_buckets=split,
      check=check_name, float32_bound=f32)
  structure = bucket_structure(parts, check.storage, n_keys, config.slack,
                               config.tol, config.fill)
  return Construction(model=model, report=report, codes=codes, rho=rho,
                      structure=structure)


_assemble_jit = jax.jit(assemble_gadgets, static_argnames=('activation',))


# --------------------------------------------------------------------------
# Batched driver: many fact sets of the same shapes in one vmapped call.


class BatchedConstruction(NamedTuple):
  model: EncoderDecoder        # stacked, leading axis B
  codes: Array                 # (B, P, m)
  rho: Array                   # (B, P) decodability of projected values
  accuracy: Array              # (B,)
  min_margin: Array            # (B,)
  code_error: Array            # (B,)
  rho_projected: Array         # (B,) min over used values
  code_dim: int
  bucket_size: int
  num_params: int              # per member (all members have the same)
  repaired: list               # members whose buckets were refit in float64


@functools.partial(jax.jit, static_argnames=('code_dim', 'floor', 'tol'))
def _batched_rho(keys, values, *, code_dim, floor, tol):
  def one(key, v):
    decoder = construction_decoder(key, v.shape[1], code_dim, v.dtype)
    return value_codes(v, decoder, tol=tol, floor=floor)[1]
  return jax.vmap(one)(keys, values)


@functools.partial(jax.jit, static_argnames=('code_dim', 'bucket_size',
                                             'activation', 'slack', 'tol',
                                             'fill'))
def _build_members(member_keys, factsets, *, code_dim, bucket_size,
                   activation, slack, tol, fill):
  """:func:`construct_fixed` over a stack of fact sets, in one jitted call.

  The codes come from an iterative solver whose path follows rounding, so
  they are computed member by member (``lax.map``: each member runs the
  very program :func:`construct_fixed` runs); the bucket solves are vmapped.
  """
  dim = factsets.keys.shape[-1]

  def codes_of(args):
    key, values = args
    decoder = construction_decoder(key, dim, code_dim, values.dtype)
    return value_codes(values, decoder, tol=tol)

  codes, rho = jax.lax.map(codes_of, (member_keys, factsets.values))

  def encoder(key, fs, codes_b):
    _, k_dir = jax.random.split(key)
    decoder = construction_decoder(key, dim, code_dim, fs.keys.dtype)
    return build_encoder(k_dir, fs.keys, codes_b[fs.mapping], decoder,
                         bucket_size=bucket_size, activation=activation,
                         slack=slack, fill=fill)

  model, parts = jax.vmap(encoder)(member_keys, factsets, codes)
  return model, codes, rho, parts


@full_precision
def construct_batched(factsets: FactSet, key: Array | int = 0,
                      config: ConstructionConfig = ConstructionConfig(),
                      **overrides) -> BatchedConstruction:
  """Constructs MLPs for a stacked fact set ``(B, N, d), (B, P, d), (B, N)``.

  One jitted call builds every member (member ``b`` uses
  ``jax.random.split(key, B)[b]`` and equals ``construct_fixed(keys[b],
  factsets[b])`` to float tolerance; the bucket solves are vmapped, the
  value codes solved member by member); all members are verified, and
  failing buckets are refit in float64. ``code_dim=None`` picks the smallest
  ``m`` of the search that suits every member. Shapes are fixed, so nothing
  is patched or pruned: a fixed ``code_dim`` that leaves a used value
  undecodable raises (``construct`` patches such values instead).

  Raises:
    FactStoreError on bad input; InfeasibleFactSetError naming
    ``(member, value)`` pairs; ConstructionError if a member cannot be
    certified.
  """
  config = dataclasses.replace(config, **overrides)
  _check_config(config)
  validate_factset(*factsets, batched=True)
  keys, values, mapping = (jnp.asarray(factsets[0]), jnp.asarray(factsets[1]),
                           jnp.asarray(factsets[2], jnp.int32))
  factsets = FactSet(keys, values, mapping)
  key = as_key(key)
  batch, n_keys, dim = keys.shape
  member_keys = jax.random.split(key, batch)
  bucket_size = _resolve_bucket_size(config, dim)
  mapping_np = np.asarray(mapping)
  used = np.zeros(values.shape[:2], bool)
  np.put_along_axis(used, mapping_np, True, axis=1)

  for m in _code_dims(config, dim):
    floor = config.min_rho if m < dim and config.code_dim is None else 0.0
    rho = np.asarray(_batched_rho(member_keys, values, code_dim=m,
                                  floor=floor, tol=config.tol))
    rho_used = np.where(used, rho, np.inf)
    if config.code_dim is not None or rho_used.min() > floor:
      break
  bad = np.argwhere(rho_used <= 0)
  if len(bad):
    pairs = [(int(b), int(v)) for b, v in bad]
    if m >= dim:
      raise InfeasibleFactSetError(
          [v for _, v in pairs],
          f'{len(pairs)} used (member, value) pairs are not decodable '
          f'(rho <= 0): {pairs[:20]}')
    raise ConstructionError(
        f'code_dim={m} leaves used values undecodable after projection, '
        f'(member, value): {pairs[:20]}; use a larger code_dim')
  code_dim = min(m, dim)

  build = functools.partial(
      _build_members, code_dim=code_dim, bucket_size=bucket_size,
      activation=config.activation, slack=config.slack, tol=config.tol,
      fill=config.fill)
  with single_threaded_blas():
    model, codes, rho, parts = jax.block_until_ready(
        build(member_keys, factsets))
  check = jax.vmap(lambda *a: _check(*a, method='dense')[0])(
      parts, model, factsets, codes)
  repaired = []
  for b in np.flatnonzero(~(np.asarray(check.storage.min_margin) > 0)):
    member = lambda tree: jax.tree.map(lambda a: a[b], tree)
    part_b, fs_b, codes_b = member(parts), member(factsets), codes[b]
    check_b, _, _ = _check(part_b, member(model), fs_b, codes_b)
    targets_b = codes_b[fs_b.mapping]
    part_b = _refit_buckets(part_b, fs_b.keys, targets_b, failing_buckets(
        part_b, fs_b.keys, targets_b, check_b.storage.margins))
    model_b = _assemble_jit(part_b, model.decoder[b], config.activation)
    check_b, _, _ = _check(part_b, model_b, fs_b, codes_b)
    if not float(check_b.storage.min_margin) > 0:
      raise ConstructionError(
          f'member {b}: could not certify storage (min margin '
          f'{float(check_b.storage.min_margin):.3g}) after a float64 refit')
    model = jax.tree.map(lambda s, x: s.at[b].set(x), model, model_b)
    check = jax.tree.map(lambda s, x: s.at[b].set(x), check, check_b)
    repaired.append(int(b))

  rho_min = np.where(used, np.asarray(rho), np.inf).min(axis=1)
  return BatchedConstruction(
      model=model, codes=codes, rho=rho,
      accuracy=check.storage.accuracy, min_margin=check.storage.min_margin,
      code_error=check.code_error, rho_projected=jnp.asarray(rho_min),
      code_dim=code_dim, bucket_size=bucket_size,
      num_params=num_params(jax.tree.map(lambda a: a[0], model)),
      repaired=repaired)
