"""Defines :class:`SupervisedLearningTrainer` (``sl``): the supervised training loop.

``train()`` reads top to bottom: set up (device, precision, optimizer, schedule), resume, loop
(step start, forward, loss, backward, clip, schedule, optimizer step, log, validate, checkpoint,
stop check), then tear down (final checkpoint, test pass, locks, loggers). Errors propagate after
the teardown; a signal stops the loop at the next step boundary with a checkpoint.
"""

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from ml.core.compose import ConfigError
from ml.core.config import conf_field
from ml.core.registry import register_trainer
from ml.core.state import Phase, State
from ml.lr_schedulers.base import BaseLRScheduler, SchedulerAdapter
from ml.models.base import BaseModel
from ml.optimizers.base import BaseOptimizer
from ml.tasks.sl import SupervisedLearningTask
from ml.trainers.base import BaseTrainer, BaseTrainerConfig
from ml.utils.checkpoint import CheckpointError, load_model_state, read_checkpoint
from ml.utils.data import ResumableSampler, batch_size_of, move_to
from ml.utils.seeding import seed_everything

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite and the policy is ``stop``."""


@dataclass
class SupervisedLearningTrainerConfig(BaseTrainerConfig):
    clip_grad_norm: float | None = conf_field(None, help="Clip the gradient norm to this value")
    valid_every_n_steps: int | None = conf_field(None, help="Validate every N training steps")
    valid_every_n_seconds: float | None = conf_field(None, help="Validate every N seconds of training")
    valid_at_end: bool = conf_field(True, help="Validate once more when training ends")
    test_at_end: bool = conf_field(True, help="Run the test set when training ends")
    non_finite_loss: str = conf_field(
        "stop", help="On a NaN/inf loss: `stop` with an error, or `skip` the step"
    )


def _as_loss_dict(losses: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(losses, torch.Tensor):
        return {"loss": losses}
    if isinstance(losses, dict) and losses:
        return losses
    raise TypeError(
        f"compute_loss must return a tensor or a non-empty dict of tensors, got {type(losses).__name__}"
    )


@register_trainer("sl", SupervisedLearningTrainerConfig)
class SupervisedLearningTrainer(
    BaseTrainer[SupervisedLearningTrainerConfig, BaseModel, SupervisedLearningTask]
):
    """Trains a model on a :class:`SupervisedLearningTask`."""

    def __init__(self, config: SupervisedLearningTrainerConfig) -> None:
        super().__init__(config)
        if config.non_finite_loss not in ("stop", "skip"):
            raise ConfigError(
                f"trainer.non_finite_loss must be 'stop' or 'skip', got {config.non_finite_loss!r}"
            )
        self.final_metrics: dict[str, float] = {}
        self._last_valid_time_s = 0.0
        self._last_valid_step = -1

    # -- data

    def _loader(self, task: SupervisedLearningTask, phase: Phase) -> DataLoader | None:
        try:
            dataset = task.get_dataset(phase)
        except NotImplementedError as e:
            if phase == "train":
                raise ConfigError(f"task {type(task).__name__} has no training data: {e}") from e
            return None
        if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise ConfigError(
                f"{type(task).__name__}.get_dataset({phase!r}) returned {type(dataset).__name__}, "
                "not a map-style Dataset (with __len__ and __getitem__)"
            )
        cfg = task.dataloader_config(phase)
        sampler = ResumableSampler(dataset, shuffle=cfg.shuffle, seed=task.config.seed)
        pin = self._device_type == "cuda" if cfg.pin_memory is None else cfg.pin_memory
        return DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            sampler=sampler,
            num_workers=cfg.num_workers,
            pin_memory=pin,
            drop_last=cfg.drop_last,
            generator=torch.Generator().manual_seed(task.config.seed),
        )

    def _epoch_batches(self, loader: DataLoader, state: State) -> Iterator[Any]:
        sampler = cast(ResumableSampler, loader.sampler)
        sampler.set_epoch(state.num_epochs, start=state.num_epoch_samples)
        if loader.generator is not None:
            loader.generator.manual_seed(sampler.seed + state.num_epochs)
        yield from loader

    # -- one training step

    def _train_step(
        self,
        state: State,
        batch: Any,
        task: SupervisedLearningTask,
        model: BaseModel,
        optim: Optimizer,
        lr_sched: SchedulerAdapter,
    ) -> dict[str, torch.Tensor]:
        state.set_phase("train")
        model.train()
        batch = move_to(batch, self._device, self._weight_precision)
        output = task.run_model(model, batch, state)
        loss_dict = _as_loss_dict(task.compute_loss(model, batch, state, output))
        loss = torch.stack([v.sum() for v in loss_dict.values()]).sum()
        optim.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            message = f"non-finite loss {loss.item()} at step {state.num_steps}"
            if self.config.non_finite_loss == "stop":
                raise NonFiniteLossError(f"{message}; set trainer.non_finite_loss=skip to skip such steps")
            logger.warning("%s: skipping the step", message)
            return loss_dict
        loss.backward()
        if self.config.clip_grad_norm is not None:
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), self.config.clip_grad_norm)
            self.logger.log_scalar("grad_norm", grad_norm.detach())
        lr_sched.step(state)
        optim.step()
        self.logger.log_scalar("lr", lr_sched.lr)
        for name, value in loss_dict.items():
            task.logger.log_scalar(name, value.detach(), namespace="train")
        return loss_dict

    # -- evaluation

    @torch.no_grad()
    def evaluate(
        self, phase: Phase, loader: DataLoader, task: SupervisedLearningTask, model: BaseModel, state: State
    ) -> dict[str, float]:
        """Runs a whole validation or test set; returns its sample-weighted mean metrics."""
        state.set_phase(phase)
        model.eval()
        totals: dict[str, float] = {}
        count = 0
        for batch in loader:
            batch = move_to(batch, self._device, self._weight_precision)
            output = task.run_model(model, batch, state)
            loss_dict = _as_loss_dict(task.compute_loss(model, batch, state, output))
            for name, value in loss_dict.items():
                task.logger.log_scalar(name, value.detach(), namespace=phase)
            size = batch_size_of(batch)
            for name, scalar in task.logger.materialize().scalars.items():
                totals[name] = totals.get(name, 0.0) + scalar * size
            count += size
            if phase == "valid":
                state.num_valid_steps += 1
            else:
                state.num_test_steps += 1
        metrics = {name: total / max(count, 1) for name, total in totals.items()}
        for name, mean in metrics.items():
            namespace, _, key = name.partition("/")
            task.logger.log_scalar(key, mean, namespace=namespace)
        self.write_logs(task, model, state)
        state.set_phase("train")
        return metrics

    def _should_validate(self, state: State) -> bool:
        cfg = self.config
        if cfg.valid_every_n_steps and state.num_steps % cfg.valid_every_n_steps == 0:
            return True
        return bool(
            cfg.valid_every_n_seconds
            and state.elapsed_time_s - self._last_valid_time_s >= cfg.valid_every_n_seconds
        )

    # -- the loop

    def train(
        self,
        model: BaseModel,
        task: SupervisedLearningTask,
        optimizer: BaseOptimizer,
        lr_scheduler: BaseLRScheduler,
    ) -> None:
        """Runs the training loop until the task's limits or a stop signal."""
        if not isinstance(task, SupervisedLearningTask):
            raise TypeError(f"the sl trainer needs a SupervisedLearningTask, got {type(task).__name__}")
        if not task.has_limit:
            logger.warning(
                "The task sets no max_steps/max_epochs/max_samples/max_seconds: training until stopped"
            )

        # Set up: device, precision, optimizer and schedule, data.
        seed_everything(task.config.seed)
        model.to(device=self._device, dtype=self._weight_precision)
        task.to(self._device)
        optim = optimizer.get(model)
        lr_sched = lr_scheduler.get(optim)
        train_loader = self._loader(task, "train")
        valid_loader = self._loader(task, "valid")
        test_loader = self._loader(task, "test")
        assert train_loader is not None

        # Resume from this run's checkpoint, or start from initial weights.
        state = State.init_state()
        if self.ckpt_path.exists():
            state = self.load_checkpoint(self.ckpt_path, task, model, optim, lr_sched)
            logger.info("Resumed from %s at step %d", self.ckpt_path, state.num_steps)
        elif self.checkpoint_config.load_from_ckpt_path:
            self._load_initial_weights(model, self.checkpoint_config.load_from_ckpt_path)
        self._last_valid_time_s = state.elapsed_time_s

        with self.install_signal_handlers():
            self.on_training_start(state, task, model, optim, lr_sched)  # takes the running lock first
            try:
                self.save_config()
                self.log_run_config()
                self._loop(state, train_loader, valid_loader, task, model, optim, lr_sched)
                if self.stop_signal is not None:
                    self.on_exit(self.stop_signal, state, task, model, optim, lr_sched)
                else:
                    if self._last_ckpt_step != state.num_steps:
                        self.save_checkpoint(state, task, model, optim, lr_sched)
                    validated_now = self._last_valid_step == state.num_steps
                    if valid_loader is not None and self.config.valid_at_end and not validated_now:
                        self.final_metrics.update(self.evaluate("valid", valid_loader, task, model, state))
                    if test_loader is not None and self.config.test_at_end:
                        self.final_metrics.update(self.evaluate("test", test_loader, task, model, state))
            finally:
                self.on_training_end(state, task, model, optim, lr_sched)
                self.close_loggers()

    def _loop(
        self,
        state: State,
        train_loader: DataLoader,
        valid_loader: DataLoader | None,
        task: SupervisedLearningTask,
        model: BaseModel,
        optim: Optimizer,
        lr_sched: SchedulerAdapter,
    ) -> None:
        samples_start, time_start = state.num_samples, time.monotonic()

        def samples_per_s() -> float:
            return (state.num_samples - samples_start) / max(time.monotonic() - time_start, 1e-9)

        while not task.is_training_over(state) and self.stop_signal is None:
            if state.num_epoch_samples == 0:
                self.on_epoch_start(state, task, model, optim, lr_sched)
            for batch in self._epoch_batches(train_loader, state):
                self.on_step_start(state, task, model, optim, lr_sched)
                loss_dict = self._train_step(state, batch, task, model, optim, lr_sched)
                size = batch_size_of(batch)
                state.num_steps += 1
                state.num_epoch_steps += 1
                state.num_samples += size
                state.num_epoch_samples += size
                self.on_step_end(state, loss_dict, task, model, optim, lr_sched)
                self.logger.log_scalar("epoch", state.num_epochs)
                self.logger.log_scalar("samples_per_s", samples_per_s)
                self.write_logs(task, model, state)
                if valid_loader is not None and self._should_validate(state):
                    self.evaluate("valid", valid_loader, task, model, state)
                    self._last_valid_time_s = state.elapsed_time_s
                    self._last_valid_step = state.num_steps
                if self.should_checkpoint(state):
                    self.save_checkpoint(state, task, model, optim, lr_sched)
                if task.is_training_over(state) or self.stop_signal is not None:
                    return
            self.on_epoch_end(state, task, model, optim, lr_sched)
            state.num_epoch_samples = 0
            state.num_epoch_steps = 0

    def _load_initial_weights(self, model: BaseModel, path: str) -> None:
        """``checkpoint.load_from_ckpt_path``: model weights only (no optimizer, state or RNG)."""
        ckpt = read_checkpoint(path, device=self._device)
        for note in load_model_state(model, ckpt["model"], strict=self.checkpoint_config.load_strict):
            logger.warning("Initial weights from %s: %s", path, note)
        logger.info("Initial weights loaded from %s", path)


__all__ = [
    "CheckpointError",
    "NonFiniteLossError",
    "SupervisedLearningTrainer",
    "SupervisedLearningTrainerConfig",
]
