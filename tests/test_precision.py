"""Constructions and margin certificates trace at full float32 precision.

On GPUs/TPUs the default float32 matmul may round to TF32/bf16; these checks
run on any platform by lowering under a reduced default and reading the
precision of every ``dot_general`` in the program.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from factstore_jax import factsets, storage, training
from factstore_jax import mlp as mlp_lib
from factstore_jax.decodability import decodability
from factstore_jax.constructions import encoder_decoder as ed
from factstore_jax.constructions import verify as verify_lib
from factstore_jax.precision import full_precision

_DOT = re.compile(r'stablehlo\.dot_general[^\n]*')


def _dot_precisions(fn, *args) -> list[str]:
  with jax.default_matmul_precision('bfloat16'):
    text = jax.jit(fn).lower(*args).as_text()
  dots = _DOT.findall(text)
  assert dots, 'no matmul in the program'
  return ['HIGHEST' if 'HIGHEST' in d else 'reduced' for d in dots]


@pytest.fixture(scope='module')
def fs():
  return factsets.random_factset(jax.random.key(0), 64, 16, tied=False,
                                 num_values=32, mapping='many_to_one')


def test_full_precision_overrides_a_reduced_default():
  mm = lambda a, b: a @ b
  x = jnp.ones((4, 4))
  assert _dot_precisions(mm, x, x) == ['reduced']
  assert _dot_precisions(full_precision(mm), x, x) == ['HIGHEST']


def test_storage_certificates_are_full_precision(fs):
  out = fs.keys
  assert set(_dot_precisions(storage.margins, out, fs.values,
                             fs.mapping)) == {'HIGHEST'}
  mlp = mlp_lib.init_mlp(jax.random.key(1), 16, 8)
  assert set(_dot_precisions(
      lambda p: storage.evaluate_mlp(p, fs),
      mlp)) == {'HIGHEST'}


def test_construction_and_verification_are_full_precision(fs):
  def build_and_verify(key):
    model, codes, _, _ = ed.construct_fixed(key, fs, code_dim=8, bucket_size=8)
    return verify_lib.verify(model, fs, codes).storage.min_margin
  assert set(_dot_precisions(build_and_verify, jax.random.key(0))) == {
      'HIGHEST'}
  assert set(_dot_precisions(
      lambda v: decodability(v).rho, fs.values)) == {'HIGHEST'}


def test_training_steps_follow_the_default_but_certificate_is_full(fs):
  model = mlp_lib.init_mlp(jax.random.key(1), 16, 8)
  cfg = training.TrainConfig(max_steps=10, chunk_steps=5)
  kinds = _dot_precisions(
      lambda m: training.fit(m, fs, config=cfg).min_margin, model)
  assert 'reduced' in kinds and 'HIGHEST' in kinds
