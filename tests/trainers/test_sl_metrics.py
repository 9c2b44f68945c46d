"""What a task logs is right whatever a step is made of, and several validation sets are each
logged under their name.

- Under gradient accumulation (``trainer.batches_per_step``), everything the task or the model
  logs in a step is averaged over the step's micro-batches, weighted by their samples, as the loss
  is: a task logging its loss in bits (``loss / ln 2``) logs exactly ``train/loss / ln 2``, also
  when the step's last micro-batch is short; values logged as numbers or callables too.
- A loss that is not a scalar (``reduction="none"``) stops before the first step with one line
  naming the task and the shape, instead of being summed into the gradient and the logs.
- ``get_dataset("valid")`` may return a dict of datasets: each set is logged as
  ``valid/<name>/<metric>``, all in one record per validation; a dict the trainer cannot use is
  refused before the first step.
"""

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import TensorDataset

from ml.core.state import Phase, State
from ml.errors import ConfigError
from ml.loggers.jsonl import JsonlLogger, JsonlLoggerConfig
from ml.lr_schedulers.builtin import ConstantConfig, ConstantLRScheduler
from ml.models.base import BaseModelConfig
from ml.optimizers.builtin import AdamConfig, AdamOptimizer
from ml.tasks.sl import SupervisedLearningTaskConfig
from ml.trainers.sl import SupervisedLearningTrainer, SupervisedLearningTrainerConfig
from tests.e2e.counting_task import CountingModel, CountingTask, CountingTaskConfig
from tests.tiny import TinyModel, TinyModelConfig, TinyTask


class BitsTask(TinyTask):
    """Logs its loss in bits (a tensor), its batch size (a number) and the loss again (a callable)."""

    def compute_loss(
        self, model: nn.Module, batch: tuple, state: State, output: torch.Tensor
    ) -> torch.Tensor:
        loss = F.cross_entropy(output, batch[1])
        self.logger.log_scalar("bits", loss.detach() / math.log(2), namespace=state.phase)
        self.logger.log_scalar("samples", float(batch[0].shape[0]), namespace=state.phase)
        self.logger.log_scalar("lazy_loss", lambda: loss.detach(), namespace=state.phase)
        return loss


class PerSampleTask(TinyTask):
    def compute_loss(
        self, model: nn.Module, batch: tuple, state: State, output: torch.Tensor
    ) -> torch.Tensor:
        return F.cross_entropy(output, batch[1], reduction="none")


def _train(exp_dir: Path, task: TinyTask, **trainer: object) -> None:
    config = OmegaConf.merge(
        OmegaConf.structured(SupervisedLearningTrainerConfig),
        {"name": "sl", "exp_dir": str(exp_dir), "valid_at_end": False, "test_at_end": False, **trainer},
    )
    sl = SupervisedLearningTrainer(config)  # type: ignore[arg-type]
    sl.add_logger(JsonlLogger(JsonlLoggerConfig(name="jsonl", write_every_n_steps=1)))
    sl.train(
        TinyModel(TinyModelConfig(name="tiny")),
        task,
        AdamOptimizer(AdamConfig(name="adam")),
        ConstantLRScheduler(ConstantConfig(name="constant")),
    )


def _train_records(exp_dir: Path) -> list[dict]:
    lines = (exp_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["phase"] == "train"]


@pytest.mark.parametrize("batches_per_step", [1, 2, 3])
def test_what_a_task_logs_in_a_step_is_averaged_over_its_micro_batches(
    tmp_path: Path, batches_per_step: int
) -> None:
    # 64 samples in batches of 24: micro-batches of 24, 24 and 16, so the weights differ.
    config = SupervisedLearningTaskConfig(name="bits", max_steps=6)
    config.train_dl.batch_size = 24
    config.train_dl.drop_last = False
    _train(tmp_path, BitsTask(config), batches_per_step=batches_per_step)
    records = _train_records(tmp_path)
    assert len(records) == 6
    for record in records:
        metrics = record["metrics"]
        assert metrics["train/bits"] == pytest.approx(metrics["train/loss"] / math.log(2), rel=1e-6), record
        assert metrics["train/lazy_loss"] == pytest.approx(metrics["train/loss"], rel=1e-6), record
    sizes = [record["metrics"]["train/samples"] for record in records]
    if batches_per_step == 3:  # a whole epoch per step: 24, 24, 16 samples
        assert sizes == pytest.approx([(24 * 24 + 24 * 24 + 16 * 16) / 64] * 6)
    elif batches_per_step == 1:
        assert set(sizes) == {24.0, 16.0}


def test_a_loss_that_is_not_a_scalar_stops_before_the_first_step(tmp_path: Path) -> None:
    task = PerSampleTask(SupervisedLearningTaskConfig(name="per_sample", max_steps=5))
    with pytest.raises(
        ConfigError, match=r"PerSampleTask.compute_loss returned 'loss' of shape \(32,\), not a scalar"
    ):
        _train(tmp_path, task)
    assert not (tmp_path / "checkpoints").exists()
    assert not (tmp_path / "logs" / "metrics.jsonl").exists() or not _train_records(tmp_path)


class TwoValidSetsTask(TinyTask):
    """Validation on two named sets: the usual one, and the same points with their labels shifted."""

    def get_dataset(self, phase: str) -> Any:
        data = super().get_dataset(phase)
        if phase != "valid":
            return data
        features, labels = data.tensors  # type: ignore[attr-defined]
        return {"clean": data, "shifted": TensorDataset(features, (labels + 1) % 3)}


class BadValidTask(TinyTask):
    def __init__(self, config: SupervisedLearningTaskConfig, valid: Any) -> None:
        super().__init__(config)
        self.valid = valid

    def get_dataset(self, phase: str) -> Any:
        return self.valid if phase == "valid" else super().get_dataset(phase)


def test_several_validation_sets_are_logged_each_under_its_name(tmp_path: Path) -> None:
    _train(
        tmp_path,
        TwoValidSetsTask(SupervisedLearningTaskConfig(name="two", max_steps=4)),
        valid_every_n_steps=2,
    )
    lines = (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()
    valid = [r for r in map(json.loads, lines) if r["phase"] == "valid"]
    assert [r["step"] for r in valid] == [2, 4]  # one record per validation, every set in it
    for record in valid:
        metrics = record["metrics"]
        assert {"valid/clean/loss", "valid/shifted/loss"} <= set(metrics), metrics
        assert metrics["valid/clean/loss"] != metrics["valid/shifted/loss"]
        assert "valid/loss" not in metrics


@pytest.mark.parametrize(
    ("valid", "message"),
    [
        ({}, "returned an empty dict"),
        ({"a/b": TensorDataset(torch.zeros(2, 4))}, "name each set with a plain string"),
        (TensorDataset(torch.zeros(0, 4)), r"get_dataset\('valid'\) has no samples"),
        ({"ok": TensorDataset(torch.zeros(2, 4)), "empty": []}, r"\['empty'\] has no samples"),
        (
            {"ok": [1, 2, 3], "bad": 5},
            r"get_dataset\('valid'\)\['bad'\] returned int, not a map-style Dataset",
        ),
    ],
)
def test_validation_sets_the_trainer_cannot_use_are_refused_before_the_first_step(
    tmp_path: Path, valid: Any, message: str
) -> None:
    task = BadValidTask(SupervisedLearningTaskConfig(name="bad", max_steps=4), valid)
    with pytest.raises(ConfigError, match=message):
        _train(tmp_path, task, valid_every_n_steps=2)
    assert not (tmp_path / "checkpoints").exists()


class EmptyTestTask(TinyTask):
    def get_dataset(self, phase: str) -> Any:
        return TensorDataset(torch.zeros(0, 4)) if phase == "test" else super().get_dataset(phase)


def test_an_empty_set_is_refused_only_for_a_phase_that_runs(tmp_path: Path) -> None:
    config = SupervisedLearningTaskConfig(name="t", max_steps=2)
    _train(tmp_path / "no_test", EmptyTestTask(config), test_at_end=False)  # never tested: trains
    assert (tmp_path / "no_test" / "checkpoints" / "ckpt.pt").exists()
    with pytest.raises(ConfigError, match=r"get_dataset\('test'\) has no samples"):
        _train(tmp_path / "tested", EmptyTestTask(config), test_at_end=True)
    assert not (tmp_path / "tested" / "checkpoints").exists()


def test_dropping_evaluation_samples_under_fsdp_is_refused_before_the_first_step(tmp_path: Path) -> None:
    """A process left without a batch (drop_last) had nothing to join the others' collective forward
    passes with: it crashed with a traceback after training."""
    config = SupervisedLearningTaskConfig(name="tiny", max_steps=4)
    config.valid_dl.drop_last = True
    with pytest.raises(ConfigError, match=r"task\.valid_dl\.drop_last=true under trainer\.parallel=fsdp"):
        _train(tmp_path, TinyTask(config), valid_every_n_steps=2, parallel="fsdp")
    assert not (tmp_path / "checkpoints").exists()


def test_an_evaluation_set_smaller_than_the_processes_under_fsdp_is_refused_before_the_first_step(
    tmp_path: Path,
) -> None:
    """Under FSDP every process must evaluate a batch or more; with one process only an empty set is
    smaller than the processes."""
    task = BadValidTask(
        SupervisedLearningTaskConfig(name="bad", max_steps=4), TensorDataset(torch.zeros(0, 4))
    )
    with pytest.raises(ConfigError, match=r"has 0 samples, fewer than the 1 processes: under FSDP"):
        _train(tmp_path, task, valid_every_n_steps=2, parallel="fsdp")
    assert not (tmp_path / "checkpoints").exists()


class NoisyLossTask(TinyTask):
    """Its loss draws from torch's generator, in training and in evaluation alike."""

    def compute_loss(self, model: Any, batch: Any, state: State, output: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output * (1 + 0.5 * torch.randn(())), batch[1])


def test_evaluations_draw_from_generators_of_their_own(tmp_path: Path) -> None:
    """Validation drew from training's generators: how often it ran changed the training's draws
    (and a validation abandoned by a stop signal and redone on resume broke exact resume)."""
    for every in (2, 3):
        torch.manual_seed(0)  # the same initial weights
        _train(tmp_path / str(every), NoisyLossTask(SupervisedLearningTaskConfig(name="n", max_steps=6)),
               valid_every_n_steps=every)  # fmt: skip
    weights = [
        torch.load(tmp_path / str(every) / "checkpoints" / "ckpt.pt", weights_only=True)["model"]
        for every in (2, 3)
    ]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    valid_at_6 = [
        next(
            r["metrics"]["valid/loss"]
            for r in map(
                json.loads, (tmp_path / str(every) / "logs" / "metrics.jsonl").read_text().splitlines()
            )
            if r["phase"] == "valid" and r["step"] == 6
        )
        for every in (2, 3)
    ]
    assert valid_at_6[0] == valid_at_6[1]  # the step's own draws, whatever ran before


def _counting_run(
    tmp_path: Path, task_class: type[CountingTask] = CountingTask, **trainer: object
) -> dict[str, float]:
    """Trains the counting task 4 steps at lr 0, validating at step 4 over 0..6 in batches of 2
    ([0, 1], [2, 3], [4, 5], [6]); returns the validation's record."""
    config = CountingTaskConfig(name="counting", max_steps=4, n_valid=7, some_at=5.0)
    config.train_dl.batch_size = 3
    config.valid_dl.batch_size = 2
    sl = SupervisedLearningTrainer(
        OmegaConf.merge(  # type: ignore[arg-type]
            OmegaConf.structured(SupervisedLearningTrainerConfig),
            {
                "name": "sl",
                "exp_dir": str(tmp_path),
                "valid_every_n_steps": 4,
                "test_at_end": False,
                **trainer,
            },
        )
    )
    sl.add_logger(JsonlLogger(JsonlLoggerConfig(name="jsonl", write_every_n_steps=1)))
    constant = ConstantLRScheduler(ConstantConfig(name="constant"))
    model = CountingModel(BaseModelConfig(name="counting"))
    sl.train(model, task_class(config), AdamOptimizer(AdamConfig(name="adam", lr=0.0)), constant)
    lines = (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()
    (valid,) = [r["metrics"] for r in map(json.loads, lines) if r["phase"] == "valid"]
    return valid


class TwoCountingSetsTask(CountingTask):
    """Validation on 0..6 (``low``) and on 10..16 (``high``)."""

    def get_dataset(self, phase: Phase) -> Any:
        data = super().get_dataset(phase)
        if phase != "valid":
            return data
        return {"low": data, "high": TensorDataset(data.tensors[0] + 10)}


def test_what_the_model_logs_on_named_validation_sets_is_kept_for_each_set(tmp_path: Path) -> None:
    """A key without the phase's prefix (``model/mean``) kept only the last set's value."""
    valid = _counting_run(tmp_path, TwoCountingSetsTask)
    assert valid["valid/low/loss"] == pytest.approx(3.0) and valid["valid/high/loss"] == pytest.approx(13.0)
    assert valid["model/low/mean"] == pytest.approx(3.0)
    assert valid["model/high/mean"] == pytest.approx(13.0)
    assert "model/mean" not in valid


def test_what_some_validation_batches_log_is_their_mean_and_the_model_s_values_the_set_s_mean(
    tmp_path: Path,
) -> None:
    valid = _counting_run(tmp_path)
    assert valid["valid/loss"] == pytest.approx(3.0)  # the mean of 0..6
    assert valid["model/mean"] == pytest.approx(3.0)  # what the model logs for each batch, averaged too
    assert valid["valid/some"] == pytest.approx(4.5)  # logged for the batch [4, 5] only


def test_a_tensor_of_several_elements_logged_under_accumulation_is_refused(tmp_path: Path) -> None:
    """As it is without accumulation, instead of being summed into a number."""

    class LogsAPair(BitsTask):
        def compute_loss(
            self, model: nn.Module, batch: tuple, state: State, output: torch.Tensor
        ) -> torch.Tensor:
            self.logger.log_scalar("pair", output[:2, 0].detach(), namespace=state.phase)
            return super().compute_loss(model, batch, state, output)

    with pytest.raises(ValueError, match=r"a logged scalar must have one element, got shape \(2,\)"):
        _train(
            tmp_path, LogsAPair(SupervisedLearningTaskConfig(name="pair", max_steps=2)), batches_per_step=2
        )


@pytest.mark.parametrize(
    ("limits", "trainer"),
    [
        ({"max_epochs": 2}, {}),
        (  # the constant loss does not improve: stopped at the second validation, step 4
            {"max_steps": 20},
            {"valid_every_n_steps": 2, "early_stopping": {"monitor": "valid/loss", "patience": 1}},
        ),
    ],
    ids=["max_epochs", "early_stopping"],
)
def test_the_last_training_step_is_written_when_epochs_or_early_stopping_end_the_run(
    tmp_path: Path, limits: dict, trainer: dict
) -> None:
    config = CountingTaskConfig(name="counting", **limits)
    config.train_dl.batch_size = 3
    sl = SupervisedLearningTrainer(
        OmegaConf.merge(  # type: ignore[arg-type]
            OmegaConf.structured(SupervisedLearningTrainerConfig),
            {"name": "sl", "exp_dir": str(tmp_path), "test_at_end": False, **trainer},
        )
    )
    sl.add_logger(JsonlLogger(JsonlLoggerConfig(name="jsonl", write_every_n_steps=100)))
    model = CountingModel(BaseModelConfig(name="counting"))
    adam, constant = (
        AdamOptimizer(AdamConfig(name="adam", lr=0.0)),
        ConstantLRScheduler(ConstantConfig(name="constant")),
    )
    sl.train(model, CountingTask(config), adam, constant)
    records = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["phase"] == "train"]
    if "early_stopping" in trainer:  # each validation's step is written first, the last (4) among them
        assert train_steps == [1, 2, 4]
    else:  # 10 samples, 3 a batch (the short last one dropped): 3 steps an epoch
        assert train_steps == [1, 6]
