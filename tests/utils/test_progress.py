"""Progress bars appear on a terminal and nowhere else."""

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest

from ml.utils.progress import progress

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
        proc = subprocess.Popen(
            [sys.executable, "-c", script], stderr=follower, stdout=subprocess.PIPE, text=True
        )
        os.close(follower)  # read while it runs: the child's end closing ends the reads
        drawn = b""
        try:
            while chunk := os.read(leader, 4096):
                drawn += chunk
        except OSError:  # EIO: the terminal closed, everything has been read
            pass
        os.close(leader)
        stdout, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and stdout.strip() == "1225"
        assert (b"valid" in drawn and b"/50" in drawn) == expect_bar, drawn
