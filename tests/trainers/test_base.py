"""Tests of ml.trainers.base: the spec's API, locks, run dirs, config diffs, checkpoints, signals."""

import dataclasses
import inspect
import multiprocessing as mp
import os
import pickle
import random
import shutil
import signal
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from omegaconf import MISSING, OmegaConf

import ml.trainers.base as base
from ml.core.state import State
from ml.trainers.base import (
    BaseTrainer,
    BaseTrainerConfig,
    CheckpointConfig,
    add_lock_file,
    diff_configs,
    get_ckpt_path,
    get_empty_exp_dir,
    has_lock_file,
    remove_lock_file,
)
from ml.utils.atomic import atomic_symlink
from ml.utils.checkpoint import CheckpointError, UnsafeCheckpointError
from tests.tiny import TinyModel, TinyModelConfig, TinyTask, make_parts, train_steps

P = inspect.Parameter
POS, KW = P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY
NO = P.empty

# (name, kind, default) per parameter, exactly as the spec gives them.
SPEC_FUNCTIONS: dict[str, list[tuple[str, Any, Any]]] = {
    "add_lock_file": [("exp_dir", POS, NO), ("lock_type", POS, NO), ("exists_ok", KW, False)],
    "remove_lock_file": [("exp_dir", POS, NO), ("lock_type", POS, NO), ("missing_ok", KW, False)],
    "has_lock_file": [("exp_dir", POS, NO), ("lock_type", POS, None)],
    "get_ckpt_path": [("exp_dir", POS, NO), ("state", POS, None)],
    "get_empty_exp_dir": [("run_dir", POS, NO)],
    "diff_configs": [("first", POS, NO), ("second", POS, NO), ("prefix", POS, None)],
}
HOOK = [("state", POS, NO), ("task", POS, NO), ("model", POS, NO), ("optim", POS, NO), ("lr_sched", POS, NO)]
SPEC_METHODS: dict[str, list[tuple[str, Any, Any]]] = {
    "add_logger": [("sublogger", POS, NO)],
    "add_loggers": [("subloggers", POS, NO)],
    "add_lock_file": [("lock_type", POS, NO), ("exists_ok", KW, False)],
    "remove_lock_file": [("lock_type", POS, NO), ("missing_ok", KW, False)],
    "load_checkpoint": [
        ("ckpt", POS, NO),
        ("task", POS, NO),
        ("model", POS, NO),
        ("optims", POS, None),
        ("lr_scheds", POS, None),
        ("device", KW, None),
        ("strict", KW, None),
    ],
    "save_checkpoint": [
        ("state", POS, NO),
        ("task", POS, NO),
        ("model", POS, NO),
        ("optims", POS, None),
        ("lr_scheds", POS, None),
    ],
    "train": [("model", POS, NO), ("task", POS, NO), ("optimizer", POS, NO), ("lr_scheduler", POS, NO)],
    "load_state_dict": [("state_dict", POS, NO)],
    "update_state_dict": [("state_dict", POS, NO)],
    "on_exit": [
        ("sig", POS, NO),
        ("state", POS, NO),
        ("task", POS, NO),
        ("model", POS, NO),
        ("optim", POS, NO),
        ("lr_scheduler", POS, NO),
    ],
    "on_step_start": HOOK,
    "on_step_end": [HOOK[0], ("loss_dict", POS, NO), *HOOK[1:]],
    "on_epoch_start": HOOK,
    "on_epoch_end": HOOK,
    "on_training_start": HOOK,
    "on_training_end": HOOK,
}


def _params(fn: Any, skip_self: bool) -> list[tuple[str, Any, Any]]:
    params = list(inspect.signature(fn).parameters.values())
    if skip_self:
        params = params[1:]
    return [(p.name, p.kind, p.default) for p in params]


@pytest.mark.parametrize("name", sorted(SPEC_FUNCTIONS))
def test_module_functions_have_the_spec_signatures(name: str) -> None:
    assert _params(getattr(base, name), skip_self=False) == SPEC_FUNCTIONS[name]


@pytest.mark.parametrize("name", sorted(SPEC_METHODS))
def test_trainer_methods_have_the_spec_signatures(name: str) -> None:
    assert _params(getattr(BaseTrainer, name), skip_self=True) == SPEC_METHODS[name]


def test_config_defaults_equal_the_spec() -> None:
    assert [(f.name, f.default) for f in dataclasses.fields(CheckpointConfig)] == [
        ("save_every_n_steps", None),
        ("save_every_n_seconds", 3600.0),
        ("only_save_most_recent", True),
        ("load_from_ckpt_path", None),
        ("load_strict", True),
        ("async_save", False),  # additions to the spec's fields, off by default
        ("monitor", None),
        ("mode", None),
        ("keep_top_k", 1),
        ("format", None),  # full, or sharded (the default under FSDP)
    ]
    config = BaseTrainerConfig()
    assert config.name == "???" and config.exp_dir == "???" and MISSING == "???"
    assert config.exp_name == "${ml.exp_name:null}"
    assert config.log_dir_name == "logs"
    assert config.use_double_weight_precision is False
    assert config.checkpoint == CheckpointConfig()
    assert BaseTrainerConfig().checkpoint is not config.checkpoint  # a factory, not a shared object
    assert inspect.ismethod(BaseTrainerConfig.resolve)  # a classmethod
    assert isinstance(inspect.getattr_static(BaseTrainer, "config_path"), property)
    assert isinstance(inspect.getattr_static(BaseTrainer, "ckpt_path"), property)


def test_spec_literal_usage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Code written against the spec, with its keyword-only arguments, runs unchanged."""
    monkeypatch.setenv("RUN_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("ML_EXP_NAME", "spec")
    config = OmegaConf.structured(BaseTrainerConfig(name="tiny"))
    BaseTrainerConfig.resolve(config)
    assert Path(config.exp_dir) == tmp_path / "runs" / "spec" / "run_0"

    trainer, model, task, optim, sched = make_parts(Path(config.exp_dir), save_every_n_steps=2)
    exp_dir = trainer.exp_dir
    add_lock_file(exp_dir, "scheduled", exists_ok=False)
    assert has_lock_file(exp_dir, "scheduled") and has_lock_file(exp_dir)
    remove_lock_file(exp_dir, "scheduled", missing_ok=False)
    remove_lock_file(exp_dir, "scheduled", missing_ok=True)
    assert not has_lock_file(exp_dir, lock_type=None)
    trainer.add_lock_file("ckpt", exists_ok=True)
    trainer.remove_lock_file("ckpt", missing_ok=True)
    assert trainer.config_path == exp_dir / "config.yaml"
    assert trainer.ckpt_path == get_ckpt_path(exp_dir) == exp_dir / "checkpoints" / "ckpt.pt"

    state = State.init_state()
    trainer.on_training_start(state, task, model, optim, sched)
    trainer.on_epoch_start(state, task, model, optim, sched)
    trainer.on_step_start(state, task, model, optim, sched)
    state.num_steps += 1
    trainer.on_step_end(state, {"loss": torch.tensor(1.0)}, task, model, optim, sched)
    trainer.on_epoch_end(state, task, model, optim, sched)
    path = trainer.save_checkpoint(state, task, model, optims=optim, lr_scheds=sched)
    assert path == get_ckpt_path(exp_dir, state=state) == exp_dir / "checkpoints" / "ckpt.1.pt"
    loaded = trainer.load_checkpoint(path, task, model, optim, sched, device="cpu", strict=True)
    assert loaded.num_steps == 1 and loaded.num_epochs == 1
    trainer.on_exit(signal.SIGTERM, state, task, model, optim, sched)
    trainer.on_training_end(state, task, model, optim, sched)
    assert not has_lock_file(exp_dir, "running")
    with pytest.raises(NotImplementedError):
        trainer.train(model, task, None, None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Lock files and run directories


def test_lock_file_records_owner_and_refuses_a_second_create(tmp_path: Path) -> None:
    add_lock_file(tmp_path / "exp", "running")
    text = (tmp_path / "exp" / ".lock_running").read_text()
    assert f"pid: {os.getpid()}" in text and f"host: {socket.gethostname()}" in text and "time: " in text
    with pytest.raises(RuntimeError, match="already exists"):
        add_lock_file(tmp_path / "exp", "running")
    add_lock_file(tmp_path / "exp", "running", exists_ok=True)
    with pytest.raises(RuntimeError, match="not found"):
        remove_lock_file(tmp_path / "exp", "ckpt")
    with pytest.raises(ValueError, match="lock_type"):
        add_lock_file(tmp_path / "exp", "bogus")  # type: ignore[arg-type]


def test_only_the_master_rank_writes_locks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    add_lock_file(tmp_path, "running")
    assert not has_lock_file(tmp_path)


def _claim(run_dir: str, barrier: Any, queue: Any) -> None:
    barrier.wait()
    exp_dir = get_empty_exp_dir(Path(run_dir))
    add_lock_file(exp_dir, "running")
    queue.put(str(exp_dir))


def _lock_once(exp_dir: str, barrier: Any, queue: Any) -> None:
    barrier.wait()
    try:
        add_lock_file(Path(exp_dir), "running")
        queue.put("won")
    except RuntimeError:
        queue.put("lost")


def _race(target: Any, arg: str, n: int) -> list[str]:
    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=target, args=(arg, barrier, queue)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in range(n)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def test_32_processes_claim_32_distinct_run_dirs(tmp_path: Path) -> None:
    dirs = _race(_claim, str(tmp_path / "runs"), 32)
    assert len(set(dirs)) == 32
    assert sorted(Path(d).name for d in dirs) == sorted(f"run_{i}" for i in range(32))
    assert all(has_lock_file(Path(d), "running") for d in dirs)


def test_exactly_one_of_many_racing_processes_gets_a_lock(tmp_path: Path) -> None:
    results = _race(_lock_once, str(tmp_path), 16)
    assert sorted(results) == ["lost"] * 15 + ["won"]


def test_get_empty_exp_dir_never_reuses_an_existing_directory(tmp_path: Path) -> None:
    (tmp_path / "run_0").mkdir()  # crashed early, no lock: still not reused
    (tmp_path / "run_3").mkdir()
    assert get_empty_exp_dir(tmp_path) == tmp_path / "run_4"
    assert get_empty_exp_dir(tmp_path) == tmp_path / "run_5"


def test_resolve_without_run_dir_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUN_DIR", raising=False)
    with pytest.raises(KeyError, match="RUN_DIR"):
        BaseTrainerConfig.resolve(BaseTrainerConfig(name="x"))
    config = BaseTrainerConfig(name="x", exp_dir="/somewhere")
    BaseTrainerConfig.resolve(config)  # an explicit exp_dir needs no RUN_DIR
    assert config.exp_dir == "/somewhere"


def test_a_second_trainer_cannot_train_a_live_run(tmp_path: Path) -> None:
    trainer, model, task, optim, sched = make_parts(tmp_path)
    (tmp_path).mkdir(exist_ok=True)
    (tmp_path / ".lock_running").write_text(f"pid: 1\nhost: {socket.gethostname()}\n")  # pid 1 is alive
    with pytest.raises(RuntimeError, match="already being trained"):
        trainer.on_training_start(State.init_state(), task, model, optim, sched)
    dead = mp.get_context("fork").Process(target=os._exit, args=(0,))
    dead.start()
    dead.join()
    (tmp_path / ".lock_running").write_text(f"pid: {dead.pid}\nhost: {socket.gethostname()}\n")
    trainer.on_training_start(State.init_state(), task, model, optim, sched)  # stale: taken over
    assert f"pid: {os.getpid()}" in (tmp_path / ".lock_running").read_text()


# ---------------------------------------------------------------------------------------------
# Config diffs


def test_diff_configs_reports_changes_at_any_depth() -> None:
    import enum

    class Color(enum.Enum):
        RED = 1
        BLUE = 2

    first = OmegaConf.create(
        {"a": 1, "b": {"c": [1, 2, 3], "d": "x", "gone": True}, "e": Color.RED, "m": "???", "same": {"k": 1}}
    )
    second = OmegaConf.create(
        {"a": 2, "b": {"c": [1, 5], "d": "x", "new": {"z": 0}}, "e": Color.BLUE, "m": 4}
    )
    only_first, only_second = diff_configs(first, second)
    assert only_first == ["a=1", "b.c[1]=2", "b.c[2]=3", "b.gone=True", "e=RED", "same=... (dict)"]
    assert only_second == ["a=2", "b.c[1]=5", "b.new=... (dict)", "e=BLUE", "m=4"]
    assert not any(line.startswith("None.") for line in only_first + only_second)
    assert diff_configs(first, first) == ([], [])
    assert diff_configs(OmegaConf.create([1, 2]), OmegaConf.create([1, 3]), prefix="xs") == (
        ["xs[1]=2"],
        ["xs[1]=3"],
    )


def test_save_config_keeps_the_old_config_and_logs_a_diff(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "config.yaml"
    base.save_config(path, OmegaConf.create({"optimizer": {"lr": 0.1}}))
    base.save_config(path, OmegaConf.create({"optimizer": {"lr": 0.1}}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
    base.save_config(path, OmegaConf.create({"optimizer": {"lr": 0.2}}))
    backups = [p for p in tmp_path.iterdir() if p.name != "config.yaml"]
    assert len(backups) == 1 and OmegaConf.load(backups[0]).optimizer.lr == 0.1
    assert OmegaConf.load(path).optimizer.lr == 0.2
    assert "- optimizer.lr=0.1" in caplog.text and "+ optimizer.lr=0.2" in caplog.text


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _assert_tree_equal(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_tree_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_tree_equal(x, y)
    else:
        assert a == b


def test_checkpoint_round_trip_restores_everything_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trainer, model, task, optim, sched = make_parts(tmp_path / "exp")
    state = State.init_state()
    train_steps(model, task, optim, sched, state, 5)
    state.num_epochs, state.num_samples, state.elapsed_time_s = 2, 80, 12.5
    path = trainer.save_checkpoint(state, task, model, optim, sched)
    after_save = (torch.rand(3), np.random.rand(3), random.random())

    torch.manual_seed(123)  # different weights, optimizer moments and RNG
    trainer2, model2, task2, optim2, sched2 = make_parts(tmp_path / "exp")
    train_steps(model2, task2, optim2, sched2, State.init_state(), 2)
    loaded = trainer2.load_checkpoint(path, task2, model2, optim2, sched2)

    assert loaded == state
    _assert_tree_equal(model.state_dict(), model2.state_dict())
    _assert_tree_equal(optim.state_dict(), optim2.state_dict())
    assert sched2.state_dict() == sched.state_dict()
    assert torch.equal(task2.seen, task.seen)
    after_load = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(after_save[0], after_load[0])
    assert np.array_equal(after_save[1], after_load[1])
    assert after_save[2] == after_load[2]


def test_checkpoint_contents_and_link(tmp_path: Path) -> None:
    trainer, model, task, optim, sched = make_parts(tmp_path)
    state = State(num_steps=3)
    path = trainer.save_checkpoint(state, task, model, optim, sched)
    ckpt = torch.load(path, weights_only=True)
    assert {"model", "task", "optim", "lr", "state", "config", "rng"} <= set(ckpt)
    assert State.from_json(ckpt["state"]) == state
    assert OmegaConf.create(ckpt["config"]).exp_dir == str(tmp_path)
    assert "exp_state" not in ckpt["lr"] and "state" not in ckpt["lr"]  # the scheduler's own state only
    link = trainer.ckpt_path
    assert link.is_symlink() and os.readlink(link) == "ckpt.3.pt"  # relative
    assert has_lock_file(tmp_path, "ckpt")
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_only_save_most_recent_keeps_one_checkpoint(tmp_path: Path) -> None:
    trainer, model, task, optim, sched = make_parts(tmp_path, only_save_most_recent=True)
    for step in (1, 2, 3):
        trainer.save_checkpoint(State(num_steps=step), task, model, optim, sched)
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == ["ckpt.3.pt", "ckpt.pt"]
    assert trainer.load_checkpoint(trainer.ckpt_path, task, model, optim, sched).num_steps == 3

    trainer, model, task, optim, sched = make_parts(tmp_path / "all", only_save_most_recent=False)
    for step in (1, 2):
        trainer.save_checkpoint(State(num_steps=step), task, model, optim, sched)
    assert sorted(p.name for p in (tmp_path / "all" / "checkpoints").iterdir()) == [
        "ckpt.1.pt",
        "ckpt.2.pt",
        "ckpt.pt",
    ]


def test_a_save_removes_checkpoints_a_killed_save_left_behind(tmp_path: Path) -> None:
    """Killed between the link swap and retention, a run leaves two numbered checkpoints; the link
    then names the newer one, so the next save must remove the older one too."""
    trainer, model, task, optim, sched = make_parts(tmp_path, only_save_most_recent=True)
    trainer.save_checkpoint(State(num_steps=5), task, model, optim, sched)
    folder = tmp_path / "checkpoints"
    shutil.copy(folder / "ckpt.5.pt", folder / "ckpt.4.pt")  # the one retention never removed
    (folder / "ckpt.best.pt").write_bytes(b"not a numbered checkpoint")
    trainer.save_checkpoint(State(num_steps=6), task, model, optim, sched)
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt.6.pt", "ckpt.best.pt", "ckpt.pt"]


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    trainer, model, task, optim, sched = make_parts(tmp_path)
    trainer.save_checkpoint(State(num_steps=1), task, model, optim, sched)

    def bad_extra(state_dict: dict) -> None:
        state_dict["extra"] = object()  # not loadable with weights_only: refused before writing

    trainer.update_state_dict = bad_extra  # type: ignore[method-assign]
    with pytest.raises(TypeError, match=r"checkpoint\.extra"):
        trainer.save_checkpoint(State(num_steps=2), task, model, optim, sched)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["ckpt.1.pt", "ckpt.pt"]
    assert trainer.load_checkpoint(trainer.ckpt_path, task, model).num_steps == 1


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    trainer, model, task, _, _ = make_parts(tmp_path)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": model.state_dict(), "state": State().to_json(), "x": _Evil(marker)}, evil)
    with pytest.raises(pickle.UnpicklingError) as info:
        trainer.load_checkpoint(evil, task, model)
    assert isinstance(info.value, UnsafeCheckpointError)
    assert str(evil) in str(info.value)
    assert not marker.exists()


def test_missing_truncated_and_foreign_checkpoints_name_the_path(tmp_path: Path) -> None:
    trainer, model, task, optim, sched = make_parts(tmp_path)
    good = trainer.save_checkpoint(State(num_steps=1), task, model, optim, sched)
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match=f"not found: {missing}"):
        trainer.load_checkpoint(missing, task, model)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated") as info:
        trainer.load_checkpoint(truncated, task, model)
    assert str(truncated) in str(info.value)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not an ml checkpoint") as info:
        trainer.load_checkpoint(foreign, task, model)
    assert str(foreign) in str(info.value)
    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match=str(text)):
        trainer.load_checkpoint(text, task, model)


def test_strict_loading_and_its_config_default(tmp_path: Path) -> None:
    trainer, model, task, optim, sched = make_parts(tmp_path)
    path = trainer.save_checkpoint(State(num_steps=1), task, model, optim, sched)
    wider = TinyModel(TinyModelConfig(name="tiny", hidden=16))
    with pytest.raises(CheckpointError, match="do not fit"):
        trainer.load_checkpoint(path, task, wider)
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError):
        trainer.load_checkpoint(ckpt, task, model)  # type: ignore[arg-type]
    trainer.load_checkpoint(ckpt, task, model, strict=False)  # type: ignore[arg-type]
    lenient, *_ = make_parts(tmp_path / "lenient", load_strict=False)
    lenient.load_checkpoint(ckpt, task, model)  # type: ignore[arg-type]


def test_a_schedule_state_of_another_kind_of_schedule_is_refused_naming_the_schedule(tmp_path: Path) -> None:
    """Continuing with a torch schedule where the run had a built-in one raised a KeyError traceback."""
    from torch.optim.lr_scheduler import StepLR

    from ml.lr_schedulers.imported import adapt

    trainer, model, task, optim, sched = make_parts(tmp_path)
    path = trainer.save_checkpoint(State(num_steps=1), task, model, optim, sched)
    adapted = adapt(StepLR)
    assert adapted is not None
    builder, config_cls = adapted
    step_lr = builder(config_cls(name="torch.optim.lr_scheduler:StepLR", step_size=2)).get(optim)
    with pytest.raises(CheckpointError, match=r"learning-rate schedule .* does not fit lr_scheduler") as info:
        trainer.load_checkpoint(path, task, model, optim, step_lr)
    assert "the one it was saved with" in str(info.value)


def _perturbed_copy(model: TinyModel) -> TinyModel:
    other = TinyModel(TinyModelConfig(name="tiny"))
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    assert not torch.equal(other.net[0].weight, model.net[0].weight)
    return other


def test_a_checkpoint_from_a_ddp_model_loads_into_a_plain_one(tmp_path: Path) -> None:
    trainer, model, task, optim, sched = make_parts(tmp_path)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        assert all(k.startswith("module.") for k in ddp.state_dict())
        path = trainer.save_checkpoint(State(num_steps=1), task, ddp, optim, sched)  # type: ignore[arg-type]
        raw = tmp_path / "raw_ddp.pt"  # as another tool would save it: prefixed keys
        torch.save({"model": ddp.state_dict(), "state": State().to_json()}, raw)
        for source in (path, raw):
            plain = _perturbed_copy(model)
            trainer.load_checkpoint(source, task, plain)
            _assert_tree_equal(plain.state_dict(), model.state_dict())
        into_ddp = torch.nn.parallel.DistributedDataParallel(_perturbed_copy(model))
        trainer.load_checkpoint(raw, task, into_ddp)  # type: ignore[arg-type]
        _assert_tree_equal(into_ddp.module.state_dict(), model.state_dict())
    finally:
        dist.destroy_process_group()


def test_a_checkpoint_from_a_compiled_model_loads_into_a_plain_one(tmp_path: Path) -> None:
    trainer, model, task, optim, sched = make_parts(tmp_path)
    compiled = torch.compile(model)
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    raw = tmp_path / "raw_compiled.pt"
    torch.save({"model": compiled.state_dict(), "state": State().to_json()}, raw)
    path = trainer.save_checkpoint(State(num_steps=1), task, compiled, optim, sched)  # type: ignore[arg-type]
    for source in (path, raw):
        plain = _perturbed_copy(model)
        trainer.load_checkpoint(source, task, plain)
        _assert_tree_equal(plain.state_dict(), model.state_dict())


def test_should_checkpoint_by_steps_or_seconds(tmp_path: Path) -> None:
    trainer, *_ = make_parts(tmp_path, save_every_n_steps=3, save_every_n_seconds=None)
    assert [s for s in range(10) if trainer.should_checkpoint(State(num_steps=s))] == [3, 6, 9]
    trainer, *_ = make_parts(tmp_path, save_every_n_steps=None, save_every_n_seconds=10.0)
    assert not trainer.should_checkpoint(State(num_steps=1, elapsed_time_s=9.0))
    assert trainer.should_checkpoint(State(num_steps=1, elapsed_time_s=10.0))
    trainer, model, task, optim, sched = make_parts(tmp_path / "b", save_every_n_seconds=10.0)
    trainer.save_checkpoint(State(num_steps=2, elapsed_time_s=10.0), task, model, optim, sched)
    assert not trainer.should_checkpoint(State(num_steps=3, elapsed_time_s=15.0))
    assert trainer.should_checkpoint(State(num_steps=4, elapsed_time_s=20.0))


# ---------------------------------------------------------------------------------------------
# Signals, hooks, precision


def test_a_signal_only_sets_a_flag_and_on_exit_saves_then_runs_handlers(tmp_path: Path) -> None:
    trainer, model, task, optim, sched = make_parts(tmp_path)
    calls: list[bool] = []
    trainer.add_signal_handler(signal.SIGUSR1, lambda: calls.append(trainer.ckpt_path.exists()))
    before = signal.getsignal(signal.SIGUSR1)
    with trainer.install_signal_handlers():
        os.kill(os.getpid(), signal.SIGUSR1)
        assert trainer.stop_signal == signal.SIGUSR1
        assert not (tmp_path / "checkpoints").exists()  # nothing saved inside the handler
        trainer.on_exit(signal.SIGUSR1, State(num_steps=4), task, model, optim, sched)
    assert calls == [True]  # handlers run after the checkpoint exists
    assert signal.getsignal(signal.SIGUSR1) == before  # restored


def test_a_second_sigint_interrupts_at_once(tmp_path: Path) -> None:
    trainer, *_ = make_parts(tmp_path)
    with trainer.install_signal_handlers():
        os.kill(os.getpid(), signal.SIGINT)
        assert trainer.stop_signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_hooks_forward_to_the_task_and_keep_counters(tmp_path: Path) -> None:
    trainer, model, _, optim, sched = make_parts(tmp_path)
    calls: list[str] = []

    class RecordingTask(TinyTask):
        def on_step_start(self, state, model, optim, lr_sched):  # type: ignore[no-untyped-def]
            calls.append("step_start")

        def on_step_end(self, state, loss_dict, model, optim, lr_sched):  # type: ignore[no-untyped-def]
            calls.append(f"step_end:{sorted(loss_dict)}")

        def on_epoch_start(self, state, model, optim, lr_sched):  # type: ignore[no-untyped-def]
            calls.append("epoch_start")

        def on_epoch_end(self, state, model, optim, lr_sched):  # type: ignore[no-untyped-def]
            calls.append("epoch_end")

        def on_training_start(self, state, model, optim, lr_sched):  # type: ignore[no-untyped-def]
            calls.append("training_start")

        def on_training_end(self, state, model, optim, lr_sched):  # type: ignore[no-untyped-def]
            calls.append("training_end")

    from ml.tasks.sl import SupervisedLearningTaskConfig

    task = RecordingTask(SupervisedLearningTaskConfig(name="rec"))
    state = State(num_epoch_steps=5, num_epoch_samples=50, elapsed_time_s=100.0)
    trainer.on_training_start(state, task, model, optim, sched)
    assert has_lock_file(tmp_path, "running")
    assert abs(state.start_time_s - (__import__("time").time() - 100.0)) < 5  # elapsed time continues
    trainer.on_epoch_start(state, task, model, optim, sched)
    assert (state.num_epoch_steps, state.num_epoch_samples) == (0, 0)
    trainer.on_step_start(state, task, model, optim, sched)
    trainer.on_step_end(state, {"loss": torch.tensor(0.0)}, task, model, optim, sched)
    assert state.elapsed_time_s >= 100.0
    trainer.on_epoch_end(state, task, model, optim, sched)
    assert state.num_epochs == 1
    trainer.on_training_end(state, task, model, optim, sched)
    assert not has_lock_file(tmp_path, "running")
    assert calls == [
        "training_start",
        "epoch_start",
        "step_start",
        "step_end:['loss']",
        "epoch_end",
        "training_end",
    ]


def test_double_weight_precision(tmp_path: Path) -> None:
    trainer, *_ = make_parts(tmp_path)
    assert trainer.weight_precision == torch.float32
    config = OmegaConf.merge(
        OmegaConf.structured(BaseTrainerConfig),
        {"name": "t", "exp_dir": str(tmp_path), "use_double_weight_precision": True},
    )
    trainer = type(trainer)(config)  # type: ignore[arg-type]
    assert trainer.weight_precision == torch.float64
    assert trainer.device_type in ("cpu", "cuda", "mps")


def test_config_changes_within_one_second_keep_every_old_config(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    for lr in (0.1, 0.2, 0.3):
        base.save_config(path, OmegaConf.create({"lr": lr}))
    kept = sorted(OmegaConf.load(p).lr for p in tmp_path.iterdir() if p.name != "config.yaml")
    assert kept == [0.1, 0.2] and OmegaConf.load(path).lr == 0.3


def _take_lock(exp_dir: str, barrier: Any, queue: Any) -> None:
    trainer, *_ = make_parts(Path(exp_dir))
    barrier.wait()
    try:
        trainer.take_running_lock()
        queue.put("won")
    except base.RunLockedError:
        queue.put("lost")


@pytest.mark.parametrize("stale", [False, True])
def test_exactly_one_of_many_racing_trainers_takes_a_run(tmp_path: Path, stale: bool) -> None:
    if stale:  # the lock of a process that died: every racer sees it stale, still one wins
        dead = mp.get_context("fork").Process(target=os._exit, args=(0,))
        dead.start()
        dead.join()
        (tmp_path / ".lock_running").write_text(f"pid: {dead.pid}\nhost: {socket.gethostname()}\n")
    results = _race(_take_lock, str(tmp_path), 12)
    assert sorted(results) == ["lost"] * 11 + ["won"]


def test_a_dangling_link_is_an_error_and_a_missing_link_falls_back(tmp_path: Path) -> None:
    trainer, model, task, optim, sched = make_parts(tmp_path)
    assert trainer.find_resume_checkpoint() is None
    for step in (1, 2):
        trainer.save_checkpoint(State(num_steps=step), task, model, optim, sched)
    assert trainer.find_resume_checkpoint() == trainer.ckpt_path
    trainer.ckpt_path.unlink()  # e.g. a crash right after the first save, before the link
    assert trainer.find_resume_checkpoint() == tmp_path / "checkpoints" / "ckpt.2.pt"
    os.symlink("ckpt.9.pt", trainer.ckpt_path)
    with pytest.raises(CheckpointError, match=r"ckpt\.9\.pt, which does not exist"):
        trainer.find_resume_checkpoint()


def test_a_checkpoint_written_but_not_yet_linked_is_the_one_resumed(tmp_path: Path) -> None:
    """Killed between renaming ckpt.3.pt into place and swapping the link: ckpt.3.pt is complete."""
    trainer, model, task, optim, sched = make_parts(tmp_path)
    trainer.save_checkpoint(State(num_steps=2), task, model, optim, sched)
    folder = tmp_path / "checkpoints"
    shutil.copy(folder / "ckpt.2.pt", folder / "ckpt.3.pt")
    assert trainer.find_resume_checkpoint() == folder / "ckpt.3.pt"
    # Once resumed from it, the link names it and the older one goes (only_save_most_recent).
    trainer.tidy_checkpoints(folder / "ckpt.3.pt")
    assert os.readlink(trainer.ckpt_path) == "ckpt.3.pt"
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt.3.pt", "ckpt.pt"]
    shutil.copy(folder / "ckpt.3.pt", folder / "ckpt.2.pt")
    trainer.tidy_checkpoints(trainer.ckpt_path)  # resumed through the link: only the leftover goes
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt.3.pt", "ckpt.pt"]
    shutil.copy(folder / "ckpt.3.pt", folder / "ckpt.2.pt")
    atomic_symlink("ckpt.2.pt", trainer.ckpt_path)
    (folder / "ckpt.3.pt").unlink()
    shutil.copy(folder / "ckpt.2.pt", folder / "ckpt.1.pt")  # older than the link: the link wins
    assert trainer.find_resume_checkpoint() == trainer.ckpt_path


def test_a_bad_state_is_refused_before_anything_is_restored(tmp_path: Path) -> None:
    trainer, model, task, optim, sched = make_parts(tmp_path)
    ckpt = torch.load(
        trainer.save_checkpoint(State(num_steps=1), task, model, optim, sched), weights_only=True
    )
    other = _perturbed_copy(model)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    for bad in ("not json", '{"num_stepz": 3}'):
        ckpt["state"] = bad
        with pytest.raises(CheckpointError, match="bad trainer state"):
            trainer.load_checkpoint(ckpt, task, other)  # type: ignore[arg-type]
    _assert_tree_equal(other.state_dict(), before)


def test_a_file_that_is_not_a_checkpoint_is_not_called_unsafe(tmp_path: Path) -> None:
    trainer, model, task, *_ = make_parts(tmp_path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("garbage\n")
    with pytest.raises(CheckpointError, match="not a torch checkpoint") as info:
        trainer.load_checkpoint(garbage, task, model)
    assert not isinstance(info.value, UnsafeCheckpointError)
    assert "weights_only` set to `False`" not in str(info.value)


def test_diff_configs_sees_type_changes() -> None:
    assert diff_configs(OmegaConf.create({"a": True}), OmegaConf.create({"a": 1})) == (["a=True"], ["a=1"])
    assert diff_configs(OmegaConf.create({"a": 1}), OmegaConf.create({"a": 1.0})) == (["a=1"], ["a=1.0"])


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ""])
def test_exp_name_must_be_a_plain_folder_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv("RUN_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="plain folder name"):
        BaseTrainerConfig.resolve(BaseTrainerConfig(name="x", exp_name=name))
    assert list(tmp_path.iterdir()) == []


def test_the_end_of_a_chain_of_links_keeps_the_folders_as_written(tmp_path: Path) -> None:
    """What rank 0 tells every rank to read as initial weights (load_initial_weights): the file a
    chain of links ends at, whichever link a run still training moves on next."""
    from ml.trainers.base import _end_of_links

    (tmp_path / "runs").mkdir()
    (tmp_path / "mounted").symlink_to("runs")  # a folder another machine may mount elsewhere
    (tmp_path / "runs" / "ckpt.7.pt").write_bytes(b"")
    (tmp_path / "runs" / "ckpt.pt").symlink_to("ckpt.7.pt")
    (tmp_path / "runs" / "latest").symlink_to(tmp_path / "mounted" / "ckpt.pt")
    assert _end_of_links(tmp_path / "mounted" / "latest") == tmp_path / "mounted" / "ckpt.7.pt"
    assert _end_of_links(tmp_path / "runs" / "ckpt.7.pt") == tmp_path / "runs" / "ckpt.7.pt"
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    assert _end_of_links(tmp_path / "a") in (tmp_path / "a", tmp_path / "b")  # a loop: the reader says so
