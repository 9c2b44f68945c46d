"""Progress bars appear on a terminal and nowhere else; output goes above them; the training bar is cheap."""

import contextlib
import fcntl
import io
import logging
import os
import pty
import struct
import subprocess
import sys
import termios
import warnings
from typing import TextIO

import pytest
import torch

from ml.core.state import State
from ml.utils.progress import NEVER, TrainingBar, expected_total, progress, should_draw, write
from tests.e2e.test_progress_bar import screen

SCRIPT = (
    "from ml.utils.progress import progress\nprint(sum(progress(range(50), total=50, description='valid')))\n"
)


def test_silent_when_stderr_is_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    assert list(progress(range(5), total=5, description="valid")) == [0, 1, 2, 3, 4]
    assert capsys.readouterr().err == ""


def test_drawn_on_a_terminal_unless_disabled() -> None:
    for enabled, expect_bar in ((True, True), (False, False)):
        script = SCRIPT.replace("description='valid')", f"description='valid', enabled={enabled})")
        leader, follower = pty.openpty()
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
        proc = subprocess.Popen([sys.executable, "-c", script], stderr=follower, stdout=follower)
        os.close(follower)  # read while it runs: the child's end closing ends the reads
        drawn = b""
        try:
            while chunk := os.read(leader, 4096):
                drawn += chunk
        except OSError:  # EIO: the terminal closed, everything has been read
            pass
        os.close(leader)
        assert proc.wait(timeout=60) == 0 and b"1225\r\n" in drawn
        assert (b"valid" in drawn and b"/50" in drawn) == expect_bar, drawn


# ---------------------------------------------------------------------------------------------
# The training bar


class _TerminalOut(io.StringIO):
    """Stands for stdout on a terminal (the bar is drawn only when stdout is one too)."""

    def isatty(self) -> bool:
        return True


def _stdout_on_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    # In the test's body: pytest puts its own stdout back between a fixture's set-up and the test.
    monkeypatch.setattr(sys, "stdout", _TerminalOut())


def test_no_bar_when_stdout_is_piped(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ml train ... | tee log``: stdout's lines would reach the terminal after the bar's redraw."""
    leader, file = _terminal()
    try:
        monkeypatch.setattr(sys, "stdout", io.StringIO())
        assert not should_draw(file=file)
        monkeypatch.setattr(sys, "stdout", _TerminalOut())
        assert should_draw(file=file)
    finally:
        file.close()
        os.close(leader)


def _terminal() -> tuple[int, TextIO]:
    """A pseudo-terminal 100 columns wide: its reading end, and its writing end as a text file."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    os.set_blocking(leader, False)
    return leader, open(follower, "w", encoding="utf-8")


def _drawn(leader: int) -> bytes:
    out = b""
    with contextlib.suppress(OSError):  # nothing more (EAGAIN), or the writing end closed (EIO)
        while chunk := os.read(leader, 65536):
            out += chunk
    return out


def test_expected_total_from_the_limits() -> None:
    state = State.init_state()
    assert expected_total(state) is None  # e.g. only max_seconds: no total, no ETA
    assert expected_total(state, max_steps=100, max_samples=10_000, samples_per_step=64) == 100
    assert expected_total(state, max_samples=1000, samples_per_step=64) == 16  # ceil(1000 / 64)
    state.num_steps, state.num_samples, state.num_epochs, state.num_epoch_steps = 30, 1920, 1, 2
    assert expected_total(state, max_samples=3000, samples_per_step=64) == 30 + 17  # resumed: what is left
    assert expected_total(state, max_epochs=3, steps_per_epoch=28) == 30 + 2 * 28 - 2
    assert expected_total(state, max_epochs=3, steps_per_epoch=28, max_steps=50) == 50


def test_training_bar_redraws_rarely_and_starts_at_the_resumed_step(monkeypatch: pytest.MonkeyPatch) -> None:
    _stdout_on_terminal(monkeypatch)
    leader, file = _terminal()
    state = State.init_state()
    state.num_steps = 5  # resumed
    calls = 0
    try:
        with TrainingBar(state, file=file, interval_s=3600) as bar:
            bar.start(1000)
            assert bar.due == 6
            while state.num_steps < 1000:
                state.num_steps += 1
                last = state.num_steps == 1000
                if last or state.num_steps >= bar.due:  # as the trainers' loops do
                    calls += 1
                    bar.update({"epoch": 2, "loss": torch.tensor(0.123456)}, force=last)
        assert bar.due == NEVER
    finally:
        file.close()
    drawn = _drawn(leader)
    os.close(leader)
    # The interval never passed: the bar was looked at every 1, 2, 4, ... steps, and drawn at the start
    # and at the forced last step only
    assert calls <= 12, calls
    frames = [frame for frame in drawn.decode().split("\r") if frame.startswith("train:")]
    assert "5/1000" in frames[0] and "loss" not in frames[0], frames
    assert all("1000/1000" in frame and "epoch=2, loss=0.1235" in frame for frame in frames[1:]), frames
    assert drawn.endswith(b"\n")  # closed: the next output starts on a line of its own


def test_no_training_bar_on_other_ranks_or_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    _stdout_on_terminal(monkeypatch)
    leader, file = _terminal()
    state = State.init_state()
    try:
        with TrainingBar(state, file=file, enabled=False) as bar:
            bar.start(10)
            assert bar.due == NEVER
        assert should_draw(file=file)
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert not should_draw(file=file)
        with TrainingBar(state, file=file) as bar:
            bar.start(10)
            assert bar.due == NEVER
            bar.update({"loss": 1.0}, force=True)
    finally:
        file.close()
    assert _drawn(leader) == b""
    os.close(leader)


def test_logging_warnings_and_lines_print_above_the_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    leader, file = _terminal()
    monkeypatch.setattr(sys, "stderr", file)
    monkeypatch.setattr(sys, "stdout", file)
    handler = logging.StreamHandler(file)
    handler.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    showwarning = warnings.showwarning
    state = State.init_state()
    try:
        with TrainingBar(state) as bar:
            bar.start(4)
            for step in range(1, 5):
                state.num_steps = step
                bar.update({"loss": step / 10}, force=True)
                logging.getLogger("ml.test").warning("record %d", step)
                write(f"[train] step {step}")
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.warn("careful", UserWarning, stacklevel=1)
        assert handler.stream is file and warnings.showwarning is showwarning  # put back
    finally:
        root.removeHandler(handler)
        file.close()
    shown = screen(_drawn(leader))
    os.close(leader)
    for step in range(1, 5):
        assert f"[WARNING] record {step}" in shown and f"[train] step {step}" in shown, shown
    assert any(line.endswith("UserWarning: careful") for line in shown), shown
    bars = [line for line in shown if line.startswith("train:")]
    assert len(bars) == 1 and "4/4" in bars[0] and "loss=0.4" in bars[0], shown
    assert shown.index(bars[0]) > shown.index("[train] step 4")  # the bar stays below
