"""Tests ``ml tensorboard`` against a real TensorBoard server on real runs' logs.

- Started on an experiment folder (holding ``run_0``) and another run folder, it prints
  ``TensorBoard: http://127.0.0.1:PORT/``; the server answers there, lists both runs' phases
  and has each run's ``train/loss`` scalars; SIGTERM stops it with exit code 0 and frees the port.
- Folders without TensorBoard logs, and a missing tensorboard package, are one ``ml: error:``
  line with exit code 2.
"""

import json
import selectors
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from ml.cli import main as ml_main
from tests.tools.test_export import ML, env, run_python, trained_runs

START_TIMEOUT_S = 90.0


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return trained_runs(tmp_path_factory, "a", "c")


def _read_url(proc: subprocess.Popen[str]) -> str:
    """The URL ``ml tensorboard`` prints once TensorBoard serves (its stdout, line by line)."""
    assert proc.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if selector.select(timeout=0.5):
            line = proc.stdout.readline()
            if line.startswith("TensorBoard: "):
                return line.split(": ", 1)[1].strip()
            assert line, f"ml tensorboard ended (exit code {proc.wait()}) without serving"
    raise AssertionError("ml tensorboard printed no URL in time")


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _until(url: str, check: Any) -> Any:
    """GETs ``url`` until ``check(answer)`` holds (the server loads the event files in the background)."""
    deadline, answer = time.monotonic() + START_TIMEOUT_S, None
    while time.monotonic() < deadline:
        try:
            answer = _get(url)
        except (urllib.error.URLError, ConnectionError):
            answer = None
        if answer is not None and check(answer):
            return answer
        time.sleep(0.2)
    raise AssertionError(f"{url} never answered as expected; last answer: {answer}")


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers do not count
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
        return True


def test_serves_the_runs_on_127_0_0_1_and_stops_on_sigterm(runs: dict[str, Path], tmp_path: Path) -> None:
    experiment = runs["a"].parent  # a folder holding run_0
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:  # a file, not a pipe: nothing blocks on what TensorBoard says
        proc = subprocess.Popen(
            [*ML, "tensorboard", str(experiment), str(runs["c"])],
            env=env(),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        url = _read_url(proc)
        assert url.startswith("http://127.0.0.1:") and url.endswith("/")
        port = int(url.rsplit(":", 1)[1].strip("/"))
        # The runs are named after their folders: a/digits/run_0 and c/digits/run_0.
        names = {run: "/".join(runs[run].parts[-3:]) for run in ("a", "c")}
        wanted = {f"{names[run]}/{phase}" for run in ("a", "c") for phase in ("train", "test")}
        listed = _until(url + "data/runs", lambda answer: wanted <= set(answer))
        assert all(name.startswith((names["a"], names["c"])) for name in listed)
        tags = _until(
            url + "data/plugin/scalars/tags",
            lambda answer: all("train/loss" in answer.get(f"{names[run]}/train", {}) for run in ("a", "c")),
        )
        assert "test/loss" in tags[f"{names['a']}/test"]
        # Only 127.0.0.1: nothing listens on the machine's other addresses at that port.
        with socket.socket() as sock:
            sock.settimeout(2)
            other = socket.gethostbyname(socket.gethostname())
            if other != "127.0.0.1":
                assert sock.connect_ex((other, port)) != 0
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert proc.returncode == 0, log.read_text()
        assert _port_is_free(port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_input_is_one_line(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for args, message in [
        ([str(tmp_path)], "no TensorBoard logs in"),
        ([str(tmp_path / "nope")], "no such run folder"),
        ([str(runs["a"]), "--port", "70000"], "--port 70000"),
    ]:
        code = ml_main(["tensorboard", *args])  # in this process: it fails before starting anything
        err = capsys.readouterr().err
        assert code == 2 and message in err, err
        assert err.startswith("ml: error: ") and len(err.strip().splitlines()) == 1


def test_without_tensorboard_it_says_what_to_install(runs: dict[str, Path]) -> None:
    code = (
        "import sys\nsys.modules['tensorboard'] = None  # as if it were not installed\n"
        "from ml.cli import main\n"
        f"sys.exit(main(['tensorboard', {str(runs['a'])!r}]))\n"
    )
    result = run_python(code)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("ml: error: TensorBoard is not installed: run `")
    assert "pip install tensorboard" in result.stderr
