"""Model files (``factstore_jax.serialization``): versions and exact round trips.

Format version 2 (telescoped steps) is current; version-1 files (two-neuron
windows) still load as the function they were saved as. The
CLI tests cover construct -> save -> evaluate end to end; this file covers
what they do not: the version checks, foreign files, and bit-exact round trips
of both model kinds in float32 and float64 (random arrays with full float64
mantissas, so a silent float32 detour would show), report included.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from factstore_jax import factsets, serialization
from factstore_jax.constructions.encoder_decoder import ConstructionReport
from factstore_jax.errors import FactStoreError
from factstore_jax.mlp import EncoderDecoder, GatedMLP

EXTS = ('.safetensors', '.npz')
D, H, M = 8, 12, 4


def _arrays(dtype, seed=0):
  rng = np.random.default_rng(seed)
  return lambda *shape: jnp.asarray(rng.normal(size=shape).astype(dtype))


def _models(dtype):
  a = _arrays(dtype)
  return {
      'encoder_decoder': EncoderDecoder(
          w_gate=a(D, H), b_gate=a(H), w_up=a(D, H), routing=a(H, M),
          decoder=a(D, M), activation='clipped', window=2),
      'gated_mlp': GatedMLP(w_gate=a(D, H), w_up=a(D, H), w_down=a(H, D),
                            b_gate=a(H), activation='relu'),
      'gated_mlp_all_biases': GatedMLP(
          w_gate=a(D, H), w_up=a(D, H), w_down=a(H, D), b_gate=a(H),
          b_up=a(H), b_down=a(D), activation='silu'),
  }


def _report() -> dict:
  """A construction report whose floats need every digit to round-trip."""
  return ConstructionReport(
      num_facts=4096, num_values=512, dim=D, code_dim=M, bucket_size=4,
      num_buckets=1024, hidden_dim=H, num_params=123_456,
      num_params_gated_mlp=234_567, params_per_fact=123_456 / 4096,
      bits_per_param=4096 * math.log2(512) / 123_456, accuracy=1.0,
      min_margin=0.1 + 0.2, min_normalized_margin=1 / 3,
      code_error=5e-324, rho_projected=np.float32(0.1).item(),
      min_gap=-0.0, repaired_buckets=0, retries=1,
      seconds=1e308, fill=0.95, max_map_norm=2.0 ** 0.5,
      patched_values=3).as_dict()


def _x64(dtype):
  return jax.enable_x64(dtype == 'float64')


@pytest.mark.parametrize('ext', EXTS)
@pytest.mark.parametrize('dtype', ['float32', 'float64'])
def test_round_trip_bit_exact(tmp_path, dtype, ext):
  with _x64(dtype):
    report = _report()
    for name, model in _models(dtype).items():
      path = tmp_path / f'{name}{ext}'
      serialization.save_model(path, model, report)
      loaded, meta = serialization.load_model(path)
      assert type(loaded) is type(model), name
      assert loaded.activation == model.activation
      assert getattr(loaded, 'window', 1) == getattr(model, 'window', 1)
      leaves, treedef = jax.tree.flatten(model)
      loaded_leaves, loaded_treedef = jax.tree.flatten(loaded)
      assert loaded_treedef == treedef, name  # same optional biases
      for want, got in zip(leaves, loaded_leaves):
        assert got.dtype == jnp.dtype(dtype) == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        # Bit for bit, not just equal values (-0.0, every mantissa bit).
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes()
      # The same function: outputs identical.
      x = _arrays(dtype, seed=1)(5, D)
      np.testing.assert_array_equal(
          np.asarray(loaded(x)), np.asarray(model(x)))
      # Report: every field back exactly (floats via repr, -0.0 kept).
      assert meta['report'] == report
      assert {k: repr(v) for k, v in meta['report'].items()} == {
          k: repr(v) for k, v in report.items()}
      assert meta['format'] == serialization.FORMAT
      assert meta['format_version'] == str(serialization.FORMAT_VERSION)
      assert meta['kind'] == name.replace('_all_biases', '')


def test_report_defaults_to_empty_and_keeps_nan(tmp_path):
  model = _models('float32')['gated_mlp']
  serialization.save_model(tmp_path / 'a.npz', model)
  assert serialization.load_model(tmp_path / 'a.npz')[1]['report'] == {}
  serialization.save_model(tmp_path / 'b.safetensors', model,
                           {'rho': float('nan'), 'big': float('inf')})
  report = serialization.load_model(tmp_path / 'b.safetensors')[1]['report']
  assert math.isnan(report['rho']) and report['big'] == float('inf')


# ----------------------------------------------------------------------------
# Versions and foreign files.
# ----------------------------------------------------------------------------


def _rewrite_metadata(path, **changes):
  """Rewrites a saved model's metadata (``None`` deletes a key)."""
  path = str(path)
  if path.endswith('.safetensors'):
    with safetensors.safe_open(path, framework='numpy') as f:
      metadata = dict(f.metadata())
      arrays = {k: f.get_tensor(k) for k in f.keys()}
  else:
    with np.load(path) as data:
      arrays = {k: data[k] for k in data.files}
    metadata = json.loads(str(arrays.pop('__metadata__')))
  for key, value in changes.items():
    if value is None:
      metadata.pop(key, None)
    else:
      metadata[key] = value
  if path.endswith('.safetensors'):
    safetensors.numpy.save_file(arrays, path, metadata=metadata)
  else:
    np.savez(path, __metadata__=np.array(json.dumps(metadata)), **arrays)


def _saved(tmp_path, ext, **changes):
  path = tmp_path / f'model{ext}'
  serialization.save_model(path, _models('float32')['encoder_decoder'],
                           {'accuracy': 1.0})
  if changes:
    _rewrite_metadata(path, **changes)
  return path


def test_current_version_is_telescoped():
  assert serialization.FORMAT_VERSION == 2
  assert serialization.GADGETS[serialization.FORMAT_VERSION] == 'telescoped'


@pytest.mark.parametrize('ext', EXTS)
def test_current_version_loads(tmp_path, ext):
  path = _saved(tmp_path, ext)
  model, meta = serialization.load_model(path)
  assert type(model).__name__ == 'EncoderDecoder'
  assert meta['report'] == {'accuracy': 1.0}
  assert meta['format_version'] == '2' and meta['gadget'] == 'telescoped'


@pytest.mark.parametrize('ext', EXTS)
def test_version_1_file_loads_as_the_same_function(tmp_path, ext):
  """A file written by the two-neuron-window library (version 1, no
  ``gadget`` metadata) loads bit for bit and computes the same outputs."""
  path = _saved(tmp_path, ext, format_version='1', gadget=None)
  model, meta = serialization.load_model(path)
  assert meta['gadget'] == 'windowed'
  saved = _models('float32')['encoder_decoder']
  assert model.window == saved.window == 2
  for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  x = _arrays('float32', seed=2)(5, D)
  np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(saved(x)))


@pytest.mark.parametrize('ext', EXTS)
def test_missing_window_means_one(tmp_path, ext):
  path = _saved(tmp_path, ext, window=None)
  model, _ = serialization.load_model(path)
  assert model.window == 1
  x = _arrays('float32', seed=1)(5, D)
  np.testing.assert_allclose(  # the same function, summed in another order
      np.asarray(model(x)),
      np.asarray(_models('float32')['encoder_decoder'](x)), rtol=1e-5,
      atol=1e-5)


@pytest.mark.parametrize('ext', EXTS)
@pytest.mark.parametrize('version', ['3', '17'])
def test_newer_version_names_both_versions(tmp_path, ext, version):
  path = _saved(tmp_path, ext, format_version=version)
  with pytest.raises(FactStoreError) as info:
    serialization.load_model(path)
  message = str(info.value)
  assert str(path) in message
  assert f'version {version}' in message and 'newer' in message
  assert f'version {serialization.FORMAT_VERSION}' in message
  assert 'upgrade factstore_jax' in message


@pytest.mark.parametrize('ext', EXTS)
@pytest.mark.parametrize(('field', 'value', 'message'), [
    *[('format_version', v, 'invalid format_version')
      for v in ('0', '-1', 'abc', '1.5', '')],
    # The hidden dimension is 12: 5 does not divide it.
    *[('window', v, 'not a positive integer dividing')
      for v in ('0', '5', 'two', '-2', '', '\u00b2')]])
def test_invalid_metadata(tmp_path, ext, field, value, message):
  path = _saved(tmp_path, ext, **{field: value})
  with pytest.raises(FactStoreError, match=message):
    serialization.load_model(path)


@pytest.mark.parametrize('ext', EXTS)
def test_missing_version(tmp_path, ext):
  path = _saved(tmp_path, ext, format_version=None)
  with pytest.raises(FactStoreError, match='has no format_version'):
    serialization.load_model(path)


@pytest.mark.parametrize('ext', EXTS)
def test_other_format(tmp_path, ext):
  path = _saved(tmp_path, ext, format='someone.else')
  with pytest.raises(FactStoreError,
                     match=r"not a factstore_jax MLP file \(format "
                           r"'someone.else'"):
    serialization.load_model(path)


def test_plain_safetensors_without_metadata(tmp_path):
  path = tmp_path / 'plain.safetensors'
  model = _models('float32')['gated_mlp']
  safetensors.numpy.save_file(
      {'w_gate': np.asarray(model.w_gate), 'w_up': np.asarray(model.w_up),
       'w_down': np.asarray(model.w_down)}, str(path))
  with pytest.raises(FactStoreError, match='no "format" / "format_version" '
                                           'metadata'):
    serialization.load_model(path)


def test_plain_npz_without_metadata(tmp_path):
  path = tmp_path / 'plain.npz'
  np.savez(path, w_gate=np.ones((D, H), np.float32))
  with pytest.raises(FactStoreError, match='no "format" / "format_version"'):
    serialization.load_model(path)


@pytest.mark.parametrize('ext', EXTS)
def test_factset_file_is_not_a_model(tmp_path, ext):
  # A common mix-up: a fact set file passed where a model file is expected.
  path = tmp_path / f'facts{ext}'
  factsets.save_factset(path, factsets.make_factset(
      np.eye(4, dtype=np.float32), np.eye(4, dtype=np.float32), np.arange(4)))
  with pytest.raises(FactStoreError, match='not a factstore_jax MLP file'):
    serialization.load_model(path)


def test_npz_metadata_not_an_object(tmp_path):
  path = tmp_path / 'odd.npz'
  np.savez(path, __metadata__=np.array('[1, 2]'),
           w_gate=np.ones((D, H), np.float32))
  with pytest.raises(FactStoreError, match='not a JSON object'):
    serialization.load_model(path)


@pytest.mark.parametrize('ext', EXTS)
@pytest.mark.parametrize('activation, match', [
    (None, 'names no activation'), ('gelu_tanh_9', 'unknown activation')])
def test_bad_activation(tmp_path, ext, activation, match):
  path = _saved(tmp_path, ext, activation=activation)
  with pytest.raises(FactStoreError, match=match):
    serialization.load_model(path)


@pytest.mark.parametrize('ext', EXTS)
def test_bad_report_json(tmp_path, ext):
  path = _saved(tmp_path, ext, report='{not json')
  with pytest.raises(FactStoreError, match='report is not valid JSON'):
    serialization.load_model(path)


def test_errors_are_value_errors(tmp_path):
  path = _saved(tmp_path, '.npz', format_version='99')
  with pytest.raises(ValueError):
    serialization.load_model(path)
