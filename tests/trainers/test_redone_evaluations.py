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
from ml.tasks.sl import SupervisedLearningTaskConfig
from ml.trainers import gan as gan_trainer
from ml.trainers import sl as sl_trainer
from ml.trainers.base import BaseTrainer, Session
from ml.trainers.gan import GanTrainer, GanTrainerConfig
from ml.trainers.rl import ReinforcementLearningTrainer, ReinforcementLearningTrainerConfig
from ml.trainers.sl import SupervisedLearningTrainer, SupervisedLearningTrainerConfig
from tests.tiny import TinyTask
from tests.trainers.test_gan import EvaluatingTinyGanTask, TinyGanTaskConfig

STEP = 6


def _trainer(name: str, exp_dir: Path, **settings: Any) -> BaseTrainer:
    cls, config_cls = {
        "sl": (SupervisedLearningTrainer, SupervisedLearningTrainerConfig),
        "gan": (GanTrainer, GanTrainerConfig),
        "rl": (ReinforcementLearningTrainer, ReinforcementLearningTrainerConfig),
    }[name]
    config = OmegaConf.merge(
        OmegaConf.structured(config_cls), {"name": name, "exp_dir": str(exp_dir), **settings}
    )
    return cls(config)  # type: ignore[abstract]


def _session(name: str, max_steps: int) -> Session:
    """The continued session, as far as the rule reads it: its task's limits and its evaluation data
    (the loaders are not read: a set stands for one)."""
    if name == "sl":
        task = TinyTask(SupervisedLearningTaskConfig(name="tiny", max_steps=max_steps))
        parts: dict[str, Any] = {
            "train_loader": None,
            "valid_loaders": {"": "set"},
            "test_loaders": {"": "set"},
        }
        return sl_trainer._Session(None, task, None, None, 0, runner=None, evaluator=None, **parts)
    if name == "gan":
        gan_task = EvaluatingTinyGanTask(TinyGanTaskConfig(name="tiny_gan", max_steps=max_steps))
        return gan_trainer._Session(None, gan_task, None, None, 0, parts={}, train_loader=None)
    from ml.examples.classic_control import ClassicControlTask
    from ml.tasks.ppo import PPOTaskConfig

    rl_task = ClassicControlTask(PPOTaskConfig(name="cartpole", env_id="CartPole-v1", max_steps=max_steps))
    return Session(None, rl_task, None, None, 0)


def _validated(trainer: Any, step: int) -> None:
    """What each trainer's own validation (rl: evaluation) records when it completes at ``step``."""
    if isinstance(trainer, SupervisedLearningTrainer):
        trainer._last_valid = (step, 0.0)
    elif isinstance(trainer, GanTrainer):
        trainer._last_valid_step = step
    else:
        trainer._last_eval_step = step


def _resumed(
    name: str,
    tmp_path: Path,
    *,
    validated_at: int,
    finished: bool = False,
    max_steps: int = STEP,
    **continued: Any,
) -> frozenset[str]:
    """The checkpoint extras a trainer saves at STEP, read back by a new trainer (as on resume) whose
    run ends at ``max_steps`` with the trainer settings ``continued``."""
    saving = _trainer(name, tmp_path)
    _validated(saving, validated_at)
    saving.finished = finished
    ckpt: dict[str, Any] = {"state": State(num_steps=STEP).to_json()}
    saving.update_state_dict(ckpt)
    resuming = _trainer(name, tmp_path, **continued)
    resuming.load_state_dict(ckpt)
    return resuming.redone_evaluations(ckpt, State(num_steps=STEP), _session(name, max_steps))


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
    ckpt = {"state": State(num_steps=STEP).to_json()}
    assert trainer.redone_evaluations(ckpt, State(num_steps=STEP), _session("sl", STEP)) == {"test"}


@pytest.mark.parametrize("name", ["sl", "gan", "rl"])
def test_a_record_this_session_does_not_log_again_is_kept(name: str, tmp_path: Path) -> None:
    """Continued without the final evaluations, or past the step: nothing evaluates it again, so the
    killed process's records of it are the only ones there will be."""
    at_end = {"eval_at_end" if name == "rl" else "valid_at_end": False}
    assert "valid" not in _resumed(name, tmp_path, validated_at=STEP - 2, **at_end)
    assert "valid" not in _resumed(name, tmp_path, validated_at=STEP - 2, max_steps=STEP + 4)
    if name == "sl":
        assert _resumed(name, tmp_path, validated_at=STEP, test_at_end=False) == frozenset()
        assert _resumed(name, tmp_path, validated_at=STEP, max_steps=STEP + 4) == frozenset()


def test_a_validation_a_stop_signal_abandoned_is_redone_even_mid_run(tmp_path: Path) -> None:
    saving = _trainer("sl", tmp_path)
    assert isinstance(saving, SupervisedLearningTrainer)
    saving._abandoned_valid = STEP
    ckpt: dict[str, Any] = {"state": State(num_steps=STEP).to_json()}
    saving.update_state_dict(ckpt)
    resuming = _trainer("sl", tmp_path)
    resuming.load_state_dict(ckpt)
    redone = resuming.redone_evaluations(ckpt, State(num_steps=STEP), _session("sl", STEP + 4))
    assert redone == {"valid"}
