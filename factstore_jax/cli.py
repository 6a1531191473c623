"""The ``factstore`` command.

  factstore construct --keys K.npy --values V.npy --mapping F.npy --out M.safetensors
  factstore construct --factset X.npz --out M.npz [--code_dim --bucket_size --fill --verify --seed --dtype]
  factstore evaluate --mlp M.safetensors (--keys K --values V --mapping F | --factset X)
  factstore decodability (--values V [--mapping F] | --factset X)
  factstore demo [--png factstore_demo_margins.png]

construct / evaluate / decodability print one JSON object on stdout. Bad input
exits non-zero with a one-line message on stderr and writes no file.
"""

from __future__ import annotations

import json
import sys
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS
COMMANDS = ('construct', 'evaluate', 'decodability', 'demo')

flags.DEFINE_string('keys', None, 'Keys (N, d): .npy/.npz/.safetensors.')
flags.DEFINE_string('values', None, 'Value table (P, d): .npy/.npz/.safetensors.')
flags.DEFINE_string('mapping', None, 'Map (N,) of key -> value index.')
flags.DEFINE_string('factset', None,
                    '.npz/.safetensors holding arrays keys, values, mapping.')
flags.DEFINE_string('out', None, 'construct: output MLP (.safetensors/.npz).')
flags.DEFINE_string('mlp', None, 'evaluate: MLP file written by construct.')
flags.DEFINE_integer('code_dim', None, 'Code dimension m (default: search).')
flags.DEFINE_integer('bucket_size', None, 'Max keys per bucket (default d).')
flags.DEFINE_float('fill', None, 'Nominal bucket size as a fraction of '
                   'bucket_size, in (0, 1] (default: the library default).')
flags.DEFINE_enum('verify', 'certificate', ['certificate', 'dense'],
                  'construct: the structured margin certificate (falls back '
                  'to the dense check when it cannot certify every fact) or '
                  'the dense check of every key against every neuron and '
                  'value.')
flags.DEFINE_integer('seed', 0, 'PRNG seed.')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'float64'], 'Float type.')
flags.DEFINE_enum('activation', 'clipped', ['clipped', 'relu'], 'Gate.')
flags.DEFINE_integer('num_facts', 16384, 'demo: number of facts.')
flags.DEFINE_integer('dim', 128, 'demo: embedding dimension.')
flags.DEFINE_integer('num_values', 1024, 'demo: number of values.')
flags.DEFINE_string('png', 'factstore_demo_margins.png',
                    'demo: where to write the margin histogram.')


class UsageError(Exception):
  """Bad command line (reported like bad input)."""


def _dtype():
  import jax
  import jax.numpy as jnp
  if FLAGS.dtype == 'float64':
    jax.config.update('jax_enable_x64', True)
    return jnp.float64
  return jnp.float32


def _load_factset(need_mapping: bool = True):
  from factstore_jax import factsets
  dtype = _dtype()
  if FLAGS.factset:
    if FLAGS.keys or FLAGS.values or FLAGS.mapping:
      raise UsageError('give either --factset or --keys/--values/--mapping')
    return factsets.load_factset(FLAGS.factset, dtype=dtype)
  missing = [n for n in ('keys', 'values', 'mapping')
             if getattr(FLAGS, n) is None]
  if missing:
    raise UsageError(f'missing --{", --".join(missing)} (or give --factset)')
  return factsets.make_factset(factsets.load_array(FLAGS.keys),
                               factsets.load_array(FLAGS.values),
                               factsets.load_array(FLAGS.mapping), dtype=dtype)


def _emit(result: dict):
  print(json.dumps(result, default=float))


def cmd_construct(start: float):
  """``factstore construct``: build, verify and save an MLP."""
  from factstore_jax import serialization
  from factstore_jax.constructions.encoder_decoder import construct
  if not FLAGS.out:
    raise UsageError('missing --out (the MLP file to write)')
  if not FLAGS.out.endswith(('.safetensors', '.npz')):
    raise UsageError(f'--out must end in .safetensors or .npz: {FLAGS.out}')
  fs = _load_factset()
  fill = {} if FLAGS.fill is None else {'fill': FLAGS.fill}
  result = construct(FLAGS.seed, fs, code_dim=FLAGS.code_dim,
                     bucket_size=FLAGS.bucket_size,
                     activation=FLAGS.activation, verify=FLAGS.verify,
                     **fill)
  report = result.report.as_dict()
  serialization.save_model(FLAGS.out, result.model, report)
  _emit(dict(report, rho=report['rho_projected'], out=FLAGS.out,
             construct_seconds=report['seconds'],
             seconds=time.perf_counter() - start))


def cmd_evaluate(start: float):
  """``factstore evaluate``: verify a saved MLP on a fact set."""
  import math
  from factstore_jax.decodability import decodability, used_values
  from factstore_jax import serialization, storage
  from factstore_jax.mlp import num_params
  if not FLAGS.mlp:
    raise UsageError('missing --mlp (a file written by factstore construct)')
  model, meta = serialization.load_model(FLAGS.mlp)
  fs = _load_factset()
  d_model = model.w_gate.shape[0]
  if fs.keys.shape[1] != d_model:
    raise UsageError(f'the MLP takes d={d_model} inputs but the keys have '
                     f'd={fs.keys.shape[1]}')
  rep = storage.evaluate_fn(model, fs)
  rho = decodability(fs.values, indices=used_values(fs.mapping))
  n_params = num_params(model)
  n = fs.keys.shape[0]
  _emit(dict(
      accuracy=float(rep.accuracy), min_margin=float(rep.min_margin),
      min_normalized_margin=float(rep.min_normalized_margin),
      num_failing=int((rep.margins <= 0).sum()), num_params=n_params,
      params_per_fact=n_params / n, num_facts=n,
      num_values=int(fs.values.shape[0]),
      bits_per_param=n * math.log2(max(fs.values.shape[0], 2)) / n_params,
      rho=float(rho.rho.min()), model_kind=meta['kind'],
      seconds=time.perf_counter() - start))


def _check_values(values, mapping=None):
  """Host-side checks of a value table (and map) given without keys."""
  import numpy as np
  from factstore_jax.errors import FactStoreError
  if values.ndim != 2 or 0 in values.shape:
    raise FactStoreError(f'values must be a non-empty (P, d) array, got shape '
                         f'{values.shape}')
  bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
  if len(bad):
    raise FactStoreError(f'values contain NaN or inf (first bad row {bad[0]})')
  if mapping is not None:
    if mapping.ndim != 1 or not np.issubdtype(mapping.dtype, np.integer):
      raise FactStoreError(f'mapping must be a 1-D integer array, got '
                           f'{mapping.dtype} of shape {mapping.shape}')
    out = np.flatnonzero((mapping < 0) | (mapping >= values.shape[0]))
    if len(out):
      raise FactStoreError(
          f'mapping out of range: mapping[{out[0]}] = {mapping[out[0]]} is not '
          f'in [0, {values.shape[0]})')


def cmd_decodability(start: float):
  """``factstore decodability``: rho of a value table."""
  import numpy as np
  from factstore_jax import factsets
  from factstore_jax.decodability import (decodability, undecodable_values,
                                          used_values)
  dtype = _dtype()
  if FLAGS.factset:
    fs = factsets.load_factset(FLAGS.factset, dtype=dtype)
    values, mapping = fs.values, fs.mapping
  else:
    if FLAGS.values is None:
      raise UsageError('missing --values (or give --factset)')
    values = factsets.load_array(FLAGS.values)
    mapping = (None if FLAGS.mapping is None
               else factsets.load_array(FLAGS.mapping))
    _check_values(values, mapping)
    values = np.asarray(values, dtype)
  result = decodability(values)
  scope = (used_values(mapping) if mapping is not None
           else np.arange(values.shape[0]))
  rho = np.asarray(result.rho)[scope]
  bad = undecodable_values(result, mapping)
  out = dict(rho=float(rho.min()), rho_min=float(rho.min()),
             rho_mean=float(rho.mean()), num_undecodable=len(bad),
             undecodable=bad, num_values=int(values.shape[0]),
             num_used=int(len(scope)),
             max_gap=float(np.asarray(result.gap)[scope].max()),
             feasible=not bad, seconds=time.perf_counter() - start)
  if mapping is not None:
    out['num_facts'] = int(len(mapping))
  _emit(out)


def cmd_demo(start: float):
  """``factstore demo``: the README Quickstart demo."""
  from factstore_jax import demo
  demo.run_demo(num_facts=FLAGS.num_facts, dim=FLAGS.dim,
                num_values=FLAGS.num_values, seed=FLAGS.seed, png=FLAGS.png)


def main(argv):
  """Dispatches ``factstore COMMAND [--flags]``."""
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(
        f'usage: factstore {{{"|".join(COMMANDS)}}} [--flags]; got '
        f'{" ".join(argv[1:]) or "no command"}')
  from factstore_jax.errors import FactStoreError
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  start = time.perf_counter()
  try:
    globals()[f'cmd_{argv[1]}'](start)
  except (FactStoreError, UsageError, OSError) as e:
    message = ' '.join(str(e).split())
    print(f'factstore {argv[1]}: error: {message}', file=sys.stderr)
    sys.exit(1)


def run():
  """Console-script entry point (one XLA CPU device per core)."""
  from factstore_jax.threads import expose_cpu_cores
  expose_cpu_cores()
  app.run(main)


if __name__ == '__main__':
  run()
