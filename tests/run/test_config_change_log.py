"""``config_changes.log`` records a change ``--allow-config-change`` let through only once the
resume it allowed has loaded its checkpoint: a resume refused after all (weights that do not fit
the changed model) leaves no record (real checkpoint files, the trainer's own resume)."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ml.core.state import State
from ml.errors import CheckpointError
from ml.lr_schedulers.builtin import CosineConfig, CosineLRScheduler
from ml.optimizers.builtin import AdamWConfig, AdamWOptimizer
from ml.trainers.base import Session
from tests.tiny import TinyModel, TinyModelConfig, make_parts, train_steps


def _config(hidden: int, lr: float) -> object:
    return OmegaConf.create({"model": {"name": "tiny", "hidden": hidden}, "optimizer": {"lr": lr}})


def _resume(exp_dir: Path, hidden: int, lr: float) -> State:
    """Resumes the run in ``exp_dir`` with a model of width ``hidden`` and learning rate ``lr``,
    changes allowed (``--allow-config-change``)."""
    trainer, _, task, _, _ = make_parts(exp_dir)
    model = TinyModel(TinyModelConfig(name="tiny", hidden=hidden))
    optim = AdamWOptimizer(AdamWConfig(name="adamw", lr=lr)).get(model)
    sched = CosineLRScheduler(CosineConfig(name="cosine", warmup_steps=2, total_steps=10)).get(optim)
    trainer.set_run_config(_config(hidden, lr))
    trainer.allow_config_change = True
    return trainer.resume_or_start(Session(model, task, optim, sched, seed=0))


def test_a_change_is_recorded_once_the_checkpoint_loaded_and_a_refused_resume_records_nothing(
    tmp_path: Path,
) -> None:
    trainer, model, task, optim, sched = make_parts(tmp_path)
    trainer.set_run_config(_config(8, 0.01))
    state = State.init_state()
    train_steps(model, task, optim, sched, state, 2)
    trainer.save_checkpoint(state, task, model, optim, sched)
    log = trainer.run.config_changes

    with pytest.raises(CheckpointError, match="do not fit the model"):
        _resume(tmp_path, hidden=16, lr=0.01)  # allowed, but the weights cannot load
    assert not log.exists()

    assert _resume(tmp_path, hidden=8, lr=0.02).num_steps == 2
    lines = log.read_text().splitlines()
    assert lines[0].endswith("allowed at step 2 (--allow-config-change)")
    assert lines[1:] == ["optimizer.lr: 0.01 -> 0.02"]
