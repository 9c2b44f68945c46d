"""Defines :class:`GanTrainer` (``gan``): a generator and a discriminator trained in alternation.

The session's order is :class:`ml.trainers.base.BaseTrainer`'s; this trainer supplies its set-up
(the model's two parts, an optimizer and a schedule for each, the data), its loop and its finish.
The protocol a task and model follow is :mod:`ml.tasks.gan`'s. One training step:

    for each of the step's ``discriminator_steps`` batches of real samples:
        the discriminator's update (the generator frozen) on ``task.discriminator_loss``
    the generator's update (the discriminator frozen) on ``task.generator_loss``

then log, validate (``task.evaluate``, every ``valid_every_n_steps``), checkpoint, check for a stop.
``state.num_steps`` counts generator updates, ``state.num_samples`` real samples. A step logs one
value per key: what its discriminator updates log (the loss, its named parts, the gradient norm, what
the task logs inside ``discriminator_loss``) is their mean weighted by batch size, as the ``sl``
trainer averages a step's micro-batches; the generator's one update logs its own values.

The optimizers and schedules are dicts by part name (``{"generator": ..., "discriminator": ...}``),
the plural form the base trainer's ``save_checkpoint``/``load_checkpoint`` take: one checkpoint holds
both parts' weights (as the model's), both optimizers (``optim``) and both schedules (``lr``), every
generator's state and where the data order stands. A run stopped at any step and resumed computes
the same tensors as one that never stopped (``trainer.deterministic=true`` for kernels that would
otherwise be non-deterministic, as for ``sl``).

NaN/inf: each update's loss and gradient norm are checked on the device (:mod:`ml.utils.nonfinite`),
an update that has one is skipped there, and the record is read when the logs are written or a
checkpoint is saved: ``non_finite_loss=stop`` then stops naming the step, the part and the first
module whose gradient is not finite; ``skip`` counts the skipped updates (``trainer/skipped_steps``).

One process only for now (no DDP/FSDP), in float32 (or float64 weights).
"""

import contextlib
import itertools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from ml.core.config import conf_field
from ml.core.registry import register_trainer
from ml.core.state import State
from ml.errors import ConfigError, NonFiniteLossError
from ml.loggers.base import MultiLogger, ScalarValue, weighted_mean
from ml.lr_schedulers.base import BaseLRScheduler, SchedulerAdapter
from ml.lr_schedulers.gan import GanLRScheduler
from ml.models.base import BaseModel, eval_mode
from ml.optimizers.base import BaseOptimizer
from ml.optimizers.fast import clear_grads, step_skipping, use_fast_optimizer
from ml.optimizers.gan import GAN_PARTS, GanOptimizer
from ml.tasks.gan import GanTask, Losses
from ml.trainers.base import BaseTrainer, Session, TrainerConfig, check_interval, check_trainer_config
from ml.utils.data import (
    batch_size_of,
    move_to,
    rest_of_epoch,
    resumable_loader,
)
from ml.utils.grad_norm import tensor_norms
from ml.utils.malloc import tune_malloc
from ml.utils.nonfinite import NonFiniteRecord, all_finite, float_buffers, present_grads
from ml.utils.progress import TrainingBar, expected_total
from ml.utils.ranks import dist_env
from ml.utils.seeding import deterministic_algorithms, generators_of_their_own

logger = logging.getLogger(__name__)

GENERATOR, DISCRIMINATOR = GAN_PARTS


@dataclass
class GanTrainerConfig(TrainerConfig):
    discriminator_steps: int = conf_field(
        1, help="Discriminator updates per generator update (each on its own batch of real samples)"
    )
    valid_every_n_steps: int | None = conf_field(None, help="Validate (task.evaluate) every N training steps")
    valid_at_end: bool = conf_field(True, help="Validate once more when training ends")
    non_finite_loss: str = conf_field(
        "stop", help="On a NaN/inf loss or gradient: `stop` with an error, or `skip` the update"
    )
    deterministic: bool = conf_field(False, help="Use only deterministic kernels (bit-exact resume)")


def _check_config(config: GanTrainerConfig) -> None:
    check_trainer_config(config)
    if config.discriminator_steps < 1:
        raise ConfigError(f"trainer.discriminator_steps must be positive, got {config.discriminator_steps}")
    check_interval("trainer.valid_every_n_steps", config.valid_every_n_steps)
    if config.non_finite_loss not in ("stop", "skip"):
        raise ConfigError(f"trainer.non_finite_loss must be 'stop' or 'skip', got {config.non_finite_loss!r}")


def _total(losses: Losses, task: GanTask, method: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss to minimise and the named parts to log; anything but scalars is refused, naming the task."""
    named = {"loss": losses} if isinstance(losses, torch.Tensor) else losses
    if not (isinstance(named, dict) and named and all(isinstance(v, torch.Tensor) for v in named.values())):
        raise TypeError(f"{type(task).__name__}.{method} must return a tensor or a non-empty dict of tensors")
    for name, value in named.items():
        if value.numel() != 1:
            raise ConfigError(
                f"{type(task).__name__}.{method} returned {name!r} of shape {tuple(value.shape)}, not a "
                "scalar: reduce it (e.g. .mean())"
            )
    values = list(named.values())
    total = (
        values[0].float().reshape(())
        if len(values) == 1
        else torch.stack([v.float().sum() for v in values]).sum()
    )
    return total, named


def _step_value(parts: list[tuple[float, ScalarValue]]) -> ScalarValue:
    """One value for the step from what was logged in its updates (with each batch's weight)."""
    return parts[0][1] if len(parts) == 1 else weighted_mean(parts)


def _log(values: dict[tuple[MultiLogger, str], ScalarValue]) -> None:
    """Logs each value to its logger under its key (``namespace/name``)."""
    for (where, key), value in values.items():
        namespace, _, name = key.partition("/")
        where.log_scalar(name, value, namespace=namespace)


@dataclass
class _Part:
    """One part of the model as the loop trains it: its trainable parameters, their names, its record
    of non-finite updates."""

    module: nn.Module
    params: list[nn.Parameter]
    record: NonFiniteRecord


@dataclass
class _Session(Session):
    """A GAN session: the model's two parts, and the real samples."""

    parts: dict[str, _Part]
    train_loader: DataLoader


@register_trainer("gan", GanTrainerConfig)
class GanTrainer(BaseTrainer[GanTrainerConfig, BaseModel, GanTask]):
    """Trains ``model.generator`` against ``model.discriminator`` on a :class:`GanTask`.

    Attributes:
        final_metrics: The latest validation metrics (``valid/...``).
    """

    task_type = GanTask

    def __init__(self, config: GanTrainerConfig) -> None:
        super().__init__(config)
        _check_config(config)
        self.final_metrics: dict[str, float] = {}
        self.num_skipped_steps = 0  # updates dropped for non-finite values (non_finite_loss=skip)
        self._discriminator_steps = int(config.discriminator_steps)
        self._valid_every = config.valid_every_n_steps
        self._data_seed = 0
        self._last_valid_step = -1
        self._parts: dict[str, _Part] = {}  # the session's, for _settle

    # -- checkpoint extras: where the data order stands, the last validation, skipped updates

    def update_state_dict(self, state_dict: dict) -> None:
        state = State.from_json(state_dict["state"])
        state_dict["sampler"] = {
            "seed": self._data_seed,
            "epoch": state.num_epochs,
            "position": state.num_epoch_samples,
        }
        state_dict["last_valid_step"] = self._last_valid_step
        state_dict["skipped_steps"] = self.num_skipped_steps

    def load_state_dict(self, state_dict: dict) -> None:
        sampler = state_dict.get("sampler")
        if sampler is not None and sampler.get("seed") != self._data_seed:
            logger.warning("task.seed changed since the checkpoint: the data order of this epoch changes too")
        self._last_valid_step = int(state_dict.get("last_valid_step", -1))
        self.num_skipped_steps = int(state_dict.get("skipped_steps", 0))

    def save_checkpoint(
        self, state: State, task: GanTask, model: BaseModel, optims: Any = None, lr_scheds: Any = None
    ) -> Path:
        self._settle()  # a stop is due before the step's checkpoint; skipped updates are counted in it
        # Never saves weights that are not finite: a finite loss and gradient can still overflow them,
        # and a skipped update's forward pass still wrote its running statistics.
        tensors = [t for part in self._parts.values() for t in (*part.params, *float_buffers(part.module))]
        if not all_finite(tensors, self.distributed):
            raise NonFiniteLossError(
                f"at step {state.num_steps}: the weights themselves are no longer finite (or a buffer such "
                "as a batch norm's running statistics): an update made them so with a finite loss and "
                "gradient (too large a learning rate, Adam's eps=0), or a batch that was not finite"
            )
        return super().save_checkpoint(state, task, model, optims, lr_scheds)

    # -- the session: set-up, loop, finish

    @contextlib.contextmanager
    def training_context(self) -> Iterator[None]:
        with super().training_context(), deterministic_algorithms(self.config.deterministic):
            yield

    def set_up(
        self, model: BaseModel, task: GanTask, optimizer: BaseOptimizer, lr_scheduler: BaseLRScheduler
    ) -> _Session:
        """The model's parts, an optimizer and a schedule for each, the data; nothing is written to disk."""
        if dist_env().is_distributed:
            raise ConfigError("the gan trainer runs in one process: launch it without torchrun, mp or srun")
        if self.config.tune_malloc:
            tune_malloc()
        self._data_seed = task.config.seed
        model.to(device=self.device, dtype=self.weight_precision)
        task.to(self.device)
        modules = _parts_of(model)
        if isinstance(optimizer, GanOptimizer):
            optims = optimizer.get_parts(modules)
        else:  # one section: each part an optimizer of its own with those settings
            optims = {name: optimizer.get(module) for name, module in modules.items()}
        if self.config.fast_optimizer:
            for optim in optims.values():
                use_fast_optimizer(optim)
        if isinstance(lr_scheduler, GanLRScheduler):
            lr_scheds = lr_scheduler.get_parts(optims)
        else:
            lr_scheds = {name: lr_scheduler.get(optim) for name, optim in optims.items()}
        parts = {}
        for name, module in modules.items():
            named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
            record = NonFiniteRecord([f"{name}.{n}" for n, _ in named], self.device)
            parts[name] = _Part(module, [p for _, p in named], record)
        self._parts = parts
        evaluates = task.evaluates and self._valid_every is not None
        how = (
            "set trainer.valid_every_n_steps"
            if task.evaluates
            else f"{type(task).__name__} has no validation (GanTask.evaluate)"
        )
        self.check_monitors("valid/", evaluates, how)
        if self._valid_every is not None and not task.evaluates:
            logger.warning(
                "trainer.valid_every_n_steps: %s has no validation (GanTask.evaluate)", type(task).__name__
            )
        return _Session(
            model,
            task,
            optims,
            lr_scheds,
            seed=task.config.seed,
            parts=parts,
            train_loader=self._loader(task),
        )

    def close(self, s: Session) -> None:
        self._parts = {}

    def loop(self, state: State, s: Session) -> None:
        with TrainingBar(state, enabled=self.config.progress_bar) as bar:  # closed however the loop ends
            self._loop(state, s, bar)

    def _loop(self, state: State, s: Session, bar: TrainingBar) -> None:
        assert isinstance(s, _Session)
        task, model, optims, lr_scheds = s.task, s.model, s.optim, s.lr_sched
        steps_per_epoch = math.ceil(len(s.train_loader) / self._discriminator_steps)
        cfg = task.config
        bar.start(
            expected_total(
                state,
                max_steps=cfg.max_steps,
                max_samples=cfg.max_samples,
                samples_per_step=(s.train_loader.batch_size or 1) * self._discriminator_steps,
                max_epochs=cfg.max_epochs,
                steps_per_epoch=steps_per_epoch,
            )
        )
        while not self.training_over(state, task) and self.stop_signal is None:
            if state.num_epoch_samples == 0:
                self.on_epoch_start(state, task, model, optims, lr_scheds)
            for batches in self._epoch_steps(s.train_loader, state):
                self.on_step_start(state, task, model, optims, lr_scheds)
                loss_dict = self._train_step(state, batches, s)
                samples = sum(map(batch_size_of, batches))
                state.num_steps += 1
                state.num_epoch_steps += 1
                state.num_samples += samples
                state.num_epoch_samples += samples
                self.on_step_end(state, loss_dict, task, model, optims, lr_scheds)
                self.logger.log_scalar("epoch", state.num_epochs)
                last = self.stop_signal is not None or task.is_training_over(state)
                if last or any(lg.should_write(state) for lg in self.loggers):
                    self._settle()  # the values are read for the logs anyway
                if self.num_skipped_steps:  # at every write from the first skip on, whatever read the record
                    self.logger.log_scalar("skipped_steps", self.num_skipped_steps)
                self.write_logs(task, model, state, final=last)
                if last or state.num_steps >= bar.due:  # an int compare; losses are read on a redraw only
                    bar.update({"epoch": state.num_epochs, **loss_dict}, force=last)
                if self._valid_every is not None and state.num_steps % self._valid_every == 0:
                    self._validate(state, s)
                if self.should_checkpoint(state):
                    self.save_checkpoint(state, task, model, optims, lr_scheds)
                if self.training_over(state, task) or self.stop_signal is not None:
                    return
            self.on_epoch_end(state, task, model, optims, lr_scheds)

    def evaluates_again(self, phase: str, state: State, s: Session) -> bool:
        """The final validation, where the run ends at this step (:meth:`finish`); no test phase."""
        assert isinstance(s, _Session)
        ends_here = self.training_over(state, s.task)
        return phase == "valid" and self.config.valid_at_end and s.task.evaluates and ends_here

    def finish(self, state: State, s: Session) -> None:
        """The end of a completed run: a last validation, then the final checkpoint, which says the
        step was validated (the loop may have saved this step's before): continuing the run, or a
        ``kill -9`` now, does not validate (and log) it again."""
        assert isinstance(s, _Session)
        if self.config.valid_at_end and s.task.evaluates and self._last_valid_step != state.num_steps:
            self._validate(state, s)
            self.save_checkpoint(state, s.task, s.model, s.optim, s.lr_sched)
            self.wait_for_checkpoint()  # on disk at once (async_save)
        super().finish(state, s)

    # -- data

    def _loader(self, task: GanTask) -> DataLoader:
        """The real samples in a resumable order (:class:`ml.utils.data.ResumableSampler`)."""
        where = f"{type(task).__name__}.get_dataset('train')"
        dataset = task.get_dataset("train")
        if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise ConfigError(f"{where} returned {type(dataset).__name__}, not a map-style Dataset")
        return resumable_loader(
            dataset,
            task.config.train_dl,
            seed=self._data_seed,
            device_type=self.device_type,
            phase="train",
            owner=type(task).__name__,
        )

    def _epoch_steps(self, loader: DataLoader, state: State) -> Iterator[list[Any]]:
        """The rest of the current epoch as groups of ``discriminator_steps`` batches (the last may be
        short), from the saved position: the order depends only on ``(task.seed, epoch)``."""
        batches = rest_of_epoch(loader, state.num_epochs, state.num_epoch_samples, self._data_seed)
        while group := list(itertools.islice(batches, self._discriminator_steps)):
            yield group

    # -- one training step

    def _train_step(self, state: State, batches: list[Any], s: _Session) -> dict[str, torch.Tensor]:
        """The discriminator's updates (one per batch), then the generator's; returns both losses.

        What each discriminator update logs is taken out of the loggers after it and logged back
        once, as the batch-size-weighted mean over the step's updates: a logger keeps a key's last
        value only, and the last update's would stand for the step. The generator's values, logged
        after those, are its one update's.
        """
        task, model = s.task, s.model
        if not model.training:
            model.train()
        own = getattr(model, "logger", None)  # where the model logs, if it does
        sources = [task.logger, *([own] if isinstance(own, MultiLogger) and own is not task.logger else [])]
        total = sum(map(batch_size_of, batches))
        logged: dict[tuple[MultiLogger, str], list[tuple[float, ScalarValue]]] = {}
        dtype = self.weight_precision
        for batch in batches:
            weight = batch_size_of(batch) / total
            batch = move_to(batch, self.device, dtype)
            _, values = self._update(DISCRIMINATOR, task.discriminator_loss, batch, state, s)
            update = {
                (source, key): value for source in sources for key, value in source.pop_scalars().items()
            }
            update.update(values)  # the trainer's values win over a task's of the same name, as before
            for where, value in update.items():
                logged.setdefault(where, []).append((weight, value))
        d_values = {where: _step_value(parts) for where, parts in logged.items()}
        _log(d_values)  # before the generator's update: what it logs of the same name wins, as before
        g_loss, g_values = self._update(GENERATOR, task.generator_loss, batch, state, s)
        _log(g_values)
        for name, lr_sched in s.lr_sched.items():  # one rate a step: the schedules follow the state
            self.logger.log_scalar(f"lr_{name}", lr_sched.lr)
        d_loss = cast(torch.Tensor, d_values[task.logger, "train/discriminator_loss"])
        return {"d_loss": d_loss, "g_loss": g_loss}

    def _update(
        self, name: str, loss_of: Any, batch: Any, state: State, s: _Session
    ) -> tuple[torch.Tensor, dict[tuple[MultiLogger, str], ScalarValue]]:
        """One optimizer step of part ``name`` (the other part frozen meanwhile); returns its loss
        and what to log for it, by logger and key: the loss, its named parts, the gradient norm.

        Freezing the other part keeps its gradients unset and lets the loss run it without building
        a graph through it where nothing else needs one (the fakes of the discriminator's loss).
        """
        part, other = s.parts[name], s.parts[GENERATOR if name == DISCRIMINATOR else DISCRIMINATOR]
        optim: Optimizer = s.optim[name]
        lr_sched: SchedulerAdapter = s.lr_sched[name]
        clear_grads(optim)
        for p in other.params:
            p.requires_grad_(False)
        try:
            loss, named = _total(loss_of(s.model, batch, state), s.task, f"{name}_loss")
            loss.backward()
        finally:
            for p in other.params:
                p.requires_grad_(True)
        grads, which = present_grads(part.params)  # (which: when a weight has none, as an unused head)
        norms = tensor_norms(grads)
        grad_norm = torch.linalg.vector_norm(norms)
        if part.record.full:
            self._settle()
        found_inf = part.record.found_inf(loss, grad_norm)
        part.record.record(state.num_steps + 1, found_inf, loss, grad_norm, norms, which)
        lr_sched.step(state)
        step_skipping(optim, found_inf)  # the update is dropped on the device if found_inf is 1
        task_log, trainer_log = s.task.logger, self.logger
        loss = loss.detach()
        values: dict[tuple[MultiLogger, str], ScalarValue] = {
            (task_log, f"train/{name}_loss"): loss,
            (trainer_log, f"trainer/grad_norm_{name}"): grad_norm,
        }
        if len(named) > 1:
            values.update({(task_log, f"train/{name}/{key}"): value.detach() for key, value in named.items()})
        return loss, values

    def _settle(self) -> None:
        """Reads which updates since the last read had non-finite values (one host read per part):
        stops at the first (``non_finite_loss=stop``) or counts them as skipped (``skip``)."""
        for name, part in self._parts.items():
            if not part.record.pending:
                continue
            bad = part.record.read()
            if not bad:
                continue
            first = bad[0]
            message = f"non-finite values in the {name}'s update at step {first.step} ({first.describe()})"
            if self.config.non_finite_loss == "stop":
                later = f"; {len(bad) - 1} later update(s) too" if len(bad) > 1 else ""
                raise NonFiniteLossError(
                    f"{message}{later}; set trainer.non_finite_loss=skip to skip such updates"
                )
            self.num_skipped_steps += len(bad)
            logger.warning("%s: skipped %d update(s) (%d so far)", message, len(bad), self.num_skipped_steps)

    # -- validation

    def _validate(self, state: State, s: _Session) -> None:
        """``task.evaluate`` in eval mode, without gradients, with torch's generators seeded from the
        step and put back afterwards; its metrics are logged and judged (best checkpoints, early stopping)."""
        task, model = s.task, s.model
        if not task.evaluates:
            return
        state.set_phase("valid")
        with eval_mode(model), torch.no_grad(), generators_of_their_own(self._data_seed, state.num_steps):
            metrics = {f"valid/{key}": float(value) for key, value in task.evaluate(model, state).items()}
        for key, value in metrics.items():
            task.logger.log_scalar(key.removeprefix("valid/"), value, namespace="valid")
        self.write_logs(task, model, state)
        state.set_phase("train")
        self._last_valid_step = state.num_steps
        self.final_metrics.update(metrics)
        self.judge_evaluation(state, metrics, s)


def _parts_of(model: nn.Module) -> dict[str, nn.Module]:
    """``model.generator`` and ``model.discriminator``, checked: each a module with trainable
    parameters, none shared (each optimizer must own its part's alone)."""
    parts: dict[str, nn.Module] = {}
    for name in GAN_PARTS:
        module = getattr(model, name, None)
        if not isinstance(module, nn.Module) or not any(p.requires_grad for p in module.parameters()):
            raise ConfigError(
                f"the gan trainer needs a model with a `{name}` submodule holding trainable parameters; "
                f"{type(model).__name__} has {'none' if module is None else type(module).__name__}"
            )
        parts[name] = module
    shared = {id(p) for p in parts[GENERATOR].parameters()} & {
        id(p) for p in parts[DISCRIMINATOR].parameters()
    }
    if shared:
        raise ConfigError(
            f"{type(model).__name__}'s generator and discriminator share {len(shared)} parameter(s): "
            "each part's optimizer must own its parameters alone"
        )
    return parts
