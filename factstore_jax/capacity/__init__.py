"""Capacity: the smallest MLP of each method that stores a fact set.

* :mod:`factstore_jax.capacity.search` — the width search (bracket, then
  batched geometric splits) and the scaling fits.
* :mod:`factstore_jax.capacity.methods` — every method's width knob,
  parameter count and batched storage evaluation, and
  :func:`find_capacity`, the search run over fact sets and seeds.
* :mod:`factstore_jax.capacity.rounds` — :class:`RoundLog`, a journal of
  search rounds, so a killed search resumes without training again.
"""

from factstore_jax.capacity.search import (Fit, WidthSearch, fit_n_log_n,
                                           info_floor, linear_fit,
                                           loglog_slope, search_width,
                                           search_widths)
from factstore_jax.capacity.methods import (METHODS, Built, Capacity,
                                            MethodOptions, build_mlp,
                                            evaluate_batched, find_capacity,
                                            smallest_mlp, width_params)
from factstore_jax.capacity.rounds import RoundLog
