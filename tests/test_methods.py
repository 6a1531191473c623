"""Tests for the capacity methods registry (factstore_jax.methods)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from factstore_jax import factsets, sharding, storage, training
from factstore_jax import mlp as mlp_lib
from factstore_jax.capacity import methods
from factstore_jax.constructions.encoder_decoder import (construct,
                                                         construction_decoder)
from factstore_jax.errors import FactStoreError

FAST = methods.MethodOptions(train=training.TrainConfig(
    max_steps=1_500, learning_rate=1e-2, final_learning_rate=1e-4,
    patience=300))


@pytest.fixture(scope='module')
def sets():
  return [factsets.random_factset(jax.random.key(s), 48, 16, tied=True)
          for s in range(2)]


@pytest.mark.parametrize('method, threshold', [
    ('gd', 1.0), ('hebbian_ridge', 1.0),
    # ~20 s in the suite; the search logic is the same as the two above.
    pytest.param('ntk', 0.75, marks=pytest.mark.slow)])
def test_wstar_is_the_smallest_passing_width(sets, method, threshold):
  # NTK features at d = 16 do not store all 48 facts even at width 1024.
  keys = [jax.random.key(10), jax.random.key(11)]
  rounds = []
  caps = methods.find_capacity(method, keys, sets, options=FAST,
                               threshold=threshold,
                               on_round=lambda *r: rounds.append(r))
  for i, (cap, fs, key) in enumerate(zip(caps, sets, keys)):
    # on_round saw every width the search tested, with its accuracy.
    assert {w: a for members, widths, accs in rounds
            for m, w, a in zip(members, widths, accs) if m == i} == cap.tested
    assert cap.width is not None
    assert cap.tested[cap.width] >= threshold
    assert cap.num_params == methods.width_params(method, 16, cap.width)
    # Re-evaluating W* and W* - 1 alone agrees with the search.
    accs = methods.evaluate_batched(method, [key, key], [fs, fs],
                                    [cap.width, max(cap.width - 1, 1)],
                                    options=FAST)
    assert accs[0] >= threshold
    if cap.width > 1:
      assert accs[1] < threshold


def test_known_accuracies_resume_a_search(sets):
  keys = [jax.random.key(10), jax.random.key(11)]
  rounds = []
  full = methods.find_capacity('hebbian_ridge', keys, sets,
                               on_round=lambda *r: rounds.append(r))
  assert len(rounds) > 2
  # Interrupted after two rounds: the resumed search evaluates only the rest
  # and ends where the uninterrupted one did.
  known = [{}, {}]
  for members, widths, accs in rounds[:2]:
    for m, w, a in zip(members, widths, accs):
      known[m][w] = a
  fresh = []
  resumed = methods.find_capacity('hebbian_ridge', keys, sets, known=known,
                                  on_round=lambda *r: fresh.append(r))
  assert resumed == full
  assert fresh == rounds[2:]
  # Everything known: nothing is evaluated.
  done = [cap.tested for cap in full]
  assert methods.find_capacity(
      'hebbian_ridge', keys, sets, known=done,
      on_round=lambda *r: pytest.fail('evaluated a known width')) == full
  with pytest.raises(FactStoreError, match='one known dict per fact set'):
    methods.find_capacity('hebbian_ridge', keys, sets, known=done[:1])
  with pytest.raises(FactStoreError, match='batched methods'):
    methods.find_capacity('encoder_decoder', keys[:1], sets[:1],
                          known=[{8: 1.0}])


def test_encoder_decoder_gd_code_dim(sets, monkeypatch):
  # Default: the closed form's choice for each fact set and its key; an
  # explicit code dim (one for all, or one per fact set) is used as given.
  used = []
  def fake(method, keys, fss, widths, *, options, code_dims, keep_models):
    assert not keep_models
    used.append(list(code_dims))
    return np.asarray([float(w >= 5) for w in widths])
  monkeypatch.setattr(methods, 'evaluate_batched', fake)
  keys = [jax.random.key(10), jax.random.key(11)]
  default = [methods.gd_code_dim(k, fs) for k, fs in zip(keys, sets)]
  for code_dim, want in ((None, default), (9, [9, 9]), ([7, 12], [7, 12])):
    used.clear()
    caps = methods.find_capacity('encoder_decoder_gd', keys, sets,
                                 code_dim=code_dim)
    # Each round evaluates both members, each with its own code dim.
    assert used and all(u == want for u in used)
    for cap, m in zip(caps, want):
      assert (cap.width, cap.code_dim) == (5, m)
      assert cap.num_params == methods.width_params(
          'encoder_decoder_gd', 16, 5, code_dim=m)
  for method, bad in (('gd', 8), ('encoder_decoder', 8),
                      ('encoder_decoder_gd', 0), ('encoder_decoder_gd', True),
                      ('encoder_decoder_gd', 1.5), ('encoder_decoder_gd', [8]),
                      ('encoder_decoder_gd', [8, 0]),
                      ('encoder_decoder_gd', 17)):
    with pytest.raises(FactStoreError, match='code_dim'):
      methods.find_capacity(method, keys, sets, code_dim=bad)


def test_encoder_decoder_gd_trains_with_the_construction_decoder(
    sets, monkeypatch):
  # Members of different code dims run one program per code dim; each
  # member trains with the decoder the construction draws for its key,
  # which gd_code_dim certifies.
  keys = [jax.random.key(10), jax.random.key(11)]
  c = construct(keys[0], sets[0])
  np.testing.assert_array_equal(c.model.decoder, construction_decoder(
      keys[0], 16, c.report.code_dim))
  assert methods.gd_code_dim(keys[0], sets[0]) == c.report.code_dim
  calls, map_batched = [], sharding.map_batched
  def spy(*args, static_kwargs=None, **kwargs):
    calls.append(static_kwargs['code_dim'])
    return map_batched(*args, static_kwargs=static_kwargs, **kwargs)
  monkeypatch.setattr(sharding, 'map_batched', spy)
  short = methods.MethodOptions(train=dataclasses.replace(
      FAST.train, max_steps=200, chunk_steps=100))
  accs = methods.evaluate_batched('encoder_decoder_gd', keys, sets, [12, 12],
                                  options=short, code_dims=[8, 4])
  assert sorted(calls) == [4, 8]
  alone = training.train_encoder_decoder(
      keys[1], sets[1], 12, 4, width=12, config=short.train,
      decoder=construction_decoder(keys[1], 16, 4)).accuracy
  assert float(alone) == accs[1]
  built = methods.build_mlp('encoder_decoder_gd', keys[1], sets[1], 12,
                            options=short, code_dim=4)
  np.testing.assert_array_equal(built.mlp.decoder,
                                construction_decoder(keys[1], 16, 4))
  with pytest.raises(FactStoreError, match='one code dim per member'):
    methods.evaluate_batched('encoder_decoder_gd', keys, sets, [12, 12],
                             code_dims=[8])
  with pytest.raises(FactStoreError, match='code_dims is for'):
    methods.evaluate_batched('gd', keys, sets, [12, 12], code_dims=[8, 8])


def test_batched_evaluation_equals_single_calls(sets):
  keys = [jax.random.key(3), jax.random.key(4)]
  both = methods.evaluate_batched('hebbian_ridge', keys, sets, [24, 40],
                                  options=FAST)
  one = methods.evaluate_batched('hebbian_ridge', keys[:1], sets[:1], [24],
                                 options=FAST)
  assert abs(both[0] - one[0]) < 1e-6


def test_chunked_gd_members_equal_vmapped(sets, monkeypatch):
  # One member stops early (the wide one), the other trains on: mapped
  # members, each stopping on its own, give the vmapped accuracies.
  used, map_batched = [], sharding.map_batched
  def spy(*args, chunk_size=None, static_kwargs=None, **kwargs):
    used.append((chunk_size, static_kwargs.get('hidden')))
    return map_batched(*args, chunk_size=chunk_size,
                       static_kwargs=static_kwargs, **kwargs)
  monkeypatch.setattr(sharding, 'map_batched', spy)
  keys = [jax.random.key(5), jax.random.key(6)]
  mapped = dataclasses.replace(FAST, chunk_size=1)
  # Widths 3 and 8: the vmapped call (2 members padded to 8) is the program
  # of the first round of test_wstar_is_the_smallest_passing_width[gd].
  accs = [methods.evaluate_batched('gd', keys, sets, [3, 8], options=o)
          for o in (FAST, mapped)]
  # Vmapped: one call padded to the widest member; mapped on one device:
  # one call per width, unpadded.
  # (So on one device a mapped member's accuracy is what it gets alone.)
  assert used == [(None, 8)] + ([(1, 3), (1, 8)] if jax.device_count() == 1
                                else [(1, 8)])
  assert accs[0][1] == 1.0 and accs[0][0] < 1.0
  np.testing.assert_allclose(accs[1], accs[0], atol=1 / 48 + 1e-6)
  # The closed-form baselines always vmap.
  methods.evaluate_batched('hebbian_ridge', keys, sets, [8, 8],
                           options=mapped)
  assert used[-1][0] is None


@pytest.mark.parametrize('method', ['gd', 'encoder_decoder_gd'])
def test_kept_models_are_the_runs_at_their_widths(sets, method):
  # Vmapped members padded to the widest (3 and 8 -> 8): each kept model is
  # its member's run cut to its own width, and stores what the run stored.
  keys = [jax.random.key(5), jax.random.key(6)]
  code_dims = None if method == 'gd' else [8, 8]
  accs, models = methods.evaluate_batched(method, keys, sets, [3, 8],
                                          options=FAST, code_dims=code_dims,
                                          keep_models=True)
  np.testing.assert_array_equal(
      accs, methods.evaluate_batched(method, keys, sets, [3, 8],
                                     options=FAST, code_dims=code_dims))
  for acc, model, fs, width in zip(accs, models, sets, [3, 8]):
    assert model.w_gate.shape == (16, width)
    assert float(storage.evaluate_fn(model, fs).accuracy) == acc
  assert accs[1] == 1.0 and accs[0] < 1.0
  assert isinstance(models[0], mlp_lib.EncoderDecoder if code_dims
                    else mlp_lib.GatedMLP)


def test_smallest_mlp_keeps_the_search_model(sets, monkeypatch):
  # GD's W* model is the search's own run: nothing is trained again.
  key, fs = jax.random.key(10), sets[0]
  rebuilt, build_mlp = [], methods.build_mlp
  def spy(method, key, factset, width, **kwargs):
    rebuilt.append(width)
    return build_mlp(method, key, factset, width, **kwargs)
  monkeypatch.setattr(methods, 'build_mlp', spy)
  built, cap = methods.smallest_mlp('gd', key, fs, options=FAST)
  assert rebuilt == []
  assert built.mlp.w_gate.shape == (16, cap.width)
  assert (built.accuracy, built.num_params) == (1.0, cap.num_params)
  assert built.min_margin > 0
  assert cap.model is built.mlp
  # It is the model a fresh training at W* gives, up to GD's rounding (here
  # 5e-4 of outputs up to 91; over 10,000 steps at N = 2,048 the two runs
  # drift further apart: benchmarks/smallest_mlp.py).
  again = build_mlp('gd', key, fs, cap.width, options=FAST)
  scale = float(np.abs(again.mlp(fs.keys)).max())
  np.testing.assert_allclose(built.mlp(fs.keys), again.mlp(fs.keys),
                             atol=1e-4 * scale)
  # W* taken from `known`: no run to keep, so it is built at W*.
  replayed, cap2 = methods.smallest_mlp('gd', key, fs, options=FAST,
                                        known=[cap.tested])
  assert rebuilt == [cap.width] and cap2.model is None
  assert cap2.width == cap.width and replayed.accuracy == 1.0


def test_smallest_mlp_repairs_a_kept_model_that_misses(sets, monkeypatch):
  # The kept model fails its re-certification (as GD noise could make it):
  # the width grows by one and that MLP is built.
  key, fs = jax.random.key(10), sets[0]
  evaluate_fn, calls = storage.evaluate_fn, []
  def first_misses(fn, factset):
    report = evaluate_fn(fn, factset)
    calls.append(report)
    return report._replace(accuracy=0.5) if len(calls) == 1 else report
  monkeypatch.setattr(storage, 'evaluate_fn', first_misses)
  built, cap = methods.smallest_mlp('gd', key, fs, options=FAST)
  assert len(calls) == 2 and cap.width < max(cap.tested)
  assert built.mlp.w_gate.shape == (16, cap.width + 1)
  assert built.accuracy == 1.0
  assert built.num_params == methods.width_params('gd', 16, cap.width + 1)


def test_baselines_search_up_to_64d():
  # Hebbian ridge plateaus below 1.0 here (d = 16, N = 160): the search
  # grows to the default maximum, 64 d (GD's is 8 d). It starts above 32 d,
  # so it reaches 64 d in one doubling (one compiled width).
  fs = factsets.random_factset(jax.random.key(0), 160, 16, tied=True)
  cap = methods.find_capacity('hebbian_ridge', [jax.random.key(1)], [fs],
                              start=32 * 16 + 1)[0]
  assert cap.width is None and max(cap.tested) == 64 * 16
  assert sorted(cap.tested) == [32 * 16 + 1, 64 * 16]


def test_closed_form_capacity(sets):
  rounds = []
  cap = methods.find_capacity('encoder_decoder', [jax.random.key(0)],
                              sets[:1], options=FAST,
                              on_round=lambda *r: rounds.append(r))[0]
  assert cap.width is not None and cap.num_params > 0
  assert len(rounds) == cap.rounds
  assert {w: a for _, widths, accs in rounds
          for w, a in zip(widths, accs)} == cap.tested
  assert cap.tested[cap.width] == 1.0


def test_errors(sets):
  with pytest.raises(FactStoreError, match='unknown method'):
    methods.find_capacity('svm', [jax.random.key(0)] * 2, sets)
  with pytest.raises(FactStoreError, match='one key per fact set'):
    methods.find_capacity('gd', [jax.random.key(0)], sets)
  other = factsets.random_factset(jax.random.key(0), 32, 16, tied=True)
  with pytest.raises(FactStoreError, match='equal shapes'):
    methods.find_capacity('gd', [jax.random.key(0)] * 2, [sets[0], other])
  with pytest.raises(FactStoreError, match='code_dim'):
    methods.width_params('encoder_decoder_gd', 16, 8)
  for bad in (0, True, 1.5):
    with pytest.raises(FactStoreError, match='chunk_size'):
      methods.MethodOptions(chunk_size=bad)
  for method in ('hebbian_ridge', 'encoder_decoder'):
    with pytest.raises(FactStoreError, match='keep_models is for the GD'):
      methods.find_capacity(method, [jax.random.key(0)], sets[:1],
                            keep_models=True)
  with pytest.raises(FactStoreError, match='keep_models is for the GD'):
    methods.evaluate_batched('ntk', [jax.random.key(0)], sets[:1], [8],
                             keep_models=True)
