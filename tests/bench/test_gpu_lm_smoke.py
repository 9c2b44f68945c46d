"""Smoke test of ``bench/gpu_lm.py``: its tiny shape on the CPU, every contender, the table and JSON."""

import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu_lm.py"
CONTENDERS = ["plain", "ml", "plain compiled", "ml compiled"]


def test_the_four_contenders_train_and_the_table_has_their_numbers(tmp_path: Path) -> None:
    out = tmp_path / "gpu_lm.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", **_python_path()},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["contender", "tokens/s"] and set(lines[1]) <= {"-", " "}
    assert [line[:14].strip() for line in lines[2:]] == CONTENDERS  # the four rows, in order
    record = json.loads(out.read_text())
    assert record["smoke"] is True and record["columns"][:4] == [
        "contender",
        "tokens/s",
        "x plain",
        "ms/step",
    ]
    for name, tokens_per_s, ratio, ms_per_step, mfu in record["rows"]:
        assert name in CONTENDERS
        for value in (tokens_per_s, ratio, ms_per_step):
            assert math.isfinite(value) and value > 0, (name, value)
        assert mfu is None  # no peak known for a CPU
    ratios = {row[0]: row[2] for row in record["rows"]}
    assert ratios["plain"] == ratios["plain compiled"] == 1.0  # each mode against its own plain loop
    assert record["weights"] == 132_864  # the tied embedding counted once, positions left out


def _python_path() -> dict[str, str]:
    import os

    return {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}


def test_each_card_gets_its_own_peak() -> None:
    """Every H100 or H200 was given the SXM card's 989 TFLOP/s: a PCIe card's utilisation came out a
    quarter too low."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_lm", BENCH)
    assert spec is not None and spec.loader is not None
    gpu_lm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_lm)
    peaks = {
        "NVIDIA H100 80GB HBM3": 989.0,
        "NVIDIA H100 PCIe": 756.0,
        "NVIDIA H100 NVL": 835.0,
        "NVIDIA H200": 989.0,
        "NVIDIA H200 NVL": 835.0,
        "NVIDIA A100-SXM4-80GB": 312.0,
        "NVIDIA GeForce RTX 4090": None,
    }
    assert {name: gpu_lm.peak_of(name) for name in peaks} == peaks
