"""The rounds journal: a killed capacity search resumes where it stopped."""

from __future__ import annotations

import json

import jax
import pytest

from factstore_jax import factsets, training
from factstore_jax.capacity import methods
from factstore_jax.capacity.rounds import RoundLog

CELL = ['spike_0', 8, 16, 'gd']


def test_known_and_seconds_per_seed_and_setup(tmp_path):
  log = RoundLog(tmp_path / 'sub' / 'rounds.jsonl')
  assert log.known(CELL, [0], [{}]) == [{}]
  assert log.seconds(CELL, [0], [{}]) == [0.0]
  setups = [dict(max_steps=100), dict(max_steps=100)]
  record = log.recorder(CELL, [3, 4], setups)
  record([0, 1, 0], [10, 10, 20], [0.5, 0.25, 1.0])
  assert log.known(CELL, [3, 4], setups) == [{10: 0.5, 20: 1.0}, {10: 0.25}]
  assert log.known(CELL, [4], setups[1:]) == [{10: 0.25}]
  # Another setup, another cell: nothing to replay.
  assert log.known(CELL, [3], [dict(max_steps=200)]) == [{}]
  assert log.known(CELL[:3] + ['ntk'], [3], setups[:1]) == [{}]
  lines = [json.loads(x) for x in open(log.path)]
  assert len(lines) == 3 and all(x['seconds'] >= 0 for x in lines)
  # The round's time is split over its three widths.
  assert len({x['seconds'] for x in lines}) == 1
  # A width logged again by a second run counts once; a cut line is skipped.
  with open(log.path, 'a') as f:
    f.write(json.dumps(dict(lines[0], seconds=99.0)) + '\n')
    f.write('{"cell": ["spike_0", 8, 16, "gd"], "seed": 3, "wid')
  got = log.seconds(CELL, [3, 4], setups)
  assert got[0] == pytest.approx(2 * lines[0]['seconds'])
  assert got[1] == pytest.approx(lines[1]['seconds'])
  assert log.known(CELL, [3], setups[:1]) == [{10: 0.5, 20: 1.0}]
  # The next round after the cut line starts on a line of its own.
  record([1], [40], [1.0])
  assert log.known(CELL, [4], setups[1:]) == [{10: 0.25, 40: 1.0}]


def test_resume_gives_known_seconds_and_a_recorder(tmp_path):
  log = RoundLog(tmp_path / 'rounds.jsonl')
  setups = [dict(max_steps=100), dict(max_steps=100)]
  log.recorder(CELL, [3, 4], setups)([0, 1, 0], [10, 10, 20],
                                     [0.5, 0.25, 1.0])
  kwargs, seconds = log.resume(CELL, [3, 4], setups)
  assert kwargs['known'] == [{10: 0.5, 20: 1.0}, {10: 0.25}]
  assert seconds == log.seconds(CELL, [3, 4], setups)
  lines = [json.loads(x) for x in open(log.path)]
  assert seconds[0] == pytest.approx(2 * lines[0]['seconds'])
  kwargs['on_round']([1], [30], [1.0])
  assert log.known(CELL, [4], setups[1:]) == [{10: 0.25, 30: 1.0}]


def test_one_setup_per_seed_is_required(tmp_path):
  log = RoundLog(tmp_path / 'rounds.jsonl')
  with pytest.raises(ValueError, match='one setup per seed'):
    log.known(CELL, [0, 1], [{}])
  with pytest.raises(ValueError, match='one setup per seed'):
    log.recorder(CELL, [0], [{}, {}])


class _Killed(Exception):
  pass


def test_a_killed_gd_search_resumes_from_the_journal(tmp_path):
  fs = factsets.random_factset(jax.random.key(0), 16, 8, tied=True,
                               mapping='permutation')
  key = jax.random.key(1)
  options = methods.MethodOptions(train=training.TrainConfig(max_steps=300))
  setups = [dict(max_steps=300)]
  full = methods.find_capacity('gd', [key], [fs], options=options)[0]
  assert full.width is not None and len(full.tested) >= 3

  log = RoundLog(tmp_path / 'rounds.jsonl')
  record = log.recorder(CELL, [0], setups)
  rounds = []

  def killed_after_two(members, widths, accs):
    record(members, widths, accs)
    rounds.append(widths)
    if len(rounds) == 2:
      raise _Killed
  with pytest.raises(_Killed):
    methods.find_capacity('gd', [key], [fs], options=options,
                          on_round=killed_after_two)
  known = log.known(CELL, [0], setups)
  assert sorted(known[0]) == sorted(w for ws in rounds for w in ws)

  fresh = []
  resumed = methods.find_capacity(
      'gd', [key], [fs], options=options, known=known,
      on_round=lambda m, widths, a: fresh.extend(widths))[0]
  # Same answer and same tested widths; only the rest were trained.
  assert resumed.width == full.width and resumed.tested == full.tested
  assert sorted(fresh) == sorted(set(full.tested) - set(known[0]))
  assert fresh  # the good path trained something after the replay
