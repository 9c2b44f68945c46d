"""``trainer.profile`` end to end: ``ml train digits`` with torch's profiler over chosen steps.

The trace must be the Chrome trace format that Perfetto and TensorBoard's profiler plugin open,
hold the profiled steps and only them, and the top operators must be printed at the end.

The module's three runs are independent: they start together, and each test waits for its own.
"""

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

_SCRIPT = Path(sys.executable).parent / "ml"
ML = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "ml.cli"]
TIMEOUT_S = 120
FAST = ["trainer.valid_at_end=false", "trainer.test_at_end=false", "logger=[{name: stdout}]"]


def _train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(RUN_DIR=str(tmp_path / "runs"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [*ML, "train", "digits", *FAST, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)


# Each test's run: its arguments to `ml train digits`.
RUNS = {
    "traced": [
        "task.max_steps=9",
        "trainer.profile.active=3",
        "trainer.profile.wait=2",
        "trainer.profile.warmup=1",
        "trainer.profile.top=4",
    ],
    "too_short": ["task.max_steps=2", "trainer.profile.active=2", "trainer.profile.wait=5"],
    "records_nothing": ["task.max_steps=200", "trainer.profile.active=0"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Path, Future]]]:
    """Every run of ``RUNS`` started at once, each in a folder of its own: its folder, its result."""
    with ThreadPoolExecutor(max_workers=len(RUNS)) as pool:
        started = {}
        for name, args in RUNS.items():
            folder = tmp_path_factory.mktemp(name)
            started[name] = (folder, pool.submit(_train, folder, *args))
        yield started


def test_the_profiled_steps_are_traced_and_their_top_operators_printed(
    runs: dict[str, tuple[Path, Future]],
) -> None:
    tmp_path, future = runs["traced"]
    result = future.result()
    assert result.returncode == 0, result.stderr
    traces = list((tmp_path / "runs" / "digits" / "run_0" / "logs" / "tensorboard" / "profile").iterdir())
    assert len(traces) == 1 and traces[0].name.endswith(".pt.trace.json")
    events = json.loads(traces[0].read_text())["traceEvents"]
    # The profiler counts steps from 0: after 2 waited and 1 warm-up, the 4th to 6th are recorded.
    steps = sorted({e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")})
    assert steps == ["ProfilerStep#3", "ProfilerStep#4", "ProfilerStep#5"]
    assert any(e.get("name") == "aten::convolution_backward" for e in events)  # the backward pass is in it
    table = result.stderr[result.stderr.index("Top operators") :]
    # The operators are the lines between the rule under the header and the closing rule (any
    # operator may make the top: the data loader's record did, when its batches came slowly).
    rules = [i for i, line in enumerate(table.splitlines()) if line.strip().startswith("-----")]
    rows = table.splitlines()[rules[1] + 1 : rules[2]]
    assert len(rows) == 4, table  # trainer.profile.top
    assert all(row.split()[-1].isdigit() for row in rows), table  # each ends with its number of calls


def test_a_run_too_short_for_its_profile_says_so(runs: dict[str, tuple[Path, Future]]) -> None:
    tmp_path, future = runs["too_short"]
    result = future.result()
    assert result.returncode == 0, result.stderr
    assert "training ended before a profiled step; nothing was written" in result.stderr
    assert not (tmp_path / "runs" / "digits" / "run_0" / "logs" / "tensorboard" / "profile").exists()


def test_a_profile_that_records_nothing_is_refused_before_a_run_folder(
    runs: dict[str, tuple[Path, Future]],
) -> None:
    tmp_path, future = runs["records_nothing"]
    result = future.result()
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "trainer.profile.active must be at least 1" in lines[0], result.stderr
    assert not (tmp_path / "runs" / "digits").exists() or not any((tmp_path / "runs" / "digits").iterdir())
