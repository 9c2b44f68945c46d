"""Tests of :meth:`BaseTrainer.redone_evaluations`: which evaluations of a checkpoint's step it does
not cover, read from the checkpoints the ``sl``, ``gan`` and ``rl`` trainers really write.

Each trainer's finish validates the last step after that step's checkpoint may be saved (by the
loop, or by the finish itself before the final evaluations) and saves it again after; a ``kill -9``
in between leaves a record the continued run logs again. (The whole path, killed for real:
tests/e2e/test_eval_records_after_kill.py.)
"""

from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from ml.core.state import State
from ml.trainers.base import BaseTrainer
from ml.trainers.gan import GanTrainer, GanTrainerConfig
from ml.trainers.rl import ReinforcementLearningTrainer, ReinforcementLearningTrainerConfig
from ml.trainers.sl import SupervisedLearningTrainer, SupervisedLearningTrainerConfig

STEP = 6


def _trainer(name: str, exp_dir: Path) -> BaseTrainer:
    cls, config_cls = {
        "sl": (SupervisedLearningTrainer, SupervisedLearningTrainerConfig),
        "gan": (GanTrainer, GanTrainerConfig),
        "rl": (ReinforcementLearningTrainer, ReinforcementLearningTrainerConfig),
    }[name]
    config = OmegaConf.merge(OmegaConf.structured(config_cls), {"name": name, "exp_dir": str(exp_dir)})
    return cls(config)  # type: ignore[abstract]


def _validated(trainer: Any, step: int) -> None:
    """What each trainer's own validation (rl: evaluation) records when it completes at ``step``."""
    if isinstance(trainer, SupervisedLearningTrainer):
        trainer._last_valid = (step, 0.0)
    elif isinstance(trainer, GanTrainer):
        trainer._last_valid_step = step
    else:
        trainer._last_eval_step = step


def _resumed(name: str, tmp_path: Path, *, validated_at: int, finished: bool = False) -> frozenset[str]:
    """The checkpoint extras a trainer saves at STEP, read back by a new trainer (as on resume)."""
    saving = _trainer(name, tmp_path)
    _validated(saving, validated_at)
    saving.finished = finished
    ckpt: dict[str, Any] = {"state": State(num_steps=STEP).to_json()}
    saving.update_state_dict(ckpt)
    resuming = _trainer(name, tmp_path)
    resuming.load_state_dict(ckpt)
    return resuming.redone_evaluations(ckpt, State(num_steps=STEP))


@pytest.mark.parametrize("name", ["sl", "gan", "rl"])
def test_a_step_validated_after_its_checkpoint_is_redone(name: str, tmp_path: Path) -> None:
    assert "valid" in _resumed(name, tmp_path, validated_at=STEP - 2)  # the checkpoint came first
    assert "valid" not in _resumed(name, tmp_path, validated_at=STEP)  # it says the step was validated


def test_the_test_is_redone_unless_the_checkpoint_says_the_run_finished(tmp_path: Path) -> None:
    assert _resumed("sl", tmp_path, validated_at=STEP) == {"test"}
    assert _resumed("sl", tmp_path, validated_at=STEP, finished=True) == frozenset()


def test_a_checkpoint_that_records_no_validation_keeps_its_validations(tmp_path: Path) -> None:
    """A checkpoint from before these keys, or a user trainer's that keeps none."""
    trainer = _trainer("sl", tmp_path)
    assert trainer.redone_evaluations({"state": State(num_steps=STEP).to_json()}, State(num_steps=STEP)) == {
        "test"
    }
