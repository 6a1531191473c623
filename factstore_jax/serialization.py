"""Saving and loading constructed MLPs (``.safetensors`` or ``.npz``).

A file holds the arrays of an :class:`EncoderDecoder` (``w_gate, b_gate, w_up,
routing, decoder``) or a :class:`GatedMLP` (``w_gate, w_up, w_down`` and any
biases), plus string metadata: ``format`` (``factstore_jax.mlp``),
``format_version``, ``kind``, ``activation``, an encoder-decoder's ``window``
(neurons summed first per group; absent means 1) and ``gadget``, and an
optional JSON ``report``. Writes are atomic: a temp file in the target
folder, then ``os.replace``.

Format versions:

* ``1``: encoder-decoders built from two-sided windows, two clipped neurons
  per (bucket, code coordinate) (``window = 2``).
* ``2`` (current): telescoped steps, one clipped neuron per (cut, code
  coordinate) with up-weights ``M_j - M_{j-1}``; metadata ``gadget =
  'telescoped'``.

The arrays of an encoder-decoder file fully define its function (gate, up,
routing, decoder and the ``window`` grouping), so a version-1 file loads as
the same function it was saved as (``metadata['gadget'] == 'windowed'``); it
is simply less efficient: rebuild it from its fact set with
``factstore construct`` (or :func:`~factstore_jax.constructions.
encoder_decoder.construct`) for a telescoped MLP. :func:`load_model` fails
with a :class:`FactStoreError` naming the file's version and the library's
for a newer (or invalid) version, and for a file without
``format``/``format_version`` metadata (e.g. a plain safetensors file).

Arrays keep their dtype: float32 and float64 models round-trip bit for bit,
the report too. As everywhere in JAX, float64 arrays stay float64 only with
``jax_enable_x64``; without it they load as float32.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from factstore_jax.atomic import atomic_output
from factstore_jax.errors import FactStoreError
from factstore_jax.mlp import EncoderDecoder, GatedMLP, get_activation

FORMAT = 'factstore_jax.mlp'
# Version history: 1 — two-neuron windows; 2 — telescoped steps.
FORMAT_VERSION = 2
# The gadget layout of an encoder-decoder file, by format version.
GADGETS = {1: 'windowed', 2: 'telescoped'}
_FIELDS = {
    'encoder_decoder': ('w_gate', 'b_gate', 'w_up', 'routing', 'decoder'),
    'gated_mlp': ('w_gate', 'w_up', 'w_down', 'b_gate', 'b_up', 'b_down'),
}


def _kind(model) -> str:
  kind = getattr(model, 'KIND', None)
  if kind in _FIELDS:
    return kind
  raise FactStoreError(f'cannot save a {type(model).__name__}; expected an '
                       'EncoderDecoder or a GatedMLP')


def save_model(path: str | os.PathLike, model, report: dict | None = None):
  """Writes ``model`` (and an optional JSON-able ``report``) atomically."""
  path = os.fspath(path)
  ext = os.path.splitext(path)[1]
  if ext not in ('.safetensors', '.npz'):
    raise FactStoreError(
        f'{path}: unknown MLP file extension {ext!r}; use .safetensors or .npz')
  kind = _kind(model)
  arrays = {name: np.asarray(getattr(model, name)) for name in _FIELDS[kind]
            if getattr(model, name) is not None}
  metadata = {'format': FORMAT, 'format_version': str(FORMAT_VERSION),
              'kind': kind, 'activation': model.activation,
              'report': json.dumps(report or {})}
  if kind == 'encoder_decoder':
    metadata['window'] = str(model.window)
    metadata['gadget'] = GADGETS[FORMAT_VERSION]
  with atomic_output(path, suffix=ext) as tmp:
    if ext == '.safetensors':
      safetensors.numpy.save_file(arrays, tmp, metadata=metadata)
    else:
      with open(tmp, 'wb') as f:
        np.savez(f, __metadata__=np.array(json.dumps(metadata)), **arrays)


def _positive_int(raw) -> int | None:
  """``raw`` metadata (a string) as an integer >= 1, else ``None``."""
  try:
    value = int(str(raw).strip())
  except ValueError:
    return None
  return value if value >= 1 else None


def _window(path: str, text, routing) -> int:
  """The ``window`` metadata of an encoder-decoder file, checked."""
  window = _positive_int(text)
  if window is None or (routing is not None and routing.shape[0] % window):
    raise FactStoreError(
        f'{path}: window {text!r} is not a positive integer dividing the '
        'hidden dimension')
  return window


def load_model(path: str | os.PathLike):
  """Reads a model file. Returns ``(model, metadata dict)``.

  Raises:
    FactStoreError: missing/unreadable file, not a factstore MLP file, or a
      format version this library does not read.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FactStoreError(f'{path}: no such MLP file')
  ext = os.path.splitext(path)[1]
  try:
    if ext == '.safetensors':
      with safetensors.safe_open(path, framework='numpy') as f:
        metadata = dict(f.metadata() or {})
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    elif ext == '.npz':
      with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
      metadata = json.loads(str(arrays.pop('__metadata__', '{}')))
    else:
      raise FactStoreError(
          f'{path}: unknown MLP file extension {ext!r}; use .safetensors or .npz')
  except FactStoreError:
    raise
  except Exception as e:  # corrupt or foreign files
    raise FactStoreError(f'{path}: cannot read MLP file ({e})') from e
  if not isinstance(metadata, dict):
    raise FactStoreError(f'{path}: not a factstore_jax MLP file (its '
                         'metadata is not a JSON object)')
  if 'format' not in metadata and 'format_version' not in metadata:
    raise FactStoreError(
        f'{path}: not a factstore_jax MLP file: it has no "format" / '
        '"format_version" metadata (a plain tensor file?); MLP files are '
        'written by factstore_jax.save_model')
  if metadata.get('format') != FORMAT:
    raise FactStoreError(
        f'{path}: not a factstore_jax MLP file (format '
        f'{metadata.get("format")!r}, expected {FORMAT!r})')
  version = _check_version(path, metadata)
  kind = metadata.get('kind')
  if kind not in _FIELDS:
    raise FactStoreError(f'{path}: unknown model kind {kind!r}')
  fields = {k: jnp.asarray(v) for k, v in arrays.items()}
  cls = EncoderDecoder if kind == 'encoder_decoder' else GatedMLP
  if not isinstance(metadata.get('activation'), str):
    raise FactStoreError(f'{path}: the file names no activation')
  try:
    get_activation(metadata['activation'])
  except FactStoreError as e:
    raise FactStoreError(f'{path}: {e}') from e
  static = {'activation': metadata['activation']}
  if kind == 'encoder_decoder':  # files without it: one neuron per window
    static['window'] = _window(path, metadata.get('window', '1'),
                               fields.get('routing'))
    metadata.setdefault('gadget', GADGETS[version])
  try:
    model = cls(**fields, **static)
  except TypeError as e:
    raise FactStoreError(f'{path}: arrays do not form a {kind} ({e})') from e
  try:
    metadata['report'] = json.loads(metadata.get('report') or '{}')
  except ValueError as e:
    raise FactStoreError(f'{path}: its report is not valid JSON ({e})') from e
  return model, metadata


def _check_version(path: str, metadata: dict) -> int:
  """The file's format version, if this library reads it."""
  if 'format_version' not in metadata:
    raise FactStoreError(
        f'{path}: MLP file has no format_version (this library reads '
        f'versions 1 to {FORMAT_VERSION})')
  raw = metadata['format_version']
  version = _positive_int(raw)
  if version is None:
    raise FactStoreError(
        f'{path}: MLP file has an invalid format_version {raw!r} (versions '
        f'are integers from 1; this library reads 1 to {FORMAT_VERSION})')
  if version > FORMAT_VERSION:
    raise FactStoreError(
        f'{path}: MLP file format version {version} is newer than this '
        f'library reads (version {FORMAT_VERSION}); upgrade factstore_jax')
  return version
