"""Tests for the construction's settings and their checks (config.py)."""

from __future__ import annotations

import dataclasses

from absl.testing import absltest, parameterized

from factstore_jax.constructions import config as C
from factstore_jax.errors import FactStoreError


class ConfigTest(parameterized.TestCase):

  def test_defaults_pass(self):
    C.check_config(C.ConstructionConfig())

  @parameterized.parameters(
      (dict(activation='silu'), 'activation must be one of'),
      (dict(slack=0.5), r'slack must be in \[0, 0.5\)'),
      (dict(slack=-0.1), 'slack'),
      (dict(fill=0.0), r'fill must be in \(0, 1\]'),
      (dict(fill=1.5), 'fill'),
      (dict(patch=2.0), r'patch must be in \[0, 1\]'),
      (dict(verify='fast'), 'verify must be one of'))
  def test_bad_fields_raise(self, overrides, match):
    config = dataclasses.replace(C.ConstructionConfig(), **overrides)
    with self.assertRaisesRegex(FactStoreError, match):
      C.check_config(config)

  def test_resolve_bucket_size(self):
    self.assertEqual(C.resolve_bucket_size(C.ConstructionConfig(), 32), 32)
    self.assertEqual(C.resolve_bucket_size(
        C.ConstructionConfig(bucket_size=5), 32), 5)
    for bad in (0, 33):
      with self.assertRaisesRegex(FactStoreError, r'bucket_size must be in'):
        C.resolve_bucket_size(C.ConstructionConfig(bucket_size=bad), 32)

  def test_code_dims_search_doubles_to_dim(self):
    self.assertEqual(C.code_dims(C.ConstructionConfig(), 100),
                     [16, 32, 64, 100])
    self.assertEqual(C.code_dims(C.ConstructionConfig(min_code_dim=3), 8),
                     [3, 6, 8])
    self.assertEqual(C.code_dims(C.ConstructionConfig(code_dim=12), 8), [8])
    self.assertEqual(C.code_dims(C.ConstructionConfig(code_dim=4), 8), [4])
    with self.assertRaisesRegex(FactStoreError, 'code_dim must be >= 1'):
      C.code_dims(C.ConstructionConfig(code_dim=0), 8)


if __name__ == '__main__':
  absltest.main()
