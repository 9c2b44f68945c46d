"""Checkpoints worth hardening: damaged, hostile or misplaced checkpoint files, met by the real code.

Every file here is real: checkpoints written by the trainer (or ``torch.save`` for files from
elsewhere), truncated by writing fewer bytes, a bit flipped in a weight's bytes, a zip bomb built
with ``zipfile``, links and FIFOs made with ``os``. Each case names what it guards:

- a damaged newest checkpoint is skipped for the newest that verifies (resume, ``ml export``),
  with a warning naming both; when none verifies, one line names them;
- a bit flip anywhere in a checkpoint ml wrote is found on load (the SHA-256 that ends the file);
  a checkpoint without one (older runs) still loads;
- an archive whose entries are compressed, or declare more bytes than the file holds, is refused
  before ``torch.load`` inflates anything;
- a link out of the run's ``checkpoints/`` is refused by resume, ``ml export`` and ``ml runs``;
- a FIFO where a checkpoint is expected is refused at once, never waited for.
"""

import hashlib
import io
import json
import logging
import os
import shutil
import struct
import threading
import zipfile
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import torch

from ml.cli import main as ml_main
from ml.core.state import State
from ml.errors import CheckpointError
from ml.run.checkpoints import newest_checkpoint
from ml.run.layout import RunDir
from ml.utils.atomic import atomic_symlink
from ml.utils.checkpoint import read_checkpoint
from tests.tiny import TinyModel, TinyModelConfig, TinyTask, make_parts

COMMENT_SIZE = len(b"ml-sha256:") + 64


def _train(exp_dir: Path, max_steps: int) -> None:
    """A real SL training of the tiny model, checkpointing every 2 steps and keeping every checkpoint."""
    from omegaconf import OmegaConf

    from ml.lr_schedulers.builtin import ConstantConfig, ConstantLRScheduler
    from ml.optimizers.builtin import AdamConfig, AdamOptimizer
    from ml.tasks.sl import SupervisedLearningTaskConfig
    from ml.trainers.sl import SupervisedLearningTrainer, SupervisedLearningTrainerConfig

    config = OmegaConf.merge(
        OmegaConf.structured(SupervisedLearningTrainerConfig),
        {
            "name": "sl",
            "exp_dir": str(exp_dir),
            "checkpoint": {"save_every_n_steps": 2, "only_save_most_recent": False},
        },
    )
    trainer = SupervisedLearningTrainer(config)  # type: ignore[arg-type]
    trainer.train(
        TinyModel(TinyModelConfig(name="tiny")),
        TinyTask(SupervisedLearningTaskConfig(name="tiny", max_steps=max_steps)),
        AdamOptimizer(AdamConfig(name="adam")),
        ConstantLRScheduler(ConstantConfig(name="constant")),
    )


def _ml(*argv: str) -> tuple[int, str, str]:
    """``ml ARGV`` in this process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = ml_main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _truncate(path: Path) -> None:
    """Rewrites the file with its first half only (as a copy or a disk cut short would leave it)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _entries(path: Path) -> list[tuple[str, int, int]]:
    """Each zip entry's name, where its bytes start in the file, and how many there are."""
    data = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
    found = []
    for info in infos:
        name_length, extra_length = struct.unpack_from("<HH", data, info.header_offset + 26)
        found.append((info.filename, info.header_offset + 30 + name_length + extra_length, info.file_size))
    return found


def _flip_a_bit_in_a_weight(path: Path) -> str:
    """Flips one bit inside a model weight's bytes; the weight's key. Asserts that plain
    ``torch.load`` then loads the file without a word, one weight changed (what a checksum is for)."""
    original = torch.load(path, weights_only=True)["model"]
    clean = path.read_bytes()
    for name, start, size in sorted(_entries(path), key=lambda e: -e[2]):
        if "/data/" not in name or size < 4:
            continue
        flipped = bytearray(clean)
        flipped[start + size // 2] ^= 0x10
        path.write_bytes(bytes(flipped))
        loaded = torch.load(path, weights_only=True)["model"]  # silently
        changed = [k for k in original if not torch.equal(original[k], loaded[k])]
        if len(changed) == 1 and changed[0].endswith("weight"):
            return changed[0]
    path.write_bytes(clean)
    raise AssertionError(f"no entry of {path} holds a model weight")


def _one_line(error: BaseException) -> str:
    text = str(error)
    assert text and "\n" not in text, text
    return text


# ---------------------------------------------------------------------------------------------
# 1. The newest checkpoint that verifies


@pytest.mark.parametrize("damage", ["linked truncated", "linked bit flip", "unlinked truncated"])
def test_resume_skips_a_damaged_newest_checkpoint_and_says_so(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    _train(run, 6)
    folder = run / "checkpoints"
    assert os.readlink(folder / "ckpt.pt") == "ckpt.6.pt"
    if damage.startswith("unlinked"):  # killed between writing ckpt.6.pt and swapping the link
        atomic_symlink("ckpt.4.pt", folder / "ckpt.pt")
    if damage.endswith("truncated"):
        _truncate(folder / "ckpt.6.pt")
    else:
        _flip_a_bit_in_a_weight(folder / "ckpt.6.pt")
    caplog.set_level(logging.INFO)

    _train(run, 8)

    used = folder / ("ckpt.pt" if damage.startswith("unlinked") else "ckpt.4.pt")
    assert f"Resumed from {used} at step 4" in caplog.text
    (warning,) = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "skipping" in r.message
    ]
    assert warning.startswith(f"skipping {folder / 'ckpt.6.pt'} (cannot read checkpoint ")
    assert ("truncated" if damage.endswith("truncated") else "checksum mismatch") in warning
    assert warning.endswith(f"using {folder / 'ckpt.4.pt'}, the newest checkpoint that verifies")
    assert os.readlink(folder / "ckpt.pt") == "ckpt.8.pt"  # trained on from step 4, ckpt.6.pt rewritten
    assert torch.load(folder / "ckpt.6.pt", weights_only=True)["state"]


def test_when_no_checkpoint_verifies_one_line_names_them_and_nothing_is_removed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _train(run, 6)
    folder = run / "checkpoints"
    for step in (2, 4, 6):
        _truncate(folder / f"ckpt.{step}.pt")
    before = sorted(os.listdir(folder))

    with pytest.raises(CheckpointError) as info:
        _train(run, 8)

    line = _one_line(info.value)
    assert line.startswith(f"cannot read checkpoint {folder / 'ckpt.pt'}: the file is truncated")
    assert line.endswith("(and no older checkpoint verifies either: ckpt.4.pt, ckpt.2.pt)")
    assert sorted(os.listdir(folder)) == before


def test_export_takes_the_newest_checkpoint_that_verifies(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from tests.tools.test_export import trained_runs

    run = tmp_path / "run"  # a copy of a digits run with checkpoints at steps 2, 4 and 5 (linked)
    shutil.copytree(trained_runs(tmp_path_factory, "a")["a"], run, symlinks=True)
    folder = run / "checkpoints"
    assert os.readlink(folder / "ckpt.pt") == "ckpt.5.pt"
    _flip_a_bit_in_a_weight(folder / "ckpt.5.pt")

    code, out, err = _ml("export", str(run), "-o", str(tmp_path / "model.safetensors"))

    assert code == 0, err
    assert f"exported step 4 from {folder / 'ckpt.4.pt'}" in out
    (warning,) = err.strip().splitlines()
    assert warning.startswith(f"ml: warning: skipping {folder / 'ckpt.5.pt'} (cannot read checkpoint")
    assert "checksum mismatch" in warning
    assert warning.endswith(f"using {folder / 'ckpt.4.pt'}, the newest checkpoint that verifies")


# ---------------------------------------------------------------------------------------------
# 2. A checksum in every checkpoint ml writes


@pytest.mark.parametrize("async_save", [False, True])
def test_a_bit_flip_in_a_weight_is_found_on_load(tmp_path: Path, async_save: bool) -> None:
    trainer, model, task, optim, sched = make_parts(tmp_path, async_save=async_save)
    path = trainer.save_checkpoint(State(num_steps=1), task, model, optim, sched)
    trainer.wait_for_checkpoint()
    assert read_checkpoint(path)["state"]

    _flip_a_bit_in_a_weight(path)

    for load in (lambda: read_checkpoint(path), lambda: trainer.load_checkpoint(path, task, model)):
        with pytest.raises(CheckpointError) as info:
            load()
        line = _one_line(info.value)
        assert line.startswith(
            f"cannot read checkpoint {path}: checksum mismatch: the file changed after it was written"
        )


def test_the_checksum_is_the_sha256_of_every_byte_before_it(tmp_path: Path) -> None:
    """The format, so that it can be checked without ml: the zip comment ``ml-sha256:<hex>``."""
    trainer, model, task, optim, sched = make_parts(tmp_path)
    path = trainer.save_checkpoint(State(num_steps=1), task, model, optim, sched)
    data = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        comment = archive.comment
    assert comment == b"ml-sha256:" + hashlib.sha256(data[:-COMMENT_SIZE]).hexdigest().encode()
    assert data.endswith(comment)
    assert json.loads(torch.load(path, weights_only=True)["state"])["num_steps"] == 1


def test_a_checkpoint_without_a_checksum_still_loads_with_no_claim(tmp_path: Path) -> None:
    from ml.utils.checkpoint import verify_checkpoint

    trainer, model, task, optim, sched = make_parts(tmp_path)
    written = trainer.save_checkpoint(State(num_steps=3), task, model, optim, sched)
    older = tmp_path / "older.pt"  # as runs before checksums wrote them: torch.save alone
    torch.save(torch.load(written, weights_only=True), older)

    assert verify_checkpoint(written) is True
    assert verify_checkpoint(older) is False
    assert trainer.load_checkpoint(older, task, model, optim, sched).num_steps == 3


def test_the_checksum_does_not_depend_on_how_the_bytes_arrive(tmp_path: Path) -> None:
    """The writer holds back the archive's last 22 bytes: any split of the writes gives one file."""
    from ml.run.checkpoints import write_checkpoint_file
    from ml.utils.checkpoint import verify_checkpoint

    trainer, model, task, optim, sched = make_parts(tmp_path / "whole")
    whole = trainer.save_checkpoint(State(num_steps=1), task, model, optim, sched)
    buffer = io.BytesIO()
    torch.save(torch.load(whole, weights_only=True), buffer)
    payload = buffer.getvalue()

    def in_pieces(f: Any) -> None:
        sizes = [1, 2, 21, 22, 23, 7, 4096, 3]
        at, i = 0, 0
        while at < len(payload):
            f.write(payload[at : at + sizes[i % len(sizes)]])
            at += sizes[i % len(sizes)]
            i += 1

    pieces = write_checkpoint_file(RunDir(tmp_path / "pieces"), 1, in_pieces)
    at_once = write_checkpoint_file(RunDir(tmp_path / "at_once"), 1, lambda f: f.write(payload))  # type: ignore[func-returns-value]
    assert pieces.read_bytes() == at_once.read_bytes()
    assert pieces.read_bytes()[: -22 - COMMENT_SIZE] == payload[:-22]
    assert verify_checkpoint(pieces) is True


# ---------------------------------------------------------------------------------------------
# 3. Archive sizes checked before anything is inflated


def _zip_bomb(path: Path, inflated_mib: int) -> None:
    """A checkpoint-shaped archive whose weight (zeros) is deflated: tiny on disk, big when read."""
    plain = path.with_suffix(".plain")
    weight = torch.zeros(inflated_mib * 2**18)  # float32: inflated_mib MiB
    torch.save({"model": {"net.0.weight": weight}, "state": State().to_json()}, plain)
    del weight
    with (
        zipfile.ZipFile(plain) as source,
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as bomb,
    ):
        for info in source.infolist():
            bomb.writestr(info.filename, source.read(info.filename))
    plain.unlink()


def test_a_zip_bomb_is_refused_before_it_is_inflated(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.pt"
    _zip_bomb(bomb, 64)
    assert bomb.stat().st_size < 2**20 / 4  # under 256 KiB on disk
    inflated = torch.load(bomb, weights_only=True)["model"]["net.0.weight"]  # what torch.load does with it
    assert inflated.numel() * inflated.element_size() == 64 * 2**20
    del inflated
    trainer, model, task, *_ = make_parts(tmp_path / "run")

    for load in (lambda: read_checkpoint(bomb), lambda: trainer.load_checkpoint(bomb, task, model)):
        with pytest.raises(CheckpointError) as info:
            load()
        line = _one_line(info.value)
        assert line.startswith(f"refusing to load {bomb}: ")
        assert f"are compressed ({bomb.stat().st_size / 1024:.0f} KiB on disk, inflating to 64 MiB)" in line


def test_entries_declaring_more_bytes_than_the_file_holds_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "liar.pt"
    torch.save({"model": {"w": torch.ones(1000)}, "state": State().to_json()}, path)  # no checksum
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        infos, at = archive.infolist(), archive.start_dir
    claimed = 2**30
    for info in infos:  # walk the central directory, setting one stored entry's sizes to 1 GiB
        assert data[at : at + 4] == b"PK\x01\x02"
        name_length, extra_length, comment_length = struct.unpack_from("<HHH", data, at + 28)
        if info.filename.endswith("/data/0"):
            struct.pack_into("<II", data, at + 20, claimed, claimed)
        at += 46 + name_length + extra_length + comment_length
    path.write_bytes(bytes(data))

    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    line = _one_line(info.value)
    assert line.startswith(f"refusing to load {path}: its entries declare ")
    assert f"more than the file's {len(data)}" in line


# ---------------------------------------------------------------------------------------------
# 4. Links that leave the run's checkpoints/


@pytest.mark.parametrize("which", ["ckpt.pt", "ckpt.9.pt"])
def test_a_link_out_of_the_run_is_refused(tmp_path: Path, which: str) -> None:
    run = tmp_path / "run"
    _train(run, 2)
    folder = run / "checkpoints"
    elsewhere = tmp_path / "elsewhere" / "ckpt.9.pt"
    elsewhere.parent.mkdir()
    shutil.copy(folder / "ckpt.2.pt", elsewhere)  # a good checkpoint, but not this run's
    link = folder / which
    atomic_symlink(os.path.relpath(elsewhere, folder), link)

    with pytest.raises(CheckpointError) as info:
        newest_checkpoint(RunDir(run))
    line = _one_line(info.value)
    assert line.startswith(f"{link} points to {elsewhere}, outside the run's checkpoint folder")
    assert line.endswith(f"copy that file into {folder} and point the link at the copy")

    with pytest.raises(CheckpointError, match="outside the run's checkpoint folder"):  # resume
        _train(run, 4)
    code, _, err = _ml("export", str(run), "-o", str(tmp_path / "model.safetensors"))
    assert code == 2 and err.strip() == f"ml: error: {line}"
    code, out, _ = _ml("runs", str(run), "--json")
    (row,) = json.loads(out)
    assert code == 0 and row["checkpoint"] is None


# ---------------------------------------------------------------------------------------------
# 5. FIFOs are refused, never waited for


def _without_waiting(call: Callable[[], Any], fifo: Path) -> Any:
    """``call()``'s result or exception; fails the test if it blocks (a reader waiting on ``fifo``)."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = call()
        except BaseException as e:
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a writer comes and goes: the reader wakes
        thread.join(10)
        pytest.fail(f"blocked opening the FIFO {fifo}")
    return result.get("error", result.get("value"))


def test_a_fifo_given_as_a_checkpoint_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "ckpt.pt"
    os.mkfifo(fifo)
    error = _without_waiting(lambda: read_checkpoint(fifo), fifo)
    assert isinstance(error, CheckpointError)
    assert _one_line(error).startswith(f"cannot read checkpoint {fifo}: not a regular file")


def test_a_fifo_in_the_runs_checkpoints_is_skipped_by_resume(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trainer, model, task, optim, sched = make_parts(tmp_path, only_save_most_recent=False)
    trainer.save_checkpoint(State(num_steps=2), task, model, optim, sched)
    folder = tmp_path / "checkpoints"
    fifo = folder / "ckpt.4.pt"
    os.mkfifo(fifo)
    atomic_symlink("ckpt.4.pt", folder / "ckpt.pt")

    error = _without_waiting(lambda: read_checkpoint(folder / "ckpt.pt"), fifo)
    assert isinstance(error, CheckpointError)
    assert _one_line(error).startswith(f"cannot read checkpoint {folder / 'ckpt.pt'}: not a regular file")
    assert _without_waiting(trainer.find_resume_checkpoint, fifo) == folder / "ckpt.2.pt"
    assert f"skipping {fifo} (cannot read checkpoint {folder / 'ckpt.pt'}: not a regular file" in caplog.text
