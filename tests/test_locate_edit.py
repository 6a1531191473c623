"""Tests for ROME, MEMIT and AlphaEdit updates of w_down (editing/locate.py).

Every update is checked against its defining property (exact edits, minimal
C-norm, null-space changes) and against a float64 NumPy reference of its
formula (AlphaEdit's in the paper's own column convention, so the row-form
derivation is tested too). One problem size (h = 16, d = 8, E = 4) is shared
so XLA compiles each function once or twice.
"""

from __future__ import annotations

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from factstore_jax import mlp as M
from factstore_jax.transformer.editing import locate as L
from factstore_jax.errors import FactStoreError

H, D, E, NUM_PRESERVED, RANK = 16, 8, 4, 200, 10


def _problem(seed=0, h=H, d=D, e=E):
  """w (h, d), edit keys (e, h) and values (e, d), a full-rank C (h, h)."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(h, d)) / np.sqrt(h)
  keys = rng.normal(size=(e, h)) / np.sqrt(h)
  values = rng.normal(size=(e, d))
  preserved = rng.normal(size=(NUM_PRESERVED, h)) / np.sqrt(h)
  cov = preserved.T @ preserved / NUM_PRESERVED
  f32 = lambda a: a.astype(np.float32)
  return f32(w), f32(keys), f32(values), f32(cov)


def _low_rank_keys(seed=1, h=H, rank=RANK, m=NUM_PRESERVED, dtype=np.float32):
  """Preserved keys (m, h) spanning a random rank-``rank`` subspace (basis)."""
  rng = np.random.default_rng(seed)
  basis = np.linalg.qr(rng.normal(size=(h, rank)))[0].T       # (rank, h)
  keys = rng.normal(size=(m, rank)) @ basis
  return keys.astype(dtype), basis


def _np_rome(w, keys, values, cov, ridge):
  w, cov = np.array(w, np.float64), np.asarray(cov, np.float64)
  h = cov.shape[0]
  c = cov + ridge * np.trace(cov) / h * np.eye(h)
  for k, v in zip(np.asarray(keys, np.float64), np.asarray(values, np.float64)):
    u = np.linalg.solve(c, k)
    w = w + np.outer(u, v - k @ w) / (u @ k)
  return w


def _np_memit(w, keys, values, cov, lam):
  w, k, v, c = (np.asarray(a, np.float64) for a in (w, keys, values, cov))
  return w + np.linalg.solve(lam * c + k.T @ k, k.T @ (v - k @ w))


def _np_alphaedit_paper(w, keys, values, p, lam, prior_keys=None):
  """The paper's column form: W (d, h), keys as columns; returns W'^T."""
  w, k, v, p = (np.asarray(a, np.float64) for a in (w, keys, values, p))
  big_w, k1 = w.T, k.T                                        # (d, h), (h, E)
  r = v.T - big_w @ k1                                        # (d, E)
  h = p.shape[0]
  kpkp = np.zeros((h, h))
  if prior_keys is not None:
    kp = np.asarray(prior_keys, np.float64).T                 # (h, E_p)
    kpkp = kp @ kp.T
  a = kpkp @ p + k1 @ k1.T @ p + lam * np.eye(h)
  delta = np.linalg.solve(a.T, (r @ k1.T @ p).T).T            # B A^{-1}
  return (big_w + delta).T


def _np(a):
  return np.asarray(a, np.float64)


def _c_norm(delta, cov):
  delta, cov = np.asarray(delta, np.float64), np.asarray(cov, np.float64)
  return float(np.trace(delta.T @ cov @ delta))


def _mlp(activation='relu', d=6, seed=0):
  rng = np.random.default_rng(seed)
  f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return M.GatedMLP(w_gate=f32(d, H), w_up=f32(d, H), w_down=f32(H, d),
                    b_gate=f32(H), b_up=f32(H), b_down=f32(d),
                    activation=activation)


class HiddenStatesTest(chex.TestCase):

  @parameterized.named_parameters(('relu', 'relu'), ('silu', 'silu'))
  def test_down_projection_of_hidden_is_the_mlp(self, activation):
    params = _mlp(activation)
    x = np.random.default_rng(1).normal(size=(5, 6)).astype(np.float32)
    hidden = _np(L.hidden_states(params, x))
    chex.assert_shape(hidden, (5, H))
    want = _np(jax.jit(M.GatedMLP.__call__)(params, x))
    np.testing.assert_allclose(
        hidden @ _np(params.w_down) + _np(params.b_down), want, rtol=1e-5,
        atol=1e-5)


class SecondMomentTest(chex.TestCase):

  def test_matches_numpy(self):
    keys = np.random.default_rng(0).normal(size=(50, H)).astype(np.float32)
    c = L.second_moment(keys)
    self.assertEqual(c.dtype, jnp.float32)
    k64 = keys.astype(np.float64)
    c = _np(c)
    np.testing.assert_allclose(c, k64.T @ k64 / 50, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(c, c.T)

  def test_integer_and_half_keys_give_float32(self):
    keys = np.arange(12).reshape(4, 3)
    for k in (keys, keys.astype(np.float16)):
      c = L.second_moment(k)
      self.assertEqual(c.dtype, jnp.float32)
      np.testing.assert_allclose(c, keys.T @ keys / 4)


class RomeTest(chex.TestCase):

  def test_single_edit_is_exact(self):
    w, keys, values, cov = _problem()
    w_new = L.rome(w, keys[:1], values[:1], cov)
    chex.assert_shape(w_new, (H, D))
    self.assertEqual(w_new.dtype, jnp.float32)
    w_new = _np(w_new)
    np.testing.assert_allclose(keys[0] @ w_new, values[0], atol=1e-4)

  def test_sequential_last_edit_is_exact(self):
    w, keys, values, cov = _problem(seed=1)
    w_new = np.asarray(L.rome(w, keys, values, cov), np.float64)
    np.testing.assert_allclose(keys[-1] @ w_new, values[-1], atol=1e-4)
    # The earlier edits were moved by the later ones (generic keys) ...
    self.assertGreater(np.abs(keys[0] @ w_new - values[0]).max(), 1e-3)
    # ... exactly as the float64 reference moves them.
    np.testing.assert_allclose(w_new, _np_rome(w, keys, values, cov, 1e-6),
                               rtol=1e-3, atol=1e-4)

  def test_keys_orthogonal_in_c_are_all_exact(self):
    w, _, values, cov = _problem(seed=2)
    # K = O C^{1/2} with orthonormal rows O: k_i^T C^{-1} k_j = delta_ij.
    evals, evecs = np.linalg.eigh(cov.astype(np.float64))
    c_half = evecs @ np.diag(np.sqrt(evals)) @ evecs.T
    o = np.linalg.qr(np.random.default_rng(3).normal(size=(H, E)))[0].T
    keys = (o @ c_half).astype(np.float32)
    w_new = _np(L.rome(w, keys, values, cov, ridge=0.0))
    np.testing.assert_allclose(keys @ w_new, values, atol=1e-4)

  def test_step_has_minimal_c_norm(self):
    w, keys, values, cov = _problem(seed=4)
    k, v = keys[0], values[0]
    delta = np.asarray(L.rome(w, keys[:1], values[:1], cov, ridge=0.0),
                       np.float64) - w
    # Closed-form least-C-norm solution of k (w + D) = v, in float64.
    c = cov.astype(np.float64)
    u = np.linalg.solve(c, k.astype(np.float64))
    expected = np.outer(u, values[0] - k @ w.astype(np.float64)) / (u @ k)
    np.testing.assert_allclose(delta, expected, rtol=1e-3, atol=1e-5)
    # Any other solution Delta + D (k D = 0) has a larger C-norm.
    rng = np.random.default_rng(5)
    base = _c_norm(delta, cov)
    for _ in range(5):
      z = rng.normal(size=(H, D)) * 0.1
      perturb = z - np.outer(k, k @ z) / (k @ k)             # k @ perturb = 0
      np.testing.assert_allclose(k @ perturb, 0, atol=1e-6)
      np.testing.assert_allclose(k @ (w + delta + perturb), v, atol=1e-4)
      self.assertLess(base, _c_norm(delta + perturb, cov))


class MemitTest(chex.TestCase):

  def test_tiny_lam_makes_edits_exact(self):
    w, keys, values, cov = _problem()
    w_new = _np(L.memit(w, keys, values, cov, lam=1e-6))
    np.testing.assert_allclose(keys @ w_new, values, atol=1e-4)

  @parameterized.parameters(1e-2, 0.1, 10.0)
  def test_matches_numpy_reference(self, lam):
    # lam * C + K^T K has condition number ~ 30 / lam here: float32 solves
    # are accurate to ~ 1e-7 * cond relative to the update (float64 is tight).
    w, keys, values, cov = _problem(seed=1)
    want = _np_memit(w, keys, values, cov, lam)
    np.testing.assert_allclose(_np(L.memit(w, keys, values, cov, lam=lam)), want,
                               atol=2e-4 * np.abs(want - w).max())

  def test_c_norm_shrinks_and_error_grows_with_lam(self):
    w, keys, values, cov = _problem(seed=2)
    norms, errors = [], []
    for lam in (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0):
      w_new = np.asarray(L.memit(w, keys, values, cov, lam=lam), np.float64)
      norms.append(_c_norm(w_new - w, cov))
      errors.append(np.sum((keys @ w_new - values) ** 2))
    self.assertTrue(np.all(np.diff(norms) < 0), norms)
    self.assertTrue(np.all(np.diff(errors) > 0), errors)
    # With C = I the C-norm is the Frobenius norm of Delta.
    frobenius = [np.linalg.norm(_np(L.memit(w, keys, values, np.eye(H),
                                            lam=lam)) - w)
                 for lam in (1e-3, 1e-1, 10.0)]
    self.assertTrue(np.all(np.diff(frobenius) < 0), frobenius)

  @parameterized.parameters(0.05, 0.3, 5.0)
  def test_single_edit_is_scaled_rome(self, lam):
    w, keys, values, cov = _problem(seed=3)
    k64 = keys[0].astype(np.float64)
    s = k64 @ np.linalg.solve(cov.astype(np.float64), k64)
    rome_delta = _np(L.rome(w, keys[:1], values[:1], cov, ridge=0.0)) - w
    memit_delta = _np(L.memit(w, keys[:1], values[:1], cov, lam=lam)) - w
    np.testing.assert_allclose(memit_delta, s / (lam + s) * rome_delta,
                               rtol=1e-3, atol=1e-5)

  def test_vmap_equals_loop(self):
    problems = [_problem(seed=s) for s in range(3)]
    w, keys, values = (np.stack([p[i] for p in problems]) for i in range(3))
    cov = problems[0][3]
    fn = lambda w, k, v: L.memit(w, k, v, cov, lam=0.05)
    batched = jax.vmap(fn)(w, keys, values)
    chex.assert_shape(batched, (3, H, D))
    for i in range(3):
      # Batched and single float32 solves may differ on a GPU (seen: 4e-5).
      np.testing.assert_allclose(_np(batched[i]),
                                 _np(fn(w[i], keys[i], values[i])),
                                 rtol=1e-4, atol=1e-4)


class NullSpaceProjectorTest(chex.TestCase):

  def test_low_rank_cov(self):
    preserved, basis = _low_rank_keys()
    p = _np(L.null_space_projector(L.second_moment(preserved)))
    np.testing.assert_allclose(p, p.T, atol=1e-6)
    np.testing.assert_allclose(p @ p, p, atol=1e-5)
    self.assertEqual(np.linalg.matrix_rank(p, tol=1e-3), H - RANK)
    self.assertAlmostEqual(np.trace(p), H - RANK, places=4)
    np.testing.assert_allclose(preserved @ p, 0, atol=1e-5)
    # Vectors orthogonal to the preserved subspace are kept.
    z = np.random.default_rng(0).normal(size=(3, H))
    z -= z @ basis.T @ basis
    np.testing.assert_allclose(z @ p, z, atol=1e-5)

  @parameterized.parameters((1e-2, 3), (1e-3, 1), (0.3, 5), (1.0, 7))
  def test_rank_follows_rel_tol(self, rel_tol, rank):
    evals = np.array([1.0, 0.9, 0.5, 0.2, 0.05, 5e-3, 5e-3, 1e-4])
    q = np.linalg.qr(np.random.default_rng(1).normal(size=(8, 8)))[0]
    cov = (q * evals) @ q.T
    p = np.asarray(L.null_space_projector(cov.astype(np.float32),
                                          rel_tol=rel_tol), np.float64)
    self.assertAlmostEqual(np.trace(p), rank, places=4)
    small = q[:, evals < rel_tol]
    np.testing.assert_allclose(p, small @ small.T, atol=1e-5)

  def test_zero_cov_gives_identity(self):
    np.testing.assert_allclose(_np(L.null_space_projector(np.zeros((4, 4)))),
                               np.eye(4), atol=1e-6)


class AlphaEditTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    self.w, self.keys, self.values, _ = _problem(seed=7)
    self.preserved, self.basis = _low_rank_keys()
    self.p = _np(L.null_space_projector(L.second_moment(self.preserved)))

  def test_update_lies_in_null_space(self):
    w_new = L.alphaedit(self.w, self.keys, self.values, self.p, lam=0.1)
    delta = _np(w_new) - self.w
    self.assertGreater(np.abs(delta).max(), 0.1)
    np.testing.assert_allclose(self.p @ delta, delta, atol=1e-5)

  def test_preserved_kept_and_edits_reached(self):
    w_new = L.alphaedit(self.w, self.keys, self.values, self.p, lam=1e-6)
    fit = L.edit_fit(self.w, w_new, self.keys, self.values, self.preserved)
    self.assertIsInstance(fit, L.EditFit)
    self.assertLess(float(fit.preserved_change), 1e-4)
    self.assertLess(float(fit.edit_error), 1e-4)
    # The plain MEMIT edit moves the preserved outputs a lot.
    w_memit = L.memit(self.w, self.keys, self.values, np.eye(H), lam=1e-6)
    fit_memit = L.edit_fit(self.w, w_memit, self.keys, self.values,
                           self.preserved)
    self.assertGreater(float(fit_memit.preserved_change), 0.1)

  def test_preserved_change_bounded_by_discarded_eigenvalues(self):
    rng = np.random.default_rng(8)
    preserved = self.preserved + 1e-3 * rng.normal(size=self.preserved.shape)
    preserved = preserved.astype(np.float32)
    cov = L.second_moment(preserved)
    p = L.null_space_projector(cov)
    evals = np.linalg.eigvalsh(np.asarray(cov, np.float64))
    discarded = evals[evals < 1e-2 * evals[-1]]
    self.assertLen(discarded, H - RANK)
    self.assertGreater(discarded.max(), 0)
    w_new = L.alphaedit(self.w, self.keys, self.values, p, lam=1e-3)
    delta = _np(w_new) - self.w
    change = np.abs(preserved @ delta).max()
    bound = np.sqrt(NUM_PRESERVED * discarded.max()) * np.linalg.norm(delta, 2)
    self.assertGreater(change, 0)
    self.assertLessEqual(change, bound * (1 + 1e-3) + 1e-6)
    fit = L.edit_fit(self.w, w_new, self.keys, self.values, preserved)
    np.testing.assert_allclose(float(fit.preserved_change), change, rtol=1e-3)

  @parameterized.named_parameters(('no_prior', False), ('prior', True))
  def test_matches_paper_column_form(self, with_prior):
    prior = (np.random.default_rng(9).normal(size=(3, H)).astype(np.float32)
             if with_prior else None)
    got = L.alphaedit(self.w, self.keys, self.values, self.p, lam=0.5,
                      prior_keys=prior)
    want = _np_alphaedit_paper(self.w, self.keys, self.values, self.p, 0.5,
                               prior)
    np.testing.assert_allclose(_np(got), want, rtol=1e-3, atol=1e-5)

  def test_prior_keys_are_kept_closer(self):
    # Earlier edits' keys in the null space: naming them penalises moving them.
    rng = np.random.default_rng(10)
    prior = rng.normal(size=(3, H))
    prior = (prior - prior @ self.basis.T @ self.basis).astype(np.float32)
    changes = []
    for prior_keys in (None, prior):
      w_new = L.alphaedit(self.w, self.keys, self.values, self.p, lam=0.1,
                          prior_keys=prior_keys)
      changes.append(np.sum((prior @ (_np(w_new) - self.w)) ** 2))
    self.assertLess(changes[1], changes[0])

  def test_empty_prior_keys_is_none(self):
    a = L.alphaedit(self.w, self.keys, self.values, self.p, lam=0.1)
    b = L.alphaedit(self.w, self.keys, self.values, self.p, lam=0.1,
                    prior_keys=np.zeros((0, H), np.float32))
    np.testing.assert_allclose(_np(a), _np(b), rtol=1e-6, atol=1e-7)

  def test_identity_projector_is_ridge_memit(self):
    a = L.alphaedit(self.w, self.keys, self.values, np.eye(H), lam=0.2)
    b = L.memit(self.w, self.keys, self.values, np.eye(H), lam=0.2)
    np.testing.assert_allclose(_np(a), _np(b), rtol=1e-4, atol=1e-6)


class EditFitTest(chex.TestCase):

  def test_hand_example(self):
    w0 = np.zeros((2, 2), np.float32)
    w1 = np.array([[1.0, 0.0], [0.0, 0.5]], np.float32)
    keys = np.array([[1.0, 0.0]], np.float32)
    values = np.array([[1.0, 0.25]], np.float32)
    preserved = np.array([[0.0, 2.0], [1.0, 1.0]], np.float32)
    fit = L.edit_fit(w0, w1, keys, values, preserved)
    self.assertAlmostEqual(float(fit.edit_error), 0.25)
    self.assertAlmostEqual(float(fit.preserved_change), 1.0)

  def test_no_or_empty_preserved_keys(self):
    w, keys, values, _ = _problem()
    for preserved in (None, np.zeros((0, H), np.float32)):
      fit = L.edit_fit(w, w + 1, keys, values, preserved)
      self.assertEqual(float(fit.preserved_change), 0.0)


class CommonTest(chex.TestCase):

  def test_deterministic(self):
    w, keys, values, cov = _problem()
    p = L.null_space_projector(cov, rel_tol=0.5)
    calls = (lambda: L.rome(w, keys, values, cov),
             lambda: L.memit(w, keys, values, cov, lam=0.1),
             lambda: L.null_space_projector(cov, rel_tol=0.5),
             lambda: L.alphaedit(w, keys, values, p, lam=0.1,
                                 prior_keys=keys[:3]),
             lambda: L.second_moment(keys))
    for call in calls:
      np.testing.assert_array_equal(_np(call()), _np(call()))

  def test_jit_with_traced_hyperparameters(self):
    # Everything under one outer jit (one compile), hyper-parameters traced.
    w, keys, values, cov = _problem()
    params = _mlp()
    x = np.ones((3, 6), np.float32)

    def everything(w, k, v, c, ridge, lam, rel_tol):
      p = L.null_space_projector(c, rel_tol=rel_tol)
      w_alpha = L.alphaedit(w, k, v, p, lam=lam, prior_keys=k[:2])
      return (L.rome(w, k, v, c, ridge=ridge), L.memit(w, k, v, c, lam=lam),
              p, w_alpha, L.edit_fit(w, w_alpha, k, v, k),
              L.second_moment(k), L.hidden_states(params, x))

    jitted = jax.jit(everything)(w, keys, values, cov, 1e-6, 0.3, 0.5)
    p = L.null_space_projector(cov, rel_tol=0.5)
    w_alpha = L.alphaedit(w, keys, values, p, lam=0.3, prior_keys=keys[:2])
    eager = (L.rome(w, keys, values, cov, ridge=1e-6),
             L.memit(w, keys, values, cov, lam=0.3), p, w_alpha,
             L.edit_fit(w, w_alpha, keys, values, keys),
             L.second_moment(keys), L.hidden_states(params, x))
    self.assertIsInstance(jitted[4], L.EditFit)
    for got, want in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
      np.testing.assert_allclose(_np(got), _np(want), rtol=1e-5, atol=1e-5)

  def test_float64(self):
    with jax.enable_x64(True):
      w, keys, values, cov = (a.astype(np.float64) for a in _problem(seed=5))
      preserved, _ = _low_rank_keys(dtype=np.float64)
      results = {
          'c': L.second_moment(preserved),
          'rome': L.rome(w, keys, values, cov, ridge=1e-3),
          'memit_exact': L.memit(w, keys, values, cov, lam=1e-8),
          'memit': L.memit(w, keys, values, cov, lam=0.3),
      }
      results['p'] = p = L.null_space_projector(results['c'])
      results['alpha'] = L.alphaedit(w, keys, values, p, lam=0.5,
                                     prior_keys=keys[:2])
      # Zero prior keys: the same compiled function as above.
      results['alpha_exact'] = L.alphaedit(w, keys, values, p, lam=1e-9,
                                           prior_keys=np.zeros((2, H)))
      fit = L.edit_fit(w, results['alpha_exact'], keys, values, preserved)
    for name, value in list(results.items()) + list(fit._asdict().items()):
      self.assertEqual(value.dtype, jnp.float64, name)
    r = {name: _np(value) for name, value in results.items()}
    np.testing.assert_allclose(r['c'], preserved.T @ preserved / NUM_PRESERVED,
                               rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(r['rome'], _np_rome(w, keys, values, cov, 1e-3),
                               rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(keys[-1] @ r['rome'], values[-1], atol=1e-10)
    np.testing.assert_allclose(keys @ r['memit_exact'], values, atol=1e-6)
    np.testing.assert_allclose(r['memit'], _np_memit(w, keys, values, cov, 0.3),
                               rtol=1e-9, atol=1e-11)
    # Stationarity of ||K(w+D) - V||^2 + lam tr(D^T C D).
    grad = (keys.T @ (keys @ r['memit'] - values) +
            0.3 * cov @ (r['memit'] - w))
    np.testing.assert_allclose(grad, 0, atol=1e-10)
    p = r['p']
    np.testing.assert_allclose(p @ p, p, atol=1e-12)
    np.testing.assert_allclose(preserved @ p, 0, atol=1e-10)
    np.testing.assert_allclose(
        r['alpha'], _np_alphaedit_paper(w, keys, values, p, 0.5, keys[:2]),
        rtol=1e-9, atol=1e-11)
    self.assertLess(float(fit.edit_error), 1e-6)
    self.assertLess(float(fit.preserved_change), 1e-10)


def _nan_at(a, index=(0, 0), value=np.nan):
  a = np.array(a)
  a[index] = value
  return a


class ErrorTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.w, self.keys, self.values, self.cov = _problem()
    self.p = np.eye(H, dtype=np.float32)

  def _rome(self, **kw):
    args = dict(w_down=self.w, keys=self.keys, values=self.values,
                cov=self.cov)
    args.update(kw)
    return L.rome(**args)

  def _memit(self, lam=0.1, **kw):
    args = dict(w_down=self.w, keys=self.keys, values=self.values,
                cov=self.cov)
    args.update(kw)
    return L.memit(**args, lam=lam)

  def _alpha(self, lam=0.1, **kw):
    args = dict(w_down=self.w, keys=self.keys, values=self.values,
                projector=self.p)
    args.update(kw)
    return L.alphaedit(**args, lam=lam)

  @parameterized.named_parameters(
      ('w_1d', lambda t: t._rome(w_down=t.w[0]), r'w_down must have shape'),
      ('keys_width', lambda t: t._rome(keys=t.keys[:, :5]),
       r'keys must have shape \(E, h\) with h = 16'),
      ('values_rows', lambda t: t._rome(values=t.values[:3]),
       r'values must have shape \(E, d\) with E = 4'),
      ('values_cols', lambda t: t._memit(values=t.values[:, :3]),
       r'values must have shape \(E, d\) with d = 8'),
      ('cov_shape', lambda t: t._rome(cov=t.cov[:5, :5]),
       r'cov must have shape \(h, h\) with h = 16'),
      ('empty_keys', lambda t: t._rome(keys=t.keys[:0], values=t.values[:0]),
       r'keys is empty'),
      ('complex_keys', lambda t: t._memit(keys=t.keys.astype(np.complex64)),
       r'keys must hold real numbers'),
      ('bool_values', lambda t: t._memit(values=t.values > 0),
       r'values must hold real numbers'),
      ('string_w', lambda t: t._rome(w_down='abc'),
       r'w_down (could not be converted|must hold real numbers)'),
      ('nan_keys', lambda t: t._rome(keys=_nan_at(t.keys, (1, 2))),
       r'keys holds a non-finite entry .* at index \(1, 2\)'),
      ('inf_values', lambda t: t._memit(values=_nan_at(t.values, value=np.inf)),
       r'values holds a non-finite'),
      ('nan_w', lambda t: t._alpha(w_down=_nan_at(t.w)),
       r'w_down holds a non-finite'),
      ('nan_cov', lambda t: t._memit(cov=_nan_at(t.cov)),
       r'cov holds a non-finite'),
      ('asymmetric_cov', lambda t: t._rome(cov=t.cov + np.triu(t.cov, 1)),
       r'cov must be symmetric'),
      ('zero_key', lambda t: t._rome(keys=_nan_at(t.keys, 2, 0.0)),
       r'keys has all-zero row\(s\) \[2\]'),
      ('negative_ridge', lambda t: t._rome(ridge=-1e-3),
       r'ridge must be finite and >= 0'),
      ('nan_ridge', lambda t: t._rome(ridge=np.nan),
       r'ridge must be finite and >= 0'),
      ('negative_lam_memit', lambda t: t._memit(lam=-0.1),
       r'lam must be finite and >= 0'),
      ('vector_lam', lambda t: t._memit(lam=np.ones(2)),
       r'lam must be a real scalar'),
      ('string_lam', lambda t: t._memit(lam='big'),
       r'lam must be a real scalar'),
      ('zero_lam_alphaedit', lambda t: t._alpha(lam=0.0),
       r'lam must be finite and > 0'),
      ('inf_lam_alphaedit', lambda t: t._alpha(lam=np.inf),
       r'lam must be finite and > 0'),
      ('projector_shape', lambda t: t._alpha(projector=t.p[:4]),
       r'projector must have shape \(h, h\) with h = 16'),
      ('asymmetric_projector', lambda t: t._alpha(projector=np.triu(t.cov)),
       r'projector must be symmetric'),
      ('prior_width', lambda t: t._alpha(prior_keys=t.keys[:, :3]),
       r'prior_keys must have shape \(E_p, h\) with h = 16'),
      ('nan_prior', lambda t: t._alpha(prior_keys=_nan_at(t.keys)),
       r'prior_keys holds a non-finite'),
      ('projector_not_square', lambda t: L.null_space_projector(t.cov[:3]),
       r'cov must be a square'),
      ('projector_nan', lambda t: L.null_space_projector(_nan_at(t.cov)),
       r'cov holds a non-finite'),
      ('rel_tol_zero', lambda t: L.null_space_projector(t.cov, rel_tol=0.0),
       r'rel_tol must be finite and > 0 and <= 1'),
      ('rel_tol_big', lambda t: L.null_space_projector(t.cov, rel_tol=1.5),
       r'rel_tol must be finite and > 0 and <= 1'),
      ('moment_1d', lambda t: L.second_moment(t.keys[0]),
       r'keys must have shape \(M, h\)'),
      ('moment_empty', lambda t: L.second_moment(t.keys[:0]),
       r'keys is empty'),
      ('moment_nan', lambda t: L.second_moment(_nan_at(t.keys)),
       r'keys holds a non-finite'),
      ('fit_w_before', lambda t: L.edit_fit(t.w[:5], t.w, t.keys, t.values),
       r'w_before must have shape \(h, d\) with h = 16'),
      ('fit_preserved', lambda t: L.edit_fit(t.w, t.w, t.keys, t.values,
                                             t.keys[:, :2]),
       r'preserved_keys must have shape \(M, h\) with h = 16'),
      ('fit_keys', lambda t: L.edit_fit(t.w, t.w, t.keys[:, :2], t.values),
       r'keys must have shape \(E, h\) with h = 16 \(the rows of w_after\)'),
  )
  def test_edit_errors(self, call, message):
    with self.assertRaisesRegex(FactStoreError, message):
      call(self)

  def test_hidden_states_errors(self):
    params = _mlp()
    x = np.ones((3, 6), np.float32)
    cases = (
        (lambda: L.hidden_states(params, x[:, :4]),
         r'x must have shape \(M, d\) with d = 6'),
        (lambda: L.hidden_states(params, _nan_at(x)),
         r'x holds a non-finite'),
        (lambda: L.hidden_states({'w_gate': 1}, x),
         r'expected a GatedMLP or an EncoderDecoder'),
        (lambda: L.hidden_states(params.replace(activation='bogus'), x),
         r'unknown activation'),
        (lambda: L.hidden_states(params.replace(w_up=params.w_up[:, :3]), x),
         r'params.w_up must have shape \(d, h\) with h = 16'),
        (lambda: L.hidden_states(params.replace(b_gate=jnp.ones(3)), x),
         r'params.b_gate must have shape \(16,\)'),
    )
    for call, message in cases:
      with self.assertRaisesRegex(FactStoreError, message):
        call()

  def test_traced_values_skip_value_checks(self):
    # Under jit only shapes are checked; shape errors still raise.
    w, keys, values, cov = _problem()
    with self.assertRaisesRegex(FactStoreError, r'keys must have shape'):
      jax.jit(lambda k: L.memit(w, k, values, cov, lam=0.1))(keys[:, :3])
    with self.assertRaisesRegex(FactStoreError, r'lam must be a scalar'):
      jax.jit(lambda lam: L.memit(w, keys, values, cov, lam=lam))(np.ones(2))
