"""1-layer, 1-head causal Transformer with a pluggable fact MLP.

See docs/design.md, "Transformers and usability".

For tokens ``t (B, T)`` and the frozen, tied embedding table ``E (V, d)``::

  x = E[t]                                    (B, T, d)
  a = softmax(causal(q k^T / sqrt(d_h))) x W_v W_o,  q = x W_q, k = x W_k
  h = x + a        (attention residual on)    or  a
  m = mlp(norm(h))
  y = h + m        (MLP residual on)          or  m
  logits = y E^T                              (B, T, V)

``W_v`` and ``W_o`` start at the identity; which parameter groups train is
chosen by the training call (:data:`GROUPS`), so "frozen to identity" means
the ``'vo'`` group is not trained. Pre-MLP norms:

* ``'frozen_rms'``: ``s * h / rms(h)`` with one scalar ``s`` = mean RMS of
  the key embeddings (a key maps to itself when keys share a norm);
* ``'l2'``: ``h / ||h||``;
* ``'rms'``: ``g * h / rms(h)`` with a per-coordinate scale ``g (d,)``
  starting at ``s`` (trains with the ``'norm'`` group);
* ``'none'``.

The MLP slot holds an :class:`IdentityMLP` or a
:class:`~factstore_jax.mlp.GatedMLPModule`; :func:`as_mlp_module` turns any
MLP of the library (``GatedMLP``, ``EncoderDecoder``, ``None``) into one and
:meth:`Transformer.swap_mlp` replaces it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from factstore_jax.errors import FactStoreError
from factstore_jax.mlp import GatedMLPModule, as_gated

Array = jax.Array

NORMS = ('frozen_rms', 'l2', 'rms', 'none')
# Parameter groups a training call may name.
GROUPS = ('qk', 'vo', 'norm', 'mlp')
_GROUP_PATHS = {'qk': ('w_q', 'w_k'), 'vo': ('w_v', 'w_o'),
                'norm': ('norm_scale',), 'mlp': ('mlp',)}


class Frozen(nnx.Variable):
  """State that never trains (embeddings, the frozen norm scalar)."""


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Architecture switches.

  Attributes:
    attn_residual: residual connection around attention.
    mlp_residual: residual connection around the MLP.
    norm: pre-MLP norm, one of :data:`NORMS`.
    rope: rotary position encoding on queries and keys (else none).
    head_dim: ``d_h`` of queries and keys (``None``: ``d``; even with RoPE).
    rope_base: RoPE frequency base.
    eps: added to the mean square in the RMS and L2 norms.
  """
  attn_residual: bool = False
  mlp_residual: bool = False
  norm: str = 'frozen_rms'
  rope: bool = False
  head_dim: int | None = None
  rope_base: float = 10_000.0
  eps: float = 1e-12

  def check(self, dim: int) -> None:
    if self.norm not in NORMS:
      raise FactStoreError(f'unknown norm {self.norm!r}; expected one of '
                           f'{NORMS}')
    hd = dim if self.head_dim is None else self.head_dim
    if hd < 1 or (self.rope and hd % 2):
      raise FactStoreError(
          f'head_dim must be >= 1 (and even with RoPE), got {hd}')


class IdentityMLP(nnx.Module):
  """The identity map in the MLP slot (schedule (a): train on key copy)."""

  def __call__(self, x: Array) -> Array:
    return x


def as_mlp_module(mlp) -> nnx.Module:
  """``None`` | ``GatedMLP`` | ``EncoderDecoder`` | module -> an MLP module."""
  if mlp is None:
    return IdentityMLP()
  if isinstance(mlp, nnx.Module):
    return mlp
  if hasattr(mlp, 'as_mlp'):
    return GatedMLPModule(as_gated(mlp))
  raise FactStoreError(
      f'cannot plug {type(mlp).__name__} into the MLP slot; pass None, a '
      'GatedMLP, an EncoderDecoder or an nnx.Module')


def rope(x: Array, base: float, positions: Array) -> Array:
  """Rotary position encoding of ``x (..., T, d_h)`` at ``positions (T,)``."""
  hd = x.shape[-1]
  freqs = base ** (-jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)
  angles = positions.astype(jnp.float32)[:, None] * freqs  # (T, d_h/2)
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  x1, x2 = x[..., 0::2], x[..., 1::2]
  out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
  return out.reshape(x.shape)


def key_rms(keys: Array) -> Array:
  """Mean RMS of the key rows ``(N, d)``: the frozen norm's scalar."""
  return jnp.mean(jnp.sqrt(jnp.mean(jnp.square(keys), axis=-1)))


class Transformer(nnx.Module):
  """The 1-layer model. ``__call__(tokens (B, T)) -> logits (B, T, V)``.

  Args:
    embeddings: ``(V, d)`` frozen token embeddings (``Vocabulary.embeddings``).
    key_rows: ``(N, d)`` key embeddings that calibrate the norm scalar.
    mlp: anything :func:`as_mlp_module` accepts.
    key: PRNG key for ``W_q, W_k`` (LeCun normal).
    config: :class:`TransformerConfig`.
  """

  def __init__(self, embeddings: Array, key_rows: Array, mlp=None, *,
               key: Array, config: TransformerConfig = TransformerConfig()):
    if embeddings.ndim != 2 or key_rows.ndim != 2 or \
        key_rows.shape[1] != embeddings.shape[1]:
      raise FactStoreError(
          f'need embeddings (V, d) and key_rows (N, d), got '
          f'{embeddings.shape} and {key_rows.shape}')
    d = embeddings.shape[1]
    config.check(d)
    self.config = config
    hd = d if config.head_dim is None else config.head_dim
    dtype = embeddings.dtype
    init = jax.nn.initializers.lecun_normal()
    k_q, k_k = jax.random.split(key)
    self.embed = Frozen(embeddings)
    self.w_q = nnx.Param(init(k_q, (d, hd), dtype))
    self.w_k = nnx.Param(init(k_k, (d, hd), dtype))
    self.w_v = nnx.Param(jnp.eye(d, dtype=dtype))
    self.w_o = nnx.Param(jnp.eye(d, dtype=dtype))
    scale = key_rms(key_rows).astype(dtype)
    if config.norm == 'rms':
      self.norm_scale = nnx.Param(jnp.full((d,), scale))
    else:
      self.norm_scale = Frozen(scale)
    self.mlp = as_mlp_module(mlp)

  def swap_mlp(self, mlp) -> None:
    """Replaces the fact MLP (nothing else changes)."""
    self.mlp = as_mlp_module(mlp)

  def attention(self, x: Array, last_only: bool = False
                ) -> tuple[Array, Array]:
    """Causal attention of ``x (B, T, d)``.

    Returns (output ``(B, T', d)``, weights ``(B, T', T)``) with ``T' = T``,
    or ``T' = 1`` (the last position only) when ``last_only``.
    """
    t = x.shape[-2]
    pos_k = jnp.arange(t)
    pos_q = pos_k[-1:] if last_only else pos_k
    q = x[..., pos_q, :] @ self.w_q[...]
    k = x @ self.w_k[...]
    if self.config.rope:
      base = self.config.rope_base
      q, k = rope(q, base, pos_q), rope(k, base, pos_k)
    scores = q @ jnp.swapaxes(k, -1, -2) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    causal = pos_q[:, None] >= pos_k[None, :]
    scores = jnp.where(causal, scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1)
    return weights @ (x @ self.w_v[...]) @ self.w_o[...], weights

  def norm(self, h: Array) -> Array:
    """The pre-MLP norm of ``h (..., d)``."""
    kind, eps = self.config.norm, self.config.eps
    if kind == 'none':
      return h
    if kind == 'l2':
      return h / jnp.sqrt(jnp.sum(jnp.square(h), -1, keepdims=True) + eps)
    rms = jnp.sqrt(jnp.mean(jnp.square(h), -1, keepdims=True) + eps)
    return h / rms * self.norm_scale[...]

  def mlp_inputs(self, tokens: Array, last_only: bool = False
                 ) -> tuple[Array, Array]:
    """``(h, norm(h))`` of ``tokens (B, T)``, each ``(B, T', d)``."""
    x = self.embed[...][tokens]
    a, _ = self.attention(x, last_only)
    if self.config.attn_residual:
      a = a + (x[..., -1:, :] if last_only else x)
    return a, self.norm(a)

  def outputs(self, tokens: Array, last_only: bool = False) -> Array:
    """Final residual-stream vectors ``y (B, T', d)``."""
    h, z = self.mlp_inputs(tokens, last_only)
    m = self.mlp(z)
    return h + m if self.config.mlp_residual else m

  def __call__(self, tokens: Array, last_only: bool = False) -> Array:
    """Logits ``(B, T', V)`` (``T' = 1`` when ``last_only``)."""
    return self.outputs(tokens, last_only) @ self.embed[...].T


def group_filter(groups) -> nnx.filterlib.Filter:
  """NNX filter selecting the ``nnx.Param`` s of the named groups."""
  groups = tuple(groups)
  bad = [g for g in groups if g not in GROUPS]
  if bad or not groups:
    raise FactStoreError(f'unknown or empty parameter groups {groups}; '
                         f'choose from {GROUPS}')
  paths = [nnx.PathContains(p) for g in groups for p in _GROUP_PATHS[g]]
  return nnx.All(nnx.Param, nnx.Any(*paths))
