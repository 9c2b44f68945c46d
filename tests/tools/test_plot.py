"""Tests of ``ml plot`` on real runs: two short ``ml train digits`` runs, plotted as PNG and SVG.

The runs log every training step and validate every 5 steps. The images are checked as files: the
PNG signature and IHDR size, pixels of each run's colour (one run, then two overlaid), an SVG that
parses with the metric names and run labels as text; bad input is one ``ml: error:`` line, exit
code 2, and nothing written.
"""

import json
import os
import shutil
import struct
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from ml.tools import plot

_SCRIPT = Path(sys.executable).parent / "ml"
ML = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "ml.cli"]
TIMEOUT_S = 180
STEPS = 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# matplotlib's first two cycle colours (C0 blue, C1 orange): run_0's and run_1's curves.
RUN_COLOURS = {"C0": (0x1F, 0x77, 0xB4), "C1": (0xFF, 0x7F, 0x0E)}
TRAIN = [
    "digits",
    f"task.max_steps={STEPS}",
    "trainer.valid_every_n_steps=5",
    "lr_scheduler.warmup_steps=0",
    "logger=[{name: jsonl, write_every_n_steps: 1}]",
]


def _env(run_dir: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ML_EXP_NAME")
    }
    env.update(RUN_DIR=str(run_dir), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _ml(*args: str, run_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ML, *args], env=_env(run_dir, **env), capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )


@pytest.fixture(scope="module")
def exp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<RUN_DIR>/digits`` with run_0 and run_1: the same short job with two seeds, trained together."""
    run_dir = tmp_path_factory.mktemp("plot") / "runs"
    procs = [
        subprocess.Popen(
            [*ML, "train", *TRAIN, f"task.seed={seed}"],
            env=_env(run_dir),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 0, err[-3000:]
    exp_dir = run_dir / "digits"
    assert sorted(p.name for p in exp_dir.iterdir()) == ["run_0", "run_1"]
    return exp_dir


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]


def _png(path: Path) -> tuple[int, int, np.ndarray]:
    """The PNG's IHDR width and height, and its pixels (RGB, 0-255), after checking the signature."""
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    length, chunk = struct.unpack(">I4s", data[8:16])
    assert (length, chunk) == (13, b"IHDR")
    width, height = struct.unpack(">II", data[16:24])
    pixels = np.round(matplotlib.image.imread(path)[..., :3] * 255).astype(int)
    assert pixels.shape[:2] == (height, width)
    return width, height, pixels


def _count(pixels: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int((np.abs(pixels - np.array(colour)).max(axis=-1) <= 8).sum())


def _svg_texts(path: Path) -> list[str]:
    root = ET.parse(path).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    return [el.text or "" for el in root.iter("{http://www.w3.org/2000/svg}text")]


def test_the_runs_log_what_the_plots_need(exp: Path) -> None:
    for run in ("run_0", "run_1"):
        records = _records(exp / run)
        assert [r["step"] for r in records if r["phase"] == "train"] == list(range(1, STEPS + 1))
        assert [r["step"] for r in records if r["phase"] == "valid"] == [5, 10, 15, 20]
    losses = [
        [r["metrics"]["train/loss"] for r in _records(exp / run) if r["phase"] == "train"]
        for run in ("run_0", "run_1")
    ]
    assert losses[0] != losses[1]  # two seeds: two curves to tell apart


def test_png_of_one_run_has_the_requested_size_and_its_curves(exp: Path, tmp_path: Path) -> None:
    out = tmp_path / "one.png"
    assert plot.main([str(exp / "run_0"), "-o", str(out), "--width", "801", "--height", "457"]) == 0
    width, height, pixels = _png(out)
    assert (width, height) == (801, 457)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # lines, text, anti-aliasing: not blank
    assert _count(pixels, RUN_COLOURS["C0"]) > 200  # run_0's curves
    assert _count(pixels, RUN_COLOURS["C1"]) == 0  # and no second run


def test_two_runs_are_overlaid_with_a_legend(exp: Path, tmp_path: Path) -> None:
    png, svg = tmp_path / "two.png", tmp_path / "two.svg"
    assert plot.main([str(exp / "run_0"), str(exp / "run_1"), "-o", str(png)]) == 0
    width, height, pixels = _png(png)
    assert (width, height) == (plot.DEFAULT_WIDTH, plot.DEFAULT_HEIGHT)
    assert _count(pixels, RUN_COLOURS["C0"]) > 200 and _count(pixels, RUN_COLOURS["C1"]) > 200

    # The experiment folder stands for all its runs; SVG keeps the titles and labels as text.
    assert plot.main([str(exp), "-o", str(svg)]) == 0
    texts = _svg_texts(svg)
    assert {"train/loss", "valid/loss", "step"} <= set(texts)  # the default metrics, a subplot each
    assert texts.count("digits/run_0") == 2 and texts.count("digits/run_1") == 2  # a legend in each


def test_chosen_metrics_against_time(exp: Path, tmp_path: Path) -> None:
    out = tmp_path / "time.svg"
    metrics = ["valid/accuracy", "trainer/lr", "train/accuracy", "valid/loss"]
    argv = [str(exp / "run_1"), "--x", "time", "-o", str(out)]
    assert plot.main(argv + [arg for m in metrics for arg in ("--metric", m)]) == 0
    texts = _svg_texts(out)
    assert set(metrics) <= set(texts)
    # Four subplots in two columns: the x label under each column. A 20-step run takes seconds.
    assert texts.count("time (s)") == 2 and "step" not in texts


def test_repeated_steps_keep_the_last_record_and_a_cut_line_is_skipped(exp: Path, tmp_path: Path) -> None:
    run = tmp_path / "digits" / "run_0"
    shutil.copytree(exp / "run_0" / "logs", run / "logs")
    lines = (run / "logs" / "metrics.jsonl").read_text().splitlines(keepends=True)
    redone = json.loads(lines[2])  # step 3, as if logged again by a resumed run that kept old lines
    assert (redone["phase"], redone["step"]) == ("train", 3)
    redone["metrics"]["train/loss"] = "inf"
    with (run / "logs" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(redone) + "\n" + lines[4][:30])  # and a last line cut short by a kill

    steps, losses = plot.read_run(run, "x").curve("train/loss", "step")
    assert steps == [float(s) for s in range(1, STEPS + 1)]
    assert np.isnan(losses[2])  # the later record of step 3 (inf: a gap)
    assert losses[3] == json.loads(lines[3])["metrics"]["train/loss"]
    out = tmp_path / "p.png"
    assert plot.main([str(run), "-o", str(out)]) == 0 and out.stat().st_size > 0


def test_force_replaces_an_existing_image(exp: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.png"
    out.write_bytes(b"an older image")
    assert (
        plot.main([str(exp / "run_0"), "-o", str(out), "--width", "300", "--height", "200", "--force"]) == 0
    )
    assert _png(out)[:2] == (300, 200)
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]  # no temporary file left beside it


def test_command_line_writes_the_plot(exp: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.png"
    start = time.monotonic()
    result = _ml("plot", str(exp), "-o", str(out), run_dir=tmp_path)
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{out}: train/loss, valid/loss of 2 run(s)"
    assert _png(out)[:2] == (1000, 600)
    print(f"ml plot of 2 runs x {STEPS} steps took {elapsed:.2f} s")


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("not_a_run", "is not a run folder (no logs/metrics.jsonl in it)"),
        ("missing", "does not exist"),
        ("unknown_metric", "no run logged valid/nope; available: "),
        ("bad_suffix", "the output must end in .png or .svg"),
        ("exists", "exists; add --force to overwrite it"),
        ("too_small", "--width 10: give a size from 200 to 10000 pixels"),
        ("no_matplotlib", "ml plot needs matplotlib: pip install 'ml-trainer[plot]'"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    exp: Path, tmp_path: Path, case: str, expected: str
) -> None:
    run = str(exp / "run_0")
    out = tmp_path / "out.png"
    env: dict[str, str] = {}
    args = {
        "not_a_run": [str(tmp_path), "-o", str(out)],
        "missing": [str(tmp_path / "nope"), "-o", str(out)],
        "unknown_metric": [run, "--metric", "train/loss", "--metric", "valid/nope", "-o", str(out)],
        "bad_suffix": [run, "-o", str(tmp_path / "out.jpg")],
        "exists": [run, "-o", str(out)],
        "too_small": [run, "--width", "10", "-o", str(out)],
        "no_matplotlib": [run, "-o", str(out)],
    }[case]
    if case == "exists":
        out.write_bytes(b"keep me")
    if case == "no_matplotlib":  # a matplotlib that cannot be imported shadows the installed one
        (tmp_path / "shadow" / "matplotlib").mkdir(parents=True)
        (tmp_path / "shadow" / "matplotlib" / "__init__.py").write_text(
            "raise ImportError('no matplotlib')\n"
        )
        shadow = [str(tmp_path / "shadow"), os.environ.get("PYTHONPATH")]  # before the caller's path
        env["PYTHONPATH"] = os.pathsep.join(filter(None, shadow))
    before = sorted(p.name for p in tmp_path.iterdir())

    result = _ml("plot", *args, run_dir=tmp_path / "runs", **env)

    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("ml: error: "), result.stderr
    assert expected in result.stderr
    assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    if case == "exists":
        assert out.read_bytes() == b"keep me"
    if case == "unknown_metric":
        assert "train/loss" in result.stderr.split("available: ")[1]


def test_an_rl_run_plots_its_episode_returns_by_default() -> None:
    """Not the first metric it happens to log (its PPO diagnostics come first)."""
    logged = [
        "rl/approx_kl",
        "rl/clip_fraction",
        "rl/entropy",
        "rl/episode_return",
        "rl/eval_return",
        "trainer/lr",
    ]
    assert plot.default_metrics(logged) == ["rl/episode_return", "rl/eval_return"]
    assert plot.default_metrics(["rl/approx_kl", "rl/episode_return"]) == ["rl/episode_return"]
    assert plot.default_metrics(["train/loss", "valid/loss", "rl/episode_return"]) == [
        "train/loss",
        "valid/loss",
    ]
