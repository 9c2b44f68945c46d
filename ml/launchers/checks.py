"""What ``ml train`` refuses before it claims a run folder, checked on a composed config.

:func:`check_before_claim` is one rule for ``ml train`` (:func:`ml.launchers.single.train_in_process`),
every point of a sweep (:func:`ml.launchers.sweep.check_points`, before the first point starts) and
``ml stage`` / the Slurm launcher (:func:`ml.launchers.stage.prepare_run`). It imports no launcher.
"""

import os
from pathlib import Path
from typing import Any

from ml.errors import ConfigError, first_line


def check_before_claim(root: Any, *, device: bool = True) -> None:
    """Refuses a composed config that ``ml train`` would refuse once it claimed a run folder: the
    initial weights' file, the folder names (a ``trainer.exp_dir`` that is an experiment's folder
    or lies in a run's), the trainer's settings, and (``device``: when the run trains on this
    machine) the device.

    What a sweep checks of every point before the first starts (its components are built by each
    point's own run: a model may take long to build). The trainer is built on a copy whose
    ``exp_dir`` is a placeholder (nothing is created), with its warnings held back for the run.

    Raises:
        ConfigError: The first problem, in one line.
    """
    import copy
    import logging

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from ml.core.registry import lookup
    from ml.run.claim import check_exp_dir, check_folder_name

    check_initial_weights(root)
    check_folder_name(str(root.trainer.exp_name), "trainer.exp_name")
    if not OmegaConf.is_missing(root.trainer, "exp_dir"):
        check_exp_dir(str(root.trainer.exp_dir))
    if device:
        device_of(root)
    trainer_cls, _ = lookup("trainer", str(root.trainer.name))
    trial = copy.deepcopy(root)
    if OmegaConf.is_missing(trial.trainer, "exp_dir"):
        trial.trainer.exp_dir = os.path.join(os.sep, "nonexistent", "ml-check", "run")
    # A trainer may ask for its device when built; not here, where the job's machine has it.
    chosen_device = None if device else os.environ.pop("ML_DEVICE", None)
    if not device and "device" in trial.trainer:
        trial.trainer.device = "cpu"
    quiet = logging.getLogger("ml")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        OmegaConf.resolve(trial)
        trainer_cls(trial.trainer)
    except ConfigError:  # names its key already
        raise
    except (ValueError, TypeError, OmegaConfBaseException) as e:
        raise ConfigError(f"trainer ({root.trainer.name}): {first_line(e)}") from e
    finally:
        quiet.setLevel(level)
        if chosen_device is not None:
            os.environ["ML_DEVICE"] = chosen_device


def check_initial_weights(root: Any) -> None:
    """``load_from_ckpt_path``: a file (a checkpoint, an export) or a sharded checkpoint's folder
    (whose contents read_checkpoint checks)."""
    initial = root.trainer.checkpoint.load_from_ckpt_path
    if initial and not (Path(initial).expanduser().is_file() or Path(initial).expanduser().is_dir()):
        raise ConfigError(
            f"trainer.checkpoint.load_from_ckpt_path: no such file or checkpoint folder {initial}"
        )


def device_of(root: Any) -> Any:
    """The job's device: ``trainer.device`` (``auto`` for a trainer without it), or ``$ML_DEVICE``.

    Raises:
        ConfigError: No such device, or not on this machine.
    """
    from ml.utils.device import resolve_device

    return resolve_device(root.trainer.get("device", "auto"))
