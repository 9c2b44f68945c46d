"""Defines :func:`diff_configs` and :func:`config_changes`: what differs between two configs.

Both walk the two configs the same way (keys and list items at any depth, enums by name, ``???``
as absent, interpolations as written). :func:`config_changes` returns each difference as a
:class:`Change` (path, old value, new value), for ``ml diff``; :func:`diff_configs` formats them as
the ``path=value`` lines the trainer logs when a run's config changed. The module needs OmegaConf
only, not torch, so ``ml diff`` answers quickly; :mod:`ml.trainers.base` re-exports
``diff_configs`` (``ml.trainers.base.diff_configs``). :func:`segment_changes` is the same walk
judged for a resumed run: which changes alter what the experiment means.
"""

import enum
import math
from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

__all__ = [
    "ABSENT",
    "Change",
    "config_changes",
    "diff_configs",
    "format_value",
    "is_meaningful",
    "segment_changes",
]

ABSENT: Any = MISSING
"""The value of :class:`Change` ``old``/``new`` for a key one of the configs does not have."""


@dataclass(frozen=True)
class Change:
    """One difference: the value at ``path`` in the first config and in the second.

    ``old`` is :data:`ABSENT` for a key only the second config has, ``new`` for one only the first
    has. Values are plain data (dicts, lists, scalars; enums by name).
    """

    path: str
    old: Any
    new: Any


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=False, enum_to_str=True)
    if isinstance(value, enum.Enum):
        return value.name
    return value


def _is_container(value: Any) -> bool:
    return isinstance(value, (dict, list))


def _both_nan(first: Any, second: Any) -> bool:
    return isinstance(first, float) and isinstance(second, float) and math.isnan(first) and math.isnan(second)


def _reads_as_other(text: str) -> bool:
    """Whether ``text`` printed bare would read as a number, a boolean, None or nothing."""
    if (
        text.strip() != text
        or text in ("", "None", "True", "False", "MISSING", "???")
        or text[:2] in ("b'", 'b"')
    ):
        return True
    try:
        float(text)
        return True
    except ValueError:
        return False


def format_value(value: Any) -> str:
    """A scalar as the diff lines show it: a string that reads like another value is quoted.

    ``x=None`` (null) and ``x='None'`` (text) are thus told apart.
    """
    return repr(value) if isinstance(value, str) and _reads_as_other(value) else str(value)


def _changes(first: Any, second: Any, path: str, out: list[Change]) -> None:
    def child(key: Any) -> str:
        return f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else str(key))

    if isinstance(first, dict) and isinstance(second, dict):
        for key in list(first) + [k for k in second if k not in first]:
            a, b = first.get(key, MISSING), second.get(key, MISSING)
            _changes(a, b, child(key), out)
    elif isinstance(first, list) and isinstance(second, list):
        for i in range(max(len(first), len(second))):
            a = first[i] if i < len(first) else MISSING
            b = second[i] if i < len(second) else MISSING
            _changes(a, b, child(i), out)
    elif _both_nan(first, second):
        return
    elif type(first) is not type(second) or first != second:  # True vs 1 and 1 vs 1.0 differ too
        out.append(Change(path, first, second))


def config_changes(
    first: ListConfig | DictConfig | dict | list, second: ListConfig | DictConfig | dict | list
) -> list[Change]:
    """Every difference between two configs, in the order of the first config's keys.

    Args:
        first: The first (original) config.
        second: The second (new) config.

    Returns:
        One :class:`Change` per path whose value differs (a key one side lacks included); a
        container is only reported whole when the other side has no container of its kind there.
    """
    out: list[Change] = []
    _changes(_plain(first), _plain(second), "", out)
    return out


def diff_configs(
    first: ListConfig | DictConfig,
    second: ListConfig | DictConfig,
    prefix: str | None = None,
) -> tuple[list[str], list[str]]:
    """Returns the difference between two configs.

    Keys added, removed or changed at any depth are reported as ``path=value`` lines; lists are
    compared element by element (``path[i]``), enums by name, and ``???`` (missing) values count
    as absent. Interpolations are compared as written, without resolving them.

    Args:
        first: The first (original) config
        second: The second (new) config
        prefix: The prefix to check (used for recursion, not main call)

    Returns:
        Two lists of lines describing the diff between the two configs: what only the first has
        (or its old values), and what only the second has (or its new values).
    """

    def line(p: str, v: Any) -> str:
        if _is_container(v) and v:
            return f"{p}=... ({type(v).__name__})"
        return f"{p}={format_value(v)}"

    out: list[Change] = []
    _changes(_plain(first), _plain(second), prefix or "", out)
    out_first = [line(c.path, c.old) for c in out if c.old != MISSING]
    out_second = [line(c.path, c.new) for c in out if c.new != MISSING]
    return out_first, out_second


# Changing these between the segments of one run changes what the run means: the model, the
# optimizer, the data and how it is batched (and, for the gan trainer, how many discriminator
# updates each step makes), the seed (the number of processes is checked apart).
# Everything else (limits such as task.max_steps, logging, checkpointing, validation frequency,
# workers, launcher) may change freely.
MEANINGFUL = (
    "model.",
    "optimizer.",
    "task.",
    "trainer.batches_per_step",
    "trainer.discriminator_steps",
    "trainer.use_double_weight_precision",
)
FREE_TASK_KEYS = (
    "max_steps",
    "max_epochs",
    "max_samples",
    "max_seconds",
    "num_workers",
    "pin_memory",
    "persistent_workers",
    "prefetch_factor",
    "max_batches",  # evaluation only (refused on train_dl); a run from before the key has none
)
FREE_TASK_SECTIONS = ("valid_dl.", "test_dl.")


def is_meaningful(key: str) -> bool:
    """Whether changing ``key`` (dotted) between segments of a run changes the experiment."""
    if not key.startswith(MEANINGFUL) and key not in {m.rstrip(".") for m in MEANINGFUL}:
        return False
    if key.startswith("task."):
        rest = key[len("task.") :]
        if rest.startswith(FREE_TASK_SECTIONS) or rest.split(".")[-1] in FREE_TASK_KEYS:
            return False
    return True


def segment_changes(old: Any, new: Any) -> tuple[list[str], list[str]]:
    """What changed between the config a run was trained with and the one continuing it.

    Returns:
        Every change as a ``key: old -> new`` line, and those of them that change what the
        experiment means (:func:`is_meaningful`).
    """

    def shown(value: Any) -> str:
        return "<unset>" if value is ABSENT else format_value(value)

    changes = config_changes(old, new)
    lines = [f"{c.path}: {shown(c.old)} -> {shown(c.new)}" for c in changes]
    meaningful = [line for c, line in zip(changes, lines, strict=True) if is_meaningful(c.path)]
    return lines, meaningful
