"""Gradient-descent training of fact-storing MLPs (Optax, jitted, vmappable).

Loss: cross-entropy over the whole value table on logits ``g(k) V^T`` (or MSE
to ``v_f(i)``); Adam with cosine decay (reference point ``1e-3 -> 1e-6`` over
``max_steps``). The loop is one jitted program: a ``lax.while_loop`` over
chunks of ``lax.scan`` steps that stops at the target accuracy, at
``loss <= loss_tol`` or when the run is hopeless (the accuracy gained over
the last ``patience`` steps per unit of learning rate spent, extrapolated
linearly over the learning rate the schedule has left, cannot reach the
target; gains per unit of learning rate shrink as training goes on, so the
extrapolation is optimistic). Parameters freeze at the first step that meets the
target, so the result is the first MLP that stores the facts. Everything is a
pure function of its inputs: ``vmap`` over seeds and stacked fact sets works,
and under ``vmap`` finished members stop updating while others go on.

Models trained (both are pytrees of named arrays; ``trainable`` names the
fields that get gradients, the value table is never trained):

* :class:`~factstore_jax.mlp.GatedMLP` ``[(x U + b_u) * act(x G + b_g)] W + b``;
* :class:`~factstore_jax.mlp.EncoderDecoder`
  ``D [((x U) * act(x G + b_g)) A]`` (encoder ``w_gate, b_gate, w_up,
  routing``; decoder ``decoder``).

Logits are computed in the cheaper association: with hidden features
``z (N, h)`` and read-out ``R (h, d)``, ``z (R V^T)`` when ``h < d``, else
``(z R) V^T`` (:func:`step_flops` counts the matmul FLOPs of that choice).

Widths sweep in one compiled program: ``hidden_mask (h,)`` zeroes hidden units,
and :func:`~factstore_jax.mlp.init_mlp` draws weights at the largest width with the scale
of the active width, so a masked run equals a run at the sliced width.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from factstore_jax import storage
from factstore_jax.constructions import decoders
from factstore_jax.errors import FactStoreError
from factstore_jax.factsets import FactSet
from factstore_jax.mlp import (EncoderDecoder, GatedMLPModule, get_activation,
                               hidden_mask, init_mlp)
from factstore_jax.precision import check_compute_dtype

Array = jax.Array
Model = Any  # GatedMLP | EncoderDecoder

# Why a run stopped (``TrainResult.stop_reason``).
MAX_STEPS, TARGET_REACHED, LOSS_TOL, HOPELESS = 0, 1, 2, 3
STOP_REASONS = ('max_steps', 'target_reached', 'loss_tol', 'hopeless')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Static training settings.

  Attributes:
    learning_rate, final_learning_rate: cosine decay from the first to the
      second over ``max_steps`` (Adam).
    max_steps: step budget.
    chunk_steps: steps per ``lax.scan`` chunk (stop checks run every step;
      the loop exits at the end of the chunk).
    loss: ``'xent'`` (cross-entropy over the value table) or ``'mse'``.
    batch_size: keys per step; ``None`` is full batch.
    target_accuracy: stop once storage accuracy reaches this.
    loss_tol: stop once the loss is at or below this.
    patience: window (steps) of the hopeless-run test: every ``patience``
      steps the accuracy gained over the window, divided by the summed
      learning rate of the window, is extrapolated over the summed learning
      rate the schedule has left; a run that cannot reach the target that
      way stops (a plateau is the zero-gain case). ``None`` disables it.
    early_stop: ``False`` runs exactly ``max_steps`` steps (no target,
      loss or hopeless stop; the plain baseline).
    compute_dtype: dtype of the training matmuls, e.g. ``'bfloat16'`` for
      mixed precision (parameters, Adam state and the softmax stay in the
      keys' dtype; logits accumulate in at least float32). ``None`` computes
      in the keys' dtype. Whatever it is, ``TrainResult.accuracy`` and
      ``min_margin`` are a certificate of the float32 (or float64) parameters
      computed at full matmul precision.
    logit_rows: rows of the ``(N, P)`` cross-entropy logits formed at a
      time (results equal up to summation order). ``None``: on CPU
      ``max(64, 2**20 // P)`` rows, so a block (4 MiB in float32) stays in
      cache: median steps/s +16% at ``N = P = 2048`` (512 rows), +30% at
      ``4096`` (256 rows), width 64; elsewhere all rows at once.
  """
  learning_rate: float = 1e-3
  final_learning_rate: float = 1e-6
  max_steps: int = 10_000
  chunk_steps: int = 100
  loss: str = 'xent'
  batch_size: int | None = None
  target_accuracy: float = 1.0
  loss_tol: float = 1e-7
  patience: int | None = 1_000
  early_stop: bool = True
  compute_dtype: str | None = None
  logit_rows: int | None = None

  def validate(self) -> 'TrainConfig':
    if not self.learning_rate > 0 or not self.final_learning_rate >= 0:
      raise FactStoreError(
          f'learning rates must be positive, got {self.learning_rate} -> '
          f'{self.final_learning_rate}')
    for name in ('max_steps', 'chunk_steps'):
      if getattr(self, name) < 1:
        raise FactStoreError(f'{name} must be >= 1, got {getattr(self, name)}')
    if self.loss not in ('xent', 'mse'):
      raise FactStoreError(f"loss must be 'xent' or 'mse', got {self.loss!r}")
    for name in ('batch_size', 'logit_rows'):
      value = getattr(self, name)
      if value is not None and (isinstance(value, bool)
                                or not isinstance(value, int) or value < 1):
        raise FactStoreError(f'{name} must be an int >= 1 or None, got '
                             f'{value!r}')
    if not 0 < self.target_accuracy <= 1:
      raise FactStoreError(
          f'target_accuracy must be in (0, 1], got {self.target_accuracy}')
    if self.patience is not None and self.patience < 1:
      raise FactStoreError(f'patience must be >= 1, got {self.patience}')
    check_compute_dtype(self.compute_dtype)
    return self


class TrainResult(NamedTuple):
  params: Model        # the trained model (same type as the initial one)
  steps: Array         # () int, optimiser steps taken
  accuracy: Array      # () storage accuracy of ``params`` on all keys
  min_margin: Array    # () minimum margin of ``params``
  loss: Array          # () training loss at the last step taken
  stop_reason: Array   # () int, index into ``STOP_REASONS``


class _State(NamedTuple):
  trainable: dict
  opt_state: Any
  step: Array
  mark_accuracy: Array   # accuracy at the last window mark
  rate: Array            # accuracy gained per unit of summed learning rate
                         # over the last full window
  done: Array
  reason: Array
  loss: Array


# --------------------------------------------------------------------------
# Models: hidden features and read-out.


@jax.custom_vjp
def _matmul_t(x: Array, x_t: Array, w: Array) -> Array:
  """``x @ w`` whose weight gradient reads ``x_t``, a materialised ``x^T``.

  Autodiff's ``x^T g`` is a dot contracting ``x``'s rows, which XLA:CPU runs
  outside its fast matmul kernel (measured ~3x slower on an (N, P) operand);
  for the keys, ``x_t`` is computed once, outside the training loop.
  Reverse mode only (no ``jvp``): used inside the training loss.
  """
  del x_t
  return x @ w


def _matmul_t_fwd(x, x_t, w):
  return x @ w, (x_t, w)


def _matmul_t_bwd(res, g):
  x_t, w = res
  return g @ w.T, jnp.zeros_like(x_t), x_t @ g


_matmul_t.defvjp(_matmul_t_fwd, _matmul_t_bwd)


def _transposed(x: Array) -> Array:
  """``x^T`` materialised (XLA would fold a plain transpose into the dot)."""
  return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


def _dense(x: Array, w: Array, x_t: Array | None) -> Array:
  """``x @ w``; given ``x_t`` (``x^T`` materialised), via ``_matmul_t``."""
  return x @ w if x_t is None else _matmul_t(x, x_t, w)


def _features(model: Model, x: Array, hidden_mask: Array | None,
              x_t: Array | None = None):
  """``(z (N, h'), readout (h', d), bias (d,) | None)`` with output ``z R + b``.

  ``x_t``: ``x^T`` materialised, for fast weight gradients (training loss).
  """
  act = get_activation(model.activation)
  gate = _dense(x, model.w_gate, x_t)
  if model.b_gate is not None:
    gate = gate + model.b_gate
  up = _dense(x, model.w_up, x_t)
  if getattr(model, 'b_up', None) is not None:
    up = up + model.b_up
  hidden = up * act(gate)
  if hidden_mask is not None:
    hidden = hidden * hidden_mask
  if model.KIND == 'encoder_decoder':  # the decoder stays a separate factor
    hidden_t = None if x_t is None else _transposed(hidden)
    return _dense(hidden, model.routing, hidden_t), model.decoder.T, None
  return hidden, model.w_down, model.b_down


def _head(model: Model, x: Array, values: Array, hidden_mask: Array | None,
          x_t: Array | None = None):
  """``(z (N, r), table (r, P), offset (P,) | None)``: logits ``z table + o``.

  Picks the cheaper association: ``z (R V^T)`` when ``h < d``, else
  ``(z R) V^T``.
  """
  z, readout, bias = _features(model, x, hidden_mask, x_t)
  if z.shape[-1] < readout.shape[-1]:
    table = readout @ values.T
  else:
    z_t = None if x_t is None else _transposed(z)
    z, table = _dense(z, readout, z_t), values.T
  return z, table, None if bias is None else values @ bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _xent_head(z: Array, table: Array, offset: Array | None, target: Array,
               block_rows: int):
  """Mean cross-entropy and accuracy of logits ``z table + offset``.

  ``z (N, r)``, ``table (r, P)``, ``offset (P,) | None``, ``target (N,)``;
  the ``(N, P)`` logits are formed ``block_rows`` rows at a time, so they
  stay in cache on CPU and never exist whole. A custom VJP keeps the work
  per block to one logits matmul, a row max, one pass writing
  ``exp(logits - max)`` (+ its row sums), a row count of the exponentials
  equal to 1, and the two gradient matmuls, which read those exponentials
  directly: with ``s_i = 1 / (N sum_j exp_ij)`` the logits' gradient is
  ``diag(s) exp - onehot / N``, so ``s`` scales the small operands and the
  one-hot part is a gather / segment sum (XLA's own derivative used a
  scatter and a transposed-operand matmul, twice as slow on CPU). The
  forward pass of the VJP computes the gradients (block by block, while
  the exponentials are in cache); the backward pass only scales them.
  Accuracy counts strict wins over every other value: the correct logit is
  the row max and no other exponential rounds to 1, so ties fail, and so
  does a win so small that ``exp`` of the gap rounds to 1 (below ~3e-8 in
  float32); the stored MLP's certificate is computed separately.
  """
  return _xent_blocks(z, table, offset, target, block_rows, False)[0]


def _wide(dtype):
  """Accumulation dtype of a matmul in ``dtype``: at least float32."""
  return jnp.promote_types(dtype, jnp.float32)


def _xent_rows(z, target, table, table_t, offset, n):
  """One block: ``z (b, r)``, ``target (b,)``; ``n``: the mean's count.

  Returns ``(loss_sum, wins)`` and, when ``table_t`` (``table^T``
  materialised) is given, the block's ``d_z (b, r)`` and the ``exp`` terms
  of ``d_table (r, P)`` and ``d_offset (P,) | None``.
  """
  wide = _wide(z.dtype)
  mm = lambda a, b: jnp.matmul(a, b, preferred_element_type=wide)
  logits = mm(z, table)
  if offset is not None:
    logits = logits + offset
  # Passes over the (b, P) logits besides the matmuls: a plain row max,
  # exp (+ its row sums), which the gradient matmuls read directly, and a
  # row sum of floor(exp), counting the logits that tie with the max. No
  # select on a one-hot mask: on CPU, reductions of selects (or compares)
  # leave the vectorised fused kernels (the whole head took ~2x longer).
  correct_logit = jnp.take_along_axis(logits, target[:, None], axis=1)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  exp = jnp.exp(logits - row_max)
  exp_sum = jnp.sum(exp, axis=-1, keepdims=True)
  at_max = jnp.sum(jnp.floor(exp), axis=-1, keepdims=True)
  loss_sum = jnp.sum(jnp.log(exp_sum) + row_max - correct_logit)
  wins = jnp.sum(((correct_logit == row_max) & (at_max == 1))
                 .astype(jnp.float32))
  if table_t is None:
    return loss_sum, wins
  # grad_logits = scale * exp - onehot / n, never formed.
  scale = 1.0 / (n * exp_sum)                                   # (b, 1)
  exp = exp.astype(z.dtype)  # no-op unless mixed precision
  d_z = mm(exp, table_t) * scale - table_t[target] / n
  # (r, b) materialised: otherwise XLA folds the transpose into the dot,
  # which then leaves the fast CPU matmul kernel (~1.5x slower).
  d_table = mm(_transposed((z * scale).astype(z.dtype)), exp)
  d_offset = None if offset is None else mm(scale.T.astype(z.dtype), exp)[0]
  return loss_sum, wins, d_z, d_table, d_offset


def _xent_blocks(z, table, offset, target, block_rows, grads):
  """``((loss, accuracy), (d_z, d_table, d_offset) | None)``.

  Full blocks of ``block_rows`` rows run in a ``lax.scan`` (the weight
  gradients accumulate in its carry), the remainder in one more call.
  """
  n, r = z.shape
  p = table.shape[1]
  table_t = _transposed(table) if grads else None
  rows = lambda zb, tb: _xent_rows(zb, tb, table, table_t, offset, n)
  full = n // block_rows
  cut = full * block_rows
  parts = []                                       # summed below
  if full > 1:
    xs = (z[:cut].reshape(full, block_rows, r),
          target[:cut].reshape(full, block_rows))
    if grads:
      wide = _wide(z.dtype)
      zero = (jnp.zeros((r, p), wide),
              None if offset is None else jnp.zeros((p,), wide))

      def body(acc, block):
        loss_sum, wins, d_z, d_table, d_offset = rows(*block)
        acc = (acc[0] + d_table,
               None if d_offset is None else acc[1] + d_offset)
        return acc, (loss_sum, wins, d_z)

      (d_table, d_offset), (loss_sum, wins, d_z) = jax.lax.scan(
          body, zero, xs)
      parts.append((loss_sum.sum(), wins.sum(), d_z.reshape(cut, r),
                    d_table, d_offset))
    else:
      loss_sum, wins = jax.lax.map(lambda block: rows(*block), xs)
      parts.append((loss_sum.sum(), wins.sum()))
  else:
    cut = 0
  if cut < n:
    parts.append(rows(z[cut:], target[cut:]))
  loss = sum(part[0] for part in parts) / n
  accuracy = storage.fraction(sum(part[1] for part in parts), n)
  if not grads:
    return (loss, accuracy), None
  d_z = jnp.concatenate([part[2] for part in parts])
  d_table = sum(part[3] for part in parts) - jax.ops.segment_sum(
      z, target, num_segments=p).T / n
  d_offset = None if offset is None else (
      sum(part[4] for part in parts) - jnp.bincount(target, length=p) / n)
  return (loss, accuracy), (d_z, d_table, d_offset)


def _xent_head_fwd(z, table, offset, target, block_rows):
  out, (d_z, d_table, d_offset) = _xent_blocks(z, table, offset, target,
                                               block_rows, True)
  return out, (d_z.astype(z.dtype), d_table.astype(table.dtype),
               None if d_offset is None else d_offset.astype(offset.dtype))


def _xent_head_bwd(block_rows, grads, cotangents):
  del block_rows
  g = cotangents[0]  # scales the small results, not the (N, P) matrix
  return tuple(None if a is None else (a * g).astype(a.dtype)
               for a in grads) + (None,)


_xent_head.defvjp(_xent_head_fwd, _xent_head_bwd)


def model_outputs(model: Model, x: Array,
                  hidden_mask: Array | None = None) -> Array:
  """Outputs ``g(x) (N, d)`` of a GatedMLP or EncoderDecoder."""
  return _outputs(model, x, hidden_mask)


def _outputs(model, x, hidden_mask, x_t=None):
  z, readout, bias = _features(model, x, hidden_mask, x_t)
  out = _dense(z, readout, None if x_t is None else _transposed(z))
  return out if bias is None else out + bias


def step_flops(num_keys: int, dim: int, hidden_dim: int, num_values: int, *,
               code_dim: int | None = None) -> int:
  """Matmul FLOPs of one training step (forward + backward, no input grad).

  Counts only what the step needs: the value table is fixed (no gradient),
  keys need no gradient, logits in the cheaper association. ``code_dim``
  set means the encoder-decoder (read-out ``h -> m -> d``).
  """
  n, d, h, p = num_keys, dim, hidden_dim, num_values
  first = 2 * (2 * n * d * h)          # gate and up
  first_bwd = 2 * (2 * n * d * h)      # their weight gradients
  if code_dim is not None:
    m = code_dim
    mid = 2 * n * h * m * 2            # routing fwd + weight grad
    mid += 2 * n * h * m               # grad into hidden
    r, z_dim = m, m
  else:
    mid, r, z_dim = 0, h, h
  if z_dim < d:  # z (R V^T): table product, logits, two grads, R grad.
    head = 2 * r * d * p + 3 * (2 * n * z_dim * p) + 2 * r * p * d
  else:          # (z R) V^T
    head = 2 * (2 * n * z_dim * d) + 2 * (2 * n * d * p) + 2 * n * z_dim * d
  return first + first_bwd + mid + head


def _logit_rows(rows: int | None, num_keys: int, num_values: int) -> int:
  """Rows of the cross-entropy logits per block (``TrainConfig``)."""
  if rows is not None:
    return rows
  if jax.default_backend() == 'cpu':
    return max(64, 2**20 // num_values)
  return num_keys


def _loss_and_accuracy(model, x, values, target, loss, mask, x_t=None,
                       rows=None):
  if loss == 'xent':
    return _xent_head(*_head(model, x, values, mask, x_t), target,
                      _logit_rows(rows, x.shape[0], values.shape[0]))
  out = _outputs(model, x, mask, x_t)
  value = jnp.mean(jnp.sum((out - values[target]) ** 2, axis=-1))
  correct = storage.margins(out, values, target) > 0
  return value, storage.accuracy(correct)


def storage_loss(model: Model, factset: FactSet, *, loss: str = 'xent',
                 hidden_mask: Array | None = None) -> Array:
  """Training loss of ``model`` on ``factset``: ``()``.

  ``'xent'``: mean cross-entropy of logits ``g(k_i) V^T`` against ``f(i)``;
  ``'mse'``: mean ``||g(k_i) - v_f(i)||^2``.
  """
  keys, values, mapping = factset
  return _loss_and_accuracy(model, keys, values.astype(keys.dtype), mapping,
                            loss, hidden_mask)[0]


# --------------------------------------------------------------------------
# Initialisation.


def init_encoder_decoder(key: Array, dim: int, hidden_dim: int, code_dim: int,
                         *, width: int | Array | None = None,
                         activation: str = 'identity',
                         dtype=jnp.float32) -> EncoderDecoder:
  """Random encoder ``d -> h -> m`` and JL decoder ``D (d, m)``.

  Same nesting and width rule as :func:`~factstore_jax.mlp.init_mlp`; the decoder is
  :func:`~factstore_jax.constructions.decoders.jl_decoder`.
  """
  k_mlp, k_dec = jax.random.split(key)
  mlp = init_mlp(k_mlp, dim, hidden_dim, width=width,
                       activation=activation, gate_bias=True, dtype=dtype)
  k_route = jax.random.fold_in(k_mlp, 1)
  width = hidden_dim if width is None else width
  routing = (jax.random.normal(k_route, (hidden_dim, code_dim), dtype)
             / jnp.sqrt(jnp.asarray(width, dtype))
             * hidden_mask(hidden_dim, width, dtype)[:, None])
  return EncoderDecoder(
      w_gate=mlp.w_gate, b_gate=mlp.b_gate, w_up=mlp.w_up, routing=routing,
      decoder=decoders.jl_decoder(k_dec, dim, code_dim, dtype),
      activation=activation)


# --------------------------------------------------------------------------
# The loop.


def _check_fit_args(model, factset, trainable, config):
  config.validate()
  if getattr(model, 'KIND', None) not in ('gated_mlp', 'encoder_decoder'):
    raise FactStoreError(
        f'model must be a GatedMLP or EncoderDecoder, got {type(model).__name__}')
  fields = [f.name for f in dataclasses.fields(model) if f.name != 'activation']
  if not trainable:
    raise FactStoreError('trainable names no field; nothing would train')
  for name in trainable:
    if name not in fields:
      raise FactStoreError(
          f'trainable field {name!r} is not one of {fields}')
    if getattr(model, name) is None:
      raise FactStoreError(f'trainable field {name!r} is None in this model')
  keys, values, mapping = factset
  if keys.ndim != 2 or values.ndim != 2 or mapping.ndim != 1:
    raise FactStoreError(
        'fit takes one fact set: keys (N, d), values (P, d), mapping (N,); '
        f'got {keys.shape}, {values.shape}, {mapping.shape} (vmap over '
        'stacked fact sets instead)')
  if keys.shape[1] != model.w_gate.shape[0]:
    raise FactStoreError(
        f'keys have dim {keys.shape[1]} but the model takes '
        f'{model.w_gate.shape[0]}')
  if config.batch_size is not None and config.batch_size > keys.shape[0]:
    raise FactStoreError(
        f'batch_size {config.batch_size} exceeds the {keys.shape[0]} keys')


def _schedule(config: TrainConfig) -> optax.Schedule:
  return optax.cosine_decay_schedule(
      config.learning_rate, config.max_steps,
      alpha=config.final_learning_rate / config.learning_rate)


def optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """Adam with cosine decay ``learning_rate -> final_learning_rate``."""
  return optax.adam(_schedule(config))


def fit(model: Model, factset: FactSet, *,
        trainable: Sequence[str] | None = None,
        config: TrainConfig = TrainConfig(),
        hidden_mask: Array | None = None,
        key: Array | None = None) -> TrainResult:
  """Trains ``model`` to store ``factset`` (one fact set; ``vmap`` for more).

  Args:
    model: a GatedMLP or EncoderDecoder (its initial weights).
    factset: keys ``(N, d)``, values ``(P, d)``, mapping ``(N,)``.
    trainable: fields to train; default every weight and bias of a GatedMLP,
      the encoder of an EncoderDecoder.
    config: :class:`TrainConfig` (static).
    hidden_mask: optional ``(h,)`` 0/1 mask of active hidden units.
    key: PRNG key for minibatches (required when ``config.batch_size``).

  Returns:
    :class:`TrainResult`; ``params`` is the model at the stopping step.
  """
  if trainable is None:
    trainable = tuple(n for n in getattr(model, 'TRAINABLE', ())
                      if getattr(model, n, None) is not None)
  trainable = tuple(trainable)
  _check_fit_args(model, factset, trainable, config)
  if config.batch_size is not None and key is None:
    raise FactStoreError('minibatch training (batch_size set) needs a key')
  if key is None:
    key = jax.random.key(0)
  return _fit(model, factset, hidden_mask, key, trainable=trainable,
              config=config)


@jax.jit(static_argnames=('trainable', 'config'))
def _fit(model, factset, mask, key, *, trainable, config):
  keys, values, mapping = factset
  values = values.astype(keys.dtype)
  opt = optimizer(config)
  params0 = {n: getattr(model, n) for n in trainable}
  compute = keys.dtype if config.compute_dtype is None else jnp.dtype(
      config.compute_dtype)
  to_compute = lambda tree: jax.tree.map(lambda a: a.astype(compute), tree)
  keys_c, values_c, mask_c = to_compute((keys, values, mask))  # cast once
  keys_t = _transposed(keys_c)  # once, outside the loop

  def loss_fn(params, x, x_t, target):  # x (N, d): keys in the compute dtype
    loss, accuracy = _loss_and_accuracy(
        to_compute(model.replace(**params)), x, values_c, target,
        config.loss, mask_c, x_t, config.logit_rows)
    return loss.astype(keys.dtype), accuracy

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  # lr_spent[t]: summed learning rate of steps < t (the hopeless test).
  lr_spent = jnp.concatenate([jnp.zeros(1), jnp.cumsum(
      _schedule(config)(jnp.arange(config.max_steps)))])
  full_accuracy = lambda params: loss_fn(params, keys_c, keys_t, mapping)[1]

  def live_step(state: _State, step_key) -> _State:
    if config.batch_size is None:
      (loss, accuracy), grads = grad_fn(state.trainable, keys_c, keys_t,
                                        mapping)
    else:
      idx = jax.random.choice(step_key, keys.shape[0], (config.batch_size,),
                              replace=False)
      batch = keys_c[idx]
      (loss, _), grads = grad_fn(state.trainable, batch, _transposed(batch),
                                 mapping[idx])
      accuracy = full_accuracy(state.trainable)
    # Checks on the current params: stop before updating them.
    reached = accuracy >= config.target_accuracy
    small_loss = loss <= config.loss_tol
    window = config.patience or 1
    at_mark = (state.step > 0) & (state.step % window == 0)
    window_lr = lr_spent[state.step] - lr_spent[jnp.maximum(state.step - window,
                                                            0)]
    rate = jnp.where(at_mark, (accuracy - state.mark_accuracy) / window_lr,
                     state.rate)
    mark = jnp.where(at_mark | (state.step == 0), accuracy,
                     state.mark_accuracy)
    lr_left = lr_spent[-1] - lr_spent[state.step]
    hopeless = ((jnp.asarray(False) if config.patience is None else
                 (rate > -jnp.inf)) &
                (accuracy + jnp.maximum(rate, 0.0) * lr_left
                 < config.target_accuracy))
    stop = (reached | small_loss | hopeless) & config.early_stop
    reason = jnp.select([reached, small_loss, hopeless],
                        [TARGET_REACHED, LOSS_TOL, HOPELESS], MAX_STEPS)
    updates, opt_state = opt.update(grads, state.opt_state, state.trainable)
    updated = _State(
        trainable=optax.apply_updates(state.trainable, updates),
        opt_state=opt_state, step=state.step + 1,
        mark_accuracy=mark, rate=rate,
        done=state.step + 1 >= config.max_steps,
        reason=jnp.asarray(MAX_STEPS, jnp.int32), loss=loss)
    stopped = state._replace(done=jnp.asarray(True), reason=reason, loss=loss)
    return jax.tree.map(lambda a, b: jnp.where(stop, a, b), stopped, updated)

  def step(state: _State, step_key):
    # Finished (e.g. in the last chunk): skip the work (a select under vmap).
    return jax.lax.cond(state.done, lambda s, k: s, live_step, state,
                        step_key), None

  def chunk(carry):
    state, key = carry
    key, sub = jax.random.split(key)
    state, _ = jax.lax.scan(step, state,
                            jax.random.split(sub, config.chunk_steps))
    return state, key

  state = _State(
      trainable=params0, opt_state=opt.init(params0),
      step=jnp.asarray(0, jnp.int32), mark_accuracy=jnp.asarray(0.0),
      rate=jnp.asarray(-jnp.inf), done=jnp.asarray(False),
      reason=jnp.asarray(MAX_STEPS, jnp.int32),
      loss=jnp.asarray(jnp.inf, keys.dtype))
  state, _ = jax.lax.while_loop(lambda c: ~c[0].done, chunk, (state, key))
  trained = model.replace(**state.trainable)
  with jax.default_matmul_precision('highest'):  # the certificate
    gamma = storage.margins(model_outputs(trained, keys, mask), values,
                            mapping)
  return TrainResult(
      params=trained, steps=state.step,
      accuracy=storage.accuracy(gamma > 0),
      min_margin=jnp.min(gamma), loss=state.loss, stop_reason=state.reason)


# --------------------------------------------------------------------------
# Entry points.


def train_mlp(key: Array, factset: FactSet, hidden_dim: int, *,
              width: int | Array | None = None,
              config: TrainConfig = TrainConfig(),
              activation: str = 'identity', gate_bias: bool = False,
              up_bias: bool = False, down_bias: bool = False) -> TrainResult:
  """Trains a random gated MLP of hidden width ``hidden_dim`` (or the first
  ``width`` units of it; ``width`` may be traced) on ``factset``.

  The reference setting is ``activation='identity'`` (a bilinear MLP) with no
  biases. ``jax.vmap`` over ``key`` (seeds), ``factset`` (stacked) or
  ``width`` runs many trainings in one compiled program.
  """
  keys = factset.keys
  k_init, k_batch = jax.random.split(key)
  model = init_mlp(k_init, keys.shape[-1], hidden_dim, width=width,
                         activation=activation, gate_bias=gate_bias,
                         up_bias=up_bias, down_bias=down_bias,
                         dtype=keys.dtype)
  mask = None if width is None else hidden_mask(hidden_dim, width, keys.dtype)
  return fit(model, factset, config=config, hidden_mask=mask, key=k_batch)


def train_encoder_decoder(key: Array, factset: FactSet, hidden_dim: int,
                          code_dim: int, *, width: int | Array | None = None,
                          train: str = 'encoder',
                          config: TrainConfig = TrainConfig(),
                          activation: str = 'identity',
                          decoder: Array | None = None) -> TrainResult:
  """GD on the encoder-decoder architecture from random initialisation.

  ``train`` in ``{'encoder', 'decoder', 'both'}``; the decoder stays fixed
  unless trained. ``decoder (d, code_dim)`` replaces the random JL draw,
  e.g. the construction's certified one
  (:func:`~factstore_jax.constructions.encoder_decoder.construction_decoder`
  at the code dim :func:`~factstore_jax.methods.gd_code_dim` picks).
  """
  keys = factset.keys
  dim = keys.shape[-1]
  if decoder is not None and tuple(decoder.shape) != (dim, code_dim):
    raise FactStoreError(f'decoder must have shape (d, code_dim) = '
                         f'{(dim, code_dim)}, got {tuple(decoder.shape)}')
  k_init, k_batch = jax.random.split(key)
  model = init_encoder_decoder(k_init, dim, hidden_dim, code_dim,
                               width=width, activation=activation,
                               dtype=keys.dtype)
  if decoder is not None:
    model = model.replace(decoder=jnp.asarray(decoder, keys.dtype))
  mask = None if width is None else hidden_mask(hidden_dim, width, keys.dtype)
  return fit(model, factset, trainable=encoder_decoder_fields(train),
             config=config, hidden_mask=mask, key=k_batch)


def encoder_decoder_fields(train: str) -> tuple[str, ...]:
  """Fields of an EncoderDecoder that ``train`` names."""
  encoder = ('w_gate', 'b_gate', 'w_up', 'routing')
  choices = {'encoder': encoder, 'decoder': ('decoder',),
             'both': encoder + ('decoder',)}
  if train not in choices:
    raise FactStoreError(
        f'train must be one of {sorted(choices)}, got {train!r}')
  return choices[train]


def finetune(model: EncoderDecoder, factset: FactSet, *, train: str = 'both',
             config: TrainConfig = TrainConfig()) -> TrainResult:
  """GD from a constructed encoder-decoder (e.g. ``construct(0, ...).model``).

  The clipped gate has zero gradient where it saturates, so gate rows move
  only for keys inside a window's ramps; routing and decoder always move.
  """
  return fit(model, factset, trainable=encoder_decoder_fields(train),
             config=config)


def fit_module(module: GatedMLPModule, factset: FactSet, *,
               config: TrainConfig = TrainConfig(),
               key: Array | None = None) -> TrainResult:
  """Trains a :class:`GatedMLPModule` in place; returns the result."""
  result = fit(module.to_params(), factset, config=config, key=key)
  trained = result.params
  for name in ('w_gate', 'w_up', 'w_down', 'b_gate', 'b_up', 'b_down'):
    param = getattr(module, name)
    if param is not None:
      param[...] = getattr(trained, name)
  return result
