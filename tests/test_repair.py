"""Tests for the repairs of failing buckets (repair.py) and for the check
that decides when they run (verify.check_construction)."""

from __future__ import annotations

import functools
from unittest import mock

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from factstore_jax import factsets as F
from factstore_jax.constructions import certificate
from factstore_jax.constructions import encoder_decoder as ed
from factstore_jax.constructions import repair
from factstore_jax.constructions import verify as verify_lib
from factstore_jax.constructions.assembly import assemble_jit, prune_dead

N, D, P = 96, 16, 48


@functools.lru_cache(maxsize=None)
def _built():
  fs = F.random_factset(jax.random.key(3), N, D, P, tied=False,
                        mapping='many_to_one')
  return fs, ed.construct(0, fs, bucket_size=8)


def _model(parts, c):
  return prune_dead(assemble_jit(parts, c.model.decoder, 'clipped'))


class RepairTest(absltest.TestCase):

  def test_a_broken_map_is_found_and_refit(self):
    fs, c = _built()
    parts = c.structure.gadgets
    targets = c.codes[fs.mapping]
    j = 2
    broken = parts._replace(maps=parts.maps.at[j].set(
        parts.maps[j] + 0.5 * jax.random.normal(jax.random.key(1),
                                                parts.maps[j].shape)))
    check, _, _ = verify_lib.check_construction(
        broken, _model(broken, c), fs, c.codes, method='dense')
    self.assertLess(float(check.storage.accuracy), 1.0)
    bad = repair.failing_buckets(broken, fs.keys, targets,
                                 check.storage.margins)
    np.testing.assert_array_equal(bad, [j])     # only the culprit
    fixed = repair.refit_buckets(broken, fs.keys, targets, bad)
    np.testing.assert_array_equal(
        np.delete(np.asarray(fixed.maps), j, 0),
        np.delete(np.asarray(broken.maps), j, 0))   # others untouched
    check, _, _ = verify_lib.check_construction(
        fixed, _model(fixed, c), fs, c.codes, method='dense')
    self.assertEqual(float(check.storage.accuracy), 1.0)
    self.assertGreater(float(check.storage.min_margin), 0.0)

  def test_nothing_failing_means_nothing_to_refit(self):
    fs, c = _built()
    parts = c.structure.gadgets
    self.assertEqual(repair.failing_buckets(
        parts, fs.keys, c.codes[fs.mapping], np.ones(N)).size, 0)
    self.assertIs(repair.refit_buckets(parts, fs.keys, c.codes[fs.mapping],
                                       []), parts)


class ConstructRepairTest(absltest.TestCase):

  def test_a_failed_certificate_repairs_before_any_dense_check(self):
    # A bucket whose map misses its keys (as a nearly square float32 solve
    # does at 2^20 facts) fails the certificate: construct refits it in
    # float64 and certifies again; the dense check never runs.
    fs, _ = _built()
    real_build = ed.build_gadgets_streamed
    dense_calls = []
    real_dense = verify_lib.verify_structured_streamed

    def broken(*args, **kwargs):
      parts = real_build(*args, **kwargs)
      return parts._replace(maps=parts.maps.at[2].add(
          0.5 * jax.random.normal(jax.random.key(1), parts.maps[2].shape)))

    def dense(*args, **kwargs):
      dense_calls.append(1)
      return real_dense(*args, **kwargs)
    value_stages = []
    real_values = certificate._value_bounds

    def values(*args, **kwargs):
      value_stages.append(1)
      return real_values(*args, **kwargs)
    with mock.patch.object(ed, 'build_gadgets_streamed', broken), \
        mock.patch.object(verify_lib, 'verify_structured_streamed', dense), \
        mock.patch.object(certificate, '_value_bounds', values):
      c = ed.construct(0, fs, bucket_size=8)
    self.assertEqual(c.report.repaired_buckets, 1)
    # Two certificates (before and after the refit), one value stage: the
    # table did not change, so the second reused the first's.
    self.assertEqual(value_stages, [1])
    self.assertEqual(c.report.check, 'certificate')
    self.assertEqual(dense_calls, [])
    self.assertEqual(c.report.accuracy, 1.0)
    self.assertGreater(c.report.min_margin, 0.0)
    self.assertEqual(c.report.retries, 0)


class CheckFallbackTest(absltest.TestCase):

  def test_an_uncertified_model_goes_to_the_dense_check(self):
    fs, c = _built()
    parts = c.structure.gadgets
    real = verify_lib.certify_gadgets
    calls = []

    def no_certificate(*args, **kwargs):
      check, cert = real(*args, **kwargs)
      calls.append(1)
      storage = check.storage._replace(
          margins=jnp.full_like(check.storage.margins, -1.0),
          min_margin=jnp.asarray(-1.0))
      return check._replace(storage=storage), cert

    with mock.patch.object(verify_lib, 'certify_gadgets', no_certificate):
      check, name, bound = verify_lib.check_construction(
          parts, c.model, fs, c.codes)
    self.assertEqual(calls, [1])
    self.assertEqual((name, bound), ('dense', ''))
    self.assertEqual(float(check.storage.accuracy), 1.0)
    self.assertGreater(float(check.storage.min_margin), 0.0)
    # The certificate itself, when it can: below the dense margin.
    cert_check, name, _ = verify_lib.check_construction(parts, c.model, fs,
                                                        c.codes)
    self.assertEqual(name, 'certificate')
    self.assertLessEqual(float(cert_check.storage.min_margin),
                         float(check.storage.min_margin))


if __name__ == '__main__':
  absltest.main()
