"""Tests for the value codes, the decoder and straggler patches (codes.py)."""

from __future__ import annotations

from unittest import mock

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np

from factstore_jax.constructions import codes as K
from factstore_jax.constructions.config import ConstructionConfig
from factstore_jax.decodability import decodability
from factstore_jax.errors import ConstructionError, InfeasibleFactSetError

# Value 2 projects onto the midpoint of values 0 and 1 when z is dropped,
# but is decodable in the full space.
VALUES = jnp.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0],
                    [0.0, 1.0, 0.0]])
DROP_Z = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])


def _margins(decoder, codes, values):
  """Margin of every value's own output ``decoder @ c_f`` (dense)."""
  logits = (codes @ decoder.T) @ values.T                    # (P, P)
  own = jnp.diag(logits)
  rival = jnp.max(jnp.where(jnp.eye(len(values), dtype=bool), -jnp.inf,
                            logits), axis=1)
  return np.asarray(own - rival)


class CodesTest(parameterized.TestCase):

  def test_decoder_deterministic_per_key(self):
    a = K.construction_decoder(jax.random.key(0), 16, 4)
    self.assertEqual(a.shape, (16, 4))
    np.testing.assert_array_equal(a, K.construction_decoder(
        jax.random.key(0), 16, 4))
    self.assertFalse(np.array_equal(a, K.construction_decoder(
        jax.random.key(1), 16, 4)))

  def test_value_codes_are_separators_of_the_projection(self):
    codes, rho = K.value_codes(VALUES, DROP_Z)
    want = decodability(VALUES @ DROP_Z)
    np.testing.assert_allclose(rho, want.rho, atol=1e-6)
    self.assertLessEqual(float(rho[2]), 0.0)     # the midpoint
    self.assertTrue(np.all(np.asarray(rho)[[0, 1, 3]] > 0))
    margins = _margins(DROP_Z, codes, VALUES)
    self.assertTrue(np.all(margins[[0, 1, 3]] > 0))

  def test_patch_stragglers_stores_the_straggler(self):
    codes, rho = K.value_codes(VALUES, DROP_Z)
    decoder, codes2, rho2 = K.patch_stragglers(VALUES, DROP_Z, codes, rho,
                                               [2])
    self.assertEqual(decoder.shape, (3, 3))
    self.assertEqual(codes2.shape, (4, 3))
    np.testing.assert_array_equal(codes2[2], [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(codes2[:, 2], [0.0, 0.0, 1.0, 0.0])
    self.assertGreater(float(rho2[2]), 0.0)
    self.assertTrue(np.all(_margins(decoder, codes2, VALUES) > 0))

  def test_patch_of_an_undecodable_value_raises(self):
    values = jnp.concatenate([VALUES, jnp.zeros((1, 3))])   # the origin
    codes, rho = K.value_codes(values, DROP_Z)
    with self.assertRaises(InfeasibleFactSetError):
      K.patch_stragglers(values, DROP_Z, codes, rho, [4])

  def test_refuse_undecodable_names_only_certified_values(self):
    values = jnp.concatenate([VALUES, jnp.zeros((1, 3))])   # the origin
    with self.assertRaisesRegex(InfeasibleFactSetError,
                                r'1 used value\(s\) .*: \[4\]') as cm:
      K.refuse_undecodable(values, [0, 4])
    self.assertEqual(cm.exception.undecodable, [4])
    with self.assertRaisesRegex(InfeasibleFactSetError, r"\[\(3, 4\)\]"):
      K.refuse_undecodable(values, [4], labels=[(3, 4)])
    full = K.refuse_undecodable(VALUES, [2, 0])    # all decodable: no raise
    self.assertTrue(np.all(np.asarray(full.rho) > 0))
    np.testing.assert_allclose(full.rho, np.asarray(decodability(VALUES).rho)[[2, 0]],
                               atol=1e-6)

  def test_refuse_undecodable_open_certificate_is_not_infeasible(self):
    # A solve ending at rho <= 0 with a dual bound far above tol (a stalled
    # certificate) does not show the value undecodable.
    stalled = decodability(VALUES, indices=[2])._replace(
        rho=jnp.array([-0.01]), dual_bound=jnp.array([0.05]),
        gap=jnp.array([0.06]))
    with mock.patch.object(K, 'decodability', return_value=stalled):
      with self.assertRaisesRegex(ConstructionError,
                                  r'uncertified decodability .*\(2, -0\.01, '
                                  r'0\.05\)'):
        K.refuse_undecodable(VALUES, [2])

  def test_rho_floor_and_budget(self):
    config = ConstructionConfig(min_rho=0.05, patch=0.1)
    self.assertEqual(K.rho_floor(config, 8, 16), 0.05)
    self.assertEqual(K.rho_floor(config, 16, 16), 0.0)
    self.assertEqual(K.rho_floor(ConstructionConfig(code_dim=8), 8, 16), 0.0)
    self.assertEqual(K.patch_budget(config, 55), 5)

  def test_raise_undecodable(self):
    K.raise_undecodable(8, np.array([], np.int64))     # nothing to report
    with self.assertRaisesRegex(ConstructionError,
                                r'code_dim=8 .* \(e\.g\. \[2, 5\]\)'):
      K.raise_undecodable(8, np.array([5, 2]))


if __name__ == '__main__':
  absltest.main()
