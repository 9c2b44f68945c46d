"""Smoke test of ``bench/overhead.py``: every contender trains a few steps, and the driver's parts work.

The plain loops and ``ml`` always run; the peers (Lightning, Fabric, Accelerate: ``pip install -e
".[bench]"``) only where they are installed. The contenders run in one fresh interpreter, apart from
the test process (Lightning and Accelerate keep global state); so do a worker's measurement (what each
benchmark interpreter runs) and the summary.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
PEERS = ("lightning", "lightning_stripped", "fabric", "accelerate")

SCRIPT = """
import json, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import overhead as o
from common import table

names = sys.argv[2].split(",")
steps, warmup, runs = 6, 2, {}
for name in names:
    clock = o._Clock(warmup, steps, lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        o.RUNNERS[name](o.MODELS["tiny"], steps, clock, Path(tmp))
    runs[name] = {"calls": clock.calls, "marks": sorted(clock.times), "stamps": len(clock.stamps)}
with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / "result.json"
    o.worker("plain", "tiny", steps, warmup, time.time(), out)
    result = json.loads(out.read_text())
columns, rows, summary = o.summarize({"tiny": {n: [result, result] for n in names}}, names)
print(table(columns, rows), file=sys.stderr)
print(json.dumps({"runs": runs, "result": result, "summary": summary["tiny"]}))
"""


def _smoke(names: list[str]) -> dict:
    cmd = [sys.executable, "-c", SCRIPT, str(BENCH), ",".join(names)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(out["runs"]) == sorted(names)
    for name, run in out["runs"].items():
        assert run["calls"] == 6, name  # one training forward pass per step, nothing more
        assert run["marks"] == ["first_step_done", "timed_end", "timed_start"], name
        assert run["stamps"] == 4, name  # passes 3 to 6: the timed steps' boundaries
    return out


def test_the_plain_loops_and_ml_train_and_the_driver_summarizes() -> None:
    names = ["plain", "plain_again", "plain_tuned", "ml", "ml_minimal"]
    out = _smoke(names)
    result = out["result"]
    assert result["timed_steps"] == 3
    assert result["steps_per_s"] > 0 and result["cpu_steps_per_s"] > 0
    assert result["median_step_per_s"] > 0 and result["faults_per_step"] >= 0
    assert result["startup_s"] > 0
    for name in names:  # the same (plain) result stands for every contender here
        assert out["summary"][name]["ratio_to_plain"] == 1.0, name
        assert out["summary"][name]["ratio_middle_half"] == "1.00-1.00", name


@pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("lightning", "accelerate")),
    reason="the peers are not installed (pip install -e '.[bench]')",
)
def test_the_peers_train() -> None:
    _smoke(list(PEERS))
