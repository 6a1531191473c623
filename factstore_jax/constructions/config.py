"""Settings of the closed-form construction and their checks."""

from __future__ import annotations

import dataclasses

import jax

from factstore_jax.constructions import gadgets
from factstore_jax.errors import FactStoreError

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


VERIFY_METHODS = ('certificate', 'dense')


def check_config(config: ConstructionConfig):
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


def resolve_bucket_size(config: ConstructionConfig, dim: int) -> int:
  b = config.bucket_size if config.bucket_size is not None else dim
  if not 1 <= b <= dim:
    raise FactStoreError(
        f'bucket_size must be in [1, d={dim}] (keys of a bucket must be '
        f'linearly independent), got {b}')
  return b


def code_dims(config: ConstructionConfig, dim: int) -> list[int]:
  if config.code_dim is not None:
    if config.code_dim < 1:
      raise FactStoreError(f'code_dim must be >= 1, got {config.code_dim}')
    return [min(config.code_dim, dim)]
  dims, m = [], max(1, config.min_code_dim)
  while m < dim:
    dims.append(m)
    m *= 2
  return dims + [dim]
