"""Hostile input to ``ml train``: each case is an ``ml train`` process of its own against a real RUN_DIR.

Every case must end with exit code 2 and exactly one stderr line, ``ml: error: ...``, naming the
problem (a distinctive substring per case), no traceback, and the case's folder (its RUN_DIR with an
earlier finished run, and the input files) byte for byte as before: nothing lost or changed, and no
newly claimed run folder left behind. Checkpoints carrying a pickle payload must be refused without
the payload ever running.

Documented exceptions: ``trainer.checkpoint.load_strict=false`` with weights of another shape loads
what fits and warns (``load_model_state``: only strict mode raises), so that case must train and
exit 0 (:func:`test_non_strict_initial_weights_of_another_model_load_what_fits`); a run folder that
cannot be created is a write the disk refused: one line and exit 1
(:func:`test_an_exp_dir_that_cannot_be_created_stops_with_one_line`).

All cases run side by side in one module fixture, each forked from one process that imported torch
(``tests/forked_ml.py``); the finished run they start from is the real ``ml`` script's.
"""

import hashlib
import os
import pathlib
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.e2e.test_cli import ML, USER_CONFIG, Files, _env, files
from tests.forked_ml import Command, run_forked

__all__ = ["Snapshot", "files", "one_error_line", "run_ml", "snapshot", "snapshot_diff"]

CASE_TIMEOUT_S = 90  # a well-behaved case takes a few seconds; the YAML bomb is cut off here
BASE_ARGS = ("task.threshold=0",)  # USER_CONFIG leaves task.threshold required

Snapshot = dict[str, tuple[Any, ...]]


def snapshot(root: Path) -> Snapshot:
    """Every entry under ``root``: folders, links (with their target) and files (size and sha256)."""
    entries: Snapshot = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            entries[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            entries[rel] = ("dir",)
        else:
            data = path.read_bytes()
            entries[rel] = ("file", len(data), hashlib.sha256(data).hexdigest())
    return entries


def snapshot_diff(before: Snapshot, after: Snapshot) -> list[str]:
    """Human-readable differences between two snapshots (empty when equal)."""
    lines = [f"gone: {k}" for k in sorted(before.keys() - after.keys())]
    lines += [f"new: {k}" for k in sorted(after.keys() - before.keys())]
    lines += [f"changed: {k}" for k in sorted(before.keys() & after.keys()) if before[k] != after[k]]
    return lines


def run_ml(
    files: Files, *args: str | Path, run_dir: Path, timeout_s: float = CASE_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """Runs ``ml`` like ``tests.e2e.test_cli.ml``, but a run past ``timeout_s`` is killed and returned.

    The killed run's return code is -9 and its stderr ends with a ``TIMEOUT`` line, so a hang is a
    failed case, not an error of the whole fixture.
    """
    command = [*ML, *map(str, args)]
    try:
        return subprocess.run(
            command, env=_env(files, run_dir), capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return subprocess.CompletedProcess(command, -9, out, err + f"\nTIMEOUT after {timeout_s} s\n")


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """Asserts exit code 2, exactly one ``ml: error:`` stderr line, no traceback; returns the line."""
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("ml: error: "), lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Hostile files


class _TouchPayload:
    """Unpickling this creates ``path`` (``pathlib.Path.touch``): code run by a checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


class _SystemPayload:
    """Unpickling this runs ``touch path`` through ``os.system``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.path}",))


def _save_payload(dest: Path, payload: object) -> None:
    """A checkpoint-shaped dict (``model``, ``state``) whose ``model`` entry is the payload."""
    torch.save({"format_version": 1, "model": payload, "state": "{}"}, dest)


def _check_payload_works(payload_cls: type, tmp: Path) -> None:
    """Proves the payload is live: a full (unsafe) unpickle does create its marker file."""
    probe = tmp / f"probe_{payload_cls.__name__}"
    path = tmp / f"payload_{payload_cls.__name__}.pt"
    _save_payload(path, payload_cls(probe))
    torch.load(path, weights_only=False)
    assert probe.exists(), f"{payload_cls.__name__} does not run on unpickling; the case would prove nothing"
    probe.unlink()
    path.unlink()


def _yaml_bomb(levels: int) -> str:
    """A few lines of YAML whose aliases expand to ``10**(levels + 1)`` strings."""
    lines = [
        USER_CONFIG.rstrip(),
        "lr_scheduler:",
        "  name: constant",
        "  l0: &l0 [x, x, x, x, x, x, x, x, x, x]",
    ]
    lines += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def _config(**sections: dict[str, Any]) -> str:
    """USER_CONFIG with some sections' keys replaced or added, as block-style YAML."""
    config = yaml.safe_load(USER_CONFIG)
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return yaml.safe_dump(config, sort_keys=False)


# ---------------------------------------------------------------------------------------------
# The cases


@dataclass(frozen=True)
class Where:
    """The folders of one case: ``inputs`` (its hostile files) and ``runs`` (its RUN_DIR)."""

    root: Path
    inputs: Path
    runs: Path
    base_ckpt: Path  # the earlier run's newest checkpoint (a hidden=8 model)
    user: Path  # USER_CONFIG of tests/e2e/test_cli.py (the `files` fixture's user.yaml)

    @property
    def exp_dir(self) -> Path:
        return self.runs / "user" / "run_0"


@dataclass(frozen=True)
class Case:
    """``args`` for ``ml train``; ``prepare`` writes the hostile files; ``expected`` is in the line."""

    args: Callable[[Where], list[str | Path]]
    expected: Callable[[Where], list[str]]
    prepare: Callable[[Where], None] = lambda where: None
    markers: tuple[str, ...] = field(default=())  # files a payload would create (must never exist)


def _write(name: str, text: str | bytes) -> Callable[[Where], None]:
    def prepare(where: Where) -> None:
        path = where.inputs / name
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)

    return prepare


def _truncate(path_of: Callable[[Where], Path]) -> Callable[[Where], None]:
    def prepare(where: Where) -> None:
        path = path_of(where)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    return prepare


def _own_ckpt(where: Where) -> Path:
    """The file the run's ``checkpoints/ckpt.pt`` link points at."""
    link = where.exp_dir / "checkpoints" / "ckpt.pt"
    return link.parent / os.readlink(link)


def _half_ckpt(where: Where) -> None:
    data = where.base_ckpt.read_bytes()
    (where.inputs / "half.pt").write_bytes(data[: len(data) // 2])


def _payload(name: str, payload_cls: type, *, into_run: bool = False) -> Callable[[Where], None]:
    def prepare(where: Where) -> None:
        dest = _own_ckpt(where) if into_run else where.inputs / name
        _save_payload(dest, payload_cls(where.root / f"PWNED_{name}"))

    return prepare


def _torch_file_not_ckpt(where: Where) -> None:
    torch.save({"weights": torch.zeros(3)}, where.inputs / "plain.pt")


def _file_in_the_way(where: Where) -> None:
    (where.inputs / "a_file").write_text("not a folder\n")


def _break_run_config(where: Where) -> None:
    (where.exp_dir / "config.yaml").write_text("model:\n\tname: digits_mlp\n")


def _user(*overrides: str) -> Callable[[Where], list[str | Path]]:
    """``ml train user.yaml task.threshold=0 OVERRIDES`` (``user.yaml`` from tests.e2e.test_cli)."""

    def args(where: Where) -> list[str | Path]:
        return [where.user, *BASE_ARGS, *overrides]

    return args


def _initial(name: str, *overrides: str) -> Callable[[Where], list[str | Path]]:
    """Starts a new run whose initial weights come from ``inputs/name``."""

    def args(where: Where) -> list[str | Path]:
        path = where.inputs / name
        return [where.user, *BASE_ARGS, f"trainer.checkpoint.load_from_ckpt_path={path}", *overrides]

    return args


def _continue(where: Where) -> list[str | Path]:
    return [where.exp_dir / "config.yaml"]


def _input(name: str) -> Callable[[Where], list[str | Path]]:
    return lambda where: [where.inputs / name]


def _is(*texts: str) -> Callable[[Where], list[str]]:
    return lambda where: list(texts)


CASES: dict[str, Case] = {
    # -- config files
    "YAML with tab indentation": Case(
        _input("tab.yaml"),
        lambda w: [f"bad YAML in {w.inputs / 'tab.yaml'}:2", "'\\t'"],
        _write("tab.yaml", "model:\n\tname: digits_mlp\n"),
    ),
    "YAML with an unclosed bracket": Case(
        _input("bracket.yaml"),
        lambda w: [f"bad YAML in {w.inputs / 'bracket.yaml'}"],
        _write(
            "bracket.yaml", USER_CONFIG.replace("optimizer: {name: sgd, lr: 0.1}", "optimizer: [sgd, 0.1")
        ),
    ),
    "YAML that is not UTF-8": Case(
        _input("latin1.yaml"),
        lambda w: [str(w.inputs / "latin1.yaml")],
        _write("latin1.yaml", USER_CONFIG.encode() + "# r\xe9sum\xe9\n".encode("latin-1")),
    ),
    "YAML nested 20000 deep": Case(
        _input("deep.yaml"),
        lambda w: [str(w.inputs / "deep.yaml")],
        _write("deep.yaml", "model: " + "[" * 20000 + "]" * 20000 + "\n"),
    ),
    "YAML alias bomb (10**8 strings)": Case(
        _input("bomb.yaml"),
        lambda w: [str(w.inputs / "bomb.yaml")],
        _write("bomb.yaml", _yaml_bomb(7)),
    ),
    "unknown top-level section": Case(
        _input("section.yaml"),
        _is("unknown section 'optimiser'"),
        _write("section.yaml", USER_CONFIG + "optimiser: {name: adam}\n"),
    ),
    "unknown key in a section": Case(
        lambda w: [w.inputs / "key.yaml", *BASE_ARGS],
        _is("task.max_step", "Key 'max_step' not in 'SumSignConfig'"),
        _write("key.yaml", _config(task={"max_step": 3})),
    ),
    "string for an int": Case(
        lambda w: [w.inputs / "type.yaml", *BASE_ARGS],
        _is("task.max_steps", "Value 'many' of type 'str' could not be converted to Integer"),
        _write("type.yaml", _config(task={"max_steps": "many"})),
    ),
    "missing config file": Case(
        _input("nope.yaml"), lambda w: [f"config file not found: {w.inputs / 'nope.yaml'}"]
    ),
    "a run's own config.yaml broken": Case(
        _continue,
        lambda w: [f"bad YAML in {w.exp_dir / 'config.yaml'}"],
        _break_run_config,
    ),
    # -- component names
    "missing module in an import path": Case(
        _user("model.name=some.missing_module:Thing"),
        _is("model.name", "cannot import module 'some.missing_module'"),
    ),
    "missing class in an existing module": Case(
        _user("model.name=ml.trainers.sl:NoSuchClass"),
        _is("model.name", "module 'ml.trainers.sl' has no class 'NoSuchClass'"),
    ),
    "a mapping where a list goes (logger.name=...)": Case(_user("logger.name=stdout"), _is("logger")),
    "empty module in an import path": Case(_user("model.name=:Thing"), _is("model.name")),
    "relative module in an import path": Case(_user("model.name=.relative:Thing"), _is("model.name")),
    # -- checkpoints as initial weights
    "truncated initial checkpoint": Case(
        _initial("half.pt"), lambda w: [str(w.inputs / "half.pt"), "truncated"], _half_ckpt
    ),
    "random bytes as initial checkpoint": Case(
        _initial("random.pt"),
        lambda w: [f"cannot read checkpoint {w.inputs / 'random.pt'}"],
        _write("random.pt", bytes(range(256)) * 16),
    ),
    "empty file as initial checkpoint": Case(
        _initial("empty.pt"),
        lambda w: [f"cannot read checkpoint {w.inputs / 'empty.pt'}"],
        _write("empty.pt", b""),
    ),
    "JSON file as initial checkpoint": Case(
        _initial("ckpt.json"),
        lambda w: [f"cannot read checkpoint {w.inputs / 'ckpt.json'}"],
        _write("ckpt.json", '{"model": {}, "state": "{}"}\n'),
    ),
    "torch file that is not a checkpoint": Case(
        _initial("plain.pt"),
        lambda w: [f"{w.inputs / 'plain.pt'} is not an ml checkpoint"],
        _torch_file_not_ckpt,
    ),
    "initial weights of another model, strict": Case(
        lambda w: [
            w.user,
            *BASE_ARGS,
            "model.hidden=4",
            f"trainer.checkpoint.load_from_ckpt_path={w.base_ckpt}",
        ],
        _is("checkpoint weights do not fit the model"),
    ),
    "pickle payload (os.system) as initial checkpoint": Case(
        _initial("system.pt"),
        lambda w: [f"refusing to load {w.inputs / 'system.pt'}"],
        _payload("system.pt", _SystemPayload),
        markers=("PWNED_system.pt",),
    ),
    "pickle payload (Path.touch) as initial checkpoint": Case(
        _initial("touch.pt"),
        lambda w: [f"refusing to load {w.inputs / 'touch.pt'}"],
        _payload("touch.pt", _TouchPayload),
        markers=("PWNED_touch.pt",),
    ),
    # -- the run's own checkpoint when continuing
    "truncated ckpt.pt when continuing": Case(
        _continue,
        lambda w: [f"cannot read checkpoint {w.exp_dir / 'checkpoints' / 'ckpt.pt'}", "truncated"],
        _truncate(_own_ckpt),
    ),
    "pickle payload as ckpt.pt when continuing": Case(
        _continue,
        lambda w: [f"refusing to load {w.exp_dir / 'checkpoints' / 'ckpt.pt'}"],
        _payload("own.pt", _SystemPayload, into_run=True),
        markers=("PWNED_own.pt",),
    ),
}
NON_STRICT = "initial weights of another model, non-strict"
EXP_DIR_UNDER_FILE = "trainer.exp_dir under a file"
BOMB = "YAML alias bomb (10**8 strings)"


@dataclass(frozen=True)
class CaseRun:
    """One case's result, its folders, and its folder's snapshots before and after."""

    where: Where
    result: subprocess.CompletedProcess[str]
    before: Snapshot
    after: Snapshot


@dataclass(frozen=True)
class BaseRun:
    """A finished 6-step run of USER_CONFIG (hidden=8) whose RUN_DIR every case starts from."""

    run_dir: Path
    ckpt: Path


@pytest.fixture(scope="module")
def base_run(files: Files, tmp_path_factory: pytest.TempPathFactory) -> BaseRun:
    run_dir = tmp_path_factory.mktemp("base_runs")
    result = run_ml(files, "train", files.user, *BASE_ARGS, run_dir=run_dir)
    assert result.returncode == 0, result.stderr
    link = run_dir / "user" / "run_0" / "checkpoints" / "ckpt.pt"
    return BaseRun(run_dir, link.parent / os.readlink(link))


def _where(base: BaseRun, root: Path, user: Path) -> Where:
    root.mkdir()
    (root / "inputs").mkdir()
    shutil.copytree(base.run_dir, root / "runs", symlinks=True)
    ckpt = root / "inputs" / "base_ckpt.pt"
    shutil.copyfile(base.ckpt, ckpt)
    return Where(root=root, inputs=root / "inputs", runs=root / "runs", base_ckpt=ckpt, user=user)


def _non_strict_args(where: Where) -> list[str | Path]:
    return [
        where.user,
        *BASE_ARGS,
        "model.hidden=4",
        f"trainer.checkpoint.load_from_ckpt_path={where.base_ckpt}",
        "trainer.checkpoint.load_strict=false",
    ]


def _exp_dir_under_a_file(where: Where) -> list[str | Path]:
    return [where.user, *BASE_ARGS, f"trainer.exp_dir={where.inputs / 'a_file' / 'run'}"]


@pytest.fixture(scope="module")
def case_runs(
    files: Files, base_run: BaseRun, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, CaseRun]:
    """Runs every case (and the non-strict one) in its own copy of the base RUN_DIR, side by side."""
    root = tmp_path_factory.mktemp("hostile")
    _check_payload_works(_TouchPayload, root)
    _check_payload_works(_SystemPayload, root)
    todo: dict[str, tuple[Callable[[Where], list[str | Path]], Callable[[Where], None]]] = {
        name: (case.args, case.prepare) for name, case in CASES.items()
    }
    todo[NON_STRICT] = (_non_strict_args, lambda where: None)
    todo[EXP_DIR_UNDER_FILE] = (_exp_dir_under_a_file, _file_in_the_way)
    prepared: dict[str, tuple[Where, list[str], Snapshot]] = {}
    for number, (name, (args_of, prepare)) in enumerate(todo.items()):
        where = _where(base_run, root / f"case_{number}", files.user)
        prepare(where)
        args = [str(a) for a in args_of(where)]
        prepared[name] = (where, args, snapshot(where.root))

    # Each case forked from one process that imported torch (tests/forked_ml.py): the cases are
    # about what ``ml`` does with the files, not about its start-up. The bomb, if it is not
    # refused, holds a core until it is killed: it starts first.
    order = [BOMB, *[name for name in todo if name != BOMB]]
    commands = [
        Command(["train", *prepared[name][1]], _env(files, prepared[name][0].runs), timeout_s=CASE_TIMEOUT_S)
        for name in order
    ]
    results = dict(zip(order, run_forked(commands, parallel=max(2, os.cpu_count() or 2)), strict=True))
    return {
        name: CaseRun(where, results[name], before, snapshot(where.root))
        for name, (where, _, before) in prepared.items()
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_stops_with_one_line_and_changes_nothing(
    name: str, case_runs: dict[str, CaseRun]
) -> None:
    """Proves the case exits 2 with one ``ml: error:`` line naming the problem, no traceback, leaves
    every file and folder under the case's RUN_DIR and inputs as it was (no new empty run folder),
    and, for pickle payloads, that the payload never ran."""
    run, case = case_runs[name], CASES[name]
    for marker in case.markers:
        assert not (run.where.root / marker).exists(), f"the checkpoint's payload ran: {marker} was created"
    line = one_error_line(run.result)
    for expected in case.expected(run.where):
        assert expected in line, f"{expected!r} not in {line!r}"
    assert snapshot_diff(run.before, run.after) == []
    assert run.result.stdout == ""


@pytest.mark.slow
def test_weights_that_do_not_fit_name_the_mismatch(case_runs: dict[str, CaseRun]) -> None:
    """Proves the one line for initial weights of another shape names a parameter that does not fit
    (hidden 8 -> 4 changes net.0.weight, net.0.bias and net.3.weight), not only that something
    did not."""
    line = one_error_line(case_runs["initial weights of another model, strict"].result)
    assert any(name in line for name in ("net.0.weight", "net.0.bias", "net.3.weight")), line


@pytest.mark.slow
def test_non_strict_initial_weights_of_another_model_load_what_fits(case_runs: dict[str, CaseRun]) -> None:
    """Proves the documented non-strict behaviour: ``load_strict=false`` (``load_model_state`` raises
    in strict mode only, returning notes otherwise) loads what fits, warns about the rest, and
    trains: exit 0, an ``Initial weights from ...`` warning, and a new run with a checkpoint while
    the earlier run is untouched."""
    run = case_runs[NON_STRICT]
    assert run.result.returncode == 0, run.result.stderr[-3000:]
    assert "Traceback" not in run.result.stderr
    warnings = [line for line in run.result.stderr.splitlines() if line.startswith("[W ")]
    assert any(f"Initial weights from {run.where.base_ckpt}" in line for line in warnings), run.result.stderr
    new = snapshot_diff(run.before, run.after)
    assert new and all(line.startswith("new: runs/user/run_1") for line in new), new
    assert (run.where.runs / "user" / "run_1" / "checkpoints" / "ckpt.pt").exists()


@pytest.mark.slow
def test_an_exp_dir_that_cannot_be_created_stops_with_one_line(case_runs: dict[str, CaseRun]) -> None:
    """Proves ``trainer.exp_dir`` under a regular file stops with the documented one line for a
    write the disk refuses (README: "A failed write ... stops the run with one line naming the file
    and the reason (exit 1)"), not a traceback, and creates nothing."""
    run = case_runs[EXP_DIR_UNDER_FILE]
    assert run.result.returncode == 1, run.result.stderr[-3000:]
    lines = [line for line in run.result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.result.stderr[-3000:]
    assert lines[0].startswith("ml: training failed: ") and str(run.where.inputs / "a_file") in lines[0]
    assert "Traceback" not in run.result.stderr
    assert snapshot_diff(run.before, run.after) == []


def test_snapshot_sees_every_kind_of_change(tmp_path: Path) -> None:
    """Proves the snapshot the cases rely on notices a changed byte, a new empty folder, a gone
    file and a re-pointed link (so an unchanged snapshot means an unchanged folder)."""
    (tmp_path / "a").write_bytes(b"abc")
    (tmp_path / "b").write_bytes(b"b")
    (tmp_path / "c").write_bytes(b"c")
    (tmp_path / "link").symlink_to("b")
    before = snapshot(tmp_path)
    assert snapshot_diff(before, snapshot(tmp_path)) == []
    (tmp_path / "a").write_bytes(b"abd")
    (tmp_path / "run_1").mkdir()
    (tmp_path / "b").unlink()
    (tmp_path / "link").unlink()
    (tmp_path / "link").symlink_to("c")
    assert snapshot_diff(before, snapshot(tmp_path)) == [
        "gone: b",
        "new: run_1",
        "changed: a",
        "changed: link",
    ]
