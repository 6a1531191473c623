"""``factstore demo``: build, certify and inspect one fact-storing MLP."""

from __future__ import annotations

import time

import jax
import numpy as np

from factstore_jax.decodability import decodability
from factstore_jax.atomic import save_figure
from factstore_jax import factsets, storage
from factstore_jax.constructions.encoder_decoder import construct


def _table(rows: list[tuple[str, str]]) -> str:
  width = max(len(name) for name, _ in rows)
  return '\n'.join(f'  {name:<{width}}  {value}' for name, value in rows)


def plot_margins(margins: np.ndarray, path: str, title: str):
  """Histogram of normalised margins, written atomically as a PNG."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.hist(margins, bins=80, color='tab:blue')
  ax.axvline(0.0, color='tab:red', linestyle='--', label='margin 0')
  ax.set_xlabel(r'normalised margin $\gamma_i / \|g(k_i)\|$')
  ax.set_ylabel('facts')
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  save_figure(fig, path)


def run_demo(num_facts: int = 16384, dim: int = 128, num_values: int = 1024,
             seed: int = 0, png: str | None = 'factstore_demo_margins.png'):
  """Runs the demo; returns ``(Construction, dense StorageReport)``."""
  start = time.perf_counter()
  print(f'factstore demo: {num_facts:,} facts, d = {dim}, {num_values:,} '
        'values (keys and values uniform on the sphere, random many-to-one map)')
  fs = factsets.random_factset(jax.random.key(seed), num_facts, dim,
                               num_values, embedding='sphere', tied=False,
                               mapping='many_to_one')
  print('  decodability of the value table ...', flush=True)
  rho = decodability(fs.values)
  print('  constructing the encoder-decoder MLP ...', flush=True)
  result = construct(seed, fs)
  rep = result.report
  print('  checking every fact with the dense gated MLP ...', flush=True)
  dense = storage.evaluate_mlp(result.mlp, fs)
  rows = [
      ('facts N / values P / dim d', f'{num_facts:,} / {num_values:,} / {dim}'),
      ('value decodability rho (min)', f'{float(rho.rho.min()):.4f}'),
      ('projected rho (min, used)', f'{rep.rho_projected:.4f}'),
      ('code dim m / bucket size b', f'{rep.code_dim} / {rep.bucket_size}'),
      ('buckets / hidden width', f'{rep.num_buckets:,} / {rep.hidden_dim:,}'),
      ('parameters (encoder-decoder)', f'{rep.num_params:,}'),
      ('parameters (as gated MLP)', f'{rep.num_params_gated_mlp:,}'),
      ('parameters per fact', f'{rep.params_per_fact:.1f}'),
      ('bits per parameter', f'{rep.bits_per_param:.4f}'),
      ('max code error', f'{rep.code_error:.2e}'),
      ('storage accuracy (dense check)', f'{float(dense.accuracy):.4f}'),
      ('min margin (dense check)', f'{float(dense.min_margin):.4g}'),
      ('min normalised margin', f'{float(dense.min_normalized_margin):.4g}'),
      ('construction time', f'{rep.seconds:.1f} s'),
  ]
  print(_table(rows))
  if png:
    plot_margins(np.asarray(dense.normalized_margins), png,
                 f'{num_facts:,} facts stored by a constructed MLP '
                 f'({rep.params_per_fact:.0f} params/fact)')
    print(f'  margin histogram written to {png}')
  ok = float(dense.accuracy) == 1.0 and float(dense.min_margin) > 0
  print(f'  all facts stored: {"yes" if ok else "NO"} '
        f'(total {time.perf_counter() - start:.1f} s)')
  return result, dense
