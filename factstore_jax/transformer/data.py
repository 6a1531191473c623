"""Vocabulary and the ``junk^L K junk^L Q -> V`` recall task.

See docs/design.md, "Transformers and usability".

Token embeddings are tied and frozen: the fact keys and values *are* rows of
the embedding table. Layout of the ``V`` rows::

  [0, N)             fact keys (for a tied fact set also its values)
  [N, N + P')        values that are not keys (P' = 0 when tied)
  [.., .. + J)       junk tokens (random unit vectors)
  V - 1              the query token Q (a random unit vector)

Decoding is over the whole vocabulary, so an MLP meant for the Transformer is
built for :func:`vocab_factset`: its keys are the key rows and its value table
is the whole embedding table.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from factstore_jax import factsets
from factstore_jax.errors import FactStoreError
from factstore_jax.factsets import FactSet

Array = jax.Array


class Vocabulary(NamedTuple):
  """Frozen token embeddings and where each kind of token lives (a pytree)."""
  embeddings: Array   # (V, d)
  key_ids: Array      # (N,) int32: token of fact key i
  value_ids: Array    # (P,) int32: token of value j
  junk_ids: Array     # (J,) int32

  @property
  def size(self) -> int:
    return self.embeddings.shape[0]

  @property
  def query_id(self) -> int:
    return self.embeddings.shape[0] - 1

  @property
  def dim(self) -> int:
    return self.embeddings.shape[1]


class Batch(NamedTuple):
  tokens: Array    # (B, 2L + 2) int32: junk^L K junk^L Q
  targets: Array   # (B,) int32: the token to emit at Q
  facts: Array     # (B,) int32: which fact each sequence asks for


def is_tied(factset: FactSet) -> bool:
  """Whether the value table is the first ``P`` keys (host-side check)."""
  keys, values = np.asarray(factset.keys), np.asarray(factset.values)
  return (values.shape[0] <= keys.shape[0] and
          np.array_equal(values, keys[:values.shape[0]]))


def make_vocabulary(key: Array, factset: FactSet, num_junk: int = 4, *,
                    tied: bool | None = None) -> Vocabulary:
  """Embedding table for ``factset`` plus ``num_junk`` junk tokens and Q.

  Args:
    key: PRNG key for the junk and query embeddings (unit vectors).
    factset: keys ``(N, d)``, values ``(P, d)``, mapping ``(N,)``.
    num_junk: ``J >= 1`` junk tokens.
    tied: whether values are the first ``P`` keys (one token each); ``None``
      checks the arrays.

  Returns:
    :class:`Vocabulary` with ``V = N + P' + J + 1`` rows.
  """
  if factset.keys.ndim != 2:
    raise FactStoreError(
        f'make_vocabulary needs one (unstacked) fact set, got keys of shape '
        f'{factset.keys.shape}')
  if num_junk < 1:
    raise FactStoreError(f'num_junk must be >= 1, got {num_junk}')
  tied = is_tied(factset) if tied is None else tied
  if tied and not is_tied(factset):
    raise FactStoreError('tied=True but the values are not the first P keys')
  n, d = factset.keys.shape
  p = factset.num_values
  dtype = factset.keys.dtype
  extra = factsets.sample_sphere(key, num_junk + 1, d, dtype=dtype)
  rows = [factset.keys] + ([] if tied else [factset.values]) + [extra]
  value_ids = np.arange(p) if tied else n + np.arange(p)
  start = n + (0 if tied else p)
  return Vocabulary(
      embeddings=jnp.concatenate(rows, axis=0),
      key_ids=jnp.arange(n, dtype=jnp.int32),
      value_ids=jnp.asarray(value_ids, jnp.int32),
      junk_ids=jnp.arange(start, start + num_junk, dtype=jnp.int32))


def fact_targets(vocab: Vocabulary, mapping: Array) -> Array:
  """``(N,)`` token ids of each fact's value: ``value_ids[mapping]``."""
  mapping = jnp.asarray(mapping, jnp.int32)
  if mapping.shape != vocab.key_ids.shape:
    raise FactStoreError(
        f'mapping has shape {mapping.shape}, expected {vocab.key_ids.shape}')
  return vocab.value_ids[mapping]


def copy_targets(vocab: Vocabulary) -> Array:
  """``(N,)`` token ids of the key-copy task: each key maps to itself."""
  return vocab.key_ids


def vocab_factset(vocab: Vocabulary, mapping: Array) -> FactSet:
  """The fact set an MLP in the Transformer must store: key rows -> tokens.

  Keys ``(N, d)`` are the key embeddings, the value table ``(V, d)`` is the
  whole embedding table and ``mapping (N,)`` holds value *token* ids, so a
  margin on this fact set is a margin over the whole vocabulary.
  """
  return FactSet(vocab.embeddings[vocab.key_ids], vocab.embeddings,
                 fact_targets(vocab, mapping))


def _check_task(vocab: Vocabulary, targets: Array, context_len: int) -> None:
  if context_len < 0:
    raise FactStoreError(f'context_len must be >= 0, got {context_len}')
  if targets.shape != vocab.key_ids.shape:
    raise FactStoreError(
        f'targets has shape {targets.shape}, expected {vocab.key_ids.shape} '
        '(one target token per fact)')


def sequences(key: Array, vocab: Vocabulary, targets: Array, facts: Array,
              context_len: int) -> Batch:
  """Sequences ``junk^L K junk^L Q`` asking for the given ``facts (B,)``.

  Junk tokens are drawn uniformly from the junk vocabulary.
  """
  _check_task(vocab, targets, context_len)
  b = facts.shape[0]
  junk = jax.random.choice(key, vocab.junk_ids, (b, 2, context_len))
  query = jnp.full((b, 1), vocab.query_id, jnp.int32)
  tokens = jnp.concatenate(
      [junk[:, 0], vocab.key_ids[facts][:, None], junk[:, 1], query], axis=1)
  return Batch(tokens.astype(jnp.int32), targets[facts], facts)


def sample_batch(key: Array, vocab: Vocabulary, targets: Array,
                 batch_size: int, context_len: int) -> Batch:
  """A fresh batch: facts uniform over ``[0, N)`` (jit-able, on device).

  Args:
    key: PRNG key.
    vocab: the :class:`Vocabulary`.
    targets: ``(N,)`` target token of each fact (:func:`fact_targets` or
      :func:`copy_targets`).
    batch_size: ``B`` (static).
    context_len: ``L`` junk tokens before and after the key (static).

  Returns:
    :class:`Batch` of ``B`` sequences of length ``2L + 2``.
  """
  if batch_size < 1:
    raise FactStoreError(f'batch_size must be >= 1, got {batch_size}')
  k_fact, k_junk = jax.random.split(key)
  facts = jax.random.randint(k_fact, (batch_size,), 0,
                             vocab.key_ids.shape[0], jnp.int32)
  return sequences(k_junk, vocab, targets, facts, context_len)
