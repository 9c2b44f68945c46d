"""Tests ``ml diff`` on real runs of the digits job (trained once, see ``test_export.trained_runs``).

- Two runs trained with different overrides: each changed setting is one ``path: old -> new``
  line, keys only one run has are marked, the paths are exactly those ``diff_configs`` reports
  (less ``trainer.exp_dir`` unless ``--all``), and the exit code is 1.
- Two runs trained alike: ``no differences``, exit code 0 (a run folder or its config.yaml).
- A config file is compared as it composes (the job's file against its run: only the overrides);
  a layer of overrides, as written, its header saying why.
- Colour only on a terminal (a real pty, the command in a subprocess), and not with ``NO_COLOR``
  or ``--color never``; ``--color always`` colours captured output too.
- ``ml diff`` does not import torch; bad paths are one ``ml: error:`` line with exit code 2.

Most checks call ``ml.cli.main`` in this process (the same code as the command, without paying
for a new interpreter each time); the terminal and import checks run the real command.
"""

import os
import pty
import subprocess
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

import ml
from ml.cli import main as ml_main
from tests.tools.test_export import ML, TIMEOUT_S, env, run_python, trained_runs

RED, GREEN, RESET = "\x1b[31m", "\x1b[32m", "\x1b[0m"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return trained_runs(tmp_path_factory, "a", "b", "c")


def diff(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``ml diff ARGS`` in this process, stdout captured (not a terminal): exit code, stdout, stderr."""
    code = ml_main(["diff", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _config(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


def test_runs_with_different_overrides_differ_in_those_settings(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from ml.trainers.base import diff_configs

    code, stdout, err = diff(str(runs["a"]), str(runs["b"]), capsys=capsys)
    assert code == 1, err
    lines = stdout.splitlines()
    assert lines[:2] == [f"--- {runs['a'] / 'config.yaml'}", f"+++ {runs['b'] / 'config.yaml'}"]
    body = lines[2:]
    assert "  optimizer.lr: 0.001 -> 0.0003" in body
    assert "  task.train_dl.batch_size: 64 -> 32" in body
    assert "  logger[0].name: stdout -> jsonl" in body
    # a logs to [stdout, jsonl, tensorboard], b to [jsonl]: a alone has the second and third, and
    # the fields only one of stdout and jsonl has are marked as one run's.
    dropped = [line for line in body if line.startswith(("- logger[1]", "- logger[2]"))]
    assert len(dropped) == 2
    assert dropped[0].startswith("- logger[1]: {name: jsonl, ") and dropped[0].endswith("}  (only in A)")
    assert dropped[1].startswith("- logger[2]: {name: tensorboard, ") and dropped[1].endswith(
        "}  (only in A)"
    )
    a, b = _config(runs["a"]), _config(runs["b"])
    only_a = a["logger"][0].keys() - b["logger"][0].keys()
    only_b = b["logger"][0].keys() - a["logger"][0].keys()
    assert only_a or only_b
    for key in only_a:
        assert any(x.startswith(f"- logger[0].{key}: ") and x.endswith("  (only in A)") for x in body), key
    for key in only_b:
        assert any(x.startswith(f"+ logger[0].{key}: ") and x.endswith("  (only in B)") for x in body), key

    # The same paths as the trainer's diff_configs, one line each; the run folders left out.
    removed, added = diff_configs(OmegaConf.create(a), OmegaConf.create(b))
    expected = {line.split("=", 1)[0] for line in removed + added} - {"trainer.exp_dir"}
    shown = [line[2:].split(": ", 1)[0] for line in body]
    assert sorted(shown) == sorted(expected) and len(set(shown)) == len(shown)
    assert RED not in stdout  # not a terminal: no colour


def test_runs_trained_alike_have_no_differences(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert diff(str(runs["a"]), str(runs["c"] / "config.yaml"), capsys=capsys)[:2] == (0, "no differences\n")
    code, stdout, _ = diff(str(runs["a"]), str(runs["c"]), "--all", capsys=capsys)  # their folders differ
    assert code == 1 and stdout.splitlines()[2:] == [f"  trainer.exp_dir: {runs['a']} -> {runs['c']}"]


def test_a_config_file_is_compared_as_it_composes(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The job's own config file against its run: only what the command line changed. Compared as
    written, every default the file leaves out was "only in B", and the file's ``1e-3`` (a string
    to YAML) differed from the run's 0.001."""
    digits = Path(ml.__file__).parent / "examples" / "digits" / "config.yaml"
    assert "lr: 1e-3" in digits.read_text()
    code, stdout, err = diff(str(digits), str(runs["a"]), capsys=capsys)
    assert code == 1, err
    assert stdout.splitlines() == [
        f"--- {digits}  (composed)",
        f"+++ {runs['a'] / 'config.yaml'}",
        "  task.max_steps: 1500 -> 5",
        "  lr_scheduler.warmup_steps: 100 -> 1",
        "  trainer.checkpoint.save_every_n_steps: 500 -> 2",
        "  trainer.checkpoint.only_save_most_recent: True -> False",
    ]
    # A file written with b's overrides, the numbers as a user writes them: the same as run b.
    mine = tmp_path / "mine.yaml"
    text = digits.read_text().replace("max_steps: 1500", "max_steps: 5").replace("lr: 1e-3", "lr: 3e-4")
    mine.write_text(
        text.replace("warmup_steps: 100", "warmup_steps: 1").replace("batch_size: 64", "batch_size: 32")
    )
    with mine.open("a") as f:
        f.write("logger: [{name: jsonl}]\n")
    assert diff(str(mine), str(runs["b"]), capsys=capsys)[:2] == (0, "no differences\n")


def test_a_layer_of_overrides_is_compared_as_written_and_says_why(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layer = tmp_path / "faster.yaml"
    layer.write_text("optimizer: {lr: 3e-4}\n")
    code, stdout, err = diff(str(layer), str(runs["b"]), capsys=capsys)
    assert code == 1, err
    lines = stdout.splitlines()
    assert lines[0] == f"--- {layer}  (as written: missing section 'model' (with at least `name:`))"
    assert lines[1] == f"+++ {runs['b'] / 'config.yaml'}"
    assert "  optimizer.lr: '3e-4' -> 0.0003" in lines  # YAML's string, shown as one
    assert "+ model: {name: digits_cnn, channels: 32, hidden: 128, dropout: 0.25}  (only in B)" in lines


def test_sweeps_are_compared_by_their_grids(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Composing a file drops its ``sweep:`` section (it makes one run): two different grids were
    ``no differences``, exit 0."""
    digits = (Path(ml.__file__).parent / "examples" / "digits" / "config.yaml").read_text()
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(digits + "sweep: {optimizer.lr: [1e-3, 3e-4]}\n")
    b.write_text(digits + "sweep: {model.channels: [8, 64]}\n")
    code, stdout, err = diff(str(a), str(b), capsys=capsys)
    assert code == 1, err
    assert stdout.splitlines()[2:] == [
        "- sweep.optimizer.lr: [1e-3, 3e-4]  (only in A)",
        "+ sweep.model.channels: [8, 64]  (only in B)",
    ]


def _on_terminal(*args: str, **extra_env: str) -> str:
    """``ml ARGS`` with stdout on a pseudo-terminal; returns what it printed there."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([*ML, *args], stdout=slave, stderr=subprocess.PIPE, env={**env(), **extra_env})
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    _, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 1, err
    return b"".join(chunks).decode()


def test_colour_only_on_a_terminal_without_no_color(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = str(runs["a"]), str(runs["b"])
    coloured = f"  optimizer.lr: {RED}0.001{RESET} -> {GREEN}0.0003{RESET}"
    assert coloured in _on_terminal("diff", a, b)
    assert f"{RED}- logger[2]: " in _on_terminal("diff", a, b)
    for plain in (_on_terminal("diff", a, b, NO_COLOR="1"), _on_terminal("diff", a, b, "--color", "never")):
        assert "  optimizer.lr: 0.001 -> 0.0003" in plain and "\x1b[" not in plain
    code, stdout, _ = diff(a, b, "--color", "always", capsys=capsys)
    assert code == 1 and coloured in stdout.splitlines()


def test_diff_does_not_import_torch(runs: dict[str, Path]) -> None:
    code = (
        "import sys\nfrom ml.cli import main\n"
        f"code = main(['diff', {str(runs['a'])!r}, {str(runs['b'])!r}])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\nsys.exit(code)\n"
    )
    result = run_python(code)
    assert result.returncode == 1, result.stderr
    assert "  optimizer.lr: 0.001 -> 0.0003" in result.stdout


def test_bad_paths_are_one_line_with_exit_code_2(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = str(runs["a"])
    cases = {
        str(tmp_path / "nope"): "no such run folder or config file",
        str(runs["a"].parent): f"holds runs, not one run: give one of them, e.g. {runs['a']}",
        str(tmp_path): "is not a run folder (no config.yaml in it)",
        str(runs["a"] / "checkpoints" / "ckpt.5.pt"): "is not a YAML text file",
    }
    for path, message in cases.items():
        code, stdout, err = diff(a, path, capsys=capsys)
        assert code == 2 and stdout == "" and err.startswith("ml: error: ") and message in err, err
        assert len(err.strip().splitlines()) == 1, err
