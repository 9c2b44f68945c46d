"""In-process tests of streamed training data (:mod:`ml.utils.streaming` in the ``sl`` trainer).

The ``ml train`` subprocess tests (worker processes, SIGTERM, kill -9, torchrun) are in
``tests/e2e/test_streaming.py``; here: sharding, epochs, exact resume in the main process, and the
refusals, each in a second or so.
"""

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, IterableDataset

from ml.errors import CheckpointError, ConfigError
from ml.loggers.jsonl import JsonlLogger, JsonlLoggerConfig
from ml.lr_schedulers.builtin import ConstantConfig, ConstantLRScheduler
from ml.optimizers.builtin import AdamWConfig, AdamWOptimizer
from ml.tasks.sl import DataLoaderConfig
from ml.trainers.sl import SupervisedLearningTrainer, SupervisedLearningTrainerConfig
from ml.utils.streaming import TrainStream, shard_of_stream
from tests.e2e.stream_task import DropoutMLP, DropoutMLPConfig, NoisyStream, StreamTask, StreamTaskConfig


def _train(
    exp_dir: Path,
    *,
    batches_per_step: int = 2,
    num_workers: int = 0,
    prefetch_factor: int | None = None,
    **task: Any,
) -> SupervisedLearningTrainer:
    config = OmegaConf.merge(
        OmegaConf.structured(SupervisedLearningTrainerConfig),
        {
            "name": "sl",
            "exp_dir": str(exp_dir),
            "batches_per_step": batches_per_step,
            "valid_every_n_steps": 4,
            "progress_bar": False,
        },
    )
    trainer = SupervisedLearningTrainer(config)  # type: ignore[arg-type]
    trainer.add_logger(JsonlLogger(JsonlLoggerConfig(name="jsonl", write_every_n_steps=1)))
    trainer.add_signal_handler(signal.SIGTERM, lambda: None)
    task_config = StreamTaskConfig(
        name="stream",
        train_dl=DataLoaderConfig(
            batch_size=4, drop_last=False, num_workers=num_workers, prefetch_factor=prefetch_factor
        ),
        valid_dl=DataLoaderConfig(batch_size=8),
        test_dl=DataLoaderConfig(batch_size=8),
        **task,
    )
    torch.manual_seed(0)  # the same initial weights in every run
    trainer.train(
        DropoutMLP(DropoutMLPConfig(name="mlp")),
        StreamTask(task_config),
        AdamWOptimizer(AdamWConfig(name="adamw", lr=1e-2)),
        ConstantLRScheduler(ConstantConfig(name="constant")),
    )
    return trainer


def _ckpt(exp_dir: Path) -> dict[str, Any]:
    return torch.load(exp_dir / "checkpoints" / "ckpt.pt", weights_only=True)


def _train_losses(exp_dir: Path) -> dict[int, float]:
    lines = (exp_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return {r["step"]: r["metrics"]["train/loss"] for r in records if r["phase"] == "train"}


def test_epochs_end_with_the_stream_and_count_its_samples(tmp_path: Path) -> None:
    # 38 samples in batches of 4 (the last of 2), two per step: 5 steps per epoch.
    trainer = _train(tmp_path, max_epochs=2)
    state = json.loads(_ckpt(tmp_path)["state"])
    assert (state["num_epochs"], state["num_steps"], state["num_samples"]) == (2, 10, 2 * 38)
    assert state["num_epoch_samples"] == 0
    # Validation and test streams run to exhaustion: 19 samples in batches of 8.
    assert state["num_test_steps"] == 3
    assert {"valid/loss", "test/loss", "test/accuracy"} <= set(trainer.final_metrics)


@pytest.mark.parametrize(
    ("batches_per_step", "stop", "num_workers"),
    # 10 batches an epoch: in steps of 2 batches, step 3 is mid-epoch; in steps of 3, step 4 is the
    # epoch's last, short, step, which met the end of the stream (not to be read again on resume).
    [(2, 3, 0), (3, 4, 2)],
)
def test_a_stream_stopped_mid_epoch_resumes_exactly(
    tmp_path: Path, batches_per_step: int, stop: int, num_workers: int
) -> None:
    # num_workers=0: the noise comes from the main process's generators, saved in the checkpoint;
    # in workers, from theirs, saved with the stream's state.
    loading = {"batches_per_step": batches_per_step, "num_workers": num_workers}
    _train(tmp_path / "whole", max_steps=8, **loading)
    stops = {"stops": f"{stop}:SIGTERM", "stop_marker_dir": str(tmp_path)}
    _train(tmp_path / "parts", max_steps=8, **loading, **stops)
    stopped = _ckpt(tmp_path / "parts")
    assert (tmp_path / f"stop.{stop}").exists() and json.loads(stopped["state"])["num_steps"] == stop
    assert json.loads(stopped["state"])["num_epoch_samples"] > 0
    assert stopped["stream"]["ranks"][0] is not None  # the stream's place, mid-epoch
    _train(tmp_path / "parts", max_steps=8, **loading)
    whole, parts = _ckpt(tmp_path / "whole"), _ckpt(tmp_path / "parts")
    for part in ("model", "optim"):
        for key, value in whole[part]["state"].items() if part == "optim" else whole[part].items():
            other = parts[part]["state"][key] if part == "optim" else parts[part][key]
            if isinstance(value, dict):
                assert all(torch.equal(value[k], other[k]) for k in value), key
            else:
                assert torch.equal(value, other), key
    assert torch.equal(whole["rng"]["torch"], parts["rng"]["torch"])
    counters = ("num_steps", "num_epochs", "num_samples", "num_epoch_steps", "num_epoch_samples")
    expected, got = json.loads(whole["state"]), json.loads(parts["state"])
    assert [got[k] for k in counters] == [expected[k] for k in counters]
    assert (expected["num_steps"], expected["num_epochs"]) == (8, 1)
    assert _train_losses(tmp_path / "whole") == _train_losses(tmp_path / "parts")


def test_an_empty_stream_is_refused_naming_the_task(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"training stream of StreamTask \(NoisyStream\) yielded no batch"):
        _train(tmp_path, max_steps=3, empty=True)


def test_a_stream_state_that_is_not_plain_data_is_refused_naming_the_dataset(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"NoisyStream\.state_dict\(\) .* must return plain data"):
        _train(tmp_path, max_steps=3, opaque_state=True)
    assert not (tmp_path / "checkpoints" / "ckpt.pt").exists()
    assert not (tmp_path / "status.json").exists()  # refused before the first step, not at a checkpoint


class _Stateless(IterableDataset):
    def __iter__(self):  # type: ignore[no-untyped-def]
        yield from torch.randn(8, 6)


def test_a_training_stream_without_state_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"_Stateless, an IterableDataset without state_dict\(\)"):
        TrainStream(
            _Stateless(),
            task_name="T",
            where="T.get_dataset('train')",
            seed=0,
            rank=0,
            world_size=1,
            batch_size=2,
            num_workers=0,
            pin_memory=False,
            drop_last=False,
        )


def _stream(
    rank: int = 0, world_size: int = 1, num_workers: int = 0, prefetch_factor: int | None = None
) -> TrainStream:
    features, labels = torch.arange(20.0).repeat(6, 1).T, torch.arange(20)
    return TrainStream(
        NoisyStream(features, labels, 0.0),
        task_name="T",
        where="T.get_dataset('train')",
        seed=0,
        rank=rank,
        world_size=world_size,
        batch_size=3,
        num_workers=num_workers,
        pin_memory=False,
        drop_last=False,
        prefetch_factor=prefetch_factor,
    )


def test_a_streams_workers_load_prefetch_factor_batches_ahead_and_zero_is_refused(tmp_path: Path) -> None:
    assert _stream(num_workers=2, prefetch_factor=3).loader.prefetch_factor == 3
    stream = _stream(num_workers=2, prefetch_factor=1)
    assert len([i for group in stream.steps(0, 0, 1) for i in group[0][2]]) == 20  # (every sample)
    with pytest.raises(ConfigError, match=r"task\.train_dl\.prefetch_factor of StreamTask is 0"):
        _train(tmp_path, num_workers=2, prefetch_factor=0)
    assert not (tmp_path / "checkpoints").exists()


def test_each_rank_and_worker_reads_its_own_shard() -> None:
    assert shard_of_stream() == (0, 1)  # outside a loader, in a single process
    seen = {}
    for rank in (0, 1):  # rank 1 of 2 without a process group: only its place in the job matters
        stream = _stream(rank, 2, num_workers=2)
        seen[rank] = [int(i) for group in stream.steps(0, 0, 1) for i in group[0][2]]
    assert sorted(seen[0] + seen[1]) == list(range(20))  # every sample once over the job
    order = torch.randperm(20, generator=torch.Generator().manual_seed(0)).tolist()
    assert set(seen[1]) == set(order[2::4] + order[3::4])  # shards 2 and 3 of 4: rank 1's two workers


def test_a_checkpoint_of_another_world_size_or_without_a_position_is_refused() -> None:
    stream = _stream()
    saved = {"world_size": 2, "ranks": [{}, {}]}
    with pytest.raises(CheckpointError, match="resume it with 2 processes, not 1"):
        stream.resume(saved, epoch=1, position=8)
    with pytest.raises(CheckpointError, match="holds no position in the training stream"):
        stream.resume(None, epoch=1, position=8)
    stream.resume(saved, epoch=1, position=0)  # saved between epochs: nothing to resume
    with pytest.raises(CheckpointError, match=r"resume it with task\.train_dl\.num_workers=2, not 0"):
        stream.resume({"world_size": 1, "num_workers": 2, "ranks": [{}]}, epoch=1, position=8)


def test_set_epoch_is_called_each_epoch(tmp_path: Path) -> None:
    stream = _stream()
    first = [int(i) for group in stream.steps(0, 0, 1) for i in group[0][2]]
    second = [int(i) for group in stream.steps(1, 0, 1) for i in group[0][2]]
    assert sorted(first) == sorted(second) == list(range(20)) and first != second
    assert os.environ.get("RANK") is None
    assert isinstance(stream.loader, DataLoader)
