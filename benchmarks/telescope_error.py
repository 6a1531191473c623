r"""Float32 error of the telescoped encoder sum, measured against its bound.

For each N in ``--sizes`` at ``d = --dim``, ``P = --num_values`` (sphere keys
and values, a random many-to-one map), the construction's building blocks run as
``construct`` runs them (code dim search, streamed bucket solves, dense
assembly), then, for a sample of keys — every key of the top ``--top``
buckets (the longest telescoped sums) and ``--sample`` uniform ones — the
dense float32 code ``E(k)`` is compared with the value code ``c_f(k)``:

* ``max_error``: ``max |E_r(k) - c_{f(k), r}|`` over the sample;
* ``max_bound``: the a-priori bound of docs/design.md,
  ``(u + γ_d + γ_{i+1}(1 + γ_d)) · Σ_{j<=i} |ΔM_j|_r · |k|`` for a key of
  bucket ``i``, plus the bucket solve's own residual ``|M_i k - c|``
  (measured in float64);
* ``max_error / max_bound`` (must be <= 1) and the per-key ratio's maximum.

Full verification of every fact (``construct``) is not run here: at 2^20 it
is the dense forward pass of every key against every value.

Usage::

  python benchmarks/telescope_error.py \
      --sizes=1024,4096,16384,65536,262144,1048576 \
      --out=benchmarks/results/telescope_error.json
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from factstore_jax.constructions import encoder_decoder as ed
from factstore_jax.constructions import assembly
from factstore_jax.constructions import codes as codes_lib
from factstore_jax.constructions import config as config_lib
from factstore_jax.constructions import verify as verify_lib
from factstore_jax.threads import single_threaded_blas

from factstore_jax.factsets import random_factset

import common  # benchmarks/common.py (the script's folder is on sys.path)

FLAGS = flags.FLAGS
flags.DEFINE_list('sizes', ['1024', '4096', '16384', '65536', '262144',
                            '1048576'], 'Numbers of facts N.')
flags.DEFINE_integer('dim', 256, 'Embedding dimension d.')
flags.DEFINE_integer('num_values', 4096, 'Values P (at most N).')
flags.DEFINE_integer('top', 4, 'Every key of this many top buckets.')
flags.DEFINE_integer('sample', 4096, 'Uniformly sampled keys.')
flags.DEFINE_integer('seed', 0, 'PRNG seed.')
flags.DEFINE_string('out', 'benchmarks/results/telescope_error.json',
                    'Where to write the figures.')


@jax.jit
def _encode(model, x):
  return jax.lax.map(model.encode, x, batch_size=256)


def measure(n: int) -> dict:
  d, p = FLAGS.dim, FLAGS.num_values
  key = jax.random.key(FLAGS.seed)
  p = min(p, n)  # every value used
  fs = random_factset(jax.random.fold_in(key, n), n, d, p, tied=False,
                      mapping='many_to_one' if p < n else 'permutation')
  t0 = time.perf_counter()
  config = config_lib.ConstructionConfig(patch=0.0)   # no straggler columns here
  m, codes, _, _ = codes_lib.choose_code_dim(key, fs.values, np.asarray(fs.mapping),
                                      config, stream_size=ed.STREAM_VALUES)
  decoder = codes_lib.construction_decoder(key, d, m, fs.keys.dtype)
  _, k_dir = jax.random.split(key)
  targets = codes[fs.mapping]
  with single_threaded_blas():
    parts = assembly.build_gadgets_streamed(
        k_dir, fs.keys, targets, bucket_size=d, fill=config.fill,
        stream_size=ed.STREAM_BUCKETS)
  model = assembly.assemble_live(parts, decoder, 'clipped')
  build_s = time.perf_counter() - t0

  index = np.asarray(parts.buckets.index)
  valid = np.asarray(parts.buckets.valid)
  n_b = index.shape[0]
  rng = np.random.default_rng(FLAGS.seed)
  top = index[-FLAGS.top:][valid[-FLAGS.top:]]
  rows = np.unique(np.concatenate([top, rng.choice(n, min(FLAGS.sample, n),
                                                   replace=False)]))
  owner = np.asarray(verify_lib.bucket_of_key(parts.buckets, n))[rows]
  x = np.asarray(fs.keys)[rows]
  want = np.asarray(codes)[np.asarray(fs.mapping)[rows]]
  t1 = time.perf_counter()
  got = np.asarray(_encode(model, jnp.asarray(x)))
  encode_s = time.perf_counter() - t1
  err = np.abs(got - want)                                    # (S, m)

  # The bound (float64): rounding of the telescoped sum, plus the bucket
  # solve's own residual |M_i k - c|.
  bound = ed.gadgets.telescope_error_bound(parts.maps, x, owner)
  maps = np.asarray(parts.maps, np.float64)
  residual = np.abs(np.einsum('smd,sd->sm', maps[owner],
                              x.astype(np.float64)) - want)
  diffs = np.abs(np.asarray(ed.gadgets.telescope(parts.maps), np.float64))
  term_sum = np.einsum('smd,sd->sm', np.cumsum(diffs, 0)[owner],
                       np.abs(x).astype(np.float64))
  total = bound + residual
  ratio = err / np.maximum(total, np.finfo(np.float64).tiny)
  top_sel = owner >= n_b - FLAGS.top
  return {
      'num_facts': n, 'dim': d, 'num_values': p, 'code_dim': int(m),
      'num_buckets': int(n_b), 'hidden_dim': int(model.w_gate.shape[1]),
      'sampled_keys': int(len(rows)),
      'max_error': float(err.max()),
      'max_error_top_buckets': float(err[top_sel].max()),
      'median_error': float(np.median(err.max(1))),
      'max_bound': float(total.max()),
      'max_rounding_bound': float(bound.max()),
      'max_solve_residual': float(residual.max()),
      'max_ratio_error_to_bound': float(ratio.max()),
      'max_term_sum': float(term_sum.max()),
      'build_seconds': build_s, 'encode_seconds': encode_s,
  }


def main(argv):
  del argv
  rows = []
  for n in (int(s) for s in FLAGS.sizes):
    row = measure(n)
    rows.append(row)
    print(f"N={row['num_facts']:>8} n={row['num_buckets']:>5} "
          f"m={row['code_dim']} error max {row['max_error']:.2e} "
          f"(top buckets {row['max_error_top_buckets']:.2e}, median "
          f"{row['median_error']:.2e}) bound {row['max_bound']:.2e} "
          f"ratio {row['max_ratio_error_to_bound']:.3f} "
          f"[{row['build_seconds']:.0f}s build, "
          f"{row['encode_seconds']:.0f}s encode]", flush=True)
    common.write_json(FLAGS.out, {'machine': common.machine_info(),
                                  'rows': rows})


if __name__ == '__main__':
  app.run(main)
