"""Tests for GD training (factstore_jax.training)."""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from factstore_jax import factsets, storage, training
from factstore_jax import mlp as mlp_lib
from factstore_jax.constructions.encoder_decoder import (construct,
                                                         construction_decoder)
from factstore_jax.errors import FactStoreError
from factstore_jax.mlp import GatedMLPModule

FAST = training.TrainConfig(max_steps=3_000, chunk_steps=50,
                            learning_rate=1e-2, final_learning_rate=1e-4)


@pytest.fixture(scope='module')
def small():
  return factsets.random_factset(jax.random.key(0), 64, 32, tied=True)


def test_stores_small_factset(small):
  result = training.train_mlp(jax.random.key(1), small, 32, config=FAST)
  assert float(result.accuracy) == 1.0
  assert float(result.min_margin) > 0
  assert training.STOP_REASONS[int(result.stop_reason)] == 'target_reached'
  assert 0 < int(result.steps) < FAST.max_steps
  chex.assert_shape(result.params.w_gate, (32, 32))
  chex.assert_shape(result.params.w_down, (32, 32))


@pytest.mark.parametrize('loss', ['xent', 'mse'])
def test_stops_at_target_with_41_facts(loss):
  # jnp.mean of 41 trues is 0.99999994 under jit (XLA multiplies by the
  # reciprocal 1/41), which never reached target_accuracy = 1 and ran the
  # whole budget; storage.fraction makes every win count exactly 1.0.
  fs = factsets.random_factset(jax.random.key(0), 41, 16, tied=True)
  result = training.train_mlp(jax.random.key(1), fs, 32,
                              config=dataclasses.replace(FAST, loss=loss))
  assert float(result.accuracy) == 1.0
  assert training.STOP_REASONS[int(result.stop_reason)] == 'target_reached'
  assert int(result.steps) < FAST.max_steps


def test_stops_at_first_perfect_step(small):
  # Rerunning with the step budget the first run used gives the same params.
  first = training.train_mlp(jax.random.key(1), small, 32, config=FAST)
  steps = int(first.steps)
  capped = training.TrainConfig(
      max_steps=FAST.max_steps, chunk_steps=steps, learning_rate=1e-2,
      final_learning_rate=1e-4)
  again = training.train_mlp(jax.random.key(1), small, 32, config=capped)
  assert int(again.steps) == steps
  chex.assert_trees_all_close(first.params, again.params, rtol=1e-5, atol=1e-6)


def test_deterministic(small):
  a = training.train_mlp(jax.random.key(3), small, 16, config=FAST)
  b = training.train_mlp(jax.random.key(3), small, 16, config=FAST)
  chex.assert_trees_all_equal(a, b)


def test_vmap_over_seeds_equals_loop(small):
  cfg = training.TrainConfig(max_steps=200, chunk_steps=50, learning_rate=1e-2)
  seeds = jax.random.split(jax.random.key(4), 3)
  batched = jax.vmap(lambda k: training.train_mlp(k, small, 16, config=cfg))(
      seeds)
  for i in range(3):
    one = training.train_mlp(seeds[i], small, 16, config=cfg)
    member = jax.tree.map(lambda x: x[i], batched)
    assert int(member.steps) == int(one.steps)
    chex.assert_trees_all_close(member.params, one.params, rtol=1e-4,
                                atol=1e-5)


def test_masked_width_equals_sliced_width(small):
  # Nested draws: the first 10 units at hidden width 24 (active width 10)
  # equal a width-10 init; the rest are zero.
  init24 = mlp_lib.init_mlp(jax.random.key(0), 32, 24, width=10)
  init10 = mlp_lib.init_mlp(jax.random.key(0), 32, 10)
  np.testing.assert_allclose(init24.w_gate[:, :10], init10.w_gate, rtol=1e-6)
  np.testing.assert_allclose(init24.w_down[:10], init10.w_down, rtol=1e-6)
  assert float(jnp.abs(init24.w_down[10:]).max()) == 0.0
  # Training with the mask matches training the narrow model.
  cfg = training.TrainConfig(max_steps=100, chunk_steps=50, patience=None,
                             learning_rate=1e-2)
  masked = training.train_mlp(jax.random.key(5), small, 24, width=10,
                              config=cfg)
  narrow = training.train_mlp(jax.random.key(5), small, 10, config=cfg)
  assert float(jnp.abs(masked.params.w_up[:, 10:]).max()) == 0.0
  assert float(jnp.abs(masked.params.w_down[10:]).max()) == 0.0
  np.testing.assert_allclose(masked.params.w_up[:, :10], narrow.params.w_up,
                             rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(masked.loss, narrow.loss, rtol=1e-4)


def test_vmap_over_widths(small):
  cfg = training.TrainConfig(max_steps=100, chunk_steps=50, patience=None,
                             learning_rate=1e-2)
  widths = jnp.array([4, 8, 16])
  run = lambda w: training.train_mlp(jax.random.key(6), small, 16, width=w,
                                     config=cfg)
  batched = jax.vmap(run)(widths)
  for i, w in enumerate([4, 8, 16]):
    one = run(w)
    np.testing.assert_allclose(batched.accuracy[i], one.accuracy, atol=1e-6)
    chex.assert_trees_all_close(
        jax.tree.map(lambda x: x[i], batched.params), one.params, rtol=1e-4,
        atol=1e-5)


def test_hopeless_run_stops_early(small):
  cfg = training.TrainConfig(max_steps=5_000, chunk_steps=50, patience=100)
  result = training.train_mlp(jax.random.key(7), small, 1, config=cfg)
  assert training.STOP_REASONS[int(result.stop_reason)] == 'hopeless'
  assert 100 <= int(result.steps)
  assert int(result.steps) < 5_000
  assert float(result.accuracy) < 1.0


def test_max_steps_reason(small):
  cfg = training.TrainConfig(max_steps=10, chunk_steps=3, patience=None)
  result = training.train_mlp(jax.random.key(7), small, 2, config=cfg)
  assert int(result.steps) == 10
  assert training.STOP_REASONS[int(result.stop_reason)] == 'max_steps'


@pytest.mark.parametrize('activation', ['identity', 'relu', 'silu'])
def test_activations_and_biases(small, activation):
  result = training.train_mlp(
      jax.random.key(8), small, 48, config=FAST, activation=activation,
      gate_bias=True, up_bias=True, down_bias=True)
  assert float(result.accuracy) == 1.0
  assert result.params.b_down is not None


def test_mse_and_minibatch(small):
  mse = training.TrainConfig(max_steps=3_000, chunk_steps=100, loss='mse',
                             learning_rate=1e-2, final_learning_rate=1e-4)
  result = training.train_mlp(jax.random.key(9), small, 48, config=mse)
  assert float(result.accuracy) == 1.0
  mini = training.TrainConfig(max_steps=3_000, chunk_steps=100, batch_size=16,
                              learning_rate=1e-2, final_learning_rate=1e-4)
  result = training.train_mlp(jax.random.key(9), small, 32, config=mini)
  assert float(result.accuracy) == 1.0


def test_encoder_decoder_gd_trains_only_named_fields(small):
  result = training.train_encoder_decoder(
      jax.random.key(10), small, 48, 16, config=FAST, train='encoder')
  init = training.init_encoder_decoder(
      jax.random.split(jax.random.key(10))[0], 32, 48, 16)
  np.testing.assert_array_equal(result.params.decoder, init.decoder)
  assert not np.allclose(result.params.routing, init.routing)
  assert float(result.accuracy) == 1.0
  dec = training.train_encoder_decoder(
      jax.random.key(10), small, 48, 16, config=training.TrainConfig(
          max_steps=20, chunk_steps=10), train='decoder')
  np.testing.assert_array_equal(dec.params.w_up, init.w_up)


def test_encoder_decoder_gd_with_a_given_decoder(small):
  # The given decoder replaces the random draw and stays fixed; the encoder
  # starts where it would have.
  given = construction_decoder(jax.random.key(3), 32, 16)
  result = training.train_encoder_decoder(
      jax.random.key(10), small, 48, 16, config=FAST, decoder=given)
  np.testing.assert_array_equal(result.params.decoder, given)
  assert float(result.accuracy) == 1.0
  start = training.train_encoder_decoder(
      jax.random.key(10), small, 48, 16, decoder=given,
      config=training.TrainConfig(max_steps=1, chunk_steps=1))
  init = training.init_encoder_decoder(
      jax.random.split(jax.random.key(10))[0], 32, 48, 16)
  assert not np.allclose(init.decoder, given)
  np.testing.assert_allclose(start.params.w_gate, init.w_gate, atol=2e-3)
  with pytest.raises(FactStoreError, match=r'decoder must have shape'):
    training.train_encoder_decoder(jax.random.key(0), small, 8, 16,
                                   decoder=given[:, :8])


def test_finetune_from_construction_keeps_storage():
  fs = factsets.random_factset(jax.random.key(11), 256, 32, tied=True)
  built = construct(0, fs)
  result = training.finetune(built.model, fs, train='both', config=FAST)
  assert float(result.accuracy) == 1.0
  assert int(result.steps) == 0  # already stores every fact


def test_fit_module_updates_in_place(small):
  module = GatedMLPModule(mlp_lib.init_mlp(jax.random.key(12), 32, 32))
  result = training.fit_module(module, small, config=FAST)
  chex.assert_trees_all_close(module.to_params(), result.params)
  assert float(result.accuracy) == 1.0


def test_loss_gradients():
  with jax.enable_x64(True):
    fs = factsets.random_factset(jax.random.key(13), 16, 8, tied=True,
                                 dtype=jnp.float64)
    model = mlp_lib.init_mlp(jax.random.key(14), 8, 6,
                                    activation='silu', gate_bias=True,
                                    dtype=jnp.float64)
    for loss in ('xent', 'mse'):
      # Jitted: one compiled program instead of every op dispatched alone.
      fn = jax.jit(lambda w_up, w_down, loss=loss: training.storage_loss(
          model.replace(w_up=w_up, w_down=w_down), fs, loss=loss))
      check_grads(fn, (model.w_up, model.w_down), order=1, modes=['rev'])


@pytest.mark.parametrize('hidden', [3, 12])  # both logit associations
def test_xent_gradients_many_to_one_with_offset(hidden):
  # Repeated targets (segment sums) and a down bias (the logits' offset).
  with jax.enable_x64(True):
    fs = factsets.random_factset(jax.random.key(15), 24, 8, num_values=5,
                                 tied=False, mapping='many_to_one',
                                 dtype=jnp.float64)
    model = mlp_lib.init_mlp(jax.random.key(16), 8, hidden,
                                    down_bias=True, dtype=jnp.float64)
    model = model.replace(b_down=jnp.linspace(-1.0, 1.0, 8))
    fn = jax.jit(lambda w_gate, w_down, b_down: training.storage_loss(
        model.replace(w_gate=w_gate, w_down=w_down, b_down=b_down), fs))
    check_grads(fn, (model.w_gate, model.w_down, model.b_down), order=1,
                modes=['rev'])


@pytest.mark.parametrize('block_rows', [64, 16, 24])  # 1, 4, 2 + tail
def test_xent_head_accuracy_counts_strict_wins(block_rows):
  # Rows 0-31: target = the row's argmax (wins); 32-47: target = the
  # argmin (loses); 48-63: z = 0, so every logit ties (fails).
  n, r, p = 64, 8, 40
  z = jax.random.normal(jax.random.key(20), (n, r)).at[48:].set(0.0)
  table = jax.random.normal(jax.random.key(21), (r, p))
  logits = np.asarray(z, np.float64) @ np.asarray(table, np.float64)
  target = np.concatenate([np.argmax(logits[:32], 1),
                           np.argmin(logits[32:48], 1), np.arange(16)])
  loss, accuracy = training._xent_head(z, table, None, jnp.asarray(target),
                                       block_rows)
  assert float(accuracy) == 0.5
  log_softmax = logits - np.log(np.sum(np.exp(logits), 1, keepdims=True))
  np.testing.assert_allclose(
      float(loss), -np.mean(log_softmax[np.arange(n), target]), rtol=1e-5)


@pytest.mark.parametrize('offset', [False, True])
def test_xent_head_blocks_match_autodiff(offset):
  # Blocked logits (scan over full blocks, a remainder call) give the loss,
  # accuracy and gradients of plain autodiff on the whole logits matrix.
  with jax.enable_x64(True):
    n, r, p = 30, 5, 7
    z = jax.random.normal(jax.random.key(22), (n, r), jnp.float64)
    table = jax.random.normal(jax.random.key(23), (r, p), jnp.float64)
    bias = jnp.linspace(-1.0, 1.0, p) if offset else None
    target = jax.random.randint(jax.random.key(24), (n,), 0, p)  # repeats

    def reference(z, table, bias):
      logits = z @ table + (0.0 if bias is None else bias)
      return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(n), target])

    args = (z, table, bias) if offset else (z, table)
    want = jax.jit(jax.value_and_grad(reference, argnums=range(len(args))))(
        *args, *([] if offset else [None]))

    @functools.partial(jax.jit, static_argnums=0)
    def head_vjp(rows, *a):  # one program per block size, not op by op
      head = lambda *a: training._xent_head(
          a[0], a[1], a[2] if offset else None, target, rows)
      (loss, accuracy), vjp = jax.vjp(head, *a)
      grads = vjp((jnp.asarray(1.0, jnp.float64), jnp.zeros((), jnp.float32)))
      return loss, accuracy, grads

    for rows in (n, 1, 7, 10, 64):  # one call, 30, 4 + 2, 3, one call
      loss, accuracy, grads = head_vjp(rows, *args)
      chex.assert_trees_all_close((loss, grads), want, rtol=1e-12)
      wins = np.argmax(np.asarray(z @ table + (0.0 if bias is None else bias)),
                       1) == np.asarray(target)
      # Within float32 rounding of the division (GPUs divide by a constant
      # with a reciprocal: 3 / 30 gave 0.10000001 on an H100).
      np.testing.assert_allclose(float(accuracy), np.mean(wins), rtol=2e-7)


@pytest.mark.parametrize('kind, loss', [('narrow', 'xent'), ('wide', 'xent'),
                                        ('encoder_decoder', 'mse')])
def test_training_loss_gradients_with_transposed_keys(kind, loss):
  # The training loss reads x^T for its weight gradients (_matmul_t): the
  # same gradients as plain autodiff. Between them the cases cover every
  # _matmul_t use: the input matmuls, z (R V^T) and (z R) V^T, the
  # encoder-decoder's routing and the MSE outputs.
  with jax.enable_x64(True):
    fs = factsets.random_factset(jax.random.key(17), 24, 8, tied=True,
                                 dtype=jnp.float64)
    if kind == 'encoder_decoder':
      model = training.init_encoder_decoder(jax.random.key(18), 8, 10, 6,
                                            activation='silu',
                                            dtype=jnp.float64)
    else:
      model = mlp_lib.init_mlp(
          jax.random.key(18), 8, 3 if kind == 'narrow' else 12,
          gate_bias=True, down_bias=True, dtype=jnp.float64)
    keys, values, target = fs
    names = [n for n in ('w_gate', 'w_up', 'w_down', 'b_gate', 'b_down',
                         'routing') if getattr(model, n, None) is not None]
    params = {n: getattr(model, n) for n in names}

    def grads(x_t):
      fn = lambda p: training._loss_and_accuracy(
          model.replace(**p), keys, values, target, loss, None, x_t)[0]
      return jax.jit(jax.grad(fn))(params)  # one program, not op by op

    chex.assert_trees_all_close(grads(keys.T), grads(None), rtol=1e-10)


def test_step_flops_association():
  # h < d: z (R V^T) path; h >= d: (z R) V^T path.
  n, d, p = 100, 16, 50
  assert training.step_flops(n, d, 8, p) == (
      8 * n * d * 8 + 2 * 8 * d * p + 6 * n * 8 * p + 2 * 8 * p * d)
  assert training.step_flops(n, d, 32, p) == (
      8 * n * d * 32 + 4 * n * 32 * d + 4 * n * d * p + 2 * n * 32 * d)


@pytest.mark.parametrize('kwargs, match', [
    (dict(max_steps=0), 'max_steps'),
    (dict(chunk_steps=0), 'chunk_steps'),
    (dict(logit_rows=0), 'logit_rows'),
    (dict(logit_rows=True), 'logit_rows'),
    (dict(logit_rows=2.5), 'logit_rows'),
    (dict(loss='hinge'), 'loss'),
    (dict(learning_rate=0.0), 'learning rate'),
    (dict(target_accuracy=0.0), 'target_accuracy'),
    (dict(patience=0), 'patience'),
    (dict(batch_size=0), 'batch_size'),
    (dict(compute_dtype='int8'), 'compute_dtype'),
])
def test_config_errors(small, kwargs, match):
  with pytest.raises(FactStoreError, match=match):
    training.train_mlp(jax.random.key(0), small, 4,
                       config=training.TrainConfig(**kwargs))


def test_fit_errors(small):
  model = mlp_lib.init_mlp(jax.random.key(0), 32, 4)
  with pytest.raises(FactStoreError, match='not one of'):
    training.fit(model, small, trainable=('w_nope',))
  with pytest.raises(FactStoreError, match='is None'):
    training.fit(model, small, trainable=('b_gate',))
  with pytest.raises(FactStoreError, match='nothing would train'):
    training.fit(model, small, trainable=())
  with pytest.raises(FactStoreError, match='needs a key'):
    training.fit(model, small, config=training.TrainConfig(batch_size=8))
  with pytest.raises(FactStoreError, match='exceeds'):
    training.fit(model, small, key=jax.random.key(0),
                 config=training.TrainConfig(batch_size=1000))
  with pytest.raises(FactStoreError, match='dim'):
    other = factsets.random_factset(jax.random.key(0), 16, 8)
    training.fit(model, other)
  with pytest.raises(FactStoreError, match='train must be'):
    training.train_encoder_decoder(jax.random.key(0), small, 8, 4,
                                   train='all')
  with pytest.raises(FactStoreError, match='GatedMLP or EncoderDecoder'):
    training.fit({'w': 1}, small)


def test_early_stop_off_runs_every_step(small):
  cfg = training.TrainConfig(max_steps=120, chunk_steps=50, early_stop=False,
                             learning_rate=1e-2)
  result = training.train_mlp(jax.random.key(1), small, 32, config=cfg)
  assert int(result.steps) == 120
  assert training.STOP_REASONS[int(result.stop_reason)] == 'max_steps'


def test_bf16_compute_with_fp32_certificate(small):
  cfg = dataclasses.replace(FAST, compute_dtype='bfloat16')
  result = training.train_mlp(jax.random.key(1), small, 32, config=cfg)
  # Master weights stay float32; the certificate is of those weights.
  assert result.params.w_gate.dtype == jnp.float32
  assert float(result.accuracy) == 1.0
  assert float(result.min_margin) > 0
  gamma = storage.margins(training.model_outputs(result.params, small.keys),
                          small.values, small.mapping)
  assert float(jnp.min(gamma)) == pytest.approx(float(result.min_margin),
                                                rel=1e-5)
  # The steps really ran in bfloat16: the trajectory differs from float32's.
  fp32 = training.train_mlp(jax.random.key(1), small, 32, config=FAST)
  assert not np.allclose(result.params.w_gate, fp32.params.w_gate, atol=1e-4)


def test_float32_compute_dtype_is_the_default(small):
  cfg = dataclasses.replace(FAST, compute_dtype='float32')
  a = training.train_mlp(jax.random.key(2), small, 16, config=cfg)
  b = training.train_mlp(jax.random.key(2), small, 16, config=FAST)
  chex.assert_trees_all_equal(a, b)


def test_bf16_gradients_reach_float32_params(small):
  model = mlp_lib.init_mlp(jax.random.key(0), 32, 8)
  grads = jax.grad(lambda m: training.storage_loss(
      jax.tree.map(lambda a: a.astype(jnp.bfloat16), m),
      small._replace(keys=small.keys.astype(jnp.bfloat16))))(model)
  chex.assert_trees_all_equal_dtypes(grads, model)
  chex.assert_tree_all_finite(grads)


def test_hopeless_stop_keeps_every_run_that_would_succeed(small):
  # Near the capacity threshold: the schedule-aware test must not stop a run
  # that the full budget brings to 100%, and does stop the ones that fail.
  plain = dataclasses.replace(FAST, early_stop=False)
  early = dataclasses.replace(FAST, patience=300)
  widths = jnp.arange(1, 9)
  run = lambda cfg: jax.vmap(lambda w: training.train_mlp(
      jax.random.key(8), small, 8, width=w, config=cfg))(widths)
  full, stopped = run(plain), run(early)
  succeeds = np.asarray(full.accuracy) == 1.0
  assert succeeds.any() and not succeeds.all()
  np.testing.assert_array_equal(np.asarray(stopped.accuracy) == 1.0, succeeds)
  reasons = np.asarray(stopped.stop_reason)
  assert (reasons[~succeeds] == training.HOPELESS).all()
  assert (np.asarray(stopped.steps)[~succeeds] < FAST.max_steps).all()
