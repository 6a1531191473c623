"""What the platform's default float32 matmul computes (TF32 or full fp32).

Prints the relative error of a 2048^3 float32 matmul against a float64
reference at each ``jax.lax.Precision``, and its TFLOP/s.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

n = 2048
rng = np.random.default_rng(0)
a64, b64 = rng.standard_normal((n, n)), rng.standard_normal((n, n))
ref = a64 @ b64
a, b = jnp.asarray(a64, jnp.float32), jnp.asarray(b64, jnp.float32)
print('backend', jax.default_backend(), jax.devices()[0].device_kind)
for prec in ('default', 'high', 'highest'):
  f = jax.jit(lambda x, y, p=prec: jnp.matmul(x, y, precision=p))
  out = f(a, b).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(20):
    out = f(a, b)
  out.block_until_ready()
  secs = (time.perf_counter() - t0) / 20
  err = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
  print(f'precision={prec:8s} rel_err={err:.2e} {2 * n**3 / secs / 1e12:.1f} TFLOP/s')
