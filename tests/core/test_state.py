"""Tests for :mod:`ml.core.state`: JSON round trip, strict loading, phases."""

import json
import time

import pytest

from ml.core.state import PHASES, State


def test_json_round_trip_keeps_every_field() -> None:
    state = State(
        num_epochs=2,
        num_steps=150,
        num_epoch_steps=17,
        num_samples=9600,
        num_epoch_samples=1088,
        num_valid_steps=12,
        num_test_steps=3,
        start_time_s=1_700_000_000.25,
        elapsed_time_s=42.5,
        phase="valid",
    )
    text = state.to_json()
    assert json.loads(text)["num_steps"] == 150  # plain JSON, readable by anything
    restored = State.from_json(text)
    assert restored == state
    assert restored.phase == "valid"
    assert not restored.training


def test_from_dict_rejects_unknown_fields() -> None:
    data = json.loads(State().to_json())
    data["num_stpes"] = 3
    with pytest.raises(ValueError, match="unknown State fields \\['num_stpes'\\]"):
        State.from_dict(data)


def test_from_dict_accepts_the_older_raw_phase_key() -> None:
    state = State.from_dict({"num_steps": 5, "raw_phase": "test"})
    assert state.phase == "test"
    assert state.num_steps == 5
    # When both are present, `phase` wins.
    assert State.from_dict({"phase": "valid", "raw_phase": "test"}).phase == "valid"


def test_missing_fields_take_their_defaults() -> None:
    before = time.time()
    state = State.from_dict({"num_steps": 7})
    assert state.num_steps == 7
    assert state.num_epochs == 0
    assert state.phase == "train"
    assert state.start_time_s >= before


def test_bad_phase_is_rejected_everywhere() -> None:
    with pytest.raises(ValueError, match="phase must be one of"):
        State(phase="training")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="phase must be one of"):
        State.from_dict({"phase": "eval"})
    with pytest.raises(ValueError, match="phase must be one of"):
        State.from_dict({"raw_phase": "eval"})
    state = State()
    with pytest.raises(ValueError, match="phase must be one of"):
        state.set_phase("Train")
    assert state.phase == "train"  # unchanged after the rejected call


def test_set_phase_and_training() -> None:
    state = State.init_state()
    assert PHASES == ("train", "valid", "test")
    assert state.training
    for phase in PHASES:
        state.set_phase(phase)
        assert state.phase == phase
        assert state.training == (phase == "train")


def test_init_state_starts_the_clock_now() -> None:
    before = time.time()
    state = State.init_state()
    assert before <= state.start_time_s <= time.time()
    assert state.elapsed_time_s == 0.0
    assert state.num_steps == 0
