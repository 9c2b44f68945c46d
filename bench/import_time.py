"""Measures what importing ``ml`` costs on top of torch, with ``python -X importtime``.

Each statement runs in a fresh interpreter, ``--repeat`` times (interleaved, so drift in machine
load hits every statement alike), and the table shows medians. A run's time is the sum of the
cumulative times of the modules the statement imports at the top level; interpreter start-up is
left out (only imports after a marker written just before the statement count). ``import torch,
ml`` also reports the part of each module separately: ``ml``'s share there is what ``ml`` adds once
torch is loaded, measured in the same process, so it is not blurred by torch's run-to-run noise the
way a difference of two medians is. Run it with ``make bench`` or ``python bench/import_time.py``.
"""

import argparse
import importlib.util
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import table, write_results

MARKER = "@@import-time-start"
# "import time:  <self us> | <cumulative us> | <module>"; nested imports indent the module name.
_LINE = re.compile(r"^import time:\s+(\d+)\s+\|\s+(\d+)\s+\|( *)(\S+)\s*$")

STATEMENTS: tuple[str, ...] = (
    "import torch",
    "import torch; import omegaconf",
    "import ml",
    "import torch, ml",
    "import ml.trainers.base",
    "import torch; import ml.trainers.base",
    "import torch; import omegaconf; import ml.trainers.base",
)
# The peers, each measured like ``import ml`` (only when installed: ``pip install -e ".[bench]"``).
PEERS: tuple[str, ...] = tuple(
    f"import {name}" for name in ("lightning", "accelerate") if importlib.util.find_spec(name) is not None
)


def top_level_import_ms(statement: str) -> dict[str, float]:
    """Runs ``statement`` in a fresh interpreter; returns ms per module it imports at the top level."""
    code = f"import sys; sys.stderr.write({MARKER!r} + '\\n'); {statement}"
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True
    )
    lines = result.stderr.splitlines()
    times: dict[str, float] = {}
    for line in lines[lines.index(MARKER) + 1 :]:
        match = _LINE.match(line)
        if match and match.group(3) == " ":  # one space after "|": imported by the statement itself
            times[match.group(4)] = int(match.group(2)) / 1000
    return times


def measure(repeat: int) -> dict[str, dict[str, float]]:
    """Median ms per statement (key ``total``) and per top-level module, over ``repeat`` rounds."""
    runs: dict[str, list[dict[str, float]]] = {statement: [] for statement in STATEMENTS + PEERS}
    for _ in range(repeat):
        for statement in STATEMENTS + PEERS:
            runs[statement].append(top_level_import_ms(statement))
    medians: dict[str, dict[str, float]] = {}
    for statement, samples in runs.items():
        modules = list(dict.fromkeys(name for sample in samples for name in sample))  # import order
        medians[statement] = {name: statistics.median(s.get(name, 0.0) for s in samples) for name in modules}
        medians[statement]["total"] = statistics.median(sum(s.values()) for s in samples)
    return medians


# What every training process imports (torch's optimizers import torch._dynamo), in a bare interpreter
# and as the ml command does it: ml.entry first (the garbage collector runs less often while the
# config is composed), then imports_done before the components are built (one collection, what was
# imported frozen), then torch._dynamo (ml.utils.startup_gc).
TRAINING_IMPORTS = "import torch, torch._dynamo"
AS_ML_DOES = (
    "import ml.entry, torch; from ml.utils.startup_gc import imports_done; imports_done(); "
    "import torch._dynamo"
)


def help_wall_ms(repeat: int) -> dict[str, float]:
    """Median wall times in ms: ``ml --help``, ``ml train digits --help`` (which loads the components
    and so torch), a training process's imports bare and as ``ml`` makes them, and a bare
    ``python -c pass`` (interpreter start-up)."""
    script = str(Path(sys.executable).parent / "ml")
    commands = {
        "ml --help": [script, "--help"],
        "ml train digits --help": [script, "train", "digits", "--help"],
        TRAINING_IMPORTS: [sys.executable, "-c", TRAINING_IMPORTS],
        "the same, as ml's start-up does it": [sys.executable, "-c", AS_ML_DOES],
        "python -c pass": [sys.executable, "-c", "pass"],
    }
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeat):
        for name, command in commands.items():
            started = time.perf_counter()
            subprocess.run(command, capture_output=True, check=True)
            samples[name].append((time.perf_counter() - started) * 1000)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="fresh interpreters per statement")
    args = parser.parse_args()

    t = measure(args.repeat)
    print(f"Import time in ms, median of {args.repeat} fresh interpreters ({sys.executable})\n")
    print(f"{'statement':<56} {'total':>8}  per top-level module")
    for statement in STATEMENTS + PEERS:
        parts = "  ".join(f"{name} {ms:.1f}" for name, ms in t[statement].items() if name != "total")
        if len(parts) > 200:
            parts = parts[:200] + " ..."
        print(f"{statement:<56} {t[statement]['total']:>8.1f}  {parts}")

    torch_ms = t["import torch"]["total"]
    torch_ml, base = t["import torch, ml"], "ml.trainers.base"
    rows: list[tuple[str, float, float | None]] = [
        ("import ml, alone", t["import ml"]["total"], None),
        ("import ml over torch", torch_ml["total"] - torch_ms, torch_ml["ml"]),
        (
            "import ml.trainers.base over torch",
            t[f"import {base}"]["total"] - torch_ms,
            t["import torch; import ml.trainers.base"][base],
        ),
        (
            "import ml.trainers.base over torch + omegaconf",
            t[f"import {base}"]["total"] - t["import torch; import omegaconf"]["total"],
            t["import torch; import omegaconf; import ml.trainers.base"][base],
        ),
    ]
    rows += [(f"{peer} over torch", t[peer]["total"] - torch_ms, None) for peer in PEERS]
    print()
    print(table(("what it adds", "ms (difference of medians)", "ms (same process)"), rows))

    wall = help_wall_ms(args.repeat)
    print()
    print(table(("command", "ms wall"), list(wall.items())))
    print("\ntargets: import ml over torch < 300 ms, ml --help < 1000 ms")
    write_results(
        "import_time",
        {
            "repeat": args.repeat,
            "median_ms": {statement: t[statement]["total"] for statement in STATEMENTS + PEERS},
            "over_torch_ms": {label: difference for label, difference, _ in rows},
            "ml_over_torch_same_process_ms": torch_ml["ml"],
            "wall_ms": wall,
        },
        peers=("lightning", "accelerate"),
    )


if __name__ == "__main__":
    main()
