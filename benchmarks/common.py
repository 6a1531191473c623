"""Shared benchmark helpers: machine info, matmul peak, CPU-noise meter."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from factstore_jax.atomic import atomic_output


class ForeignCpu:
  """CPU time other processes used on this machine while the block ran.

  Busy time of all cores (``/proc/stat``) minus this process's own CPU time
  (``getrusage``). On 2 cores one busy neighbour roughly halves throughput
  (measured: ``build_gadgets`` at N = 4096 went from 0.05 s to 0.11 s with
  one-thread BLAS, and stalled for ~20 s per call with OpenBLAS left
  multi-threaded), so timings with a large ``fraction`` (share of the block's
  core-seconds taken by other processes) are not representative. ``None``
  where ``/proc/stat`` is unavailable.
  """

  def __enter__(self):
    self._stat0, self._own0 = self._stat(), self._own()
    self._t0 = time.perf_counter()
    self.seconds = self.fraction = self.steal_seconds = None
    return self

  def __exit__(self, *exc):
    wall = time.perf_counter() - self._t0
    stat = self._stat()
    if stat is not None and self._stat0 is not None:
      busy, steal = stat[0] - self._stat0[0], stat[1] - self._stat0[1]
      self.seconds = max(0.0, busy - (self._own() - self._own0))
      self.steal_seconds = steal
      cores = len(os.sched_getaffinity(0)) if hasattr(
          os, 'sched_getaffinity') else os.cpu_count()
      self.fraction = self.seconds / max(wall * cores, 1e-9)
    return False

  @staticmethod
  def _stat() -> tuple[float, float] | None:
    """``(busy, steal)`` seconds of all cores since boot."""
    try:
      with open('/proc/stat') as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
      return None
    # user nice system idle iowait irq softirq steal (guest is in user).
    hz = os.sysconf('SC_CLK_TCK')
    busy = sum(fields[:3]) + sum(fields[5:7])
    return busy / hz, fields[7] / hz

  @staticmethod
  def _own() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

  def as_dict(self) -> dict:
    return {'seconds': self.seconds, 'fraction': self.fraction,
            'steal_seconds': self.steal_seconds}


def time_compiled(compiled, args, repeats: int) -> list[float]:
  jax.block_until_ready(compiled(*args))  # one untimed run
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return times


def matmul_peak(n: int, repeats: int) -> dict:
  """Best-of-``repeats`` GFLOP/s of a jitted ``(n, n) @ (n, n)`` float32."""
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k1, (n, n), jnp.float32)
  b = jax.random.normal(k2, (n, n), jnp.float32)
  compiled = jax.jit(jnp.matmul).lower(a, b).compile()
  times = time_compiled(compiled, (a, b), repeats)
  flops = 2.0 * n ** 3
  return {'size': n, 'flops': flops, 'best_seconds': min(times),
          'seconds': times, 'gflops': flops / min(times) / 1e9}


def machine_info() -> dict:
  cpu_model = None
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          cpu_model = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  import jaxlib  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  return {
      'platform': platform.platform(),
      'machine': platform.machine(),
      'cpu_model': cpu_model,
      'cpu_count': os.cpu_count(),
      'cpu_affinity': (len(os.sched_getaffinity(0))
                       if hasattr(os, 'sched_getaffinity') else None),
      'python': platform.python_version(),
      'jax_version': jax.__version__,
      'jaxlib_version': jaxlib.__version__,
      'numpy_version': np.__version__,
      'device': str(dev),
      'device_platform': dev.platform,
      'device_kind': dev.device_kind,
      'num_devices': jax.device_count(),
      'xla_flags': os.environ.get('XLA_FLAGS'),
  }


def wait_for_quiet(max_wait: float, max_foreign: float) -> float | None:
  """Waits until other processes use < ``max_foreign`` of the CPU (3 s sample).

  Returns the last sampled share (``None`` without ``/proc/stat``).
  """
  deadline = time.perf_counter() + max_wait
  while True:
    with ForeignCpu() as sample:
      time.sleep(3.0)
    if (sample.fraction is None or sample.fraction <= max_foreign or
        time.perf_counter() >= deadline):
      return sample.fraction
    logging.info('machine busy (%.0f%% used by other processes); waiting',
                 100 * sample.fraction)
    time.sleep(7.0)


def write_json(path: str, data: dict) -> None:
  """Writes ``data`` as indented JSON atomically (temp file + rename)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with atomic_output(path, suffix='.json.tmp') as tmp, open(tmp, 'w') as f:
    json.dump(data, f, indent=2)
    f.write('\n')


def run_checkout(pythonpath: str, argv: list[str], what: str,
                 env: dict | None = None) -> dict:
  """``python argv`` with the library of the checkout ``pythonpath``.

  Runs in a fresh process (from the temp folder, so the current checkout is
  not imported by accident) and parses its last stdout line as JSON.
  Returns that dict plus ``pythonpath`` and the checkout's ``commit``;
  raises ``RuntimeError`` naming ``what`` if the process fails.
  """
  env = dict(os.environ if env is None else env,
             PYTHONPATH=os.path.abspath(pythonpath))
  proc = subprocess.run([sys.executable, *argv], env=env, capture_output=True,
                        text=True, check=False, cwd=tempfile.gettempdir())
  if proc.returncode:
    raise RuntimeError(f'{what} failed under {pythonpath}: '
                       f'{proc.stderr.strip()[-2000:]}')
  commit = subprocess.run(['git', '-C', pythonpath, 'rev-parse', 'HEAD'],
                          capture_output=True, text=True, check=False)
  return dict(json.loads(proc.stdout.strip().splitlines()[-1]),
              pythonpath=pythonpath, commit=commit.stdout.strip())
