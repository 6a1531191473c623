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
neurons (fewer: :func:`assemble_live` leaves out those whose up-weights
are exactly zero): ``h (2d + 1 + m) + d m`` factorised, ``h (3d + 1)`` folded.
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

from factstore_jax.decodability import used_values
from factstore_jax import storage
from factstore_jax.constructions import certificate, gadgets
from factstore_jax.errors import ConstructionError
from factstore_jax.factsets import FactSet, validate_factset
from factstore_jax.precision import full_precision
from factstore_jax.threads import single_threaded_blas
from factstore_jax.mlp import EncoderDecoder, GatedMLP, GatedMLPModule, num_params
from factstore_jax.constructions.assembly import Gadgets, assemble_jit, assemble_live, build_encoder, build_gadgets_streamed, max_map_norm
from factstore_jax.constructions import decoders
from factstore_jax.constructions.codes import choose_code_dim, construction_decoder, patch_stragglers, raise_undecodable, refuse_undecodable, rho_floor, value_codes
from factstore_jax.constructions.config import ConstructionConfig, check_config, code_dims, resolve_bucket_size
from factstore_jax.constructions.repair import failing_buckets, refit_buckets, split_unsolved
from factstore_jax.constructions.verify import bucket_of_key, check_construction

Array = jax.Array


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
    """Plain Python values (lists for a batched report's ``(B,)`` fields)."""
    return {k: (v.tolist() if hasattr(v, 'tolist') else v)
            for k, v in self._asdict().items()}


class Construction(NamedTuple):
  model: EncoderDecoder
  report: ConstructionReport
  codes: Array        # (P, m) codes of all values
  rho: Array          # (P,) decodability of the projected values
  # Per-bucket structure for bucket-local edits (constructions/bucket_edits.py);
  # None where the builder kept none.
  structure: BucketStructure | None = None

  @property
  def mlp(self) -> GatedMLP:
    """The constructed function as a standard gated MLP params pytree."""
    return self.model.as_mlp()

  def module(self) -> GatedMLPModule:
    """The constructed MLP as a Flax NNX module."""
    return GatedMLPModule(self.mlp)


@flax.struct.dataclass
class BucketStructure:
  """Per-bucket state of a construction, kept for bucket-local edits
  (:mod:`factstore_jax.constructions.bucket_edits`).

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


class FixedConstruction(NamedTuple):
  """What :func:`construct_fixed` returns (unverified)."""
  model: EncoderDecoder
  codes: Array        # (P, m) codes of all values
  rho: Array          # (P,) decodability of the projected values
  gadgets: 'Gadgets'  # the compact description the model is assembled from


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
    :class:`FixedConstruction` ``(model, codes (P, m), rho (P,), gadgets)``.
    Nothing is verified here:
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
  return FixedConstruction(model, codes, rho, parts)


def as_key(key) -> Array:
  """A PRNG key from a key or an integer seed (Python or numpy int)."""
  if isinstance(key, (int, np.integer)):
    return jax.random.key(int(key))
  return key


STREAM_VALUES = 2048    # values per decodability call


STREAM_BUCKETS = 1024   # buckets per bucket-solve call




@full_precision
def construct(key: Array | int, factset: FactSet,
              config: ConstructionConfig = ConstructionConfig(), *,
              progress=None, **overrides) -> Construction:
  """Builds, verifies and (if needed) repairs an encoder-decoder MLP.

  Args:
    key: PRNG key or int seed (decoder, bucket directions, rebuilds).
    factset: a valid :class:`FactSet` (keys ``(N, d)``, values ``(P, d)``,
      mapping ``(N,)``); checked before anything is traced.
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
  check_config(config)
  keys, values, mapping = factset
  validate_factset(keys, values, mapping)
  keys, values = jnp.asarray(keys), jnp.asarray(values)
  mapping = jnp.asarray(mapping, jnp.int32)
  key = as_key(key)
  n_keys, dim = keys.shape
  bucket_size = resolve_bucket_size(config, dim)
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
  # Each key's target code, (N, m): 2 GiB at 2^22 facts, so it is made
  # where it is needed and not held through the certificate.
  targets = lambda: codes[mapping]

  repaired, retries, split = 0, 0, 0
  value_cache = certificate.ValueCache()   # the table is fixed from here
  while True:
    with single_threaded_blas():
      parts = build_gadgets_streamed(
          k_dir, keys, targets(), bucket_size=bucket_size,
          activation=config.activation, slack=config.slack, fill=config.fill,
          stream_size=STREAM_BUCKETS, progress=None if progress is None
          else lambda done, total: progress('buckets', done, total))
    model = assemble_live(parts, decoder, config.activation)
    # A failed certificate names the facts to repair before any dense check.
    check, check_name, f32 = check_construction(
        parts, model, factset, codes, progress, config.verify, fallback=False,
        value_cache=value_cache)
    # NaN margins (a singular bucket) count as failing.
    if not float(check.storage.min_margin) > 0:
      wanted = targets()
      bad = failing_buckets(parts, keys, wanted, check.storage.margins)
      logging.info('refitting %d bucket(s) in float64', len(bad))
      parts = refit_buckets(parts, keys, wanted, bad)
      parts, n_split = split_unsolved(parts, keys, wanted, bad,
                                       slack=config.slack,
                                       activation=config.activation)
      del wanted
      repaired += len(bad)
      split += n_split
      model = assemble_live(parts, decoder, config.activation)
      check, check_name, f32 = check_construction(
          parts, model, factset, codes, progress, config.verify,
          value_cache=value_cache)
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
def construct_batched(key: Array | int, factsets: FactSet,
                      config: ConstructionConfig = ConstructionConfig(),
                      **overrides) -> Construction:
  """Constructs MLPs for a stacked fact set ``(B, N, d), (B, P, d), (B, N)``.

  The result is :func:`construct`'s, stacked: a :class:`Construction` whose
  ``model``, ``codes (B, P, m)`` and ``rho (B, P)`` carry a leading member
  axis and whose :class:`ConstructionReport` holds ``(B,)`` arrays for the
  per-member figures (accuracy, margins, code error, projected rho, gap, map
  norm, refit buckets); ``structure`` is ``None``.

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
  start = time.perf_counter()
  config = dataclasses.replace(config, **overrides)
  check_config(config)
  validate_factset(*factsets, batched=True)
  keys, values, mapping = (jnp.asarray(factsets[0]), jnp.asarray(factsets[1]),
                           jnp.asarray(factsets[2], jnp.int32))
  factsets = FactSet(keys, values, mapping)
  key = as_key(key)
  batch, n_keys, dim = keys.shape
  member_keys = jax.random.split(key, batch)
  bucket_size = resolve_bucket_size(config, dim)
  mapping_np = np.asarray(mapping)
  used = np.zeros(values.shape[:2], bool)
  np.put_along_axis(used, mapping_np, True, axis=1)

  for m in code_dims(config, dim):
    floor = rho_floor(config, m, dim)
    rho = np.asarray(_batched_rho(member_keys, values, code_dim=m,
                                  floor=floor, tol=config.tol))
    rho_used = np.where(used, rho, np.inf)
    if config.code_dim is not None or rho_used.min() > floor:
      break
  bad = np.argwhere(rho_used <= 0)
  if len(bad):
    pairs = [(int(b), int(v)) for b, v in bad]
    if m >= dim:
      # The batched solve runs under vmap, without the host re-solves of
      # stalled certificates: each member's values are re-solved on their
      # own, and refused only if certified undecodable.
      for b in np.unique(bad[:, 0]):
        vals = bad[bad[:, 0] == b, 1]
        decoder = construction_decoder(member_keys[b], dim, m, values.dtype)
        refuse_undecodable(decoders.project_values(values[b], decoder), vals,
                           tol=config.tol,
                           labels=[(int(b), int(v)) for v in vals])
      raise ConstructionError(
          f'the batched solve left {len(pairs)} used (member, value) pairs '
          f'with rho <= 0 that are decodable on their own: {pairs[:20]}; '
          'construct these members one at a time')
    raise_undecodable(m, bad[:, 1], f'(member, value) pairs {pairs[:20]}')
  code_dim = min(m, dim)

  build = functools.partial(
      _build_members, code_dim=code_dim, bucket_size=bucket_size,
      activation=config.activation, slack=config.slack, tol=config.tol,
      fill=config.fill)
  with single_threaded_blas():
    model, codes, rho, parts = jax.block_until_ready(
        build(member_keys, factsets))
  check = jax.vmap(lambda *a: check_construction(*a, method='dense')[0])(
      parts, model, factsets, codes)
  repaired = []
  for b in np.flatnonzero(~(np.asarray(check.storage.min_margin) > 0)):
    member = lambda tree: jax.tree.map(lambda a: a[b], tree)
    part_b, fs_b, codes_b = member(parts), member(factsets), codes[b]
    check_b, _, _ = check_construction(part_b, member(model), fs_b, codes_b)
    targets_b = codes_b[fs_b.mapping]
    bad_b = failing_buckets(part_b, fs_b.keys, targets_b,
                            check_b.storage.margins)
    part_b = refit_buckets(part_b, fs_b.keys, targets_b, bad_b)
    model_b = assemble_jit(part_b, model.decoder[b], config.activation)
    check_b, _, _ = check_construction(part_b, model_b, fs_b, codes_b)
    if not float(check_b.storage.min_margin) > 0:
      raise ConstructionError(
          f'member {b}: could not certify storage (min margin '
          f'{float(check_b.storage.min_margin):.3g}) after a float64 refit')
    model = jax.tree.map(lambda s, x: s.at[b].set(x), model, model_b)
    check = jax.tree.map(lambda s, x: s.at[b].set(x), check, check_b)
    parts = jax.tree.map(lambda s, x: s.at[b].set(x), parts, part_b)
    repaired.append((int(b), len(bad_b)))

  rho_min = np.where(used, np.asarray(rho), np.inf).min(axis=1)
  member0 = jax.tree.map(lambda a: a[0], model)
  n_params = num_params(member0)
  refit = np.zeros(batch, np.int64)
  for b, count in repaired:
    refit[b] = count
  report = ConstructionReport(
      num_facts=n_keys, num_values=values.shape[1], dim=dim,
      code_dim=code_dim, bucket_size=bucket_size,
      num_buckets=int(parts.maps.shape[1]),
      hidden_dim=int(model.w_gate.shape[-1]), num_params=n_params,
      num_params_gated_mlp=num_params(jax.eval_shape(member0.as_mlp)),
      params_per_fact=n_params / n_keys,
      bits_per_param=n_keys * math.log2(max(values.shape[1], 2)) / n_params,
      accuracy=np.asarray(check.storage.accuracy),
      min_margin=np.asarray(check.storage.min_margin),
      min_normalized_margin=np.asarray(check.storage.min_normalized_margin),
      code_error=np.asarray(check.code_error), rho_projected=rho_min,
      min_gap=np.asarray(parts.buckets.min_gap), repaired_buckets=refit,
      retries=0, seconds=time.perf_counter() - start, fill=config.fill,
      max_map_norm=np.array([max_map_norm(m) for m in parts.maps]),
      check='dense', float32_bound='')
  return Construction(model=model, report=report, codes=codes, rho=rho,
                      structure=None)
