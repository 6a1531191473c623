"""A synthetic relation in templates, and its 1-layer base model.

See docs/design.md, "Fact editing".

The relation is "⟨book⟩ was written by ⟨author⟩": ``N`` subject tokens (books)
each map to one of ``M`` object tokens (authors); both are atomic tokens with
generated names. Every fact is written in paraphrase templates of ordinary
word tokens, e.g. ``the author of S is O``; a few templates are held out of
training (paraphrase evaluation).

Embeddings are tied, frozen random unit vectors. Subjects and objects live in
the first ``fact_dim`` coordinates, words in the rest, so the fact MLP can be
a clean fact store: it reads the fact coordinates of the residual stream
(:class:`FactSlot`, L2-normalised) and is built for
:func:`fact_factset` — subject embeddings to object *tokens*, decoded over the
whole vocabulary. The base model is the Transformer of
:mod:`factstore_jax.transformer` (no attention residual, MLP residual on,
RoPE); its attention learns, with next-token loss over every token, to carry
the subject to the position before the object and to predict the words.

Layout of the ``V`` embedding rows: ``[0, W)`` words, ``[W, W + N)``
subjects, ``[W + N, W + N + M)`` objects.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from factstore_jax import factsets, storage, training
from factstore_jax.capacity import methods
from factstore_jax.errors import FactStoreError
from factstore_jax.factsets import FactSet
from factstore_jax.mlp import GatedMLP, as_gated
from factstore_jax.transformer.model import (Frozen, Transformer,
                                             TransformerConfig, as_mlp_module)
from factstore_jax.transformer.train import (TrainReport,
                                             TransformerTrainConfig,
                                             fit_groups)

Array = jax.Array

# Object slot last; the subject slot anywhere before it. A word directly
# before ``O`` (the cue) appears only there, so the cue always asks for the
# object. Held-out templates are new compositions of training fragments:
# every word pair in them occurs in some training template.
TRAIN_TEMPLATES = (
    'the author of S is O',
    'S was written by O',
    'the book S was written by O',
    'S , a novel written by O',
    'the writer of S is O',
    'everyone knows that S was written by O',
    'the novel S was penned by O',
    'according to the library , the author of S is O',
)
HELDOUT_TEMPLATES = (
    'the novel S was written by O',
    'according to the library , the writer of S is O',
    'everyone knows that S was penned by O',
    'the book S , a novel written by O',
)
# Held-out templates with a *distractor* subject ``D`` (another fact's
# subject) before the real one. Attention, trained on one subject per
# sentence, delivers a mixture of the two to the fact MLP (a median 0.7 away
# from the subject's embedding in a small model), so paraphrase on these
# measures whether an edit generalises beyond the exact keys it was made for
# (on the plain held-out templates attention delivers the subject to ~1e-3).
# Training on distractor templates too (``mixed_train_templates``, e.g.
# MIXED_TRAIN_TEMPLATES) did not teach attention to prefer the later subject
# in 2,000 steps (held-out mixed accuracy ~0.5 either way), so the default
# base model trains on none.
MIXED_TRAIN_TEMPLATES = (
    'the book D , the book S was written by O',
    'everyone knows that D , the novel S was penned by O',
)
MIXED_TEMPLATES = (
    'according to the library , D , the book S was written by O',
    'the novel D , the novel S was penned by O',
    'D , everyone knows that S was written by O',
)
SUBJECT, OBJECT, DISTRACTOR = 'S', 'O', 'D'
_PAD, _S_SLOT, _O_SLOT, _D_SLOT = -1, -2, -3, -4
_SLOTS = {SUBJECT: _S_SLOT, OBJECT: _O_SLOT, DISTRACTOR: _D_SLOT}

_SYLLABLES = ('ka', 'lo', 'mi', 'ren', 'tas', 'vor', 'el', 'dun', 'shi', 'bra',
              'qui', 'zet', 'om', 'fa', 'lir', 'gon', 'ye', 'pa', 'nor', 'xu')


def generated_names(seed: int, count: int, syllables: int = 3) -> list[str]:
  """``count`` distinct made-up names (seeded, no downloads)."""
  rng = np.random.default_rng(seed)
  names, seen = [], set()
  while len(names) < count:
    parts = rng.choice(_SYLLABLES, size=2 * syllables)
    name = (''.join(parts[:syllables]).capitalize() + ' ' +
            ''.join(parts[syllables:]).capitalize())
    if name not in seen:
      seen.add(name)
      names.append(name)
  return names


@dataclasses.dataclass(frozen=True, eq=False)
class Relation:
  """The relation task: vocabulary, embeddings, facts and templates.

  Attributes:
    words: ``W`` word strings (token ids ``[0, W)``).
    subjects, objects: generated names of the ``N`` subject and ``M`` object
      tokens.
    embeddings: ``(V, d)`` frozen unit token embeddings.
    fact_dim: subjects and objects use coordinates ``[0, fact_dim)``, words
      the rest.
    objects_of: ``(N,)`` int32 object index (in ``[0, M)``) of each subject.
    train_templates, heldout_templates, mixed_train_templates,
      mixed_templates: ``(K, T)`` int32 token ids of each template, with
      ``S``/``O``/``D`` slots as ``-2``/``-3``/``-4`` and right padding
      ``-1``. The base model trains on ``train_templates`` and
      ``mixed_train_templates`` (with a distractor subject ``D``; none by
      default); ``mixed_templates`` are held-out templates with a
      distractor.
  """
  words: tuple[str, ...]
  subjects: tuple[str, ...]
  objects: tuple[str, ...]
  embeddings: Array
  fact_dim: int
  objects_of: Array
  train_templates: Array
  heldout_templates: Array
  mixed_train_templates: Array
  mixed_templates: Array

  @property
  def num_facts(self) -> int:
    return len(self.subjects)

  @property
  def vocab_size(self) -> int:
    return self.embeddings.shape[0]

  def subject_ids(self) -> Array:
    return len(self.words) + jnp.arange(self.num_facts, dtype=jnp.int32)

  def object_ids(self) -> Array:
    start = len(self.words) + self.num_facts
    return start + jnp.arange(len(self.objects), dtype=jnp.int32)

  def fact_mask(self) -> Array:
    """``(d,)`` 1 on the fact coordinates, 0 on the word coordinates."""
    d = self.embeddings.shape[1]
    return (jnp.arange(d) < self.fact_dim).astype(self.embeddings.dtype)



def _encode(templates, index: dict[str, int], length: int) -> np.ndarray:
  out = np.full((len(templates), length), _PAD, np.int32)
  for row, text in enumerate(templates):
    tokens = text.split()
    out[row, :len(tokens)] = [_SLOTS.get(t, index.get(t)) for t in tokens]
  return out


def make_relation(key: Array, num_facts: int = 1024, num_objects: int = 64,
                  dim: int = 128, fact_dim: int = 80, *,
                  train_templates=TRAIN_TEMPLATES,
                  heldout_templates=HELDOUT_TEMPLATES,
                  mixed_train_templates=(),
                  mixed_templates=MIXED_TEMPLATES,
                  dtype=jnp.float32) -> Relation:
  """A random relation: ``num_facts`` subjects onto ``num_objects`` objects.

  Every object is used (a random many-to-one map). Word embeddings are random
  unit vectors in the last ``dim - fact_dim`` coordinates, subject and object
  embeddings in the first ``fact_dim``.
  """
  if num_facts < 1 or num_objects < 1 or num_objects > num_facts:
    raise FactStoreError(
        f'need 1 <= num_objects <= num_facts, got {num_objects}, {num_facts}')
  if not 0 < fact_dim < dim:
    raise FactStoreError(f'need 0 < fact_dim < dim, got {fact_dim}, {dim}')
  seen = tuple(train_templates) + tuple(mixed_train_templates)
  texts = seen + tuple(heldout_templates) + tuple(mixed_templates)
  if not train_templates or not heldout_templates:
    raise FactStoreError('need at least one training and one held-out template')
  for text in texts:
    tokens = text.split()
    if tokens.count(SUBJECT) != 1 or tokens.count(OBJECT) != 1 or \
        tokens[-1] != OBJECT or len(tokens) < 3:
      raise FactStoreError(f'template {text!r} needs one {SUBJECT}, a cue '
                           f'word and end in one {OBJECT}')
  for text in tuple(train_templates) + tuple(heldout_templates):
    if DISTRACTOR in text.split():
      raise FactStoreError(
          f'template {text!r} holds a distractor {DISTRACTOR}: put it in '
          'mixed_train_templates or mixed_templates')
  for text in texts:
    tokens = text.split()
    if DISTRACTOR in tokens and (
        tokens.count(DISTRACTOR) != 1 or
        tokens.index(DISTRACTOR) > tokens.index(SUBJECT)):
      raise FactStoreError(f'template {text!r}: a distractor {DISTRACTOR} '
                           f'must come once, before {SUBJECT}')
  for text in tuple(mixed_train_templates) + tuple(mixed_templates):
    if DISTRACTOR not in text.split():
      raise FactStoreError(f'mixed template {text!r} needs a distractor '
                           f'{DISTRACTOR}')
  if any(DISTRACTOR in t.split() for t in texts) and num_facts < 2:
    raise FactStoreError('mixed templates need at least 2 facts (the '
                         'distractor is another fact\'s subject)')
  words = tuple(dict.fromkeys(
      t for text in texts for t in text.split() if t not in _SLOTS))
  unseen = set(t for text in tuple(heldout_templates) + tuple(mixed_templates)
               for t in text.split()) - set(_SLOTS) - set(
      t for text in seen for t in text.split())
  if unseen:
    raise FactStoreError(
        f'held-out templates use words no training template has: {unseen}')
  index = {w: i for i, w in enumerate(words)}
  length = max(len(t.split()) for t in texts)
  encode = lambda ts: jnp.asarray(_encode(ts, index, length))
  k_words, k_facts, k_map = jax.random.split(key, 3)
  word_dim = dim - fact_dim
  word_rows = factsets.sample_sphere(k_words, len(words), word_dim, dtype=dtype)
  fact_rows = factsets.sample_sphere(k_facts, num_facts + num_objects,
                                     fact_dim, dtype=dtype)
  embeddings = jnp.concatenate([
      jnp.pad(word_rows, ((0, 0), (fact_dim, 0))),
      jnp.pad(fact_rows, ((0, 0), (0, word_dim)))])
  seed = int(jax.random.randint(k_map, (), 0, 2**31 - 1))
  return Relation(
      words=words,
      subjects=tuple(generated_names(seed, num_facts)),
      objects=tuple(generated_names(seed + 1, num_objects, syllables=2)),
      embeddings=embeddings, fact_dim=fact_dim,
      objects_of=factsets.many_to_one_map(k_map, num_facts, num_objects),
      train_templates=encode(train_templates),
      heldout_templates=encode(heldout_templates),
      mixed_train_templates=encode(mixed_train_templates),
      mixed_templates=encode(mixed_templates))


def render(relation: Relation, tokens: Array) -> str:
  """The text of one token sequence ``(T,)`` (padding dropped)."""
  w, n = len(relation.words), relation.num_facts
  names = relation.words + relation.subjects + relation.objects
  return ' '.join(names[int(t)] if t < w or t >= w + n else
                  f'<{names[int(t)]}>' for t in np.asarray(tokens) if t >= 0)


class Sequences(NamedTuple):
  """Filled templates (a pytree)."""
  tokens: Array      # (B, T) int32; padding is token 0 (masked)
  mask: Array        # (B, T - 1) bool: next-token targets that count
  is_word: Array     # (B, T - 1) bool: targets that are word tokens
  cue: Array         # (B,) int32: position whose next token is the object
  objects: Array     # (B,) int32: the object token at the slot


def fill(relation: Relation, templates: Array, facts: Array,
         template_ids: Array, objects_of: Array | None = None) -> Sequences:
  """Writes fact ``facts[b]`` in template ``template_ids[b]`` (traceable).

  ``objects_of (N,)`` overrides the relation's map (edited facts). A
  distractor slot gets the subject of fact ``(f + 1 + (37 t) mod (N - 1))
  mod N`` for fact ``f`` in template ``t``: another fact, fixed per pair.
  """
  objects_of = relation.objects_of if objects_of is None else objects_of
  rows = templates[template_ids]                        # (B, T)
  n = relation.num_facts
  subject = relation.subject_ids()[facts]
  other = (facts + 1 + (37 * template_ids) % max(n - 1, 1)) % n
  distractor = relation.subject_ids()[other]
  obj = relation.object_ids()[objects_of[facts]]
  tokens = jnp.where(rows == _S_SLOT, subject[:, None], rows)
  tokens = jnp.where(rows == _D_SLOT, distractor[:, None], tokens)
  tokens = jnp.where(rows == _O_SLOT, obj[:, None], tokens)
  valid = rows != _PAD
  targets = tokens[:, 1:]
  mask = valid[:, 1:]
  is_word = mask & (targets >= 0) & (targets < len(relation.words))
  cue = jnp.argmax(rows == _O_SLOT, axis=1).astype(jnp.int32) - 1
  return Sequences(jnp.where(valid, tokens, 0), mask, is_word, cue, obj)


def all_sequences(relation: Relation, templates: Array, facts: Array,
                  objects_of: Array | None = None) -> Sequences:
  """Every fact of ``facts (F,)`` in every template: ``B = F * K`` rows."""
  k = templates.shape[0]
  f = jnp.repeat(jnp.asarray(facts, jnp.int32), k)
  t = jnp.tile(jnp.arange(k, dtype=jnp.int32), len(facts))
  return fill(relation, templates, f, t, objects_of)


def fact_factset(relation: Relation, objects_of: Array | None = None
                 ) -> FactSet:
  """What the fact MLP stores: subject embeddings -> object token ids.

  The value table is the whole embedding table, so a margin on this fact set
  is a margin over the whole vocabulary.
  """
  objects_of = relation.objects_of if objects_of is None else objects_of
  objects_of = jnp.asarray(objects_of, jnp.int32)
  if objects_of.shape != (relation.num_facts,):
    raise FactStoreError(f'objects_of has shape {objects_of.shape}, expected '
                         f'({relation.num_facts},)')
  bad = np.flatnonzero((np.asarray(objects_of) < 0) |
                       (np.asarray(objects_of) >= len(relation.objects)))
  if bad.size:
    raise FactStoreError(f'objects_of[{bad[0]}] = {int(objects_of[bad[0]])} '
                         f'is not an object index in [0, '
                         f'{len(relation.objects)})')
  e = relation.embeddings
  return FactSet(e[relation.subject_ids()], e,
                 relation.object_ids()[objects_of])


FACT_GAP = 4.0   # median logit gap every fact MLP is scaled to


def gd_options(steps: int = 3_000) -> methods.MethodOptions:
  """GD fact-MLP settings: no early stop at 100%, so the margins keep growing
  and the calibrated MLP is robust to what attention lets through."""
  return methods.MethodOptions(train=training.TrainConfig(
      early_stop=False, max_steps=steps))


def calibrate(mlp, factset: FactSet, gap: float = FACT_GAP,
              quantile: float = 0.5) -> GatedMLP:
  """``mlp`` as a gated MLP whose outputs are scaled so the ``quantile`` over
  facts (default: the median) of the logit gap (target logit minus the best
  other) equals ``gap``.

  Every MLP put in the fact slot is calibrated the same way, so a swapped-in
  MLP speaks at the loudness the model was trained with.
  """
  if not gap > 0 or not 0 <= quantile <= 1:
    raise FactStoreError(
        f'need gap > 0 and 0 <= quantile <= 1, got {gap}, {quantile}')
  mlp = as_gated(mlp)
  gaps = storage.margins(mlp(factset.keys), factset.values,
                         factset.mapping)
  at = float(jnp.quantile(gaps, quantile))
  if not at > 0:
    raise FactStoreError(
        f'the {quantile} quantile of the logit gap is {at:.3g} <= 0 (the MLP '
        'misdecodes those facts); cannot calibrate it')
  return _scaled_outputs(mlp, gap / at)


def _scaled_outputs(mlp: GatedMLP, scale) -> GatedMLP:
  """``mlp`` with its output multiplied by ``scale`` (a number or ``(d,)``)."""
  return mlp.replace(
      w_down=mlp.w_down * scale,
      b_down=None if mlp.b_down is None else mlp.b_down * scale)


def fact_outputs_only(mlp, relation: Relation) -> GatedMLP:
  """``mlp`` as a gated MLP whose output's word coordinates are zero.

  The logits of subjects and objects read only the fact coordinates, so the
  facts ``mlp`` stores keep their logits; the word tokens' logits get no
  contribution from the MLP at any position.
  """
  mlp = as_gated(mlp)
  return _scaled_outputs(mlp, relation.fact_mask().astype(mlp.w_down.dtype))


class FactSlot(nnx.Module):
  """The fact MLP as it sits in the block.

  ``slot(h) = mlp(l2(h * fact_mask)) - h * fact_mask``: the MLP reads the fact
  coordinates of the stream and *replaces* them (with the MLP residual the
  block's output is ``h * word_mask + mlp(...)``), so the delivered subject
  itself never competes with the object in the logits. ``l2(z) = z /
  sqrt(|z|^2 + eps)``: a subject delivered at any scale reaches the MLP as its
  own embedding; a stream with no fact content gives the MLP ~0.
  """

  def __init__(self, mlp, fact_mask: Array, eps: float = 1e-4):
    self.fact_mask = Frozen(fact_mask)
    self.eps = eps
    self.mlp = as_mlp_module(mlp)

  def inputs(self, h: Array) -> Array:
    z = h * self.fact_mask[...]
    return z * jax.lax.rsqrt(jnp.sum(z * z, -1, keepdims=True) + self.eps)

  def __call__(self, h: Array) -> Array:
    return self.mlp(self.inputs(h)) - h * self.fact_mask[...]


# Attention carries the subject; no attention residual (the MLP input is the
# attention output), the MLP's output is added to it.
MODEL_CONFIG = TransformerConfig(attn_residual=False, mlp_residual=True,
                                 norm='none', rope=True)


def base_model(key: Array, relation: Relation, mlp,
               config: TransformerConfig = MODEL_CONFIG) -> Transformer:
  """The untrained base model with ``mlp`` (built for :func:`fact_factset`)."""
  e = relation.embeddings
  return Transformer(e, e[relation.subject_ids()],
                     FactSlot(mlp, relation.fact_mask()), key=key,
                     config=config)


def swap_fact_mlp(model: Transformer, mlp) -> None:
  """MLP swap: plug a new fact MLP into the slot (nothing else changes)."""
  model.mlp.mlp = as_mlp_module(mlp)


def fact_mlp(model: Transformer):
  """The fact MLP's params (``GatedMLP``) of a base model."""
  inner = model.mlp.mlp
  to_params = getattr(inner, 'to_params', None)
  if to_params is None:
    raise FactStoreError(f'the fact slot holds a {type(inner).__name__}, '
                         'not a gated MLP')
  return to_params()


def at_cue(x: Array, cue: Array) -> Array:
  """``x (B, T, ...)`` at each row's cue position ``cue (B,)``: ``(B, ...)``."""
  return jnp.take_along_axis(x, cue[:, None, None], 1)[:, 0]


def lm_loss(model: Transformer, seqs: Sequences, logit_scale: float = 1.0
            ) -> tuple[Array, Array]:
  """Next-token cross-entropy over every counted token, and object accuracy."""
  logits = model(seqs.tokens)[:, :-1] * logit_scale          # (B, T-1, V)
  nll = optax.softmax_cross_entropy_with_integer_labels(
      logits, seqs.tokens[:, 1:])
  loss = jnp.sum(nll * seqs.mask) / jnp.sum(seqs.mask)
  accuracy = storage.accuracy(
      jnp.argmax(at_cue(logits, seqs.cue), -1) == seqs.objects)
  return loss, accuracy


BASE_TRAIN = TransformerTrainConfig(groups=('qk', 'vo'), learning_rate=1e-2,
                         max_steps=3_000, chunk_steps=250, batch_size=256,
                         target_accuracy=None, eval_batch_size=1_024)


def train_base(model: Transformer, key: Array, relation: Relation,
               config: TransformerTrainConfig = BASE_TRAIN, *,
               progress: bool = False) -> TrainReport:
  """Trains the base model in place with next-token loss on training templates.

  Each step fills ``batch_size`` random (fact, template) pairs, the templates
  drawn from the training and the mixed training templates; the evaluation
  accuracy is object accuracy on a fresh batch.
  """
  templates = jnp.concatenate([relation.train_templates,
                               relation.mixed_train_templates])
  k = templates.shape[0]

  def sample(key, size):
    k_f, k_t = jax.random.split(key)
    return fill(relation, templates,
                jax.random.randint(k_f, (size,), 0, relation.num_facts),
                jax.random.randint(k_t, (size,), 0, k))

  def loss_fn(m, seqs):
    return lm_loss(m, seqs, config.logit_scale)

  words = 1.0 - relation.fact_mask()
  word_block = jnp.outer(words, words)

  def word_block_only(grads):
    # W_v, W_o keep the identity on the fact coordinates (and no cross
    # terms): the subject reaches the MLP exactly as its embedding.
    def mask(path, g):
      names = {getattr(p, 'key', getattr(p, 'name', None)) for p in path}
      return g * word_block if names & {'w_v', 'w_o'} else g
    return jax.tree_util.tree_map_with_path(mask, grads)

  return fit_groups(model, key, loss_fn, sample, config, progress=progress,
                    desc='train base model', grad_map=word_block_only)


class Scores(NamedTuple):
  """Per-sequence results of :func:`evaluate` (host arrays)."""
  correct: np.ndarray     # (B,) bool: argmax at the cue is the object
  word_nll: np.ndarray    # (B,) summed NLL of the word targets
  num_words: np.ndarray   # (B,) number of word targets

  @property
  def word_perplexity(self) -> float:
    """Perplexity of the word targets of these sequences."""
    return float(np.exp(self.word_nll.sum() / self.num_words.sum()))


@functools.partial(jax.jit, static_argnames=('batch',))
def _evaluate(graphdef, state, seqs: Sequences, batch: int):
  model = nnx.merge(graphdef, state)

  def one(s):
    logits = model(s.tokens)[:, :-1]
    nll = optax.softmax_cross_entropy_with_integer_labels(
        logits, s.tokens[:, 1:])
    return (jnp.argmax(at_cue(logits, s.cue), -1) == s.objects,
            jnp.sum(nll * s.is_word, -1), jnp.sum(s.is_word, -1))

  chunks = jax.tree.map(
      lambda a: a.reshape((-1, batch) + a.shape[1:]), seqs)
  out = jax.lax.map(one, chunks)
  return jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), out)


def evaluate(model: Transformer, seqs: Sequences, batch: int = 512) -> Scores:
  """Object correctness and word NLL of every sequence of ``seqs``."""
  n = seqs.tokens.shape[0]
  pad = -n % batch
  padded = jax.tree.map(
      lambda a: jnp.concatenate([a, jnp.repeat(a[:1], pad, 0)]), seqs)
  graphdef, state = nnx.split(model)
  out = _evaluate(graphdef, state, padded, batch)
  return Scores(*(np.asarray(a)[:n] for a in out))
