"""Tests for factstore_jax.transformer: vocabulary/data, model, training."""

from __future__ import annotations

import dataclasses
import functools
import itertools

from absl.testing import parameterized
import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from factstore_jax import factsets, training
from factstore_jax.capacity import methods
from factstore_jax import mlp as mlp_lib
from factstore_jax.errors import FactStoreError
from factstore_jax.transformer import data
from factstore_jax.transformer import model as model_lib
from factstore_jax.transformer import train as train_lib

N, D, J = 32, 16, 4   # small problem of the data and model tests
CONTEXT = 2           # L in the training tests

# Key copy / schedule (a) on N=32 keys in d=32: reaches recall 1.0 and
# delivers keys to within ~0.1 in ~400 steps. At rate 0.1 the outcome hangs
# on float rounding (recall 0.97 or 1.0 by the CPU's vector ISA); at 0.05
# every ISA gives loss 0.0088, recall 1.0 and keys within 0.14.
COPY = train_lib.TransformerTrainConfig(
    max_steps=400, chunk_steps=200, batch_size=64, context_len=CONTEXT,
    eval_batch_size=256, learning_rate=0.05, logit_scale=10.0)
# A handful of steps: enough to move every trained parameter. The chunk is
# longer than the step budget, which must still be honoured.
TINY = train_lib.TransformerTrainConfig(
    max_steps=6, chunk_steps=8, batch_size=16, context_len=CONTEXT,
    eval_batch_size=32, learning_rate=1e-2, weight_decay=0.1)


def _factset(tied=True, num_values=None, mapping='permutation', seed=0,
             n=N, d=D):
  return factsets.random_factset(jax.random.key(seed), n, d, num_values,
                                 tied=tied, mapping=mapping)


def _vocab(fs=None, num_junk=J, seed=1):
  fs = _factset() if fs is None else fs
  return data.make_vocabulary(jax.random.key(seed), fs, num_junk)


def _model(vocab, mlp=None, seed=2, **config):
  return model_lib.Transformer(
      vocab.embeddings, vocab.embeddings[vocab.key_ids], mlp,
      key=jax.random.key(seed), config=model_lib.TransformerConfig(**config))


def _named(state) -> dict[str, np.ndarray]:
  """The leaves of an ``nnx.State`` as ``{'mlp/w_up': array, ...}``."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    name = '/'.join(str(k.key) for k in path if hasattr(k, 'key'))
    out[name] = np.array(leaf)
  return out


def _leaves(model) -> dict[str, np.ndarray]:
  """Every variable of ``model`` (Params and frozen state) by name."""
  return _named(nnx.state(model))


# ----------------------------------------------------------------------------
# Shared (expensive) setups, built once per process.


@functools.cache
def _task():
  """N=32 keys in d=32, 4 junk tokens and two permutations that differ on
  every fact."""
  fs = _factset(d=32)
  vocab = _vocab(fs)
  perm1 = np.asarray(jax.random.permutation(jax.random.key(10), N))
  perm2 = np.roll(perm1, 1)
  return vocab, perm1, perm2


@functools.cache
def _gd_mlp(which: int):
  """A GD-trained gated MLP storing the Transformer fact set of perm
  ``which``; trained past 100% accuracy for margin (robust to the small
  attention noise of schedule (a))."""
  vocab, *perms = _task()
  options = methods.MethodOptions(train=training.TrainConfig(
      learning_rate=1e-2, max_steps=300, early_stop=False))
  built = methods.build_mlp('gd', jax.random.key(5),
                            data.vocab_factset(vocab, perms[which]), 32,
                            options=options)
  assert built.accuracy == 1.0
  return built.mlp


@functools.cache
def _ed_mlp():
  """The closed-form encoder-decoder MLP for perm 0 (identity decoder)."""
  vocab, perm1, _ = _task()
  built = methods.build_mlp('encoder_decoder', jax.random.key(5),
                            data.vocab_factset(vocab, perm1), 32)
  assert built.accuracy == 1.0
  return built.mlp


@functools.cache
def _schedule_a():
  """Schedule (a) with the GD MLP of perm 0: returns (model, report)."""
  vocab, _, _ = _task()
  model = _model(vocab)
  report = train_lib.schedule_a(model, jax.random.key(3), vocab, _gd_mlp(0),
                                COPY)
  return model, report


# ----------------------------------------------------------------------------
# Data.


class VocabularyTest(chex.TestCase):

  @parameterized.named_parameters(
      ('tied_permutation', dict(tied=True), True),
      ('tied_many_to_one', dict(tied=True, num_values=8,
                                mapping='many_to_one'), True),
      ('untied_permutation', dict(tied=False), False),
      ('untied_many_to_one', dict(tied=False, num_values=8,
                                  mapping='many_to_one'), False))
  def test_layout(self, fs_kwargs, tied):
    fs = _factset(**fs_kwargs)
    vocab = _vocab(fs)
    p = fs.num_values
    extra = 0 if tied else p
    self.assertEqual(vocab.size, N + extra + J + 1)
    self.assertEqual(vocab.dim, D)
    self.assertEqual(vocab.query_id, vocab.size - 1)
    emb = np.asarray(vocab.embeddings)
    chex.assert_shape(emb, (N + extra + J + 1, D))
    np.testing.assert_array_equal(vocab.key_ids, np.arange(N))
    np.testing.assert_array_equal(emb[np.asarray(vocab.key_ids)], fs.keys)
    np.testing.assert_array_equal(emb[np.asarray(vocab.value_ids)], fs.values)
    np.testing.assert_array_equal(
        vocab.value_ids, np.arange(p) if tied else N + np.arange(p))
    np.testing.assert_array_equal(vocab.junk_ids, N + extra + np.arange(J))
    for ids in (vocab.key_ids, vocab.value_ids, vocab.junk_ids):
      self.assertEqual(jnp.asarray(ids).dtype, jnp.int32)
    # Junk and query rows: unit norm and distinct.
    extra_rows = emb[N + extra:]
    np.testing.assert_allclose(np.linalg.norm(extra_rows, axis=1), 1.0,
                               rtol=1e-5)
    self.assertEqual(len(np.unique(extra_rows, axis=0)), J + 1)
    # Token kinds partition [0, V) (keys and values share tokens when tied).
    groups = [set(np.asarray(vocab.key_ids).tolist()),
              set(np.asarray(vocab.junk_ids).tolist()), {vocab.query_id}]
    if not tied:
      groups.append(set(np.asarray(vocab.value_ids).tolist()))
    else:
      self.assertTrue(set(np.asarray(vocab.value_ids).tolist()) <= groups[0])
    self.assertEqual(sum(len(g) for g in groups), vocab.size)
    self.assertEqual(set().union(*groups), set(range(vocab.size)))

  def test_tied_detection_and_override(self):
    fs = _factset(tied=True)
    self.assertTrue(data.is_tied(fs))
    self.assertFalse(data.is_tied(_factset(tied=False)))
    # tied=False on a tied set gives the values tokens of their own.
    vocab = data.make_vocabulary(jax.random.key(1), fs, J, tied=False)
    self.assertEqual(vocab.size, 2 * N + J + 1)
    np.testing.assert_array_equal(vocab.value_ids, N + np.arange(N))
    np.testing.assert_array_equal(vocab.embeddings[N:2 * N], fs.values)

  def test_junk_depends_on_key(self):
    fs = _factset()
    a, b, c = (data.make_vocabulary(jax.random.key(s), fs, J)
               for s in (1, 1, 2))
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    self.assertFalse(np.allclose(a.embeddings[N:], c.embeddings[N:]))

  def test_targets(self):
    vocab = _vocab(_factset(tied=False))
    mapping = jax.random.permutation(jax.random.key(3), N)
    np.testing.assert_array_equal(data.fact_targets(vocab, mapping),
                                  N + np.asarray(mapping))
    np.testing.assert_array_equal(data.copy_targets(vocab), np.arange(N))

  @parameterized.named_parameters(('tied', True), ('untied', False))
  def test_vocab_factset(self, tied):
    fs = _factset(tied=tied)
    vocab = _vocab(fs)
    vfs = data.vocab_factset(vocab, fs.mapping)
    np.testing.assert_array_equal(vfs.keys, fs.keys)
    np.testing.assert_array_equal(vfs.values, vocab.embeddings)
    np.testing.assert_array_equal(
        vfs.mapping, np.asarray(vocab.value_ids)[np.asarray(fs.mapping)])
    # The value a fact's mapping token points at is the fact set's value.
    np.testing.assert_array_equal(vfs.values[np.asarray(vfs.mapping)],
                                  np.asarray(fs.values)[np.asarray(fs.mapping)])

  def test_vocabulary_errors(self):
    fs = _factset()
    with self.assertRaisesRegex(FactStoreError, 'num_junk'):
      data.make_vocabulary(jax.random.key(0), fs, 0)
    stacked = jax.tree.map(lambda x: jnp.stack([x, x]), fs)
    with self.assertRaisesRegex(FactStoreError, 'unstacked'):
      data.make_vocabulary(jax.random.key(0), stacked)
    with self.assertRaisesRegex(FactStoreError, 'tied=True'):
      data.make_vocabulary(jax.random.key(0), _factset(tied=False), tied=True)
    vocab = _vocab(fs)
    with self.assertRaisesRegex(FactStoreError, 'mapping has shape'):
      data.fact_targets(vocab, jnp.arange(N - 1))
    with self.assertRaisesRegex(FactStoreError, 'mapping has shape'):
      data.vocab_factset(vocab, jnp.arange(N + 1))


class BatchTest(chex.TestCase):

  @parameterized.named_parameters(('l0', 0), ('l1', 1), ('l3', 3))
  def test_structure(self, context_len):
    vocab = _vocab()
    targets = data.fact_targets(
        vocab, jax.random.permutation(jax.random.key(4), N))
    b = 200
    batch = data.sample_batch(jax.random.key(5), vocab, targets, b,
                              context_len)
    tokens, facts = np.asarray(batch.tokens), np.asarray(batch.facts)
    chex.assert_shape(tokens, (b, 2 * context_len + 2))
    chex.assert_shape(batch.targets, (b,))
    self.assertEqual(batch.tokens.dtype, jnp.int32)
    self.assertTrue(((facts >= 0) & (facts < N)).all())
    self.assertGreater(len(np.unique(facts)), N // 2)  # not one fact
    np.testing.assert_array_equal(tokens[:, context_len],
                                  np.asarray(vocab.key_ids)[facts])
    np.testing.assert_array_equal(tokens[:, -1], vocab.query_id)
    np.testing.assert_array_equal(batch.targets, np.asarray(targets)[facts])
    junk = np.delete(tokens, [context_len, tokens.shape[1] - 1], axis=1)
    chex.assert_shape(junk, (b, 2 * context_len))
    self.assertTrue(np.isin(junk, np.asarray(vocab.junk_ids)).all())
    if context_len:
      # Drawn from the whole junk vocabulary, independently per position.
      self.assertEqual(set(np.unique(junk)),
                       set(np.asarray(vocab.junk_ids).tolist()))
      self.assertFalse((junk == junk[:, :1]).all())

  def test_jit_and_determinism(self):
    vocab = _vocab()
    targets = data.copy_targets(vocab)
    sample = jax.jit(data.sample_batch, static_argnums=(3, 4))
    a = data.sample_batch(jax.random.key(6), vocab, targets, 64, 3)
    b = sample(jax.random.key(6), vocab, targets, 64, 3)
    c = data.sample_batch(jax.random.key(7), vocab, targets, 64, 3)
    chex.assert_trees_all_equal(a, b)
    self.assertFalse(np.array_equal(a.tokens, c.tokens))
    self.assertFalse(np.array_equal(a.facts, c.facts))

  def test_sequences_asks_for_given_facts(self):
    vocab = _vocab()
    targets = data.fact_targets(
        vocab, jax.random.permutation(jax.random.key(4), N))
    facts = jnp.array([3, 0, 3, N - 1], jnp.int32)
    batch = data.sequences(jax.random.key(8), vocab, targets, facts, 2)
    np.testing.assert_array_equal(batch.facts, facts)
    np.testing.assert_array_equal(batch.tokens[:, 2], facts)
    np.testing.assert_array_equal(batch.targets, np.asarray(targets)[facts])

  def test_errors(self):
    vocab = _vocab()
    targets = data.copy_targets(vocab)
    key = jax.random.key(0)
    with self.assertRaisesRegex(FactStoreError, 'targets has shape'):
      data.sample_batch(key, vocab, targets[:-1], 8, 2)
    with self.assertRaisesRegex(FactStoreError, 'targets has shape'):
      data.sequences(key, vocab, targets[None], jnp.arange(4), 2)
    with self.assertRaisesRegex(FactStoreError, 'context_len'):
      data.sample_batch(key, vocab, targets, 8, -1)
    with self.assertRaisesRegex(FactStoreError, 'context_len'):
      data.sequences(key, vocab, targets, jnp.arange(4), -1)
    with self.assertRaisesRegex(FactStoreError, 'batch_size'):
      data.sample_batch(key, vocab, targets, 0, 2)


# ----------------------------------------------------------------------------
# Model.


def _rope_ref(x, base, positions):
  """float64 reference: rotate coordinate pairs (2i, 2i+1)."""
  hd = x.shape[-1]
  freqs = base ** (-np.arange(0, hd, 2) / hd)
  ang = np.asarray(positions, np.float64)[:, None] * freqs
  out = np.empty_like(x)
  out[..., 0::2] = x[..., 0::2] * np.cos(ang) - x[..., 1::2] * np.sin(ang)
  out[..., 1::2] = x[..., 0::2] * np.sin(ang) + x[..., 1::2] * np.cos(ang)
  return out


def _forward_ref(model, tokens):
  """float64 numpy forward pass written from the model's docstring."""
  f64 = lambda v: np.asarray(v[...], np.float64)
  cfg = model.config
  emb = f64(model.embed)
  x = emb[np.asarray(tokens)]
  t = x.shape[1]
  q, k = x @ f64(model.w_q), x @ f64(model.w_k)
  if cfg.rope:
    q = _rope_ref(q, cfg.rope_base, np.arange(t))
    k = _rope_ref(k, cfg.rope_base, np.arange(t))
  scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
  scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
  w = np.exp(scores - scores.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  h = w @ x @ f64(model.w_v) @ f64(model.w_o)
  if cfg.attn_residual:
    h = h + x
  if cfg.norm == 'l2':
    z = h / np.linalg.norm(h, axis=-1, keepdims=True)
  elif cfg.norm in ('rms', 'frozen_rms'):
    z = h / np.sqrt(np.mean(h ** 2, -1, keepdims=True)) * f64(model.norm_scale)
  else:
    z = h
  if isinstance(model.mlp, model_lib.IdentityMLP):
    m = z
  else:
    p = model.mlp.to_params()
    m = ((z @ np.asarray(p.w_up, np.float64)) *
         np.maximum(z @ np.asarray(p.w_gate, np.float64) +
                    np.asarray(p.b_gate, np.float64), 0)
         ) @ np.asarray(p.w_down, np.float64)
  y = h + m if cfg.mlp_residual else m
  return y @ emb.T


def _random_model(vocab, with_mlp=True, **config):
  """A model whose every weight is random (W_v, W_o, norm scale too)."""
  mlp = (mlp_lib.init_mlp(jax.random.key(20), D, 8, activation='relu', gate_bias=True) if with_mlp else None)
  model = _model(vocab, mlp, **config)
  keys = jax.random.split(jax.random.key(21), 3)
  model.w_v[...] = jnp.eye(D) + 0.3 * jax.random.normal(keys[0], (D, D))
  model.w_o[...] = jnp.eye(D) + 0.3 * jax.random.normal(keys[1], (D, D))
  if config.get('norm') == 'rms':
    model.norm_scale[...] = 0.25 + jax.random.uniform(keys[2], (D,))
  if with_mlp:
    model.mlp.b_gate[...] = 0.1 * jnp.ones(8)
  return model


def _tokens(vocab, b=3, context_len=3, seed=9):
  return data.sample_batch(jax.random.key(seed), vocab,
                           data.copy_targets(vocab), b, context_len).tokens


# Every norm with and without RoPE (both residuals on), and every residual
# combination once.
_SWITCHES = [
    (f'{norm}_rope{int(rope)}', norm, rope, True, True)
    for norm, rope in itertools.product(model_lib.NORMS, (False, True))] + [
        (f'residuals{int(ar)}{int(mr)}', 'frozen_rms', False, ar, mr)
        for ar, mr in ((False, False), (True, False), (False, True))]


class ModelTest(chex.TestCase):

  @parameterized.named_parameters(*_SWITCHES)
  def test_forward_matches_reference(self, norm, rope, attn_res, mlp_res):
    vocab = _vocab()
    model = _random_model(vocab, norm=norm, rope=rope, attn_residual=attn_res,
                          mlp_residual=mlp_res)
    tokens = _tokens(vocab)
    logits = model(tokens)
    last = model(tokens, last_only=True)
    chex.assert_shape(logits, (3, 8, vocab.size))
    chex.assert_shape(last, (3, 1, vocab.size))
    chex.assert_tree_all_finite(logits)
    np.testing.assert_allclose(last[:, 0], logits[:, -1], rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(logits, _forward_ref(model, tokens),
                               rtol=1e-4, atol=1e-4)

  def test_head_dim(self):
    vocab = _vocab()
    odd = _model(vocab, head_dim=7)  # odd is fine without RoPE
    chex.assert_shape(odd.w_q[...], (D, 7))
    model = _random_model(vocab, rope=True, head_dim=6)
    chex.assert_shape(model.w_q[...], (D, 6))
    chex.assert_shape(model.w_k[...], (D, 6))
    tokens = _tokens(vocab)
    np.testing.assert_allclose(model(tokens), _forward_ref(model, tokens),
                               rtol=1e-4, atol=1e-4)

  @parameterized.named_parameters(('plain', False), ('rope', True))
  def test_causal(self, rope):
    vocab = _vocab()
    model = _random_model(vocab, rope=rope, attn_residual=True,
                          mlp_residual=True)
    tokens = _tokens(vocab)
    t = 4
    changed = tokens.at[:, t].set(vocab.key_ids[5])
    self.assertFalse(np.array_equal(tokens, changed))
    a, b = model(tokens), model(changed)
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    for pos in range(t, tokens.shape[1]):
      self.assertFalse(np.allclose(a[:, pos], b[:, pos]), pos)
    _, weights = model.attention(model.embed[...][tokens])
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
    upper = np.triu(np.ones(weights.shape[1:], bool), k=1)
    self.assertEqual(float(np.abs(np.asarray(weights)[:, upper]).max()), 0.0)

  def test_rope_is_relative(self):
    q = jax.random.normal(jax.random.key(0), (1, 8))
    k = jax.random.normal(jax.random.key(1), (1, 8))
    rot = lambda x, p: model_lib.rope(x, 100.0, jnp.array([p]))[0]
    np.testing.assert_allclose(jnp.linalg.norm(rot(q, 5)),
                               jnp.linalg.norm(q), rtol=1e-5)
    np.testing.assert_allclose(rot(q, 0), q[0], rtol=1e-6)
    dots = [float(rot(q, m + 3) @ rot(k, m)) for m in (0, 2, 7)]
    np.testing.assert_allclose(dots, dots[0], rtol=1e-4, atol=1e-5)
    self.assertFalse(np.isclose(dots[0], float(rot(q, 4) @ rot(k, 0))))
    np.testing.assert_allclose(
        model_lib.rope(q, 100.0, jnp.array([6])),
        _rope_ref(np.asarray(q, np.float64), 100.0, [6]), rtol=1e-5)

  @parameterized.named_parameters(('unit', 1.0), ('norm3', 3.0))
  def test_frozen_rms_maps_keys_to_themselves(self, scale):
    fs = _factset()
    fs = fs._replace(keys=scale * fs.keys, values=scale * fs.values)
    vocab = _vocab(fs)
    model = _model(vocab)
    keys = vocab.embeddings[vocab.key_ids]
    np.testing.assert_allclose(model.norm(keys), keys, rtol=1e-5, atol=1e-5)
    # Scale-invariant: a shrunk key (e.g. attention spreading mass) too.
    np.testing.assert_allclose(model.norm(0.3 * keys), keys, rtol=1e-5,
                               atol=1e-5)
    # The trainable 'rms' norm starts at the same function.
    rms = _model(vocab, norm='rms')
    chex.assert_shape(rms.norm_scale[...], (D,))
    np.testing.assert_allclose(rms.norm(keys), keys, rtol=1e-5, atol=1e-5)

  def test_l2_and_none_norms(self):
    vocab = _vocab()
    h = 3.0 * jax.random.normal(jax.random.key(0), (5, D))
    z = _model(vocab, norm='l2').norm(h)
    np.testing.assert_allclose(jnp.linalg.norm(z, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(z * jnp.linalg.norm(h, axis=-1)[:, None], h,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(_model(vocab, norm='none').norm(h), h)

  def test_as_mlp_module(self):
    x = jax.random.normal(jax.random.key(0), (4, D))
    ident = model_lib.as_mlp_module(None)
    self.assertIsInstance(ident, model_lib.IdentityMLP)
    np.testing.assert_array_equal(ident(x), x)
    params = mlp_lib.init_mlp(jax.random.key(1), D, 8, activation='relu', gate_bias=True)
    module = model_lib.as_mlp_module(params)
    self.assertIsInstance(module, mlp_lib.GatedMLPModule)
    np.testing.assert_allclose(module(x), params(x),
                               rtol=1e-6)
    self.assertIs(model_lib.as_mlp_module(module), module)
    for bad in ({'w_up': 1}, np.eye(D), 'mlp'):
      with self.assertRaisesRegex(FactStoreError, 'cannot plug'):
        model_lib.as_mlp_module(bad)

  def test_as_mlp_module_encoder_decoder(self):
    ed = _ed_mlp()
    vocab, _, _ = _task()
    module = model_lib.as_mlp_module(ed)
    self.assertIsInstance(module, mlp_lib.GatedMLPModule)
    x = vocab.embeddings[vocab.key_ids]
    np.testing.assert_allclose(module(x), ed(x), rtol=1e-4, atol=1e-4)

  def test_swap_mlp(self):
    vocab = _vocab()
    model = _random_model(vocab, with_mlp=False)
    tokens = _tokens(vocab)
    before, state = model(tokens), _leaves(model)
    model.swap_mlp(mlp_lib.init_mlp(jax.random.key(1), D, 8, activation='relu', gate_bias=True))
    self.assertIsInstance(model.mlp, mlp_lib.GatedMLPModule)
    self.assertFalse(np.allclose(model(tokens), before))
    after = _leaves(model)
    for name, value in state.items():  # nothing but the MLP changed
      np.testing.assert_array_equal(after[name], value)
    self.assertEqual(set(after) - set(state),
                     {'mlp/w_gate', 'mlp/w_up', 'mlp/w_down', 'mlp/b_gate'})
    model.swap_mlp(None)
    np.testing.assert_array_equal(model(tokens), before)

  def test_group_filter(self):
    vocab = _vocab()
    model = _model(vocab, mlp_lib.init_mlp(jax.random.key(1), D, 8, activation='relu', gate_bias=True),
                   norm='rms')
    selected = lambda groups: set(_named(
        nnx.state(model, model_lib.group_filter(groups))))
    self.assertEqual(selected(('qk',)), {'w_q', 'w_k'})
    self.assertEqual(selected(('vo', 'norm')), {'w_v', 'w_o', 'norm_scale'})
    self.assertEqual(selected(('mlp',)),
                     {'mlp/w_gate', 'mlp/w_up', 'mlp/w_down', 'mlp/b_gate'})
    self.assertEqual(len(selected(model_lib.GROUPS)),
                     len(_leaves(model)) - 1)  # all but the embeddings
    frozen = _model(vocab)  # frozen_rms: the norm scalar is no Param
    self.assertEmpty(jax.tree.leaves(
        nnx.state(frozen, model_lib.group_filter(('norm', 'mlp')))))
    for bad in ((), ('attn',), ('qk', 'QK')):
      with self.assertRaisesRegex(FactStoreError, 'groups'):
        model_lib.group_filter(bad)

  def test_config_errors(self):
    vocab = _vocab()
    with self.assertRaisesRegex(FactStoreError, 'unknown norm'):
      _model(vocab, norm='layer')
    with self.assertRaisesRegex(FactStoreError, 'head_dim'):
      _model(vocab, rope=True, head_dim=7)
    for hd in (0, -2):
      with self.assertRaisesRegex(FactStoreError, 'head_dim'):
        _model(vocab, head_dim=hd)
    with self.assertRaisesRegex(FactStoreError, 'head_dim'):  # odd d
      model_lib.Transformer(jnp.eye(7), jnp.eye(7)[:3], key=jax.random.key(0),
                            config=model_lib.TransformerConfig(rope=True))
    with self.assertRaisesRegex(FactStoreError, 'key_rows'):
      model_lib.Transformer(vocab.embeddings, jnp.ones((3, D + 1)),
                            key=jax.random.key(0))


# ----------------------------------------------------------------------------
# Training and evaluation.


_MLP_NAMES = {'mlp/w_gate', 'mlp/w_up', 'mlp/w_down', 'mlp/b_gate'}


@functools.cache
def _tiny_run(groups, seed):
  """``train`` on key copy with TINY: (variables before, after, report)."""
  vocab = _vocab()
  model = _model(vocab, mlp_lib.init_mlp(jax.random.key(1), D, 8, activation='relu', gate_bias=True),
                 norm='rms')
  before = _leaves(model)
  report = train_lib.train(model, jax.random.key(seed), vocab,
                           data.copy_targets(vocab),
                           dataclasses.replace(TINY, groups=groups))
  return before, _leaves(model), report


class TrainTest(chex.TestCase):

  @parameterized.named_parameters(
      ('qk', ('qk',), {'w_q', 'w_k'}),
      ('qk_vo', ('qk', 'vo'), {'w_q', 'w_k', 'w_v', 'w_o'}))
  def test_only_named_groups_change(self, groups, trained):
    # TINY has weight decay, which would also shrink any frozen parameter
    # the optimizer was handed.
    before, after, report = _tiny_run(groups, 0)
    self.assertEqual(set(before), {'embed', 'w_q', 'w_k', 'w_v', 'w_o',
                                   'norm_scale'} | _MLP_NAMES)
    self.assertEqual(set(after), set(before))
    for name in before:
      if name in trained:
        self.assertFalse(np.array_equal(after[name], before[name]), name)
      else:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    # The step budget holds even when it is shorter than a chunk.
    self.assertEqual(report.steps, TINY.max_steps)
    self.assertLen(report.loss, 1)
    self.assertLen(report.eval_accuracy, 1)
    self.assertFalse(report.reached_target)
    self.assertTrue(np.isfinite(report.loss).all())

  def test_deterministic(self):
    before, first, report = _tiny_run(('qk',), 0)
    vocab = _vocab()
    model = _model(vocab, mlp_lib.init_mlp(jax.random.key(1), D, 8, activation='relu', gate_bias=True),
                   norm='rms')
    chex.assert_trees_all_equal(_leaves(model), before)
    again = train_lib.train(model, jax.random.key(0), vocab,
                            data.copy_targets(vocab),
                            dataclasses.replace(TINY, groups=('qk',)))
    chex.assert_trees_all_equal(_leaves(model), first)
    self.assertEqual(again.loss, report.loss)
    self.assertEqual(again.eval_accuracy, report.eval_accuracy)

  @parameterized.named_parameters(
      ('max_steps', dict(max_steps=0), 'max_steps'),
      ('chunk_steps', dict(chunk_steps=0), 'chunk_steps'),
      ('batch_size', dict(batch_size=0), 'batch_size'),
      ('eval_batch_size', dict(eval_batch_size=0), 'eval_batch_size'),
      ('context_len', dict(context_len=-1), 'context_len'),
      ('learning_rate', dict(learning_rate=0.0), 'learning_rate'),
      ('final_fraction', dict(final_fraction=1.5), 'final_fraction'),
      ('target_low', dict(target_accuracy=0.0), 'target_accuracy'),
      ('target_high', dict(target_accuracy=1.2), 'target_accuracy'),
      ('groups_unknown', dict(groups=('attention',)), 'groups'),
      ('groups_empty', dict(groups=()), 'groups'),
      ('weight_decay', dict(weight_decay=-0.1), 'weight_decay'),
      ('logit_scale', dict(logit_scale=0.0), 'logit_scale'))
  def test_config_errors(self, kwargs, match):
    config = train_lib.TransformerTrainConfig(**kwargs)
    with self.assertRaisesRegex(FactStoreError, match):
      config.check()
    vocab = _vocab()
    with self.assertRaisesRegex(FactStoreError, match):
      train_lib.train(_model(vocab), jax.random.key(0), vocab,
                      data.copy_targets(vocab), config)

  def test_train_errors(self):
    vocab = _vocab()
    model = _model(vocab)
    targets = data.copy_targets(vocab)
    key = jax.random.key(0)
    with self.assertRaisesRegex(FactStoreError, 'targets has shape'):
      train_lib.train(model, key, vocab, targets[:-1], TINY)
    with self.assertRaisesRegex(FactStoreError, 'token ids'):
      train_lib.train(model, key, vocab, targets.at[3].set(vocab.size), TINY)
    with self.assertRaisesRegex(FactStoreError, 'token ids'):
      train_lib.recall(model, key, vocab, targets.at[0].set(-1))
    with self.assertRaisesRegex(FactStoreError, 'contexts_per_fact'):
      train_lib.recall(model, key, vocab, targets, contexts_per_fact=0)
    with self.assertRaisesRegex(FactStoreError, 'batch_size'):
      train_lib.key_delivery(model, key, vocab, batch_size=0)
    for groups in (('norm',), ('mlp',)):  # frozen_rms, identity MLP
      config = dataclasses.replace(TINY, groups=groups)
      with self.assertRaisesRegex(FactStoreError, 'no parameters'):
        train_lib.train(model, key, vocab, targets, config)

  def test_schedules_keep_the_mlp_frozen(self):
    vocab = _vocab()
    model = _model(vocab)
    state = _leaves(model)
    mlp = mlp_lib.init_mlp(jax.random.key(1), D, 8, activation='relu', gate_bias=True)
    targets = data.copy_targets(vocab)
    for groups in (('mlp',), ('qk', 'mlp')):
      config = dataclasses.replace(TINY, groups=groups)
      with self.assertRaisesRegex(FactStoreError, 'frozen'):
        train_lib.schedule_a(model, jax.random.key(0), vocab, mlp, config)
      with self.assertRaisesRegex(FactStoreError, 'frozen'):
        train_lib.schedule_b(model, jax.random.key(0), vocab, mlp, targets,
                             config)
    # Rejected before anything happened to the model.
    self.assertIsInstance(model.mlp, model_lib.IdentityMLP)
    chex.assert_trees_all_equal(_leaves(model), state)

  def test_query_loss(self):
    vocab = _vocab()
    model = _random_model(vocab)
    tokens = _tokens(vocab)
    logits = np.asarray(model(tokens)[:, -1], np.float64)
    targets = jnp.asarray(np.argmax(logits, -1)).at[0].add(1) % vocab.size
    loss, acc = train_lib.query_loss(model, tokens, targets, logit_scale=2.0)
    z = 2.0 * logits
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    want = np.mean(lse - z[np.arange(3), np.asarray(targets)])
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(acc, 2 / 3, rtol=1e-6)


class ScheduleTest(chex.TestCase):
  """Schedules (a) and (b) and the evaluations on N=32 facts in d=32."""

  def test_key_copy_recall(self):
    vocab, _, _ = _task()
    model, report = _schedule_a()
    self.assertEqual(report.steps, COPY.max_steps)
    self.assertEqual(report.eval_accuracy[-1], 1.0)
    self.assertLess(report.loss[-1], report.loss[0])
    model = nnx.clone(model)
    model.swap_mlp(None)
    result = train_lib.recall(model, jax.random.key(11), vocab,
                              data.copy_targets(vocab), context_len=CONTEXT,
                              contexts_per_fact=8)
    self.assertEqual(result.accuracy, 1.0)
    np.testing.assert_array_equal(result.per_fact, np.ones(N))

  def test_recall_counts_per_fact(self):
    # Copy targets on even facts, a junk token on odd ones; uneven batches.
    vocab, _, _ = _task()
    model = nnx.clone(_schedule_a()[0])
    model.swap_mlp(None)
    targets = np.asarray(data.copy_targets(vocab)).copy()
    targets[1::2] = vocab.junk_ids[0]
    result = train_lib.recall(model, jax.random.key(12), vocab, targets,
                              context_len=CONTEXT, contexts_per_fact=3,
                              batch_size=40)
    chex.assert_shape(result.per_fact, (N,))
    np.testing.assert_array_equal(result.per_fact, np.arange(N) % 2 == 0)
    self.assertEqual(result.accuracy, 0.5)

  def test_key_delivery(self):
    vocab, _, _ = _task()
    model = nnx.clone(_schedule_a()[0])
    key = jax.random.key(13)
    inputs, dist = train_lib.key_delivery(model, key, vocab,
                                          context_len=CONTEXT,
                                          contexts_per_fact=2, batch_size=32)
    chex.assert_shape(inputs, (2 * N, vocab.dim))
    chex.assert_shape(dist, (2 * N,))
    facts = np.tile(np.arange(N), 2)
    keys = np.asarray(vocab.embeddings)[np.asarray(vocab.key_ids)[facts]]
    np.testing.assert_allclose(dist, np.linalg.norm(inputs - keys, axis=-1),
                               rtol=1e-5, atol=1e-6)
    # The inputs are norm(h_Q) of the sequences asking for those facts.
    for i, start in enumerate((0, 32)):
      batch = data.sequences(jax.random.fold_in(key, i), vocab,
                             data.copy_targets(vocab),
                             jnp.asarray(facts[start:start + 32]), CONTEXT)
      _, z = model.mlp_inputs(batch.tokens, last_only=True)
      np.testing.assert_allclose(inputs[start:start + 32], z[:, 0],
                                 rtol=1e-5, atol=1e-5)
    # After key-copy training the attention delivers the keys closely.
    self.assertLess(float(np.median(dist)), 0.1)
    self.assertLess(float(dist.max()), 0.5)

  def test_schedule_a_inserts_mlp_and_swap_takes_new_facts(self):
    vocab, perm1, perm2 = _task()
    trained, _ = _schedule_a()
    model = nnx.clone(trained)
    mlp1, mlp2 = _gd_mlp(0), _gd_mlp(1)
    self.assertIsInstance(model.mlp, mlp_lib.GatedMLPModule)
    chex.assert_trees_all_equal(model.mlp.to_params(), mlp1)  # untouched
    targets1 = data.fact_targets(vocab, perm1)
    targets2 = data.fact_targets(vocab, perm2)
    result = train_lib.recall(model, jax.random.key(14), vocab, targets1,
                              context_len=CONTEXT, contexts_per_fact=8)
    self.assertGreaterEqual(result.accuracy, 0.99)
    # Eval-time MLP swap: the new fact set is recalled, nothing retrained.
    qk = _leaves(model)
    model.swap_mlp(mlp2)
    result = train_lib.recall(model, jax.random.key(14), vocab, targets2,
                              context_len=CONTEXT, contexts_per_fact=8)
    self.assertGreaterEqual(result.accuracy, 0.99)
    for name in ('w_q', 'w_k', 'w_v', 'w_o', 'embed'):
      np.testing.assert_array_equal(_leaves(model)[name], qk[name])
    old = train_lib.recall(model, jax.random.key(15), vocab, targets1,
                           context_len=CONTEXT, contexts_per_fact=8)
    self.assertLess(old.accuracy, 0.1)  # perm2 differs from perm1 everywhere

  def test_schedule_b_trains_through_constructed_mlp(self):
    vocab, perm1, _ = _task()
    ed = _ed_mlp()
    targets = data.fact_targets(vocab, perm1)
    model = _model(vocab, seed=4)
    model.swap_mlp(ed)
    untrained = train_lib.recall(model, jax.random.key(18), vocab, targets,
                                 context_len=CONTEXT, contexts_per_fact=8)
    self.assertLess(untrained.accuracy, 0.5)
    # A learning rate of 0.1 diverged here on an H100 (recall 0.54 after
    # 50 steps, then chance) though not on CPU; 0.03 is stable on both.
    config = dataclasses.replace(COPY, chunk_steps=50, target_accuracy=0.85,
                                 learning_rate=0.03)
    model = _model(vocab, seed=4)
    report = train_lib.schedule_b(model, jax.random.key(17), vocab, ed,
                                  targets, config)
    # Recall around a frozen constructed MLP depends on the seed and
    # platform (the usability tradeoff: 0.4 to 0.96 over seeds 4-9 at rate
    # 0.1 on CPU); seed 4 at 0.03 reaches 0.97 after 100 steps on CPU and
    # plateaus at 0.9-0.94 on an H100, so the target is 0.85 and must be
    # reached, stopping at the first evaluation that meets it.
    evals = np.asarray(report.eval_accuracy)
    self.assertTrue(report.reached_target, evals)
    self.assertEqual(report.steps, 50 * len(evals))
    self.assertLess(report.steps, config.max_steps)
    self.assertGreaterEqual(evals[-1], 0.85)
    self.assertTrue((evals[:-1] < 0.85).all())
    self.assertGreater(evals[-1], untrained.accuracy + 0.1)
    # A target met at the first evaluation stops after one chunk.
    config = dataclasses.replace(config, target_accuracy=0.01)
    report = train_lib.schedule_b(_model(vocab, seed=4), jax.random.key(17), vocab, ed,
                                  targets, config)
    self.assertTrue(report.reached_target)
    self.assertEqual(report.steps, 50)
    self.assertLen(report.eval_accuracy, 1)
    # The constructed MLP is untouched; attention learned to use it.
    chex.assert_trees_all_equal(model.mlp.to_params(), ed.as_mlp())
    result = train_lib.recall(model, jax.random.key(18), vocab, targets,
                              context_len=CONTEXT, contexts_per_fact=8)
    self.assertGreater(result.accuracy, untrained.accuracy + 0.1)
