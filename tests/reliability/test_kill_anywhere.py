"""Fault injection: ``kill -9`` of a real ``ml train`` at random instants, until the run finishes.

One run checkpoints after every step (``trainer.checkpoint.save_every_n_steps=1``, the default
``only_save_most_recent``). It is started (from its config file, then from
``<exp_dir>/config.yaml``), SIGKILLed at a random instant, ``ML_RELIABILITY_KILLS`` times (10;
``make reliability``: 200), then left to run to the end. The instants come from a seeded generator
(the seed is printed): a quarter of the kills (never the first) land at a random moment of
start-up, from 0.05 s after the spawn until the first step; of the others, half land anywhere
within the first 0.35 s of training, and half are aimed at a save, within 5 ms of a new
checkpoint's temp file appearing (the test polls the folder), because random instants fell inside a
save only 20-30% of the time and hardly ever in its short windows (link swap, retention). After
every kill the files on disk must hold:

- ``checkpoints/ckpt.pt``, when present, is a symlink naming ``ckpt.<K>.pt``, which loads with
  ``torch.load(weights_only=True)`` and holds step K; every ``ckpt.<n>.pt`` loads and holds step n;
- ``ckpt.pt`` names the newest complete checkpoint, except in the window between writing a
  checkpoint and swapping the link (inherent to write-then-link; classified below);
- at most one ``checkpoints/.ckpt.*.tmp`` and at most two numbered checkpoints (the new one and the
  one retention is about to delete);

and the next start removes the leftover temp files (any ``*.tmp`` in the run folder, since nothing
else would ever remove them) and resumes from the newest complete checkpoint (its ``Resumed from
... at step N`` line). Where each kill landed is read from what it left behind. At the end the
checkpoint folder holds the final checkpoint only, and model, optimizer, schedule, generators and
sampler equal, bit for bit, those of an uninterrupted run of the same config
(``trainer.deterministic=true``, no data-loader workers), after the same samples at every step.
"""

import random
import signal
import statistics
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.e2e.resume_task import read_indices
from tests.e2e.test_resume import ALL_PARTS, Run, _load, _records, _train_steps
from tests.reliability.harness import (
    DiskState,
    Violations,
    checkpoint_problems,
    ckpt_state,
    disk_state,
    file_size,
    grown,
    indices_steps,
    new_partial_checkpoint,
    poll,
    print_table,
    resumed_step,
    sleep_while_running,
    write_config,
)
from tests.same import assert_same

STEP_SLEEP_S = 0.005  # per batch; a step is two batches (~10 ms asleep, ~7 ms of work) and a save
STARTUP_SHARE = 0.25  # the share of kills (after the first) that land at a random instant of start-up
SAVE_SHARE = 0.5  # the share of the other kills aimed at a save (the rest land anywhere in training)
KILL_WINDOW_S = 0.35  # a training kill lands uniformly within this long after the segment's first step
SAVE_WINDOW_S = 0.005  # an aimed kill lands this long at most after a checkpoint's temp file appears

AIM_STARTUP, AIM_ANY, AIM_SAVE = "start-up", "anywhere", "a save"
FINISH_TIMEOUT_S = 300.0

CONFIG = """\
# ml train kill.yaml task.indices_file=...
model: {{name: "resume_task:DropoutBNModel", hidden: 16, dropout: 0.2}}
task:
  name: "resume_task:IndexedTask"
  num_samples: 48
  max_steps: {max_steps}
  step_sleep_s: {step_sleep_s}
  train_dl: {{batch_size: 4, num_workers: 0, shuffle: true, drop_last: true}}
  valid_dl: {{batch_size: 24}}
  test_dl: {{batch_size: 24}}
optimizer: {{name: adamw, lr: 1e-2}}
lr_scheduler: {{name: cosine, warmup_steps: 3}}
trainer:
  name: sl
  exp_name: resume
  batches_per_step: 2
  deterministic: true
  valid_every_n_steps: 10
  checkpoint: {{save_every_n_steps: 1}}
logger:
  - {{name: jsonl, write_every_n_steps: 1}}
"""

# Where a kill landed, judged from the files it left (first match wins).
DURING_WRITE = "writing ckpt.<n>.pt (its temp file is there)"
DURING_LINK = "swapping the link (its temp link is there)"
BEFORE_LINK = "between write and link swap (newest ckpt.<n>.pt not linked)"
BEFORE_RETENTION = "before retention (the previous checkpoint still there)"
DURING_LOCK = "rewriting .lock_ckpt after a save (its temp file is there)"
DURING_STARTUP = "start-up (no step taken)"
DURING_STEP = "during a step"
CATEGORIES = (
    DURING_WRITE,
    DURING_LINK,
    BEFORE_LINK,
    BEFORE_RETENTION,
    DURING_LOCK,
    DURING_STARTUP,
    DURING_STEP,
)


def max_steps_for(kills: int) -> int:
    """Long enough that ``kills`` kills seldom reach the end: a kill lets its run make ~3 steps of
    progress. A test process woken late on a loaded machine can let a run go on to its end; that start
    is then checked as the final one (see the test)."""
    return 12 * kills + 30


def _classify(disk: DiskState, before: DiskState, orphans: set[int], stepped: bool) -> str:
    """Where a kill landed, from what it left that was not there before the start it killed."""
    if set(disk.partial) - set(before.partial):
        return DURING_WRITE
    if set(disk.link_tmp) - set(before.link_tmp):
        return DURING_LINK
    linked = disk.linked_step
    if disk.changed_since(before):
        if disk.newest is not None and (linked is None or disk.newest > linked):
            return BEFORE_LINK
        if linked is not None and linked - 1 in disk.numbered and linked - 1 not in orphans:
            return BEFORE_RETENTION
    if any("lock_ckpt" in name for name in set(disk.other_tmp) - set(before.other_tmp)):
        return DURING_LOCK
    return DURING_STEP if stepped else DURING_STARTUP


@pytest.mark.slow
def test_sigkill_at_random_instants_keeps_a_loadable_checkpoint_and_ends_bit_exact(
    kill_count: int, reliability_seed: int, tmp_path: Path
) -> None:
    """Proves that a SIGKILL at any instant (start-up, step, validation, any point of a save) leaves a
    loadable ``ckpt.pt`` naming a complete checkpoint, at most one temp file (gone after the next
    start), no checkpoint that retention forgets, a next start that resumes from the newest complete
    checkpoint, and, after ``kill_count`` kills, the same final tensors as a run never killed."""
    began = time.monotonic()
    rng = random.Random(reliability_seed)
    print(
        f"\nkill test: {kill_count} kills, seed {reliability_seed} "
        f"(ML_RELIABILITY_SEED={reliability_seed} replays the same delays)"
    )
    max_steps = max_steps_for(kill_count)
    config = write_config(
        tmp_path / "config", "kill.yaml", CONFIG.format(max_steps=max_steps, step_sleep_s=STEP_SLEEP_S)
    )
    (tmp_path / "reference").mkdir()
    reference = Run(tmp_path / "reference")
    run = Run(tmp_path / "killed")
    run.run_dir.mkdir()
    violations = Violations()
    categories: Counter[tuple[str, str]] = Counter()  # (aim, where it landed)
    startup_s: list[float] = []
    expected_resume: int | None = None  # the newest complete checkpoint, where the next start must resume
    stale: set[str] = set()  # temp files a killed process left, which the next start must remove
    survived: set[str] = set()  # those that a start did not remove (reported once each)
    orphans: set[int] = set()  # numbered checkpoints that retention will never delete
    peak_numbered = 0
    ended_at = kill_count + 1  # the start that runs to the end
    reached = 0  # steps done before that start (reported)
    reference.start(config)  # in the background, alongside the killed run
    try:
        for kill in range(1, kill_count + 1):
            reached = max(indices_steps(run.indices_file), default=0)
            before = disk_state(run.exp_dir)
            size = file_size(run.indices_file)
            spawned = time.monotonic()
            proc = run.start(config)
            aim = AIM_ANY if kill == 1 or rng.random() >= STARTUP_SHARE else AIM_STARTUP
            if aim == AIM_STARTUP:  # a random instant from 0.05 s after the spawn to the first step
                estimate = min(startup_s) if startup_s else 2.0
                alive = sleep_while_running(proc, spawned + rng.uniform(0.05, estimate))
            else:
                alive = poll(proc, grown(run.indices_file, size), f"a step (kill {kill})")
                startup_s.append(time.monotonic() - spawned)
                if rng.random() < SAVE_SHARE:  # just after a new checkpoint's temp file appears
                    aim = AIM_SAVE
                    saving = new_partial_checkpoint(run.exp_dir, set(before.partial))
                    alive = alive and poll(proc, saving, f"a save (kill {kill})", interval_s=0)
                    time.sleep(rng.uniform(0, SAVE_WINDOW_S))  # a save takes a few ms: no polling here
                    alive = alive and proc.poll() is None
                else:  # a random instant of the first KILL_WINDOW_S of training
                    delay = rng.uniform(0, KILL_WINDOW_S)
                    alive = alive and sleep_while_running(proc, time.monotonic() + delay)
            if not alive:
                if proc.returncode == 0:  # it reached its end (the test woke late): the final start
                    ended_at = kill
                    break
                pytest.fail(f"the run exited ({proc.returncode}) before kill {kill}:\n{run.stderr()[-3000:]}")
            proc.send_signal(signal.SIGKILL)
            assert run.wait() == -signal.SIGKILL

            # The start just killed: did it remove the leftovers and resume where it should?
            stderr = run.stderr()
            if "Traceback" in stderr:
                violations.add("traceback", f"start {kill}: {stderr[stderr.index('Traceback') :][:400]}")
            disk = disk_state(run.exp_dir)
            got_past_resume = "Training in" in stderr or "Resumed from" in stderr
            if got_past_resume:  # (the leftovers are removed before resuming)
                _check_resume(kill, expected_resume, resumed_step(stderr), violations)
                survivors = stale & (set(disk.ckpt_temps) | set(disk.other_tmp)) - survived
                for name in sorted(survivors):
                    violations.add(
                        "a temp file left by a killed process survived the next start",
                        f"{name} (still there after start {kill})",
                    )
                survived |= survivors
                stale.clear()

            # What this kill left behind.
            problems = checkpoint_problems(disk)
            if problems:
                pytest.fail(f"after kill {kill}: " + "; ".join(problems))
            if disk.link is None and disk.numbered and expected_resume is not None:
                violations.add("ckpt.pt disappeared", f"after kill {kill}: {sorted(disk.numbered)}")
            if len(disk.ckpt_temps) > 1:
                violations.add(
                    "more than one checkpoints/.ckpt.*.tmp", f"after kill {kill}: {disk.ckpt_temps}"
                )
            category = _classify(disk, before, orphans, file_size(run.indices_file) > size)
            categories[aim, category] += 1
            peak_numbered = max(peak_numbered, len(disk.numbered))
            if len(disk.numbered) > 2:
                violations.add(
                    "more than two numbered checkpoints with only_save_most_recent (retention forgets some)",
                    f"after kill {kill}: {sorted(disk.numbered)} (ckpt.pt -> {disk.link})",
                )
            expected_resume = disk.newest
            stale |= (set(disk.ckpt_temps) | set(disk.other_tmp)) - survived
            orphans |= set(disk.numbered) - {disk.linked_step, disk.newest}

        # Run to the end.
        kills = ended_at - 1
        if ended_at == kill_count + 1:
            reached = max(indices_steps(run.indices_file), default=0)
            proc = run.start(config)
            try:
                code = proc.wait(timeout=FINISH_TIMEOUT_S)
            finally:
                run.kill()
        else:
            code = proc.returncode
            print(f"  the run reached its end at start {ended_at}, after {kills} of {kill_count} kills")
        stderr = run.stderr()
        assert code == 0, f"the final start exited {code}:\n{stderr[-3000:]}"
        _check_resume(ended_at, expected_resume, resumed_step(stderr), violations)
        ref_code = reference.proc.wait(timeout=FINISH_TIMEOUT_S) if reference.proc else None
        assert ref_code == 0, reference.stderr()[-3000:]
    finally:
        run.kill()
        reference.kill()

    disk = disk_state(run.exp_dir)
    leftovers = sorted(set(disk.ckpt_temps) | set(disk.other_tmp))
    if leftovers:
        violations.add("temp files left in the finished run", ", ".join(leftovers))
    if sorted(disk.numbered) != [max_steps] or disk.link != f"ckpt.{max_steps}.pt":
        violations.add(
            "the finished run holds more than its final checkpoint",
            f"{[p.name for p in disk.numbered.values()]}, ckpt.pt -> {disk.link}",
        )

    rows = []
    for name in CATEGORIES:
        counts = [categories[aim, name] for aim in (AIM_STARTUP, AIM_ANY, AIM_SAVE)]
        if sum(counts):
            rows.append((name, sum(counts), f"{100 * sum(counts) / max(kills, 1):.0f}%", *counts))
    print_table(
        f"kill test: {kills} kills survived, by where they landed (and where they were aimed)",
        ("landed", "kills", "share", "aimed: start-up", "anywhere", "a save"),
        rows,
    )
    in_save = sum(n for (_, name), n in categories.items() if name not in (DURING_STEP, DURING_STARTUP))
    print(
        f"  kills inside a save: {in_save}/{kills}; start-up to first step: median "
        f"{statistics.median(startup_s):.2f} s; steps done before the last start: {reached} of {max_steps}; "
        f"peak numbered checkpoints on disk: {peak_numbered}; wall time {time.monotonic() - began:.0f} s"
    )
    if violations:
        print("violations:\n" + violations.summary())

    # The same run as one never killed: every attempt at a step (a killed one may have been cut
    # short after its first batch) saw the reference's samples, and the last attempt all of them.
    ref_rows: dict[int, list[list[int]]] = {}
    for step, indices in read_indices(reference.indices_file):
        ref_rows.setdefault(step, []).append(indices)
    attempts: dict[int, list[list[int]]] = {}
    for step, indices in read_indices(run.indices_file):
        attempts.setdefault(step, []).append(indices)
    assert sorted(attempts) == sorted(ref_rows) == list(range(1, max_steps + 1))
    for step, batches in attempts.items():
        assert batches[-len(ref_rows[step]) :] == ref_rows[step], (
            f"step {step}: other samples than the reference"
        )
        assert all(batch in ref_rows[step] for batch in batches), (
            f"step {step}: other samples in a killed attempt"
        )
    assert sorted(set(_train_steps(_records(run.exp_dir)))) == list(range(1, max_steps + 1))
    final, expected = _load(run.checkpoints / "ckpt.pt"), _load(reference.checkpoints / "ckpt.pt")
    for part in ALL_PARTS:
        assert_same(final[part], expected[part], part)
    counters = ("num_steps", "num_epochs", "num_samples", "num_epoch_steps", "num_epoch_samples")
    state, ref_state = ckpt_state(run.checkpoints / "ckpt.pt"), ckpt_state(reference.checkpoints / "ckpt.pt")
    assert {k: state[k] for k in counters} == {k: ref_state[k] for k in counters}

    assert not violations, "invariants broken under kill -9:\n" + violations.summary(examples=5)


def _check_resume(start: int, expected: int | None, resumed: int | None, violations: Violations) -> None:
    if resumed == expected:
        return
    if expected is not None and resumed is not None and resumed < expected:
        violations.add(
            "resumed from an older checkpoint than the newest complete one",
            f"start {start} resumed at step {resumed}; complete ckpt.{expected}.pt was on disk",
        )
    else:
        violations.add(
            "resumed from an unexpected point", f"start {start}: expected {expected}, got {resumed}"
        )
