"""Tests of the supervised trainer driven from Python (the CLI is covered in tests/e2e)."""

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ml.core.compose import ConfigError
from ml.loggers.jsonl import JsonlLogger, JsonlLoggerConfig
from ml.lr_schedulers.builtin import ConstantConfig, ConstantLRScheduler
from ml.optimizers.builtin import AdamConfig, AdamOptimizer, SGDConfig, SGDOptimizer
from ml.tasks.sl import DataLoaderConfig, SupervisedLearningTaskConfig
from ml.trainers.base import has_lock_file
from ml.trainers.sl import NonFiniteLossError, SupervisedLearningTrainer, SupervisedLearningTrainerConfig
from ml.utils.checkpoint import CheckpointError, unwrap_model
from ml.utils.streaming import shard_of_stream
from tests.tiny import TinyModel, TinyModelConfig, TinyTask


def _run(
    exp_dir: Path, max_steps: int, *, jsonl: JsonlLoggerConfig | None = None, **trainer: object
) -> SupervisedLearningTrainer:
    config = OmegaConf.merge(
        OmegaConf.structured(SupervisedLearningTrainerConfig),
        {"name": "sl", "exp_dir": str(exp_dir), "valid_every_n_steps": 4, **trainer},
    )
    sl = SupervisedLearningTrainer(config)  # type: ignore[arg-type]
    sl.add_logger(JsonlLogger(jsonl or JsonlLoggerConfig(name="jsonl", write_every_n_steps=1)))
    _fit(sl, max_steps)
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


def test_the_last_step_is_written_whatever_the_interval(tmp_path: Path) -> None:
    """A run shorter than the logger's interval still records its final training values."""
    _run(tmp_path, max_steps=7, jsonl=JsonlLoggerConfig(name="jsonl", write_every_n_seconds=3600))
    train = [r for r in _records(tmp_path) if r["phase"] == "train"]
    assert [r["step"] for r in train] == [1, 7]  # the first write, then the last step
    assert "train/loss" in train[-1]["metrics"]


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


def _trainer(exp_dir: Path, **trainer: object) -> SupervisedLearningTrainer:
    config = OmegaConf.merge(
        OmegaConf.structured(SupervisedLearningTrainerConfig),
        {"name": "sl", "exp_dir": str(exp_dir), **trainer},
    )
    sl = SupervisedLearningTrainer(config)  # type: ignore[arg-type]
    sl.add_logger(JsonlLogger(JsonlLoggerConfig(name="jsonl", write_every_n_steps=1)))
    return sl


def _fit_task(trainer: SupervisedLearningTrainer, task: TinyTask, sgd: bool = False) -> TinyModel:
    """Trains a seeded TinyModel on ``task`` with Adam (or SGD at 0.1); returns the model."""
    torch.manual_seed(0)
    model = TinyModel(TinyModelConfig(name="tiny"))
    optimizer = SGDOptimizer(SGDConfig(name="sgd", lr=0.1)) if sgd else AdamOptimizer(AdamConfig(name="adam"))
    trainer.train(model, task, optimizer, ConstantLRScheduler(ConstantConfig(name="constant")))
    return model


def _fit(
    trainer: SupervisedLearningTrainer, max_steps: int, task_cls: type = TinyTask, sgd: bool = False
) -> None:
    _fit_task(trainer, task_cls(SupervisedLearningTaskConfig(name="tiny", max_steps=max_steps)), sgd=sgd)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_resumes_from_an_fp32_checkpoint(tmp_path: Path, precision: str) -> None:
    _fit(_trainer(tmp_path), max_steps=3)  # an fp32 checkpoint: no grad scaler in it
    trainer = _trainer(tmp_path, precision=precision, clip_grad_norm=1.0)
    _fit(trainer, max_steps=6)
    ckpt = torch.load(tmp_path / "checkpoints" / "ckpt.6.pt", weights_only=True)
    assert ("grad_scaler" in ckpt) == (precision == "fp16")
    records = [r for r in _records(tmp_path) if r["phase"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["metrics"]["train/loss"]) for r in records)
    assert all("trainer/grad_norm" in r["metrics"] for r in records[3:])
    if precision == "fp16":
        scale = ckpt["grad_scaler"]["scale"]
        _fit(_trainer(tmp_path, precision="fp16"), max_steps=7)
        assert trainer.precision.scaler is not None and scale > 0


def test_double_precision_weights(tmp_path: Path) -> None:
    _fit(_trainer(tmp_path, use_double_weight_precision=True), max_steps=2)
    ckpt = torch.load(tmp_path / "checkpoints" / "ckpt.pt", weights_only=True)
    assert all(v.dtype == torch.float64 for v in ckpt["model"].values() if v.is_floating_point())


def test_a_non_finite_loss_can_skip_the_step(tmp_path: Path) -> None:
    class SometimesNaN(TinyTask):
        def compute_loss(self, model, batch, state, output):  # type: ignore[no-untyped-def]
            loss = super().compute_loss(model, batch, state, output)
            return loss * float("nan") if state.num_steps == 1 else loss

    # The checkpoint at step 3 reads the record (a stop would be due before it), between writes.
    config = {"non_finite_loss": "skip", "checkpoint": {"save_every_n_steps": 3}}
    trainer = SupervisedLearningTrainer(
        OmegaConf.merge(
            OmegaConf.structured(SupervisedLearningTrainerConfig), {"exp_dir": str(tmp_path), **config}
        )
    )
    trainer.add_logger(JsonlLogger(JsonlLoggerConfig(name="jsonl", write_every_n_steps=5)))
    _fit(trainer, max_steps=7, task_cls=SometimesNaN)
    ckpt = torch.load(tmp_path / "checkpoints" / "ckpt.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert trainer.num_skipped_steps == 1 and ckpt["skipped_steps"] == 1  # counted, and kept on resume
    records = [r for r in _records(tmp_path) if r["phase"] == "train"]
    # Every write from the skip on carries the count, whatever read the record first.
    skipped = [(r["step"], r["metrics"].get("trainer/skipped_steps")) for r in records]
    assert skipped == [(1, None), (6, 1), (7, 1)]


class InfGradientInLastLayer(TinyTask):
    """A finite loss whose gradient becomes infinite in the model's last layer (``net.3``) at step 2."""

    def compute_loss(self, model, batch, state, output):  # type: ignore[no-untyped-def]
        loss = super().compute_loss(model, batch, state, output)
        if state.num_steps == 1:
            layer = unwrap_model(model).net[3].weight
            layer.register_hook(lambda grad: grad * float("inf"))
        return loss


@pytest.mark.parametrize("sgd", [False, True], ids=["fused_adam_on_the_device", "sgd_on_the_host"])
@pytest.mark.parametrize(
    "checked", [{"clip_grad_norm": 1.0}, {"check_grads": True}], ids=["clip", "check_grads"]
)
def test_a_non_finite_gradient_stops_and_names_the_step_and_module(
    tmp_path: Path, checked: dict, sgd: bool
) -> None:
    trainer = _trainer(tmp_path, **checked)  # clipping must not hide which module it was
    with pytest.raises(NonFiniteLossError) as error:
        _fit(trainer, max_steps=5, task_cls=InfGradientInLastLayer, sgd=sgd)
    message = str(error.value)
    assert "at step 2" in message and "first non-finite gradient in `net.3`" in message
    assert "trainer.non_finite_loss=skip" in message


class InfGradientBesideAFrozenBias(InfGradientInLastLayer):
    """As :class:`InfGradientInLastLayer`, with the first layer's bias frozen (as fine-tuning does)."""

    def compute_loss(self, model, batch, state, output):  # type: ignore[no-untyped-def]
        unwrap_model(model).net[0].bias.requires_grad_(False)
        return super().compute_loss(model, batch, state, output)


@pytest.mark.parametrize("sgd", [False, True], ids=["fused_adam_on_the_device", "sgd_on_the_host"])
def test_the_module_is_named_when_some_parameters_are_frozen(tmp_path: Path, sgd: bool) -> None:
    """The record named a module only when every parameter had a gradient: one frozen parameter
    anywhere and no stop named its module."""
    trainer = _trainer(tmp_path, check_grads=True)
    with pytest.raises(NonFiniteLossError, match=r"at step 2 .*first non-finite gradient in `net\.3`"):
        _fit(trainer, max_steps=5, task_cls=InfGradientBesideAFrozenBias, sgd=sgd)


@pytest.mark.parametrize(
    "checked", [{"clip_grad_norm": 1.0}, {"check_grads": True}], ids=["clip", "check_grads"]
)
def test_a_non_finite_gradient_can_skip_the_step(tmp_path: Path, checked: dict) -> None:
    trainer = _trainer(tmp_path, non_finite_loss="skip", **checked)
    _fit(trainer, max_steps=4, task_cls=InfGradientInLastLayer)
    assert trainer.num_skipped_steps == 3  # the hook stays: steps 2, 3 and 4
    ckpt = torch.load(tmp_path / "checkpoints" / "ckpt.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


class OverflowsAtStep2(TinyTask):
    """Finite losses and gradients, but step 2's update leaves an infinite weight (as a learning rate
    that overflows does, or Adam with ``eps=0`` on a zero gradient)."""

    def on_step_end(self, state, loss_dict, model, optim, lr_sched):  # type: ignore[no-untyped-def]
        super().on_step_end(state, loss_dict, model, optim, lr_sched)
        if state.num_steps == 2:
            with torch.no_grad():
                unwrap_model(model).net[3].weight.fill_(float("inf"))


@pytest.mark.parametrize(
    "checked", [{"clip_grad_norm": 1.0}, {"check_grads": True}], ids=["clip", "check_grads"]
)
def test_weights_an_update_overflowed_are_never_saved_even_with_checked_gradients(
    tmp_path: Path, checked: dict[str, object]
) -> None:
    """With the gradients checked at every step the weights were taken to be finite: a run with
    ``skip`` skipped every later step, saved the infinite weights and ended as if fine."""
    trainer = _trainer(tmp_path, non_finite_loss="skip", **checked)
    with pytest.raises(NonFiniteLossError, match="weights themselves are no longer finite") as error:
        _fit(trainer, max_steps=6, task_cls=OverflowsAtStep2)
    assert "check_grads=true" not in str(error.value)  # they were checked
    for path in (tmp_path / "checkpoints").glob("ckpt.*.pt"):
        model = torch.load(path, weights_only=True)["model"]
        assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point()), path


class NaNInputAtStep2(TinyTask):
    """A batch that is not finite at step 2: its update is skipped, but the model's batch norm
    took it into its running statistics in the forward pass."""

    def run_model(self, model, batch, state):  # type: ignore[no-untyped-def]
        if state.num_steps + 1 == 2:
            batch = (batch[0] * float("nan"), batch[1])
        return super().run_model(model, batch, state)


def test_running_statistics_that_are_no_longer_finite_are_never_saved(tmp_path: Path) -> None:
    """Only the parameters were checked before a checkpoint: a skipped step's NaN running statistics
    were saved and the run ended as if fine (its model then evaluates to NaN)."""
    trainer = _trainer(tmp_path, non_finite_loss="skip")
    with pytest.raises(NonFiniteLossError, match="running statistics"):
        _fit(trainer, max_steps=5, task_cls=NaNInputAtStep2)
    for path in (tmp_path / "checkpoints").glob("ckpt.*.pt"):
        model = torch.load(path, weights_only=True)["model"]
        assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point()), path


@pytest.mark.parametrize("every_step", [False, True], ids=["no_checkpoint_due", "checkpoint_every_step"])
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_an_unchecked_non_finite_gradient_is_not_skipped_forever(
    tmp_path: Path, policy: str, every_step: bool
) -> None:
    """By default the gradients are not checked at every step (only the loss): step 2's infinite
    gradient is applied, the weights turn NaN, and step 3's loss is NaN. That stops the run under
    either policy (skipping cannot mend the weights), saying how to catch step 2 itself; and a
    checkpoint due at step 2 is refused rather than saved with those weights."""
    checkpoint = {"checkpoint": {"save_every_n_steps": 1}} if every_step else {}
    trainer = _trainer(tmp_path, non_finite_loss=policy, **checkpoint)
    with pytest.raises(NonFiniteLossError) as error:
        _fit(trainer, max_steps=6, task_cls=InfGradientInLastLayer)
    message = str(error.value)
    assert f"at step {2 if every_step else 3}" in message
    assert "weights themselves are no longer finite" in message
    assert "trainer.check_grads=true" in message
    ckpts = sorted((tmp_path / "checkpoints").glob("ckpt.*.pt"))
    assert all(
        torch.isfinite(v).all()
        for path in ckpts
        for v in torch.load(path, weights_only=True)["model"].values()
        if v.is_floating_point()
    )


def test_the_gradient_norm_measured_when_logged_is_the_steps(tmp_path: Path) -> None:
    """Without clipping the norm is measured only when a logger writes, from the step's gradients:
    the same numbers as a run that measures it inside every step."""
    _fit(_trainer(tmp_path / "when_logged"), max_steps=4)
    _fit(_trainer(tmp_path / "every_step", check_grads=True), max_steps=4)
    norms = {
        name: [r["metrics"]["trainer/grad_norm"] for r in _records(tmp_path / name) if r["phase"] == "train"]
        for name in ("when_logged", "every_step")
    }
    assert len(norms["when_logged"]) == 4 and all(n > 0 for n in norms["when_logged"])
    assert norms["when_logged"] == norms["every_step"]


def test_final_metrics_of_another_namespace_keep_the_validation_and_the_test_apart(tmp_path: Path) -> None:
    class LogsTheMeanTarget(TinyTask):
        def compute_loss(self, model, batch, state, output):  # type: ignore[no-untyped-def]
            self.logger.log_scalar("mean_target", batch[1].float().mean(), namespace="task")
            return super().compute_loss(model, batch, state, output)

    trainer = _trainer(tmp_path, valid_every_n_steps=2)
    _fit(trainer, max_steps=2, task_cls=LogsTheMeanTarget)
    evaluated = {
        r["phase"]: r["metrics"]["task/mean_target"] for r in _records(tmp_path) if r["phase"] != "train"
    }
    assert evaluated["valid"] != evaluated["test"]  # (the sets differ)
    final = trainer.final_metrics
    assert final["valid:task/mean_target"] == pytest.approx(evaluated["valid"])
    assert final["test:task/mean_target"] == pytest.approx(evaluated["test"])
    assert "task/mean_target" not in final and "valid/loss" in final and "test/loss" in final


def test_throughput_leaves_out_the_time_spent_validating(tmp_path: Path) -> None:
    class SlowToValidate(TinyTask):
        def compute_loss(self, model, batch, state, output):  # type: ignore[no-untyped-def]
            if state.phase == "valid":
                time.sleep(0.2)  # a validation of ~0.8 s, against training steps of milliseconds
            return super().compute_loss(model, batch, state, output)

    trainer = _trainer(tmp_path, valid_every_n_steps=3, test_at_end=False)
    _fit(trainer, max_steps=6, task_cls=SlowToValidate)
    rates = {
        r["step"]: r["metrics"]["trainer/steps_per_s"] for r in _records(tmp_path) if r["phase"] == "train"
    }
    # Counting the validation, step 4's rate would be under 1 / 0.8 s = 1.25 steps/s; without it, a
    # step of milliseconds (a step slowed 100-fold by a loaded machine still passes).
    assert rates[4] > 2.5, rates


def test_a_task_without_validation_or_test_data_skips_them(tmp_path: Path) -> None:
    class TrainOnly(TinyTask):
        def get_dataset(self, phase):  # type: ignore[no-untyped-def]
            if phase != "train":
                raise NotImplementedError(phase)
            return super().get_dataset(phase)

    trainer = _trainer(tmp_path, valid_every_n_steps=1)
    _fit(trainer, max_steps=2, task_cls=TrainOnly)
    assert trainer.final_metrics == {}
    assert {r["phase"] for r in _records(tmp_path)} == {"train"}


@pytest.mark.parametrize("workers", [0, 2])
def test_max_batches_evaluates_the_first_batches_of_a_set_at_every_evaluation(
    tmp_path: Path, workers: int
) -> None:
    """task.valid_dl.max_batches=3 of 8: each validation is the mean over the set's first 24 samples
    (of 64), the same ones each time, kept workers or none; the test set, without a limit, all 64."""
    task = TinyTask(
        SupervisedLearningTaskConfig(
            name="tiny",
            max_steps=4,
            valid_dl=DataLoaderConfig(batch_size=8, max_batches=3, num_workers=workers),
            test_dl=DataLoaderConfig(batch_size=8),
        )
    )
    trainer = _trainer(tmp_path, valid_every_n_steps=2, valid_at_end=False)
    model = _fit_task(trainer, task)
    valid = [r for r in _records(tmp_path) if r["phase"] == "valid"]
    assert [r["step"] for r in valid] == [2, 4]
    model.eval()
    with torch.no_grad():
        for phase, first in (("valid", 24), ("test", 64)):
            x, y = task.get_dataset(phase)[:first]
            expected = torch.nn.functional.cross_entropy(model(x), y).item()
            assert trainer.final_metrics[f"{phase}/loss"] == pytest.approx(expected, rel=1e-6)
    assert valid[-1]["metrics"]["valid/loss"] == pytest.approx(trainer.final_metrics["valid/loss"], rel=1e-6)
    # 4 steps of 32, two validations of 3 batches of 8, one test of 64
    assert int(task.seen) == 4 * 32 + 2 * 24 + 64


class _GoesOnWhereItStopped(torch.utils.data.IterableDataset):
    """A stream that goes on from where the last pass left it and rewinds only at its end (no
    set_epoch): as a stream with a position it saves (state_dict) may well be."""

    def __init__(self, data: torch.utils.data.TensorDataset) -> None:
        self.inputs, self.labels = data.tensors
        self.position = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        index, count = shard_of_stream()  # (2 workers: the even samples and the odd ones)
        mine = range(index, len(self.labels), count)
        while self.position < len(mine):
            self.position += 1
            yield self.inputs[mine[self.position - 1]], self.labels[mine[self.position - 1]]
        self.position = 0


@pytest.mark.parametrize("workers", [0, 2])
def test_max_batches_of_a_stream_are_its_first_at_every_evaluation(tmp_path: Path, workers: int) -> None:
    """Cut short, a stream read in the main process was left where the cut came: the next
    validation went on from there (samples 16-31, then 32-47, ...). Each pass reads it from the start."""

    class StreamedValidation(TinyTask):
        def get_dataset(self, phase):  # type: ignore[no-untyped-def]
            data = super().get_dataset(phase)
            return _GoesOnWhereItStopped(data) if phase == "valid" else data

    task = StreamedValidation(
        SupervisedLearningTaskConfig(
            name="tiny",
            max_steps=6,
            valid_dl=DataLoaderConfig(batch_size=8, max_batches=2, num_workers=workers),
        )
    )
    trainer = _trainer(tmp_path, valid_every_n_steps=2, valid_at_end=False)
    model = _fit_task(trainer, task)
    model.eval()
    x, y = TinyTask.get_dataset(task, "valid")[:16]
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(x), y).item()
    valid = [r for r in _records(tmp_path) if r["phase"] == "valid"]
    assert [r["step"] for r in valid] == [2, 4, 6]  # the third pass over the stream, at the last step
    assert valid[-1]["metrics"]["valid/loss"] == pytest.approx(expected, rel=1e-6)


def test_a_stream_cut_short_without_workers_that_cannot_be_copied_is_refused_before_training(
    tmp_path: Path,
) -> None:
    class Locked(_GoesOnWhereItStopped):
        def __init__(self, data: torch.utils.data.TensorDataset) -> None:
            super().__init__(data)
            self.lock = threading.Lock()

    class LockedValidation(TinyTask):
        def get_dataset(self, phase):  # type: ignore[no-untyped-def]
            return Locked(super().get_dataset(phase)) if phase == "valid" else super().get_dataset(phase)

    task = LockedValidation(
        SupervisedLearningTaskConfig(name="tiny", max_steps=2, valid_dl=DataLoaderConfig(max_batches=1))
    )
    with pytest.raises(
        ConfigError, match=r"task\.valid_dl\.max_batches cuts each pass over .*Locked short"
    ) as e:
        _fit_task(_trainer(tmp_path), task)
    assert "TypeError: cannot pickle '_thread.lock' object" in str(e.value)
    assert "read it with num_workers=1 or more, or whole" in str(e.value)
    assert not (tmp_path / "checkpoints").exists()


def test_max_batches_is_for_evaluation_and_positive() -> None:
    with pytest.raises(
        ConfigError, match=r"task.test_dl.max_batches must be positive \(or null: the whole set\), got 0"
    ):
        TinyTask(SupervisedLearningTaskConfig(name="tiny", test_dl=DataLoaderConfig(max_batches=0)))
    with pytest.raises(ConfigError, match=r"task\.train_dl\.max_batches=2: only validation and test sets"):
        TinyTask(SupervisedLearningTaskConfig(name="tiny", train_dl=DataLoaderConfig(max_batches=2)))


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path: Path) -> None:
    eager, compiled = _trainer(tmp_path / "eager"), _trainer(tmp_path / "compiled", compile_model=True)
    _fit(eager, max_steps=3, sgd=True)  # Adam would magnify rounding noise in near-zero gradients
    _fit(compiled, max_steps=3, sgd=True)
    a = torch.load(tmp_path / "eager" / "checkpoints" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "compiled" / "checkpoints" / "ckpt.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()  # no _orig_mod. prefixes in the checkpoint
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_training_data_without_a_complete_batch_is_an_error_not_an_endless_loop(tmp_path: Path) -> None:
    class Empty(TinyTask):
        def get_dataset(self, phase):  # type: ignore[no-untyped-def]
            data = super().get_dataset(phase)
            return torch.utils.data.Subset(data, range(3 if phase == "train" else 8))  # < batch_size 32

    with pytest.raises(ConfigError, match="no complete batch"):
        _fit(_trainer(tmp_path), max_steps=5, task_cls=Empty)
    assert not has_lock_file(tmp_path, "running")


def test_continuing_a_finished_run_redoes_nothing(tmp_path: Path) -> None:
    first = _trainer(tmp_path, valid_every_n_steps=2)
    _fit(first, max_steps=4)
    before = _records(tmp_path)
    again = _trainer(tmp_path, valid_every_n_steps=2)
    _fit(again, max_steps=4)
    assert _records(tmp_path) == before  # no second validation or test at step 4
    assert again.final_metrics == first.final_metrics and "test/loss" in again.final_metrics
    _fit(_trainer(tmp_path, valid_every_n_steps=2), max_steps=6)  # a raised limit continues
    pairs = [(r["step"], r["phase"]) for r in _records(tmp_path)]
    assert len(pairs) == len(set(pairs)) and (6, "test") in pairs


class _NamedLosses(TinyTask):
    def compute_loss(self, model, batch, state, output):  # type: ignore[no-untyped-def]
        self.output_dtypes.append(output.dtype)
        ce = super().compute_loss(model, batch, state, output)
        return {"ce": ce, "l2": (output**2).mean() * 1e-3}

    output_dtypes: list = []


def test_named_losses_are_logged_with_their_sum_and_grad_norm_without_clipping(tmp_path: Path) -> None:
    _fit(_trainer(tmp_path), max_steps=2, task_cls=_NamedLosses)
    for record in _records(tmp_path):
        metrics = record["metrics"]
        phase = record["phase"]
        assert {f"{phase}/ce", f"{phase}/l2", f"{phase}/loss"} <= set(metrics)
        assert math.isclose(
            metrics[f"{phase}/loss"], metrics[f"{phase}/ce"] + metrics[f"{phase}/l2"], rel_tol=1e-5
        )
        if phase == "train":
            assert metrics["trainer/grad_norm"] > 0


def test_the_loss_sees_float32_outputs_under_autocast(tmp_path: Path) -> None:
    _NamedLosses.output_dtypes = []
    _fit(_trainer(tmp_path, precision="bf16"), max_steps=2, task_cls=_NamedLosses)
    assert _NamedLosses.output_dtypes and set(_NamedLosses.output_dtypes) == {torch.float32}


class _MatmulPrecisionSeen(TinyTask):
    precisions: set[str] = set()

    def compute_loss(self, model, batch, state, output):  # type: ignore[no-untyped-def]
        self.precisions.add(torch.get_float32_matmul_precision())
        return super().compute_loss(model, batch, state, output)


@pytest.mark.parametrize(("configured", "during"), [("medium", "medium"), (None, "high")])
def test_the_float32_matmul_precision_holds_for_the_run_and_is_restored_after(
    tmp_path: Path, configured: str | None, during: str
) -> None:
    """Set for training, validation and test alike (null: as the user's code left it, here high);
    what was set before comes back after, as with trainer.deterministic."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        _MatmulPrecisionSeen.precisions = set()
        _fit(_trainer(tmp_path, float32_matmul_precision=configured), 4, task_cls=_MatmulPrecisionSeen)
        assert _MatmulPrecisionSeen.precisions == {during}
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_a_float32_matmul_precision_torch_lacks_is_refused(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"^trainer.float32_matmul_precision must be one of highest, high, medium \(or null\), "
        "got 'tf32'$",
    ):
        _trainer(tmp_path, float32_matmul_precision="tf32")
    assert list(tmp_path.iterdir()) == []


def test_a_signal_during_the_final_test_abandons_it_and_runs_the_handlers(tmp_path: Path) -> None:
    class SignalDuringTest(TinyTask):
        def compute_loss(self, model, batch, state, output):  # type: ignore[no-untyped-def]
            if state.phase == "test":
                os.kill(os.getpid(), signal.SIGTERM)
            return super().compute_loss(model, batch, state, output)

    trainer = _trainer(tmp_path)
    handled: list[int] = []
    trainer.add_signal_handler(signal.SIGTERM, lambda: handled.append(1))
    _fit(trainer, max_steps=2, task_cls=SignalDuringTest)
    assert handled == [1]
    assert "test/loss" not in trainer.final_metrics  # abandoned, not reported half done
    assert not has_lock_file(tmp_path, "running")
    ckpt = torch.load(tmp_path / "checkpoints" / "ckpt.pt", weights_only=True)
    assert "final_metrics" not in ckpt  # not finished: continuing runs the test pass


def test_a_changed_dataset_size_is_a_clear_checkpoint_error(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    trainer.add_signal_handler(signal.SIGTERM, lambda: None)

    class StopMidEpoch(TinyTask):
        def compute_loss(self, model, batch, state, output):  # type: ignore[no-untyped-def]
            if state.training and state.num_steps == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().compute_loss(model, batch, state, output)

    _fit(trainer, max_steps=5, task_cls=StopMidEpoch)  # stops after step 2, 64 samples into its epoch

    class Smaller(TinyTask):
        def get_dataset(self, phase):  # type: ignore[no-untyped-def]
            return torch.utils.data.Subset(super().get_dataset(phase), range(40))

    with pytest.raises(CheckpointError, match="was the dataset changed"):
        _fit(_trainer(tmp_path), max_steps=5, task_cls=Smaller)


def test_a_stop_before_the_first_step_saves_its_checkpoint(tmp_path: Path) -> None:
    """A signal that lands before the loop's first step (at start-up) stops with a checkpoint of step
    0; the check that weights are finite before a save has no step's parameters to look at then."""

    class StopsAtOnce(TinyTask):
        def on_training_start(self, state, model, optim, lr_sched):  # type: ignore[no-untyped-def]
            os.kill(os.getpid(), signal.SIGTERM)

    trainer = _trainer(tmp_path)
    _fit(trainer, max_steps=5, task_cls=StopsAtOnce)
    assert trainer.stop_signal == signal.SIGTERM
    ckpt = torch.load(tmp_path / "checkpoints" / "ckpt.pt", weights_only=True)
    assert json.loads(ckpt["state"])["num_steps"] == 0


def test_an_optimizer_state_of_other_parameter_groups_is_a_clear_checkpoint_error(tmp_path: Path) -> None:
    # With weight decay the optimizer has two parameter groups, without it one.
    _fit(_trainer(tmp_path), max_steps=2)
    task = TinyTask(SupervisedLearningTaskConfig(name="tiny", max_steps=4))
    decayed = AdamOptimizer(AdamConfig(name="adam", weight_decay=0.1))
    with pytest.raises(CheckpointError, match=r"optimizer\.weight_decay"):
        _trainer(tmp_path).train(
            TinyModel(TinyModelConfig(name="tiny")),
            task,
            decayed,
            ConstantLRScheduler(ConstantConfig(name="constant")),
        )


class _ModesSeen(TinyTask):
    """Records the modes of every forward pass. ``freeze``: sets the model's batch norm to eval mode
    before the first step (frozen: its running statistics stay as they are); ``forget``: puts the
    whole model in eval mode in a hook after step 3, and does not switch it back."""

    freeze = forget = False

    def __init__(self, config: SupervisedLearningTaskConfig) -> None:
        super().__init__(config)
        self.seen_modes: list[tuple[str, bool, bool]] = []  # (phase, model, batch norm)

    def on_training_start(self, state, model, optim, lr_sched) -> None:  # type: ignore[no-untyped-def]
        if self.freeze:
            model.net[1].eval()

    def on_step_end(self, state, loss_dict, model, optim, lr_sched) -> None:  # type: ignore[no-untyped-def]
        if self.forget and state.num_steps == 3:
            model.eval()

    def run_model(self, model, batch, state):  # type: ignore[no-untyped-def]
        self.seen_modes.append((state.phase, model.training, model.net[1].training))
        return super().run_model(model, batch, state)


def _modes_seen(tmp_path: Path, *, freeze: bool, forget: bool) -> tuple[list, list, TinyModel]:
    """The (model, batch norm) modes of the training and the validation forward passes of 6 steps."""
    trainer = _trainer(tmp_path, valid_every_n_steps=2, valid_at_end=False, test_at_end=False)
    task = _ModesSeen(SupervisedLearningTaskConfig(name="tiny", max_steps=6))
    task.freeze, task.forget = freeze, forget
    model = TinyModel(TinyModelConfig(name="tiny"))
    constant = ConstantLRScheduler(ConstantConfig(name="constant"))
    trainer.train(model, task, AdamOptimizer(AdamConfig(name="adam")), constant)
    train = [modes[1:] for modes in task.seen_modes if modes[0] == "train"]
    valid = [modes[1:] for modes in task.seen_modes if modes[0] == "valid"]
    return train, valid, model


def test_a_submodule_frozen_in_eval_mode_stays_frozen_through_steps_and_validations(tmp_path: Path) -> None:
    """Validation puts the model in eval mode, then every module back in the mode it was in."""
    train, valid, model = _modes_seen(tmp_path, freeze=True, forget=False)
    assert train == [(True, False)] * 6
    assert valid and set(valid) == {(False, False)}
    assert model.training and not model.net[1].training  # as the user left it


def test_a_model_a_hook_left_in_eval_mode_trains_in_train_mode(tmp_path: Path) -> None:
    train, valid, _ = _modes_seen(tmp_path, freeze=False, forget=True)
    assert train == [(True, True)] * 6
    assert valid and set(valid) == {(False, False)}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("checkpoint.save_every_n_steps", -2),  # acted as 2
        ("checkpoint.save_every_n_steps", 0),
        ("checkpoint.save_every_n_seconds", -1),  # saved at every step
        ("valid_every_n_steps", -1),
        ("valid_every_n_seconds", 0),
    ],
)
def test_an_interval_that_is_not_positive_is_refused(tmp_path: Path, key: str, value: float) -> None:
    section, _, field = key.rpartition(".")
    settings: dict = {section: {field: value}} if section else {field: value}
    with pytest.raises(
        ConfigError, match=rf"trainer.{key} must be positive \(or null, to turn it off\), got {value}"
    ):
        _trainer(tmp_path, **settings)
    assert list(tmp_path.iterdir()) == []
