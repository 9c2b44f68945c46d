"""The best checkpoints (``trainer.checkpoint.monitor``, ``keep_top_k``) on disk: which are kept,
``best.pt``, and that a process dying at any file operation leaves the latest and the best complete.
"""

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from ml.run.checkpoints import (
    Ranking,
    best_checkpoint,
    link_checkpoint,
    newest_checkpoint,
    read_scores,
    score_checkpoint,
    write_checkpoint_file,
)
from ml.run.layout import RunDir
from ml.utils.checkpoint import verify_checkpoint

LOSS = Ranking("valid/loss", "min", 2)


def _save(run: RunDir, step: int, score: float | None, ranking: Ranking = LOSS) -> Path:
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    payload = {"step": torch.tensor(step), "weights": torch.full((256,), float(step))}
    return write_checkpoint_file(
        run, step, lambda f: torch.save(payload, f), score=None if score is None else (score, ranking)
    )


def _steps(run: RunDir) -> list[int]:
    return sorted(int(p.name.split(".")[1]) for p in run.checkpoints.glob("ckpt.*.pt"))


def test_the_best_k_are_kept_besides_the_latest_and_best_pt_names_the_best(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    for step, loss in [(10, 0.5), (20, 0.3), (30, 0.4), (40, None), (50, 0.35)]:
        _save(run, step, loss)
    # 20 and 50 are the best two; 50 is also the latest; 40 was never evaluated.
    assert _steps(run) == [20, 50]
    assert os.readlink(run.best_link) == "ckpt.20.pt"
    assert read_scores(run) == {20: 0.3, 50: 0.35}
    assert list(json.loads(run.scores.read_text())["scores"]) == ["20", "50"]  # best first
    _save(run, 60, None)  # the latest, unscored: kept with the best two
    assert _steps(run) == [20, 50, 60]
    assert best_checkpoint(run) == run.checkpoint(20).resolve()
    _save(run, 70, float("nan"))  # a NaN ranks nowhere
    assert _steps(run) == [20, 50, 70] and read_scores(run) == {20: 0.3, 50: 0.35}


def test_higher_is_better_and_a_changed_monitor_starts_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = RunDir(tmp_path)
    accuracy = Ranking("valid/accuracy", "max", 1)
    for step, acc in [(1, 0.5), (2, 0.9), (3, 0.7)]:
        _save(run, step, acc, accuracy)
    assert _steps(run) == [2, 3] and os.readlink(run.best_link) == "ckpt.2.pt"
    _save(run, 4, 9.0, LOSS)  # another metric: the accuracy's best is forgotten, and said so
    assert _steps(run) == [4] and read_scores(run) == {4: 9.0}
    assert (
        "checkpoint.monitor is now valid/loss (min), not valid/accuracy (max): the checkpoints kept "
        "for that (ckpt.2.pt) are no longer kept" in caplog.text
    )


def test_resuming_before_the_best_forgets_the_best_of_later_steps(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    _save(run, 10, 0.5)
    _save(run, 20, 0.1)
    link_checkpoint(run, run.checkpoint(10))  # resumed from 10 (20 was damaged): 20 is trained again
    assert read_scores(run) == {10: 0.5} and os.readlink(run.best_link) == "ckpt.10.pt"
    assert _steps(run) == [10]


class _Died(BaseException):
    """The process died here: nothing after it touches the disk."""


@contextmanager
def _dying_at(operation: int) -> Iterator[list[int]]:
    """Kills (as far as the disk is concerned) at the ``operation``-th rename, link or unlink."""
    count = [0]
    real = {name: getattr(os, name) for name in ("replace", "rename", "symlink", "unlink")}

    def dying(name: str):
        def call(*args, **kwargs):
            count[0] += 1
            if count[0] >= operation:
                raise _Died
            return real[name](*args, **kwargs)

        return call

    for name in real:
        setattr(os, name, dying(name))
    try:
        yield count
    finally:
        for name, function in real.items():
            setattr(os, name, function)


def _complete(path: Path) -> bool:
    verify_checkpoint(path)
    return True


def _before_the_save(run: RunDir) -> None:
    for step, loss in [(10, 0.5), (20, 0.3), (30, 0.4)]:
        _save(run, step, loss)


def test_a_death_at_any_file_operation_leaves_the_latest_and_the_best_complete(tmp_path: Path) -> None:
    """The save of step 40 makes it the best and pushes 30 out of the best two; the process dies at
    each of its renames, links and unlinks in turn. The next process resumes from the newest
    checkpoint (re-ranking it from the score it holds, as the trainer does) and saves step 50."""
    probe = RunDir(tmp_path / "probe")
    _before_the_save(probe)
    with _dying_at(10**9) as count:
        _save(probe, 40, 0.2)
    operations = count[0]
    assert operations >= 5  # rename in, scores.json, best.pt, ckpt.pt, unlink 30
    for dying_at in range(1, operations + 1):
        run = RunDir(tmp_path / f"death_{dying_at}")
        _before_the_save(run)
        with _dying_at(dying_at), pytest.raises(_Died):
            _save(run, 40, 0.2)
        newest = newest_checkpoint(run)
        assert newest is not None and newest.step in (30, 40) and _complete(newest.path)
        best = best_checkpoint(run)
        assert best is not None and best.name in ("ckpt.20.pt", "ckpt.40.pt") and _complete(best)
        assert all(run.checkpoint(step).exists() for step in read_scores(run)), dying_at
        link_checkpoint(run, newest.path)
        if newest.step == 40:
            score_checkpoint(run, 40, 0.2, LOSS)
        _save(run, 50, 0.25)
        expected = ([40, 50], "ckpt.40.pt") if newest.step == 40 else ([20, 50], "ckpt.50.pt")
        assert (_steps(run), os.readlink(run.best_link)) == expected, dying_at
