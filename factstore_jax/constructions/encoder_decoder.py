"""The closed-form encoder-decoder construction (DESIGN §3).

``g(x) = D E(x)``: a gated-MLP encoder ``E: R^d -> R^m`` that maps each key
exactly to the code ``c_f(i)`` of its value (see :mod:`gadgets`) and a linear
decoder ``D (d, m)``. The code of value ``j`` is its separator computed on the
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

from factstore_jax import decodability as dec_lib
from factstore_jax import storage
from factstore_jax.constructions import decoders, gadgets
from factstore_jax.errors import (ConstructionError, FactStoreError,
                                  InfeasibleFactSetError)
from factstore_jax.factsets import FactSet, validate_factset
from factstore_jax.mlp import GatedMLP, get_activation, num_params

Array = jax.Array


@flax.struct.dataclass
class EncoderDecoder:
  """Factorised view: ``g(x) = decoder @ E(x)``; a pytree."""
  w_gate: Array    # (d, h)
  b_gate: Array    # (h,)
  w_up: Array      # (d, h)
  routing: Array   # (h, m): hidden neuron -> code coordinate
  decoder: Array   # (d, m)
  activation: str = flax.struct.field(pytree_node=False, default='clipped')

  @property
  def code_dim(self) -> int:
    return self.decoder.shape[-1]

  def encode(self, x: Array) -> Array:
    """Codes ``x (..., d) -> (..., m)``."""
    act = get_activation(self.activation)
    hidden = (x @ self.w_up) * act(x @ self.w_gate + self.b_gate)
    return hidden @ self.routing

  def __call__(self, x: Array) -> Array:
    """``x (..., d) -> (..., d)``."""
    return self.encode(x) @ self.decoder.T

  def as_mlp(self) -> GatedMLP:
    """The same function as a standard gated MLP (decoder folded in)."""
    return GatedMLP(w_gate=self.w_gate, b_gate=self.b_gate, w_up=self.w_up,
                    w_down=self.routing @ self.decoder.T,
                    activation=self.activation)


@dataclasses.dataclass(frozen=True)
class ConstructionConfig:
  """Static settings of the construction.

  Attributes:
    code_dim: code dimension ``m``; ``None`` searches ``min_code_dim, 2x, ...``
      until every used projected value has ``rho >= min_rho`` (``m >= d``
      means the identity decoder).
    bucket_size: max keys per bucket ``b <= d``; ``None`` means ``d // 2``.
    activation: ``'clipped'`` (exact windows) or ``'relu'``.
    min_code_dim: first ``m`` of the search.
    min_rho: decodability floor of projected values for the search.
    slack: fraction of each gap left flat on both sides of a ramp.
    tol: certificate gap of the decodability solver.
    max_retries: rebuilds (new direction, half the bucket size) after a
      failed certificate that float64 refits could not mend.
  """
  code_dim: int | None = None
  bucket_size: int | None = None
  activation: str = 'clipped'
  min_code_dim: int = 16
  min_rho: float = 0.02
  slack: float = 0.25
  tol: float = 1e-3
  max_retries: int = 2


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
  min_margin: float
  min_normalized_margin: float
  code_error: float            # max_i ||E(k_i) - c_f(i)||_inf
  rho_projected: float         # min rho of used values of V D
  min_gap: float               # smallest cut gap of the projections
  repaired_buckets: int
  retries: int
  seconds: float

  def as_dict(self) -> dict:
    return {k: (v.item() if hasattr(v, 'item') else v)
            for k, v in self._asdict().items()}


class Construction(NamedTuple):
  model: EncoderDecoder
  report: ConstructionReport
  codes: Array        # (P, m) codes of all values
  rho: Array          # (P,) decodability of the projected values

  @property
  def mlp(self) -> GatedMLP:
    return self.model.as_mlp()


# --------------------------------------------------------------------------
# Pure fixed-shape core.


def assemble(direction: Array, maps: Array, scale: Array, bias: Array,
             sign: Array, decoder: Array, activation: str) -> EncoderDecoder:
  """Gated-MLP weights from gadgets. ``maps (n, m, d)``, ``scale/bias (n, k)``.

  Hidden neurons are ordered ``(bucket, code coordinate, window neuron)``,
  ``h = n * m * k``.
  """
  n, m, d = maps.shape
  k = scale.shape[1]
  h = n * m * k
  w_gate = jnp.broadcast_to(direction[:, None, None, None] *
                            scale[None, :, None, :], (d, n, m, k))
  b_gate = jnp.broadcast_to(bias[:, None, :], (n, m, k))
  w_up = jnp.transpose(maps, (2, 0, 1))[..., None] * sign
  routing = jnp.broadcast_to(
      jnp.eye(m, dtype=maps.dtype)[None, :, None, :], (n, m, k, m))
  return EncoderDecoder(w_gate=w_gate.reshape(d, h), b_gate=b_gate.reshape(h),
                        w_up=w_up.reshape(d, h), routing=routing.reshape(h, m),
                        decoder=decoder, activation=activation)


def build_encoder(key: Array, keys: Array, targets: Array, decoder: Array, *,
                  bucket_size: int, activation: str = 'clipped',
                  slack: float = 0.25):
  """Encoder with ``E(k_i) = targets_i`` for ``keys (N, d)``, ``targets (N, m)``.

  Returns ``(EncoderDecoder, Buckets)``. Pure; static ``N, d, m, b``.
  """
  buckets = gadgets.make_buckets(key, keys, bucket_size, slack=slack)
  maps = gadgets.solve_buckets(keys, targets, buckets)
  scale, bias, sign = gadgets.window_gate_params(buckets, activation)
  model = assemble(buckets.direction, maps, scale.astype(keys.dtype),
                   bias.astype(keys.dtype), sign.astype(keys.dtype), decoder,
                   activation)
  return model, buckets


def value_codes(values: Array, decoder: Array, *, tol: float = 1e-3,
                floor: float = 0.0):
  """Codes (separators of ``V D``) and their decodability ``(P,)``."""
  result = dec_lib.decodability(decoders.project_values(values, decoder),
                                tol=tol, floor=floor)
  return result.separators, result.rho


@functools.partial(jax.jit, static_argnames=('code_dim', 'bucket_size',
                                             'activation', 'slack', 'tol'))
def construct_fixed(key: Array, factset: FactSet, *, code_dim: int,
                    bucket_size: int, activation: str = 'clipped',
                    slack: float = 0.25, tol: float = 1e-3):
  """Fixed-shape construction for one fact set (jit- and vmap-able).

  Args:
    key: PRNG key (decoder and bucket direction).
    factset: keys ``(N, d)``, values ``(P, d)``, mapping ``(N,)``.
    code_dim: ``m``; ``m >= d`` uses the identity decoder (``m = d``).

  Returns:
    ``(model, codes (P, m), rho (P,), buckets)``. Nothing is verified here:
    use :func:`verify` (or :func:`construct`, which does).
  """
  keys, values, mapping = factset
  dim = keys.shape[1]
  k_dec, k_dir = jax.random.split(key)
  decoder = decoders.jl_decoder(k_dec, dim, code_dim, keys.dtype)
  codes, rho = value_codes(values, decoder, tol=tol)
  model, buckets = build_encoder(k_dir, keys, codes[mapping], decoder,
                                 bucket_size=bucket_size,
                                 activation=activation, slack=slack)
  return model, codes, rho, buckets


class Verification(NamedTuple):
  storage: storage.StorageReport
  code_error: Array   # () max abs code error


@jax.jit
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


# --------------------------------------------------------------------------
# Host-level driver.


def _resolve_bucket_size(config: ConstructionConfig, dim: int) -> int:
  b = config.bucket_size if config.bucket_size is not None else max(1, dim // 2)
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


def choose_code_dim(key: Array, values: Array, mapping, config:
                    ConstructionConfig):
  """Smallest ``m`` of the search whose used projected values are decodable.

  Returns ``(m, codes, rho)``; raises :class:`InfeasibleFactSetError` if some
  used value is not decodable even with the identity decoder.
  """
  dim = values.shape[1]
  used = dec_lib.used_values(mapping)
  k_dec, _ = jax.random.split(key)
  dims = _code_dims(config, dim)
  for m in dims:
    decoder = decoders.jl_decoder(k_dec, dim, m, values.dtype)
    floor = config.min_rho if m < dim and config.code_dim is None else 0.0
    t0 = time.perf_counter()
    codes, rho = value_codes(values, decoder, tol=config.tol, floor=floor)
    rho_used = np.asarray(rho)[used]
    logging.info('code_dim %d: min rho of used projected values %.4f (%.1fs)',
                 m, rho_used.min(), time.perf_counter() - t0)
    if config.code_dim is not None or rho_used.min() > floor:
      break
  if np.asarray(rho)[used].min() <= 0:
    bad = used[np.asarray(rho)[used] <= 0]
    if m >= dim:
      raise InfeasibleFactSetError(bad)
    raise ConstructionError(
        f'code_dim={m} leaves {len(bad)} used value(s) undecodable after '
        f'projection (e.g. {bad[:10].tolist()}); use a larger code_dim or '
        'leave it unset to search')
  return min(m, dim), codes, rho


def _refit_buckets(model: EncoderDecoder, buckets, keys, targets, bad_buckets,
                   k_neurons: int, sign) -> EncoderDecoder:
  """Re-solves the given buckets in float64 (numpy lstsq, minimum norm)."""
  keys64 = np.asarray(keys, np.float64)
  targets64 = np.asarray(targets, np.float64)
  d, h = model.w_up.shape
  m = model.code_dim
  w_up = np.array(model.w_up).reshape(d, -1, m, k_neurons)
  index, valid = np.asarray(buckets.index), np.asarray(buckets.valid)
  for j in bad_buckets:
    rows = index[j][valid[j]]
    sol = np.linalg.lstsq(keys64[rows], targets64[rows], rcond=None)[0]  # (d,m)
    w_up[:, j, :, :] = sol[:, :, None] * np.asarray(sign)[None, None, :]
  return model.replace(w_up=jnp.asarray(w_up.reshape(d, h), model.w_up.dtype))


def _bucket_of_key(buckets, num_keys: int) -> np.ndarray:
  index, valid = np.asarray(buckets.index), np.asarray(buckets.valid)
  owner = np.empty(num_keys, np.int64)
  rows = np.broadcast_to(np.arange(index.shape[0])[:, None], index.shape)
  owner[index[valid]] = rows[valid]
  return owner


def construct(factset: FactSet, key: Array | int = 0,
              config: ConstructionConfig = ConstructionConfig(),
              **overrides) -> Construction:
  """Builds, verifies and (if needed) repairs an encoder-decoder MLP.

  Args:
    factset: a valid :class:`FactSet` (keys ``(N, d)``, values ``(P, d)``,
      mapping ``(N,)``); checked before anything is traced.
    key: PRNG key or int seed.
    config: :class:`ConstructionConfig`; keyword ``overrides`` replace fields.

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
  if isinstance(key, int):
    key = jax.random.key(key)
  n_keys, dim = keys.shape
  bucket_size = _resolve_bucket_size(config, dim)
  factset = FactSet(keys, values, mapping)
  code_dim, codes, rho = choose_code_dim(key, values, mapping, config)
  k_dec, k_dir = jax.random.split(key)
  decoder = decoders.jl_decoder(k_dec, dim, code_dim, keys.dtype)
  targets = codes[mapping]
  k_neurons = gadgets.neurons_per_window(config.activation)

  repaired, retries = 0, 0
  while True:
    model, buckets = _build_encoder_jit(
        k_dir, keys, targets, decoder, bucket_size=bucket_size,
        activation=config.activation, slack=config.slack)
    check = verify(model, factset, codes)
    if float(check.storage.min_margin) <= 0:
      failing = np.flatnonzero(np.asarray(check.storage.margins) <= 0)
      bad = np.unique(_bucket_of_key(buckets, n_keys)[failing])
      _, _, sign = gadgets.window_gate_params(buckets, config.activation)
      model = _refit_buckets(model, buckets, keys, targets, bad, k_neurons,
                             sign)
      repaired += len(bad)
      check = verify(model, factset, codes)
    if float(check.storage.min_margin) > 0:
      break
    if retries >= config.max_retries:
      failing = int(np.sum(np.asarray(check.storage.margins) <= 0))
      raise ConstructionError(
          f'could not certify storage: {failing} of {n_keys} facts have '
          f'margin <= 0 (min margin {float(check.storage.min_margin):.3g}, '
          f'code error {float(check.code_error):.3g}, smallest projection '
          f'gap {float(buckets.min_gap):.3g}) after {retries} rebuild(s); '
          'try dtype float64, a smaller bucket_size or a larger code_dim')
    retries += 1
    k_dir = jax.random.fold_in(k_dir, retries)
    bucket_size = max(1, bucket_size // 2)

  used = dec_lib.used_values(mapping)
  n_params = num_params(model)
  n_values = values.shape[0]
  report = ConstructionReport(
      num_facts=n_keys, num_values=n_values, dim=dim, code_dim=code_dim,
      bucket_size=bucket_size, num_buckets=int(buckets.index.shape[0]),
      hidden_dim=int(model.w_gate.shape[1]), num_params=n_params,
      num_params_gated_mlp=num_params(model.as_mlp()),
      params_per_fact=n_params / n_keys,
      bits_per_param=n_keys * math.log2(max(n_values, 2)) / n_params,
      accuracy=float(check.storage.accuracy),
      min_margin=float(check.storage.min_margin),
      min_normalized_margin=float(check.storage.min_normalized_margin),
      code_error=float(check.code_error),
      rho_projected=float(np.asarray(rho)[used].min()),
      min_gap=float(buckets.min_gap), repaired_buckets=repaired,
      retries=retries, seconds=time.perf_counter() - start)
  return Construction(model=model, report=report, codes=codes, rho=rho)


_build_encoder_jit = jax.jit(
    build_encoder, static_argnames=('bucket_size', 'activation', 'slack'))
