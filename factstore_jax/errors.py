"""Exceptions raised on bad input, before anything is traced."""

from __future__ import annotations

from typing import Sequence


class FactStoreError(ValueError):
  """Base class: a ValueError naming what is wrong with the input."""


class InfeasibleFactSetError(FactStoreError):
  """Some value used by the fact map is not decodable (not a strict vertex)."""

  def __init__(self, undecodable: Sequence[int], message: str | None = None):
    self.undecodable = [int(i) for i in undecodable]
    shown = self.undecodable[:20]
    more = '' if len(self.undecodable) <= 20 else f' (+{len(self.undecodable) - 20} more)'
    super().__init__(
        message or
        f'fact set is infeasible: {len(self.undecodable)} used value(s) are not '
        f'decodable (rho <= 0, not strict vertices of the value hull): '
        f'{shown}{more}')


class ConstructionError(FactStoreError):
  """The construction could not certify storage of every fact."""
