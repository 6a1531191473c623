"""Is ``count / n`` (n a jit constant) correctly rounded on this backend?

Prints, over n = 1..N_MAX, how many ``n / n`` differ from 1.0 and how many
``k / n`` (every k = 0..n-1) differ from the correctly rounded quotient, and
how many ``storage.fraction(n, n)`` differ from 1.0.
"""

import jax
import jax.numpy as jnp
import numpy as np

from factstore_jax import storage

N_MAX = 300
print('backend', jax.default_backend(), jax.devices()[0].device_kind)
bad_self = bad_k = bad_fraction = total_k = 0
examples = []
for n in range(1, N_MAX + 1):
  plain = jax.jit(lambda c, n=n: c / n)
  fixed = jax.jit(lambda c, n=n: storage.fraction(c, n))
  counts = np.arange(n + 1, dtype=np.float32)
  got = np.asarray(jax.vmap(plain)(jnp.asarray(counts)))
  want = (counts.astype(np.float64) / n).astype(np.float32)
  wrong = got != want
  bad_self += int(wrong[n])
  bad_k += int(wrong[:n].sum())
  total_k += n
  bad_fraction += int(np.asarray(fixed(jnp.float32(n))) != 1.0)
  if wrong.any() and len(examples) < 5:
    k = int(np.argmax(wrong))
    examples.append(f'{k}/{n}: {got[k]!r} vs {want[k]!r}')
print(f'n/n != 1: {bad_self} of {N_MAX}; storage.fraction(n, n) != 1: '
      f'{bad_fraction}; k/n not correctly rounded: {bad_k} of {total_k}')
print('examples:', examples)
