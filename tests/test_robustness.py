"""Tests for factstore_jax.robustness: robustness radius, Lipschitz, Jacobian."""

from __future__ import annotations

import functools

from absl.testing import parameterized
import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from factstore_jax import factsets as F
from factstore_jax import mlp as M
from factstore_jax import robustness as U
from factstore_jax.factsets import FactSet
from factstore_jax.constructions import encoder_decoder as ed
from factstore_jax.errors import FactStoreError

# 2D hand-built case: fn = identity, values +e_1 / -e_1, so decoding is the
# sign of x_1 and a key (a, b) of the right sign loses it at r = |a| / |u_1|
# along directions u pointing across the boundary (u_1 a < 0).
VALUES_2D = np.array([[1.0, 0.0], [-1.0, 0.0]], np.float32)
KEYS_2D = np.array([[0.3, 0.5],     # value 0, distance 0.3
                    [-0.2, 0.1],    # value 1, distance 0.2
                    [0.05, -1.0],   # value 0, distance 0.05
                    [0.4, 0.0],     # value 1: wrong at r = 0
                    [2.0, 0.3]],    # value 0, farther than max_radius
                   np.float32)
MAPPING_2D = np.array([0, 1, 0, 1, 0], np.int32)
FS_2D = FactSet(KEYS_2D, VALUES_2D, MAPPING_2D)


def _identity(x):
  return x


def _expected_radius_2d(directions, max_radius):
  """Exact bisection target of the 2D case for the sampled directions."""
  a = KEYS_2D[:, 0].astype(np.float64)[:, None]          # (N, 1)
  u1 = np.asarray(directions, np.float64)[..., 0]        # (N, D)
  across = u1 * a < 0
  dist = np.where(across, np.abs(a) / np.where(across, np.abs(u1), 1.0),
                  np.inf)
  radius = np.minimum(dist, max_radius).min(axis=1)
  correct = np.where(MAPPING_2D == 0, a[:, 0] > 0, a[:, 0] < 0)
  return np.where(correct, radius, 0.0)


# Test data comes from numpy: drawing 2-D jax.random arrays compiles slowly on
# XLA:CPU, and this file must stay fast.


def _normal(seed, *shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _ball_points(seed, n, d, radius):
  """``n`` points uniform in the ball of radius ``radius`` in ``R^d``."""
  rng = np.random.default_rng(seed)
  u = rng.normal(size=(n, d))
  u /= np.linalg.norm(u, axis=1, keepdims=True)
  return (u * radius * rng.uniform(size=(n, 1)) ** (1.0 / d)).astype(
      np.float32)


def _random_mlp(seed, d, h, activation):
  """A gated MLP with every weight and bias present and nonzero."""
  rng = np.random.default_rng(seed)
  arr = lambda *shape, scale=1.0: jnp.asarray(
      scale * rng.normal(size=shape), jnp.float32)
  return M.GatedMLP(
      w_gate=arr(d, h, scale=d ** -0.5), w_up=arr(d, h, scale=d ** -0.5),
      w_down=arr(h, d, scale=h ** -0.5), b_gate=arr(h, scale=0.5),
      b_up=arr(h, scale=0.5), b_down=arr(d), activation=activation)


def _exact_jacobian_norms(fn, x):
  jac = jax.vmap(jax.jacfwd(fn))(x)
  return np.linalg.svd(np.asarray(jac, np.float64), compute_uv=False)[:, 0]


@functools.lru_cache(maxsize=None)
def _construction():
  # Small and with the identity decoder (code_dim = d): construct compiles a
  # lot, so the smallest case keeps this file fast.
  fs = F.random_factset(jax.random.PRNGKey(3), 16, 8)
  return fs, ed.construct(0, fs, code_dim=8)


@flax.struct.dataclass
class _Linear:
  """``x -> x @ a`` as a pytree callable: its matrix is traced, not compiled
  in, so every ``a`` of one shape shares one compiled program."""
  a: jax.Array

  def __call__(self, x):
    return x @ self.a


class JacobianNormTest(chex.TestCase, parameterized.TestCase):

  def _known_spectrum(self, d=6):
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    r, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a = (q * np.array([3.0, 2.0, 1.0, 0.5, 0.2, 0.1])) @ r.T
    return jnp.asarray(a, jnp.float32)

  @chex.variants(with_jit=True, without_jit=True)
  def test_linear_map_equals_top_singular_value(self):
    fn = _Linear(self._known_spectrum())
    norms = self.variant(lambda x, key: U.jacobian_norm(fn, key, x))(
        _normal(1, 5, 6), jax.random.PRNGKey(2))
    chex.assert_shape(norms, (5,))
    np.testing.assert_allclose(norms, np.full(5, 3.0), rtol=1e-5)
    # A plain closure gives the same answer.
    a = fn.a
    np.testing.assert_allclose(
        U.jacobian_norm(lambda z: z @ a, jax.random.PRNGKey(2),
                        _normal(1, 5, 6)), norms, rtol=1e-6)

  def test_random_linear_map(self):
    a = jnp.asarray(_normal(0, 6, 6))
    norms = U.jacobian_norm(_Linear(a), jax.random.PRNGKey(1),
                            jnp.zeros((5, 6)), iters=300)
    top = np.linalg.svd(np.asarray(a, np.float64), compute_uv=False)[0]
    np.testing.assert_allclose(norms, np.full(5, top), rtol=1e-4)

  def test_non_square_output(self):
    a = jnp.asarray([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # (2, 3): R^2 -> R^3
    norms = U.jacobian_norm(_Linear(a), jax.random.PRNGKey(0),
                            jnp.ones((2, 2)))
    np.testing.assert_allclose(norms, [2.0, 2.0], rtol=1e-5)

  def test_gated_identity_mlp_matches_jacfwd(self):
    params = _random_mlp(0, 8, 16, 'identity')
    fn = lambda z: params(z)
    x = _normal(5, 10, 8)
    norms = U.jacobian_norm(fn, jax.random.PRNGKey(6), x, iters=200)
    np.testing.assert_allclose(norms, _exact_jacobian_norms(fn, x), rtol=1e-3)

  def test_zero_jacobian_gives_zero(self):
    norms = U.jacobian_norm(lambda z: jnp.zeros_like(z) + 1.0,
                            jax.random.PRNGKey(0), jnp.ones((4, 3)))
    np.testing.assert_array_equal(norms, np.zeros(4))

  def test_deterministic_and_chunking(self):
    params = _random_mlp(1, 6, 12, 'relu')
    fn = lambda z: params(z)
    x = _normal(0, 7, 6)
    key = jax.random.key(4)
    a = U.jacobian_norm(fn, key, x, iters=10)
    b = U.jacobian_norm(fn, key, x, iters=10)
    c = U.jacobian_norm(fn, key, x, iters=10, chunk_size=3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, c, rtol=1e-6)


class LipschitzBoundTest(chex.TestCase, parameterized.TestCase):

  @parameterized.parameters('identity', 'relu', 'clipped', 'silu')
  def test_bounds_jacobian_and_finite_differences(self, activation):
    d, h = 6, 24
    params = _random_mlp(7, d, h, activation)
    fn = lambda z: params(z)
    exact_norms = jax.jit(jax.vmap(jax.jacfwd(fn)))
    for radius in (1.0, 2.5):
      bound = float(U.lipschitz_bound(params, radius=radius))
      self.assertTrue(np.isfinite(bound) and bound > 0)
      x = _ball_points(11, 64, d, radius)
      jac = np.asarray(exact_norms(x), np.float64)
      exact = np.linalg.svd(jac, compute_uv=False)[:, 0]
      power = U.jacobian_norm(fn, jax.random.PRNGKey(2), x, iters=20)
      self.assertLessEqual(exact.max(), bound)
      self.assertLessEqual(float(power.max()), bound * (1 + 1e-5))
      # Finite-difference ratios for random pairs in the ball, far and near.
      y = _ball_points(12, 64, d, radius)
      near = x + 1e-2 * (y - x)
      for other in (y, near):
        num = jnp.linalg.norm(fn(x) - fn(other), axis=1)
        ratio = num / jnp.linalg.norm(x - other, axis=1)
        self.assertLessEqual(float(ratio.max()), bound * (1 + 1e-4))

  def test_linear_case_known_value(self):
    # Gate constant 1 (zero gate weights, bias 1): g(x) = x W_up W_down, and
    # the bound reduces to ||W_up||_2 ||W_down||_2.
    params = _random_mlp(2, 5, 9, 'identity').replace(
        w_gate=jnp.zeros((5, 9)), b_gate=jnp.ones((9,)), b_up=None)
    want = (np.linalg.norm(np.asarray(params.w_up), 2) *
            np.linalg.norm(np.asarray(params.w_down), 2))
    np.testing.assert_allclose(U.lipschitz_bound(params), want, rtol=1e-5)

  def test_clipped_saturated_gate_has_no_slope_term(self):
    # Gate biases 5 with unit-ball reach < 4: every gate is saturated at 1.
    params = _random_mlp(3, 4, 8, 'clipped').replace(b_gate=jnp.full((8,), 5.0))
    want = (np.linalg.norm(np.asarray(params.w_up), 2) *
            np.linalg.norm(np.asarray(params.w_down), 2))
    np.testing.assert_allclose(U.lipschitz_bound(params), want, rtol=1e-5)

  def test_bound_grows_with_radius(self):
    params = _random_mlp(4, 6, 12, 'relu')
    bounds = [float(U.lipschitz_bound(params, radius=r)) for r in (0.5, 1, 2)]
    self.assertLess(bounds[0], bounds[1])
    self.assertLess(bounds[1], bounds[2])

  def test_encoder_decoder_matches_as_mlp_and_bounds_keys(self):
    fs, c = _construction()
    bound = U.lipschitz_bound(c.model)
    np.testing.assert_allclose(bound, U.lipschitz_bound(c.model.as_mlp()),
                               rtol=1e-6)
    norms = U.jacobian_norm(c.model, jax.random.PRNGKey(0), fs.keys)
    self.assertLessEqual(float(norms.max()), float(bound))

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit(self):
    params = _random_mlp(5, 4, 8, 'clipped')
    got = self.variant(U.lipschitz_bound)(params)
    chex.assert_shape(got, ())
    np.testing.assert_allclose(got, U.lipschitz_bound(params), rtol=1e-6)


class RobustnessRadiusTest(chex.TestCase, parameterized.TestCase):
  # One static configuration (num_directions, iters) for most tests, so they
  # share compiled programs; max_radius is traced.
  CONFIG = dict(num_directions=32, iters=24)

  def _radius(self, key, **kwargs):
    return U.robustness_radius(_identity, key, FS_2D,
                               **{**self.CONFIG, **kwargs})

  @parameterized.parameters(2, 256)
  def test_hand_built_known_answer(self, chunk_size):
    key = jax.random.PRNGKey(0)
    radii = self._radius(key, chunk_size=chunk_size)
    chex.assert_shape(radii, (5,))
    dirs = U.sample_directions(key, 5, self.CONFIG['num_directions'], 2)
    chex.assert_shape(dirs, (5, self.CONFIG['num_directions'], 2))
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=-1), 1.0, rtol=1e-6)
    want = _expected_radius_2d(dirs, 1.0)
    np.testing.assert_allclose(radii, want, atol=1e-5)
    self.assertEqual(float(radii[3]), 0.0)   # wrong at r = 0
    self.assertEqual(float(radii[4]), 1.0)   # correct at max_radius
    # Bisection reports a correct point: never beyond the boundary.
    self.assertTrue(np.all(np.asarray(radii) <= want + 1e-6))

  def test_many_directions_approach_true_distance(self):
    radii = U.robustness_radius(_identity, jax.random.PRNGKey(1), FS_2D,
                                num_directions=512)
    np.testing.assert_allclose(radii, [0.3, 0.2, 0.05, 0.0, 1.0], rtol=2e-3)

  def test_max_radius_caps(self):
    key = jax.random.PRNGKey(1)
    radii = np.asarray(self._radius(key, max_radius=0.1))
    np.testing.assert_allclose(radii[[0, 1, 4]], 0.1)
    self.assertLess(radii[2], 0.1)
    want = _expected_radius_2d(U.sample_directions(key, 5, 32, 2), 0.1)
    np.testing.assert_allclose(radii, want, atol=1e-6)

  def test_deterministic_for_fixed_key(self):
    np.testing.assert_array_equal(self._radius(jax.random.PRNGKey(3)),
                                  self._radius(jax.random.PRNGKey(3)))
    self.assertFalse(np.array_equal(self._radius(jax.random.PRNGKey(3)),
                                    self._radius(jax.random.PRNGKey(4))))

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_and_typed_keys(self):
    f = self.variant(lambda k, v, m, key, r: U.robustness_radius(
        _identity, key, FactSet(k, v, m), max_radius=r, **self.CONFIG))
    got = f(KEYS_2D, VALUES_2D, MAPPING_2D, jax.random.key(0), 1.0)
    want = _expected_radius_2d(
        U.sample_directions(jax.random.key(0), 5, 32, 2), 1.0)
    np.testing.assert_allclose(got, want, atol=1e-5)

  def test_constructed_encoder_decoder_is_robust_at_every_key(self):
    fs, c = _construction()
    radii = U.robustness_radius(c.model, jax.random.PRNGKey(0), fs,
                                num_directions=8,
                                max_radius=0.5, iters=16)
    chex.assert_shape(radii, (16,))
    self.assertGreater(float(radii.min()), 0.0)
    # The factorised model and its gated-MLP form agree.
    mlp = c.mlp
    radii_mlp = U.robustness_radius(
        lambda x: mlp(x), jax.random.PRNGKey(0), fs, num_directions=8,
        max_radius=0.5, iters=16)
    np.testing.assert_allclose(radii, radii_mlp, atol=1e-4)


class NoiseFloorTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_known_values(self):
    targets = np.zeros((4, 2), np.float32)
    inputs = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0], [0.0, 2.0]],
                      np.float32)
    got = self.variant(U.noise_floor)(inputs, targets)
    np.testing.assert_allclose(got.distances, [5.0, 1.0, 0.0, 2.0])
    np.testing.assert_allclose(got.max, 5.0)
    np.testing.assert_allclose(got.mean, 2.0)
    np.testing.assert_allclose(got.p95, np.percentile([5, 1, 0, 2], 95),
                               rtol=1e-6)


class ErrorsTest(parameterized.TestCase):

  def _radius(self, **overrides):
    args = dict(fn=_identity, keys=KEYS_2D, values=VALUES_2D,
                mapping=MAPPING_2D, key=jax.random.PRNGKey(0))
    args.update(overrides)
    fs = FactSet(args.pop('keys'), args.pop('values'), args.pop('mapping'))
    return U.robustness_radius(args.pop('fn'), args.pop('key'), fs, **args)

  @parameterized.named_parameters(
      ('keys_1d', dict(keys=KEYS_2D[0]), 'keys must have shape'),
      ('values_3d', dict(values=VALUES_2D[None]), 'values must have shape'),
      ('dim_mismatch', dict(values=np.ones((2, 3), np.float32)),
       'dimension'),
      ('mapping_length', dict(mapping=MAPPING_2D[:3]), 'mapping has length'),
      ('mapping_range', dict(mapping=np.array([0, 1, 2, 0, 0])),
       'out of range'),
      ('mapping_negative', dict(mapping=np.array([0, -1, 0, 0, 0])),
       'out of range'),
      ('mapping_float', dict(mapping=MAPPING_2D.astype(np.float32)),
       'integer dtype'),
      ('keys_nan', dict(keys=np.where(KEYS_2D == 0.5, np.nan, KEYS_2D)),
       'non-finite'),
      ('keys_empty', dict(keys=np.zeros((0, 2), np.float32),
                          mapping=np.zeros((0,), np.int32)), 'empty'),
      ('keys_bool', dict(keys=KEYS_2D > 0), 'real numbers'),
      ('num_directions_0', dict(num_directions=0), 'num_directions'),
      ('num_directions_float', dict(num_directions=4.0), 'num_directions'),
      ('max_radius_0', dict(max_radius=0.0), 'max_radius'),
      ('max_radius_negative', dict(max_radius=-1.0), 'max_radius'),
      ('max_radius_inf', dict(max_radius=float('inf')), 'max_radius'),
      ('iters_0', dict(iters=0), 'iters'),
      ('chunk_size_0', dict(chunk_size=0), 'chunk_size'),
      ('fn_not_callable', dict(fn=3), 'callable'),
      ('fn_wrong_shape', dict(fn=lambda x: x[..., :1]), 'fn must map'),
      ('fn_fails', dict(fn=lambda x: x @ jnp.ones((3, 2))), 'fn failed'),
  )
  def test_robustness_radius_errors(self, overrides, match):
    with self.assertRaisesRegex(FactStoreError, match):
      self._radius(**overrides)

  @parameterized.named_parameters(
      ('x_1d', dict(x=np.ones(3)), 'x must have shape'),
      ('x_nan', dict(x=np.full((2, 3), np.nan)), 'non-finite'),
      ('x_empty', dict(x=np.ones((0, 3))), 'empty'),
      ('iters_0', dict(iters=0), 'iters'),
      ('chunk_size_0', dict(chunk_size=0), 'chunk_size'),
      ('fn_scalar', dict(fn=jnp.sum), 'fn must map'),
  )
  def test_jacobian_norm_errors(self, overrides, match):
    args = dict(fn=_identity, x=np.ones((2, 3), np.float32),
                key=jax.random.PRNGKey(0))
    args.update(overrides)
    with self.assertRaisesRegex(FactStoreError, match):
      U.jacobian_norm(args.pop('fn'), args.pop('key'), args.pop('x'), **args)

  def test_lipschitz_bound_errors(self):
    params = _random_mlp(0, 4, 6, 'relu')
    with self.assertRaisesRegex(FactStoreError, 'GatedMLP or an EncoderDec'):
      U.lipschitz_bound({'w': jnp.ones((2, 2))})
    with self.assertRaisesRegex(FactStoreError, 'radius'):
      U.lipschitz_bound(params, radius=0.0)
    with self.assertRaisesRegex(FactStoreError, 'radius'):
      U.lipschitz_bound(params, radius=-2.0)
    with self.assertRaisesRegex(FactStoreError, 'w_down has'):
      U.lipschitz_bound(params.replace(w_down=jnp.ones((5, 4))))
    with self.assertRaisesRegex(FactStoreError, 'w_up has shape'):
      U.lipschitz_bound(params.replace(w_up=jnp.ones((4, 5))))
    with self.assertRaisesRegex(FactStoreError, 'b_gate must have shape'):
      U.lipschitz_bound(params.replace(b_gate=jnp.ones((5,))))
    with self.assertRaisesRegex(FactStoreError, 'unknown activation'):
      U.lipschitz_bound(params.replace(activation='tanh'))

  def test_noise_floor_errors(self):
    with self.assertRaisesRegex(FactStoreError, 'targets have shape'):
      U.noise_floor(np.ones((3, 2)), np.ones((2, 2)))
    with self.assertRaisesRegex(FactStoreError, 'inputs must have shape'):
      U.noise_floor(np.ones(3), np.ones(3))
    with self.assertRaisesRegex(FactStoreError, 'empty'):
      U.noise_floor(np.ones((0, 2)), np.ones((0, 2)))

  def test_sample_directions_errors(self):
    with self.assertRaisesRegex(FactStoreError, 'num_directions'):
      U.sample_directions(jax.random.PRNGKey(0), 3, 0, 2)
