"""Gated MLPs: params pytree, apply, parameter counting, and a Flax NNX module.

A gated MLP maps ``x (..., d)`` to

  ``g(x) = [(x @ w_up + b_up) * act(x @ w_gate + b_gate)] @ w_down + b_down``

with ``w_gate, w_up (d, h)``, ``w_down (h, d_out)``; every bias is optional.

Parameter-count rule (used everywhere in the project): the number of entries of
every array the MLP holds, weights and biases, as built. Absent biases count 0.
"""

from __future__ import annotations

from typing import Callable, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from factstore_jax.errors import FactStoreError

Array = jax.Array


def clipped(z: Array) -> Array:
  """The clipped gate ``min(max(z, 0), 1)``: saturates exactly at 0 and 1."""
  return jnp.clip(z, 0.0, 1.0)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    'clipped': clipped,
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
    'identity': lambda z: z,
}


def get_activation(name: str) -> Callable[[Array], Array]:
  """The activation ``name`` (a key of ``ACTIVATIONS``); else an error."""
  if name not in ACTIVATIONS:
    raise FactStoreError(
        f'unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}')
  return ACTIVATIONS[name]


@flax.struct.dataclass
class GatedMLP:
  """Parameters of a gated MLP (a pytree; ``activation`` is static).

  ``mlp(x)`` applies it (``x (..., d) -> (..., d_out)``), as for every MLP
  kind of the library; ``mlp.as_mlp()`` is the MLP itself.
  """
  w_gate: Array            # (d, h)
  w_up: Array              # (d, h)
  w_down: Array            # (h, d_out)
  b_gate: Array | None = None   # (h,)
  b_up: Array | None = None     # (h,)
  b_down: Array | None = None   # (d_out,)
  activation: str = flax.struct.field(pytree_node=False, default='clipped')

  # What a saved file calls this kind, and what training updates by default.
  KIND: ClassVar[str] = 'gated_mlp'
  TRAINABLE: ClassVar[tuple[str, ...]] = ('w_gate', 'w_up', 'w_down',
                                          'b_gate', 'b_up', 'b_down')

  @property
  def hidden_dim(self) -> int:
    return self.w_gate.shape[-1]

  def __call__(self, x: Array) -> Array:
    """Applies the MLP. ``x (..., d) -> (..., d_out)``."""
    out = hidden(self, x) @ self.w_down
    if self.b_down is not None:
      out = out + self.b_down
    return out

  def as_mlp(self) -> GatedMLP:
    return self


def hidden(params: GatedMLP, x: Array) -> Array:
  """The down-projection's input ``(x w_up + b_up) * act(x w_gate + b_gate)``.

  ``x (..., d) -> (..., h)``.
  """
  act = get_activation(params.activation)
  gate = x @ params.w_gate
  if params.b_gate is not None:
    gate = gate + params.b_gate
  up = x @ params.w_up
  if params.b_up is not None:
    up = up + params.b_up
  return up * act(gate)


def route(hidden: Array, routing: Array, window: int = 1) -> Array:
  """``hidden (..., h) @ routing (h, m)``, each window's neurons summed first.

  Equal to ``hidden @ routing`` for any routing and ``window`` dividing ``h``,
  computed as ``(sum_k hidden_k) @ routing_0 + sum_{k>0} hidden_k @
  (routing_k - routing_0)`` over the ``window`` adjacent neurons ``k`` of
  each window. With the construction's routing (a step's neurons share one
  0/1 row) the second term is exactly zero, and a relu step's two neurons
  are summed into the step's value before anything else is added.
  """
  if window == 1:
    return hidden @ routing
  *batch, h = hidden.shape
  grouped = hidden.reshape(*batch, h // window, window)
  rows = routing.reshape(h // window, window, routing.shape[-1])
  rest = jnp.einsum('...wk,wkm->...m', grouped[..., 1:],
                    rows[:, 1:] - rows[:, :1])
  return grouped.sum(-1) @ rows[:, 0] + rest



@flax.struct.dataclass
class EncoderDecoder:
  """The closed form's factorised MLP ``g(x) = decoder @ E(x)``; a pytree.

  ``E(x) = route((x w_up) * act(x w_gate + b_gate))`` maps keys to codes of
  dim ``m``; ``mlp(x)`` applies it, ``mlp.as_mlp()`` folds the decoder into
  a standard :class:`GatedMLP` (the same function).
  """
  w_gate: Array    # (d, h)
  b_gate: Array    # (h,)
  w_up: Array      # (d, h)
  routing: Array   # (h, m): hidden neuron -> code coordinate
  decoder: Array   # (d, m)
  activation: str = flax.struct.field(pytree_node=False, default='clipped')
  # Neurons per step (adjacent hidden neurons, summed first); see `route`.
  window: int = flax.struct.field(pytree_node=False, default=1)

  KIND: ClassVar[str] = 'encoder_decoder'
  TRAINABLE: ClassVar[tuple[str, ...]] = ('w_gate', 'b_gate', 'w_up',
                                          'routing')

  @property
  def code_dim(self) -> int:
    return self.decoder.shape[-1]

  def encode(self, x: Array) -> Array:
    """Codes ``x (..., d) -> (..., m)``."""
    act = get_activation(self.activation)
    hidden = (x @ self.w_up) * act(x @ self.w_gate + self.b_gate)
    return route(hidden, self.routing, self.window)

  def __call__(self, x: Array) -> Array:
    """``x (..., d) -> (..., d)``."""
    return self.encode(x) @ self.decoder.T

  def as_mlp(self) -> GatedMLP:
    """The same function as a standard gated MLP (decoder folded in)."""
    return GatedMLP(w_gate=self.w_gate, b_gate=self.b_gate, w_up=self.w_up,
                    w_down=self.routing @ self.decoder.T,
                    activation=self.activation)



def as_gated(model) -> GatedMLP:
  """Any MLP kind of the library as a standard :class:`GatedMLP`.

  The one place that converts between kinds: a :class:`GatedMLP` is
  returned as is, an :class:`EncoderDecoder` with its decoder folded in.

  Raises:
    FactStoreError: ``model`` is not an MLP of this library.
  """
  convert = getattr(model, 'as_mlp', None)
  if convert is None:
    raise FactStoreError(f'expected a GatedMLP or an EncoderDecoder, got '
                         f'{type(model).__name__}')
  return convert()


def num_params(tree) -> int:
  """Number of parameters of any params pytree: the entries of all its arrays.

  For a stacked (vmapped) pytree this counts the whole stack; use
  ``num_params(jax.tree.map(lambda a: a[0], tree))`` for one member.
  """
  return int(sum(leaf.size for leaf in jax.tree.leaves(tree)))


def hidden_mask(hidden_dim: int, width: int | Array, dtype=jnp.float32) -> Array:
  """``(hidden_dim,)`` mask, 1 on the first ``width`` units."""
  return (jnp.arange(hidden_dim) < width).astype(dtype)


def first_units(model, width: int):
  """``model`` cut to its first ``width`` hidden units.

  The model that a run masked by ``hidden_mask(h, width)`` trained, at its
  own width (masked units are zero and get no gradient, so nothing else
  changes).

  Args:
    model: a :class:`GatedMLP` or :class:`EncoderDecoder` of hidden width h.
    width: a Python int in ``[1, h]``.

  Returns:
    The same kind of model with hidden width ``width``.

  Raises:
    FactStoreError: another kind of model, ``width`` out of range, or not a
      multiple of an EncoderDecoder's routing ``window``.
  """
  if not isinstance(model, (GatedMLP, EncoderDecoder)):
    raise FactStoreError(f'model must be a GatedMLP or EncoderDecoder, got '
                         f'{type(model).__name__}')
  h = model.w_gate.shape[-1]
  if not 1 <= int(width) <= h:
    raise FactStoreError(f'width must be in [1, {h}], got {width}')
  w = int(width)
  if isinstance(model, EncoderDecoder):
    if w % model.window:
      raise FactStoreError(f'width {w} is not a multiple of the routing '
                           f'window {model.window}')
    return model.replace(w_gate=model.w_gate[:, :w], b_gate=model.b_gate[:w],
                         w_up=model.w_up[:, :w], routing=model.routing[:w])
  cut = lambda b: None if b is None else b[:w]
  return model.replace(w_gate=model.w_gate[:, :w], w_up=model.w_up[:, :w],
                       w_down=model.w_down[:w], b_gate=cut(model.b_gate),
                       b_up=cut(model.b_up))


def init_mlp(key: Array, dim: int, hidden_dim: int, *,
             out_dim: int | None = None, width: int | Array | None = None,
             activation: str = 'identity', gate_bias: bool = False,
             up_bias: bool = False, down_bias: bool = False,
             dtype=jnp.float32) -> GatedMLP:
  """Random gated MLP drawn at ``hidden_dim``, scaled for active ``width``.

  ``w_gate, w_up ~ N(0, 1/d)``, ``w_down ~ N(0, 1/width)``, biases zero.
  Draws are nested: the first ``w`` units are the same for every
  ``hidden_dim >= w``, so width sweeps compare like with like. ``width`` may
  be traced; units ``>= width`` are zeroed.

  Args:
    key: PRNG key.
    dim: input dimension ``d``.
    hidden_dim: hidden units ``h`` of the arrays.
    out_dim: output dimension (default ``d``).
    width: active units (default ``h``).
    activation: gate activation (:data:`ACTIVATIONS`).
    gate_bias, up_bias, down_bias: include that bias (zeros).

  Returns:
    :class:`GatedMLP` with ``w_gate, w_up (d, h)``, ``w_down (h, d_out)``.
  """
  get_activation(activation)
  out_dim = dim if out_dim is None else out_dim
  width = hidden_dim if width is None else width
  k_gate, k_up, k_down = jax.random.split(key, 3)
  normal = lambda k, shape: jax.random.normal(k, shape, dtype)
  mask = hidden_mask(hidden_dim, width, dtype)
  zeros = lambda n, on: jnp.zeros((n,), dtype) if on else None
  scale_in = 1 / jnp.sqrt(jnp.asarray(dim, dtype))
  scale_out = 1 / jnp.sqrt(jnp.asarray(width, dtype))
  return GatedMLP(
      w_gate=normal(k_gate, (hidden_dim, dim)).T * scale_in * mask,
      w_up=normal(k_up, (hidden_dim, dim)).T * scale_in * mask,
      w_down=normal(k_down, (hidden_dim, out_dim)) * scale_out * mask[:, None],
      b_gate=zeros(hidden_dim, gate_bias), b_up=zeros(hidden_dim, up_bias),
      b_down=zeros(out_dim, down_bias), activation=activation)


_FIELDS = ('w_gate', 'w_up', 'w_down', 'b_gate', 'b_up', 'b_down')


class GatedMLPModule(nnx.Module):
  """Thin Flax NNX wrapper: holds a :class:`GatedMLP` as ``nnx.Param`` s.

  ``GatedMLPModule(params)`` wraps constructed weights;
  ``GatedMLPModule(init_mlp(key, d, h))`` gives a trainable random one.
  """

  def __init__(self, params: GatedMLP):
    self.activation = params.activation
    for name in _FIELDS:
      value = getattr(params, name)
      setattr(self, name, None if value is None else nnx.Param(value))

  def to_params(self) -> GatedMLP:
    get = lambda p: None if p is None else p[...]
    return GatedMLP(**{name: get(getattr(self, name)) for name in _FIELDS},
                    activation=self.activation)

  def __call__(self, x: Array) -> Array:
    """``x (..., d) -> (..., d_out)``."""
    return self.to_params()(x)


def fold_linear(params: GatedMLP, w_in: Array, w_out: Array) -> GatedMLP:
  """The gated MLP ``x -> g(x @ w_in) @ w_out`` as one gated MLP.

  ``w_in (d, d')`` maps inputs into the space ``g`` was built for and
  ``w_out (d_out, d'')`` maps its outputs back (e.g. a whitening matrix: an
  MLP built on whitened keys and values, folded with the symmetric
  whitening matrix on both sides, decodes the original values).
  """
  if w_in.shape[1] != params.w_gate.shape[0] or \
      w_out.shape[0] != params.w_down.shape[1]:
    raise FactStoreError(
        f'fold_linear: w_in {w_in.shape} must end in {params.w_gate.shape[0]} '
        f'and w_out {w_out.shape} start with {params.w_down.shape[1]}')
  b_down = None if params.b_down is None else params.b_down @ w_out
  return params.replace(w_gate=w_in @ params.w_gate, w_up=w_in @ params.w_up,
                        w_down=params.w_down @ w_out, b_down=b_down)
