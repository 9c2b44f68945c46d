"""Sweeps through the real command line: ``ml train CONFIG -m key=a,b``, a ``sweep:`` section in YAML.

- ``ml train -m`` runs the grid here, one run after another: each point an ordinary run folder with
  its values in its own ``config.yaml``, resumable on its own; ``ml runs --config KEY`` shows the
  points side by side, ``ml plot --config KEY`` labels their curves with their values.
- A YAML ``sweep:`` combines with ``-m`` (the command line's choices win for a key both give), and
  quoted or bracketed values holding commas are one value (checked through ``ml stage``, which
  prepares the points' folders without training).
- A stop signal to the sweep reaches the running point, which stops with a checkpoint; no further
  point starts.
- A bad sweep is refused with one line, exit code 2, before any run folder exists.

The Slurm job array is tested with the other Slurm tests, in ``tests/e2e/test_slurm.py``.

Every command that needs no other's result starts when the module does (the ``started`` fixture),
each in a folder of its own; each test waits for its own. The sweep a test stops is the real
script; the others are forked from a process that imported torch (tests/forked_ml.py) and take
turns, while the points a sweep runs are new interpreters, as for the script.
"""

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.e2e.test_distributed import ML, TIMEOUT_S, _env, _train_losses
from tests.forked_ml import run_ml

CONFIG = """\
model: {name: digits_mlp, hidden: 16, dropout: 0.0}
task: {name: digits, seed: 3, max_steps: 3, train_dl: {batch_size: 32}}
optimizer: {name: adam, lr: 1e-2}
trainer: {name: sl, exp_name: sw, valid_at_end: false}
logger: [{name: jsonl, write_every_n_steps: 1}]
"""


def _ml(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``ml ARGS`` in ``cwd`` to completion, forked from a process that imported torch
    (tests/forked_ml.py); a sweep's points are new interpreters, as for the script."""
    return run_ml(args, _env(cwd / "runs"), cwd, TIMEOUT_S)


def _config(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


SLOW_TASK = """\
import time

from ml.examples.digits import DigitsTask, DigitsTaskConfig


class SlowDigitsTask(DigitsTask):
    def __init__(self, config: DigitsTaskConfig) -> None:
        super().__init__(config)

    def compute_loss(self, model, batch, state, output):
        time.sleep(0.1)
        return super().compute_loss(model, batch, state, output)
"""

LRS = "optimizer.lr=1e-2,2e-2"
YAML_SWEEP = "sweep:\n  model.hidden: [8, 16]\n  optimizer: {lr: [0.5]}\n"
# `ml stage` of the YAML sweep with -m, and values holding commas.
STAGE_ARGS = [
    "-m",
    "optimizer.lr=1e-2,2e-2",  # replaces the YAML's choices for this key
    "launcher.name=slurm",  # (stage submits nothing)
    "launcher.extra_args=[--hold,--mem=1G]",  # a list: one value
    'trainer.exp_name="sw,quoted"',  # a comma inside quotes: one value
]
# Bad sweeps: the arguments, the YAML's sweep section, what the one line says.
BAD_SWEEPS = [
    (["-m", "optimizer.lrr=1e-2,2e-2"], "", "optimizer.lrr"),
    (["-m", "optimizer.lr=1e-2,"], "", "has an empty choice"),
    (["-m", "optimizer.lr=1e-2,fast"], "", "sweep point 2 (optimizer.lr=fast): optimizer.lr"),
    ([], "sweep:\n  optimizer.lr: []\n", "sweep key optimizer.lr has no values"),
    (["-m", "trainer.exp_dir=a,b"], "", "sweep key trainer.exp_dir: a sweep cannot vary it"),
    # What ml train refuses before it claims a run folder, found before point 1 trains.
    (
        ["-m", "trainer.log_dir_name=logs,../escape"],
        "",
        "sweep point 2 (trainer.log_dir_name=../escape): trainer.log_dir_name must be a plain folder name",
    ),
    (
        ["-m", "trainer.device=cpu,cuda:99"],
        "",
        "sweep point 2 (trainer.device=cuda:99): trainer.device=cuda:99",
    ),
    (
        ["-m", "optimizer.lr=1e-2,2e-2", "trainer.exp_dir=one"],
        "",
        "the points would train in one folder",
    ),
]


@dataclass
class Started:
    """The module's commands that need no other's result, started together."""

    folders: dict[str, Path]
    grid: Future  # `ml train sw.yaml -m optimizer.lr=1e-2,2e-2`, to its end
    stage: Future  # `ml stage` of the YAML sweep with STAGE_ARGS
    resolve: Future  # `ml resolve` of the YAML sweep with -m
    plain: Future  # `ml train` of the YAML sweep with a comma but no -m
    bad: list[Future]  # BAD_SWEEPS' `ml train`, in their order
    stop: subprocess.Popen[str]  # a sweep of the slow task, for a test to stop
    stop_err: Path  # its stderr


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Started]:
    folders = {}
    for name, config in [
        ("grid", CONFIG),
        ("stage", CONFIG + YAML_SWEEP),
        ("resolve", CONFIG + YAML_SWEEP),
        ("plain", CONFIG + YAML_SWEEP),
        *((f"bad{i}", CONFIG + sweep) for i, (_, sweep, _) in enumerate(BAD_SWEEPS)),
        ("stop", CONFIG.replace("name: digits,", "name: 'slow:SlowDigitsTask',")),
    ]:
        folders[name] = tmp_path_factory.mktemp(name)
        (folders[name] / "sw.yaml").write_text(config)
    stop = folders["stop"]
    (stop / "sw.yaml").write_text((stop / "sw.yaml").read_text().replace("max_steps: 3", "max_steps: 100000"))
    (stop / "slow.py").write_text(SLOW_TASK)  # importable from the working directory
    with ThreadPoolExecutor(max_workers=4 + len(BAD_SWEEPS)) as pool, (stop / "stderr").open("w") as err:
        proc = subprocess.Popen(
            [*ML, "train", "sw.yaml", "-m", LRS],
            env=_env(stop / "runs"),
            cwd=stop,
            stdout=subprocess.DEVNULL,
            stderr=err,
            text=True,
        )
        try:
            yield Started(
                folders=folders,
                grid=pool.submit(_ml, "train", "sw.yaml", "-m", LRS, cwd=folders["grid"]),
                stage=pool.submit(_ml, "stage", "sw.yaml", *STAGE_ARGS, cwd=folders["stage"]),
                resolve=pool.submit(_ml, "resolve", "sw.yaml", "-m", LRS, cwd=folders["resolve"]),
                plain=pool.submit(_ml, "train", "sw.yaml", LRS, cwd=folders["plain"]),
                bad=[
                    pool.submit(_ml, "train", "sw.yaml", *args, cwd=folders[f"bad{i}"])
                    for i, (args, _, _) in enumerate(BAD_SWEEPS)
                ],
                stop=proc,
                stop_err=stop / "stderr",
            )
        finally:
            if proc.poll() is None:  # its test did not run: stopped as a sweep is
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=TIMEOUT_S)


def test_a_stop_signal_ends_the_running_point_and_the_sweep(started: Started) -> None:
    # A sweep of 2 points of the slow task (0.1 s a step), 100000 steps each.
    tmp_path, proc = started.folders["stop"], started.stop
    run = tmp_path / "runs" / "sw" / "run_0"
    deadline = time.monotonic() + TIMEOUT_S
    while not ((run / "logs" / "metrics.jsonl").exists() and _train_losses(run)):
        assert proc.poll() is None and time.monotonic() < deadline, started.stop_err.read_text()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # to the sweep, which passes it on to the point it runs
    proc.wait(timeout=TIMEOUT_S)
    err = started.stop_err.read_text()
    assert proc.returncode == 0, err[-3000:]
    assert "Stopping on SIGTERM at step" in err
    assert "ml: sweep stopped by SIGTERM; 1 of 2 points not started" in err
    assert [p.name for p in (tmp_path / "runs" / "sw").iterdir()] == ["run_0"]
    assert json.loads((run / "status.json").read_text())["state"] == "interrupted"
    assert (run / "checkpoints" / "ckpt.pt").is_file()


def test_a_sweep_runs_each_point_as_its_own_resumable_run(started: Started) -> None:
    tmp_path = started.folders["grid"]
    result = started.grid.result()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ml: sweep point 1/2: optimizer.lr=1e-2" in result.stderr
    assert "ml: sweep point 2/2: optimizer.lr=2e-2" in result.stderr
    runs = sorted((tmp_path / "runs" / "sw").iterdir())
    assert [r.name for r in runs] == ["run_0", "run_1"]
    assert [_config(r)["optimizer"]["lr"] for r in runs] == [0.01, 0.02]
    losses = [_train_losses(r) for r in runs]
    assert sorted(losses[0]) == sorted(losses[1]) == [1, 2, 3]
    assert losses[0][1] == losses[1][1] and losses[0][3] != losses[1][3]  # same start, own learning rate

    # The runs side by side in a table, with the swept key's values; overlaid in a plot.
    with ThreadPoolExecutor(max_workers=3) as pool:
        table, listed, plot = (
            pool.submit(_ml, *args, cwd=tmp_path)
            for args in (
                ("runs", "runs/sw", "--config", "optimizer.lr"),
                ("runs", "runs/sw", "--json", "--config", "optimizer.lr"),
                ("plot", "runs/sw", "--config", "optimizer.lr", "-o", "sw.svg"),
            )
        )
        table, listed, plot = table.result(), listed.result(), plot.result()
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split()[:4] == ["EXPERIMENT", "RUN", "optimizer.lr", "STATE"]
    assert [row.split()[:5] for row in rows] == [
        ["sw", "run_0", "0.01", "finished", "3"],
        ["sw", "run_1", "0.02", "finished", "3"],
    ]
    listed = json.loads(listed.stdout)
    assert [r["config"] for r in listed] == [{"optimizer.lr": 0.01}, {"optimizer.lr": 0.02}]

    # Each curve labelled with its value (matplotlib keeps a text's string in the SVG).
    assert plot.returncode == 0, plot.stderr
    svg = (tmp_path / "sw.svg").read_text()
    assert "sw/run_0 optimizer.lr=0.01" in svg and "sw/run_1 optimizer.lr=0.02" in svg

    # One point continues on its own, from its checkpoint, with its own learning rate.
    more = _ml("train", str(runs[1] / "config.yaml"), "task.max_steps=5", cwd=tmp_path)
    assert more.returncode == 0, more.stderr[-3000:]
    assert f"Resumed from {runs[1] / 'checkpoints' / 'ckpt.pt'} at step 3" in more.stderr
    assert sorted(_train_losses(runs[1])) == [1, 2, 3, 4, 5]
    assert _config(runs[1])["optimizer"]["lr"] == 0.02
    assert sorted(_train_losses(runs[0])) == [1, 2, 3]


def test_a_yaml_sweep_and_the_command_line_make_one_grid(started: Started) -> None:
    tmp_path = started.folders["stage"]
    result = started.stage.result()  # `ml stage` with STAGE_ARGS
    assert result.returncode == 0, result.stderr[-3000:]
    staged = [Path(line) for line in result.stdout.splitlines()]
    assert [p.name for p in staged] == ["run_0", "run_1", "run_2", "run_3"]
    assert {p.parent for p in staged} == {tmp_path / "runs" / "sw,quoted"}
    grid = [(_config(p)["model"]["hidden"], _config(p)["optimizer"]["lr"]) for p in staged]
    assert grid == [(8, 0.01), (8, 0.02), (16, 0.01), (16, 0.02)]  # the last key varies fastest
    assert {tuple(_config(p)["launcher"]["extra_args"]) for p in staged} == {("--hold", "--mem=1G")}
    assert all("sweep" not in _config(p) for p in staged)  # each point is an ordinary run's config

    # `ml resolve` shows each point's config under a line naming it.
    resolved = started.resolve.result()  # -m optimizer.lr=1e-2,2e-2
    assert resolved.returncode == 0, resolved.stderr[-3000:]
    named = [line for line in resolved.stdout.splitlines() if line.startswith("# sweep point")]
    assert named[1] == "# sweep point 2/4: model.hidden=8 optimizer.lr=2e-2"
    assert len(named) == 4 and "sweep:" not in resolved.stdout

    # Without -m, commas are plain text, as they always were: here a value no float field takes.
    plain = started.plain.result()  # optimizer.lr=1e-2,2e-2
    assert plain.returncode == 2
    assert "optimizer.lr" in plain.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(("args", "sweep", "message"), BAD_SWEEPS)
def test_a_bad_sweep_is_refused_before_any_run_folder(
    started: Started, args: list[str], sweep: str, message: str
) -> None:
    # `ml train sw.yaml *args`, the YAML with `sweep`, started with the module.
    index = BAD_SWEEPS.index((args, sweep, message))
    tmp_path, result = started.folders[f"bad{index}"], started.bad[index].result()
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ml: error: ") and message in lines[0], lines
    assert not (tmp_path / "runs").exists()
