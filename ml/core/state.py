"""Defines :class:`State`, the counters a trainer keeps while it runs.

The state is small, plain data: it is saved in every checkpoint as a JSON string and restored on
resume, so a resumed run continues its counters instead of starting them again.
"""

import json
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Literal, cast, get_args

Phase = Literal["train", "valid", "test"]
PHASES: tuple[Phase, ...] = get_args(Phase)


@dataclass
class State:
    """Counters and timers of a training run.

    Attributes:
        num_epochs: Completed passes over the training data.
        num_steps: Completed optimizer steps.
        num_epoch_steps: Optimizer steps taken in the current epoch.
        num_samples: Training samples consumed.
        num_epoch_samples: Training samples consumed in the current epoch.
        num_valid_steps: Validation batches evaluated.
        num_test_steps: Test batches evaluated.
        start_time_s: Wall-clock time (``time.time()``) the run (or its first segment) started.
        elapsed_time_s: Seconds of training so far, summed over resumed segments.
        phase: What the trainer is doing now: ``train``, ``valid`` or ``test``.
    """

    num_epochs: int = 0
    num_steps: int = 0
    num_epoch_steps: int = 0
    num_samples: int = 0
    num_epoch_samples: int = 0
    num_valid_steps: int = 0
    num_test_steps: int = 0
    start_time_s: float = field(default_factory=time.time)
    elapsed_time_s: float = 0.0
    phase: Phase = "train"

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"State.phase must be one of {PHASES}, got {self.phase!r}")

    @classmethod
    def init_state(cls) -> "State":
        """Returns a fresh state whose clock starts now."""
        return cls(start_time_s=time.time())

    @property
    def training(self) -> bool:
        return self.phase == "train"

    def set_phase(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        self.phase = cast(Phase, phase)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "State":
        """Builds a state from a dict, accepting the older ``raw_phase`` key.

        Raises:
            ValueError: If the dict has keys that are not state fields.
        """
        data = dict(data)
        if "raw_phase" in data:
            data.setdefault("phase", data.pop("raw_phase"))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown State fields {unknown}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "State":
        return cls.from_dict(json.loads(text))
