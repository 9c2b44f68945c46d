"""Smoke test of ``bench/overhead.py``: every contender trains a few steps, and the driver's parts work.

It needs the peers (``pip install -e ".[bench]"``): without Lightning or Accelerate it is skipped. The
contenders run in one fresh interpreter, apart from the test process (Lightning and Accelerate keep
global state); so do a worker's measurement (what each benchmark interpreter runs) and the summary.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning")
pytest.importorskip("accelerate")
pytest.importorskip("sklearn")

BENCH = Path(__file__).resolve().parents[2] / "bench"

SCRIPT = """
import json, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import overhead as o
from common import table

steps, warmup, runs = 6, 2, {}
for name in o.CONTENDERS:
    clock = o._Clock(warmup, steps, lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        o.RUNNERS[name](o.MODELS["tiny"], steps, clock, Path(tmp))
    runs[name] = {"calls": clock.calls, "marks": sorted(clock.times)}
with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / "result.json"
    o.worker("plain", "tiny", steps, warmup, time.time(), out)
    result = json.loads(out.read_text())
columns, rows, summary = o.summarize({"tiny": {n: [result] for n in o.CONTENDERS}}, list(o.CONTENDERS))
print(table(columns, rows), file=sys.stderr)
print(json.dumps({"runs": runs, "result": result, "ratio": summary["tiny"]["ml"]["ratio_to_plain"]}))
"""


def test_every_contender_trains_and_the_driver_summarizes() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(BENCH)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, run in out["runs"].items():
        assert run["calls"] == 6, name  # one training forward pass per step, nothing more
        assert run["marks"] == ["first_step_done", "timed_end", "timed_start"], name
    assert out["result"]["timed_steps"] == 3
    assert out["result"]["steps_per_s"] > 0 and out["result"]["cpu_steps_per_s"] > 0
    assert out["result"]["startup_s"] > 0
    assert out["ratio"] == 1.0  # the same (plain) result stands for every contender here
