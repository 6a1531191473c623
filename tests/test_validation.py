"""Tests for the argument checks shared by robustness and locate-and-edit."""

from __future__ import annotations

from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from factstore_jax import validation as V
from factstore_jax.errors import FactStoreError


class ValidationTest(parameterized.TestCase):

  def test_real_array_converts_and_rejects(self):
    got = V.real_array([[1, 2]], 'x', to_float=True)
    self.assertTrue(jnp.issubdtype(got.dtype, jnp.floating))
    self.assertEqual(V.real_array([1, 2], 'x').dtype, jnp.int32)
    with self.assertRaisesRegex(FactStoreError, 'x must hold real numbers'):
      V.real_array(np.array([True]), 'x')
    with self.assertRaisesRegex(FactStoreError, 'x could not be converted'):
      V.real_array([[1, 2], [3]], 'x')

  def test_matrix_shape_messages(self):
    ok = V.matrix(np.ones((2, 3)), 'w', 'h, d', (2, None))
    self.assertEqual(ok.shape, (2, 3))
    with self.assertRaisesRegex(FactStoreError,
                                r'w must have shape \(h, d\) \(2 dims\)'):
      V.matrix(np.ones(3), 'w', 'h, d')
    with self.assertRaisesRegex(FactStoreError,
                                r'with d = 4 \(the keys\), got shape \(2, 3\)'):
      V.matrix(np.ones((2, 3)), 'w', 'h, d', (None, 4), why=('', 'the keys'))
    with self.assertRaisesRegex(FactStoreError, 'w is empty'):
      V.matrix(np.ones((0, 3)), 'w', 'h, d')
    self.assertEqual(V.matrix(np.ones((0, 3)), 'w', 'h, d',
                              allow_empty=True).shape, (0, 3))
    with self.assertRaisesRegex(FactStoreError, r'non-finite .* index \(1, 2\)'):
      V.matrix(np.array([[0, 0, 0], [0, 0, np.inf]]), 'w', 'h, d')

  def test_values_checked_only_when_concrete(self):
    seen = []

    @jax.jit
    def f(x, s):
      seen.append((V.is_traced(x), V.concrete(x)))
      V.check_finite(x, 'x')              # cannot look: no error
      V.check_scalar(s, 's', minimum=0, strict=True)
      return V.mapping_array(x.astype(jnp.int32), 2, 1)

    f(jnp.array([5.0, jnp.nan]), -1.0)     # out of range, NaN, s < 0: traced
    self.assertEqual(seen, [(True, None)])
    with self.assertRaisesRegex(FactStoreError, 'non-finite'):
      V.check_finite(jnp.array([5.0, jnp.nan]), 'x')
    with self.assertRaisesRegex(FactStoreError, 's must be a scalar'):
      jax.jit(lambda s: V.check_scalar(s, 's', minimum=0, strict=True))(
          jnp.ones(2))

  @parameterized.parameters(
      (1, 1), (np.int64(3), 3))
  def test_check_int_accepts(self, value, want):
    self.assertEqual(V.check_int(value, 'n', 1), want)

  @parameterized.parameters(
      (0, 'n must be >= 1'), (2.0, 'n must be a Python int'),
      (True, 'n must be a Python int'))
  def test_check_int_rejects(self, value, match):
    with self.assertRaisesRegex(FactStoreError, match):
      V.check_int(value, 'n', 1)

  @parameterized.parameters(
      (0.0, True, None, 'finite and > 0'), (-1, False, None, '>= 0'),
      (2.0, False, 1.0, '<= 1'), (float('nan'), False, None, 'finite'),
      ('a', True, None, 'real scalar'), (np.ones(2), True, None,
                                         'real scalar'))
  def test_check_scalar_rejects(self, value, strict, maximum, match):
    with self.assertRaisesRegex(FactStoreError, match):
      V.check_scalar(value, 'r', minimum=0, strict=strict, maximum=maximum)

  def test_check_scalar_accepts(self):
    V.check_scalar(0.0, 'r', minimum=0, strict=False)
    V.check_scalar(1, 'r', minimum=0, strict=True, maximum=1)

  @parameterized.parameters(
      ([0, 1, 2], 'out of range'), ([0, -1], 'mapping\\[1\\] = -1'),
      ([0.0, 1.0], 'integer dtype'), ([[0, 1]], 'shape \\(N,\\)'))
  def test_mapping_array_rejects(self, mapping, match):
    with self.assertRaisesRegex(FactStoreError, match):
      V.mapping_array(np.asarray(mapping), len(np.ravel(mapping)), 2)

  def test_mapping_array_length_and_dtype(self):
    got = V.mapping_array(np.array([1, 0], np.int64), 2, 2)
    self.assertEqual(got.dtype, jnp.int32)
    np.testing.assert_array_equal(got, [1, 0])
    with self.assertRaisesRegex(FactStoreError, 'mapping has length 2 but'):
      V.mapping_array(np.array([1, 0]), 3, 2)
