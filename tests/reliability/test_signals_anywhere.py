"""Fault injection: SIGTERM and SIGUSR1 at random moments of real ``ml train`` runs, each then continued.

``ML_RELIABILITY_SIGNALS`` signals (5; ``make reliability``: 100) are spread evenly over five
moments, in a random (seeded) order, each a random one of SIGTERM and SIGUSR1:

- start-up: a random instant from ``EARLIEST_S`` (0.3 s) after the spawn until the first step would
  begin, as far as the fastest start so far tells, and within ``STARTUP_WINDOW_S`` (before 0.3 s,
  the signal may land in the interpreter's own start-up, before ``ml.entry``'s first line listens:
  no Python program can keep it; on a loaded 2-core machine that took over 0.05 s);
- a step: inside a training batch (just after ``resume_task`` records the batch's samples, while it
  sleeps ``task.step_sleep_s``);
- validation: while a validation pass runs (1200 single-sample batches, about half a second);
- a checkpoint write: while the temp file of a periodic checkpoint exists (``task.ballast_mb`` makes
  each one several MiB);
- rl collection: ``ml train cartpole`` with two environments and 512 steps each per iteration, a
  random instant just after an iteration was logged, when the next rollout is being collected
  (about 95% of an iteration; the update is one minibatch).

The supervised moments are dealt to two runs, the rl moments go to a third; each signal stops a
segment of its run, and the three runs proceed side by side. Every signalled process must exit 0
within ``GRACE_S`` (15) seconds of the signal (``STARTUP_GRACE_S``, 30, at start-up, which the
trainer finishes before it stops: on a loaded 2-core machine start-up alone took up to 14.5 s),
leave no temp file and a ``ckpt.pt`` that loads with ``weights_only`` and holds every step the
process took; the next start must resume exactly there.
Once continued to the end, the training steps in ``logs/metrics.jsonl`` (and, for the supervised
runs, the batches in ``resume_task``'s indices file) cover each step exactly once: unlike after a
``kill -9``, no step is ever done twice.
"""

import json
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from signal import Signals
from typing import Any

import pytest

from tests.e2e.test_resume import Run, _records, _train_steps
from tests.e2e.test_rl import _start as start_rl
from tests.reliability.harness import (
    Violations,
    checkpoint_problems,
    disk_state,
    file_size,
    grown,
    indices_steps,
    partial_checkpoints,
    poll,
    print_table,
    resumed_step,
    sleep_while_running,
    wait_for_exit,
    write_config,
)

GRACE_S = 15.0  # a signalled run must have exited this long after the signal...
STARTUP_GRACE_S = 30.0  # ...or this long, for a signal that start-up keeps until it is done
FINISH_TIMEOUT_S = 300.0

STARTUP = "start-up"
STEP = "step"
VALIDATION = "validation"
CHECKPOINT_WRITE = "checkpoint write"
RL_COLLECTION = "rl collection"
MOMENTS = (STARTUP, STEP, VALIDATION, CHECKPOINT_WRITE, RL_COLLECTION)

STEP_SLEEP_S = 0.01
BATCHES_PER_STEP = 2
VALID_EVERY = 5
SAVE_EVERY = 4
VALIDATION_WINDOW_S = 0.15  # a validation pass takes ~0.4 s or more
EARLIEST_S = 0.3  # the interpreter's start-up, before ml.entry listens, is out of any program's hands
# The start-up window at most: the fastest start so far may have been slowed by a loaded machine, and
# a resumed segment, which trains a few steps, can end sooner than that start took (it did in CI).
STARTUP_WINDOW_S = 2.0
COLLECTION_WINDOW_S = 0.06  # an iteration takes ~0.14 s, nearly all of it collecting

SL_CONFIG = """\
# ml train signals.yaml task.indices_file=...
model: {{name: "resume_task:DropoutBNModel", hidden: 16, dropout: 0.2}}
task:
  name: "resume_task:IndexedTask"
  num_samples: 2400  # validation and test get 1200
  max_steps: {max_steps}
  step_sleep_s: {step_sleep_s}
  ballast_mb: 8
  train_dl: {{batch_size: 4, num_workers: 0, shuffle: true, drop_last: true}}
  valid_dl: {{batch_size: 1}}
  test_dl: {{batch_size: 200}}
optimizer: {{name: adamw, lr: 1e-2}}
lr_scheduler: {{name: cosine, warmup_steps: 3}}
trainer:
  name: sl
  exp_name: resume
  batches_per_step: {batches_per_step}
  valid_every_n_steps: {valid_every}
  progress_bar: false
  checkpoint: {{save_every_n_steps: {save_every}}}
logger:
  - {{name: jsonl, write_every_n_steps: 1}}
"""

RL_LOGGING = """\
logger:
  - {name: jsonl, write_every_n_steps: 1}
"""
RL_OVERRIDES = (
    "task.num_envs=2",
    "task.num_env_steps=512",
    "task.num_update_epochs=1",
    "task.minibatch_size=1024",
    "trainer.eval_every_n_iterations=null",
    "trainer.eval_at_end=false",
)


@dataclass
class Outcome:
    """One signal: where it was aimed, whether it provably landed there, and how the process ended."""

    moment: str
    sig: Signals
    landed: bool
    code: int | None  # None: still running after the grace period (then killed)
    latency_s: float | None
    cut_validation: int | None = None  # the step whose validation pass the signal cut short
    revalidated: bool = False  # whether the continued run validated that step after all


def plan_signals(count: int, rng: random.Random) -> list[tuple[str, Signals]]:
    """``count`` (moment, signal) pairs, the moments spread evenly, the order and signals random."""
    moments = [MOMENTS[i % len(MOMENTS)] for i in range(count)]
    rng.shuffle(moments)
    return [(m, rng.choice((Signals.SIGTERM, Signals.SIGUSR1))) for m in moments]


def split_supervised(plan: list[tuple[str, Signals]]) -> list[list[tuple[str, Signals]]]:
    """The supervised signals, dealt to two runs."""
    supervised = [p for p in plan if p[0] != RL_COLLECTION]
    return [segments for segments in (supervised[0::2], supervised[1::2]) if segments]


def _new_records(path: Path, offset: int) -> list[dict[str, Any]]:
    """The complete JSON lines of ``path`` after byte ``offset``."""
    if not path.exists():
        return []
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    return [json.loads(line) for line in data.split(b"\n")[:-1] if line.strip()]


def _new_lines(path: Path, offset: int) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as f:
        f.seek(offset)
        return f.read().count(b"\n")


def _stop(
    proc: Any, sig: Signals, moment: str, landed: Callable[[], bool], violations: Violations, where: str
) -> Outcome:
    """Sends ``sig``, waits for the exit (killing the process after the grace period); records it."""
    sent = time.monotonic()
    proc.send_signal(sig)
    hit = landed()
    grace = STARTUP_GRACE_S if moment == STARTUP else GRACE_S
    latency = wait_for_exit(proc, sent, grace)
    if latency is None:
        violations.add(f"no exit within {grace:.0f} s of the signal", f"{where}: {sig.name} at {moment}")
        proc.kill()
        proc.wait()
        return Outcome(moment, sig, hit, None, None)
    if proc.returncode != 0:
        violations.add(
            "a signalled run did not exit 0",
            f"{where}: {sig.name} at {moment}, {latency:.2f} s after the signal, exit {proc.returncode}",
        )
    return Outcome(moment, sig, hit, proc.returncode, latency)


def _check_stopped(exp_dir: Path, stderr: str, where: str, violations: Violations) -> int | None:
    """Checks what a signalled process left; returns the step of its checkpoint (None: none loads)."""
    if "Traceback" in stderr:
        violations.add("traceback", f"{where}: {stderr[stderr.index('Traceback') :][:300]}")
    disk = disk_state(exp_dir)
    problems = checkpoint_problems(disk)
    for problem in problems:
        violations.add("broken checkpoint after a signal", f"{where}: {problem}")
    if disk.ckpt_temps or disk.other_tmp:
        violations.add("temp files left after a signal", f"{where}: {[*disk.ckpt_temps, *disk.other_tmp]}")
    if problems or disk.linked_step is None:
        violations.add("no loadable ckpt.pt after a signal", f"{where}: ckpt.pt -> {disk.link}")
        return None
    return disk.linked_step


def _check_resumed(stderr: str, stop: int | None, where: str, violations: Violations) -> None:
    """A start that got as far as training resumed exactly where the previous signal stopped the run."""
    resumed = resumed_step(stderr)
    if resumed is None and "Training in" not in stderr:
        return  # stopped before it resumed anything
    if resumed != stop:
        violations.add(
            "resumed elsewhere than where the signal stopped", f"{where}: at {resumed}, not {stop}"
        )


# ---------------------------------------------------------------------------------------------
# The supervised run: start-up, step, validation and checkpoint-write signals
#
# Each aim waits (the run's first step has begun, except at start-up) until the moment comes,
# and returns whether the process still runs and a check, made right after the signal was
# sent, of whether it landed there.


def _yes() -> bool:
    return True


Aim = Callable[[Run, Any, random.Random, int, int, "int | None"], tuple[bool, Callable[[], bool]]]


def _aim_startup(
    run: Run, proc: Any, rng: random.Random, size: int, metrics_size: int, stop: int | None
) -> tuple[bool, Callable[[], bool]]:
    """The random start-up delay has passed (see ``_sl_chain``); it landed if no batch has started."""
    return True, lambda: file_size(run.indices_file) == size


def _aim_step(
    run: Run, proc: Any, rng: random.Random, size: int, metrics_size: int, stop: int | None
) -> tuple[bool, Callable[[], bool]]:
    """Inside a random one of the segment's first batches, while it sleeps."""
    lines = rng.randint(1, 2 * BATCHES_PER_STEP)
    alive = poll(proc, lambda: _new_lines(run.indices_file, size) >= lines, "a training batch")
    return alive and sleep_while_running(proc, time.monotonic() + rng.uniform(0, STEP_SLEEP_S)), _yes


class _CutValidation:
    """Landed if the validation pass after ``step`` was cut short: it logged no record."""

    def __init__(self, metrics: Path, offset: int) -> None:
        self.metrics, self.offset, self.step = metrics, offset, -1

    def running(self) -> bool:
        records = _new_records(self.metrics, self.offset)
        done = {r["step"] for r in records if r["phase"] == "valid"}
        due = [r["step"] for r in records if r["phase"] == "train" and r["step"] % VALID_EVERY == 0]
        if due and due[-1] not in done:
            self.step = due[-1]
            return True
        return False

    def __call__(self) -> bool:
        return not any(
            r["phase"] == "valid" and r["step"] == self.step for r in _new_records(self.metrics, self.offset)
        )

    def cut_at(self, stop: int | None) -> bool:
        """After the exit: the run stopped at the validated step, and the pass logged nothing."""
        return stop == self.step and self()


def _aim_validation(
    run: Run, proc: Any, rng: random.Random, size: int, metrics_size: int, stop: int | None
) -> tuple[bool, Callable[[], bool]]:
    """A random instant of the first validation pass (its step's training record is written first)."""
    cut = _CutValidation(run.exp_dir / "logs" / "metrics.jsonl", metrics_size)
    alive = poll(proc, cut.running, "a validation pass")
    alive = alive and sleep_while_running(proc, time.monotonic() + rng.uniform(0, VALIDATION_WINDOW_S))
    return alive, cut


def _aim_checkpoint_write(
    run: Run, proc: Any, rng: random.Random, size: int, metrics_size: int, stop: int | None
) -> tuple[bool, Callable[[], bool]]:
    """As soon as a new periodic checkpoint's temp file appears; landed if it is still there."""
    partial: list[Path] = []

    def writing() -> bool:
        partial[:] = [
            run.checkpoints / n for n, s in partial_checkpoints(run.exp_dir).items() if s > (stop or 0)
        ]
        return bool(partial)

    alive = poll(proc, writing, "a checkpoint write")
    return alive, lambda: all(p.exists() for p in partial)


_AIMS: dict[str, Aim] = {
    STARTUP: _aim_startup,
    STEP: _aim_step,
    VALIDATION: _aim_validation,
    CHECKPOINT_WRITE: _aim_checkpoint_write,
}


def _sl_chain(
    plan: list[tuple[str, Signals]], root: Path, rng: random.Random, violations: Violations
) -> list[Outcome]:
    """Stops one supervised run with each signal of ``plan`` in turn, then runs it to the end."""
    max_steps = 5 * len(plan) + 6  # a segment takes at most 5 steps before its signal stops it
    text = SL_CONFIG.format(
        max_steps=max_steps,
        step_sleep_s=STEP_SLEEP_S,
        batches_per_step=BATCHES_PER_STEP,
        valid_every=VALID_EVERY,
        save_every=SAVE_EVERY,
    )
    config = write_config(root, "signals.yaml", text)
    began = time.monotonic()
    run = Run(root / "runs")
    run.run_dir.mkdir()
    metrics = run.exp_dir / "logs" / "metrics.jsonl"
    outcomes: list[Outcome] = []
    startup_s: list[float] = []
    stop: int | None = None  # where the last signal stopped the run; None: not started yet
    try:
        for n, (moment, sig) in enumerate(plan, 1):
            where = f"{root.name} start {n}"
            size, metrics_size = file_size(run.indices_file), file_size(metrics)
            spawned = time.monotonic()
            proc = run.start(config)
            if moment == STARTUP:
                estimate = min([*startup_s, STARTUP_WINDOW_S])
                alive = sleep_while_running(
                    proc, spawned + rng.uniform(EARLIEST_S, max(EARLIEST_S, estimate))
                )
            else:
                alive = poll(proc, grown(run.indices_file, size), f"a step of {where}")
                startup_s.append(time.monotonic() - spawned)
            aim = _AIMS[moment]
            alive, landed = aim(run, proc, rng, size, metrics_size, stop) if alive else (False, _yes)
            if not alive:
                pytest.fail(
                    f"{where} exited ({proc.returncode}) before its {moment} signal:\n{run.stderr()[-2000:]}"
                )

            outcome = _stop(proc, sig, moment, landed, violations, where)
            stderr = run.stderr()
            _check_resumed(stderr, stop, where, violations)
            stop = _check_stopped(run.exp_dir, stderr, where, violations)
            if not (run.exp_dir / "config.yaml").exists():  # this run cannot go on: report what it met
                violations.add(
                    "a signalled run left no config.yaml to continue from",
                    f"{where}: {sig.name} at {moment}, exit {outcome.code}; the rest of {root.name} skipped",
                )
                return [*outcomes, outcome]
            steps = indices_steps(run.indices_file)
            if stop is not None and steps and steps[-1] != stop:
                violations.add(
                    "steps taken but not in the stop checkpoint",
                    f"{where}: stopped at {stop}, took {steps[-1]}",
                )
            if isinstance(landed, _CutValidation):
                outcome.landed = outcome.landed and landed.cut_at(stop)
                outcome.cut_validation = landed.step if outcome.landed else None
            outcomes.append(outcome)

        final_start = time.monotonic()
        proc = run.start(config)
        code = proc.wait(timeout=FINISH_TIMEOUT_S)
        print(
            f"  {root.name}: {len(plan)} signals in {final_start - began:.0f} s, then the last start ran "
            f"{time.monotonic() - final_start:.0f} s to step {max_steps}"
        )
        stderr = run.stderr()
        assert code == 0, f"the supervised run's last start exited {code}:\n{stderr[-3000:]}"
        _check_resumed(stderr, stop, f"{root.name} last start", violations)
    finally:
        run.kill()

    expected = [s for s in range(1, max_steps + 1) for _ in range(BATCHES_PER_STEP)]
    steps = indices_steps(run.indices_file)
    if steps != expected:
        twice = sorted({s for s in steps if steps.count(s) > BATCHES_PER_STEP})
        lost = sorted(set(range(1, max_steps + 1)) - set(steps))
        violations.add("batches not each done once", f"{root.name}: steps done twice {twice}, never {lost}")
    records = _records(run.exp_dir)
    train = _train_steps(records)
    if train != list(range(1, max_steps + 1)):
        violations.add("metrics.jsonl steps not each logged once", f"{root.name}: {train}")
    validated = {r["step"] for r in records if r["phase"] == "valid"}
    for outcome in outcomes:
        outcome.revalidated = outcome.cut_validation in validated
    return outcomes


# ---------------------------------------------------------------------------------------------
# The rl run: signals while collecting


def _rl_chain(count: int, root: Path, rng: random.Random, violations: Violations) -> list[Outcome]:
    """Stops one ``ml train cartpole`` run ``count`` times while it collects, then runs it to the end."""
    max_iterations = 2 * count + 4  # a segment stops in the iteration after the first one it logs
    logging_yaml = write_config(root, "rl_logging.yaml", RL_LOGGING)
    run_dir = root / "runs"
    exp_dir = run_dir / "cartpole" / "run_0"
    metrics = exp_dir / "logs" / "metrics.jsonl"
    stderr_file = run_dir / "stderr.txt"
    began = time.monotonic()
    outcomes: list[Outcome] = []
    stop: int | None = None  # where the last signal stopped the run; None: not started yet
    proc = None
    try:
        for n in range(1, count + 1):
            where = f"{root.name} start {n}"
            sig = rng.choice((Signals.SIGTERM, Signals.SIGUSR1))
            if n == 1:
                args: tuple[str, ...] = ("cartpole", str(logging_yaml), *RL_OVERRIDES)
                args += (f"task.max_steps={max_iterations}",)
            else:
                args = (str(exp_dir / "config.yaml"),)
            offset, metrics_size = file_size(stderr_file), file_size(metrics)
            proc = start_rl(run_dir, *args)

            def logged(offset: int = metrics_size) -> bool:
                return any(r["phase"] == "train" for r in _new_records(metrics, offset))

            alive = poll(proc, logged, f"an iteration of {where}")
            last = max(r["step"] for r in _new_records(metrics, metrics_size) if r["phase"] == "train")
            alive = alive and sleep_while_running(
                proc, time.monotonic() + rng.uniform(0, COLLECTION_WINDOW_S)
            )
            if not alive:
                pytest.fail(
                    f"{where} exited ({proc.returncode}) before its signal:\n{stderr_file.read_text()}"
                )
            outcome = _stop(proc, sig, RL_COLLECTION, lambda: True, violations, where)
            stderr = stderr_file.read_text()[offset:]
            _check_resumed(stderr, stop, where, violations)
            stop = _check_stopped(exp_dir, stderr, where, violations)
            records = [r for r in _records(exp_dir) if r["phase"] == "train"]
            if stop is not None and records and records[-1]["step"] != stop:
                violations.add(
                    "iterations taken but not in the stop checkpoint",
                    f"{where}: stopped at {stop}, logged {records[-1]['step']}",
                )
            outcome.landed = stop == last + 1  # stopped after the iteration it was sent in
            outcomes.append(outcome)

        offset, final_start = file_size(stderr_file), time.monotonic()
        proc = start_rl(run_dir, str(exp_dir / "config.yaml"))
        code = proc.wait(timeout=FINISH_TIMEOUT_S)
        print(
            f"  {root.name}: {count} signals in {final_start - began:.0f} s, then the last start ran "
            f"{time.monotonic() - final_start:.0f} s to iteration {max_iterations}"
        )
        stderr = stderr_file.read_text()[offset:]
        assert code == 0, f"the rl run's last start exited {code}:\n{stderr[-3000:]}"
        _check_resumed(stderr, stop, f"{root.name} last start", violations)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    train = _train_steps(_records(exp_dir))
    if train != list(range(1, max_iterations + 1)):
        violations.add("metrics.jsonl steps not each logged once", f"{root.name}: {train}")
    return outcomes


# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_and_sigusr1_at_random_moments_stop_cleanly_and_resume_without_losing_a_step(
    signal_count: int, reliability_seed: int, tmp_path: Path
) -> None:
    """Proves that SIGTERM or SIGUSR1 at start-up, in a step, in validation, in a checkpoint write or in
    an rl rollout makes ``ml train`` exit 0 within the grace period with a complete checkpoint of every
    step it took, and that continuing the run repeats and skips no step."""
    began = time.monotonic()
    rng = random.Random(reliability_seed)
    plan = plan_signals(signal_count, rng)
    rl_count = sum(moment == RL_COLLECTION for moment, _ in plan)
    print(
        f"\nsignal test: {signal_count} signals, seed {reliability_seed} "
        f"(ML_RELIABILITY_SEED={reliability_seed} replays the same plan), "
        f"grace {GRACE_S:.0f} s ({STARTUP_GRACE_S:.0f} s at start-up)"
    )
    chains: list[tuple[Callable[..., list[Outcome]], Any, Path]] = [
        (_sl_chain, segments, tmp_path / f"sl{i}") for i, segments in enumerate(split_supervised(plan))
    ]
    if rl_count:
        chains.append((_rl_chain, rl_count, tmp_path / "rl"))
    violations = Violations()
    outcomes: list[Outcome] = []
    with ThreadPoolExecutor(max_workers=len(chains)) as pool:  # the runs side by side
        futures = [
            (pool.submit(chain, work, root, random.Random(rng.random()), found), found)
            for chain, work, root in chains
            for found in [Violations()]
        ]
        for future, found in futures:
            outcomes += future.result()
            violations.merge(found)

    rows = []
    for moment in MOMENTS:
        mine = [o for o in outcomes if o.moment == moment]
        if not mine:
            continue
        latencies = [o.latency_s for o in mine if o.latency_s is not None]
        rows.append(
            (
                moment,
                len(mine),
                sum(o.sig == Signals.SIGTERM for o in mine),
                sum(o.landed for o in mine),
                sum(o.code == 0 for o in mine),
                f"{max(latencies):.2f}" if latencies else "-",
                f"{max(o.latency_s or 0 for o in mine if o.code == 0):.2f}"
                if any(o.code == 0 for o in mine)
                else "-",
            )
        )
    print_table(
        "signal test: moment -> signals sent, clean exits, seconds from signal to exit",
        ("moment", "sent", "SIGTERM", "landed there", "exit 0", "max s to exit", "max s (exit 0)"),
        rows,
    )
    cut = [o for o in outcomes if o.cut_validation is not None]
    print(
        f"  validation passes cut short by a signal: {len(cut)}, of which the continued run redid "
        f"{sum(o.revalidated for o in cut)} (the others' metrics are missing from metrics.jsonl)"
    )
    print(f"  wall time {time.monotonic() - began:.0f} s")
    if violations:
        print("violations:\n" + violations.summary())
    assert not violations, "invariants broken under signals:\n" + violations.summary(examples=5)
    assert len(outcomes) == signal_count
