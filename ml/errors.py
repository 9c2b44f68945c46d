"""Defines the errors the command line answers by type, and its exit codes.

Every error the user can fix - a bad config, an unknown component, a checkpoint that is damaged or
does not fit, a run another process holds, an exported model that cannot be rebuilt, a bad command
line - is a :class:`UserError`: the ``ml`` command prints its message as one line and exits with
:data:`EXIT_BAD_INPUT`, and a training session that ends with one leaves the run as it was (no
``status.json``). Each kind also subclasses the built-in exception it used to be (``ConfigError`` is
a ``ValueError``, ``RegistryError`` a ``LookupError``, ...), so existing ``except`` clauses still
catch them.

A failure of training itself (exit code :data:`EXIT_FAILURE`) is any other exception; of those, a
:class:`TrainingFailure` (a checkpoint the disk refused, values that stopped being finite,
parameters DDP waited for in vain) is reported in one line too: no code to trace.

This module imports nothing heavy: the command line maps exceptions without importing torch.
"""

import pickle

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "BadInput",
    "CheckpointError",
    "CheckpointWriteError",
    "ConfigChangedError",
    "ConfigError",
    "DamagedCheckpointError",
    "ModelFileError",
    "NonFiniteLossError",
    "RegistryError",
    "RunDirNotSetError",
    "RunLockedError",
    "TrainingFailure",
    "UnsafeCheckpointError",
    "UnusedParametersError",
    "UserError",
]


class UserError(Exception):
    """Input the user can fix; the command line reports it as one line with :attr:`exit_code`."""

    exit_code = EXIT_BAD_INPUT


class BadInput(UserError):
    """A bad command line or argument of an ``ml`` command."""


class ConfigError(UserError, ValueError):
    """The run's config is invalid; the message is one line naming the problem and the fix."""


class ConfigChangedError(ConfigError):
    """The config changed since the checkpoint in a way that changes the experiment."""


class RegistryError(UserError, LookupError):
    """A config names a component that cannot be found."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, truncated, foreign or does not fit the objects it is loaded into."""


class DamagedCheckpointError(CheckpointError):
    """The file is not the complete checkpoint that was written: gone, not a regular file,
    truncated, or changed since (its checksum does not match). Resume falls back past it."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """A checkpoint holds pickled objects that would run code when loaded; it was not loaded."""


class RunLockedError(UserError, RuntimeError):
    """Another live process holds the experiment's ``running`` lock."""


class RunDirNotSetError(UserError, KeyError):
    """``RUN_DIR`` is needed to place the experiment directory but is not set."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "RUN_DIR is not set"


class ModelFileError(UserError, ValueError):
    """An exported model cannot be loaded: not a safetensors file, no config, or weights that do not fit."""


class TrainingFailure(RuntimeError):
    """A failure of training that is no bug to trace: exit code 1, and one line (the message's
    first) that names the cause and, where there is one, the fix."""


class NonFiniteLossError(TrainingFailure):
    """A loss or gradient became NaN or infinite and ``trainer.non_finite_loss`` is ``stop``: the
    message names the step (and the module, the part or the minibatch) and the fix."""


class CheckpointWriteError(TrainingFailure):
    """A checkpoint could not be written (disk full, file too large, read-only); the old one is kept.
    Not bad input: the message says which file and why."""


class UnusedParametersError(TrainingFailure):
    """Under DDP, which waits for a gradient of every trainable parameter, the loss left some out:
    the message names them and the fix (``trainer.ddp.find_unused_parameters``)."""


def first_line(e: BaseException) -> str:
    """An error's message in one line: its first (or its type's name, when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
