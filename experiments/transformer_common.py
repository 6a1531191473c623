"""Shared set-up of the Transformer experiments (imported by the scripts).

A task is a tied fact set on the sphere (random permutation), its vocabulary
(``num_junk`` junk tokens + Q) and a second permutation over the same
embeddings for the eval-MLP swap. Fact MLPs are built for
:func:`factstore_jax.transformer.data.vocab_factset` (decoding over the
whole vocabulary). Everything is memoised per process, so rows of one task
share one build.
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple

import jax
import numpy as np

from factstore_jax import factsets, robustness, training
from factstore_jax.capacity import methods
from factstore_jax.transformer import data, model as model_lib, train

Array = jax.Array


class Task(NamedTuple):
  factset: factsets.FactSet
  vocab: data.Vocabulary
  targets: Array        # (N,) value tokens of the facts
  alt_targets: Array    # (N,) value tokens of the swap map
  mlp_factset: factsets.FactSet
  alt_factset: factsets.FactSet


@functools.lru_cache(maxsize=None)
def task(dim: int, num_facts: int, seed: int, num_junk: int) -> Task:
  k_fs, k_vocab, k_alt = jax.random.split(jax.random.key(seed), 3)
  fs = factsets.random_factset(k_fs, num_facts, dim, tied=True)
  vocab = data.make_vocabulary(k_vocab, fs, num_junk)
  alt = factsets.permutation_map(k_alt, num_facts)
  return Task(fs, vocab, data.fact_targets(vocab, fs.mapping),
              data.fact_targets(vocab, alt), data.vocab_factset(vocab, fs.mapping),
              data.vocab_factset(vocab, alt))


class FactMLPs(NamedTuple):
  built: methods.Built       # for the facts
  alt: methods.Built         # same knob, for the swap map
  width: int
  seconds: float


def build_pair(method: str, t: Task, seed: int, width: int,
               options: methods.MethodOptions,
               built: methods.Built | None = None) -> FactMLPs:
  """MLPs for the facts and the swap map at ``width`` (grown until both store).

  ``built``: the facts' MLP at ``width`` if already made (e.g. by
  ``smallest_mlp``), used instead of building it again.
  """
  start = time.perf_counter()
  key = jax.random.key(100 + seed)
  while True:
    if built is None:
      built = methods.build_mlp(method, key, t.mlp_factset, width,
                                options=options)
    alt = methods.build_mlp(method, key, t.alt_factset, width,
                            options=options)
    if min(built.accuracy, alt.accuracy) >= 1.0:
      return FactMLPs(built, alt, width, time.perf_counter() - start)
    width, built = max(width + 1, int(width * 1.1)), None


def at_wstar(built: methods.Built, cap: methods.Capacity
             ) -> methods.Built | None:
  """``smallest_mlp``'s MLP if it is at ``cap``'s W* (None if it had to grow
  the width), to use instead of building W* again."""
  return built if built.num_params == cap.num_params else None


@functools.lru_cache(maxsize=None)
def wstar_pair(method: str, dim: int, num_facts: int, seed: int,
               num_junk: int, rel_tol: float, max_steps: int) -> FactMLPs:
  """Both MLPs at the method's standalone W* on the fact map."""
  start = time.perf_counter()
  t = task(dim, num_facts, seed, num_junk)
  options = mlp_options(max_steps)
  built, cap = methods.smallest_mlp(method, jax.random.key(100 + seed),
                                    t.mlp_factset, options=options,
                                    rel_tol=rel_tol)
  pair = build_pair(method, t, seed, cap.width, options,
                    at_wstar(built, cap))
  return pair._replace(seconds=time.perf_counter() - start)


def mlp_options(max_steps: int) -> methods.MethodOptions:
  return methods.MethodOptions(
      train=training.TrainConfig(max_steps=max_steps))


def new_model(t: Task, seed: int, mlp=None,
              config: model_lib.TransformerConfig = model_lib.TransformerConfig()
              ) -> model_lib.Transformer:
  return model_lib.Transformer(t.vocab.embeddings, t.mlp_factset.keys, mlp,
                               key=jax.random.key(200 + seed), config=config)


@functools.lru_cache(maxsize=None)
def copy_trained(dim: int, num_facts: int, seed: int, num_junk: int,
                 config: train.TransformerTrainConfig):
  """Schedule (a)'s attention: ``(model, report, noise stats)``."""
  t = task(dim, num_facts, seed, num_junk)
  model = new_model(t, seed)
  report = train.schedule_a(model, jax.random.key(300 + seed), t.vocab, None,
                            config, progress=False)
  return model, report, noise(model, t, seed, config.context_len)


def noise(model, t: Task, seed: int, context_len: int) -> dict:
  """Attention noise floor ``||norm(h_Q) - k||`` over fresh sequences."""
  inputs, _ = train.key_delivery(model, jax.random.key(400 + seed), t.vocab,
                                 context_len=context_len)
  facts = np.tile(np.arange(t.factset.keys.shape[0]),
                  inputs.shape[0] // t.factset.keys.shape[0])
  floor = robustness.noise_floor(inputs, np.asarray(t.mlp_factset.keys)[facts])
  return dict(noise_max=float(floor.max), noise_mean=float(floor.mean),
              noise_p95=float(floor.p95))


def recall(model, t: Task, targets, seed: int, context_len: int) -> float:
  return train.recall(model, jax.random.key(500 + seed), t.vocab, targets,
                      context_len=context_len).accuracy
