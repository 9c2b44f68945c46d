"""Defines :class:`SupervisedLearningTrainer` (``sl``): the supervised training loop.

The session's order is :class:`ml.trainers.base.BaseTrainer`'s; this trainer supplies its set-up
(device, precision, optimizer, schedule, data), its loop (step start, forward, loss, backward, clip,
schedule, optimizer step, log, validate, checkpoint, stop check) and its finish (final checkpoint,
validation and test). A signal stops the loop at the next step boundary with a checkpoint.

Resuming is exact: the checkpoint holds the weights, optimizer, scheduler, gradient scaler, every
generator's state and where the data order stands (the epoch's seed and the position in it). The
order of each epoch is a fixed permutation that the sampler slices at the saved position, so a run
stopped at any step and resumed computes the same tensors as one that never stopped (with
``trainer.deterministic=true`` for kernels that would otherwise be non-deterministic).

Training data may also be a stream (an ``IterableDataset``, :mod:`ml.utils.streaming`): each rank
reads its own shard through torchdata's ``StatefulDataLoader``, an epoch ends when the stream does
(on every rank at the same step), and the checkpoint holds every rank's loader state, so that each
rank continues its stream where it stood, with the same random draws.
"""

import contextlib
import itertools
import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from ml.core.config import conf_field
from ml.core.registry import register_trainer
from ml.core.state import Phase, State
from ml.errors import CheckpointError, ConfigError, NonFiniteLossError  # the last also importable here
from ml.loggers.base import MultiLogger, ScalarValue, scalar_to_float, weighted_mean
from ml.lr_schedulers.base import BaseLRScheduler, SchedulerAdapter
from ml.models.base import BaseModel, eval_mode
from ml.optimizers.base import BaseOptimizer
from ml.optimizers.fast import FusedAdamStep, clear_grads, skips_on_device, step_skipping, use_fast_optimizer
from ml.tasks.sl import SupervisedLearningTask
from ml.trainers.base import (
    BaseTrainer,
    Session,
    TrainerConfig,
    check_interval,
    check_trainer_config,
    warn_unused,
)
from ml.trainers.parallel import (
    expects_every_gradient,
    full_model_state,
    full_optim_state,
    is_sharded,
    load_full_model_state,
    load_full_optim_state,
    require_every_gradient,
    share_rank_0_buffers,
    wrap_model,
)
from ml.utils.checkpoint import unwrap_model
from ml.utils.data import (
    ResumableSampler,
    batch_size_of,
    check_prefetch_factor,
    move_to,
    prepare_worker_processes,
    rest_of_epoch,
    resumable_loader,
)
from ml.utils.distributed import all_gather_object, all_max, get_rank, get_world_size
from ml.utils.ema import WeightAverage
from ml.utils.grad_norm import clip_grads_with_norm_, tensor_norms
from ml.utils.malloc import tune_malloc
from ml.utils.nonfinite import NonFiniteRecord, all_finite, float_buffers, present_grads
from ml.utils.precision import PRECISIONS, MixedPrecision
from ml.utils.progress import TrainingBar, expected_total, progress
from ml.utils.seeding import deterministic_algorithms, generators_of_their_own
from ml.utils.streaming import TrainStream, begin_pass, eval_loader, is_stream

logger = logging.getLogger(__name__)

Batches = list[Any]


@dataclass
class EmaConfig:
    decay: float | None = conf_field(
        None, help="Keep an exponential moving average of the weights with this decay (e.g. 0.999)"
    )
    start_step: int = conf_field(0, help="The first optimizer step averaged (the average starts as a copy)")
    every_n_steps: int = conf_field(1, help="Average every N optimizer steps")
    use_for_eval: bool = conf_field(False, help="Validate and test with the averaged weights")


@dataclass
class SupervisedLearningTrainerConfig(TrainerConfig):
    batches_per_step: int = conf_field(1, help="Batches whose gradients are accumulated per optimizer step")
    clip_grad_norm: float | None = conf_field(None, help="Clip the gradient norm to this value (and log it)")
    precision: str = conf_field("fp32", help="fp32, bf16 or fp16 (autocast; fp16 adds a gradient scaler)")
    compile_model: bool = conf_field(False, help="Train the model through torch.compile")
    deterministic: bool = conf_field(False, help="Use only deterministic kernels (bit-exact resume)")
    valid_every_n_steps: int | None = conf_field(None, help="Validate every N training steps")
    valid_every_n_seconds: float | None = conf_field(None, help="Validate every N seconds of training")
    valid_at_end: bool = conf_field(True, help="Validate once more when training ends")
    test_at_end: bool = conf_field(True, help="Run the test set when training ends")
    non_finite_loss: str = conf_field(
        "stop", help="On a NaN/inf loss: `stop` with an error, or `skip` the step"
    )
    check_grads: bool = conf_field(
        False,
        help="Also check every step's gradient norm for NaN/inf before the update (one pass over the "
        "gradients; always on with clip_grad_norm)",
    )
    ema: EmaConfig = conf_field(EmaConfig(), help="A moving average of the weights (`ml export --ema`)")


def _as_loss_dict(losses: torch.Tensor | dict[str, torch.Tensor], task: Any) -> dict[str, torch.Tensor]:
    """The losses by name, each a scalar; anything else is refused before it is trained on.

    A loss of several elements (``reduction="none"``) would be summed into the gradient and the
    logs without a word: a silently wrong number, so it is bad input naming the task and shape.
    """
    if isinstance(losses, torch.Tensor):
        losses = {"loss": losses}
    elif not (
        isinstance(losses, dict) and losses and all(isinstance(v, torch.Tensor) for v in losses.values())
    ):
        raise TypeError(
            f"compute_loss must return a tensor or a non-empty dict of tensors, got {losses!r:.80}"
        )
    for name, value in losses.items():
        if value.numel() != 1:
            raise ConfigError(
                f"{type(task).__name__}.compute_loss returned {name!r} of shape {tuple(value.shape)}, not a "
                "scalar: reduce it (e.g. .mean()) so that batches of every size weigh what they should"
            )
    return losses


class _Throughput:
    """Training steps and samples per second since the previous write (evaluated only when a logger
    writes); the time spent validating and saving checkpoints in between (:meth:`paused`) is left out,
    as Lightning's throughput leaves it: a write after a long validation showed a fraction of the
    rate training ran at."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.last = (state.num_steps, state.num_samples, time.monotonic())
        self.rates = (0.0, 0.0)
        self.paused_s = 0.0  # since the previous update

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.paused_s += time.monotonic() - start

    def _update(self) -> None:
        steps, samples, then = self.last
        now = time.monotonic()
        seconds = now - then - self.paused_s
        if seconds > 0 and self.state.num_steps > steps:
            self.rates = (
                (self.state.num_steps - steps) / seconds,
                (self.state.num_samples - samples) / seconds,
            )
            self.last = (self.state.num_steps, self.state.num_samples, now)
            self.paused_s = 0.0

    def steps_per_s(self) -> float:
        self._update()
        return self.rates[0]

    def samples_per_s(self) -> float:
        self._update()
        return self.rates[1]


def _to_float32(value: Any) -> Any:
    """``value`` with every half-precision tensor (nested in lists, tuples, dicts) cast to float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
    if isinstance(value, dict):
        return {k: _to_float32(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float32(v) for v in value)
    return value


_NO_CONTEXT = contextlib.nullcontext()  # reusable: it holds no state


def _scalar(value: torch.Tensor) -> torch.Tensor:
    """``value.sum()``; a scalar as it is (the same number, without a kernel launch)."""
    return value if value.dim() == 0 else value.sum()


def _summed(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sum of every loss's elements (in float32 or wider): what the backward pass starts from."""
    if len(losses) == 1:
        return _scalar(next(iter(losses.values())).float())
    return torch.stack([v.float().sum() for v in losses.values()]).sum()


def _with_total(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adds the summed loss (``loss``, or ``total_loss`` if a part is called ``loss``) to named parts."""
    if len(losses) == 1 and "loss" in losses:
        return losses
    total = torch.stack([v.float().sum() for v in losses.values()]).sum()
    return {**losses, ("total_loss" if "loss" in losses else "loss"): total}


def _in_step(batches: Iterable[Any], what: str) -> Iterator[Any]:
    """A stream's evaluation batches under FSDP, whose forward passes are collective: the ranks
    agree before each (one all-reduce); a rank whose shard ran out while another's goes on gets None
    (it joins their pass with a stand-in), until no rank has a batch left.

    Raises:
        ConfigError: A rank's shard has no batch at all (it has nothing to join with).
    """
    iterator = iter(batches)
    first = True
    while True:
        batch = next(iterator, _NO_BATCH)
        has = batch is not _NO_BATCH
        any_has, any_lacks = all_max([float(has), float(not has)])
        if not any_has:
            return
        if first and any_lacks:
            raise ConfigError(
                f"{what} gave at least one rank no batch: under trainer.parallel=fsdp every rank "
                "takes part in each forward pass; give it more samples, or fewer loader workers"
            )
        first = False
        yield batch if has else None


_NO_BATCH = object()


def _check_config(config: SupervisedLearningTrainerConfig) -> None:
    check_trainer_config(config)
    check_interval("trainer.valid_every_n_steps", config.valid_every_n_steps)
    check_interval("trainer.valid_every_n_seconds", config.valid_every_n_seconds)
    if config.non_finite_loss not in ("stop", "skip"):
        raise ConfigError(f"trainer.non_finite_loss must be 'stop' or 'skip', got {config.non_finite_loss!r}")
    if config.precision not in PRECISIONS:
        raise ConfigError(
            f"trainer.precision must be one of {', '.join(PRECISIONS)}, got {config.precision!r}"
        )
    if config.batches_per_step < 1:
        raise ConfigError(f"trainer.batches_per_step must be positive, got {config.batches_per_step}")
    if config.clip_grad_norm is not None and config.clip_grad_norm <= 0:
        raise ConfigError(f"trainer.clip_grad_norm must be positive, got {config.clip_grad_norm}")
    if config.precision != "fp32" and config.use_double_weight_precision:
        raise ConfigError("trainer.precision must be fp32 when use_double_weight_precision is set")
    ema = config.ema
    if ema.decay is None:
        names = ("start_step", "every_n_steps", "use_for_eval")
        warn_unused("trainer.ema", "decay", ema, EmaConfig(), names)
    else:
        if not 0.0 <= ema.decay < 1.0:
            raise ConfigError(f"trainer.ema.decay must be in [0, 1), got {ema.decay}")
        if ema.start_step < 0 or ema.every_n_steps < 1:
            raise ConfigError(
                "trainer.ema.start_step must be 0 or more and trainer.ema.every_n_steps positive, "
                f"got {ema.start_step} and {ema.every_n_steps}"
            )
        if config.parallel == "fsdp":
            raise ConfigError("trainer.ema does not work with trainer.parallel=fsdp yet: use ddp, or no ema")


@dataclass
class _Session(Session):
    """A supervised session: the data, and the model as the loop and the evaluation run it."""

    train_loader: DataLoader
    valid_loaders: dict[str, DataLoader]  # by set name ("" for one unnamed set); empty: none
    test_loaders: dict[str, DataLoader]
    runner: nn.Module  # the model the training steps run: wrapped, compiled
    evaluator: nn.Module  # the model evaluation runs (never the DDP wrapper)


@register_trainer("sl", SupervisedLearningTrainerConfig)
class SupervisedLearningTrainer(
    BaseTrainer[SupervisedLearningTrainerConfig, BaseModel, SupervisedLearningTask]
):
    """Trains a model on a :class:`SupervisedLearningTask`.

    Attributes:
        final_metrics: The latest validation and test metrics (the final ones once training ends);
            a key of another namespace than the phase's names its phase: ``valid:task/acc``.
    """

    task_type = SupervisedLearningTask

    def __init__(self, config: SupervisedLearningTrainerConfig) -> None:
        super().__init__(config)
        _check_config(config)
        self.final_metrics: dict[str, float] = {}
        self.num_skipped_steps = 0  # steps dropped for non-finite values (non_finite_loss=skip)
        # What the step loop reads, as plain values: reading a config node costs microseconds,
        # which a loop of small steps feels.
        self._batches_per_step = int(config.batches_per_step)
        self._clip_grad_norm = config.clip_grad_norm
        # The gradient norm is measured at every step only when something needs it before the
        # update; otherwise only when a logger writes it (a pass over the gradients costs 1-2% of
        # a small model's step on the CPU).
        self._norm_every_step = config.clip_grad_norm is not None or config.check_grads
        self._valid_every = (config.valid_every_n_steps, config.valid_every_n_seconds)
        self._dtype = torch.float64 if config.use_double_weight_precision else torch.float32
        self._parts: tuple[nn.Module, nn.Module, list[nn.Parameter]] | None = None  # _parts_of
        self._non_finite: NonFiniteRecord | None = None  # this loop's steps, on the device (_settle)
        self._sharded = False  # FSDP: the gradients are DTensors (set for each loop)
        self._every_gradient_unchecked = False  # DDP waits for every gradient: checked at the first step
        self._fused_step: FusedAdamStep | None = None  # set for each session's loop (see loop)
        self._checks_on_host = False  # whether the non-finite check reads the loss (see _loop)
        self._step_grad_norm: torch.Tensor | None = None  # the last step's, if it measured it
        self._throughput: _Throughput | None = None  # the loop's steps/s and samples/s
        self.precision = MixedPrecision(config.precision, self.device)
        self._data_seed = 0
        self._last_valid = (-1, 0.0)  # (step, elapsed seconds) of the last validation
        self._abandoned_valid: int | None = None  # the step whose validation a stop signal abandoned
        self.ema: WeightAverage | None = None  # trainer.ema's average, made by set_up

    # -- checkpoint extras: the gradient scaler and where the data order stands

    def update_state_dict(self, state_dict: dict) -> None:
        state = State.from_json(state_dict["state"])
        state_dict["sampler"] = {
            "seed": self._data_seed,
            "epoch": state.num_epochs,
            "position": state.num_epoch_samples,
        }
        if self._train_stream is not None:  # every rank's place in the stream (see gather_checkpoint_parts)
            gathered, self._stream_ranks = self._stream_ranks, None
            state_dict["stream"] = gathered if gathered is not None else self._train_stream.gather()
        if self.precision.scaler is not None:
            state_dict["grad_scaler"] = self.precision.state_dict()
        state_dict["skipped_steps"] = self.num_skipped_steps
        state_dict["last_valid_step"], state_dict["last_valid_time_s"] = self._last_valid
        state_dict["abandoned_valid_step"] = self._abandoned_valid
        if self.ema is not None:
            state_dict["ema"] = self.ema.state_dict()
        if self.finished:
            state_dict["final_metrics"] = dict(self.final_metrics)

    # -- FSDP: checkpoints hold full (unsharded) weights and optimizer state, gathered by all ranks

    def gather_checkpoint_parts(self, model: BaseModel, optims: Any) -> tuple[Any, Any]:
        # A streamed training set: each rank's place in its own shard, gathered for rank 0 to save.
        self._stream_ranks = self._train_stream.gather() if self._train_stream is not None else None
        if is_sharded(model) and self.distributed:  # the buffers saved are rank 0's, whichever rank writes
            share_rank_0_buffers(model)
        if not is_sharded(model) or self.checkpoint_format == "sharded":  # sharded: no tensor is gathered
            return super().gather_checkpoint_parts(model, optims)
        return full_model_state(model), None if optims is None else full_optim_state(model, optims)

    def restore_model_state(self, model: BaseModel, state: Any, *, strict: bool) -> list[str]:
        if not is_sharded(model):
            return super().restore_model_state(model, state, strict=strict)
        try:
            return load_full_model_state(model, dict(state), strict=strict)
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(
                f"the checkpoint's weights do not fit the model: {str(e).splitlines()[0]}"
            ) from e

    def restore_optim_state(self, model: BaseModel, optims: Any, state: Any) -> None:
        """Loads either form: torch's (parameters by position) or FSDP's (parameters by name)."""
        by_name = bool(state.get("param_groups")) and any(
            isinstance(p, str) for group in state["param_groups"] for p in group["params"]
        )
        if by_name:
            load_full_optim_state(model, optims, state)
        elif is_sharded(model):
            raise CheckpointError(
                "the checkpoint's optimizer state was saved without FSDP and cannot be sharded; "
                "resume with trainer.parallel=ddp, or start from its weights (checkpoint.load_from_ckpt_path)"
            )
        else:
            super().restore_optim_state(model, optims, state)

    def load_state_dict(self, state_dict: dict) -> None:
        sampler = state_dict.get("sampler")
        if sampler is not None and sampler.get("seed") != self._data_seed:
            logger.warning("task.seed changed since the checkpoint: the data order of this epoch changes too")
        if self._train_stream is not None:  # this rank's place in its shard of the stream
            state = State.from_json(state_dict["state"])
            self._train_stream.resume(state_dict.get("stream"), state.num_epochs, state.num_epoch_samples)
        self.precision.load_state_dict(state_dict.get("grad_scaler", {}))
        self.num_skipped_steps = int(state_dict.get("skipped_steps", 0))
        # The time-based cadence counts on from the last validation, as the checkpoints' does: a run
        # stopped more often than the interval would never validate if each session restarted it.
        elapsed = State.from_json(state_dict["state"]).elapsed_time_s
        last_time = state_dict.get("last_valid_time_s")
        self._last_valid = (
            int(state_dict.get("last_valid_step", -1)),
            float(last_time) if last_time is not None else elapsed,
        )
        abandoned = state_dict.get("abandoned_valid_step")
        self._abandoned_valid = int(abandoned) if abandoned is not None else None
        if self.ema is not None:
            if isinstance(state_dict.get("ema"), Mapping):
                self.ema.load_state_dict(dict(state_dict["ema"]))
            else:
                logger.info("The checkpoint has no moving average of the weights: trainer.ema starts one")
        if "final_metrics" in state_dict:
            self.finished = True
            self.final_metrics = {k: float(v) for k, v in state_dict["final_metrics"].items()}

    # -- data

    def _loaders(self, task: SupervisedLearningTask, phase: Phase) -> dict[str, DataLoader]:
        """The phase's data loaders by set name: ``{"": loader}`` for one dataset, one per name for a
        dict of datasets (validation and test: logged as ``valid/<name>/<metric>``), none when the
        task has no such phase. Whatever the trainer cannot use is refused here, before any step.
        """
        where = f"{type(task).__name__}.get_dataset({phase!r})"
        if phase == "train":
            self._train_stream = None  # set again by _stream_loader if this session streams
        try:
            dataset = task.get_dataset(phase)
        except NotImplementedError as e:
            if phase == "train":
                raise ConfigError(f"task {type(task).__name__} has no training data: {e}") from e
            return {}
        if not isinstance(dataset, Mapping):
            return {"": self._loader(task, phase, dataset, where)}
        if phase == "train":
            raise ConfigError(
                f"{where} returned a dict: training takes one dataset (several are for valid/test)"
            )
        if not dataset:
            raise ConfigError(
                f"{where} returned an empty dict: give at least one dataset, or raise NotImplementedError"
            )
        for name in dataset:
            if not isinstance(name, str) or not name or "/" in name:
                raise ConfigError(
                    f"{where} returned a dict with the key {name!r}: name each set with a plain string"
                )
        return {name: self._loader(task, phase, data, f"{where}[{name!r}]") for name, data in dataset.items()}

    def _loader(self, task: SupervisedLearningTask, phase: Phase, dataset: Any, where: str) -> DataLoader:
        if is_stream(dataset):
            return self._stream_loader(task, phase, dataset, where)
        if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise ConfigError(
                f"{where} returned {type(dataset).__name__}, "
                "not a map-style Dataset (with __len__ and __getitem__) nor an IterableDataset"
            )
        if phase != "train" and self.config.parallel == "fsdp":  # every process evaluates a batch or more
            if len(dataset) < get_world_size():
                raise ConfigError(
                    f"{where} has {len(dataset)} samples, fewer than the {get_world_size()} processes: "
                    "under FSDP every process evaluates at least one; use a larger set or fewer processes"
                )
            if task.dataloader_config(phase).drop_last:
                raise ConfigError(
                    f"task.{phase}_dl.drop_last=true under trainer.parallel=fsdp: a process left without a "
                    "batch cannot join the others' (collective) forward passes; set it to false (every "
                    "sample is evaluated)"
                )
        # An evaluation of an empty set logs nothing (and a monitored metric fails late): refused
        # when the phase runs.
        runs = (
            self.config.test_at_end
            if phase == "test"
            else self._valid_every != (None, None) or self.config.valid_at_end
        )
        if phase != "train" and runs and len(dataset) == 0:
            raise ConfigError(
                f"{where} has no samples: give it some, or raise NotImplementedError for no {phase} phase"
            )
        return resumable_loader(
            dataset,
            task.dataloader_config(phase),
            seed=self._data_seed,
            device_type=self.device_type,
            phase=phase,
            owner=type(task).__name__,
            rank=get_rank(),
            world_size=get_world_size(),
            # Every rank takes as many training steps; evaluation covers every sample (under FSDP,
            # ranks with a batch less join the others' last forward passes: _stand_in_passes).
            even=phase == "train",
        )

    # The training data when it is a stream (see _stream_loader), and every rank's place in it,
    # gathered by all ranks for the next checkpoint (see gather_checkpoint_parts).
    _train_stream: TrainStream | None = None
    _stream_ranks: dict[str, Any] | None = None

    def _stream_loader(
        self, task: SupervisedLearningTask, phase: Phase, dataset: Any, where: str
    ) -> DataLoader:
        """An ``IterableDataset``'s loader (:mod:`ml.utils.streaming`): each rank reads its own shard."""
        cfg = task.dataloader_config(phase)
        name = type(task).__name__
        if cfg.shuffle and phase == "train":
            logger.debug("%s streams its training data: shuffling is the dataset's business", name)
        check_prefetch_factor(cfg, phase, name)
        if cfg.num_workers > 0:
            prepare_worker_processes()
        pin = self.device_type == "cuda" if cfg.pin_memory is None else cfg.pin_memory
        rank, world_size = get_rank(), get_world_size()
        if phase != "train":
            return eval_loader(
                dataset,
                batch_size=cfg.batch_size,
                num_workers=cfg.num_workers,
                pin_memory=pin,
                drop_last=cfg.drop_last,
                rank=rank,
                world_size=world_size,
                prefetch_factor=cfg.prefetch_factor,
                cut_short=None if cfg.max_batches is None else f"task.{phase}_dl.max_batches",
            )
        self._train_stream = TrainStream(
            dataset,
            task_name=name,
            where=where,
            seed=self._data_seed,
            rank=rank,
            world_size=world_size,
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            pin_memory=pin,
            drop_last=cfg.drop_last,
            prefetch_factor=cfg.prefetch_factor,
        )
        return self._train_stream.loader

    def _epoch_steps(self, loader: DataLoader, state: State) -> Iterator[Batches]:
        """The rest of the current epoch, as groups of ``batches_per_step`` batches (the last may be short).

        The epoch's order and the workers' seeds depend only on ``(task.seed, epoch)``; the sampler
        starts at the saved position, so resuming skips ahead by index without loading any batch.
        A stream continues from its saved state instead (see :mod:`ml.utils.streaming`).
        """
        stream = self._train_stream
        if stream is not None and loader is stream.loader:
            yield from stream.steps(state.num_epochs, state.num_epoch_samples, self._batches_per_step)
            return
        batches = rest_of_epoch(loader, state.num_epochs, state.num_epoch_samples, self._data_seed)
        if self._batches_per_step == 1:
            for batch in batches:
                yield [batch]
            return
        while group := list(itertools.islice(batches, self._batches_per_step)):
            yield group

    # -- one training step

    def _parts_of(self, model: nn.Module) -> tuple[nn.Module, list[nn.Parameter]]:
        """The model inside its wrappers (DDP, ``torch.compile``), and its parameters.

        Found once per training loop instead of at every step.
        """
        if self._parts is None or self._parts[0] is not model:
            self._parts = (model, unwrap_model(model), list(model.parameters()))
        return self._parts[1:]

    def _losses(
        self, task: SupervisedLearningTask, model: nn.Module, batch: Any, state: State
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The forward pass under autocast, then the loss outside it, on float32 outputs: the losses
        by name, and their sum (what the backward pass starts from).

        Computing the loss in bf16/fp16 loses precision for anything but the few losses autocast
        promotes itself (a defect of the framework we replace).
        """
        with self.precision.autocast():
            output = task.run_model(model, batch, state)
        if self.precision.dtype is not None:
            output = _to_float32(output)
        losses = task.compute_loss(model, batch, state, output)
        if isinstance(losses, torch.Tensor) and losses.dim() == 0:  # the usual: one scalar loss
            return {"loss": losses}, losses.float()
        loss_dict = _as_loss_dict(losses, task)
        return loss_dict, _summed(loss_dict)

    def _one_batch(
        self,
        state: State,
        batch: Any,
        task: SupervisedLearningTask,
        model: nn.Module,
        optim: Optimizer,
        share: float,
    ) -> dict[str, torch.Tensor]:
        """Forward and backward over one batch (the usual step); returns its losses, detached.

        The gradient is of the loss times ``share``, this rank's part of the job's step (see
        :meth:`_train_step`).
        """
        batch = move_to(batch, self.device, self._dtype)
        loss_dict, loss = self._losses(task, model, batch, state)
        # After the forward pass, as a plain loop does: the last step's gradients are freed just
        # before the new ones are made, which then reuse their memory (freed before the forward,
        # the activations took it, and glibc's malloc page-faulted twice as often: 0.87x a plain
        # loop on 1024-wide layers).
        clear_grads(optim)
        self.precision.backward(loss if share == 1.0 else loss * share)
        return {name: _scalar(value.detach().float()) for name, value in loss_dict.items()}

    def _accumulated(
        self,
        state: State,
        batches: Batches,
        task: SupervisedLearningTask,
        model: nn.Module,
        optim: Optimizer,
        share: float,
    ) -> dict[str, torch.Tensor]:
        """Forward and backward over several batches, one gradient; returns the mean losses.

        Each batch's loss is weighted by its share of the step's samples, so accumulating k batches
        gives the gradient of one batch k times as large; the gradient is of that mean times
        ``share``, this rank's part of the job's step (see :meth:`_train_step`).
        """
        total = sum(batch_size_of(b) for b in batches)
        losses: dict[str, torch.Tensor] = {}
        no_sync = getattr(model, "no_sync", None)  # DDP: all-reduce gradients once, after the last batch
        # What the task and model log in each micro-batch, averaged over the step like the loss.
        sources = self._micro_batch_sources(task, model)
        logged: dict[str, list[tuple[float, ScalarValue]]] = {}
        for i, batch in enumerate(batches):
            weight = batch_size_of(batch) / total
            batch = move_to(batch, self.device, self._dtype)
            last = i == len(batches) - 1
            with no_sync() if no_sync is not None and not last else _NO_CONTEXT:
                loss_dict, loss = self._losses(task, model, batch, state)
                if i == 0:
                    clear_grads(optim)  # after the forward pass: see _one_batch
                self.precision.backward(loss * (weight * share))
            for name, value in loss_dict.items():
                part = _scalar(value.detach().float())
                losses[name] = losses.get(name, 0.0) + part * weight
            for source in sources:
                for key, scalar in source.pop_scalars().items():
                    logged.setdefault(key, []).append((weight, scalar))
        for key, parts in logged.items():  # back where they were logged, as one value for the step
            namespace, _, name = key.partition("/")
            task.logger.log_scalar(name, weighted_mean(parts), namespace=namespace)
        return losses

    def _train_step(
        self,
        state: State,
        batches: Batches,
        task: SupervisedLearningTask,
        model: nn.Module,
        optim: Optimizer,
        lr_sched: SchedulerAdapter,
    ) -> dict[str, torch.Tensor]:
        """Forward and backward over ``batches``, then one optimizer step; returns the mean losses."""
        inner, all_params = self._parts_of(model)
        # A hook that left the model in eval mode (evaluations restore the modes themselves); a
        # submodule alone in eval mode is the user's choice (a frozen batch norm) and stays so.
        if not inner.training:
            model.train()
        # DDP and FSDP average the ranks' gradients as equals. Each rank's step covers as many
        # samples, but for a stream's last step of an epoch, whose batches may differ in size from
        # rank to rank: there each rank's loss is weighted by its share of the job's samples, so
        # that the gradient is their mean (and so are the values logged for the step).
        share = self.rank_weight()
        if len(batches) == 1:
            losses = self._one_batch(state, batches[0], task, model, optim, share)
        else:
            losses = self._accumulated(state, batches, task, model, optim, share)
        if self._every_gradient_unchecked:  # before the update, which DDP would not have averaged
            self._every_gradient_unchecked = False
            require_every_gradient(inner, f"step {state.num_steps + 1}")
        step_loss = (
            next(iter(losses.values())) if len(losses) == 1 else torch.stack(list(losses.values())).sum()
        )
        self.precision.unscale_(optim)
        # Whether to step is decided on the device, without a host sync (ml.utils.nonfinite);
        # _settle reads the record when logs are written. Under fp16 the gradient scaler skips steps
        # with non-finite gradients itself (a NaN loss makes them NaN): there only the loss counts.
        record = self._non_finite
        assert record is not None
        if record.full:
            self._settle()
        scaler = self.precision.scaler
        whole_norm = norms = which = None
        if self._norm_every_step:
            grad_norm, norms, which = self._grad_norm(all_params)
            whole_norm = self._whole(grad_norm)
            if self._clip_grad_norm is not None:  # (a NaN norm makes every gradient NaN: skipped anyway)
                self._clip(all_params, grad_norm)
        self._step_grad_norm = whole_norm  # logged by _log_step if a logger writes
        checked = None if scaler is not None else whole_norm
        if self._checks_on_host:
            step_now = record.check_on_host(state.num_steps + 1, step_loss, checked, norms, which)
        else:
            found_inf = record.found_inf(step_loss, checked)
            if self.distributed:  # all ranks skip or stop together, or their weights would part
                torch.distributed.all_reduce(found_inf, op=torch.distributed.ReduceOp.MAX)
            record.record(state.num_steps + 1, found_inf, step_loss, whole_norm, norms, which)
        lr_sched.step(state)
        if scaler is not None:
            self.precision.step(optim)
        elif self._checks_on_host:
            if step_now:
                optim.step()
            else:
                self._settle()  # a stop is raised now; a skip is counted
        elif self._fused_step is not None:
            self._fused_step(found_inf)
        else:
            step_skipping(optim, found_inf)
        return losses

    def _log_step(
        self, state: State, task: SupervisedLearningTask, losses: dict[str, torch.Tensor], lr: float
    ) -> None:
        """What the trainer logs of a step, when a logger writes it (else nothing is made of it)."""
        for name, value in _with_total(losses).items():
            task.logger.log_scalar(name, value, namespace="train")
        # Measured now from the step's gradients (kept until the next step) unless the step did.
        norm = self._step_grad_norm
        self.logger.log_scalar("grad_norm", norm if norm is not None else self._last_grad_norm())
        self.logger.log_scalar("lr", lr)
        self.logger.log_scalar("epoch", state.num_epochs)
        throughput = self._throughput
        assert throughput is not None
        self.logger.log_scalar("samples_per_s", throughput.samples_per_s)
        self.logger.log_scalar("steps_per_s", throughput.steps_per_s)
        if self.num_skipped_steps:  # at every write from the first skip on, whatever read the record
            self.logger.log_scalar("skipped_steps", self.num_skipped_steps)

    def _grad_norm(
        self, params: list[nn.Parameter]
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...] | None]:
        """The whole gradient norm; each gradient's (to name the first module whose gradient is not
        finite), and whose they are when some parameters have none (frozen; None: every one's)."""
        grads, which = present_grads(params)
        if self._sharded:  # FSDP's gradients are DTensors, whose norm each rank holds a part of
            return nn.utils.get_total_norm(grads), None, None
        norms = tensor_norms(grads)
        return torch.linalg.vector_norm(norms), norms, which

    def _clip(self, params: list[nn.Parameter], grad_norm: torch.Tensor) -> None:
        max_norm = self._clip_grad_norm
        assert max_norm is not None
        if self._sharded:  # torch's clipping knows DTensors
            nn.utils.clip_grads_with_norm_(params, max_norm, grad_norm)
        else:
            grads = [g for p in params if (g := p.grad) is not None]
            clip_grads_with_norm_(grads, max_norm, grad_norm)

    @staticmethod
    def _whole(norm: torch.Tensor) -> torch.Tensor:
        """FSDP's norm (a DTensor) gathered: the number every rank decides and logs."""
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def _last_grad_norm(self) -> torch.Tensor:
        """The last step's gradient norm, measured now."""
        assert self._parts is not None
        return self._whole(self._grad_norm(self._parts[2])[0])

    def _micro_batch_sources(self, task: SupervisedLearningTask, model: nn.Module) -> list[MultiLogger]:
        """The loggers a step's forward and loss log into: the task's, and the model's if it has one."""
        own = getattr(unwrap_model(model), "logger", None)
        return [task.logger, *([own] if isinstance(own, MultiLogger) and own is not task.logger else [])]

    def _settle(self) -> None:
        """Reads which steps since the last read had non-finite values (one host read): stops at the
        first (``non_finite_loss=stop``, naming the step and the first module with a non-finite
        gradient) or counts them as skipped (``skip``; their updates were skipped on the device)."""
        record = self._non_finite
        if record is None or not record.pending:
            return
        bad = record.read()
        if not bad:
            return
        where = " on at least one rank" if self.distributed else ""
        first = bad[0]
        message = f"non-finite values at step {first.step}{where} ({first.describe()})"
        self._check_weights(message)  # skipping more steps cannot mend them
        if self.config.non_finite_loss == "stop":
            later = f"; {len(bad) - 1} later step(s) too" if len(bad) > 1 else ""
            raise NonFiniteLossError(f"{message}{later}; set trainer.non_finite_loss=skip to skip such steps")
        self.num_skipped_steps += len(bad)
        steps = ", ".join(str(b.step) for b in bad[:10]) + (", ..." if len(bad) > 10 else "")
        logger.warning("%s: skipped step(s) %s (%d skipped so far)", message, steps, self.num_skipped_steps)

    def _check_weights(self, where: str) -> None:
        """Stops if the weights are not finite: an update the checks did not catch made them so (a
        non-finite gradient with a finite loss at a step whose gradients were not checked, or an
        update that overflowed with finite gradients: checked gradients do not make finite weights)."""
        if self._parts is None:  # no step of this loop yet (a stop at start-up): the weights as loaded
            return
        _, inner, params = self._parts
        if all_finite([*params, *float_buffers(inner)], self.distributed):
            return
        hint = (
            ""
            if self._norm_every_step
            else "; set trainer.check_grads=true to check every step's gradients (and name the step)"
        )
        raise NonFiniteLossError(
            f"{where}: the weights themselves are no longer finite (or a buffer such as a batch norm's "
            "running statistics): an update the checks did not catch made them so (a non-finite gradient "
            "with a finite loss, or an update that overflowed: too large a learning rate, Adam's eps=0), "
            f"or a batch that was not finite{hint}"
        )

    def rank_weight(self) -> float:
        """This rank's share of the step's samples (a stream's: see _train_step)."""
        stream = self._train_stream
        return stream.rank_share if stream is not None else 1.0

    def _logs_due(self, state: State, last: bool) -> bool:
        """Whether the trainer's loggers write at this step (then the device's values are read anyway)."""
        if self.distributed:
            return last or self._write_due
        return last or any(lg.should_write(state) for lg in self.loggers)

    def save_checkpoint(
        self,
        state: State,
        task: SupervisedLearningTask,
        model: BaseModel,
        optims: Any = None,
        lr_scheds: Any = None,
    ) -> Path:
        self._settle()  # a stop is due before the step's checkpoint; skipped steps are counted in it
        if self._non_finite is not None:  # (in the loop: weights that are not finite are never saved)
            self._check_weights(f"at step {state.num_steps}")
        return super().save_checkpoint(state, task, model, optims, lr_scheds)

    # -- evaluation

    @torch.no_grad()
    def evaluate(
        self,
        phase: Phase,
        loaders: DataLoader | Mapping[str, DataLoader],
        task: SupervisedLearningTask,
        model: nn.Module,
        state: State,
    ) -> dict[str, float] | None:
        """Runs whole validation or test sets; returns (and logs) their sample-weighted mean metrics.

        Everything the task logs while evaluating (losses, accuracy, ...) is averaged over samples.
        Several named sets (``{"clean": ..., "noisy": ...}``) are each averaged on their own and
        logged together, in one record, as ``valid/clean/loss``, ``valid/noisy/loss``, ... (a key of
        another namespace likewise: ``model/clean/mean``).
        A stop signal abandons the pass at the next batch (None is returned, nothing is logged).
        """
        sets = {"": loaders} if isinstance(loaders, DataLoader) else dict(loaders)
        if self.distributed and is_sharded(model):
            share_rank_0_buffers(model)
        state.set_phase(phase)
        metrics: dict[str, float] = {}
        with eval_mode(model), generators_of_their_own(self._data_seed, state.num_steps):
            for name, loader in sets.items():
                part = self._evaluate_set(phase, name, loader, task, model, state)
                if part is None:  # stopped: a partial pass is not reported (a validation is redone)
                    task.logger.clear()
                    state.set_phase("train")
                    if phase == "valid":
                        self._abandoned_valid = state.num_steps
                    return None
                metrics.update(part)
        for key, mean in metrics.items():
            namespace, _, rest = key.partition("/")
            task.logger.log_scalar(rest, mean, namespace=namespace)
        self.write_logs(task, cast(BaseModel, model), state)
        state.set_phase("train")
        if phase == "valid":
            self._last_valid = (state.num_steps, state.elapsed_time_s)
            self._abandoned_valid = None
        # A key of another namespace (``task/acc``) says its phase, as ``ml runs --metric valid:task/acc``
        # does: the test's would replace the validation's.
        self.final_metrics.update(
            {key if key.startswith(f"{phase}/") else f"{phase}:{key}": mean for key, mean in metrics.items()}
        )
        return metrics

    def _evaluate_set(
        self,
        phase: Phase,
        name: str,
        loader: DataLoader,
        task: SupervisedLearningTask,
        model: nn.Module,
        state: State,
    ) -> dict[str, float] | None:
        """One set's sample-weighted means (``<phase>/<name>/...`` for a named set); None if stopped.

        What the task and the evaluated model log for each batch is averaged over the samples of
        the batches that logged it (a value logged for some batches only is their mean), on every
        rank together.
        """
        sources = self._micro_batch_sources(task, model)
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}  # the samples behind each total
        last_batch: Any = None
        streamed = is_stream(loader.dataset)  # read to exhaustion; how many batches, nobody knows
        # task.<phase>_dl.max_batches: the set's first batches in each process (iterating a
        # loader's first ones only is torch's own early end of an epoch, workers kept or not).
        limit = task.dataloader_config(phase).max_batches
        if streamed:
            begin_pass(loader, self._data_seed)
        else:
            cast(ResumableSampler, loader.sampler).set_epoch(0)
        # FSDP's forward passes are collective: a rank with fewer batches (a set need not split
        # evenly) joins the others' last passes (_stand_in_passes). How many it lacks is agreed
        # now: asked after the pass, it would wait in that agreement while another rank waits in a
        # forward pass for it. A stream's ranks, whose batches nobody counts, agree batch by batch.
        sharded = is_sharded(model) and self.distributed
        count = None if streamed else len(loader) if limit is None else min(len(loader), limit)
        lacking = int(all_max([float(count)])[0]) - count if sharded and count is not None else 0
        description = f"{phase}/{name}" if name else phase
        batches: Iterable[Any] = progress(
            loader if limit is None else itertools.islice(loader, limit),
            total=count,
            description=description,
            enabled=self.config.progress_bar,
        )
        if sharded and streamed:
            batches = _in_step(batches, f"the {description} stream of {type(task).__name__}")
        for batch in batches:
            if self.stop_signal is not None:  # stop promptly
                return None
            if batch is None:  # (a stream under FSDP: this rank's shard ran out, another's goes on)
                self._stand_in_passes(task, model, state, last_batch, 1, sources)
                continue
            batch = move_to(batch, self.device, self.weight_precision)
            loss_dict = _with_total(self._losses(task, model, batch, state)[0])
            for key, value in loss_dict.items():
                task.logger.log_scalar(key, value.detach().float().sum(), namespace=phase)
            size = batch_size_of(batch)
            # Only the scalars are summed per batch; images and strings wait for the pass's write.
            for source in sources:
                for key, scalar in source.pop_scalars().items():
                    totals[key] = totals.get(key, 0.0) + scalar_to_float(scalar) * size
                    counts[key] = counts.get(key, 0) + size
            if phase == "valid":
                state.num_valid_steps += 1
            else:
                state.num_test_steps += 1
            last_batch = batch
        if lacking:
            self._stand_in_passes(task, model, state, last_batch, lacking, sources)
        if self.distributed:  # each rank saw its share of the set: combine every key any rank logged
            parts = all_gather_object((totals, counts))
            keys = dict.fromkeys(key for part_totals, _ in parts for key in part_totals)
            totals = {key: sum(part_totals.get(key, 0.0) for part_totals, _ in parts) for key in keys}
            counts = {key: sum(part_counts.get(key, 0) for _, part_counts in parts) for key in keys}
        if not name:
            return {key: total / counts[key] for key, total in totals.items()}
        # A named set's keys carry its name after their namespace (valid/clean/loss, model/clean/mean):
        # the sets are logged together, in one record.
        named = {}
        for key, total in totals.items():
            namespace, _, rest = key.partition("/")
            named[f"{namespace}/{name}/{rest}" if rest else f"{name}/{key}"] = total / counts[key]
        return named

    def _stand_in_passes(
        self,
        task: SupervisedLearningTask,
        model: nn.Module,
        state: State,
        batch: Any,
        lacking: int,
        sources: list[MultiLogger],
    ) -> None:
        """Under FSDP, a rank that evaluated ``lacking`` batches fewer than another runs its last
        batch again as often, to join the others' (collective) forward passes; what those passes
        log (scalars, images, ...) is dropped."""
        with contextlib.ExitStack() as stack:
            for source in sources:
                stack.enter_context(source.discarding())
            for _ in range(lacking):
                self._losses(task, model, batch, state)

    def _evaluated(self, s: _Session) -> nn.Module:
        """The model validation and test run: the moving average with ``trainer.ema.use_for_eval``,
        once it has begun (before its first update it is the untrained copy), else the trained one."""
        ema = self.ema
        if ema is not None and ema.num_updates > 0 and self.config.ema.use_for_eval:
            return ema.model
        return s.evaluator

    def _validate(self, state: State, s: _Session) -> None:
        """Validates; the metrics then rank the checkpoint and count early stopping's patience."""
        metrics = self.evaluate("valid", s.valid_loaders, s.task, self._evaluated(s), state)
        if metrics is not None:
            self.judge_evaluation(state, metrics, s)

    def _validate_saved_step(self, state: State, s: _Session) -> None:
        """Validates a step whose checkpoint is saved already, then saves it again once the
        validation completed: the checkpoint then says the step was validated, so continuing from
        it after a ``kill -9`` does not validate (and log) the step a second time."""
        self._validate(state, s)
        if self._last_valid[0] == state.num_steps:
            self.save_checkpoint(state, s.task, s.model, s.optim, s.lr_sched)
            self.wait_for_checkpoint()  # on disk before anything else may be logged (async_save)

    def _should_validate(self, state: State) -> bool:
        (every_n_steps, every_n_seconds), (last_step, last_time) = self._valid_every, self._last_valid
        if last_step == state.num_steps:
            return False
        if every_n_steps and state.num_steps % every_n_steps == 0:
            return True
        return bool(every_n_seconds and state.elapsed_time_s - last_time >= every_n_seconds)

    # -- the session: set-up, loop, finish

    @contextlib.contextmanager
    def training_context(self) -> Iterator[None]:
        with super().training_context(), deterministic_algorithms(self.config.deterministic):
            yield

    def set_up(
        self,
        model: BaseModel,
        task: SupervisedLearningTask,
        optimizer: BaseOptimizer,
        lr_scheduler: BaseLRScheduler,
    ) -> _Session:
        """Device and precision, optimizer and schedule, data; nothing is written to disk."""
        if self.config.tune_malloc:
            tune_malloc()
        self._data_seed = task.config.seed
        self.setup_distributed()
        model.to(device=self.device, dtype=self.weight_precision)
        task.to(self.device)
        wrapped = wrap_model(
            model,
            self.device,
            self.config.parallel,
            distributed=self.distributed,
            fsdp=self.config.fsdp,
            ddp=self.config.ddp,
            activation_checkpointing=self.config.activation_checkpointing,
        )
        self._every_gradient_unchecked = expects_every_gradient(wrapped)
        optim = optimizer.get(model)
        if self.config.fast_optimizer:
            use_fast_optimizer(optim)
        lr_sched = lr_scheduler.get(optim)
        train_loader = self._loaders(task, "train")[""]
        runner = cast(nn.Module, torch.compile(wrapped)) if self.config.compile_model else wrapped
        # Evaluation runs the model without the DDP wrapper, whose forward may sync buffers
        # across ranks (a collective that ranks with fewer batches would never join).
        evaluator: nn.Module = model
        if self.distributed and self.config.compile_model:
            evaluator = cast(nn.Module, torch.compile(model))
        elif not self.distributed:
            evaluator = runner
        ema = self.config.ema
        if ema.decay is not None:
            self.ema = WeightAverage(
                model, decay=ema.decay, start_step=ema.start_step, every_n_steps=ema.every_n_steps
            )
            max_steps = task.config.max_steps
            if max_steps is not None and ema.start_step >= max_steps:
                logger.warning(
                    "trainer.ema.start_step=%d is not before task.max_steps=%d: the average never starts "
                    "(validation and test use the trained weights, and there is nothing to export)",
                    ema.start_step,
                    max_steps,
                )
        valid_loaders = self._loaders(task, "valid")
        every = self._valid_every
        self.check_monitors(
            "valid/",
            bool(valid_loaders) and any(every),
            "set trainer.valid_every_n_steps (or valid_every_n_seconds)"
            if valid_loaders
            else f"{type(task).__name__} has no validation data (get_dataset('valid'))",
        )
        return _Session(
            model,
            task,
            optim,
            lr_sched,
            seed=task.config.seed,
            train_loader=train_loader,
            valid_loaders=valid_loaders,
            test_loaders=self._loaders(task, "test"),
            runner=runner,
            evaluator=evaluator,
        )

    def close(self, s: Session) -> None:
        self._parts = None  # the step loop's lists of the model's modules and parameters
        self._fused_step = None
        self._non_finite = None
        self._train_stream = None  # its loader's worker processes end with it

    def loop(self, state: State, s: Session) -> None:
        with TrainingBar(state, enabled=self.config.progress_bar) as bar:  # closed however the loop ends
            self._loop(state, s, bar)

    def _steps_per_epoch(self, loader: DataLoader) -> int | None:
        """Training steps in an epoch; None for a stream without a length."""
        try:
            return math.ceil(len(loader) / self.config.batches_per_step)
        except (TypeError, NotImplementedError):
            return None

    @staticmethod
    def _ends_last_epoch(state: State, max_epochs: int, epoch_steps: int) -> bool:
        """Whether the step just taken ends the epoch that reaches ``task.max_epochs`` (the epoch count
        reaches it only after the step, when the epoch is over)."""
        return state.num_epoch_steps >= epoch_steps and state.num_epochs + 1 >= max_epochs

    def _bar_total(self, state: State, s: _Session) -> int | None:
        """Where the training bar ends: ``task.max_steps``, else what max_samples or max_epochs come to."""
        loader, per_step = s.train_loader, self.config.batches_per_step
        steps_per_epoch = self._steps_per_epoch(loader)
        epoch_samples = getattr(getattr(loader, "sampler", None), "num_samples", None)  # every rank's
        if steps_per_epoch and isinstance(epoch_samples, int):
            samples_per_step: float = epoch_samples / steps_per_epoch  # the last step may be short
        else:
            samples_per_step = (getattr(loader, "batch_size", None) or 1) * per_step * get_world_size()
        cfg = s.task.config
        return expected_total(
            state,
            max_steps=cfg.max_steps,
            max_samples=cfg.max_samples,
            samples_per_step=samples_per_step,
            max_epochs=cfg.max_epochs,
            steps_per_epoch=steps_per_epoch,
        )

    def _loop(self, state: State, s: Session, bar: TrainingBar) -> None:
        assert isinstance(s, _Session)
        task, model, optim, lr_sched = s.task, s.model, s.optim, s.lr_sched
        if self.finished and self.training_over(state, task):
            logger.info("This run already finished at step %d: nothing to do", state.num_steps)
            return
        self.finished = False
        # Made after the checkpoint's optimizer state is loaded: it holds on to the state tensors.
        # A gradient scaler steps through torch (it passes its scale to the fused kernel).
        if self.config.fast_optimizer and self.precision.scaler is None:
            self._fused_step = FusedAdamStep(optim)
        names = [name for name, _ in unwrap_model(s.runner).named_parameters()]
        self._non_finite = NonFiniteRecord(names, self.device)
        # An optimizer that cannot take the skip flag on the device reads it on the host before each
        # step anyway (step_skipping): then the step's loss is read instead, and no flag is made.
        self._checks_on_host = (
            not self.distributed
            and self.precision.scaler is None
            and self._fused_step is None
            and not skips_on_device(optim)
        )
        self._sharded = is_sharded(s.model)
        if s.valid_loaders and self._abandoned_valid == state.num_steps:
            # A stop signal ended the last session during this step's validation (the checkpoint for
            # the signal holds the step, and says so): it is run now.
            self._validate_saved_step(state, s)
        self._throughput = throughput = _Throughput(state)
        bar.start(self._bar_total(state, s))
        world_size = get_world_size()
        # Only a run limited by epochs of a known length ends with an epoch's last step.
        max_epochs = task.config.max_epochs
        epoch_steps = self._steps_per_epoch(s.train_loader) if max_epochs is not None else None
        while not self.training_over(state, task) and self.stop_signal is None:
            if state.num_epoch_samples == 0:
                self.on_epoch_start(state, task, model, optim, lr_sched)
            for batches in self._epoch_steps(s.train_loader, state):
                self.on_step_start(state, task, model, optim, lr_sched)
                loss_dict = self._train_step(state, batches, task, s.runner, optim, lr_sched)
                # Every rank's step covers as many samples (see ResumableSampler): count them all; a
                # stream's ranks agreed on theirs (their last batches may differ).
                stream = self._train_stream
                samples = (
                    stream.step_samples
                    if stream is not None
                    else sum(map(batch_size_of, batches)) * world_size
                )
                state.num_steps += 1
                state.num_epoch_steps += 1
                state.num_samples += samples
                state.num_epoch_samples += samples
                if self.ema is not None:
                    self.ema.update(state.num_steps)
                self.on_step_end(state, loss_dict, task, model, optim, lr_sched)
                last = (
                    self.stop_signal is not None
                    or task.is_training_over(state)
                    or (epoch_steps is not None and self._ends_last_epoch(state, max_epochs, epoch_steps))
                )
                validating = bool(s.valid_loaders) and self._should_validate(state)
                # The last step is always written, and so is a step whose validation may stop the
                # run early (before that validation, which ends the run at this step).
                written = last or (validating and self.early_stopping is not None)
                due = self._logs_due(state, written)
                if due:
                    self._settle()
                    self._log_step(state, task, loss_dict, lr_sched.lr)
                self.write_logs(task, model, state, final=written, due=due)
                if last or state.num_steps >= bar.due:  # an int compare; the loss is read on a redraw only
                    bar.update({"epoch": state.num_epochs, **loss_dict}, force=last)
                # (Settled first: waiting for the device to finish the training steps queued is
                # training's time, not the pause's.)
                if validating:
                    self._settle()
                    with throughput.paused():
                        self._validate(state, s)
                if self.should_checkpoint(state):
                    self._settle()
                    with throughput.paused():
                        self.save_checkpoint(state, task, model, optim, lr_sched)
                if self.training_over(state, task) or self.stop_signal is not None:
                    return
            self.on_epoch_end(state, task, model, optim, lr_sched)

    def evaluates_again(self, phase: str, state: State, s: Session) -> bool:
        """A validation a stop signal abandoned at this step is redone first; else the final
        validation and test, where the run ends at this step (:meth:`finish`)."""
        assert isinstance(s, _Session)
        if phase == "valid" and self._abandoned_valid == state.num_steps and s.valid_loaders:
            return True
        at_end, loaders = (
            (self.config.valid_at_end, s.valid_loaders)
            if phase == "valid"
            else (self.config.test_at_end, s.test_loaders)
        )
        return at_end and bool(loaders) and self.training_over(state, s.task)

    def finish(self, state: State, s: Session) -> None:
        """The end of a completed run: final checkpoint, last validation, test pass.

        The checkpoint is saved again afterwards with the final metrics, which marks the run as
        finished: continuing it with the same limits then has nothing to redo. A stop signal that
        abandons the validation or the test leaves the run unfinished, to be finished when it
        continues; one that lets both complete does not (they would be logged twice).
        """
        assert isinstance(s, _Session)
        if self.finished:  # resumed from a finished run: nothing was trained, nothing to finish
            return
        testing = bool(s.test_loaders) and self.config.test_at_end
        if not self.checkpoint_is_current(state):
            self.save_checkpoint(state, s.task, s.model, s.optim, s.lr_sched)
        if s.valid_loaders and self.config.valid_at_end and self._last_valid[0] != state.num_steps:
            if testing:  # a kill during the test then does not validate again
                self._validate_saved_step(state, s)
            else:  # the checkpoint saved next says so
                self._validate(state, s)
        complete = (
            not s.valid_loaders or not self.config.valid_at_end or self._last_valid[0] == state.num_steps
        )
        if testing:
            tested = self.evaluate("test", s.test_loaders, s.task, self._evaluated(s), state) is not None
            complete = complete and tested
        if complete:
            self.finished = True
            self.save_checkpoint(state, s.task, s.model, s.optim, s.lr_sched)
