"""Training and evaluation of the 1-layer Transformer.

See docs/design.md, "Transformers and usability".

:func:`train` runs Optax AdamW on the chosen parameter groups in jitted
chunks of ``lax.scan`` steps, each step on a fresh on-device batch, with an
evaluation on a fresh batch after every chunk (early stop at a target
accuracy). :func:`recall` measures accuracy at the query over every fact in
several random contexts; :func:`key_delivery` measures how far the MLP's
input ``norm(h_Q)`` is from the key embedding (the attention noise floor).

The two schedules are :func:`schedule_a` (train attention on key copy with
the identity MLP, then insert the fact MLP untouched) and
:func:`schedule_b` (train attention through the frozen fact MLP).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from factstore_jax import storage
from factstore_jax.errors import FactStoreError
from factstore_jax.transformer import data as data_lib
from factstore_jax.transformer.model import Transformer, group_filter

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TransformerTrainConfig:
  """Settings of :func:`train`.

  Attributes:
    groups: parameter groups that train (see ``model.GROUPS``).
    learning_rate: AdamW peak rate (cosine decay to ``final_fraction`` of it).
    final_fraction: final rate / peak rate.
    weight_decay: AdamW decoupled weight decay.
    max_steps: step budget.
    chunk_steps: steps per jitted chunk (one evaluation per chunk).
    batch_size: sequences per step.
    context_len: ``L`` junk tokens on each side of the key.
    target_accuracy: stop once a fresh evaluation batch reaches it
      (``None``: always run ``max_steps``).
    eval_batch_size: sequences per evaluation.
    logit_scale: logits are multiplied by it inside the loss (a fixed
      temperature; decoding is unaffected).
  """
  groups: tuple[str, ...] = ('qk',)
  learning_rate: float = 3e-2
  final_fraction: float = 0.1
  weight_decay: float = 0.0
  max_steps: int = 3_000
  chunk_steps: int = 100
  batch_size: int = 256
  context_len: int = 4
  target_accuracy: float | None = None
  eval_batch_size: int = 1_024
  logit_scale: float = 1.0

  def check(self) -> None:
    group_filter(self.groups)
    ints = dict(max_steps=self.max_steps, chunk_steps=self.chunk_steps,
                batch_size=self.batch_size,
                eval_batch_size=self.eval_batch_size)
    for name, value in ints.items():
      if value < 1:
        raise FactStoreError(f'{name} must be >= 1, got {value}')
    if self.context_len < 0:
      raise FactStoreError(f'context_len must be >= 0, got {self.context_len}')
    if not self.learning_rate > 0 or not 0 <= self.final_fraction <= 1:
      raise FactStoreError(
          f'need learning_rate > 0 and 0 <= final_fraction <= 1, got '
          f'{self.learning_rate}, {self.final_fraction}')
    if not self.weight_decay >= 0 or not self.logit_scale > 0:
      raise FactStoreError(
          f'need weight_decay >= 0 and logit_scale > 0, got '
          f'{self.weight_decay}, {self.logit_scale}')
    if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
      raise FactStoreError(
          f'target_accuracy must be in (0, 1], got {self.target_accuracy}')


class TrainReport(NamedTuple):
  steps: int
  loss: list            # mean training loss of each chunk
  eval_accuracy: list   # accuracy on a fresh batch after each chunk
  reached_target: bool
  seconds: float


def query_loss(model: Transformer, tokens: Array, targets: Array,
               logit_scale: float = 1.0) -> tuple[Array, Array]:
  """Cross-entropy and accuracy at the last position: ``tokens (B, T)``."""
  logits = model(tokens, last_only=True)[:, 0]
  loss = optax.softmax_cross_entropy_with_integer_labels(
      logits * logit_scale, targets).mean()
  accuracy = storage.accuracy(jnp.argmax(logits, -1) == targets)
  return loss, accuracy


def _check_targets(vocab: data_lib.Vocabulary, targets: Array) -> Array:
  targets = jnp.asarray(targets, jnp.int32)
  if targets.shape != vocab.key_ids.shape:
    raise FactStoreError(
        f'targets has shape {targets.shape}, expected {vocab.key_ids.shape}')
  bad = np.flatnonzero((np.asarray(targets) < 0) |
                       (np.asarray(targets) >= vocab.size))
  if bad.size:
    raise FactStoreError(
        f'targets must be token ids in [0, {vocab.size}); fact {bad[0]} has '
        f'{int(targets[bad[0]])}')
  return targets


def train(model: Transformer, key: Array, vocab: data_lib.Vocabulary,
          targets: Array,
          config: TransformerTrainConfig = TransformerTrainConfig(), *,
          progress: bool = False) -> TrainReport:
  """Trains ``config.groups`` of ``model`` in place on the recall task.

  Args:
    model: the :class:`Transformer` (updated in place).
    key: PRNG key for the batches.
    vocab: its :class:`~factstore_jax.transformer.data.Vocabulary`.
    targets: ``(N,)`` token to emit for each fact (``data.fact_targets`` or
      ``data.copy_targets``).
    config: :class:`TransformerTrainConfig`.
    progress: show a tqdm bar.

  Returns:
    :class:`TrainReport`.
  """
  config.check()
  targets = _check_targets(vocab, targets)

  def loss_fn(m, batch):
    return query_loss(m, batch.tokens, batch.targets, config.logit_scale)

  def sample(key, size):
    return data_lib.sample_batch(key, vocab, targets, size, config.context_len)

  return fit_groups(model, key, loss_fn, sample, config, progress=progress,
                    desc='train attention')


def fit_groups(model: nnx.Module, key: Array, loss_fn, sample,
               config: TransformerTrainConfig, *, progress: bool = False,
               desc: str = 'train', grad_map=None) -> TrainReport:
  """Trains ``config.groups`` of ``model`` in place on any batch task.

  The loop behind :func:`train`: AdamW with cosine decay over jitted
  ``lax.scan`` chunks of ``config.chunk_steps`` steps, a fresh batch per step,
  an evaluation on a fresh batch of ``config.eval_batch_size`` after each
  chunk, early stop at ``config.target_accuracy``. (``config.context_len``
  and ``config.logit_scale`` are the caller's business.)

  Args:
    model: the module (updated in place); its parameter groups are those of
      :func:`~factstore_jax.transformer.model.group_filter`.
    key: PRNG key for the batches.
    loss_fn: ``(model, batch) -> (loss, accuracy)`` scalars, traceable.
    sample: ``(key, size) -> batch`` (a pytree), traceable; ``size`` static.
    config: :class:`TransformerTrainConfig`.
    progress: show a tqdm bar labelled ``desc``.
    grad_map: optional ``grads -> grads`` applied before AdamW (e.g. a mask
      that freezes blocks of a matrix: a zero gradient gives a zero update).
  """
  config.check()
  graphdef, params, rest = nnx.split(model, group_filter(config.groups), ...)
  if not jax.tree.leaves(params):
    raise FactStoreError(f'groups {config.groups} hold no parameters')
  schedule = optax.cosine_decay_schedule(
      config.learning_rate, config.max_steps, config.final_fraction)
  opt = optax.adamw(schedule, weight_decay=config.weight_decay)

  def merged_loss(params, rest, batch):
    return loss_fn(nnx.merge(graphdef, params, rest), batch)

  @functools.partial(jax.jit, static_argnums=4)
  def chunk(params, opt_state, rest, key, num_steps):
    def step(carry, k):
      params, opt_state = carry
      (loss, _), grads = jax.value_and_grad(merged_loss, has_aux=True)(
          params, rest, sample(k, config.batch_size))
      if grad_map is not None:
        grads = grad_map(grads)
      updates, opt_state = opt.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    k_steps, k_eval = jax.random.split(key)
    (params, opt_state), losses = jax.lax.scan(
        step, (params, opt_state),
        jax.random.split(k_steps, num_steps))
    _, accuracy = merged_loss(params, rest,
                              sample(k_eval, config.eval_batch_size))
    return params, opt_state, jnp.mean(losses), accuracy

  start = time.perf_counter()
  opt_state = opt.init(params)
  losses, accuracies, steps, reached = [], [], 0, False
  num_chunks = -(-config.max_steps // config.chunk_steps)
  with tqdm(total=config.max_steps, disable=not progress,
            desc=desc, unit='step') as bar:
    for i in range(num_chunks):
      # The last chunk is shorter when chunk_steps does not divide max_steps.
      num_steps = min(config.chunk_steps, config.max_steps - steps)
      params, opt_state, loss, accuracy = chunk(
          params, opt_state, rest, jax.random.fold_in(key, i), num_steps)
      steps += num_steps
      losses.append(float(loss))
      accuracies.append(float(accuracy))
      bar.update(num_steps)
      bar.set_postfix(loss=f'{losses[-1]:.4f}', acc=f'{accuracies[-1]:.4f}')
      if (config.target_accuracy is not None and
          accuracies[-1] >= config.target_accuracy):
        reached = True
        break
  nnx.update(model, params)
  return TrainReport(steps, losses, accuracies, reached,
                     time.perf_counter() - start)


def _all_facts(vocab: data_lib.Vocabulary, contexts_per_fact: int,
               batch_size: int) -> list[np.ndarray]:
  if contexts_per_fact < 1 or batch_size < 1:
    raise FactStoreError(
        f'contexts_per_fact and batch_size must be >= 1, got '
        f'{contexts_per_fact}, {batch_size}')
  facts = np.tile(np.arange(vocab.key_ids.shape[0], dtype=np.int32),
                  contexts_per_fact)
  return [facts[i:i + batch_size] for i in range(0, facts.size, batch_size)]


class Recall(NamedTuple):
  accuracy: float        # over every (fact, context) pair
  per_fact: np.ndarray   # (N,) fraction of contexts answered correctly


def recall(model: Transformer, key: Array, vocab: data_lib.Vocabulary,
           targets: Array, *, context_len: int = 4, contexts_per_fact: int = 4,
           batch_size: int = 4_096) -> Recall:
  """Recall at the query for every fact in ``contexts_per_fact`` contexts."""
  targets = _check_targets(vocab, targets)
  graphdef, state = nnx.split(model)

  @jax.jit
  def correct(state, k, facts):
    m = nnx.merge(graphdef, state)
    b = data_lib.sequences(k, vocab, targets, facts, context_len)
    return jnp.argmax(m(b.tokens, last_only=True)[:, 0], -1) == b.targets

  n = vocab.key_ids.shape[0]
  hits = np.zeros(n)
  for i, facts in enumerate(_all_facts(vocab, contexts_per_fact, batch_size)):
    ok = np.asarray(correct(state, jax.random.fold_in(key, i), facts))
    np.add.at(hits, facts, ok)
  per_fact = hits / contexts_per_fact
  return Recall(float(per_fact.mean()), per_fact)


def key_delivery(model: Transformer, key: Array, vocab: data_lib.Vocabulary,
                 *, context_len: int = 4, contexts_per_fact: int = 4,
                 batch_size: int = 4_096) -> tuple[np.ndarray, np.ndarray]:
  """The MLP's inputs at the query and their distance to the true key.

  Returns:
    ``(inputs (M, d), distances (M,))`` with ``M = N * contexts_per_fact``:
    ``inputs`` = ``norm(h_Q)`` and ``distances = ||norm(h_Q) - k||``.
  """
  graphdef, state = nnx.split(model)
  dummy = vocab.key_ids

  @jax.jit
  def delivered(state, k, facts):
    m = nnx.merge(graphdef, state)
    b = data_lib.sequences(k, vocab, dummy, facts, context_len)
    _, z = m.mlp_inputs(b.tokens, last_only=True)
    z = z[:, 0]
    return z, jnp.linalg.norm(z - vocab.embeddings[vocab.key_ids[facts]], axis=-1)

  zs, ds = [], []
  for i, facts in enumerate(_all_facts(vocab, contexts_per_fact, batch_size)):
    z, dist = delivered(state, jax.random.fold_in(key, i), facts)
    zs.append(np.asarray(z))
    ds.append(np.asarray(dist))
  return np.concatenate(zs), np.concatenate(ds)


def _check_frozen_mlp(config: TransformerTrainConfig) -> None:
  if 'mlp' in config.groups:
    raise FactStoreError(
        "the fact MLP stays frozen in both schedules: drop 'mlp' from "
        f'groups {config.groups}')


def schedule_a(model: Transformer, key: Array, vocab: data_lib.Vocabulary,
               fact_mlp,
               config: TransformerTrainConfig = TransformerTrainConfig(), *,
               progress: bool = False) -> TrainReport:
  """Schedule (a): train on key copy with the identity MLP, then insert.

  The model's MLP slot is set to the identity, ``config.groups`` train on
  emitting the key token itself, then ``fact_mlp`` is plugged in with no
  further training. Returns the key-copy :class:`TrainReport`.
  """
  _check_frozen_mlp(config)
  model.swap_mlp(None)
  report = train(model, key, vocab, data_lib.copy_targets(vocab), config,
                 progress=progress)
  model.swap_mlp(fact_mlp)
  return report


def schedule_b(model: Transformer, key: Array, vocab: data_lib.Vocabulary,
               fact_mlp, targets: Array,
               config: TransformerTrainConfig = TransformerTrainConfig(),
               *, progress: bool = False) -> TrainReport:
  """Schedule (b): insert the frozen ``fact_mlp``, then train through it."""
  _check_frozen_mlp(config)
  model.swap_mlp(fact_mlp)
  return train(model, key, vocab, targets, config, progress=progress)
