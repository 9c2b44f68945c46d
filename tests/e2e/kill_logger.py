"""A user logger for the tests of what a ``kill -9`` leaves in the logs: it kills its own process.

Listed last in ``logger``, it is asked to write after the loggers before it have written the same
record: ``{name: "kill_logger:KillLogger", phase: test, step: 6}`` SIGKILLs the process as the
test record of step 6 is written, so that record is on disk and the checkpoint saved after it
(the one that says the run finished) is not. It kills once: the next session (the same config,
resumed) finds ``marker`` and writes nothing.
"""

import os
import signal
from dataclasses import dataclass
from pathlib import Path

from ml.core.config import conf_field
from ml.core.state import State
from ml.loggers.base import BaseLogger, BaseLoggerConfig, LogBatch


@dataclass
class KillLoggerConfig(BaseLoggerConfig):
    phase: str = conf_field("test", help="Kill the process when a record of this phase ...")
    step: int = conf_field(0, help="... at this step is written")
    marker: str = conf_field("???", help="Created when it kills; while it exists, it does not kill")


class KillLogger(BaseLogger[KillLoggerConfig]):
    def write(self, state: State, batch: LogBatch) -> None:
        del batch
        marker = Path(self.config.marker)
        if state.phase == self.config.phase and state.num_steps == self.config.step and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
