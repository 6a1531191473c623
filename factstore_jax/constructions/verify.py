"""Checks of a constructed MLP: the dense check, the streamed structured check
and the structured certificate (:mod:`~factstore_jax.constructions.certificate`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from factstore_jax import storage
from factstore_jax.constructions import certificate, gadgets
from factstore_jax.factsets import FactSet
from factstore_jax.precision import full_precision
from factstore_jax.mlp import EncoderDecoder, get_activation
from factstore_jax.constructions.assembly import Gadgets, assemble_live

Array = jax.Array

STREAM_KEYS = 65536     # keys per verification call


class Verification(NamedTuple):
  storage: storage.StorageReport
  code_error: Array   # () max abs code error


@jax.jit
@full_precision
def verify(model: EncoderDecoder, factset: FactSet, codes: Array,
           chunk_size: int = 2048) -> Verification:
  """Checks every fact: margins against all values, and the code error."""
  keys, values, mapping = factset
  def one(args):
    k, f = args
    code = model.encode(k)
    out = code @ model.decoder.T
    gamma = storage.margins(out[None], values, f[None])[0]
    return gamma, jnp.linalg.norm(out), jnp.max(jnp.abs(code - codes[f]))
  gamma, norms, err = jax.lax.map(one, (keys, mapping), batch_size=chunk_size)
  return Verification(storage._report(gamma, norms), jnp.max(err))


def bucket_of_key(buckets: gadgets.Buckets, num_keys: int) -> Array:
  """``(N,)`` index of the bucket holding each key."""
  owner = jnp.zeros(num_keys, jnp.int32)
  rows = jnp.broadcast_to(
      jnp.arange(buckets.index.shape[0], dtype=jnp.int32)[:, None],
      buckets.index.shape)
  index = jnp.where(buckets.valid, buckets.index, num_keys)  # drop padding
  return owner.at[index].set(rows, mode='drop')


@functools.partial(jax.jit, static_argnames=('chunk_size',))
@full_precision
def verify_structured(parts: Gadgets, model: EncoderDecoder, factset: FactSet,
                      codes: Array, chunk_size: int = 2048):
  """Check of a clipped-gate construction: steps, codes and margins.

  Every step's pre-activation is computed from the same gate column the
  dense MLP holds (the dense ``w_gate`` repeats each one ``m`` times), so
  the check sees the steps the dense MLP computes: for a key of bucket
  ``j`` the steps of cuts ``0..j`` must be exactly 1 and all later ones
  exactly 0. The code is the dense model's (``model.encode``), checked
  against the value codes, and the output's margins against the whole
  value table. Returns ``(Verification, steps_ok (N,), gate_slack)`` where
  ``gate_slack`` is the smallest distance of a step pre-activation from the
  open ramp ``(0, 1)`` (rounding below it cannot change any step).
  """
  keys, values, mapping = factset
  owner = bucket_of_key(parts.buckets, keys.shape[0])
  gamma, norms, err, ok, slack = _structured_terms(
      parts, model, values, codes, keys, mapping, owner,
      chunk_size=chunk_size)
  return (Verification(storage._report(gamma, norms), jnp.max(err)), ok,
          jnp.min(slack))


def step_values(parts: Gadgets, x: Array, activation: str):
  """Steps of every cut for keys ``x (..., d)``: ``(steps (..., n), z (..., n))``.

  ``z`` is each cut's (unshifted) gate pre-activation, computed from the
  dense gate columns ``direction * scale``.
  """
  act = get_activation(activation)
  n, k = parts.scale.shape
  w_win = (parts.buckets.direction[:, None, None] * parts.scale[None])
  z = (x @ w_win.reshape(-1, n * k) + parts.bias.reshape(-1))
  z = z.reshape(*x.shape[:-1], n, k)
  return act(z) @ parts.sign, z[..., 0]


def _structured_terms(parts: Gadgets, model: EncoderDecoder, values: Array,
                      codes: Array, keys: Array, mapping: Array, owner: Array,
                      *, chunk_size: int):
  """Per-key terms of :func:`verify_structured` for keys ``(S, d)``:
  ``gamma, norm, code error, steps_ok, gate slack``, each ``(S,)``."""
  n = parts.scale.shape[0]
  cut = jnp.arange(n)

  def one(args):
    x, f, j = args
    steps, z = step_values(parts, x, model.activation)
    ok = jnp.all(steps == (cut <= j).astype(steps.dtype))
    slack = jnp.min(jnp.where(cut == 0, jnp.inf, jnp.maximum(-z, z - 1)))
    code = model.encode(x)
    out = model.decoder @ code
    gamma = storage.margins(out[None], values, f[None])[0]
    gamma = jnp.where(ok, gamma, -jnp.inf)
    err = jnp.max(jnp.abs(code - codes[f]))
    return gamma, jnp.linalg.norm(out), err, ok, slack

  return jax.lax.map(one, (keys, mapping, owner), batch_size=chunk_size)


_structured_terms_jit = jax.jit(_structured_terms,
                                static_argnames=('chunk_size',))


@full_precision
def verify_structured_streamed(parts: Gadgets, model: EncoderDecoder,
                               factset: FactSet, codes: Array,
                               chunk_size: int = 2048,
                               stream_size: int = 65536, progress=None):
  """:func:`verify_structured` as a host loop over ``stream_size`` keys.

  Same result (every key is batched with the same ``chunk_size``
  neighbours as in one call); peak memory ``O(chunk_size (P + h))`` plus
  the ``(N,)`` outputs. ``progress(done, total)`` runs after each call.
  """
  keys, values, mapping = factset
  n_keys = keys.shape[0]
  step = -(-max(stream_size, 1) // chunk_size) * chunk_size
  if step >= n_keys or isinstance(keys, jax.core.Tracer):
    out = verify_structured(parts, model, factset, codes,
                            chunk_size=chunk_size)
    if progress is not None:
      jax.block_until_ready(out)
      progress(n_keys, n_keys)
    return out
  owner = bucket_of_key(parts.buckets, n_keys)
  pieces = []
  for start in range(0, n_keys, step):
    stop = min(start + step, n_keys)
    pieces.append(jax.device_get(_structured_terms_jit(
        parts, model, values, codes, keys[start:stop], mapping[start:stop],
        owner[start:stop], chunk_size=chunk_size)))
    if progress is not None:
      progress(stop, n_keys)
  gamma, norms, err, ok, slack = (jnp.asarray(np.concatenate(p))
                                  for p in zip(*pieces))
  return (Verification(storage._report(gamma, norms), jnp.max(err)), ok,
          jnp.min(slack))


def _round_down(x: np.ndarray) -> np.ndarray:
  """float64 -> float32, rounded towards -inf (lower bounds stay bounds)."""
  y = x.astype(np.float32)
  return np.where(y > x, np.nextafter(y, np.float32(-np.inf)), y)


def _round_up(x: np.ndarray) -> np.ndarray:
  y = x.astype(np.float32)
  return np.where(y < x, np.nextafter(y, np.float32(np.inf)), y)


def certify_gadgets(parts: Gadgets, model: EncoderDecoder, factset, codes, *,
                    assembled: EncoderDecoder | None = None, progress=None,
                    value_cache: certificate.ValueCache | None = None):
  """The structured certificate of ``model`` as a :class:`Verification`.

  ``assembled`` is ``prune_dead(assemble_gadgets(parts, model.decoder))``
  (built here when omitted); ``model`` must equal it bitwise, else every
  margin is ``-inf``. Margins are lower bounds (rounded down to float32),
  ``code_error`` an upper bound. ``value_cache`` is passed to
  :func:`certificate.certify`. Returns ``(Verification, Certificate)``.
  """
  keys, values, mapping = factset
  if assembled is None:
    assembled = assemble_live(parts, model.decoder, model.activation)
  cert = certificate.certify(parts, model, assembled, keys, values, mapping,
                             codes, stream_size=STREAM_KEYS,
                             progress=progress, value_cache=value_cache)
  report = storage._report(jnp.asarray(_round_down(cert.margins)),
                           jnp.asarray(_round_up(cert.output_norms)))
  return Verification(report, jnp.asarray(_round_up(
      cert.code_bounds.max(keepdims=True))[0])), cert


def check_construction(parts: Gadgets, model: EncoderDecoder, factset, codes,
                       progress=None, method: str = 'certificate',
                       fallback: bool = True,
                       value_cache: certificate.ValueCache | None = None):
  """Verification of every fact: ``(Verification, check name, float32 bound)``.

  The certificate (clipped gate) is tried first; if it cannot certify every
  fact the dense check decides (it sees the margins the dense float32
  evaluation computes), unless ``fallback`` is False: then the failed
  certificate is returned (its margins are lower bounds, so the keys it
  fails include every key the dense check would fail), e.g. to repair the
  buckets it names before paying for the dense check. ``value_cache``
  (:class:`certificate.ValueCache`) lets checks of rebuilt or repaired
  buckets over the same table reuse the certificate's value stage.
  """
  if model.activation == 'clipped' and method == 'certificate':
    check, cert = certify_gadgets(
        parts, model, factset, codes, assembled=model,
        value_cache=value_cache, progress=None if progress is None else
        lambda done, total: progress('certify', done, total))
    if float(check.storage.min_margin) > 0:
      return check, 'certificate', cert.float32_bound
    if not fallback:
      logging.info('certificate: min margin %.3g on %d fact(s) (exact code '
                   'error %.3g, sampled float32 deviation %.3g, worst-case '
                   'allowance %.3g, step slack %.3g)',
                   float(check.storage.min_margin),
                   int(np.sum(~(cert.margins > 0))), cert.exact_code_error,
                   cert.float32_sampled, cert.float32_worst_case,
                   cert.step_slack)
      return check, 'certificate', cert.float32_bound
    logging.info('certificate: min margin %.3g (float32 bound %s; exact code '
                 'error %.3g, sampled float32 deviation %.3g, worst-case '
                 'allowance %.3g, step slack %.3g); running the dense check',
                 float(check.storage.min_margin), cert.float32_bound,
                 cert.exact_code_error, cert.float32_sampled,
                 cert.float32_worst_case, cert.step_slack)
  if model.activation == 'clipped':
    check, _, _ = verify_structured_streamed(
        parts, model, factset, codes, stream_size=STREAM_KEYS,
        progress=None if progress is None else
        lambda done, total: progress('verify', done, total))
    return check, 'dense', ''
  return verify(model, factset, codes), 'dense', ''
