"""Decoders ``D (d, m)`` of the encoder-decoder construction and value codes."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def jl_decoder(key: Array, dim: int, code_dim: int, dtype=jnp.float32) -> Array:
  """Johnson-Lindenstrauss decoder ``G / sqrt(m)``, ``G (d, m)`` Gaussian.

  At ``code_dim >= dim`` returns the identity ``(d, d)``, which decodes every
  feasible fact set.
  """
  if code_dim >= dim:
    return jnp.eye(dim, dtype=dtype)
  return jax.random.normal(key, (dim, code_dim), dtype) / jnp.sqrt(
      jnp.asarray(code_dim, dtype))


def project_values(values: Array, decoder: Array) -> Array:
  """Projected values ``V D``: ``(P, d), (d, m) -> (P, m)``.

  Logits of an output ``D c`` are ``<D c, v_j> = <c, (V D)_j>``.
  """
  return values @ decoder
