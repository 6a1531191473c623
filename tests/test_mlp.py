"""Tests for factstore_jax.mlp: gated-MLP params, apply, counting, NNX module."""

from __future__ import annotations

from absl.testing import parameterized
import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from factstore_jax import mlp as M
from factstore_jax.errors import FactStoreError

D, H, D_OUT, BATCH = 8, 16, 4, 5


def _params(seed=0, activation='relu', biases=(True, True, True),
            out_dim=D_OUT, dtype=jnp.float32):
  """Random params with random (non-zero) biases where present."""
  params = M.init_mlp(jax.random.PRNGKey(seed), D, H, out_dim=out_dim,
                      activation=activation, gate_bias=biases[0],
                      up_bias=biases[1], down_bias=biases[2], dtype=dtype)
  # Give biases non-zero values so they are actually exercised.
  keys = iter(jax.random.split(jax.random.PRNGKey(seed + 100), 3))
  fill = lambda b: None if b is None else 0.3 * jax.random.normal(
      next(keys), b.shape, dtype)
  return params.replace(b_gate=fill(params.b_gate), b_up=fill(params.b_up),
                        b_down=fill(params.b_down))


def _reference_apply(params, x):
  """Plain numpy float64 reference of the gated MLP."""
  acts = {'relu': lambda z: np.maximum(z, 0), 'identity': lambda z: z,
          'clipped': lambda z: np.clip(z, 0, 1),
          'silu': lambda z: z / (1 + np.exp(-z))}
  f64 = lambda a: None if a is None else np.asarray(a, np.float64)
  x = np.asarray(x, np.float64)
  gate = x @ f64(params.w_gate)
  up = x @ f64(params.w_up)
  if params.b_gate is not None:
    gate = gate + f64(params.b_gate)
  if params.b_up is not None:
    up = up + f64(params.b_up)
  out = (up * acts[params.activation](gate)) @ f64(params.w_down)
  if params.b_down is not None:
    out = out + f64(params.b_down)
  return out


class ApplyTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ('relu', 'relu'), ('clipped', 'clipped'), ('silu', 'silu'),
      ('identity', 'identity'))
  def test_shapes_and_values(self, activation):
    params = _params(activation=activation)
    apply = self.variant(M.GatedMLP.__call__)
    x = jax.random.normal(jax.random.PRNGKey(1), (BATCH, D))
    out = apply(params, x)
    chex.assert_shape(out, (BATCH, D_OUT))
    chex.assert_tree_all_finite(out)
    np.testing.assert_allclose(out, _reference_apply(params, x), rtol=1e-5,
                               atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_leading_batch_axes(self):
    params = _params()
    apply = self.variant(M.GatedMLP.__call__)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 3, D))
    out = apply(params, x)
    chex.assert_shape(out, (2, 3, D_OUT))
    single = apply(params, x[1, 2])
    chex.assert_shape(single, (D_OUT,))
    chex.assert_trees_all_close(out[1, 2], single, atol=1e-6, rtol=1e-6)

  def test_default_out_dim_is_dim(self):
    params = M.init_mlp(jax.random.PRNGKey(0), D, H, activation='relu', gate_bias=True)
    chex.assert_shape(params.w_down, (H, D))
    chex.assert_shape(params(jnp.ones((3, D))), (3, D))
    self.assertEqual(params.hidden_dim, H)

  def test_without_biases(self):
    params = _params(biases=(False, False, False))
    self.assertIsNone(params.b_gate)
    self.assertIsNone(params.b_up)
    self.assertIsNone(params.b_down)
    x = jax.random.normal(jax.random.PRNGKey(3), (BATCH, D))
    np.testing.assert_allclose(params(x),
                               _reference_apply(params, x), rtol=1e-5,
                               atol=1e-5)

  def test_clipped_saturates_exactly(self):
    z = jnp.array([-3.0, -0.0, 0.0, 0.25, 1.0, 7.5])
    np.testing.assert_array_equal(M.clipped(z),
                                  np.array([0, 0, 0, 0.25, 1, 1], np.float32))

  def test_activation_is_static(self):
    params = _params(activation='silu')
    leaves = jax.tree.leaves(params)
    self.assertTrue(all(isinstance(l, jax.Array) for l in leaves))
    # The activation survives a round trip through jit / tree_map.
    doubled = jax.jit(lambda p: jax.tree.map(lambda a: 2 * a, p))(params)
    self.assertEqual(doubled.activation, 'silu')


class NumParamsTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('gate_bias_only', (True, False, False), 2 * D * H + H * D_OUT + H),
      ('no_biases', (False, False, False), 2 * D * H + H * D_OUT),
      ('all_biases', (True, True, True), 2 * D * H + H * D_OUT + 2 * H + D_OUT),
      ('down_bias_only', (False, False, True), 2 * D * H + H * D_OUT + D_OUT),
  )
  def test_counts(self, biases, expected):
    params = _params(biases=biases)
    self.assertEqual(M.num_params(params), expected)
    self.assertIsInstance(M.num_params(params), int)

  def test_explicit_arrays(self):
    params = M.GatedMLP(w_gate=jnp.zeros((3, 7)), w_up=jnp.zeros((3, 7)),
                        w_down=jnp.zeros((7, 2)), b_gate=jnp.zeros(7))
    self.assertEqual(M.num_params(params), 21 + 21 + 14 + 7)

  def test_stacked_counts_whole_stack(self):
    params = _params(biases=(True, False, False))
    stacked = jax.tree.map(lambda a: jnp.stack([a, a, a]), params)
    self.assertEqual(M.num_params(stacked), 3 * M.num_params(params))
    self.assertEqual(M.num_params(jax.tree.map(lambda a: a[0], stacked)),
                     M.num_params(params))


class ModuleTest(chex.TestCase):

  @parameterized.named_parameters(
      ('with_biases', (True, True, True)), ('no_biases', (False, False, False)),
      ('gate_bias', (True, False, False)))
  def test_wraps_params_and_matches_apply(self, biases):
    params = _params(activation='silu', biases=biases)
    module = M.GatedMLPModule(params)
    x = jax.random.normal(jax.random.PRNGKey(4), (BATCH, D))
    chex.assert_trees_all_close(module(x), params(x), atol=1e-6,
                                rtol=1e-6)
    back = module.to_params()
    self.assertEqual(back.activation, 'silu')
    chex.assert_trees_all_equal(back, params)
    # Every parameter of the MLP is an nnx.Param of the module.
    state = nnx.state(module, nnx.Param)
    self.assertEqual(M.num_params(state), M.num_params(params))

  def test_nnx_grad_matches_jax_grad(self):
    params = _params(activation='silu')
    x = jax.random.normal(jax.random.PRNGKey(5), (BATCH, D))
    module = M.GatedMLPModule(params)
    loss_m = lambda m: jnp.sum(jnp.sin(m(x)))
    loss_p = lambda p: jnp.sum(jnp.sin(p(x)))
    grads_m = nnx.grad(loss_m)(module)
    grads_p = jax.grad(loss_p)(params)
    for name in ('w_gate', 'w_up', 'w_down', 'b_gate', 'b_up', 'b_down'):
      chex.assert_trees_all_close(grads_m[name][...], getattr(grads_p, name),
                                  atol=1e-5, rtol=1e-5)

  def test_jit_module(self):
    params = _params(activation='relu')
    module = M.GatedMLPModule(params)
    x = jax.random.normal(jax.random.PRNGKey(6), (BATCH, D))
    out = nnx.jit(lambda m, x: m(x))(module, x)
    chex.assert_trees_all_close(out, params(x), atol=1e-6,
                                rtol=1e-6)


class GradTest(chex.TestCase):

  @parameterized.named_parameters(
      ('relu', 'relu'), ('clipped', 'clipped'), ('silu', 'silu'),
      ('identity', 'identity'))
  def test_grad_finite(self, activation):
    params = _params(activation=activation)
    x = jax.random.normal(jax.random.PRNGKey(7), (BATCH, D))
    g_params, g_x = jax.grad(
        lambda p, x: jnp.sum(p(x) ** 2), argnums=(0, 1))(params, x)
    chex.assert_tree_all_finite((g_params, g_x))
    chex.assert_trees_all_equal_shapes(g_params, params)
    self.assertEqual(g_params.activation, activation)

  @parameterized.named_parameters(
      ('relu', 'relu'), ('clipped', 'clipped'), ('silu', 'silu'),
      ('identity', 'identity'))
  def test_grad_matches_finite_differences(self, activation):
    # Central differences in float64 along a random direction of (params, x).
    with jax.enable_x64(True):
      to64 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t)
      params = to64(_params(seed=3, activation=activation))
      x = to64(np.random.default_rng(8).normal(size=(BATCH, D)))
      loss = jax.jit(lambda p, x: jnp.sum(jnp.tanh(p(x))))
      g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
      leaves, treedef = jax.tree.flatten((params, x))
      rng = np.random.default_rng(9)
      direction = jax.tree.unflatten(
          treedef, [jnp.asarray(rng.normal(size=l.shape)) for l in leaves])
      eps = 1e-6
      shift = lambda s: jax.tree.map(lambda a, t: a + s * eps * t,
                                     (params, x), direction)
      fd = (loss(*shift(1.0)) - loss(*shift(-1.0))) / (2 * eps)
      ad = sum(jnp.vdot(g, t) for g, t in zip(
          jax.tree.leaves((g_params, g_x)), jax.tree.leaves(direction)))
      np.testing.assert_allclose(float(ad), float(fd), rtol=1e-5, atol=1e-6)


class FirstUnitsTest(chex.TestCase):

  def test_gated_mlp_equals_the_masked_model(self):
    # A model drawn at H for width 5 (units >= 5 zero) and cut to 5 units
    # is the same function, with its biases cut too (b_down kept).
    params = _params(biases=(True, True, True))
    mask = M.hidden_mask(H, 5)
    masked = params.replace(w_gate=params.w_gate * mask,
                            w_up=params.w_up * mask,
                            w_down=params.w_down * mask[:, None],
                            b_gate=params.b_gate * mask,
                            b_up=params.b_up * mask)
    cut = M.first_units(masked, 5)
    chex.assert_shape([cut.w_gate, cut.w_up], (D, 5))
    chex.assert_shape(cut.w_down, (5, D_OUT))
    chex.assert_shape([cut.b_gate, cut.b_up], (5,))
    np.testing.assert_array_equal(cut.b_down, params.b_down)
    x = jax.random.normal(jax.random.PRNGKey(1), (BATCH, D))
    np.testing.assert_allclose(cut(x), masked(x), rtol=1e-6, atol=1e-6)
    no_bias = M.first_units(_params(biases=(False, False, False)), 3)
    self.assertIsNone(no_bias.b_gate)
    chex.assert_shape(no_bias.w_down, (3, D_OUT))

  def test_encoder_decoder(self):
    ed = M.EncoderDecoder(
        w_gate=jnp.ones((D, H)), b_gate=jnp.zeros((H,)), w_up=jnp.ones((D, H)),
        routing=jnp.ones((H, 3)), decoder=jnp.ones((D, 3)),
        activation='identity')
    cut = M.first_units(ed, 4)
    chex.assert_shape([cut.w_gate, cut.w_up], (D, 4))
    chex.assert_shape(cut.routing, (4, 3))
    np.testing.assert_array_equal(cut.decoder, ed.decoder)

  def test_errors(self):
    for bad in (0, H + 1):
      with pytest.raises(FactStoreError, match=r'width must be in \[1, 16\]'):
        M.first_units(_params(), bad)
    with pytest.raises(FactStoreError, match='GatedMLP or EncoderDecoder'):
      M.first_units({'w_gate': jnp.ones((D, H))}, 2)
    windowed = M.EncoderDecoder(
        w_gate=jnp.ones((D, H)), b_gate=jnp.zeros((H,)), w_up=jnp.ones((D, H)),
        routing=jnp.ones((H, 3)), decoder=jnp.ones((D, 3)), window=2)
    chex.assert_shape(M.first_units(windowed, 4).routing, (4, 3))
    with pytest.raises(FactStoreError, match='routing window 2'):
      M.first_units(windowed, 5)


class ActivationTest(parameterized.TestCase):

  @parameterized.parameters('relu', 'clipped', 'silu', 'identity')
  def test_known(self, name):
    self.assertTrue(callable(M.get_activation(name)))

  def test_unknown_raises(self):
    with pytest.raises(FactStoreError, match="unknown activation 'tanhh'"):
      M.get_activation('tanhh')

  def test_unknown_is_value_error(self):
    with pytest.raises(ValueError):
      M.get_activation('gelu_tanh_typo')

  def test_init_rejects_unknown(self):
    with pytest.raises(FactStoreError, match='unknown activation'):
      M.init_mlp(jax.random.PRNGKey(0), D, H, activation='nope')

  def test_apply_rejects_unknown(self):
    params = _params().replace(activation='nope')
    with pytest.raises(FactStoreError, match='unknown activation'):
      params(jnp.ones((D,)))
