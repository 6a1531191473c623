"""Tests for the NTK and Hebbian / bilinear baselines.

See docs/design.md, "Baselines".

Shapes are small and shared between tests on purpose: on a 2-core CPU most of
the time goes to XLA compilation, which is cached per shape.
"""

from __future__ import annotations

import functools
import math

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
from numpy.polynomial import hermite_e
import pytest

from factstore_jax import factsets as F
from factstore_jax import mlp as M
from factstore_jax import storage
from factstore_jax.baselines import hebbian as H
from factstore_jax.baselines import ntk
from factstore_jax.errors import FactStoreError
from factstore_jax.threads import single_threaded_blas

N, D = 32, 16        # main fact set
MAXW = 48            # > N: the masked ridge takes the dual form by default
WIDTHS = (1, 20)     # sliced widths checked against the masked ones
NKEYS = 2            # PRNG keys vmapped over

# name: (sliced, masked, options, num_params formula)
METHODS = {
    'ntk': (ntk.ntk_mlp, ntk.ntk_mlp_masked, {}, ntk.ntk_num_params),
    'hebbian': (H.hebbian_mlp, H.hebbian_mlp_masked, {'readout': 'hebbian'},
                H.hebbian_num_params),
    'ridge': (H.hebbian_mlp, H.hebbian_mlp_masked, {'readout': 'ridge'},
              H.hebbian_num_params),
    'data_dependent': (H.hebbian_mlp, H.hebbian_mlp_masked,
                       {'readout': 'data_dependent'}, H.hebbian_num_params),
}
NAMED = [(name,) for name in METHODS]
SOLVED = ('ridge', 'data_dependent')  # readouts from a linear solve


def _factset(seed: int = 0, n: int = N, d: int = D, **kw) -> F.FactSet:
  return F.random_factset(jax.random.key(seed), n, d, **kw)


def _outputs(mlp: M.GatedMLP, x) -> np.ndarray:
  return np.asarray(mlp(x))


def _assert_outputs_close(a, b, rel=1e-4):
  """``a == b`` up to ``rel`` times their largest entry."""
  a, b = np.asarray(a), np.asarray(b)
  scale = max(np.abs(a).max(), np.abs(b).max(), 1e-30)
  np.testing.assert_allclose(a / scale, b / scale, rtol=0, atol=rel)


def _member(tree, *index):
  return jax.tree.map(lambda a: a[index], tree)


@functools.lru_cache(maxsize=None)
def _sliced_jit(name: str, width: int):
  sliced, _, opts, _ = METHODS[name]
  return jax.jit(functools.partial(sliced, width=width, **opts))


@functools.lru_cache(maxsize=None)
def _masked_jit(name: str, max_width: int):
  """``(keys (K,), factset, widths (W,)) -> GatedMLP stacked (K, W)``.

  vmap over PRNG keys and over traced widths: one compiled program.
  """
  _, masked, opts, _ = METHODS[name]
  one = lambda k, fs, w: masked(k, fs, w, max_width=max_width, **opts)
  over_widths = jax.vmap(one, in_axes=(None, None, 0))
  return jax.jit(jax.vmap(over_widths, in_axes=(0, None, None)))


class HermiteTest(parameterized.TestCase):

  def test_orthonormal_under_gaussian(self):
    z, w = hermite_e.hermegauss(40)
    w = w / w.sum()  # Gauss-Hermite_e weights of N(0, 1)
    with jax.enable_x64(True):
      h = np.stack([np.asarray(ntk.hermite(jnp.asarray(z), k))
                    for k in range(7)])
    gram = (h * w) @ h.T
    np.testing.assert_allclose(gram, np.eye(7), atol=1e-9)

  @parameterized.parameters(0, 1, 2, 3, 5)
  def test_matches_numpy_hermite_e(self, k):
    z = np.linspace(-3, 3, 13)
    coef = np.zeros(k + 1)
    coef[k] = 1 / math.sqrt(math.factorial(k))
    with jax.enable_x64(True):
      got = np.asarray(ntk.hermite(jnp.asarray(z), k))
    np.testing.assert_allclose(got, hermite_e.hermeval(z, coef), atol=1e-12)

  def test_bad_degree(self):
    with pytest.raises(FactStoreError, match='degree'):
      ntk.hermite(jnp.zeros(3), -1)


class BaselineTest(parameterized.TestCase):

  @parameterized.parameters(*NAMED)
  def test_shapes_num_params_determinism(self, name):
    _, _, _, count = METHODS[name]
    fs = _factset()
    for width in WIDTHS:
      mlp = _sliced_jit(name, width)(jax.random.key(1), fs)
      chex.assert_shape([mlp.w_gate, mlp.w_up], (D, width))
      chex.assert_shape(mlp.w_down, (width, D))
      assert mlp.b_gate is None and mlp.b_up is None and mlp.b_down is None
      assert mlp.activation == ('relu' if name == 'ntk' else 'identity')
      assert M.num_params(mlp) == count(D, width) == 3 * D * width
      chex.assert_tree_all_finite(mlp)
    # Same key, same MLP (bit for bit); another key, another MLP.
    again = _sliced_jit(name, width)(jax.random.key(1), fs)
    other = _sliced_jit(name, width)(jax.random.key(2), fs)
    chex.assert_trees_all_equal(mlp, again)
    assert not np.array_equal(np.asarray(mlp.w_gate),
                              np.asarray(other.w_gate))

  @parameterized.parameters(*NAMED)
  def test_masked_vmapped_equals_sliced_loop(self, name):
    """vmap over keys and traced widths == a Python loop of sliced MLPs."""
    fs = _factset()
    keys = jax.random.split(jax.random.key(3), NKEYS)
    with single_threaded_blas():
      stacked = jax.block_until_ready(_masked_jit(name, MAXW)(
          keys, fs, jnp.asarray(WIDTHS)))
    probe = jax.random.normal(jax.random.key(4), (5, D))
    x = jnp.concatenate([fs.keys, probe])
    for a in range(NKEYS):
      for b, width in enumerate(WIDTHS):
        masked = _member(stacked, a, b)
        chex.assert_shape(masked.w_gate, (D, MAXW))
        # Units >= width contribute exactly zero.
        np.testing.assert_array_equal(np.asarray(masked.w_up)[:, width:], 0)
        np.testing.assert_array_equal(np.asarray(masked.w_down)[width:], 0)
        sliced = _sliced_jit(name, width)(keys[a], fs)
        # The same features, a prefix of the padded ones (data_dependent's
        # are fitted: float32 solves, batched or not, differ in rounding).
        np.testing.assert_allclose(masked.w_gate[:, :width], sliced.w_gate,
                                   rtol=1e-4, atol=1e-6)
        # Ridge: the masked model is solved in the dual (N x N, rank-deficient
        # plus lam) and the sliced one in the primal: float32 rounding.
        _assert_outputs_close(_outputs(masked, x), _outputs(sliced, x),
                              rel=2e-3 if name in SOLVED else 1e-4)

  def test_ntk_degree2_masked_equals_sliced(self):
    fs = _factset()
    key = jax.random.key(5)
    masked = ntk.ntk_mlp_masked(key, fs, 7, max_width=MAXW, degree=2)
    sliced = ntk.ntk_mlp(key, fs, 7, degree=2)
    np.testing.assert_array_equal(np.asarray(masked.w_up)[:, 7:], 0)
    _assert_outputs_close(_outputs(masked, fs.keys), _outputs(sliced, fs.keys))

  def test_features_nested(self):
    """Unit r's random weights depend on (key, r) only: widths nest.

    (The masked-vs-sliced test checks the same for every method's gate
    weights, including the fitted data-dependent ones.)
    """
    fs = _factset()
    key = jax.random.key(7)
    small, big = 8, MAXW
    g_s, d_s = ntk.ntk_features(key, fs.keys, small)
    g_b, d_b = ntk.ntk_features(key, fs.keys, big)
    np.testing.assert_array_equal(g_s, g_b[:small])
    np.testing.assert_array_equal(d_s, d_b[:small])
    r_s = H.random_features(key, D, small)
    r_b = H.random_features(key, D, big)
    chex.assert_trees_all_equal(r_s, jax.tree.map(lambda a: a[:small], r_b))

  def test_primal_equals_dual_float64(self):
    width = 16  # < N: the primal is the default; without lam the dual would
                # be singular

    @jax.jit
    def build(key, fs):
      return (H.hebbian_mlp(key, fs, width, solver='primal'),
              H.hebbian_mlp(key, fs, width, solver='dual'),
              # Masked and padded (primal, unit diagonal on masked units).
              H.hebbian_mlp_masked(key, fs, width, max_width=MAXW,
                                   solver='primal'),
              # ridge = 0 and m > N: the dual interpolates the targets.
              H.hebbian_mlp(key, fs, MAXW, ridge=0.0))

    with jax.enable_x64(True):
      fs = jax.tree.map(lambda a: a.astype(np.float64)
                        if a.dtype == np.float32 else a,
                        jax.device_get(_factset()))
      fs = F.FactSet(*(jnp.asarray(a) for a in fs))
      primal, dual, masked, interp = build(jax.random.key(9), fs)
      chex.assert_type(primal.w_down, jnp.float64)
      np.testing.assert_allclose(primal.w_down, dual.w_down,
                                 rtol=1e-8, atol=1e-10)
      np.testing.assert_allclose(masked.w_down[:width], dual.w_down,
                                 rtol=1e-8, atol=1e-10)
      np.testing.assert_allclose(interp(fs.keys),
                                 fs.values[fs.mapping], atol=1e-8)


class KnownCaseTest(parameterized.TestCase):
  """Tied sphere permutation, N = 32, d = 16: narrow (4) vs wide (48 > N).

  Reuses the compiled masked program of the tests above (same shapes; the
  widths are traced).
  """

  SWEEP = (4, MAXW)

  @parameterized.parameters(*NAMED)
  def test_accuracy_grows_with_width(self, name):
    fs = _factset(seed=11)
    keys = jax.random.split(jax.random.key(12), NKEYS)
    with single_threaded_blas():
      stacked = jax.block_until_ready(_masked_jit(name, MAXW)(
          keys, fs, jnp.asarray(self.SWEEP)))
    evaluate = jax.vmap(jax.vmap(storage.evaluate_mlp, in_axes=(0, None)),
                        in_axes=(0, None))
    reports = jax.jit(evaluate)(stacked, fs)
    acc = np.asarray(reports.accuracy)           # (keys, widths)
    assert np.all(acc[:, -1] > acc[:, 0]), acc
    if name in SOLVED:  # a ridge readout with m >= N interpolates: stores
      np.testing.assert_array_equal(acc[:, -1], 1.0)
      assert np.all(np.asarray(reports.min_margin)[:, -1] > 0)


class ErrorTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('ntk_width0', lambda fs, k: ntk.ntk_mlp(k, fs, 0), 'width must be >= 1'),
      ('ntk_too_wide', lambda fs, k: ntk.ntk_mlp(k, fs, 9, max_width=8),
       'exceeds max_width'),
      ('ntk_degree0', lambda fs, k: ntk.ntk_mlp(k, fs, 4, degree=0),
       'degree must be >= 1'),
      ('ntk_float_width', lambda fs, k: ntk.ntk_mlp(k, fs, 4.0),
       'width must be a Python int'),
      ('ntk_masked_width0',
       lambda fs, k: ntk.ntk_mlp_masked(k, fs, 0, max_width=8),
       'width must be >= 1'),
      ('ntk_masked_too_wide',
       lambda fs, k: ntk.ntk_mlp_masked(k, fs, jnp.asarray(9), max_width=8),
       'exceeds max_width'),
      ('ntk_masked_no_max',
       lambda fs, k: ntk.ntk_mlp_masked(k, fs, 3, max_width=None),
       'max_width must be a Python int'),
      ('heb_width0', lambda fs, k: H.hebbian_mlp(k, fs, 0),
       'width must be >= 1'),
      ('heb_too_wide', lambda fs, k: H.hebbian_mlp(k, fs, 9, max_width=8),
       'exceeds max_width'),
      ('heb_masked_too_wide',
       lambda fs, k: H.hebbian_mlp_masked(k, fs, 9, max_width=8),
       'exceeds max_width'),
      ('heb_neg_ridge', lambda fs, k: H.hebbian_mlp(k, fs, 4, ridge=-1e-3),
       'ridge must be >= 0'),
      ('heb_nan_ridge',
       lambda fs, k: H.hebbian_mlp(k, fs, 4, ridge=float('nan')),
       'ridge must be >= 0'),
      ('heb_readout', lambda fs, k: H.hebbian_mlp(k, fs, 4, readout='ols'),
       'unknown readout'),
      ('heb_masked_readout',
       lambda fs, k: H.hebbian_mlp_masked(k, fs, 4, max_width=8, readout='x'),
       'unknown readout'),
      ('heb_solver', lambda fs, k: H.hebbian_mlp(k, fs, 4, solver='qr'),
       'unknown solver'),
      ('heb_fit_reg', lambda fs, k: H.hebbian_mlp(
          k, fs, 4, readout='data_dependent', fit_reg=0.0), 'fit_reg'),
      ('batched_factset', lambda fs, k: ntk.ntk_mlp(
          k, F.stack_factsets([fs, fs]), 4), 'unbatched fact set'),
      ('ntk_params', lambda fs, k: ntk.ntk_num_params(16, 0),
       'must be >= 1'),
      ('heb_params', lambda fs, k: H.hebbian_num_params(0, 4),
       'must be >= 1'),
  )
  def test_error(self, call, match):
    with pytest.raises(FactStoreError, match=match):
      call(_factset(), jax.random.key(0))

  def test_traced_width_is_clipped(self):
    fs = _factset()
    build = jax.jit(lambda w: ntk.ntk_mlp_masked(jax.random.key(0), fs, w,
                                                 max_width=8))
    big, full = build(jnp.asarray(100)), ntk.ntk_mlp(jax.random.key(0), fs, 8)
    _assert_outputs_close(_outputs(big, fs.keys), _outputs(full, fs.keys))
