"""End-to-end tests of the ``ml`` command: subprocesses, a tiny digits config, a temporary RUN_DIR.
Most commands are forked from a process that imported torch (tests/forked_ml.py); the tests of
start-up, Ctrl-C and the readers of its output start the real script.

Covered: the run folder layout, continuing a run from its ``config.yaml``, ``ml resolve``, help
texts, user components by import path, and bad input (one ``ml: error:`` line, exit code 2, nothing
created on disk), a failure during training (exit 1) and Ctrl-C (exit 130).
"""

import gc
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

from ml.utils.startup_gc import IMPORT_THRESHOLD
from tests.forked_ml import Command, run_forked, run_ml

_SCRIPT = Path(sys.executable).parent / "ml"
ML = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "ml.cli"]
TIMEOUT_S = 120

TINY = """\
# ml train tiny.yaml
model: {name: digits_mlp, hidden: 16, num_layers: 1}
task:
  name: digits
  max_steps: 20
  train_dl: {batch_size: 16}
  valid_dl: {batch_size: 512}
  test_dl: {batch_size: 512}
optimizer: {name: adam, lr: 1e-3}
trainer:
  name: sl
  exp_name: tiny
  valid_every_n_steps: 10
  checkpoint: {save_every_n_steps: 10, only_save_most_recent: false}
logger:
  - {name: stdout, write_every_n_steps: 5}
  - {name: jsonl, write_every_n_steps: 1}
"""

USER_MODULE = "ml_e2e_user_task"
USER_TASK = f'''\
"""A task defined outside the package, selected with `name: {USER_MODULE}:SumSignTask`."""

import gc
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from ml.core.config import MISSING, conf_field
from ml.tasks.sl import SupervisedLearningTask, SupervisedLearningTaskConfig


@dataclass
class SumSignConfig(SupervisedLearningTaskConfig):
    num_samples: int = conf_field(64, help="Samples per split")
    threshold: float = conf_field(MISSING, help="Label 1 when the sum of the inputs exceeds this")
    fail_at_step: int | None = conf_field(None, help="Raise an error at this step (for tests)")
    step_sleep_s: float = conf_field(0.0, help="Sleep this long in each loss (for tests)")


class SumSignTask(SupervisedLearningTask[SumSignConfig]):
    def get_dataset(self, phase):
        generator = torch.Generator().manual_seed({{"train": 0, "valid": 1, "test": 2}}[phase])
        inputs = torch.randn(self.config.num_samples, 64, generator=generator)
        return TensorDataset(inputs, (inputs.sum(dim=1) > self.config.threshold).long())

    def compute_loss(self, model, batch, state, output):
        if state.training and state.num_steps == self.config.fail_at_step:
            raise TypeError(f"user bug at step {{state.num_steps}}")
        time.sleep(self.config.step_sleep_s)
        return F.cross_entropy(output, batch[1])


class NoDatasetMethodTask(SupervisedLearningTask[SumSignConfig]):
    """Forgot to define get_dataset."""

    def compute_loss(self, model, batch, state, output):
        return F.cross_entropy(output, batch[1])


class NoTrainingDataTask(SumSignTask):
    def get_dataset(self, phase):
        raise NotImplementedError(f"no {{phase}} split")


THRESHOLD_AT_IMPORT = gc.get_threshold()[0]  # this module is imported while the config is composed


class GcWatchTask(SumSignTask):
    """Logs the garbage collector's first threshold as this module was imported, as the data sets
    are made and in each step, and how many objects were frozen."""

    def get_dataset(self, phase):
        if phase == "train":
            self.threshold_at_set_up = gc.get_threshold()[0]
        return super().get_dataset(phase)

    def compute_loss(self, model, batch, state, output):
        if state.training:
            self.logger.log_scalar("gc_threshold_at_import", THRESHOLD_AT_IMPORT)
            self.logger.log_scalar("gc_threshold_at_set_up", self.threshold_at_set_up)
            self.logger.log_scalar("gc_threshold", gc.get_threshold()[0])
            self.logger.log_scalar("gc_frozen", gc.get_freeze_count())
        return super().compute_loss(model, batch, state, output)
'''

USER_CONFIG = f"""\
# ml train user.yaml
model: {{name: digits_mlp, hidden: 8, num_layers: 1}}
task: {{name: "{USER_MODULE}:SumSignTask", max_steps: 6, num_samples: 48, train_dl: {{batch_size: 8}}}}
optimizer: {{name: sgd, lr: 0.1}}
trainer: {{name: sl, exp_name: user}}
logger: [{{name: jsonl, write_every_n_steps: 1}}]
"""


@dataclass(frozen=True)
class Files:
    """The config files every test can use; ``lib`` holds the user module (on PYTHONPATH)."""

    tiny: Path
    user: Path
    lib: Path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    root = tmp_path_factory.mktemp("configs")
    (root / "lib").mkdir()
    (root / "lib" / f"{USER_MODULE}.py").write_text(USER_TASK)
    (root / "tiny.yaml").write_text(TINY)
    (root / "user.yaml").write_text(USER_CONFIG)
    return Files(tiny=root / "tiny.yaml", user=root / "user.yaml", lib=root / "lib")


def _env(files: Files, run_dir: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("ML_EXP_NAME", None)
    env.pop("RUN_DIR", None)
    if run_dir is not None:
        env["RUN_DIR"] = str(run_dir)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(files.lib), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"  # tiny models; several test processes share few cores
    env["PYTHONUNBUFFERED"] = "1"
    return env


def ml(
    files: Files, *args: str | Path, run_dir: Path | None, cwd: Path | None = None, fresh: bool = False
) -> subprocess.CompletedProcess[str]:
    """Runs the ``ml`` command to completion, forked from a process that imported torch
    (tests/forked_ml.py), or with ``fresh`` the script in a new interpreter: for what its start-up does."""
    if not fresh:
        return run_ml([str(a) for a in args], _env(files, run_dir), cwd, TIMEOUT_S)
    return subprocess.run(
        [*ML, *map(str, args)],
        env=_env(files, run_dir),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def _ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result


def _records(exp_dir: Path) -> list[dict]:
    lines = (exp_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _train_steps(records: list[dict]) -> list[int]:
    return [r["step"] for r in records if r["phase"] == "train"]


# ---------------------------------------------------------------------------------------------
# A run and its continuation


@dataclass(frozen=True)
class TwoSegments:
    """A 20-step run, what its folder held then, and the same run continued to 30 steps."""

    run_dir: Path
    exp_dir: Path
    first: subprocess.CompletedProcess[str]
    second: subprocess.CompletedProcess[str]
    files_after_first: frozenset[str]
    links_after_first: dict[str, str]
    records_after_first: list[dict]
    config_after_first: str


def _listing(exp_dir: Path) -> frozenset[str]:
    return frozenset(str(p.relative_to(exp_dir)) for p in exp_dir.rglob("*"))


@pytest.fixture(scope="module")
def two_segments(files: Files, tmp_path_factory: pytest.TempPathFactory) -> TwoSegments:
    run_dir = tmp_path_factory.mktemp("runs")
    first = _ok(ml(files, "train", files.tiny, run_dir=run_dir))
    exp_dir = run_dir / "tiny" / "run_0"
    checkpoints = exp_dir / "checkpoints"
    links = {p.name: os.readlink(p) for p in checkpoints.iterdir() if p.is_symlink()}
    snapshot = (_listing(exp_dir), links, _records(exp_dir), (exp_dir / "config.yaml").read_text())
    second = _ok(ml(files, "train", exp_dir / "config.yaml", "task.max_steps=30", run_dir=run_dir))
    return TwoSegments(run_dir, exp_dir, first, second, *snapshot)


def test_run_folder_layout(two_segments: TwoSegments) -> None:
    seg = two_segments
    assert sorted(p.name for p in seg.run_dir.iterdir()) == ["tiny"]
    assert sorted(p.name for p in (seg.run_dir / "tiny").iterdir()) == ["run_0"]
    assert {
        "config.yaml",
        ".lock_ckpt",
        "checkpoints/ckpt.10.pt",
        "checkpoints/ckpt.20.pt",
        "checkpoints/ckpt.pt",
        "logs/metrics.jsonl",
        "logs/stdout.log",
    } <= seg.files_after_first
    assert ".lock_running" not in seg.files_after_first  # removed when training ended
    assert not any(name.endswith(".tmp") for name in seg.files_after_first)  # no atomic-write leftovers
    assert seg.links_after_first == {"ckpt.pt": "ckpt.20.pt"}  # relative link to the newest

    config = yaml.safe_load(seg.config_after_first)
    assert config["trainer"]["exp_dir"] == str(seg.exp_dir.resolve())
    assert config["task"]["max_steps"] == 20
    assert config["model"]["hidden"] == 16
    assert config["lr_scheduler"]["name"] == "constant"  # defaults are written out in full

    records = seg.records_after_first
    assert _train_steps(records) == list(range(1, 21))
    assert [r["step"] for r in records if r["phase"] == "valid"] == [10, 20]
    assert [r["step"] for r in records if r["phase"] == "test"] == [20]
    assert all(isinstance(r["metrics"], dict) and r["metrics"] for r in records)
    assert "train/loss" in records[0]["metrics"]
    assert "valid/accuracy" in next(r for r in records if r["phase"] == "valid")["metrics"]

    assert f"Training in {seg.exp_dir}" in seg.first.stderr
    assert f"ml: run directory   {seg.exp_dir}" in seg.first.stderr
    assert "ckpt.pt -> ckpt.20.pt" in seg.first.stderr


def test_lock_file_names_the_process(two_segments: TwoSegments) -> None:
    text = (two_segments.exp_dir / ".lock_ckpt").read_text()
    assert "pid:" in text
    assert "host:" in text


def test_continuing_a_run_keeps_its_folder_and_counters(two_segments: TwoSegments) -> None:
    seg = two_segments
    assert sorted(p.name for p in (seg.run_dir / "tiny").iterdir()) == ["run_0"]  # no run_1
    checkpoints = seg.exp_dir / "checkpoints"
    assert {p.name for p in checkpoints.iterdir()} == {"ckpt.10.pt", "ckpt.20.pt", "ckpt.30.pt", "ckpt.pt"}
    assert os.readlink(checkpoints / "ckpt.pt") == "ckpt.30.pt"
    assert not (seg.exp_dir / ".lock_running").exists()
    assert "Resumed from" in seg.second.stderr

    records = _records(seg.exp_dir)
    assert records[: len(seg.records_after_first)] == seg.records_after_first  # appended, not rewritten
    steps = _train_steps(records)
    assert steps == list(range(1, 31))  # 21..30 follow 1..20: strictly increasing, none twice
    keys = [(r["step"], r["phase"]) for r in records]
    assert len(keys) == len(set(keys))
    assert [r["step"] for r in records if r["phase"] == "valid"] == [10, 20, 30]
    second_segment = records[len(seg.records_after_first) :]
    assert second_segment[0]["elapsed_s"] >= seg.records_after_first[-1]["elapsed_s"]  # the clock goes on
    assert "step 30" in (seg.exp_dir / "logs" / "stdout.log").read_text()


def test_a_changed_config_on_continue_is_saved_with_a_backup(two_segments: TwoSegments) -> None:
    seg = two_segments
    backups = sorted(seg.exp_dir.glob("config.*.yaml"))
    assert len(backups) == 1, backups
    assert backups[0].read_text() == seg.config_after_first
    new = yaml.safe_load((seg.exp_dir / "config.yaml").read_text())
    assert new["task"]["max_steps"] == 30
    old = yaml.safe_load(seg.config_after_first)
    old["task"]["max_steps"] = 30
    assert new == old  # nothing else changed
    assert "task.max_steps=20" in seg.second.stderr  # the diff is reported
    assert "task.max_steps=30" in seg.second.stderr


def _snapshot(exp_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(exp_dir)): p.read_bytes() for p in sorted(exp_dir.rglob("*")) if p.is_file()}


def test_a_meaningful_config_change_stops_the_resume_unless_allowed(files: Files, tmp_path: Path) -> None:
    """An edited optimizer is refused (exit 2, one line, nothing touched); with the flag it is recorded."""
    _ok(ml(files, "train", files.tiny, "task.max_steps=5", run_dir=tmp_path))
    exp_dir = tmp_path / "tiny" / "run_0"
    config = exp_dir / "config.yaml"
    config.write_text(config.read_text().replace("lr: 0.001", "lr: 0.002"))  # edited by hand
    before = _snapshot(exp_dir)
    refused = ml(files, "train", config, "task.max_steps=8", run_dir=tmp_path)
    assert refused.returncode == 2, refused.stderr
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("ml: error: the config changed since the checkpoint")
    assert "optimizer.lr: 0.001 -> 0.002" in last and "--allow-config-change" in last
    assert "Traceback" not in refused.stderr
    assert _snapshot(exp_dir) == before  # nothing on disk changed, the lock is gone again

    allowed = _ok(ml(files, "train", config, "task.max_steps=8", "--allow-config-change", run_dir=tmp_path))
    assert "Resumed from" in allowed.stderr
    log = (exp_dir / "config_changes.log").read_text()
    assert "allowed at step 5" in log and "optimizer.lr: 0.001 -> 0.002" in log
    assert "task.max_steps: 5 -> 8" in log  # the whole diff is recorded, free keys included


# ---------------------------------------------------------------------------------------------
# resolve and help


def test_resolve_prints_the_composed_config(files: Files, tmp_path: Path) -> None:
    more = tmp_path / "more.yaml"
    more.write_text("model: {hidden: 99}\noptimizer: {lr: 0.5}\n")
    run_dir = tmp_path / "runs"
    run_dir.mkdir()
    result = _ok(ml(files, "resolve", files.tiny, more, "optimizer.lr=0.25", "task.seed=7", run_dir=run_dir))
    config = yaml.safe_load(result.stdout)
    assert config["model"]["hidden"] == 99  # the later file wins
    assert config["optimizer"]["lr"] == 0.25  # overrides win last
    assert config["task"]["seed"] == 7
    assert config["task"]["max_steps"] == 20
    assert config["optimizer"]["beta1"] == 0.9  # the component's defaults are filled in
    assert set(config) == {"model", "task", "optimizer", "lr_scheduler", "trainer", "logger", "launcher"}
    assert list(run_dir.iterdir()) == []  # resolving creates nothing


def _assert_lists_fields(help_text: str) -> None:
    assert "trainer.checkpoint.save_every_n_steps" in help_text
    assert "Save a checkpoint every N steps" in help_text
    assert "optimizer.lr" in help_text
    assert "Learning rate" in help_text
    assert "task.max_steps" in help_text
    assert "Stop after this many optimizer steps" in help_text


def test_top_level_help_names_the_components_without_importing_torch(files: Files, tmp_path: Path) -> None:
    result = _ok(ml(files, "--help", run_dir=tmp_path))
    assert "ml train CONFIG" in result.stdout
    assert "optimizer:    adam, adamw, adan, gan, lamb, lion, prodigy, sgd, shampoo" in result.stdout
    assert "trainer:      gan, rl, sl" in result.stdout
    assert "ml train --help" in result.stdout
    code = "import sys; from ml.cli import main; main(['--help']); print('torch' in sys.modules)"
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert shown.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize(
    "args",
    [
        ["digits", "optimiser.lr=0.1"],  # an unknown section
        ["digits", "logger.name=stdout"],  # a mapping where the config has a list
    ],
    ids=["unknown section", "wrong shape"],
)
def test_a_config_that_cannot_compose_is_refused_before_torch_is_imported(
    args: list[str], tmp_path: Path
) -> None:
    """The user waits a tenth of a second for the line, not the second and a half torch takes."""
    code = (
        "import sys; from ml.cli import main; "
        f"code = main(['train', *{args!r}]); print(code, 'torch' in sys.modules)"
    )
    shown = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert shown.stdout.split() == ["2", "False"], shown.stderr
    assert shown.stderr.startswith("ml: error: "), shown.stderr
    assert list(tmp_path.iterdir()) == []


def test_train_help_lists_every_field(files: Files, tmp_path: Path) -> None:
    result = _ok(ml(files, "train", "--help", run_dir=tmp_path))
    _assert_lists_fields(result.stdout)
    for component in ("optimizer: adam ", "optimizer: sgd ", "logger: jsonl ", "trainer: sl "):
        assert component in result.stdout


def test_help_with_a_config_lists_the_selected_components(files: Files, tmp_path: Path) -> None:
    result = _ok(ml(files, "train", "digits", "--help", run_dir=tmp_path))
    _assert_lists_fields(result.stdout)
    assert "optimizer: adamw " in result.stdout  # what the digits config selects
    assert "optimizer: sgd " not in result.stdout
    assert "model.channels" in result.stdout
    assert "Channels of the first convolution" in result.stdout
    assert "model: digits_mlp " not in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_help_with_a_config_shows_the_values_that_apply(files: Files, tmp_path: Path) -> None:
    """The config's values, as ``ml resolve`` shows them, not the dataclasses' defaults."""
    args = ("digits", "task.max_steps=60")
    shown = _ok(ml(files, "train", *args, "--help", run_dir=tmp_path)).stdout
    resolved = _ok(ml(files, "resolve", *args, run_dir=tmp_path)).stdout
    assert (
        "    drop_last: true\n    shuffle: true\n    max_batches: null\n  valid_dl:" in resolved
    )  # train_dl's
    for line in (
        "task.train_dl.shuffle: bool = True",  # train_dl's own default, not DataLoaderConfig's False
        "task.train_dl.drop_last: bool = True",
        "task.valid_dl.shuffle: bool = False",
        "task.max_steps: int | None = 60",  # the override
        "lr_scheduler.total_steps: int | None = 60",  # derived from it
        "trainer.exp_dir: str = ???",  # claimed when the run starts
        "logger[0].name: str = stdout",
    ):
        assert f"  {line}\n" in shown, line
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing on disk


BAD_OVERRIDES: dict[str, tuple[list[str], str]] = {
    "typo in a key": (["optimizer.lrr=1"], "optimizer.lrr"),
    "typo in a nested key": (["trainer.checkpoint.save_every=1"], "trainer.checkpoint.save_every"),
    "wrong type": (["task.max_steps=abc"], "task.max_steps"),
    "an evaluation's limit on the training data": (  # task.max_steps and the like end training
        ["task.train_dl.max_batches=5"],
        "task.train_dl.max_batches=5: only validation and test sets are cut short; end training with "
        "task.max_steps, max_epochs or max_samples",
    ),
    "unknown section in an override": (["optimiser.lr=1"], "unknown section 'optimiser'"),
    "unknown component": (["optimizer.name=adamx"], "unknown optimizer 'adamx'"),
    "unknown import path": (["model.name=no_such_module_e2e:Model"], "cannot import module"),
    "missing initial checkpoint": (
        ["trainer.checkpoint.load_from_ckpt_path=/no/such/ckpt.pt"],
        "trainer.checkpoint.load_from_ckpt_path",
    ),
    "override without a key": (["=3"], "bad override '=3'"),
    "value a component rejects": (["task.max_steps=-1"], "task.max_steps must be positive"),
    "value the trainer rejects": (["trainer.non_finite_loss=maybe"], "trainer.non_finite_loss"),
    "broken interpolation": (["optimizer.lr=${nope}"], "optimizer.lr"),
    "a matmul precision torch lacks": (
        ["trainer.float32_matmul_precision=tf32"],
        "trainer.float32_matmul_precision must be one of highest, high, medium (or null), got 'tf32'",
    ),
    "a trainer setting, after a component's warning": (  # the trainer's checks come first now
        [
            "lr_scheduler.name=cosine",
            "lr_scheduler.warmup_steps=100",
            "trainer.checkpoint.save_every_n_steps=0",
        ],
        "trainer.checkpoint.save_every_n_steps must be positive",
    ),
    "a monitor that is not evaluated": (  # the others are tests/trainers/test_monitor.py's
        ["trainer.early_stopping.monitor=train/loss"],
        "trainer.early_stopping.monitor=train/loss is not an evaluation metric",
    ),
    "a logger's value it rejects": (
        ["logger=[{name: stdout, precision: -3}]"],
        "logger[0] (stdout): precision is",
    ),
    "a name wandb refuses": (  # the others are tests/loggers/test_wandb.py's
        ["logger=[{name: wandb, project: a/b}]"],
        "logger[0] (wandb): project 'a/b' contains /",
    ),
    "a sweep as an override": (  # compose drops the sweep: section: it trained one run, silently
        ["sweep.optimizer.lr=[1e-3,2e-3]"],
        "sweep.optimizer.lr=[1e-3,2e-3]: a sweep is not a key=value override (it would be ignored): "
        "sweep on the command line with -m optimizer.lr=1e-3,2e-3, or in a `sweep:` section",
    ),
    "a mapping for the logger list": (
        ["logger={name: jsonl}"],
        "logger={name: jsonl}: logger is a list of loggers (stdout, jsonl), not a mapping: "
        "write 'logger=[{name: jsonl}]'",
    ),
    "a key of one logger": (
        ["logger.0.precision=-3"],
        "logger.0.precision=-3: logger is a list of loggers (stdout, jsonl), and one entry of a list "
        "cannot be set on its own: give the whole list, 'logger=[{name: stdout, write_every_n_steps: 5, "
        "precision: -3}, {name: jsonl, write_every_n_steps: 1}]'",
    ),
    "two loggers of one file": (  # every record was written twice into metrics.jsonl
        ["logger=[{name: jsonl},{name: jsonl, write_every_n_steps: 1}]"],
        "logger[0] and logger[1] are both jsonl loggers, which write the log folder's one metrics.jsonl",
    ),
}
BAD_FILES = ("unknown section in YAML", "bad YAML", "missing file")


@dataclass(frozen=True)
class BadRun:
    result: subprocess.CompletedProcess[str]
    expected: str
    run_dir: Path


@pytest.fixture(scope="module")
def bad_runs(files: Files, tmp_path_factory: pytest.TempPathFactory) -> dict[str, BadRun]:
    """Every bad-input case, run side by side, each forked from one process that imported torch
    (tests/forked_ml.py): the cases are about what ``ml`` says, not about its start-up."""
    root = tmp_path_factory.mktemp("bad")
    (root / "extra.yaml").write_text("sheduler: {name: cosine}\n")
    broken = root / "broken.yaml"
    broken.write_text(
        "model: {name: digits_mlp}\noptimizer: {name: adam}\ntask: {name: digits\n  max_steps: 3\n"
    )
    cases = {
        case: ([str(files.tiny), *overrides], expected)
        for case, (overrides, expected) in BAD_OVERRIDES.items()
    }
    cases["unknown section in YAML"] = (
        [str(files.tiny), str(root / "extra.yaml")],
        "unknown section 'sheduler'",
    )
    cases["bad YAML"] = ([str(broken)], f"bad YAML in {broken}:4")  # the line of the unclosed brace's end
    cases["missing file"] = ([str(root / "nope.yaml")], f"config file not found: {root / 'nope.yaml'}")

    run_dirs = [root / f"runs_{number}" for number in range(len(cases))]
    commands = []
    for run_dir, (args, _) in zip(run_dirs, cases.values(), strict=True):
        run_dir.mkdir()
        commands.append(Command(["train", *args], _env(files, run_dir), timeout_s=TIMEOUT_S))
    results = run_forked(commands, parallel=max(2, os.cpu_count() or 2))
    return {
        case: BadRun(result, expected, run_dir)
        for (case, (_, expected)), result, run_dir in zip(cases.items(), results, run_dirs, strict=True)
    }


@pytest.mark.parametrize("case", [*BAD_OVERRIDES, *BAD_FILES])
def test_bad_input_stops_with_one_line(case: str, bad_runs: dict[str, BadRun]) -> None:
    result, expected, run_dir = bad_runs[case].result, bad_runs[case].expected, bad_runs[case].run_dir
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ml: error: ")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert list(run_dir.iterdir()) == []  # not even an empty experiment folder


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        ("NoDatasetMethodTask", "NoDatasetMethodTask does not implement get_dataset"),
        ("NoTrainingDataTask", "task NoTrainingDataTask has no training data: no train split"),
    ],
)
def test_a_task_without_training_data_stops_with_one_line(
    files: Files, tmp_path: Path, task: str, expected: str
) -> None:
    result = ml(
        files,
        "train",
        files.user,
        f"task.name={USER_MODULE}:{task}",  # another component: its section starts from its defaults
        "task.threshold=0",
        "task.max_steps=2",
        run_dir=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ml: error:") and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # the run directory claimed for it is gone again


def test_missing_required_value_of_a_user_component(files: Files, tmp_path: Path) -> None:
    result = ml(files, "train", files.user, run_dir=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "ml: error: missing required value task.threshold: set it in the YAML or with task.threshold=..."
    ]
    assert list(tmp_path.iterdir()) == []


def test_bad_command_line(files: Files, tmp_path: Path) -> None:
    for args in (["bogus"], ["train", str(files.tiny), "--debgu"], []):
        result = ml(files, *args, run_dir=tmp_path)
        assert result.returncode == 2, args
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("ml: error: "), (args, result.stderr)
    assert list(tmp_path.iterdir()) == []


def test_debug_shows_the_traceback(files: Files, tmp_path: Path) -> None:
    result = ml(files, "train", files.tiny, "optimizer.lrr=1", "--debug", run_dir=tmp_path)
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert "ConfigError" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("ml: error: optimizer.lrr")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Defaults, user code, failures and interrupts


def test_unset_run_dir_uses_runs_under_the_working_directory(files: Files, tmp_path: Path) -> None:
    result = _ok(
        ml(
            files,
            "train",
            files.tiny,
            "task.max_steps=2",
            "trainer.valid_every_n_steps=null",
            cwd=tmp_path,
            run_dir=None,
        )
    )
    runs = tmp_path / "runs"
    mentions = [line for line in result.stderr.splitlines() if "RUN_DIR" in line]
    assert mentions == [f"ml: RUN_DIR is not set; using {runs.resolve()}"]
    assert (runs / "tiny" / "run_0" / "config.yaml").is_file()
    assert os.readlink(runs / "tiny" / "run_0" / "checkpoints" / "ckpt.pt") == "ckpt.2.pt"


def test_user_task_by_import_path(files: Files, tmp_path: Path) -> None:
    _ok(ml(files, "train", files.user, "task.threshold=0.0", run_dir=tmp_path))
    exp_dir = tmp_path / "user" / "run_0"
    config = yaml.safe_load((exp_dir / "config.yaml").read_text())
    assert config["task"]["name"] == f"{USER_MODULE}:SumSignTask"
    assert config["task"]["num_samples"] == 48  # the user's config class was inferred and filled
    assert config["task"]["threshold"] == 0.0
    records = _records(exp_dir)
    assert _train_steps(records) == [1, 2, 3, 4, 5, 6]
    assert {"valid", "test"} <= {r["phase"] for r in records}

    result = ml(files, "train", files.user, "task.threshold=0", "task.num_sample=3", run_dir=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("ml: error: task.num_sample: Key 'num_sample' not in 'SumSignConfig'")


def test_the_collector_runs_less_often_while_torch_is_imported(files: Files, tmp_path: Path) -> None:
    """ml.utils.startup_gc: fewer collections while the config is composed (a fifth of torch's import
    was the collector walking its objects again and again); the user's code at Python's pace."""
    task = f"task.name={USER_MODULE}:GcWatchTask"
    args = ["train", files.user, task, "task.threshold=0", "task.max_steps=2"]
    _ok(ml(files, *args, run_dir=tmp_path, fresh=True))
    steps = [r for r in _records(tmp_path / "user" / "run_0") if r["phase"] == "train"]
    assert [r["step"] for r in steps] == [1, 2]
    default = gc.get_threshold()[0]
    assert default == 700  # Python's
    for record in steps:
        metrics = record["metrics"]
        assert metrics["task/gc_threshold_at_import"] == IMPORT_THRESHOLD
        assert metrics["task/gc_threshold_at_set_up"] == default  # data sets made at Python's pace
        assert metrics["task/gc_threshold"] == default
        assert metrics["task/gc_frozen"] > 100_000  # torch's modules and the like, out of every walk


def test_early_stopping_the_best_checkpoint_and_its_moving_average_from_the_command_line(
    files: Files, tmp_path: Path
) -> None:
    args = [
        "task.max_steps=60",
        "trainer.checkpoint.monitor=valid/accuracy",  # higher is better, from the name
        "trainer.early_stopping.monitor=valid/loss",
        "trainer.early_stopping.patience=1",
        "trainer.early_stopping.min_delta=10",  # no validation improves by that much
        "trainer.ema.decay=0.9",
    ]
    result = _ok(ml(files, "train", files.tiny, *args, run_dir=tmp_path))
    exp_dir = tmp_path / "tiny" / "run_0"
    status = json.loads((exp_dir / "status.json").read_text())
    assert (status["state"], status["step"]) == ("finished", 20)  # validated at 10 (best), then 20
    assert status["reason"].startswith("early stopping: valid/loss did not improve by more than 10 in 1")
    assert f"ml: best checkpoint {exp_dir / 'checkpoints' / 'best.pt'} -> ckpt." in result.stderr
    assert "ml: stopped early   valid/loss did not improve" in result.stderr
    assert "test/accuracy" in result.stderr  # a run that stopped early is tested like any finished one
    scores = json.loads((exp_dir / "checkpoints" / "scores.json").read_text())
    best_step = int(next(iter(scores["scores"])))
    assert scores["mode"] == "max" and best_step in (10, 20)
    assert (exp_dir / "checkpoints" / "best.pt").resolve().name == f"ckpt.{best_step}.pt"

    out = tmp_path / "export" / "model.safetensors"
    out.parent.mkdir()  # (a folder that does not exist is refused, as by ml plot -o)
    exported = _ok(ml(files, "export", exp_dir, "-o", out, "--checkpoint", "best", "--ema", run_dir=tmp_path))
    assert f"exported the moving average of step {best_step}" in exported.stdout
    best = torch.load(exp_dir / "checkpoints" / "best.pt", weights_only=True)
    weights = safetensors.torch.load_file(out)
    assert weights.keys() == best["ema"]["weights"].keys()
    assert all(torch.equal(weights[k], best["ema"]["weights"][k]) for k in weights)
    assert any(not torch.equal(weights[k], best["model"][k]) for k in weights)


def test_failure_during_training_exits_1_and_keeps_the_run(files: Files, tmp_path: Path) -> None:
    args = ["task.threshold=0", "task.fail_at_step=3", "trainer.checkpoint.save_every_n_steps=2"]
    result = ml(files, "train", files.user, *args, run_dir=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback (most recent call last)" in result.stderr  # a bug in user code: show where
    assert "TypeError: user bug at step 3" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("ml: training failed: TypeError")
    exp_dir = tmp_path / "user" / "run_0"
    assert os.readlink(exp_dir / "checkpoints" / "ckpt.pt") == "ckpt.2.pt"  # the work done is kept
    assert not (exp_dir / ".lock_running").exists()  # torn down before the error propagated
    assert _train_steps(_records(exp_dir)) == [1, 2, 3]


def test_values_that_stop_being_finite_fail_the_run_in_one_line(files: Files, tmp_path: Path) -> None:
    """Not a bug to trace: the line names the step and the fix (it came after a traceback)."""
    result = ml(files, "train", files.tiny, "optimizer.lr=1e38", "task.max_steps=5", run_dir=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("ml: training failed: non-finite values at step 2"), last
    assert "trainer.check_grads=true" in last


def test_ctrl_c_checkpoints_and_exits_130(files: Files, tmp_path: Path) -> None:
    args = ["task.threshold=0", "task.max_steps=100000", "task.step_sleep_s=0.01"]
    proc = subprocess.Popen(
        [*ML, "train", str(files.user), *args],
        env=_env(files, tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    exp_dir = tmp_path / "user" / "run_0"
    metrics = exp_dir / "logs" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 60
        while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "Stopping on SIGINT" in stderr
    last_step = _train_steps(_records(exp_dir))[-1]
    assert os.readlink(exp_dir / "checkpoints" / "ckpt.pt") == f"ckpt.{last_step}.pt"
    assert not (exp_dir / ".lock_running").exists()


def test_main_leaves_the_environment_as_it_found_it(
    files: Files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ml.cli import main

    monkeypatch.delenv("RUN_DIR", raising=False)
    monkeypatch.delenv("ML_EXP_NAME", raising=False)
    other = tmp_path / "other.yaml"
    other.write_text(files.tiny.read_text().replace("exp_name: tiny", "exp_name: ${ml.exp_name:null}"))
    assert main(["resolve", str(other)]) == 0
    assert "exp_name: other" in capsys.readouterr().out
    assert "RUN_DIR" not in os.environ and "ML_EXP_NAME" not in os.environ
    renamed = tmp_path / "renamed.yaml"
    renamed.write_text(other.read_text())
    assert main(["resolve", str(renamed)]) == 0
    assert "exp_name: renamed" in capsys.readouterr().out  # not the first command's name


def test_initial_weights_that_do_not_fit_stop_with_one_line(
    files: Files, two_segments: TwoSegments, tmp_path: Path
) -> None:
    ckpt = two_segments.exp_dir / "checkpoints" / "ckpt.pt"  # a hidden=16 model
    result = ml(
        files,
        "train",
        files.tiny,
        "model.hidden=8",
        f"trainer.checkpoint.load_from_ckpt_path={ckpt}",
        run_dir=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ml: error: checkpoint weights do not fit"), result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "command",
    [["--help"], ["train", "TINY", "--help"], ["resolve", "TINY", "-m", "optimizer.lr=1e-3,2e-3"]],
    ids=["help", "a config's help", "resolve a sweep"],
)
def test_a_reader_that_stops_early_ends_the_output_quietly(
    files: Files, tmp_path: Path, command: list[str]
) -> None:
    """``ml --help | head -1``, ``ml resolve ... | head``: the reader took what it wanted. They said
    "training failed: BrokenPipeError" after a traceback and exited 1 (stdout buffered, as it is
    without PYTHONUNBUFFERED: "Exception ignored ... BrokenPipeError" and 120)."""
    env = _env(files, tmp_path / "runs")
    env.pop("PYTHONUNBUFFERED")
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    try:
        args = [str(files.tiny) if arg == "TINY" else arg for arg in command]
        result = subprocess.run(
            [*ML, *args], env=env, stdout=write, stderr=subprocess.PIPE, text=True, timeout=TIMEOUT_S
        )
    finally:
        os.close(write)
    assert result.returncode == 128 + signal.SIGPIPE, result.stderr
    assert result.stderr == ""
    assert not (tmp_path / "runs").exists()


def test_help_with_stdout_closed_says_nothing(files: Files, tmp_path: Path) -> None:
    """``ml --help >&-``: Python has no stdout then (None); the flush of the output's end raised
    AttributeError ("training failed", exit 1)."""
    result = subprocess.run(
        [*ML, "--help"], env=_env(files, tmp_path / "runs"), preexec_fn=lambda: os.close(1),
        stderr=subprocess.PIPE, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert (result.returncode, result.stderr) == (0, "")


@pytest.mark.parametrize("stderr_too", [False, True], ids=["stdout", "stdout-and-stderr"])
def test_training_goes_on_when_the_reader_of_its_stdout_quits(
    files: Files, tmp_path: Path, stderr_too: bool
) -> None:
    # `ml train config.yaml | head` (and `2>&1 | head`): the stdout logger's next line, and the
    # summary on stderr, meet a closed pipe.
    config = tmp_path / "user.yaml"
    config.write_text(
        files.user.read_text()
        .replace("max_steps: 6", "max_steps: 6, step_sleep_s: 0.05")
        .replace("logger: [", "logger: [{name: stdout, write_every_n_steps: 1}, ")
    )
    env = _env(files, tmp_path / "runs")
    args = [str(config), "task.threshold=0"]
    if stderr_too:  # digits warns of its short warm-up first; RUN_DIR's notice then meets the closed pipe
        del env["RUN_DIR"]
        args = [
            "digits",
            "task.max_steps=6",
            "logger=[{name: stdout, write_every_n_steps: 1}, {name: jsonl, write_every_n_steps: 1}]",
        ]
    with subprocess.Popen(
        [*ML, "train", *args],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if stderr_too else subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith(("[", "ml: ") if stderr_too else "[train] step 1 "), first
        proc.stdout.close()  # as `head -n 1` exits
        _, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0 and "Traceback" not in (err or ""), err
    run = tmp_path / "runs" / ("digits" if stderr_too else "user") / "run_0"
    assert [r["step"] for r in _records(run) if r["phase"] == "train"] == [1, 2, 3, 4, 5, 6]
    logged = (run / "logs" / "stdout.log").read_text()
    assert "[train] step 6 " in logged  # the stdout logger's file keeps every line
