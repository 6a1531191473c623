"""Capacity methods: each has one integer width knob, a parameter count, and a
storage evaluation batched over (fact set, width) members.

======================  ==============  ==========================================
method                  knob            parameters (every array as built)
======================  ==============  ==========================================
``encoder_decoder``     code dim ``m``  closed form (:func:`construct`), report
``encoder_decoder_gd``  hidden ``h``    ``2dh + h + hm + dm`` (decoder fixed)
``gd``                  hidden ``h``    ``3dh`` (identity gate, no biases)
``ntk``                 hidden ``m``    ``3dm``
``hebbian_ridge``       hidden ``m``    ``3dm``
``hebbian_data``        hidden ``m``    ``3dm``
======================  ==============  ==========================================

Batched methods train or build every member of a round in one ``vmap``-ed
program (widths masked up to the round's largest: exactly that for GD,
whose cost grows with it, a power of two for the cheap baselines, so few
shapes compile), sharded over devices by
:func:`factstore_jax.sharding.map_batched`. The closed form runs member by
member (its repair step is host-level). A GD search can keep the model it
trained at ``W*`` (``keep_models``), so :func:`smallest_mlp` returns it
without training it again.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from factstore_jax import mlp as mlp_lib
from factstore_jax import sharding, storage, training
from factstore_jax.capacity import search as capacity
from factstore_jax.baselines import hebbian, ntk
from factstore_jax.constructions.encoder_decoder import (
    ConstructionConfig, choose_code_dim, construct, construction_decoder)
from factstore_jax.errors import ConstructionError, FactStoreError
from factstore_jax.factsets import FactSet, stack_factsets
from factstore_jax.threads import single_threaded_blas

METHODS = ('encoder_decoder', 'encoder_decoder_gd', 'gd', 'ntk',
           'hebbian_ridge', 'hebbian_data')
_GD_METHODS = ('gd', 'encoder_decoder_gd')


@dataclasses.dataclass(frozen=True)
class MethodOptions:
  """Settings shared by the methods (static).

  Attributes:
    train: GD settings (``gd``, ``encoder_decoder_gd``).
    bucket_size: closed-form bucket size (``None``: the library default).
    fill: closed-form nominal bucket fill (``None``: the library default).
    ridge: relative ridge of the Hebbian readouts.
    degree: Hermite degree of ``ntk``.
    chunk_size: how a round's GD members (``gd``, ``encoder_decoder_gd``)
      run on each device: ``None`` in one ``vmap``; an int ``k``: ``k`` at a
      time (``lax.map``, see :func:`factstore_jax.sharding.map_batched`), each
      stopping early on its own. On CPU ``1`` is faster (8% on a d = 128,
      N = 2,048 round of 3); the closed-form baselines always ``vmap``.
  """
  train: training.TrainConfig = training.TrainConfig()
  bucket_size: int | None = None
  fill: float | None = None
  ridge: float = 1e-3
  degree: int = 1
  chunk_size: int | None = None

  def __post_init__(self):
    sharding.check_chunk_size(self.chunk_size, 'MethodOptions.chunk_size')


class Capacity(NamedTuple):
  method: str
  width: int | None      # W*'s knob value (None: nothing up to max passed)
  num_params: int | None
  tested: dict           # width -> accuracy
  rounds: int
  code_dim: int | None   # encoder_decoder_gd's fixed code dim
  # The closed form's ConstructionReport at W* (as a dict), else None.
  report: dict | None = None
  # The model the search trained at W* (GD methods with keep_models; None
  # when W* came from ``known``).
  model: object | None = None


def width_params(method: str, dim: int, width: int, *,
                 code_dim: int | None = None) -> int:
  """Parameter count of a batched method at ``width`` (see the table).

  (The count of an MLP you hold is :func:`factstore_jax.mlp.num_params`.)
  """
  if method == 'ntk':
    return ntk.ntk_num_params(dim, width)
  if method in ('hebbian_ridge', 'hebbian_data'):
    return hebbian.hebbian_num_params(dim, width)
  if method == 'gd':
    return 3 * dim * width  # identity gate, no biases: w_gate, w_up, w_down
  if method == 'encoder_decoder_gd':
    if code_dim is None:
      raise FactStoreError('encoder_decoder_gd needs its code_dim')
    return 2 * dim * width + width + width * code_dim + dim * code_dim
  raise FactStoreError(
      f'no width formula for {method!r}; expected one of {METHODS[1:]}')


def _check_method(method):
  if method not in METHODS:
    raise FactStoreError(f'unknown method {method!r}; expected one of '
                         f'{list(METHODS)}')


# --------------------------------------------------------------------------
# One member: (PRNG key, fact set, width) -> accuracy. Module level so that
# map_batched caches their compiled programs.


def _trained(result, keep):
  """A GD member's output: its accuracy, with ``keep`` also its model."""
  return (result.accuracy, result.params) if keep else result.accuracy


def _gd_member(item, *, hidden, config, keep=False):
  key, fs, width = item
  return _trained(
      training.train_mlp(key, fs, hidden, width=width, config=config), keep)


def _ed_gd_member(item, *, hidden, code_dim, config, keep=False):
  key, fs, width = item
  decoder = construction_decoder(key, fs.keys.shape[-1], code_dim,
                                 fs.keys.dtype)
  return _trained(training.train_encoder_decoder(
      key, fs, hidden, code_dim, width=width, config=config,
      decoder=decoder), keep)


def _mlp_accuracy(mlp, fs):
  return storage.evaluate_mlp(mlp, fs).accuracy


def _ntk_member(item, *, hidden, degree):
  key, fs, width = item
  return _mlp_accuracy(
      ntk.ntk_mlp_masked(key, fs, width, max_width=hidden, degree=degree), fs)


def _hebbian_member(item, *, hidden, readout, ridge):
  key, fs, width = item
  return _mlp_accuracy(hebbian.hebbian_mlp_masked(
      key, fs, width, max_width=hidden, readout=readout, ridge=ridge), fs)


def evaluate_batched(method: str, keys: Sequence, factsets: Sequence[FactSet],
                     widths: Sequence[int], *,
                     options: MethodOptions = MethodOptions(),
                     code_dims: Sequence[int] | None = None,
                     keep_models: bool = False):
  """Storage accuracy of each member ``(keys[j], factsets[j], widths[j])``.

  All fact sets must share shapes. One compiled, sharded program per round
  (members vmapped, or GD members mapped ``options.chunk_size`` at a time;
  mapped on a single device, one call per distinct width, unpadded).
  ``encoder_decoder_gd`` needs ``code_dims`` (one per member; one program
  per distinct code dim); member ``j`` trains with the decoder
  ``construction_decoder(keys[j], d, code_dims[j])``.

  Returns:
    ``accuracies (B,)``; with ``keep_models`` (GD methods only)
    ``(accuracies, models)``, ``models[j]`` member ``j``'s trained model at
    its width (:func:`~factstore_jax.mlp.first_units` of the padded run).
  """
  if method == 'encoder_decoder_gd':
    if code_dims is None or len(code_dims) != len(widths):
      raise FactStoreError('encoder_decoder_gd needs one code dim per member')
  elif code_dims is not None:
    raise FactStoreError(f'code_dims is for encoder_decoder_gd, not {method!r}')
  if keep_models and method not in _GD_METHODS:
    raise FactStoreError(f'keep_models is for the GD methods, not {method!r}')

  def by(labels):
    """One evaluation per distinct label, its members only."""
    accs, models = np.empty(len(labels)), [None] * len(labels)
    for label in sorted(set(labels)):
      same = [j for j, x in enumerate(labels) if x == label]
      args = dict(keys=[keys[j] for j in same],
                  factsets=[factsets[j] for j in same],
                  widths=[widths[j] for j in same],
                  code_dims=None if code_dims is None else
                  [code_dims[j] for j in same])
      out = evaluate_batched(method, **args, options=options,
                             keep_models=keep_models)
      if keep_models:
        out, kept = out
        for j, model in zip(same, kept):
          models[j] = model
      accs[same] = out
    return (accs, models) if keep_models else accs

  if code_dims is not None and len(set(code_dims)) > 1:
    return by(code_dims)
  if method in _GD_METHODS:
    if (options.chunk_size is not None and len(set(widths)) > 1
        and jax.local_device_count() == 1):
      # Mapped members run one after another on one device anyway: one call
      # per distinct width, each at exactly that width, instead of padding
      # narrow members to the round's widest (widths 16, 16, 128 at d = 64,
      # N = 1,024, 600 steps: 5.9 s against 9.2 s padded, same accuracies).
      return by(widths)
    # Training cost grows with the padded width (the (N, P) head matmuls
    # scale with it), so pad only to the widest member; nested draws make a
    # member's run independent of the padding.
    hidden = max(widths)
  else:
    # Cheap closed-form baselines: powers of two, so few shapes compile.
    hidden = max(8, 1 << (max(widths) - 1).bit_length())
  inputs = (jnp.stack(list(keys)), stack_factsets(list(factsets)),
            jnp.asarray(widths, jnp.int32))
  if method == 'gd':
    fn, static = _gd_member, dict(hidden=hidden, config=options.train,
                                  keep=keep_models)
  elif method == 'encoder_decoder_gd':
    fn, static = _ed_gd_member, dict(hidden=hidden, code_dim=code_dims[0],
                                     config=options.train, keep=keep_models)
  elif method == 'ntk':
    fn, static = _ntk_member, dict(hidden=hidden, degree=options.degree)
  elif method in ('hebbian_ridge', 'hebbian_data'):
    readout = 'ridge' if method == 'hebbian_ridge' else 'data_dependent'
    fn, static = _hebbian_member, dict(hidden=hidden, readout=readout,
                                       ridge=options.ridge)
  else:
    raise FactStoreError(f'{method!r} is not a batched method')
  # Ridge / data-dependent fits are batched LAPACK calls: on CPU, one BLAS
  # thread each (see factstore_jax.threads); map_batched blocks inside.
  with single_threaded_blas():
    out = sharding.map_batched(
        fn, inputs, static_kwargs=static,
        chunk_size=options.chunk_size if method in _GD_METHODS else None)
  if not keep_models:
    return np.asarray(out)
  accs, stacked = out
  return np.asarray(accs), [
      mlp_lib.first_units(jax.tree.map(lambda a, j=j: jnp.asarray(a[j]),
                                       stacked), w)
      for j, w in enumerate(widths)]


def closed_form_config(options: MethodOptions,
                       code_dim: int | None) -> ConstructionConfig:
  """The construction settings of ``options`` at ``code_dim``."""
  fill = {} if options.fill is None else {'fill': options.fill}
  return ConstructionConfig(code_dim=code_dim,
                            bucket_size=options.bucket_size, **fill)


def _closed_form(key, fs: FactSet, code_dim: int, options: MethodOptions):
  """``(accuracy, report)`` of the construction at ``code_dim`` (``None``
  where it raised)."""
  config = closed_form_config(options, code_dim)
  try:
    report = construct(key, fs, config).report
  except ConstructionError:
    return 0.0, None
  return report.accuracy, report


def find_capacity(method: str, keys: Sequence, factsets: Sequence[FactSet], *,
                  options: MethodOptions = MethodOptions(),
                  max_width: int | None = None, start: int | None = None,
                  batch: int = 1, threshold: float = 1.0,
                  rel_tol: float = 0.0,
                  on_round: Callable[[list[int], list[int], list[float]],
                                     None] | None = None,
                  known: Sequence[Mapping[int, float]] | None = None,
                  code_dim: int | Sequence[int] | None = None,
                  keep_models: bool = False) -> list[Capacity]:
  """``W*`` of ``method`` on each fact set (one search each, in lockstep).

  Args:
    method: one of :data:`METHODS`.
    keys: one PRNG key per fact set (features, initialisation, buckets).
    factsets: fact sets of equal shapes (e.g. one per seed).
    options: :class:`MethodOptions`.
    max_width: largest width tried (default: ``d`` for the closed form's
      code dim, ``8 d`` for the GD methods, ``64 d`` for the closed-form
      baselines, whose random features are the least efficient).
    start: first width tried (default: a guess from the fact set's size).
    batch, threshold, rel_tol: as :func:`~factstore_jax.capacity.search.search_width`.
    on_round: called after each round of evaluations with parallel lists
      ``(members, widths, accuracies)`` (``members`` index ``factsets``),
      e.g. to log the progress of a long search. Only fresh evaluations are
      reported, not those taken from ``known``.
    known: one ``{width: accuracy}`` per fact set, measured before (e.g. by
      an interrupted search, as ``on_round`` reported them): those widths
      are not evaluated again, so a search resumes where it stopped (the
      search is deterministic given the accuracies). Batched methods only.
    code_dim: ``encoder_decoder_gd`` only: its fixed code dim, one for all
      fact sets or one per fact set (default: :func:`gd_code_dim` of each
      fact set and its key). Fact set ``j`` trains with the decoder the
      construction draws for ``keys[j]`` at that code dim, which
      :func:`gd_code_dim` certifies (a code dim given here is not checked).
    keep_models: GD methods only: keep each search's smallest passing model
      as ``Capacity.model``, so the model at ``W*`` need not be trained
      again (:func:`smallest_mlp`).

  Returns:
    One :class:`Capacity` per fact set.
  """
  _check_method(method)
  if len(factsets) != len(keys) or not factsets:
    raise FactStoreError(
        f'need one key per fact set, got {len(keys)} keys for '
        f'{len(factsets)} fact sets')
  n, dim = factsets[0].keys.shape
  num_values = factsets[0].values.shape[0]
  for fs in factsets:
    if fs.keys.shape != (n, dim) or fs.values.shape[0] != num_values:
      raise FactStoreError('find_capacity needs fact sets of equal shapes')
  report = on_round or (lambda members, widths, accs: None)
  if known is not None and len(known) != len(factsets):
    raise FactStoreError(f'need one known dict per fact set, got '
                         f'{len(known)} for {len(factsets)} fact sets')
  if method == 'encoder_decoder' and known and any(known):
    raise FactStoreError('known accuracies are for the batched methods; the '
                         'closed form also needs each width\'s parameters')
  code_dims = _check_code_dims(method, code_dim, len(factsets), dim)
  if keep_models and method not in _GD_METHODS:
    raise FactStoreError(f'keep_models is for the GD methods, not {method!r}')
  if method == 'encoder_decoder':
    return [_closed_form_capacity(
        k, fs, options, max_width or dim, start or min(16, dim), rel_tol,
        lambda widths, accs, i=i: report([i] * len(widths), widths, accs))
            for i, (k, fs) in enumerate(zip(keys, factsets))]
  if method == 'encoder_decoder_gd' and code_dims is None:
    code_dims = [gd_code_dim(k, fs) for k, fs in zip(keys, factsets)]
  if max_width is None:
    # Random features need the most units (NTK ~N log N / d); GD's training
    # cost grows with the width searched, the baselines' hardly.
    max_width = (8 if method in _GD_METHODS else 64) * dim
  if start is None:
    # Guess: GD-like methods need about 8 parameters per fact.
    start = int(np.clip(8 * n / (3 * dim), 1, max_width))

  kept = [{} for _ in factsets]  # member -> {smallest passing width: model}

  def evaluate(members, widths):
    accs = [None if known is None else known[m].get(w)
            for m, w in zip(members, widths)]
    todo = [j for j, a in enumerate(accs) if a is None]
    if todo:
      fresh = evaluate_batched(
          method, [keys[members[j]] for j in todo],
          [factsets[members[j]] for j in todo], [widths[j] for j in todo],
          options=options, code_dims=None if code_dims is None else
          [code_dims[members[j]] for j in todo], keep_models=keep_models)
      models = [None] * len(todo)
      if keep_models:
        fresh, models = fresh
      for j, a, model in zip(todo, fresh, models):
        accs[j] = float(a)
        m, w = members[j], widths[j]
        if model is not None and a >= threshold and w < min(kept[m],
                                                            default=w + 1):
          kept[m] = {w: model}
      report([members[j] for j in todo], [widths[j] for j in todo],
             [accs[j] for j in todo])
    return np.asarray(accs, np.float64)

  found = capacity.search_widths(
      evaluate, [start] * len(factsets), max_width=max_width,
      threshold=threshold, batch=batch, rel_tol=rel_tol)
  code_dims = code_dims or [None] * len(found)
  return [Capacity(method, r.width,
                   None if r.width is None else width_params(
                       method, dim, r.width, code_dim=m),
                   r.tested, r.rounds, m, model=k.get(r.width))
          for r, m, k in zip(found, code_dims, kept)]


def _check_code_dims(method, code_dim, num_sets, dim) -> list[int] | None:
  """``find_capacity``'s ``code_dim`` as one int per fact set (or None)."""
  if code_dim is None:
    return None
  dims = (list(code_dim) if isinstance(code_dim, (list, tuple))
          else [code_dim] * num_sets)
  if method != 'encoder_decoder_gd' or len(dims) != num_sets or any(
      isinstance(m, bool) or not isinstance(m, (int, np.integer))
      or not 1 <= m <= dim for m in dims):
    raise FactStoreError(
        f'code_dim={code_dim} is for encoder_decoder_gd: an int in [1, d = '
        f'{dim}] or one per fact set ({num_sets}) (method {method!r})')
  return [int(m) for m in dims]


def gd_code_dim(key, fs: FactSet) -> int:
  """The code dimension the closed form would pick for ``fs`` and ``key``.

  Its decoder, ``construction_decoder(key, d, m)``, leaves every used value
  of ``fs`` decodable (``rho`` above the construction's floor); encoder-
  decoder GD trains with that decoder.
  """
  # No patching: GD's decoder has no straggler columns.
  m = choose_code_dim(key, fs.values, np.asarray(fs.mapping),
                      ConstructionConfig(patch=0.0)).code_dim
  return int(m)


def _closed_form_capacity(key, fs, options, max_width, start, rel_tol,
                          report):
  reports: dict = {}

  def evaluate(widths):
    accs = []
    for m in widths:
      acc, reports[m] = _closed_form(key, fs, m, options)
      accs.append(float(acc))
    report(list(widths), accs)
    return accs

  r = capacity.search_width(evaluate, start=start, max_width=max_width,
                            rel_tol=rel_tol)
  if r.width is None:
    return Capacity('encoder_decoder', None, None, r.tested, r.rounds, None)
  # With patched stragglers the count is not monotone in the code dim: a
  # smaller m can cost more (more patched values). W* is the smallest count
  # among the tested code dims that store every fact.
  stored = [w for w, acc in r.tested.items()
            if acc >= 1.0 and reports.get(w) is not None]
  best = min(stored, key=lambda w: (reports[w].num_params, w))
  return Capacity('encoder_decoder', best, reports[best].num_params, r.tested,
                  r.rounds, None, reports[best].as_dict())


class Built(NamedTuple):
  """One MLP of a method at one width (:func:`build_mlp`)."""
  mlp: object            # GatedMLP or EncoderDecoder
  num_params: int
  accuracy: float        # standalone storage accuracy on the fact set
  min_margin: float


def build_mlp(method: str, key, factset: FactSet, width: int, *,
              options: MethodOptions = MethodOptions(),
              code_dim: int | None = None) -> Built:
  """The MLP ``method`` builds (or trains) at ``width``, unmasked.

  The knob is the one :func:`find_capacity` searches (the closed form's
  code dim; hidden width otherwise). ``encoder_decoder_gd`` uses ``code_dim``
  (default: :func:`gd_code_dim`) and the construction's decoder for ``key``
  at that code dim, as :func:`find_capacity` does. A closed form that
  cannot certify storage at ``width`` raises ``ConstructionError``.
  """
  _check_method(method)
  if int(width) < 1:
    raise FactStoreError(f'width must be >= 1, got {width}')
  width = int(width)
  dim = factset.keys.shape[-1]
  if method == 'encoder_decoder':
    built = construct(key, factset, closed_form_config(options, width))
    return Built(built.model, built.report.num_params, built.report.accuracy,
                 built.report.min_margin)
  if method == 'gd':
    mlp = training.train_mlp(key, factset, width, config=options.train).params
  elif method == 'encoder_decoder_gd':
    code_dim = code_dim or gd_code_dim(key, factset)
    mlp = training.train_encoder_decoder(
        key, factset, width, code_dim, config=options.train,
        decoder=construction_decoder(key, dim, code_dim,
                                     factset.keys.dtype)).params
  elif method == 'ntk':
    mlp = ntk.ntk_mlp(key, factset, width, degree=options.degree)
  else:
    readout = 'ridge' if method == 'hebbian_ridge' else 'data_dependent'
    with single_threaded_blas():
      mlp = jax.block_until_ready(hebbian.hebbian_mlp(
          key, factset, width, readout=readout, ridge=options.ridge))
  report = storage.evaluate_fn(mlp, factset)
  return Built(mlp, width_params(method, dim, width, code_dim=code_dim),
               float(report.accuracy), float(report.min_margin))


def smallest_mlp(method: str, key, factset: FactSet, *,
                 options: MethodOptions = MethodOptions(),
                 rel_tol: float = 0.0, max_width: int | None = None,
                 known: Sequence[Mapping[int, float]] | None = None,
                 on_round: Callable[[list[int], list[int], list[float]],
                                    None] | None = None
                 ) -> tuple[Built, Capacity]:
  """The MLP at ``method``'s ``W*`` on ``factset`` (one seed), built.

  Searches with :func:`find_capacity`. A GD method's search keeps the model
  it trained at ``W*`` (``keep_models``), re-certified here on ``factset``;
  otherwise (the closed form, a ``W*`` taken from ``known``) the MLP is
  built at the found width. If that model misses a fact (GD noise between
  the search's evaluation and this one), the width grows by one, rebuilt,
  until it stores every fact, up to the largest width the search tested
  (check ``Built.accuracy``). ``known`` and ``on_round`` go to
  :func:`find_capacity` (e.g. a
  :class:`~factstore_jax.capacity.rounds.RoundLog`'s, to resume a killed
  search).

  Raises:
    ConstructionError: no width up to ``max_width`` stores the fact set.
  """
  cap = find_capacity(method, [key], [factset], options=options,
                      rel_tol=rel_tol, max_width=max_width, known=known,
                      on_round=on_round,
                      keep_models=method in _GD_METHODS)[0]
  if cap.width is None:
    raise ConstructionError(
        f'{method}: no width up to the search maximum stores all '
        f'{factset.keys.shape[0]} facts')
  width = cap.width
  top = max(cap.tested)
  if cap.model is not None:
    report = storage.evaluate_fn(cap.model, factset)
    kept = Built(cap.model, cap.num_params, float(report.accuracy),
                 float(report.min_margin))
    if kept.accuracy >= 1.0 or width >= top:
      return kept, cap
    width += 1
  while True:
    built = build_mlp(method, key, factset, width, options=options,
                      code_dim=cap.code_dim)
    if built.accuracy >= 1.0 or width >= top:
      return built, cap
    width += 1
