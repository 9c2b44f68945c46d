"""The training progress bar, end to end: ``ml train`` on a pseudo-terminal, on pipes, and with the bar off.

Each run is a real ``ml`` process whose stdout and stderr are a pseudo-terminal (or pipes); what it
writes is replayed on a small terminal model (carriage returns overwrite, ``ESC[A`` moves up) to see
what a user's screen shows at the end: the bar's last state on a line of its own, every log line
whole on its own line, the validation bars gone. The runs go side by side, to keep the time down.
"""

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

_SCRIPT = Path(sys.executable).parent / "ml"
ML = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "ml.cli"]
TIMEOUT_S = 120
COLUMNS = 120

MODULE = "ml_progress_bar_task"
TASK = '''\
"""A tiny task that can sleep, fail or send itself SIGTERM at a step (for the progress bar tests)."""

import os
import signal
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from ml.core.config import conf_field
from ml.tasks.sl import SupervisedLearningTask, SupervisedLearningTaskConfig


@dataclass
class SlowConfig(SupervisedLearningTaskConfig):
    step_sleep_s: float = conf_field(0.0, help="Sleep this long in each training step")
    fail_at_step: int | None = conf_field(None, help="Raise an error at this step")
    sigterm_at_step: int | None = conf_field(None, help="Send this process SIGTERM at this step")


class SlowTask(SupervisedLearningTask[SlowConfig]):
    def get_dataset(self, phase):
        generator = torch.Generator().manual_seed({"train": 0, "valid": 1, "test": 2}[phase])
        inputs = torch.randn(64, 64, generator=generator)
        return TensorDataset(inputs, (inputs.sum(dim=1) > 0).long())

    def compute_loss(self, model, batch, state, output):
        if state.training:
            if state.num_steps == self.config.fail_at_step:
                raise TypeError(f"user bug at step {state.num_steps}")
            if state.num_steps == self.config.sigterm_at_step:
                os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(self.config.step_sleep_s)
        return F.cross_entropy(output, batch[1])
'''

CONFIG = f"""\
# ml train bar.yaml
model: {{name: digits_mlp, hidden: 8, num_layers: 1}}
task:
  name: "{MODULE}:SlowTask"
  max_steps: 20
  step_sleep_s: 0.03
  train_dl: {{batch_size: 8}}
  valid_dl: {{batch_size: 64}}
  test_dl: {{batch_size: 64}}
optimizer: {{name: sgd, lr: 0.1}}
trainer:
  name: sl
  exp_name: bar
  valid_every_n_steps: 10
  checkpoint: {{save_every_n_steps: 10}}
logger: [{{name: stdout, write_every_n_steps: 5}}]
"""

LOG_RECORD = re.compile(r"^\[[IWE] \d\d:\d\d:\d\d ")  # a logging record's line, as the CLI formats it


@dataclass(frozen=True)
class Run:
    returncode: int
    raw: bytes  # everything the process wrote
    exp_dir: Path

    @property
    def screen(self) -> list[str]:
        return screen(self.raw)


def screen(raw: bytes) -> list[str]:
    """What a terminal shows after ``raw``: ``\\r`` returns, ``\\n`` goes down, ``ESC[nA`` up; no wrap."""
    rows: list[list[str]] = [[]]
    row = col = 0
    for token in re.findall(r"\x1b\[[0-9;]*[A-Za-z]|\x1b|\r|\n|[^\x1b\r\n]+", raw.decode(errors="replace")):
        if token == "\r":
            col = 0
        elif token == "\n":
            row += 1
            rows.extend([] for _ in range(row + 1 - len(rows)))
        elif token.startswith("\x1b["):
            if token.endswith("A"):
                row = max(0, row - int(token[2:-1] or 1))
            elif token.endswith("K"):
                del rows[row][col:]
        elif token != "\x1b":
            line = rows[row]
            line.extend(" " * (col - len(line)))
            line[col : col + len(token)] = token
            col += len(token)
    return ["".join(chars).rstrip() for chars in rows]


def _env(lib: Path, run_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ML_EXP_NAME", "RANK", "WORLD_SIZE")}
    env["RUN_DIR"] = str(run_dir)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(lib), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    env["COLUMNS"] = str(COLUMNS)
    return env


def run_ml(args: list[str], lib: Path, run_dir: Path, *, terminal: bool) -> Run:
    """Runs ``ml`` to its end with stdout and stderr on one pseudo-terminal (or pipes); all it wrote."""
    env = _env(lib, run_dir)
    if not terminal:
        done = subprocess.run(
            [*ML, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=TIMEOUT_S
        )
        return Run(done.returncode, done.stdout, run_dir / "bar" / "run_0")
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, COLUMNS, 0, 0))
    proc = subprocess.Popen([*ML, *args], env=env, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
    os.close(follower)  # the child's end closing ends the reads
    raw = bytearray()
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while select.select([leader], [], [], max(0.0, deadline - time.monotonic()))[0]:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal closed, everything has been read
                break
            if not chunk:
                break
            raw += chunk
    finally:
        os.close(leader)
        if proc.poll() is None and time.monotonic() >= deadline:
            proc.kill()
    return Run(proc.wait(timeout=30), bytes(raw), run_dir / "bar" / "run_0")


RL = [
    "cartpole",
    "task.max_samples=1536",  # 12 iterations of 4 environments x 32 steps
    "task.num_envs=4",
    "task.num_env_steps=32",
    "task.num_update_epochs=2",
    "task.minibatch_size=128",
    "trainer.eval_every_n_iterations=6",
    "trainer.num_eval_episodes=2",
]
CASES = {  # name: the arguments after `ml train` (BAR: the SL config), on a terminal or pipes
    "terminal": (["BAR"], True),
    "pipes": (["BAR"], False),
    "off": (["BAR", "trainer.progress_bar=false"], True),
    "error": (["BAR", "task.fail_at_step=5"], True),
    "sigterm": (["BAR", "task.sigterm_at_step=8"], True),
    "rl": (RL, True),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    root = tmp_path_factory.mktemp("progress_bar")
    (root / "lib").mkdir()
    (root / "lib" / f"{MODULE}.py").write_text(TASK)
    (root / "bar.yaml").write_text(CONFIG)

    def one(name: str) -> Run:
        args, terminal = CASES[name]
        args = [str(root / "bar.yaml") if arg == "BAR" else arg for arg in args]
        return run_ml(["train", *args], root / "lib", root / name, terminal=terminal)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(CASES, pool.map(one, CASES), strict=True))


def _bar_lines(lines: list[str], prefix: str = "train:") -> list[str]:
    return [line for line in lines if line.startswith(prefix)]


def _assert_lines_whole(run: Run) -> None:
    """No line on the screen holds both a bar and a log line: every log line stands on its own."""
    for line in run.screen:
        bar_part = "step/s" in line or "s/step" in line or "train:" in line
        log_part = LOG_RECORD.search(line) or re.search(r"\[(train|valid|test)\] step \d+", line)
        assert not (bar_part and log_part), line
    stdout_log = run.exp_dir / "logs" / "stdout.log"
    shown = set(run.screen)
    for line in stdout_log.read_text().splitlines():
        assert line in shown, f"{line!r} is not a whole line of the screen:\n" + "\n".join(run.screen)


def test_bar_on_a_terminal_shows_steps_rate_loss_and_keeps_log_lines_whole(runs: dict[str, Run]) -> None:
    run = runs["terminal"]
    assert run.returncode == 0, run.raw.decode(errors="replace")
    (bar,) = _bar_lines(run.screen)  # what stays: the bar's last state, on a line of its own
    assert "20/20" in bar and "100%" in bar, bar
    assert re.search(r"\d+\.\d+step/s", bar) and re.search(r"loss=\d", bar) and "epoch=2" in bar, bar
    # Redrawn while training, with the loss read then (not only at the end)
    assert re.search(rb"\| ?1?\d/20 \[[^\]]*loss=\d", run.raw), run.raw
    _assert_lines_whole(run)
    saved = [line for line in run.screen if "Saved checkpoint" in line]
    assert len(saved) == 2 and all(LOG_RECORD.match(line) for line in saved), saved
    # The validation and test bars were drawn while they ran, then removed
    assert (
        b"valid:" in run.raw and not _bar_lines(run.screen, "valid:") and not _bar_lines(run.screen, "test:")
    )


def test_no_bar_on_pipes_nor_when_turned_off(runs: dict[str, Run]) -> None:
    pipes, off = runs["pipes"], runs["off"]
    assert pipes.returncode == 0 and off.returncode == 0, (pipes.raw, off.raw)
    assert b"\r" not in pipes.raw and b"step/s" not in pipes.raw
    # On a terminal each line ends with \r\n; a bar frame would start with a \r of its own
    assert not re.search(rb"\r(?!\n)", off.raw) and b"step/s" not in off.raw, off.raw
    for run in (pipes, off):
        assert b"[train] step 20 epoch 2" in run.raw and b"Saved checkpoint" in run.raw


def test_bar_closes_before_an_error_and_on_a_stop_signal(runs: dict[str, Run]) -> None:
    error = runs["error"]
    assert error.returncode == 1, error.raw
    lines = [line for line in error.screen if line]
    (bar,) = _bar_lines(lines)
    assert "5/20" in bar, bar
    assert "Traceback (most recent call last):" in lines[lines.index(bar) + 1 :], lines
    assert lines[-1] == "ml: training failed: TypeError: user bug at step 5", lines
    _assert_lines_whole(error)

    stopped = runs["sigterm"]
    assert stopped.returncode == 0, stopped.raw
    lines = [line for line in stopped.screen if line]
    (bar,) = _bar_lines(lines)
    step = int(re.search(r"(\d+)/20", bar).group(1))  # type: ignore[union-attr]
    assert 8 <= step < 20, bar
    after = lines[lines.index(bar) + 1 :]
    assert any("Saved checkpoint" in line and f"ckpt.{step}.pt" in line for line in after), lines
    _assert_lines_whole(stopped)


def test_rl_bar_counts_iterations_of_max_samples_and_shows_the_return(runs: dict[str, Run]) -> None:
    run = runs["rl"]
    assert run.returncode == 0, run.raw
    (bar,) = _bar_lines(run.screen)
    assert "12/12" in bar and re.search(r"\d+\.\d+it/s", bar) and re.search(r"return=\d", bar), bar
    for line in run.screen:
        assert not (("it/s" in line or "train:" in line) and LOG_RECORD.search(line)), line
    assert any(line.startswith("[train] step 1 ") for line in run.screen), run.screen
