"""Tests of where a process stands in a job (torchrun's or Slurm's variables), of data sharding and
of the mean of logged values over ranks."""

import multiprocessing
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

from ml.errors import ConfigError
from ml.utils.data import ResumableSampler
from ml.utils.distributed import mean_over_ranks
from ml.utils.ranks import DistEnv, dist_env, slurm_master_port

SLURM_STEP = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NTASKS": "4",
    "SLURM_NODEID": "1",
    "SLURM_STEP_NODELIST": "gpu[07-08]",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
}


def test_a_plain_process_is_rank_0_of_1() -> None:
    assert dist_env({}) == DistEnv()
    assert not DistEnv().is_distributed


def test_torchrun_variables() -> None:
    env = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "MASTER_PORT": "29500"}
    info = dist_env(env)
    assert (info.rank, info.local_rank, info.world_size, info.local_world_size) == (5, 1, 8, 4)
    assert info.master_port == 29500 and info.source == "torchrun" and info.is_distributed


def test_slurm_step_variables() -> None:
    info = dist_env(SLURM_STEP)
    assert (info.rank, info.local_rank, info.world_size, info.local_world_size) == (3, 1, 4, 2)
    assert info.source == "slurm" and info.nodelist == "gpu[07-08]"
    # Every task of the job derives the same port from the job id.
    assert (
        info.master_port
        == slurm_master_port("4242")
        == dist_env(SLURM_STEP | {"SLURM_PROCID": "0"}).master_port
    )


@pytest.mark.parametrize(
    ("tasks_per_node", "node", "local_world"),
    [("2,1", "0", 2), ("2,1", "1", 1), ("3(x2),1", "1", 3), ("3(x2),1", "2", 1), ("4", "0", 4)],
)
def test_a_slurm_step_with_uneven_nodes_gives_each_node_its_own_count(
    tasks_per_node: str, node: str, local_world: int
) -> None:
    env = SLURM_STEP | {
        "SLURM_STEP_TASKS_PER_NODE": tasks_per_node,
        "SLURM_NODEID": node,
        "SLURM_PROCID": "0",
    }
    assert dist_env(env).local_world_size == local_world


@pytest.mark.parametrize("node", ["2", "x"])
def test_a_slurm_node_outside_the_step_is_refused_in_one_line(node: str) -> None:
    env = SLURM_STEP | {"SLURM_STEP_TASKS_PER_NODE": "2,1", "SLURM_NODEID": node}
    with pytest.raises(ConfigError, match=rf"SLURM_NODEID='{node}' names no node"):
        dist_env(env)


def test_torchrun_inside_slurm_wins_and_a_batch_shell_is_not_a_rank() -> None:
    assert dist_env(SLURM_STEP | {"RANK": "0", "WORLD_SIZE": "2"}).world_size == 2
    batch_shell = {k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_ID"}
    assert dist_env(batch_shell) == DistEnv()


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("start", [0, 5, 37])
def test_ranks_together_take_the_single_process_batches(world_size: int, start: int) -> None:
    """Step i of W ranks with batch B covers positions [i*W*B, (i+1)*W*B) of the rest of the epoch."""
    data, batch = list(range(103)), 4
    single = ResumableSampler(data, shuffle=True, seed=7)
    single.set_epoch(2, start)
    order = list(single)
    shards = []
    for rank in range(world_size):
        sampler = ResumableSampler(data, shuffle=True, seed=7, rank=rank, world_size=world_size)
        sampler.set_epoch(2, start)
        shards.append(list(sampler))
        assert len(sampler) == len(shards[-1])
    assert len({len(s) for s in shards}) == 1  # every rank takes as many samples (DDP needs it)
    assert len(order) - len(shards[0]) * world_size < world_size  # fewer than W left out
    steps = len(shards[0]) // batch
    for i in range(steps):
        together = sorted(x for s in shards for x in s[i * batch : (i + 1) * batch])
        assert together == sorted(order[i * world_size * batch : (i + 1) * world_size * batch])


def test_evaluation_shards_cover_every_sample_once() -> None:
    data = list(range(11))
    shards = [
        list(ResumableSampler(data, shuffle=False, seed=0, rank=r, world_size=3, even=False))
        for r in range(3)
    ]
    assert sorted(x for s in shards for x in s) == data
    assert [len(s) for s in shards] == [4, 4, 3]


def test_sample_seeds_follow_the_position_not_the_rank() -> None:
    data = list(range(10))
    single = dict(ResumableSampler(data, shuffle=True, seed=1, with_seeds=True))
    for rank in range(2):
        for index, seed in ResumableSampler(
            data, shuffle=True, seed=1, with_seeds=True, rank=rank, world_size=2
        ):
            assert single[index] == seed


def test_a_rank_outside_the_world_is_refused() -> None:
    with pytest.raises(ValueError, match="rank 2 is outside the world of 2"):
        ResumableSampler([1, 2], shuffle=False, seed=0, rank=2, world_size=2)


# What each of three ranks logged at one step, and its share of the step's samples.
LOGGED = [
    (1.5, {"loss": 2.0, "lr": 0.1, "only_0_and_2": 1.0}),
    (0.5, {"loss": 6.0, "lr": 0.1}),
    (1.0, {"loss": 4.0, "lr": 0.1, "only_0_and_2": 3.0}),
]


def _mean_over_ranks(rank: int, store: str, queue: Any) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=len(LOGGED))
    try:
        weight, scalars = LOGGED[rank]
        queue.put((rank, mean_over_ranks(scalars, weight), mean_over_ranks(scalars)))
    finally:
        dist.destroy_process_group()


def test_the_mean_over_ranks_weights_each_by_its_samples_and_keeps_agreed_values_as_they_are(
    tmp_path: Path,
) -> None:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    procs = [
        context.Process(target=_mean_over_ranks, args=(rank, tmp_path / "store", queue)) for rank in range(3)
    ]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    weighted = {
        "loss": (1.5 * 2 + 0.5 * 6 + 1 * 4) / 3,
        "only_0_and_2": (1.5 * 1 + 1 * 3) / 2.5,  # over the ranks that logged it
        "lr": 0.1,  # not (0.1 + 0.1 + 0.1) / 3 == 0.10000000000000002
    }
    equal = {"loss": (2 + 6 + 4) / 3, "only_0_and_2": 2.0, "lr": 0.1}
    assert len(results) == 3
    for _, with_weights, without in results:
        assert with_weights == pytest.approx(weighted, rel=1e-12) and without == pytest.approx(
            equal, rel=1e-12
        )
        assert with_weights["lr"] == without["lr"] == 0.1
