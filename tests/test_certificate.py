"""Tests of the structured margin certificate (constructions/certificate.py).

The certificate must never claim more than the dense float32 check sees, and
must reject MLPs that differ from the gadgets, steps on the wrong side of a
key, wrong maps and wrong codes.
"""

from __future__ import annotations

import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from factstore_jax import factsets as F
from factstore_jax.constructions import certificate as C
from factstore_jax.constructions import encoder_decoder as ed
from factstore_jax.constructions import assembly
from factstore_jax.constructions import verify as verify_lib
from factstore_jax.constructions import gadgets
from factstore_jax.errors import FactStoreError

N, D = 512, 32

FACTSETS = {
    'tied': lambda: F.random_factset(jax.random.PRNGKey(0), N, D),
    'many_to_one': lambda: F.random_factset(
        jax.random.PRNGKey(1), N, D, 128, tied=False, mapping='many_to_one'),
    'spiked': lambda: F.random_factset(jax.random.PRNGKey(2), N, D,
                                       embedding='spiked', beta=3.0),
    'clustered': lambda: F.random_factset(jax.random.PRNGKey(3), N, D,
                                          embedding='clustered'),
}


@functools.lru_cache(maxsize=None)
def _fs(name):
  return FACTSETS[name]()


@functools.lru_cache(maxsize=None)
def _built(name, **overrides):
  return ed.construct(0, _fs(name), **overrides)


def _dense(c, fs):
  check, _, _ = verify_lib.verify_structured(c.structure.gadgets, c.model, fs, c.codes)
  return check


def _certify(parts, model, fs, codes):
  return verify_lib.certify_gadgets(parts, model, fs, codes)


def _reassembled(parts, decoder):
  return assembly.prune_dead(assembly.assemble_gadgets(parts, decoder, 'clipped'))


class AgreementTest(parameterized.TestCase):

  @parameterized.parameters(*FACTSETS)
  def test_certificate_below_dense_and_positive(self, name):
    fs, c = _fs(name), _built(name)
    self.assertEqual(c.report.check, 'certificate')
    check, cert = _certify(c.structure.gadgets, c.model, fs, c.codes)
    dense = _dense(c, fs)
    lower = np.asarray(check.storage.margins)
    exact = np.asarray(dense.storage.margins)
    self.assertTrue(cert.identical)
    self.assertTrue(cert.steps_ok.all())
    self.assertGreater(float(lower.min()), 0.0)
    # Per fact, never above the dense float32 margin.
    self.assertTrue(np.all(lower <= exact), float(np.max(lower - exact)))
    self.assertGreater(float(lower.min()), 0.25 * float(exact.min()))
    # The reported code error bounds the dense model's.
    self.assertGreaterEqual(float(check.code_error), float(dense.code_error))

  def test_float64(self):
    with jax.enable_x64(True):
      fs = F.random_factset(jax.random.PRNGKey(4), 512, D, dtype=jnp.float64)
      c = ed.construct(0, fs)
      self.assertEqual(c.report.check, 'certificate')
      self.assertEqual(c.report.float32_bound, 'worst-case')
      lower = np.asarray(_certify(c.structure.gadgets, c.model, fs,
                                  c.codes)[0].storage.margins)
      dense = np.asarray(_dense(c, fs).storage.margins)
      self.assertTrue(np.all(lower <= dense))
      self.assertGreater(lower.min(), 0.9 * dense.min())   # float64: tight
      self.assertLess(c.report.code_error, 1e-9)

  def test_dense_option_and_bad_option(self):
    fs = _fs('tied')
    dense = _built('tied', verify='dense')
    self.assertEqual(dense.report.check, 'dense')
    cert = _built('tied')
    # Same construction, only the check differs.
    np.testing.assert_array_equal(dense.model.w_up, cert.model.w_up)
    self.assertLessEqual(cert.report.min_margin, dense.report.min_margin)
    with self.assertRaisesRegex(FactStoreError, 'verify must be one of'):
      ed.construct(0, fs, verify='fast')

  def test_relu_uses_the_dense_check(self):
    c = _built('tied', activation='relu')
    self.assertEqual(c.report.check, 'dense')
    with self.assertRaisesRegex(ValueError, 'clipped gate'):
      _certify(c.structure.gadgets, c.model, _fs('tied'), c.codes)


class RejectionTest(parameterized.TestCase):
  """Broken MLPs: the certificate must not certify the broken facts."""

  def setUp(self):
    super().setUp()
    self.fs, self.c = _fs('many_to_one'), _built('many_to_one')
    self.parts = self.c.structure.gadgets

  def test_corrupted_decoder(self):
    # The decoder is not part of the gadgets: the certificate uses the
    # model's own, so it must follow the dense check of the changed model.
    for scale in (1e-3, -2.0):
      dec = np.array(self.c.model.decoder)
      dec[:, 0] *= scale
      model = self.c.model.replace(decoder=jnp.asarray(dec))
      check, cert = _certify(self.parts, model, self.fs, self.c.codes)
      self.assertTrue(cert.identical)
      dense, _, _ = verify_lib.verify_structured(self.parts, model, self.fs,
                                         self.c.codes)
      lower = np.asarray(check.storage.margins)
      self.assertTrue(np.all(lower <= np.asarray(dense.storage.margins)))
      if float(dense.storage.min_margin) <= 0:
        self.assertLessEqual(float(lower.min()), 0.0)
    self.assertLess(float(dense.storage.min_margin), 0.0)   # -2 breaks it

  def test_corrupted_dense_weight(self):
    for name in ('w_gate', 'b_gate', 'w_up', 'routing'):
      arr = np.array(getattr(self.c.model, name))
      arr.reshape(-1)[arr.size // 2] += 1e-3
      model = self.c.model.replace(**{name: jnp.asarray(arr)})
      check, cert = _certify(self.parts, model, self.fs, self.c.codes)
      self.assertFalse(cert.identical, name)
      self.assertEqual(float(check.storage.min_margin), -np.inf, name)

  def test_flipped_steps(self):
    b = self.parts.buckets
    start = np.array(b.step_start)
    width = np.array(b.step_width)
    # Cut 2's step moved into bucket 2's keys: some keys sit on its ramp.
    j = 2
    rows = np.asarray(b.index[j])[np.asarray(b.valid[j])]
    t = np.asarray(self.fs.keys, np.float64)[rows] @ np.asarray(
        b.direction, np.float64)
    start[j] = float(np.median(t))
    buckets = b._replace(step_start=jnp.asarray(start, b.step_start.dtype),
                         step_width=jnp.asarray(width, b.step_width.dtype))
    scale, bias, sign = gadgets.step_gate_params(buckets, 'clipped')
    parts = self.parts._replace(buckets=buckets, scale=scale.astype(
        self.parts.scale.dtype), bias=bias.astype(self.parts.bias.dtype))
    model = _reassembled(parts, self.c.model.decoder)
    check, cert = _certify(parts, model, self.fs, self.c.codes)
    self.assertTrue(cert.identical)
    self.assertFalse(cert.steps_ok.all())
    margins = np.asarray(check.storage.margins)
    self.assertTrue(np.all(margins[~cert.steps_ok] == -np.inf))
    self.assertLessEqual(float(check.storage.min_margin), 0.0)

  def test_wrong_map(self):
    maps = np.array(self.parts.maps)
    maps[3] = -maps[3]   # bucket 3's keys now map to minus their codes
    parts = self.parts._replace(maps=jnp.asarray(maps, self.parts.maps.dtype))
    model = _reassembled(parts, self.c.model.decoder)
    check, cert = _certify(parts, model, self.fs, self.c.codes)
    self.assertTrue(cert.identical)
    dense, _, _ = verify_lib.verify_structured(parts, model, self.fs, self.c.codes)
    self.assertLess(float(dense.storage.min_margin), 0.0)   # really broken
    self.assertLessEqual(float(check.storage.min_margin),
                         float(dense.storage.min_margin))

  def test_wrong_codes(self):
    codes = np.array(self.c.codes)
    used = np.unique(np.asarray(self.fs.mapping))
    codes[used[[0, 1]]] = codes[used[[1, 0]]]   # two values swap codes
    check, _ = _certify(self.parts, self.c.model, self.fs,
                        jnp.asarray(codes))
    margins = np.asarray(check.storage.margins)
    bad = np.isin(np.asarray(self.fs.mapping), used[[0, 1]])
    self.assertTrue(np.all(margins[bad] <= 0))


class ThresholdTest(absltest.TestCase):

  def test_step_thresholds(self):
    # Cuts at t = 0 (width 1) and t = 2 (width 0.5): s = 1/w, b = -a/w.
    scale = np.array([0.0, 1.0, 2.0], np.float32)
    bias = np.array([1.0, 0.0, -4.0], np.float32)
    lo, hi = C.step_thresholds(scale, bias)
    self.assertEqual(lo[0], -np.inf)
    self.assertAlmostEqual(lo[1], 1.0, places=6)     # step 1 reaches 1
    self.assertAlmostEqual(lo[2], 2.5, places=6)     # max of 1 and 2.5
    self.assertAlmostEqual(hi[0], 0.0, places=6)     # min of 0 and 2
    self.assertAlmostEqual(hi[1], 2.0, places=6)
    self.assertEqual(hi[2], np.inf)
    self.assertGreater(lo[1], 1.0)                   # rounded outwards
    self.assertLess(hi[1], 2.0)
    # Bucket 0's step must be the constant 1.
    lo_bad, _ = C.step_thresholds(np.array([0.5, 1.0]), np.array([1.0, 0.0]))
    self.assertTrue(np.all(lo_bad == np.inf))

  def test_sparse_directions_are_powers_of_two(self):
    dirs = gadgets.directions(jax.random.PRNGKey(0), 64)
    for g, k in zip(dirs[:-1], gadgets.SPARSE_SUPPORTS):
      g = np.asarray(g)
      self.assertEqual(np.count_nonzero(g), k)
      nz, c = C._projection_bound(g)
      self.assertEqual(len(nz), k)
      self.assertAlmostEqual(c, float(C.gamma(k)), places=15)
    self.assertEqual(np.count_nonzero(np.asarray(dirs[-1])), 64)
    self.assertGreater(C._projection_bound(np.asarray(dirs[-1]))[1],
                       float(C.gamma(64)))


class RivalsTest(parameterized.TestCase):
  """The value stage: closest rivals and the bound on all the others, with
  patched one-hot code columns added apart from the dense product; at
  P = 9,000 through the tiled pass (3 tiles, the last one padded)."""

  @parameterized.parameters((300, 2), (9000, 60))
  def test_rivals_and_rest_match_float64(self, p, stride):
    d, m0, k = 24, 6, C.TOP_RIVALS
    rng = np.random.default_rng(0)
    values = rng.normal(size=(p, d)).astype(np.float32)
    stragglers = np.array([3, 77, 250])
    decoder = rng.normal(size=(d, m0 + 3)).astype(np.float32)
    codes = np.zeros((p, m0 + 3), np.float32)
    codes[:, :m0] = rng.normal(size=(p, m0))
    codes[stragglers, :m0] = 0.0
    codes[stragglers, m0 + np.arange(3)] = 1.0
    used = np.union1d(np.arange(0, p, stride), stragglers)
    vals = C._value_bounds(jnp.asarray(values), jnp.asarray(decoder),
                           jnp.asarray(codes), used, k, chunk=64)
    # float64 brute force: separations <c_f, w_f - w_j> of every rival.
    w = values.astype(np.float64) @ decoder.astype(np.float64)
    c = codes.astype(np.float64)[used]
    sep = np.einsum('um,um->u', c, w[used])[:, None] - c @ w.T
    sep[np.arange(len(used)), used] = np.inf
    order = np.argsort(sep, axis=1)
    for i in range(len(used)):
      # The k closest, up to float32 rounding of near ties.
      exact_k = sep[i, order[i, :k]]
      found = np.sort(sep[i, vals.rivals[i]])
      np.testing.assert_allclose(found, exact_k, atol=1e-4)
      # rest is a lower bound on every rival not checked exactly.
      others = np.setdiff1d(np.arange(p), np.append(vals.rivals[i],
                                                    used[i]))
      self.assertLessEqual(vals.rest[i], sep[i, others].min())
      # ... and a tight one (the float32 rounding allowance only).
      nearest = sep[i, others].min()
      self.assertGreater(vals.rest[i],
                         nearest - 1e-4 * vals.cn[i] * vals.wmax)
    # A straggler's rivals are the values closest along its own column.
    s = int(np.searchsorted(used, 77))
    col = w[:, m0 + 1]
    gaps = col[77] - col
    gaps[77] = np.inf
    np.testing.assert_array_equal(np.sort(vals.rivals[s]),
                                  np.sort(np.argsort(gaps)[:k]))
    np.testing.assert_allclose(
        vals.cn, np.linalg.norm(c, axis=1), rtol=1e-6)
    self.assertTrue(np.all(vals.cn >= np.linalg.norm(c, axis=1)))


_SPLIT_VALUES = r"""
import sys
from unittest import mock
import jax, jax.numpy as jnp, numpy as np
from factstore_jax import sharding
from factstore_jax.constructions import certificate as C
assert len(jax.local_devices()) == 3
rng = np.random.default_rng(0)
p, d, m0 = 9000, 24, 6
values = jnp.asarray(rng.normal(size=(p, d)).astype(np.float32))
decoder = jnp.asarray(rng.normal(size=(d, m0 + 2)).astype(np.float32))
codes = np.zeros((p, m0 + 2), np.float32)
codes[:, :m0] = rng.normal(size=(p, m0))
codes[[5, 4000], :m0] = 0.0
codes[[5, 4000], [m0, m0 + 1]] = 1.0
codes = jnp.asarray(codes)
used = np.union1d(np.arange(0, p, 19), [5, 4000])   # 476: 3 calls, padded
bound = lambda: C._value_bounds(values, decoder, codes, used, C.TOP_RIVALS,
                                chunk=64)
with mock.patch.object(sharding, 'local_mesh',
                       lambda: sharding.batch_mesh(jax.local_devices()[:1])):
  one = bound()
split = bound()
np.savez(sys.argv[1], **{f'one_{k}': np.asarray(v) for k, v in
                         one._asdict().items()},
         **{f'split_{k}': np.asarray(v) for k, v in split._asdict().items()})
"""


def test_sampled_encoding_in_chunks_equals_one_call(monkeypatch):
  c = _built('tied')
  x = np.asarray(_fs('tied').keys)[:37]
  whole = np.asarray(C._encode(c.model, jnp.asarray(x)), np.float64)
  hidden = c.model.w_up.shape[1] * 4
  # 5 keys per call: 8 calls, the last padded with copies of the last key.
  monkeypatch.setattr(C, 'ENCODE_BYTES', 3 * hidden * 5)
  chunked = C._encode_rows(c.model, x)
  assert chunked.shape == whole.shape == (37, c.model.decoder.shape[1])
  np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)
  calls = []
  real = C._encode
  monkeypatch.setattr(C, '_encode', lambda m, z: calls.append(z.shape[0]) or
                      real(m, z))
  C._encode_rows(c.model, x)
  assert calls == [5] * 8


@pytest.mark.parametrize('n', [1, 2, 5, 9])
def test_telescoped_in_chunks_is_the_telescope(monkeypatch, n):
  maps = jax.random.normal(jax.random.PRNGKey(n), (n, 3, 4))
  monkeypatch.setattr(C, 'TELESCOPE_CHUNK', 3)   # chunks of 3, last overlaps
  got = list(C._telescoped(maps))
  assert [o for o, _ in got] == list(range(n))
  np.testing.assert_array_equal(np.stack([t for _, t in got]),
                                np.asarray(gadgets.telescope(maps)))


def test_value_cache_reuses_only_equal_inputs():
  calls = []
  compute = lambda: calls.append(1) or len(calls)
  cache = C.ValueCache()
  codes = np.arange(12.0, dtype=np.float32).reshape(4, 3)
  used = np.array([0, 2])
  assert cache.get((codes, used, 0.5), compute) == 1
  # Equal inputs in new arrays (and as a jax array): reused.
  assert cache.get((jnp.asarray(codes), used.copy(), 0.5), compute) == 1
  assert cache.hits == 1
  # Any change recomputes: an entry, the used values, the dtype, u.
  changed = codes.copy()
  changed[1, 1] += 1
  assert cache.get((changed, used, 0.5), compute) == 2
  assert cache.get((changed, np.array([0, 3]), 0.5), compute) == 3
  assert cache.get((changed.astype(np.float64), np.array([0, 3]), 0.5),
                   compute) == 4
  assert cache.get((changed.astype(np.float64), np.array([0, 3]), 0.25),
                   compute) == 5
  assert cache.hits == 1 and len(calls) == 5


def test_value_stage_split_over_devices_equals_one_device(tmp_path):
  """The value stage runs one chunk per device; every row's rivals and
  bounds are those of the one-device run, bitwise (3 CPU devices, a
  subprocess: the device count is fixed when JAX starts)."""
  import subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  from conftest import ROOT, subprocess_env  # pylint: disable=import-outside-toplevel
  out = tmp_path / 'split.npz'
  proc = subprocess.run([sys.executable, '-c', _SPLIT_VALUES, str(out)],
                        cwd=ROOT, env=subprocess_env(device_count=3),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = np.load(out)
  for name in C._Values._fields:
    np.testing.assert_array_equal(got[f'split_{name}'], got[f'one_{name}'],
                                  err_msg=name)
  assert got['one_rivals'].shape == (476, C.TOP_RIVALS)


@pytest.mark.slow
class LargeTest(absltest.TestCase):

  def test_65536_facts(self):
    fs = F.random_factset(jax.random.PRNGKey(5), 65536, 64, 4096, tied=False,
                          mapping='many_to_one')
    c = ed.construct(0, fs)
    self.assertEqual(c.report.check, 'certificate')
    lower = np.asarray(_certify(c.structure.gadgets, c.model, fs,
                                c.codes)[0].storage.margins)
    exact = np.asarray(_dense(c, fs).storage.margins)
    self.assertGreater(lower.min(), 0.0)
    self.assertTrue(np.all(lower <= exact))


if __name__ == '__main__':
  absltest.main()
