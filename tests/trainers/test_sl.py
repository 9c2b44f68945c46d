"""Tests of the supervised trainer driven from Python (the CLI is covered in tests/e2e)."""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ml.loggers.jsonl import JsonlLogger, JsonlLoggerConfig
from ml.lr_schedulers.builtin import ConstantConfig, ConstantLRScheduler
from ml.optimizers.builtin import AdamConfig, AdamOptimizer
from ml.tasks.sl import SupervisedLearningTaskConfig
from ml.trainers.base import has_lock_file
from ml.trainers.sl import NonFiniteLossError, SupervisedLearningTrainer, SupervisedLearningTrainerConfig
from tests.tiny import TinyModel, TinyModelConfig, TinyTask


def _run(exp_dir: Path, max_steps: int, **trainer: object) -> SupervisedLearningTrainer:
    config = OmegaConf.merge(
        OmegaConf.structured(SupervisedLearningTrainerConfig),
        {"name": "sl", "exp_dir": str(exp_dir), "valid_every_n_steps": 4, **trainer},
    )
    sl = SupervisedLearningTrainer(config)  # type: ignore[arg-type]
    sl.add_logger(JsonlLogger(JsonlLoggerConfig(name="jsonl", write_every_n_steps=1)))
    task = TinyTask(SupervisedLearningTaskConfig(name="tiny", max_steps=max_steps))
    model = TinyModel(TinyModelConfig(name="tiny"))
    sl.train(
        model,
        task,
        AdamOptimizer(AdamConfig(name="adam")),
        ConstantLRScheduler(ConstantConfig(name="constant")),
    )
    return sl


def _records(exp_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (exp_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_trains_validates_tests_and_resumes(tmp_path: Path) -> None:
    trainer = _run(tmp_path, max_steps=6)
    assert {"valid/loss", "test/loss"} <= set(trainer.final_metrics)
    assert (tmp_path / "checkpoints" / "ckpt.6.pt").exists() and (tmp_path / "config.yaml").exists()
    assert not has_lock_file(tmp_path, "running") and has_lock_file(tmp_path, "ckpt")
    train_steps = [r["step"] for r in _records(tmp_path) if r["phase"] == "train"]
    assert train_steps == [1, 2, 3, 4, 5, 6]

    _run(tmp_path, max_steps=10)  # same exp_dir: resumes at step 6
    records = _records(tmp_path)
    train_steps = [r["step"] for r in records if r["phase"] == "train"]
    assert train_steps == list(range(1, 11))
    assert all("train/loss" in r["metrics"] for r in records if r["phase"] == "train")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["ckpt.10.pt", "ckpt.pt"]


def test_a_non_finite_loss_stops_and_names_the_step(tmp_path: Path) -> None:
    config = OmegaConf.merge(
        OmegaConf.structured(SupervisedLearningTrainerConfig), {"name": "sl", "exp_dir": str(tmp_path)}
    )
    trainer = SupervisedLearningTrainer(config)  # type: ignore[arg-type]
    task = TinyTask(SupervisedLearningTaskConfig(name="tiny", max_steps=5))
    model = TinyModel(TinyModelConfig(name="tiny"))
    optimizer = AdamOptimizer(AdamConfig(name="adam", lr=float("inf")))
    with pytest.raises(NonFiniteLossError, match="at step"):
        trainer.train(model, task, optimizer, ConstantLRScheduler(ConstantConfig(name="constant")))
    assert not has_lock_file(tmp_path, "running")  # torn down before the error propagated
